// extern "C" entry points over the CUDA permute launchers (csrc/permute/cuda/permute_launch.h), for
// tests/test_permute_cuda_emulated.py and benchmarks/gpu_model.py (built by tests/simt/harness.py:
// device pointers are host pointers there).
#include "permute/cuda/permute_launch.h"
using namespace l2r::permute;
extern "C" long drv_plan_ws(long n, long experts, int weighted) {
  return (long)plan_workspace_bytes(n, experts, weighted != 0);
}
extern "C" long drv_plan_control_words(long n) { return (long)plan_control_words(n); }
extern "C" int drv_plan(const void* idx, int is64, long T, long k, long E, long align, long cap,
                        const float* w, long* row_map, long* offsets, long* dropped, void* ws,
                        int* control) {
  return (int)launch_permute_plan(idx, is64 != 0, T, k, E, align, cap, w, (int64_t*)row_map,
                                  (int64_t*)offsets, (int64_t*)dropped, ws, control, nullptr);
}
extern "C" int drv_rows(const void* x, long stride_bytes, long row_bytes, const long* row_map,
                        long T, long k, long num_rows, long* src, void* out, int every_row_mapped) {
  return (int)launch_permute_rows(x, stride_bytes, row_bytes, (const int64_t*)row_map, T, k,
                                  num_rows, (int64_t*)src, out, every_row_mapped != 0, nullptr);
}
extern "C" int drv_gather(int dtype, const void* y, long stride, long rows, const long* row_map,
                          const void* w, long T, long k, long d, void* out) {
  return (int)launch_gather_reduce((DType)dtype, y, stride, rows, (const int64_t*)row_map, w, T, k,
                                   d, out, nullptr);
}
extern "C" int drv_unpermute_bwd(int dtype, const void* g, const void* y, long stride, long rows,
                                 const long* row_map, const void* w, long T, long k, long d,
                                 long* src, void* grad_y, void* grad_w) {
  return (int)launch_unpermute_backward((DType)dtype, g, y, stride, rows, (const int64_t*)row_map,
                                        w, T, k, d, (int64_t*)src, grad_y, grad_w, nullptr);
}
