// Argument checks of the route ops, shared by the CPU and CUDA adapters, and the one place where the
// op arguments become a RouteShape and RouteOptions (route_options.h). Every message names the
// argument and the value received.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "../common/aten_dtype.h"
#include "math/selection.h"
#include "route_options.h"

namespace l2r {
namespace route {

inline void check_floating(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(is_kernel_float(t.scalar_type()), "l2r_cuda.", op, ": ", name,
              " must be float32, float64, bfloat16 or float16, got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(t.device() == x.device(), "l2r_cuda.", op, ": ", name, " is on ", t.device(),
              " but x is on ", x.device(), "; all inputs must be on one device");
}

inline Score parse_score(c10::string_view score, const char* op) {
  TORCH_CHECK(score == "softmax" || score == "sigmoid", "l2r_cuda.", op,
              ": score must be 'softmax' or 'sigmoid', got '", std::string(score), "'");
  return score == "sigmoid" ? Score::kSigmoid : Score::kSoftmax;
}

inline Norm parse_norm(const c10::optional<c10::string_view>& norm, const char* op) {
  if (!norm.has_value()) return Norm::kNone;
  TORCH_CHECK(*norm == "rms", "l2r_cuda.", op, ": norm must be 'rms' or None, got '",
              std::string(norm->data(), norm->size()), "'");
  return Norm::kRms;
}

inline GroupScore parse_group_score(c10::string_view group_score, const char* op) {
  TORCH_CHECK(group_score == "top2_sum" || group_score == "max", "l2r_cuda.", op,
              ": group_score must be 'top2_sum' or 'max', got '", std::string(group_score), "'");
  return group_score == "max" ? GroupScore::kMax : GroupScore::kTop2Sum;
}

// x [T, d], proj [r, d], anchors [E, H, r], scale (one value), norm_weight [d], expert_bias [E].
inline RouteShape check_scoring_inputs(const at::Tensor& x, const at::Tensor& proj,
                                       const at::Tensor& anchors, const at::Tensor& scale,
                                       const c10::optional<at::Tensor>& norm_weight, const char* op) {
  TORCH_CHECK(x.dim() == 2, "l2r_cuda.", op, ": x must be [T, d] (leading dims flattened), got ",
              x.dim(), "-D shape ", x.sizes());
  TORCH_CHECK(proj.dim() == 2, "l2r_cuda.", op, ": proj must be [r, d], got shape ", proj.sizes());
  TORCH_CHECK(anchors.dim() == 3, "l2r_cuda.", op, ": anchors must be [E, H, r], got shape ",
              anchors.sizes());
  TORCH_CHECK(scale.numel() == 1, "l2r_cuda.", op, ": scale must hold one value, got shape ",
              scale.sizes());
  check_floating(x, op, "x");
  check_floating(proj, op, "proj");
  check_floating(anchors, op, "anchors");
  check_floating(scale, op, "scale");
  check_same_device(proj, x, op, "proj");
  check_same_device(anchors, x, op, "anchors");
  check_same_device(scale, x, op, "scale");
  TORCH_CHECK(proj.size(1) == x.size(1), "l2r_cuda.", op, ": proj is [r, d] = ", proj.sizes(),
              " but x has d = ", x.size(1));
  TORCH_CHECK(x.size(1) >= 1, "l2r_cuda.", op, ": x must have d >= 1, got d = ", x.size(1));
  TORCH_CHECK(proj.size(0) >= 1, "l2r_cuda.", op, ": proj must have rank r >= 1, got shape ",
              proj.sizes());
  TORCH_CHECK(anchors.size(2) == proj.size(0), "l2r_cuda.", op, ": anchors is [E, H, r] = ",
              anchors.sizes(), " but proj has rank r = ", proj.size(0));
  TORCH_CHECK(anchors.size(0) >= 1 && anchors.size(1) >= 1, "l2r_cuda.", op,
              ": anchors needs E >= 1 experts and H >= 1 anchors, got shape ", anchors.sizes());
  TORCH_CHECK(anchors.size(0) <= (int64_t{1} << 30) && anchors.size(1) <= (int64_t{1} << 20) &&
                  proj.size(0) <= (int64_t{1} << 20),
              "l2r_cuda.", op, ": anchors shape ", anchors.sizes(), " is too large");
  if (norm_weight.has_value()) {
    check_floating(*norm_weight, op, "norm_weight");
    check_same_device(*norm_weight, x, op, "norm_weight");
    TORCH_CHECK(norm_weight->dim() == 1 && norm_weight->size(0) == x.size(1), "l2r_cuda.", op,
                ": norm_weight must be [d] = [", x.size(1), "], got shape ", norm_weight->sizes());
  }
  RouteShape s;
  s.tokens = x.size(0);
  s.d = x.size(1);
  s.rank = static_cast<int>(proj.size(0));
  s.experts = static_cast<int>(anchors.size(0));
  s.anchors = static_cast<int>(anchors.size(1));
  s.top_k = 0;
  s.seq_len = s.tokens;
  return s;
}

inline void check_scoring_options(double beta, double eps, double tau, const char* op) {
  TORCH_CHECK(beta >= 0.0 && beta <= 1.0, "l2r_cuda.", op, ": beta must be in [0, 1], got ", beta);
  TORCH_CHECK(eps > 0.0, "l2r_cuda.", op, ": eps must be > 0, got ", eps);
  TORCH_CHECK(tau > 0.0, "l2r_cuda.", op, ": tau must be > 0, got ", tau);
}

// seq_len: 0 means one statistics group (the whole batch).
inline void apply_seq_len(RouteShape& s, int64_t seq_len, const char* op) {
  TORCH_CHECK(seq_len >= 0, "l2r_cuda.", op, ": seq_len must be >= 0 (0: no sequences), got ", seq_len);
  if (seq_len == 0) {
    s.seq_len = s.tokens;
    return;
  }
  TORCH_CHECK(s.tokens % seq_len == 0, "l2r_cuda.", op, ": seq_len = ", seq_len,
              " must divide the number of tokens T = ", s.tokens);
  s.seq_len = seq_len;
}

inline void check_padding_mask(const c10::optional<at::Tensor>& padding_mask, const at::Tensor& x,
                               int64_t tokens, const char* op) {
  if (!padding_mask.has_value()) return;
  check_same_device(*padding_mask, x, op, "padding_mask");
  TORCH_CHECK(padding_mask->scalar_type() == at::kBool, "l2r_cuda.", op,
              ": padding_mask must be bool (True: padding), got ", padding_mask->scalar_type());
  TORCH_CHECK(padding_mask->numel() == tokens, "l2r_cuda.", op, ": padding_mask must have T = ",
              tokens, " elements, got shape ", padding_mask->sizes());
}

// expert_bias [E], padding_mask (T entries) and seq_len of route_forward / route_select.
inline void check_selection_inputs(RouteShape& s, const at::Tensor& ref, const c10::optional<at::Tensor>& expert_bias,
                                   const c10::optional<at::Tensor>& padding_mask, int64_t seq_len, const char* op) {
  if (expert_bias.has_value()) {
    check_floating(*expert_bias, op, "expert_bias");
    check_same_device(*expert_bias, ref, op, "expert_bias");
    TORCH_CHECK(expert_bias->dim() == 1 && expert_bias->size(0) == s.experts, "l2r_cuda.", op,
                ": expert_bias must be [E] = [", s.experts, "], got shape ", expert_bias->sizes());
  }
  check_padding_mask(padding_mask, ref, s.tokens, op);
  apply_seq_len(s, seq_len, op);
}

// The gradients and indices a routing backward reads: shapes match what the forward returned,
// indices are integers (their values are checked by the kernels, which never write outside their
// outputs). Sets s.top_k from indices.
inline void check_routing_grads(RouteShape& s, const at::Tensor& ref, const c10::optional<at::Tensor>& grad_weights,
                                const c10::optional<at::Tensor>& grad_mean_probs,
                                const c10::optional<at::Tensor>& grad_lse, const at::Tensor& indices,
                                int64_t seq_len, const char* op) {
  const int64_t T = s.tokens, E = s.experts;
  TORCH_CHECK(indices.dim() == 2 && indices.size(0) == T, "l2r_cuda.", op, ": indices must be [T, k] with T = ", T,
              ", got shape ", indices.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt, "l2r_cuda.", op,
              ": indices must be int64 or int32, got ", indices.scalar_type());
  const int64_t top_k = indices.size(1);
  TORCH_CHECK(top_k >= 1 && top_k <= E, "l2r_cuda.", op, ": indices must have k in [1, E] = [1, ", E,
              "] columns, got ", top_k);
  check_same_device(indices, ref, op, "indices");
  if (grad_weights.has_value()) {
    check_same_device(*grad_weights, ref, op, "grad_weights");
    TORCH_CHECK(grad_weights->sizes() == indices.sizes(), "l2r_cuda.", op, ": grad_weights must be [T, k] = [", T,
                ", ", top_k, "], got ", grad_weights->sizes());
  }
  if (grad_mean_probs.has_value()) {
    check_same_device(*grad_mean_probs, ref, op, "grad_mean_probs");
    const bool per_seq = seq_len > 0;
    const bool ok = per_seq ? grad_mean_probs->sizes() == at::IntArrayRef({s.num_seqs(), E})
                            : (grad_mean_probs->dim() == 1 && grad_mean_probs->size(0) == E);
    TORCH_CHECK(ok, "l2r_cuda.", op, ": grad_mean_probs must be ",
                per_seq ? "[T / seq_len, E] = [" + std::to_string(s.num_seqs()) + ", " : std::string("[E] = ["), E,
                "], got ", grad_mean_probs->sizes());
  }
  if (grad_lse.has_value()) {
    check_same_device(*grad_lse, ref, op, "grad_lse");
    TORCH_CHECK(grad_lse->dim() == 1 && grad_lse->size(0) == T, "l2r_cuda.", op, ": grad_lse must be [T] = [", T,
                "], got ", grad_lse->sizes());
  }
  s.top_k = static_cast<int>(top_k);
}

// logits [T, E] of route_select and its backward, as a shape.
inline RouteShape check_logits_input(const at::Tensor& logits, const char* op) {
  TORCH_CHECK(logits.dim() == 2, "l2r_cuda.", op, ": logits must be [T, E], got shape ", logits.sizes());
  check_floating(logits, op, "logits");
  TORCH_CHECK(logits.size(1) >= 1 && logits.size(1) <= (int64_t{1} << 30), "l2r_cuda.", op,
              ": logits must have 1 <= E <= 2^30 columns, got ", logits.size(1));
  RouteShape s;
  s.tokens = logits.size(0);
  s.d = 1;
  s.rank = 1;
  s.experts = static_cast<int>(logits.size(1));
  s.anchors = 1;
  s.top_k = 0;
  s.seq_len = s.tokens;
  return s;
}

// The selection options of route_forward / route_select: top_k, groups, scaling.
inline void apply_selection_options(RouteShape& s, RouteOptions& o, int64_t top_k,
                                    int64_t num_groups, int64_t topk_groups,
                                    c10::string_view group_score, double routed_scaling_factor,
                                    const char* op) {
  TORCH_CHECK(top_k >= 1 && top_k <= s.experts, "l2r_cuda.", op, ": top_k must be in [1, E] = [1, ",
              s.experts, "], got ", top_k);
  TORCH_CHECK(num_groups >= 1 && num_groups <= math::kMaxGroups, "l2r_cuda.", op,
              ": num_groups must be in [1, ", math::kMaxGroups, "], got ", num_groups);
  TORCH_CHECK(s.experts % num_groups == 0, "l2r_cuda.", op, ": num_groups = ", num_groups,
              " must divide the number of experts E = ", s.experts);
  TORCH_CHECK(topk_groups >= 1 && topk_groups <= num_groups, "l2r_cuda.", op,
              ": topk_groups must be in [1, num_groups] = [1, ", num_groups, "], got ", topk_groups);
  TORCH_CHECK(top_k <= topk_groups * (s.experts / num_groups), "l2r_cuda.", op, ": top_k = ", top_k,
              " exceeds the experts of the kept groups, topk_groups * E / num_groups = ",
              topk_groups * (s.experts / num_groups));
  o.group_score = parse_group_score(group_score, op);
  TORCH_CHECK(num_groups == 1 || o.group_score == GroupScore::kMax || s.experts / num_groups >= 2,
              "l2r_cuda.", op, ": group_score='top2_sum' needs at least 2 experts per group, got E = ",
              s.experts, " in ", num_groups, " groups");
  TORCH_CHECK(std::isfinite(routed_scaling_factor), "l2r_cuda.", op,
              ": routed_scaling_factor must be finite, got ", routed_scaling_factor);
  s.top_k = static_cast<int>(top_k);
  o.num_groups = static_cast<int>(num_groups);
  o.topk_groups = static_cast<int>(topk_groups);
  o.routed_scaling_factor = routed_scaling_factor;
}

// route_forward's arguments, checked, as a shape and options.
struct RouteCall {
  RouteShape shape;
  RouteOptions opt;
};

inline RouteCall check_route_forward_args(
    const at::Tensor& x, const at::Tensor& proj, const at::Tensor& anchors, const at::Tensor& scale,
    const c10::optional<at::Tensor>& norm_weight, const c10::optional<at::Tensor>& expert_bias,
    const c10::optional<at::Tensor>& padding_mask, int64_t top_k, double beta,
    const c10::optional<c10::string_view>& norm, double eps_norm, double eps, double tau,
    c10::string_view score, bool normalize, int64_t num_groups, int64_t topk_groups,
    c10::string_view group_score, double routed_scaling_factor, int64_t seq_len) {
  const char* op = "route";
  RouteCall c;
  c.shape = check_scoring_inputs(x, proj, anchors, scale, norm_weight, op);
  check_scoring_options(beta, eps, tau, op);
  check_selection_inputs(c.shape, x, expert_bias, padding_mask, seq_len, op);
  c.opt.beta = beta;
  c.opt.eps_norm = eps_norm;
  c.opt.eps = eps;
  c.opt.tau = tau;
  c.opt.score = parse_score(score, op);
  c.opt.norm = parse_norm(norm, op);
  c.opt.normalize = normalize;
  apply_selection_options(c.shape, c.opt, top_k, num_groups, topk_groups, group_score,
                          routed_scaling_factor, op);
  return c;
}

// route_backward's arguments (the forward's options it needs), checked. Gradient shapes are
// checked here so that no kernel reads out of bounds; indices must be integers (their values are
// checked by the kernels, which never write outside their outputs).
inline RouteCall check_route_backward_args(
    const c10::optional<at::Tensor>& grad_weights, const c10::optional<at::Tensor>& grad_mean_probs,
    const c10::optional<at::Tensor>& grad_lse, const at::Tensor& x, const at::Tensor& proj,
    const at::Tensor& anchors, const at::Tensor& scale, const c10::optional<at::Tensor>& norm_weight,
    const c10::optional<at::Tensor>& padding_mask, const at::Tensor& indices, const at::Tensor& q,
    const at::Tensor& rstd, double beta, const c10::optional<c10::string_view>& norm, double eps,
    double tau, c10::string_view score, bool normalize, double routed_scaling_factor,
    int64_t seq_len) {
  const char* op = "route_backward";
  RouteCall c;
  c.shape = check_scoring_inputs(x, proj, anchors, scale, norm_weight, op);
  check_scoring_options(beta, eps, tau, op);
  const int64_t T = c.shape.tokens;
  TORCH_CHECK(q.sizes() == at::IntArrayRef({T, int64_t(c.shape.rank)}) && rstd.dim() == 1 && rstd.size(0) == T,
              "l2r_cuda.route_backward: saved q must be [T, r] = [", T, ", ", c.shape.rank,
              "] and rstd [T], got ", q.sizes(), " and ", rstd.sizes());
  for (const at::Tensor* t : {&q, &rstd}) check_same_device(*t, x, op, "a saved tensor");
  apply_seq_len(c.shape, seq_len, op);
  check_routing_grads(c.shape, x, grad_weights, grad_mean_probs, grad_lse, indices, seq_len, op);
  check_padding_mask(padding_mask, x, T, op);
  c.opt.beta = beta;
  c.opt.eps = eps;
  c.opt.tau = tau;
  c.opt.score = parse_score(score, op);
  c.opt.norm = parse_norm(norm, op);
  c.opt.normalize = normalize;
  TORCH_CHECK(std::isfinite(routed_scaling_factor), "l2r_cuda.route_backward: routed_scaling_factor must be finite, got ",
              routed_scaling_factor);
  c.opt.routed_scaling_factor = routed_scaling_factor;
  return c;
}

// route_select's arguments (route_from_logits: routing of given logits [T, E]), checked.
inline RouteCall check_route_select_args(const at::Tensor& logits, const c10::optional<at::Tensor>& expert_bias,
                                         const c10::optional<at::Tensor>& padding_mask, int64_t top_k,
                                         c10::string_view score, bool normalize, int64_t num_groups,
                                         int64_t topk_groups, c10::string_view group_score,
                                         double routed_scaling_factor, int64_t seq_len) {
  const char* op = "route_from_logits";
  RouteCall c;
  c.shape = check_logits_input(logits, op);
  check_selection_inputs(c.shape, logits, expert_bias, padding_mask, seq_len, op);
  c.opt.score = parse_score(score, op);
  c.opt.normalize = normalize;
  apply_selection_options(c.shape, c.opt, top_k, num_groups, topk_groups, group_score, routed_scaling_factor, op);
  return c;
}

// route_select_backward's arguments, checked (shapes of every gradient, integer indices).
inline RouteCall check_route_select_backward_args(
    const c10::optional<at::Tensor>& grad_weights, const c10::optional<at::Tensor>& grad_mean_probs,
    const c10::optional<at::Tensor>& grad_lse, const at::Tensor& logits,
    const c10::optional<at::Tensor>& padding_mask, const at::Tensor& indices, c10::string_view score,
    bool normalize, double routed_scaling_factor, int64_t seq_len) {
  const char* op = "route_from_logits_backward";
  RouteCall c;
  c.shape = check_logits_input(logits, op);
  apply_seq_len(c.shape, seq_len, op);
  check_padding_mask(padding_mask, logits, c.shape.tokens, op);
  check_routing_grads(c.shape, logits, grad_weights, grad_mean_probs, grad_lse, indices, seq_len, op);
  c.opt.score = parse_score(score, op);
  c.opt.normalize = normalize;
  TORCH_CHECK(std::isfinite(routed_scaling_factor), "l2r_cuda.", op, ": routed_scaling_factor must be finite, got ",
              routed_scaling_factor);
  c.opt.routed_scaling_factor = routed_scaling_factor;
  return c;
}

// route_logits_backward's arguments, checked; returns the shape.
inline RouteShape check_route_logits_backward_args(const at::Tensor& grad_logits, const at::Tensor& x,
                                                   const at::Tensor& proj, const at::Tensor& anchors,
                                                   const at::Tensor& scale,
                                                   const c10::optional<at::Tensor>& norm_weight,
                                                   const at::Tensor& q, const at::Tensor& rstd, double beta,
                                                   double eps, double tau) {
  const char* op = "route_logits_backward";
  const RouteShape s = check_scoring_inputs(x, proj, anchors, scale, norm_weight, op);
  check_scoring_options(beta, eps, tau, op);
  TORCH_CHECK(grad_logits.sizes() == at::IntArrayRef({s.tokens, int64_t(s.experts)}), "l2r_cuda.", op,
              ": grad_logits must be [T, E] = [", s.tokens, ", ", s.experts, "], got ", grad_logits.sizes());
  check_same_device(grad_logits, x, op, "grad_logits");
  TORCH_CHECK(q.sizes() == at::IntArrayRef({s.tokens, int64_t(s.rank)}) && rstd.dim() == 1 && rstd.size(0) == s.tokens,
              "l2r_cuda.", op, ": saved q must be [T, r] and rstd [T], got ", q.sizes(), " and ", rstd.sizes());
  return s;
}

// The parameter gradients of a scoring backward in their parameters' dtypes and shapes
// (grad_norm_weight stays the empty tensor when there is no norm weight).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> scoring_grads_as_inputs(
    const at::Tensor& grad_x, const at::Tensor& grad_proj, const at::Tensor& grad_anchors,
    const at::Tensor& grad_scale, const at::Tensor& grad_norm_weight, const at::Tensor& proj,
    const at::Tensor& anchors, const at::Tensor& scale, const c10::optional<at::Tensor>& norm_weight) {
  const bool has_norm_weight = norm_weight.has_value() && grad_norm_weight.numel() > 0;
  return {grad_x, grad_proj.to(proj.scalar_type()), grad_anchors.to(anchors.scalar_type()),
          grad_scale.reshape(scale.sizes()).to(scale.scalar_type()),
          has_norm_weight ? grad_norm_weight.to(norm_weight->scalar_type()) : grad_norm_weight};
}

// Math dtype: float64 inputs keep float64 (for gradcheck); everything else computes in fp32.
inline at::ScalarType route_acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Per statistics group (sequence): its number of non-padding tokens, int64 on x's device.
inline at::Tensor counted_tokens(const RouteShape& s, const c10::optional<at::Tensor>& padding_mask,
                                 const at::TensorOptions& options) {
  const int64_t groups = s.tokens == 0 ? 1 : s.num_seqs();
  if (padding_mask.has_value()) return padding_mask->reshape({groups, -1}).logical_not().sum(1);
  return at::full({groups}, s.seq_len, options.dtype(at::kLong));
}

// mean_probs' gradient per token: grad_mean_probs [groups, E] times 1/count of the token's group
// (math::mean_over_tokens' derivative), in the math dtype.
inline at::Tensor mean_grad_per_token(const at::Tensor& grad_mean_probs, const RouteShape& s,
                                      const c10::optional<at::Tensor>& padding_mask, at::ScalarType acc) {
  const int64_t groups = s.tokens == 0 ? 1 : s.num_seqs();
  const at::Tensor counts = counted_tokens(s, padding_mask, grad_mean_probs.options()).to(acc);
  const at::Tensor inv = at::where(counts > 0, at::full({}, 1.0, counts.options()) / counts, at::zeros_like(counts));
  return (grad_mean_probs.to(acc).reshape({groups, s.experts}) * inv.unsqueeze(1)).contiguous();
}

}  // namespace route
}  // namespace l2r
