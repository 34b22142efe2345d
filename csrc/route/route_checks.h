// Argument checks of the route ops, shared by the CPU and CUDA registrations: every message names
// the argument and the value received.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <string>

namespace l2r {
namespace route {

struct RouteDims {
  int64_t tokens;
  int64_t d;
  int64_t rank;
  int64_t experts;
  int64_t anchors;
};

inline void check_floating(const at::Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf,
              "l2r_cuda.route: ", name, " must be float32, float64, bfloat16 or float16, got ", st);
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.device() == x.device(), "l2r_cuda.route: ", name, " is on ", t.device(),
              " but x is on ", x.device(), "; all inputs must be on one device");
}

inline bool parse_score(const std::string& score) {
  TORCH_CHECK(score == "softmax" || score == "sigmoid",
              "l2r_cuda.route: score must be 'softmax' or 'sigmoid', got '", score, "'");
  return score == "sigmoid";
}

inline bool parse_norm(const c10::optional<c10::string_view>& norm) {
  if (!norm.has_value()) return false;
  TORCH_CHECK(*norm == "rms", "l2r_cuda.route: norm must be 'rms' or None, got '",
              std::string(norm->data(), norm->size()), "'");
  return true;
}

inline RouteDims check_route_inputs(const at::Tensor& x, const at::Tensor& proj,
                                    const at::Tensor& anchors, const at::Tensor& scale,
                                    const c10::optional<at::Tensor>& norm_weight,
                                    const c10::optional<at::Tensor>& expert_bias) {
  TORCH_CHECK(x.dim() == 2, "l2r_cuda.route: x must be [T, d] (leading dims flattened), got ",
              x.dim(), "-D shape ", x.sizes());
  TORCH_CHECK(proj.dim() == 2, "l2r_cuda.route: proj must be [r, d], got shape ", proj.sizes());
  TORCH_CHECK(anchors.dim() == 3, "l2r_cuda.route: anchors must be [E, H, r], got shape ",
              anchors.sizes());
  TORCH_CHECK(scale.numel() == 1, "l2r_cuda.route: scale must hold one value, got shape ",
              scale.sizes());
  check_floating(x, "x");
  check_floating(proj, "proj");
  check_floating(anchors, "anchors");
  check_floating(scale, "scale");
  check_same_device(proj, x, "proj");
  check_same_device(anchors, x, "anchors");
  check_same_device(scale, x, "scale");
  RouteDims dims{x.size(0), x.size(1), proj.size(0), anchors.size(0), anchors.size(1)};
  TORCH_CHECK(proj.size(1) == dims.d, "l2r_cuda.route: proj is [r, d] = ", proj.sizes(),
              " but x has d = ", dims.d);
  TORCH_CHECK(dims.d >= 1, "l2r_cuda.route: x must have d >= 1, got d = ", dims.d);
  TORCH_CHECK(dims.rank >= 1, "l2r_cuda.route: proj must have rank r >= 1, got shape ",
              proj.sizes());
  TORCH_CHECK(anchors.size(2) == dims.rank, "l2r_cuda.route: anchors is [E, H, r] = ",
              anchors.sizes(), " but proj has rank r = ", dims.rank);
  TORCH_CHECK(dims.experts >= 1 && dims.anchors >= 1,
              "l2r_cuda.route: anchors needs E >= 1 experts and H >= 1 anchors, got shape ",
              anchors.sizes());
  TORCH_CHECK(dims.experts <= (int64_t{1} << 30) && dims.rank <= (int64_t{1} << 20),
              "l2r_cuda.route: anchors shape ", anchors.sizes(), " is too large");
  if (norm_weight.has_value()) {
    check_floating(*norm_weight, "norm_weight");
    check_same_device(*norm_weight, x, "norm_weight");
    TORCH_CHECK(norm_weight->dim() == 1 && norm_weight->size(0) == dims.d,
                "l2r_cuda.route: norm_weight must be [d] = [", dims.d, "], got shape ",
                norm_weight->sizes());
  }
  if (expert_bias.has_value()) {
    check_floating(*expert_bias, "expert_bias");
    check_same_device(*expert_bias, x, "expert_bias");
    TORCH_CHECK(expert_bias->dim() == 1 && expert_bias->size(0) == dims.experts,
                "l2r_cuda.route: expert_bias must be [E] = [", dims.experts, "], got shape ",
                expert_bias->sizes());
  }
  return dims;
}

