// Every op of the l2r_cuda library, declared once. Kernels register per backend in their own
// files (route_cpu.cpp, route_ops_cuda.cpp, ...); fake (meta) kernels and autograd live in Python.
#include <Python.h>
#include <torch/library.h>

// The extension is loaded by `import l2r_cuda._C` only so that the static initializers below run;
// it exposes no Python functions (this also keeps it free of pybind11).
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
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

}  // namespace l2r

TORCH_LIBRARY(l2r_cuda, m) {
  // True when the CUDA kernels were compiled into this build.
  m.def("cuda_built() -> bool", &l2r::cuda_built);

  // Fused L2R router forward (SPEC "Forward, per token") over x [T, d]. Returns weights [T, k],
  // indices [T, k] int64, tokens_per_expert [E] int64, mean_probs [E], lse [T], and what backward
  // recomputes from: q [T, r] (the token in the routing space) and rstd [T] (RMSNorm's 1/rms).
  m.def(
      "route_forward(Tensor x, Tensor proj, Tensor anchors, Tensor scale, Tensor? norm_weight, "
      "Tensor? expert_bias, int top_k, float beta, str? norm, float eps_norm, float eps, float tau, "
      "str score, bool normalize) -> (Tensor weights, Tensor indices, Tensor tokens_per_expert, "
      "Tensor mean_probs, Tensor lse, Tensor q, Tensor rstd)");

  // Backward of route_forward, recomputing scores from q and rstd. Missing output grads are zero.
  // grad_norm_weight is an empty tensor when norm_weight is None.
  m.def(
      "route_backward(Tensor? grad_weights, Tensor? grad_mean_probs, Tensor? grad_lse, Tensor x, "
      "Tensor proj, Tensor anchors, Tensor scale, Tensor? norm_weight, Tensor indices, Tensor q, "
      "Tensor rstd, float beta, str? norm, float eps, float tau, str score, bool normalize) -> "
      "(Tensor grad_x, Tensor grad_proj, Tensor grad_anchors, Tensor grad_scale, "
      "Tensor grad_norm_weight)");

  // Dispatch plan (SPEC "Dispatch") of indices [T, k] (int32/int64) over num_experts experts: rows
  // grouped by expert, stable by token, each expert's group padded to a multiple of align;
  // capacity keeps at most that many rows per expert (dropping the lowest weights first when
  // weights are given, else the highest token indices). Returns row_map [T, k] int64 (-1 =
  // dropped), expert_offsets [E+1] int64 and dropped [E] int64 (dropped slots per expert).
  m.def(
      "permute_plan(Tensor indices, int num_experts, int align, int? capacity, Tensor? weights) "
      "-> (Tensor row_map, Tensor expert_offsets, Tensor dropped)");

  // permuted [num_rows, d]: row row_map[t, j] is x[t], every other row is zero.
  m.def("permute_rows(Tensor x, Tensor row_map, SymInt num_rows) -> Tensor");

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
