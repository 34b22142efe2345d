// Every op of the l2r_cuda library, declared once. Kernels register per backend in their own
// files (route_cpu.cpp, route_ops_cuda.cpp, ...); fake (meta) kernels and autograd live in Python.
#include "launch/python_executor.h"  // (first: it includes Python.h)

#include <torch/library.h>

#include <string>
#include <vector>

namespace l2r {
namespace route {
PyMethodDef* route_python_methods();  // route/route_python_entry.cpp
}  // namespace route
}  // namespace l2r

// The extension is loaded by `import l2r_cuda._C` so that the static initializers below run. Its
// Python functions, written against the Python C API (no pybind11), are l2r_cuda.jit's
// (launch/python_executor.cpp) and route()'s unboxed entry (route/route_python_entry.cpp).
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, l2r::python_methods()};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr && PyModule_AddFunctions(module, l2r::route::route_python_methods()) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}

namespace l2r {

// Whether this build compiled the CUDA kernels (decided at build time, never from a GPU probe).
bool cuda_built() {
#if defined(L2R_WITH_CUDA)
  return true;
#else
  return false;
#endif
}

namespace route {
namespace cpu {
std::string cpu_isa_op(c10::optional<c10::string_view> isa);  // route/cpu/route_cpu.cpp
void clear_prepared_cache_op();                                 // route/cpu/route_cpu.cpp
std::vector<int64_t> prepared_cache_stats_op();                 // route/cpu/route_cpu.cpp
int64_t release_recycled_buffers_op();                          // route/cpu/route_cpu.cpp
std::vector<int64_t> recycled_buffer_stats_op();                // route/cpu/route_cpu.cpp
}  // namespace cpu
}  // namespace route

}  // namespace l2r

