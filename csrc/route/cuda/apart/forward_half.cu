// nvcc build only (L2R_ROUTE_CUDA_APART, set by setup.py): route_cuda.cu's forward kernels
// for __half x, in a translation unit of their own so that they compile in parallel with the
// others (launch_kernel_of_type in route_cuda.cu says why).
#if defined(L2R_ROUTE_CUDA_APART)
#define L2R_ROUTE_CUDA_APART_KERNEL
#include "../route_cuda.cu"

namespace l2r {
namespace route {
template cudaError_t launch_kernel_of_type<RouteKernel::kForward, __half>(const LaunchStep&, cudaStream_t);
}  // namespace route
}  // namespace l2r
#endif
