// ATen glue of the CUDA route kernels (route_cuda.cu; this file is not route_cuda.cpp because both
// would compile to route_cuda.o): argument checks shared with the CPU op (route_checks.h), fp32
// copies of the parameters, output and workspace allocation, a launch plan (route_launch_plan.h)
// run on the current stream by whichever executor serves CUDA tensors (the nvcc kernels, or
// l2r_cuda.jit's NVRTC build in a CPU-only build). No CUDA headers: compiled in every build. No
// host synchronization and no data-dependent host control flow, so every op can be captured in a
// CUDA graph (scale stays on the device; an out-of-range backward index is reported by an
// asynchronous device-side assertion).
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <array>
#include <string>

#include "../../common/aten_dtype.h"
#include "../../launch/cuda_op_registration.h"
#include "../../launch/cuda_plan.h"
#include "../route_checks.h"
#include "../route_outputs.h"
#include "route_launch_plan.h"

namespace l2r {
namespace route {
namespace {

void check_cuda_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.is_cuda(), "l2r_cuda.", op, ": the CUDA kernel got a tensor on ", x.device());
  TORCH_CHECK(x.scalar_type() != at::kDouble, "l2r_cuda.", op,
              ": float64 is not supported by the CUDA kernels (they compute in float32); pass "
              "float32, bfloat16 or float16, or run float64 (e.g. gradcheck) on CPU");
}

at::Tensor as_f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

at::Tensor as_f32(const c10::optional<at::Tensor>& t) { return t.has_value() ? as_f32(*t) : at::Tensor(); }

const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

at::Tensor padding_of(const c10::optional<at::Tensor>& padding_mask) {
  return padding_mask.has_value() ? padding_mask->reshape({-1}).contiguous() : at::Tensor();
}

// The scoring inputs of a launch, contiguous and in float32, kept alive with the buffers.
struct ScoringInputs {
  at::Tensor x, proj, anchors, scale, norm_weight;

  ScoringInputs(const at::Tensor& x_in, const at::Tensor& proj_in, const at::Tensor& anchors_in,
                const at::Tensor& scale_in, const c10::optional<at::Tensor>& norm_weight_in, bool use_norm)
      : x(x_in.contiguous()), proj(as_f32(proj_in)), anchors(as_f32(anchors_in)),
        scale(as_f32(scale_in.reshape({1}))),
        norm_weight(use_norm ? as_f32(norm_weight_in) : at::Tensor()) {}

  template <typename Buffers>
  void fill(Buffers& b) const {
    b.x = x.data_ptr();
    b.x_type = dtype_of(x);
    b.proj = proj.data_ptr<float>();
    b.anchors = anchors.data_ptr<float>();
    b.norm_weight = ptr_or_null(norm_weight);
    b.scale = scale.data_ptr<float>();
  }
};

// The routing outputs and selection inputs of a forward launch.
void fill_routing(RouteForwardBuffers& b, const RoutingOutputs& out, const at::Tensor& bias32,
                  const at::Tensor& padding) {
  b.expert_bias = ptr_or_null(bias32);
  b.padding = padding.defined() ? padding.data_ptr<bool>() : nullptr;
  b.weights = out.weights.data_ptr<float>();
  b.indices = out.indices.data_ptr<int64_t>();
  b.tokens_per_expert = out.tokens_per_expert.data_ptr<int64_t>();
  b.mean_probs = out.mean_probs.data_ptr<float>();
  b.lse = out.lse.data_ptr<float>();
}

// The executor serving CUDA tensors and its device's limits, for one op call.
struct Launcher {
  PlanExecutor& executor;
  c10::Device device;
  DeviceLimits limits;
  const char* op;

  Launcher(const at::Tensor& t, const char* op_name)
      : executor(cuda_plan_executor(op_name)), device(t.device()), limits(cuda_device_limits(executor, device, op_name)),
        op(op_name) {}

