// Host launchers of the CUDA permute kernels (permute_kernels.cu): raw pointers and a cudaStream_t,
// no torch headers, so that the kernels also build against the SIMT emulator (tests/simt). (The
// kernels are not in permute_cuda.cu: torch's ninja build names objects by stem, and that object
// would collide with the glue permute_cuda.cpp.) Every launcher returns cudaGetLastError().
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "../../common/dtype.h"

namespace l2r {
namespace permute {

using ::l2r::DType;

// Bytes of scratch memory launch_permute_plan needs for n = T * k rows and E experts.
size_t plan_workspace_bytes(int64_t n, int64_t experts, bool with_weights);

// Counting-sort dispatch plan of indices [T, k] (int64 when indices_int64, else int32):
// row_map [T*k] int64, offsets [E+1] int64, dropped [E] int64. capacity < 0: none. weights
// (float32 [T*k], nullable) only matter with a capacity. *error_flag (zeroed by the caller) is set
// to 1 when an index is outside [0, E); such slots are dropped. Positions are stable by flat row
// (token, slot) and do not depend on scheduling.
cudaError_t launch_permute_plan(const void* indices, bool indices_int64, int64_t T, int64_t k,
                                int64_t experts, int64_t align, int64_t capacity,
                                const float* weights, int64_t* row_map, int64_t* offsets,
                                int64_t* dropped, void* workspace, int32_t* error_flag,
                                cudaStream_t stream);

// out [num_rows, row_bytes]: row row_map[t, j] is x[t] (rows x_row_stride_bytes apart), other
// rows zero. src_scratch: num_rows int64.
cudaError_t launch_permute_rows(const void* x, int64_t x_row_stride_bytes, int64_t row_bytes,
                                const int64_t* row_map, int64_t T, int64_t k, int64_t num_rows,
                                int64_t* src_scratch, void* out, cudaStream_t stream);

// out [T, d] = sum_j w[t, j] * y[row_map[t, j]] in the accumulation type (double for kFloat64,
// else float); w (accumulation type, [T*k]) null means 1. Slots with row_map outside [0, y_rows)
// are skipped. y rows are y_row_stride elements apart; out is contiguous.
cudaError_t launch_gather_reduce(DType dtype, const void* y, int64_t y_row_stride, int64_t y_rows,
                                 const int64_t* row_map, const void* w, int64_t T, int64_t k,
                                 int64_t d, void* out, cudaStream_t stream);

// grad_y [y_rows, d] (w[t, j] * grad_out[t] at row row_map[t, j], zero elsewhere) and grad_w
// [T*k] (accumulation type; <y[row_map[t, j]], grad_out[t]>, zero where dropped). grad_out is
// contiguous [T, d]; src_scratch: y_rows int64.
cudaError_t launch_unpermute_backward(DType dtype, const void* grad_out, const void* y,
                                      int64_t y_row_stride, int64_t y_rows, const int64_t* row_map,
                                      const void* w, int64_t T, int64_t k, int64_t d,
                                      int64_t* src_scratch, void* grad_y, void* grad_w,
                                      cudaStream_t stream);

}  // namespace permute
}  // namespace l2r
