// Multi-anchor experts (docs/SPEC.md): an expert's logit merges its H anchor scores by
//   l = tau * logsumexp_h(s_h / tau),   s_h = q_scale * u_h,   u_h = <q, anchor_hat_h>,
// and H = 1 gives l = s exactly. Computed in stages so that each anchor costs one exp:
//   1. v_h = (q_scale / tau) * u_h, running max m and NaN flag over h;
//   2. ex_h = exp(v_h - shift(m)), lsum = sum_h ex_h;
//   3. l = tau * (m + log(lsum)) (NaN if any v_h is NaN, tau * m if m is infinite).
// The backward's share of anchor h in its expert's logit, dl/ds_h, is ex_h / lsum: the same
// stage-2 values (recomputed or stored, bitwise equal).
#pragma once

#include "namespace.h"

L2R_ROUTE_MATH_BEGIN

template <typename V>
struct AnchorMax {
  V max;
  Mask<V> has_nan;
};

template <typename V>
L2R_HD AnchorMax<V> anchor_max_empty() {
  return {V(-poly::kInf), is_nan(V(0))};
}

template <typename V>
L2R_HD AnchorMax<V> anchor_max_add(AnchorMax<V> m, V v) {
  // vmax(v, m) returns m when v is NaN: NaN never becomes the max, the flag records it.
  return {vmax(v, m.max), mask_or(m.has_nan, is_nan(v))};
}

// Stage-2 shift: the max, or 0 where it is infinite (all -inf, or an inf score: no inf - inf).
template <typename V>
L2R_HD V anchor_shift(V m) {
  return select(eq(vabs(m), V(poly::kInf)), V(0), m);
}

template <typename V>
L2R_HD V anchor_exp(V v, V shift) {
  return vexp(v - shift);
}

template <typename V>
L2R_HD V anchor_logit_finish(AnchorMax<V> m, V lsum, V tau) {
  const V finite = tau * (m.max + vlog(lsum));
  const V l = select(eq(vabs(m.max), V(poly::kInf)), tau * m.max, finite);
  return select(m.has_nan, V(from_bits(int32_t(0x7fc00000))), l);
}

// An expert's logit and the stage-2 sum its anchors' shares divide by (1 when H = 1).
template <typename V>
struct ExpertLogit {
  V logit;
  V lsum;
  V shift;
};

// u_of(h): u_h for this expert's lanes (a dot product, or a stored value). ex_out(h, ex): where the
// backend keeps ex_h if it wants them (or a no-op).
template <typename V, typename UOf, typename ExOut>
L2R_HD ExpertLogit<V> expert_logit(int anchors, V q_scale, V scale_over_tau, V tau, UOf&& u_of,
                                   ExOut&& ex_out) {
  if (anchors == 1) return {q_scale * u_of(0), V(1), V(0)};
  AnchorMax<V> m = anchor_max_empty<V>();
  for (int h = 0; h < anchors; ++h) m = anchor_max_add(m, scale_over_tau * u_of(h));
  const V shift = anchor_shift(m.max);
  V lsum = V(0);
  for (int h = 0; h < anchors; ++h) {
    const V ex = anchor_exp(scale_over_tau * u_of(h), shift);
    ex_out(h, ex);
    lsum = lsum + ex;
  }
  return {anchor_logit_finish(m, lsum, tau), lsum, shift};
}

// dl/ds_h of anchor h from its stage-2 exp.
template <typename V>
L2R_HD V anchor_share(int anchors, V ex, V lsum) {
  return anchors == 1 ? V(1) : ex / lsum;
}

L2R_ROUTE_MATH_END
