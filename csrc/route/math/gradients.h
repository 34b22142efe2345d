// The route backward, per token (docs/SPEC.md "Backward"): from dL/dweights, dL/dmean_probs and
// dL/dlse to dL/dlogit per expert, then through the anchors' log-sum-exp and SIPS to dL/dq, dL/dscale
// and the anchor accumulators. Sums over experts, anchors and tokens are the backends' reductions.
#pragma once

#include "namespace.h"

#include "sips.h"

L2R_ROUTE_MATH_BEGIN

// dL/dp of a selected expert from dL/dw. w_j = s * p_j / S (normalize, S = sum of the selected p)
// or s * p_j; with gs_j = s * dL/dw_j and grad_dot_weights = sum_i gs_i p_i / S:
// dL/dp_j = (gs_j - grad_dot_weights) / S, or gs_j.
template <typename T>
L2R_HD T scaled_weight_grad(T grad_weight, T scaling) {
  return grad_weight * scaling;
}

template <typename T>
L2R_HD T selected_prob_grad(T scaled_grad, T grad_dot_weights, T selected_sum, bool normalize) {
  return normalize ? (scaled_grad - grad_dot_weights) / selected_sum : scaled_grad;
}

// The term of grad_dot_weights for one selected expert.
template <typename T>
L2R_HD T weight_dot_term(T scaled_grad, T p, T selected_sum) {
  return scaled_grad * p / selected_sum;
}

// dL/dp from dL/dp^ (mean_probs' gradient divided by the token count of its group). Sigmoid:
// p^_e = p_e / P with P = sum_e p_e, so dL/dp_j = (g_j - <g, p^>) / P; softmax: p^ = p.
template <typename V>
L2R_HD V balance_prob_grad(V g, V g_dot_balance, V prob_sum, bool sigmoid) {
  return sigmoid ? (g - g_dot_balance) / prob_sum : g;
}

// dL/dl of one expert. p: its probability, dp: dL/dp, p_dot_dp: sum_e p_e dL/dp_e (softmax only),
// softmax_p: exp(l - lse) (the z-loss path), grad_lse: dL/dlse.
template <typename V>
L2R_HD V logit_grad(V p, V dp, V p_dot_dp, V softmax_p, V grad_lse, bool sigmoid) {
  const V through_prob = sigmoid ? dp * p * (V(1) - p) : p * (dp - p_dot_dp);
  return through_prob + grad_lse * softmax_p;
}

// Back through SIPS for anchor (e, h) of a token, with ds = dL/ds_h = dl_e * share_h and
// u = <q, anchor_hat>:
//   dL/dq      += scale * (coef_q * ds * anchor_hat + radial_q * (ds * u) * q)
//   dL/dscale  += coef_q * ds * u
//   acc[e, h]  += ds * q_scale * q            (summed over tokens; finished by anchor_grad)
template <typename V>
L2R_HD V score_grad(V dl, V share) {
  return dl * share;
}

template <typename V>
L2R_HD V anchor_acc_coef(V ds, V q_scale) {
  return ds * q_scale;
}

template <typename T>
L2R_HD T query_grad(T q_i, T ds_anchor_hat_sum_i, T ds_u_sum, T scale, NormCoef<T> qc) {
  return scale * (qc.coef * ds_anchor_hat_sum_i + qc.radial * ds_u_sum * q_i);
}

template <typename T>
L2R_HD T scale_grad(T ds_u_sum, NormCoef<T> qc) {
  return qc.coef * ds_u_sum;
}

// Once every token is in: grad_a = coef_a * acc + radial_a * <acc, a> * a, for one anchor row.
template <typename T>
L2R_HD void anchor_grad(const T* acc, const T* anchor, NormCoef<T> ac, int rank, T* grad_anchor) {
  const T along = ac.radial * dot_r(acc, anchor, rank);
  for (int i = 0; i < rank; ++i) grad_anchor[i] = ac.coef * acc[i] + along * anchor[i];
}

L2R_ROUTE_MATH_END
