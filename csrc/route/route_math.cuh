// Per-token L2R routing math (SPEC "Forward, per token") and its derivatives, shared verbatim by
// the CPU and CUDA route kernels. acc_t is float (double only for float64 inputs).
#pragma once

#include "../common/hd.h"

namespace l2r {
namespace route {

// ---------------------------------------------------------------------------------------------
// Saturated magnitude terms of SIPS.
// phi(n) = (1 - beta) + beta * tanh(n); a vector v enters the score as coef(|v|) * v with
// coef(n) = phi(n) / max(n, eps), so score = scale * <coef_q q, coef_a a>.
// ---------------------------------------------------------------------------------------------

template <typename acc_t>
struct NormCoef {
  acc_t coef;    // phi(n) / max(n, eps)
  acc_t radial;  // (d coef / d n) / n, so that d(coef(|v|)) / dv = radial * v; 0 at n = 0
};

template <typename acc_t>
L2R_HD NormCoef<acc_t> sips_norm_coef(acc_t n, acc_t beta, acc_t eps) {
  const acc_t t = math_tanh(n);
  const acc_t phi = (acc_t(1) - beta) + beta * t;
  const acc_t dphi = beta * (acc_t(1) - t * t);
  // max(n, eps) passes the gradient where n >= eps (as torch's clamp_min does).
  const bool clamped = n < eps;
  const acc_t denom = clamped ? eps : n;
  NormCoef<acc_t> c;
  c.coef = phi / denom;
  const acc_t dcoef = dphi / denom - (clamped ? acc_t(0) : phi / (denom * denom));
  c.radial = n > acc_t(0) ? dcoef / n : acc_t(0);
  return c;
}

// RMSNorm: 1 / sqrt(mean(x^2) + eps_norm).
template <typename acc_t>
L2R_HD acc_t rms_inv_scale(acc_t sum_squares, int64_t d, acc_t eps_norm) {
  return acc_t(1) / math_sqrt(sum_squares / static_cast<acc_t>(d) + eps_norm);
}

// RMSNorm backward for one element: x_hat = x * rstd, gx_hat = dL/dx_hat (after the affine weight),
// mean_dot = mean_i(gx_hat_i * x_hat_i).
template <typename acc_t>
L2R_HD acc_t rms_norm_input_grad(acc_t gx_hat, acc_t x_hat, acc_t rstd, acc_t mean_dot) {
  return rstd * (gx_hat - x_hat * mean_dot);
}

template <typename acc_t>
L2R_HD acc_t dot(const acc_t* a, const acc_t* b, int n) {
  acc_t s = 0;
  for (int i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// ---------------------------------------------------------------------------------------------
// Multi-anchor aggregation: l = tau * logsumexp_h(s_h / tau), s_h = q_scale * <q, anchor_hat_h>
// with q_scale = scale * coef(|q|) and anchor_hat = coef(|a|) * a. H = 1: l = s exactly.
// ---------------------------------------------------------------------------------------------

// Running (max, sum of exp(v - max)): softmax statistics that merge in any grouping, for serial
// loops and warp reductions alike.
template <typename acc_t>
struct SoftmaxStats {
  acc_t max;
  acc_t sum;
};

template <typename acc_t>
L2R_HD SoftmaxStats<acc_t> softmax_stats_empty() {
  return SoftmaxStats<acc_t>{math_neg_inf<acc_t>(), acc_t(0)};
}

template <typename acc_t>
L2R_HD SoftmaxStats<acc_t> softmax_stats_merge(SoftmaxStats<acc_t> a, SoftmaxStats<acc_t> b) {
  if (a.sum == acc_t(0)) return b;
  if (b.sum == acc_t(0)) return a;
  const acc_t m = math_max(a.max, b.max);  // a NaN max poisons the sum below, as it should
  SoftmaxStats<acc_t> r;
  r.max = math_isnan(a.max) ? a.max : (math_isnan(b.max) ? b.max : m);
  if (r.max == math_neg_inf<acc_t>()) {  // every value -inf: keep the count, avoid -inf - -inf
    r.sum = a.sum + b.sum;
    return r;
  }
  r.sum = a.sum * math_exp(a.max - r.max) + b.sum * math_exp(b.max - r.max);
  return r;
}

template <typename acc_t>
L2R_HD SoftmaxStats<acc_t> softmax_stats_add(SoftmaxStats<acc_t> a, acc_t v) {
  return softmax_stats_merge(a, SoftmaxStats<acc_t>{v, acc_t(1)});
}

template <typename acc_t>
L2R_HD acc_t softmax_stats_lse(SoftmaxStats<acc_t> st) {
  return st.max + math_log(st.sum);
}

// Softmax statistics of n values in two passes (one exp each), writing exp(v - max) to exps.
template <typename acc_t>
L2R_HD SoftmaxStats<acc_t> softmax_stats_of(const acc_t* v, int64_t n, acc_t* exps) {
  SoftmaxStats<acc_t> st{math_neg_inf<acc_t>(), acc_t(0)};
  bool has_nan = false;
  for (int64_t i = 0; i < n; ++i) {
    has_nan |= math_isnan(v[i]);
    st.max = math_max(st.max, v[i]);
  }
  if (has_nan) st.max = static_cast<acc_t>(NAN);
  const acc_t shift = st.max == math_neg_inf<acc_t>() ? acc_t(0) : st.max;  // all -inf: no NaN
  for (int64_t i = 0; i < n; ++i) {
    exps[i] = math_exp(v[i] - shift);
    st.sum += exps[i];
  }
  return st;
}

// Logit of one expert from its H pre-scaled anchors (row-major [H, r]). Two passes (max, then sum
// of exp) cost one exp per anchor; the dots are recomputed because r is small.
template <typename acc_t>
L2R_HD acc_t expert_logit(const acc_t* q, const acc_t* anchor_hat, int num_anchors, int rank,
                          acc_t q_scale, acc_t tau) {
  if (num_anchors == 1) return q_scale * dot(q, anchor_hat, rank);
  const acc_t scale_over_tau = q_scale / tau;
  acc_t m = math_neg_inf<acc_t>();
  bool has_nan = false;
  for (int h = 0; h < num_anchors; ++h) {
    const acc_t v = scale_over_tau * dot(q, anchor_hat + h * rank, rank);
    has_nan |= math_isnan(v);
    m = math_max(m, v);
  }
  if (has_nan) return static_cast<acc_t>(NAN);
  if (m == math_neg_inf<acc_t>() || m == -math_neg_inf<acc_t>()) return tau * m;
  acc_t sum = 0;
  for (int h = 0; h < num_anchors; ++h) {
    sum += math_exp(scale_over_tau * dot(q, anchor_hat + h * rank, rank) - m);
  }
  return tau * (m + math_log(sum));
}

// d l / d s_h: the anchor's share of the expert's log-sum-exp.
template <typename acc_t>
L2R_HD acc_t anchor_share(acc_t s, acc_t logit, acc_t tau, int num_anchors) {
  return num_anchors == 1 ? acc_t(1) : math_exp((s - logit) / tau);
}

// ---------------------------------------------------------------------------------------------
// Scores over experts.
// ---------------------------------------------------------------------------------------------

template <typename acc_t>
L2R_HD acc_t routing_prob(acc_t logit, SoftmaxStats<acc_t> st, bool sigmoid) {
  return sigmoid ? acc_t(1) / (acc_t(1) + math_exp(-logit)) : math_exp(logit - st.max) / st.sum;
}

// dL/dl for one expert. p: its probability, dp: dL/dp, p_dot_dp: sum_e p_e dL/dp_e (softmax only),
// softmax_p: exp(l - lse) (the z-loss path), grad_lse: dL/d lse.
template <typename acc_t>
L2R_HD acc_t logit_grad(acc_t p, acc_t dp, acc_t p_dot_dp, acc_t softmax_p, acc_t grad_lse,
                        bool sigmoid) {
  const acc_t through_prob = sigmoid ? dp * p * (acc_t(1) - p) : p * (dp - p_dot_dp);
  return through_prob + grad_lse * softmax_p;
}

// dL/dp of a selected expert from dL/dw. normalize: w_j = p_j / S with S = sum of the selected p,
// so dL/dp_j = (g_j - <g, w>) / S.
template <typename acc_t>
L2R_HD acc_t selected_prob_grad(acc_t grad_weight, acc_t grad_dot_weights, acc_t selected_sum,
                                bool normalize) {
  return normalize ? (grad_weight - grad_dot_weights) / selected_sum : grad_weight;
}

// ---------------------------------------------------------------------------------------------
// Top-k selection: descending key, ties to the lower expert index, NaN below every number
// (NaNs among themselves by index). A strict total order, so every k-subset is well defined and
// the k indices are always distinct and in range.
// ---------------------------------------------------------------------------------------------

template <typename acc_t>
L2R_HD bool ranks_before(acc_t key_a, int index_a, acc_t key_b, int index_b) {
  const bool nan_a = math_isnan(key_a), nan_b = math_isnan(key_b);
  if (nan_a != nan_b) return nan_b;
  if (!nan_a && key_a != key_b) return key_a > key_b;
  return index_a < index_b;
}

// ranks_before for arg-max reductions with empty slots (index < 0: no candidate), e.g. a GPU lane
// that owns no remaining expert. An empty slot ranks after every candidate.
template <typename acc_t>
L2R_HD bool candidate_before(acc_t key_a, int index_a, acc_t key_b, int index_b) {
  if (index_a < 0) return false;
  if (index_b < 0) return true;
  return ranks_before(key_a, index_a, key_b, index_b);
}

// Offers (key, index) to a descending list of `count` entries with room for `k`; returns the new
// count. O(k) per offer: k is small (<= 32 in every model we know).
template <typename acc_t>
L2R_HD int top_k_insert(acc_t* keys, int* indices, int count, int k, acc_t key, int index) {
  int pos = count < k ? count : k;
  if (pos == k && !ranks_before(key, index, keys[k - 1], indices[k - 1])) return count;
  if (pos == k) --pos;  // the last entry falls off
  while (pos > 0 && ranks_before(key, index, keys[pos - 1], indices[pos - 1])) {
    keys[pos] = keys[pos - 1];
    indices[pos] = indices[pos - 1];
    --pos;
  }
  keys[pos] = key;
  indices[pos] = index;
  return count < k ? count + 1 : k;
}

// ---------------------------------------------------------------------------------------------
// Back through SIPS. For one token, with ds = dL/ds per anchor and u = <q, anchor_hat>:
//   grad_q  = scale * (coef_q * sum ds * anchor_hat + radial_q * (sum ds * u) * q)
//   grad_scale += coef_q * sum ds * u
//   acc[e,h] += ds * scale * coef_q * q                  (summed over tokens)
// and once all tokens are in: grad_a = coef_a * acc + radial_a * <acc, a> * a.
// ---------------------------------------------------------------------------------------------

template <typename acc_t>
L2R_HD void query_grad(const acc_t* q, const acc_t* ds_anchor_hat_sum, acc_t ds_u_sum, acc_t scale,
                       NormCoef<acc_t> qc, int rank, acc_t* grad_q) {
  for (int i = 0; i < rank; ++i) {
    grad_q[i] = scale * (qc.coef * ds_anchor_hat_sum[i] + qc.radial * ds_u_sum * q[i]);
  }
}

template <typename acc_t>
L2R_HD void anchor_grad(const acc_t* acc, const acc_t* anchor, NormCoef<acc_t> ac, int rank,
                        acc_t* grad_anchor) {
  const acc_t along = ac.radial * dot(acc, anchor, rank);
  for (int i = 0; i < rank; ++i) grad_anchor[i] = ac.coef * acc[i] + along * anchor[i];
}

// ---------------------------------------------------------------------------------------------
// Polynomial exp / log in float, for vectorized loops (the CPU's AVX2 path mirrors these two
// functions operation for operation, so both give the same bits) and usable on the device.
// Both are within 2 ulp of the correctly rounded result over their range (our own minimax-style
// fits). exp_poly: x > 88.7228 -> +inf, x < -86 -> 0 (no denormal results), NaN -> NaN.
// log_poly: x = 0 -> -inf, x < 0 or NaN -> NaN, +inf -> +inf, denormals handled.
// ---------------------------------------------------------------------------------------------

namespace poly {
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693145751953125f;       // 16 significant bits: n * kLn2Hi is exact
constexpr float kLn2Lo = 1.42860676533018690e-06f;  // ln 2 - kLn2Hi
constexpr float kExpMax = 88.7228317260742188f;     // above: +inf
constexpr float kExpMin = -86.0f;                   // below: 0
// exp(f) = 1 + f + f^2 * (e0 + e1 f + e2 f^2 + e3 f^3 + e4 f^4), |f| <= ln2 / 2
constexpr float kE0 = 0.4999999403953552f, kE1 = 0.1666652113199234f, kE2 = 0.04166838899254799f,
                kE3 = 0.008368710987269878f, kE4 = 0.0013814604608342052f;
// log(1 + z) = z - z^2 / 2 + z^3 * (l0 + l1 z + ... + l7 z^7), sqrt(1/2) - 1 <= z <= sqrt(2) - 1
constexpr float kL0 = 0.3333333134651184f, kL1 = -0.2500081956386566f, kL2 = 0.20001220703125f,
                kL3 = -0.1662338525056839f, kL4 = 0.14201900362968445f, kL5 = -0.13160040974617004f,
                kL6 = 0.12760508060455322f, kL7 = -0.07633548229932785f;
constexpr float kSqrt2 = 1.41421353816986084f;
constexpr float kMinNormal = 1.17549435e-38f;
}  // namespace poly

L2R_HD float poly_fma(float a, float b, float c) { return fmaf(a, b, c); }

L2R_HD int32_t float_to_bits(float v) {
#if defined(__CUDA_ARCH__)
  return __float_as_int(v);
#else
  int32_t i;
  __builtin_memcpy(&i, &v, sizeof(i));
  return i;
#endif
}

L2R_HD float bits_to_float(int32_t i) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(i);
#else
  float v;
  __builtin_memcpy(&v, &i, sizeof(v));
  return v;
#endif
}

L2R_HD float exp_poly(float x) {
  using namespace poly;
  if (math_isnan(x)) return x;
  if (x > kExpMax) return static_cast<float>(INFINITY);
  if (x < kExpMin) return 0.0f;
  const float n = rintf(x * kLog2e);  // |n| <= 128
  float f = poly_fma(-n, kLn2Hi, x);
  f = poly_fma(-n, kLn2Lo, f);
  float q = poly_fma(kE4, f, kE3);
  q = poly_fma(q, f, kE2);
  q = poly_fma(q, f, kE1);
  q = poly_fma(q, f, kE0);
  const float p = 1.0f + poly_fma(f * f, q, f);
  // 2^n as 2^(n-1) * 2 so that n = 128 needs no exponent field of 255
  const float half_scale = bits_to_float((static_cast<int32_t>(n) + 126) << 23);
  return (p * half_scale) * 2.0f;
}

L2R_HD float log_poly(float x) {
  using namespace poly;
  if (!(x > 0.0f)) return x == 0.0f ? -static_cast<float>(INFINITY) : static_cast<float>(NAN);
  if (x == static_cast<float>(INFINITY)) return x;
  int32_t e_bias = 127;
  if (x < kMinNormal) {
    x *= 8388608.0f;  // 2^23
    e_bias += 23;
  }
  const int32_t bits = float_to_bits(x);
  int32_t e = (bits >> 23) - e_bias;
  float m = bits_to_float((bits & 0x007fffff) | 0x3f800000);  // [1, 2)
  if (m > kSqrt2) {
    m *= 0.5f;
    e += 1;
  }
  const float z = m - 1.0f;
  float p = poly_fma(kL7, z, kL6);
  p = poly_fma(p, z, kL5);
  p = poly_fma(p, z, kL4);
  p = poly_fma(p, z, kL3);
  p = poly_fma(p, z, kL2);
  p = poly_fma(p, z, kL1);
  p = poly_fma(p, z, kL0);
  const float z2 = z * z;
  const float fe = static_cast<float>(e);
  float y = poly_fma(z2 * z, p, -0.5f * z2);  // log(1 + z) - z
  y = poly_fma(fe, kLn2Lo, y);
  return poly_fma(fe, kLn2Hi, y + z);
}

// top_k_insert's order as one unsigned 64-bit number: (a, i) ranks before (b, j) exactly when
// rank_key(a, i) > rank_key(b, j). NaN below every number (NaNs among themselves by index), -0 and
// +0 equal, ties to the lower index; so selecting the k largest keys is the same selection.
L2R_HD uint64_t rank_key(float key, int index) {
  uint32_t ordered = 0;  // NaN
  if (!math_isnan(key)) {
    const uint32_t u = static_cast<uint32_t>(float_to_bits(key + 0.0f));  // -0 -> +0
    ordered = (u & 0x80000000u) ? ~u : (u | 0x80000000u);  // monotone: -inf -> 0x007fffff
  }
  return (static_cast<uint64_t>(ordered) << 32) | (0xffffffffu - static_cast<uint32_t>(index));
}

L2R_HD int rank_key_index(uint64_t rk) {
  return static_cast<int>(0xffffffffu - static_cast<uint32_t>(rk));
}

// Finish of one expert's anchor log-sum-exp (expert_logit for H > 1) from the running max m of
// s_h / tau, the sum of exp(s_h / tau - m) and whether any score was NaN; log_sum is log(sum).
template <typename acc_t>
L2R_HD acc_t expert_logit_finish(acc_t m, acc_t log_sum, bool has_nan, acc_t tau) {
  if (has_nan) return static_cast<acc_t>(NAN);
  if (m == math_neg_inf<acc_t>() || m == -math_neg_inf<acc_t>()) return tau * m;
  return tau * (m + log_sum);
}

// d l / d s_h from the anchor's exp(s_h / tau - m) and the expert's sum of them: the same share as
// anchor_share without another exp.
template <typename acc_t>
L2R_HD acc_t anchor_share_from_exp(acc_t exp_shifted, acc_t sum, int num_anchors) {
  return num_anchors == 1 ? acc_t(1) : exp_shifted / sum;
}

}  // namespace route
}  // namespace l2r
