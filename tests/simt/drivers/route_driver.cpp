// extern "C" entry points over the CUDA route launchers (csrc/route/cuda/route_cuda.h), for the
// emulated-CUDA backend of the route tests (tests/backends.py). Built by tests/simt/harness.py:
// device pointers are host pointers there. Shapes and options come in as the framework-free
// structs' fields; every pointer may be null where the launcher allows it.
#include "launch/cuda/execute_plan.h"
#include "route/cuda/route_cuda.h"

using namespace l2r;
using namespace l2r::route;

namespace {

RouteShape make_shape(long tokens, long d, int rank, int experts, int anchors, int top_k, long seq_len) {
  RouteShape s;
  s.tokens = tokens;
  s.d = d;
  s.rank = rank;
  s.experts = experts;
  s.anchors = anchors;
  s.top_k = top_k;
  s.seq_len = seq_len > 0 ? seq_len : tokens;
  return s;
}

// opts: beta, eps_norm, eps, tau, routed_scaling_factor; flags: use_norm, sigmoid, normalize,
// num_groups, topk_groups, group_score (0 top2_sum, 1 max).
RouteOptions make_options(const double* opts, const int* flags) {
  RouteOptions o;
  o.beta = opts[0];
  o.eps_norm = opts[1];
  o.eps = opts[2];
  o.tau = opts[3];
  o.routed_scaling_factor = opts[4];
  o.norm = flags[0] ? Norm::kRms : Norm::kNone;
  o.score = flags[1] ? Score::kSigmoid : Score::kSoftmax;
  o.normalize = flags[2] != 0;
  o.num_groups = flags[3];
  o.topk_groups = flags[4];
  o.group_score = flags[5] ? GroupScore::kMax : GroupScore::kTop2Sum;
  return o;
}

int finish(Status st, cudaError_t err) {
  if (st != Status::kOk) return 1000 + static_cast<int>(st) * 10 + (err != cudaSuccess ? 1 : 0);
  return static_cast<int>(cudaStreamSynchronize(nullptr));
}

}  // namespace

// sizes: tokens, d, rank, experts, anchors, top_k, seq_len (as drv_forward); on the emulated device.
extern "C" long drv_forward_workspace(int mode, const long* sizes, const double* opts, const int* flags) {
  DeviceLimits limits;
  if (current_device_limits(&limits) != cudaSuccess) return -1;
  const RouteShape s = make_shape(sizes[0], sizes[1], int(sizes[2]), int(sizes[3]), int(sizes[4]), int(sizes[5]), sizes[6]);
  return static_cast<long>(route_forward_workspace_floats(static_cast<RouteMode>(mode), s, make_options(opts, flags), limits));
}

extern "C" long drv_backward_workspace(int mode, long tokens, long d, int rank, int experts, int anchors,
                                       int top_k, long seq_len) {
  DeviceLimits limits;
  if (current_device_limits(&limits) != cudaSuccess) return -1;
  return static_cast<long>(route_backward_workspace_floats(
      static_cast<RouteMode>(mode), make_shape(tokens, d, rank, experts, anchors, top_k, seq_len), limits));
}

// sizes: tokens, d, rank, experts, anchors, top_k, seq_len
extern "C" int drv_forward(int mode, const long* sizes, const double* opts, const int* flags, const void* x,
                           int x_type, const float* proj, const float* anchors, const float* norm_weight,
                           const float* scale, const float* logits_in, const float* expert_bias,
                           const bool* padding, float* weights, int64_t* indices, int64_t* tokens_per_expert,
                           float* mean_probs, float* lse, float* q, float* rstd, float* logits_out,
                           unsigned* counters, float* workspace) {
  const RouteShape s = make_shape(sizes[0], sizes[1], int(sizes[2]), int(sizes[3]), int(sizes[4]), int(sizes[5]), sizes[6]);
  RouteForwardBuffers b;
  b.x = x;
  b.x_type = static_cast<DType>(x_type);
  b.proj = proj;
  b.anchors = anchors;
  b.norm_weight = norm_weight;
  b.scale = scale;
  b.logits_in = logits_in;
  b.expert_bias = expert_bias;
  b.padding = padding;
  b.weights = weights;
  b.indices = indices;
  b.tokens_per_expert = tokens_per_expert;
  b.mean_probs = mean_probs;
  b.lse = lse;
  b.q = q;
  b.rstd = rstd;
  b.logits_out = logits_out;
  b.counters = counters;
  b.workspace = workspace;
  cudaError_t err = cudaSuccess;
  const Status st = launch_route_forward(static_cast<RouteMode>(mode), s, make_options(opts, flags), b, nullptr, &err);
  return finish(st, err);
}

extern "C" int drv_backward(int mode, const long* sizes, const double* opts, const int* flags, int need_grad_x,
                            int need_param_grads, const float* grad_weights, const float* grad_mean_probs,
                            const float* grad_lse, const float* grad_logits, const void* x, int x_type,
                            const float* proj, const float* anchors, const float* norm_weight,
                            const float* scale, const float* logits_in, const bool* padding,
                            const int64_t* indices, const float* q, const float* rstd, void* grad_x,
                            float* grad_proj, float* grad_anchors, float* grad_scale, float* grad_norm_weight,
                            float* grad_logits_out, int32_t* bad_index, float* workspace) {
  const RouteShape s = make_shape(sizes[0], sizes[1], int(sizes[2]), int(sizes[3]), int(sizes[4]), int(sizes[5]), sizes[6]);
  RouteBackwardBuffers b;
  b.grad_weights = grad_weights;
  b.grad_mean_probs = grad_mean_probs;
  b.grad_lse = grad_lse;
  b.grad_logits = grad_logits;
  b.x = x;
  b.x_type = static_cast<DType>(x_type);
  b.proj = proj;
  b.anchors = anchors;
  b.norm_weight = norm_weight;
  b.scale = scale;
  b.logits_in = logits_in;
  b.padding = padding;
  b.indices = indices;
  b.q = q;
  b.rstd = rstd;
  b.need_grad_x = need_grad_x != 0;
  b.need_param_grads = need_param_grads != 0;
  b.grad_x = grad_x;
  b.grad_proj = grad_proj;
  b.grad_anchors = grad_anchors;
  b.grad_scale = grad_scale;
  b.grad_norm_weight = grad_norm_weight;
  b.grad_logits_out = grad_logits_out;
  b.bad_index = bad_index;
  b.workspace = workspace;
  cudaError_t err = cudaSuccess;
  const Status st = launch_route_backward(static_cast<RouteMode>(mode), s, make_options(opts, flags), b, nullptr, &err);
  return finish(st, err);
}