TORCH_LIBRARY(l2r_cuda, m) {
  // True when the CUDA kernels were compiled into this build.
  m.def("cuda_built() -> bool", &l2r::cuda_built);

  // Fused L2R router forward (docs/SPEC.md "Forward, per token") over x [T, d]. Returns weights
  // [T, k], indices [T, k] int64, tokens_per_expert and mean_probs ([E], or [T / seq_len, E] with
  // seq_len > 0; padding tokens excluded), lse [T], and what backward recomputes from: q [T, r] (the
  // token in the routing space) and rstd [T] (RMSNorm's 1/rms). num_groups/topk_groups/group_score:
  // group-limited top-k (1/1: none); routed_scaling_factor multiplies the weights.
  m.def(
      "route_forward(Tensor x, Tensor proj, Tensor anchors, Tensor scale, Tensor? norm_weight, "
      "Tensor? expert_bias, Tensor? padding_mask, int top_k, float beta, str? norm, float eps_norm, "
      "float eps, float tau, str score, bool normalize, int num_groups, int topk_groups, "
      "str group_score, float routed_scaling_factor, int seq_len) -> (Tensor weights, "
      "Tensor indices, Tensor tokens_per_expert, Tensor mean_probs, Tensor lse, Tensor q, "
      "Tensor rstd)");

  // Backward of route_forward, recomputing scores from q and rstd. Missing output grads are zero.
  // output_mask = [grad_x wanted, parameter grads wanted]: what is not wanted is not computed (zeros
  // are returned). grad_norm_weight is an empty tensor when norm_weight is None.
  m.def(
      "route_backward(Tensor? grad_weights, Tensor? grad_mean_probs, Tensor? grad_lse, Tensor x, "
      "Tensor proj, Tensor anchors, Tensor scale, Tensor? norm_weight, Tensor? padding_mask, "
      "Tensor indices, Tensor q, Tensor rstd, float beta, str? norm, float eps, float tau, "
      "str score, bool normalize, float routed_scaling_factor, int seq_len, bool[2] output_mask) "
      "-> (Tensor grad_x, Tensor grad_proj, Tensor grad_anchors, Tensor grad_scale, "
      "Tensor grad_norm_weight)");

  // The L2R logits l [T, E] alone (route_forward's scores before softmax), with q and rstd for
  // the backward.
  m.def(
      "route_logits(Tensor x, Tensor proj, Tensor anchors, Tensor scale, Tensor? norm_weight, "
      "float beta, str? norm, float eps_norm, float eps, float tau) -> (Tensor logits, Tensor q, "
      "Tensor rstd)");

  m.def(
      "route_logits_backward(Tensor grad_logits, Tensor x, Tensor proj, Tensor anchors, "
      "Tensor scale, Tensor? norm_weight, Tensor q, Tensor rstd, float beta, str? norm, float eps, "
      "float tau, bool[2] output_mask) -> (Tensor grad_x, Tensor grad_proj, Tensor grad_anchors, "
      "Tensor grad_scale, Tensor grad_norm_weight)");

  // route_forward's steps after the logits, for any router (the linear router's routing):
  // probabilities, statistics, selection and weights from given logits [T, E].
  m.def(
      "route_select(Tensor logits, Tensor? expert_bias, Tensor? padding_mask, int top_k, "
      "str score, bool normalize, int num_groups, int topk_groups, str group_score, "
      "float routed_scaling_factor, int seq_len) -> (Tensor weights, Tensor indices, "
      "Tensor tokens_per_expert, Tensor mean_probs, Tensor lse)");

  m.def(
      "route_select_backward(Tensor? grad_weights, Tensor? grad_mean_probs, Tensor? grad_lse, "
      "Tensor logits, Tensor? padding_mask, Tensor indices, str score, bool normalize, "
      "float routed_scaling_factor, int seq_len) -> Tensor grad_logits");

  // The instruction set of the CPU float route kernels ("portable", "avx2", "avx512"); with an
  // argument, choose it first ("auto": the best this CPU has).
  m.def("cpu_isa(str? isa=None) -> str", &l2r::route::cpu::cpu_isa_op);

  // The route kernels keep their parameters prepared (projection with the norm weight folded in,
  // normalised anchors) per parameter version (csrc/route/param_version.h). Clearing is needed only
  // after writes the version counter does not see (through `param.data` or a NumPy view).
  m.def("clear_prepared_cache() -> ()", &l2r::route::cpu::clear_prepared_cache_op);
  // [cached entries, hits, misses] since the library was loaded.
  m.def("prepared_cache_stats() -> int[]", &l2r::route::cpu::prepared_cache_stats_op);

  // The CPU route_backward hands out grad_x in recycled blocks (csrc/route/cpu/route_cpu_buffers.h):
  // free the blocks waiting for reuse (returns the bytes released); [free blocks, free bytes,
  // requests served by a recycled block, by a new block].
  m.def("release_recycled_buffers() -> int", &l2r::route::cpu::release_recycled_buffers_op);
  m.def("recycled_buffer_stats() -> int[]", &l2r::route::cpu::recycled_buffer_stats_op);

  // Dispatch plan (docs/SPEC.md "Dispatch") of indices [T, k] (int32/int64) over num_experts experts: rows
  // grouped by expert, stable by token, each expert's group padded to a multiple of align;
  // capacity keeps at most that many rows per expert (dropping the lowest weights first when
  // weights are given, else the highest token indices). Returns row_map [T, k] int64 (-1 =
  // dropped), expert_offsets [E+1] int64 and dropped [E] int64 (dropped slots per expert).
  m.def(
      "permute_plan(Tensor indices, int num_experts, int align, int? capacity, Tensor? weights) "
      "-> (Tensor row_map, Tensor expert_offsets, Tensor dropped)");

  // permuted [num_rows, d]: row row_map[t, j] is x[t], every other row is zero. every_row_mapped:
  // the caller knows every row in [0, num_rows) is some slot's (no padding rows); the CUDA kernels
  // then skip resetting their scratch (one launch fewer). Results do not depend on it.
  m.def("permute_rows(Tensor x, Tensor row_map, SymInt num_rows, bool every_row_mapped=False) -> Tensor");

  // Backward of permute_rows: grad_x [T, d], grad_x[t] = sum_j grad_permuted[row_map[t, j]].
  m.def("permute_rows_backward(Tensor grad_permuted, Tensor row_map) -> Tensor");

  // out [T, d], out[t] = sum_j weights[t, j] * y[row_map[t, j]] (fp32 accumulation, y's dtype);
  // slots with row_map < 0 add exactly zero.
  m.def("unpermute(Tensor y, Tensor row_map, Tensor weights) -> Tensor");

  // Backward of unpermute: grad_y [N, d] (w[t, j] * grad_out[t] at row row_map[t, j], zero
  // elsewhere) and grad_weights [T, k] (<y[row_map[t, j]], grad_out[t]>, zero where dropped).
  m.def(
      "unpermute_backward(Tensor grad_out, Tensor y, Tensor row_map, Tensor weights) -> "
      "(Tensor grad_y, Tensor grad_weights)");
}
