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
}