inline void check_route_options(const RouteDims& dims, int64_t top_k, double beta, double eps,
                                double tau) {
  TORCH_CHECK(top_k >= 1 && top_k <= dims.experts, "l2r_cuda.route: top_k must be in [1, E] = [1, ",
              dims.experts, "], got ", top_k);
  TORCH_CHECK(beta >= 0.0 && beta <= 1.0, "l2r_cuda.route: beta must be in [0, 1], got ", beta);
  TORCH_CHECK(eps > 0.0, "l2r_cuda.route: eps must be > 0, got ", eps);
  TORCH_CHECK(tau > 0.0, "l2r_cuda.route: tau must be > 0, got ", tau);
}

// What both backends need from route_backward's arguments, after checking them: the forward's
// dims, k, and the parsed options. Grad shapes are checked here so no kernel reads out of bounds.
struct RouteBackwardSetup {
  RouteDims dims;
  int64_t top_k;
  bool sigmoid;
  bool use_norm;
};

inline RouteBackwardSetup check_route_backward_inputs(
    const c10::optional<at::Tensor>& grad_weights, const c10::optional<at::Tensor>& grad_mean_probs,
    const c10::optional<at::Tensor>& grad_lse, const at::Tensor& x, const at::Tensor& proj,
    const at::Tensor& anchors, const at::Tensor& scale,
    const c10::optional<at::Tensor>& norm_weight, const at::Tensor& indices, const at::Tensor& q,
    const at::Tensor& rstd, double beta, const c10::optional<c10::string_view>& norm, double eps,
    double tau, c10::string_view score) {
  const RouteDims dims = check_route_inputs(x, proj, anchors, scale, norm_weight, c10::nullopt);
  const int64_t T = dims.tokens, E = dims.experts;
  TORCH_CHECK(indices.dim() == 2 && indices.size(0) == T,
              "l2r_cuda.route_backward: indices must be [T, k] with T = ", T, ", got shape ",
              indices.sizes());
  const int64_t top_k = indices.size(1);
  check_route_options(dims, std::max<int64_t>(top_k, 1), beta, eps, tau);
  TORCH_CHECK(q.sizes() == at::IntArrayRef({T, dims.rank}) && rstd.numel() == T,
              "l2r_cuda.route_backward: saved q must be [T, r] = [", T, ", ", dims.rank,
              "] and rstd [T], got ", q.sizes(), " and ", rstd.sizes());
  for (const at::Tensor* t : {&indices, &q, &rstd}) check_same_device(*t, x, "a saved tensor");
  if (grad_weights.has_value()) {
    check_same_device(*grad_weights, x, "grad_weights");
    TORCH_CHECK(grad_weights->numel() == T * top_k,
                "l2r_cuda.route_backward: grad_weights must be [T, k] = [", T, ", ", top_k,
                "], got ", grad_weights->sizes());
  }
  if (grad_mean_probs.has_value()) {
    check_same_device(*grad_mean_probs, x, "grad_mean_probs");
    TORCH_CHECK(grad_mean_probs->numel() == E,
                "l2r_cuda.route_backward: grad_mean_probs must be [E] = [", E, "], got ",
                grad_mean_probs->sizes());
  }
  if (grad_lse.has_value()) {
    check_same_device(*grad_lse, x, "grad_lse");
    TORCH_CHECK(grad_lse->numel() == T, "l2r_cuda.route_backward: grad_lse must be [T] = [", T,
                "], got ", grad_lse->sizes());
  }
  return {dims, top_k, parse_score(std::string(score)), parse_norm(norm)};
}

// Accumulation dtype: float64 inputs keep float64 (for gradcheck); everything else computes in fp32.
inline at::ScalarType route_acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace route
}  // namespace l2r
