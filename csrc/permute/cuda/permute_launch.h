// Host launchers of the CUDA permute kernels (permute_kernels.cu): the launch plans of
// permute_launch_plan.h executed with <<<>>> on a cudaStream_t. Raw pointers, no torch headers, so
// that the kernels also build against the SIMT emulator (tests/simt). (The kernels are not in
// permute_cuda.cu: torch's ninja build names objects by stem, and that object would collide with
// the glue permute_cuda.cpp.) Every launcher returns the first CUDA error, or cudaSuccess.
#pragma once

#include <cuda_runtime.h>

#include "permute_launch_plan.h"

namespace l2r {
namespace permute {

using ::l2r::DType;

// Runs a plan of the *_launches functions (plan.ok()) on `stream`.
cudaError_t execute_permute_plan(const LaunchPlan& plan, cudaStream_t stream);

// permute_plan_launches etc. (permute_launch_plan.h, which documents them), run on `stream`.
cudaError_t launch_permute_plan(const void* indices, bool indices_int64, int64_t T, int64_t k,
                                int64_t experts, int64_t align, int64_t capacity,
                                const float* weights, int64_t* row_map, int64_t* offsets,
                                int64_t* dropped, void* workspace, int32_t* control,
                                cudaStream_t stream);
cudaError_t launch_permute_rows(const void* x, int64_t x_row_stride_bytes, int64_t row_bytes,
                                const int64_t* row_map, int64_t T, int64_t k, int64_t num_rows,
                                int64_t* src_scratch, void* out, bool every_row_mapped, cudaStream_t stream);
cudaError_t launch_gather_reduce(DType dtype, const void* y, int64_t y_row_stride, int64_t y_rows,
                                 const int64_t* row_map, const void* w, int64_t T, int64_t k,
                                 int64_t d, void* out, cudaStream_t stream);
cudaError_t launch_unpermute_backward(DType dtype, const void* grad_out, const void* y,
                                      int64_t y_row_stride, int64_t y_rows, const int64_t* row_map,
                                      const void* w, int64_t T, int64_t k, int64_t d,
                                      int64_t* src_scratch, void* grad_y, void* grad_w,
                                      cudaStream_t stream);

}  // namespace permute
}  // namespace l2r
