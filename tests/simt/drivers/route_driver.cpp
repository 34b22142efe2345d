// extern "C" entry points over the CUDA route launchers, for tests/test_route_cuda_emulated.py
// (built by tests/simt/harness.py: device pointers are host pointers there).
#include "route/route_cuda.h"

using l2r::route::RouteCudaOptions;
using l2r::route::RouteCudaShape;
using l2r::route::XType;

namespace {

RouteCudaShape make_shape(long tokens, long d, int rank, int experts, int anchors, int top_k) {
  return RouteCudaShape{tokens, d, rank, experts, anchors, top_k};
}

RouteCudaOptions make_options(float beta, float eps_norm, float eps, float tau, int use_norm,
                              int sigmoid, int normalize) {
  return RouteCudaOptions{beta, eps_norm, eps, tau, use_norm != 0, sigmoid != 0, normalize != 0};
}

}  // namespace

extern "C" long drv_forward_workspace(long tokens, long d, int rank, int experts, int anchors,
                                      int top_k) {
  return static_cast<long>(l2r::route::route_forward_workspace_floats(
      make_shape(tokens, d, rank, experts, anchors, top_k)));
}

extern "C" long drv_backward_workspace(long tokens, long d, int rank, int experts, int anchors,
                                       int top_k) {
  return static_cast<long>(l2r::route::route_backward_workspace_floats(
      make_shape(tokens, d, rank, experts, anchors, top_k)));
}

extern "C" int drv_forward(const void* x, int x_type, const float* proj, const float* anchors,
                           const float* norm_weight, const float* expert_bias, const float* scale,
                           long tokens, long d, int rank, int experts, int anchors_per_expert,
                           int top_k, float beta, float eps_norm, float eps, float tau,
                           int use_norm, int sigmoid, int normalize, float* weights,
                           int64_t* indices, int64_t* tokens_per_expert, float* mean_probs,
                           float* lse, float* q, float* rstd, float* workspace) {
  const cudaError_t err = l2r::route::launch_route_forward(
      x, static_cast<XType>(x_type), proj, anchors, norm_weight, expert_bias, scale,
      make_shape(tokens, d, rank, experts, anchors_per_expert, top_k),
      make_options(beta, eps_norm, eps, tau, use_norm, sigmoid, normalize), weights, indices,
      tokens_per_expert, mean_probs, lse, q, rstd, workspace, /*stream=*/nullptr);
  if (err != cudaSuccess) return static_cast<int>(err);
  return static_cast<int>(cudaStreamSynchronize(nullptr));
}

extern "C" int drv_backward(const float* grad_weights, const float* grad_mean_probs,
                            const float* grad_lse, const void* x, int x_type, const float* proj,
                            const float* anchors, const float* norm_weight, const float* scale,
                            const int64_t* indices, const float* q, const float* rstd, long tokens,
                            long d, int rank, int experts, int anchors_per_expert, int top_k,
                            float beta, float eps, float tau, int use_norm, int sigmoid,
                            int normalize, void* grad_x, float* grad_proj, float* grad_anchors,
                            float* grad_scale, float* grad_norm_weight, float* workspace) {
  const cudaError_t err = l2r::route::launch_route_backward(
      grad_weights, grad_mean_probs, grad_lse, x, static_cast<XType>(x_type), proj, anchors,
      norm_weight, scale, indices, q, rstd,
      make_shape(tokens, d, rank, experts, anchors_per_expert, top_k),
      make_options(beta, 0.f, eps, tau, use_norm, sigmoid, normalize), grad_x, grad_proj,
      grad_anchors, grad_scale, grad_norm_weight, workspace, /*stream=*/nullptr);
  if (err != cudaSuccess) return static_cast<int>(err);
  return static_cast<int>(cudaStreamSynchronize(nullptr));
}