  // The forward's ticket counters (route_kernel_params.h): words the executor keeps zero for the
  // current stream, so the plan has no memset step; null while a CUDA graph is being captured (the
  // plan then zeroes a workspace slice, inside the graph).
  unsigned* persistent_counters() const { return cuda_stream_zero_words(executor, device, kRouteCounterWords); }

  void run(const LaunchPlan& plan, const RouteShape& s) const {
    TORCH_CHECK(plan.status != Status::kSharedMemoryTooSmall, "l2r_cuda.", op, ": E = ", s.experts, ", k = ",
                s.top_k, ", r = ", s.rank, ": ", status_message(plan.status));
    run_cuda_plan(executor, plan, device, op);
  }
};

using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

ForwardResult route_forward_cuda(const at::Tensor& x_in, const at::Tensor& proj, const at::Tensor& anchors,
                                 const at::Tensor& scale, const c10::optional<at::Tensor>& norm_weight,
                                 const c10::optional<at::Tensor>& expert_bias,
                                 const c10::optional<at::Tensor>& padding_mask, int64_t top_k, double beta,
                                 c10::optional<c10::string_view> norm, double eps_norm, double eps, double tau,
                                 c10::string_view score, bool normalize, int64_t num_groups, int64_t topk_groups,
                                 c10::string_view group_score, double routed_scaling_factor, int64_t seq_len) {
  const RouteCall call = check_route_forward_args(
      x_in, proj, anchors, scale, norm_weight, expert_bias, padding_mask, top_k, beta, norm, eps_norm, eps, tau,
      score, normalize, num_groups, topk_groups, group_score, routed_scaling_factor, seq_len);
  check_cuda_input(x_in, "route");
  const RouteShape& s = call.shape;
  const c10::DeviceGuard guard(x_in.device());
  const auto f = x_in.options().dtype(at::kFloat);
  const int64_t T = s.tokens;
  const RoutingOutputs out(s, seq_len, x_in, at::kFloat);
  at::Tensor q = at::empty({T, s.rank}, f);
  at::Tensor rstd = at::empty({T}, f);
  const auto result = [&] { return std::tuple_cat(out.tuple(), std::make_tuple(q, rstd)); };
  if (T == 0) return result();
  const ScoringInputs in(x_in, proj, anchors, scale, norm_weight, call.opt.use_norm());
  const at::Tensor bias32 = as_f32(expert_bias), padding = padding_of(padding_mask);
  const Launcher launcher(x_in, "route");
  at::Tensor workspace =
      at::empty({route_forward_workspace_floats(RouteMode::kRoute, s, call.opt, launcher.limits)}, f);
  RouteForwardBuffers b;
  in.fill(b);
  fill_routing(b, out, bias32, padding);
  b.q = q.data_ptr<float>();
  b.rstd = rstd.data_ptr<float>();
  b.workspace = workspace.data_ptr<float>();
  b.counters = launcher.persistent_counters();
  launcher.run(route_forward_launches(RouteMode::kRoute, s, call.opt, b, launcher.limits), s);
  return result();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> route_logits_cuda(
    const at::Tensor& x_in, const at::Tensor& proj, const at::Tensor& anchors, const at::Tensor& scale,
    const c10::optional<at::Tensor>& norm_weight, double beta, c10::optional<c10::string_view> norm,
    double eps_norm, double eps, double tau) {
  const char* op = "route_logits";
  const RouteShape s = check_scoring_inputs(x_in, proj, anchors, scale, norm_weight, op);
  check_scoring_options(beta, eps, tau, op);
  check_cuda_input(x_in, op);
  RouteOptions o;
  o.beta = beta;
  o.eps_norm = eps_norm;
  o.eps = eps;
  o.tau = tau;
  o.norm = parse_norm(norm, op);
  const c10::DeviceGuard guard(x_in.device());
  const auto f = x_in.options().dtype(at::kFloat);
  at::Tensor logits = at::empty({s.tokens, s.experts}, f);
  at::Tensor q = at::empty({s.tokens, s.rank}, f);
  at::Tensor rstd = at::empty({s.tokens}, f);
  if (s.tokens == 0) return {logits, q, rstd};
  const ScoringInputs in(x_in, proj, anchors, scale, norm_weight, o.use_norm());
  const Launcher launcher(x_in, op);
  at::Tensor workspace = at::empty({route_forward_workspace_floats(RouteMode::kLogits, s, o, launcher.limits)}, f);
  RouteForwardBuffers b;
  in.fill(b);
  b.q = q.data_ptr<float>();
  b.rstd = rstd.data_ptr<float>();
  b.logits_out = logits.data_ptr<float>();
  b.workspace = workspace.data_ptr<float>();
  b.counters = launcher.persistent_counters();
  launcher.run(route_forward_launches(RouteMode::kLogits, s, o, b, launcher.limits), s);
  return {logits, q, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_select_cuda(
    const at::Tensor& logits_in, const c10::optional<at::Tensor>& expert_bias,
    const c10::optional<at::Tensor>& padding_mask, int64_t top_k, c10::string_view score, bool normalize,
    int64_t num_groups, int64_t topk_groups, c10::string_view group_score, double routed_scaling_factor,
    int64_t seq_len) {
  const char* op = "route_from_logits";
  const RouteCall call = check_route_select_args(logits_in, expert_bias, padding_mask, top_k, score, normalize,
                                                 num_groups, topk_groups, group_score, routed_scaling_factor,
                                                 seq_len);
  check_cuda_input(logits_in, op);
  const RouteShape& s = call.shape;
  const c10::DeviceGuard guard(logits_in.device());
  const auto f = logits_in.options().dtype(at::kFloat);
  const RoutingOutputs out(s, seq_len, logits_in, at::kFloat);
  if (s.tokens == 0) return out.tuple();
  const at::Tensor logits = as_f32(logits_in), bias32 = as_f32(expert_bias), padding = padding_of(padding_mask);
  const Launcher launcher(logits_in, op);
  at::Tensor workspace =
      at::empty({route_forward_workspace_floats(RouteMode::kSelect, s, call.opt, launcher.limits)}, f);
  RouteForwardBuffers b;
  b.logits_in = logits.data_ptr<float>();
  fill_routing(b, out, bias32, padding);
  b.workspace = workspace.data_ptr<float>();
  b.counters = launcher.persistent_counters();
  launcher.run(route_forward_launches(RouteMode::kSelect, s, call.opt, b, launcher.limits), s);
  return out.tuple();
}

using BackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Shared by route_backward and route_logits_backward.
BackwardResult run_scoring_backward(RouteMode mode, const RouteCall& call, RouteBackwardBuffers& b,
                                    const at::Tensor& x_in, const at::Tensor& proj, const at::Tensor& anchors,
                                    const at::Tensor& scale, const c10::optional<at::Tensor>& norm_weight,
                                    const at::Tensor& q_in, const at::Tensor& rstd_in,
                                    const c10::optional<at::Tensor>& padding_mask, std::array<bool, 2> output_mask,
                                    const char* op) {
  const RouteShape& s = call.shape;
  const auto f = x_in.options().dtype(at::kFloat);
  const bool has_norm_weight = call.opt.use_norm() && norm_weight.has_value();
  at::Tensor grad_x = output_mask[0] ? at::empty_like(x_in, at::MemoryFormat::Contiguous)
                                     : at::zeros_like(x_in, at::MemoryFormat::Contiguous);
  at::Tensor grad_proj = at::zeros({s.rank, s.d}, f);
  at::Tensor grad_anchors = at::zeros({s.experts, s.anchors, s.rank}, f);
  at::Tensor grad_scale = at::zeros({1}, f);
  at::Tensor grad_norm_weight = has_norm_weight ? at::zeros({s.d}, f) : at::empty({0}, f);
  if (s.tokens > 0 && (output_mask[0] || output_mask[1])) {
    const ScoringInputs in(x_in, proj, anchors, scale, norm_weight, has_norm_weight);
    const at::Tensor q = as_f32(q_in), rstd = as_f32(rstd_in), padding = padding_of(padding_mask);
    const Launcher launcher(x_in, op);
    at::Tensor workspace = at::empty({route_backward_workspace_floats(mode, s, launcher.limits)}, f);
    at::Tensor bad_index = at::zeros({1}, x_in.options().dtype(at::kInt));
    in.fill(b);
    b.padding = padding.defined() ? padding.data_ptr<bool>() : nullptr;
    b.q = q.data_ptr<float>();
    b.rstd = rstd.data_ptr<float>();
    b.need_grad_x = output_mask[0];
    b.need_param_grads = output_mask[1];
    b.grad_x = grad_x.data_ptr();
    b.grad_proj = grad_proj.data_ptr<float>();
    b.grad_anchors = grad_anchors.data_ptr<float>();
    b.grad_scale = grad_scale.data_ptr<float>();
    b.grad_norm_weight = has_norm_weight ? grad_norm_weight.data_ptr<float>() : nullptr;
    b.bad_index = bad_index.data_ptr<int32_t>();
    b.workspace = workspace.data_ptr<float>();
    launcher.run(route_backward_launches(mode, s, call.opt, b, launcher.limits), s);
    at::_assert_async(bad_index.eq(0).squeeze(0), "l2r_cuda.route_backward: indices has a value outside [0, E)");
  }
  return scoring_grads_as_inputs(grad_x, grad_proj, grad_anchors, grad_scale, grad_norm_weight, proj, anchors, scale,
                                 norm_weight);
}

BackwardResult route_backward_cuda(
    const c10::optional<at::Tensor>& grad_weights, const c10::optional<at::Tensor>& grad_mean_probs,
    const c10::optional<at::Tensor>& grad_lse, const at::Tensor& x_in, const at::Tensor& proj,
    const at::Tensor& anchors, const at::Tensor& scale, const c10::optional<at::Tensor>& norm_weight,
    const c10::optional<at::Tensor>& padding_mask, const at::Tensor& indices_in, const at::Tensor& q_in,
    const at::Tensor& rstd_in, double beta, c10::optional<c10::string_view> norm, double eps, double tau,
    c10::string_view score, bool normalize, double routed_scaling_factor, int64_t seq_len,
    std::array<bool, 2> output_mask) {
  const RouteCall call = check_route_backward_args(
      grad_weights, grad_mean_probs, grad_lse, x_in, proj, anchors, scale, norm_weight, padding_mask, indices_in,
      q_in, rstd_in, beta, norm, eps, tau, score, normalize, routed_scaling_factor, seq_len);
  check_cuda_input(x_in, "route_backward");
  const c10::DeviceGuard guard(x_in.device());
  const at::Tensor gw = as_f32(grad_weights), gl = as_f32(grad_lse);
  const at::Tensor gm = grad_mean_probs.has_value() && call.shape.tokens > 0
                            ? mean_grad_per_token(*grad_mean_probs, call.shape, padding_mask, at::kFloat)
                            : at::Tensor();
  const at::Tensor indices = indices_in.to(at::kLong).contiguous();
  RouteBackwardBuffers b;
  b.grad_weights = ptr_or_null(gw);
  b.grad_mean_probs = ptr_or_null(gm);
  b.grad_lse = ptr_or_null(gl);
  b.indices = indices.data_ptr<int64_t>();
  return run_scoring_backward(RouteMode::kRoute, call, b, x_in, proj, anchors, scale, norm_weight, q_in, rstd_in,
                              padding_mask, output_mask, "route_backward");
}

BackwardResult route_logits_backward_cuda(const at::Tensor& grad_logits, const at::Tensor& x_in,
                                          const at::Tensor& proj, const at::Tensor& anchors,
                                          const at::Tensor& scale, const c10::optional<at::Tensor>& norm_weight,
                                          const at::Tensor& q_in, const at::Tensor& rstd_in, double beta,
                                          c10::optional<c10::string_view> norm, double eps, double tau,
                                          std::array<bool, 2> output_mask) {
  const char* op = "route_logits_backward";
  RouteCall call;
  call.shape = check_route_logits_backward_args(grad_logits, x_in, proj, anchors, scale, norm_weight, q_in,
                                                rstd_in, beta, eps, tau);
  call.opt.beta = beta;
  call.opt.eps = eps;
  call.opt.tau = tau;
  call.opt.norm = parse_norm(norm, op);
  check_cuda_input(x_in, op);
  const c10::DeviceGuard guard(x_in.device());
  const at::Tensor gl = as_f32(grad_logits);
  RouteBackwardBuffers b;
  b.grad_logits = gl.data_ptr<float>();
  return run_scoring_backward(RouteMode::kLogits, call, b, x_in, proj, anchors, scale, norm_weight, q_in, rstd_in,
                              c10::nullopt, output_mask, op);
}

at::Tensor route_select_backward_cuda(const c10::optional<at::Tensor>& grad_weights,
                                      const c10::optional<at::Tensor>& grad_mean_probs,
                                      const c10::optional<at::Tensor>& grad_lse, const at::Tensor& logits_in,
                                      const c10::optional<at::Tensor>& padding_mask, const at::Tensor& indices_in,
                                      c10::string_view score, bool normalize, double routed_scaling_factor,
                                      int64_t seq_len) {
  const char* op = "route_from_logits_backward";
  const RouteCall call = check_route_select_backward_args(grad_weights, grad_mean_probs, grad_lse, logits_in,
                                                          padding_mask, indices_in, score, normalize,
                                                          routed_scaling_factor, seq_len);
  check_cuda_input(logits_in, op);
  const RouteShape& s = call.shape;
  const c10::DeviceGuard guard(logits_in.device());
  at::Tensor grad_logits = at::zeros({s.tokens, s.experts}, logits_in.options().dtype(at::kFloat));
  if (s.tokens == 0) return grad_logits;
  const at::Tensor logits = as_f32(logits_in), gw = as_f32(grad_weights), gl = as_f32(grad_lse);
  const at::Tensor gm = grad_mean_probs.has_value()
                            ? mean_grad_per_token(*grad_mean_probs, s, padding_mask, at::kFloat) : at::Tensor();
  const at::Tensor indices = indices_in.to(at::kLong).contiguous(), padding = padding_of(padding_mask);
  const Launcher launcher(logits_in, op);
  at::Tensor workspace = at::empty(
      {std::max<int64_t>(1, route_backward_workspace_floats(RouteMode::kSelect, s, launcher.limits))}, logits.options());
  at::Tensor bad_index = at::zeros({1}, logits.options().dtype(at::kInt));
  RouteBackwardBuffers b;
  b.grad_weights = ptr_or_null(gw);
  b.grad_mean_probs = ptr_or_null(gm);
  b.grad_lse = ptr_or_null(gl);
  b.logits_in = logits.data_ptr<float>();
  b.padding = padding.defined() ? padding.data_ptr<bool>() : nullptr;
  b.indices = indices.data_ptr<int64_t>();
  b.grad_logits_out = grad_logits.data_ptr<float>();
  b.bad_index = bad_index.data_ptr<int32_t>();
  b.workspace = workspace.data_ptr<float>();
  launcher.run(route_backward_launches(RouteMode::kSelect, s, call.opt, b, launcher.limits), s);
  at::_assert_async(bad_index.eq(0).squeeze(0), "l2r_cuda.route_from_logits backward: indices has a value outside [0, E)");
  return grad_logits;
}

}  // namespace

void register_route_cuda_ops(torch::Library& m) {
  m.impl("route_forward", &route_forward_cuda);
  m.impl("route_backward", &route_backward_cuda);
  m.impl("route_logits", &route_logits_cuda);
  m.impl("route_logits_backward", &route_logits_backward_cuda);
  m.impl("route_select", &route_select_cuda);
  m.impl("route_select_backward", &route_select_backward_cuda);
}

}  // namespace route
}  // namespace l2r

#if defined(L2R_WITH_CUDA)
TORCH_LIBRARY_IMPL(l2r_cuda, CUDA, m) { l2r::route::register_route_cuda_ops(m); }
#endif
