// The CUDA implementations of the ops (their ATen glue runs launch plans, cuda_plan.h). A CUDA build
// registers them when it loads (TORCH_LIBRARY_IMPL under L2R_WITH_CUDA in each glue file); a CPU-only
// build registers them when l2r_cuda.jit installs its NVRTC executor (python_executor.cpp).
#pragma once

#include <torch/library.h>

namespace l2r {
namespace route {
void register_route_cuda_ops(torch::Library& m);  // route/cuda/route_ops_cuda.cpp
}  // namespace route
namespace permute {
void register_permute_cuda_ops(torch::Library& m);  // permute/cuda/permute_cuda.cpp
}  // namespace permute
}  // namespace l2r
