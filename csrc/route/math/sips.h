// SIPS, the saturated inner product of a token and an anchor (docs/SPEC.md "Forward, per token"):
//   s = scale * phi(|q|) * phi(|a|) * <q, a> / (max(|q|, eps) * max(|a|, eps)),
//   phi(n) = (1 - beta) + beta * tanh(n).
// A vector v enters as coef(|v|) * v with coef(n) = phi(n) / max(n, eps), so s = scale * <coef_q q,
// coef_a a>: the anchors are pre-scaled once per call (anchor_hat) and a token needs one coefficient.
#pragma once

#include "namespace.h"

L2R_ROUTE_MATH_BEGIN

template <typename V>
struct NormCoef {
  V coef;    // phi(n) / max(n, eps)
  V radial;  // (d coef / d n) / n, so that d(coef(|v|)) / dv = radial * v; 0 at n = 0
};

template <typename V>
L2R_HD NormCoef<V> sips_norm_coef(V n, V beta, V eps) {
  const V t = vtanh(n);
  const V phi = (V(1) - beta) + beta * t;
  const V dphi = beta * (V(1) - t * t);
  // max(n, eps) passes the gradient where n >= eps (as torch's clamp_min does).
  const auto clamped = lt(n, eps);
  const V denom = select(clamped, eps, n);
  NormCoef<V> c;
  c.coef = phi / denom;
  const V dcoef = dphi / denom - select(clamped, V(0), phi / (denom * denom));
  c.radial = select(gt(n, V(0)), dcoef / n, V(0));
  return c;
}

// <a, b> over the routing dims, in one fixed order (first product, then FMAs); a_at(i), b_at(i):
// the coordinates wherever they are (e.g. a strided column of shared memory).
template <typename T, typename AAt, typename BAt>
L2R_HD T dot_r_at(AAt&& a_at, BAt&& b_at, int n) {
  T s = a_at(0) * b_at(0);
  for (int i = 1; i < n; ++i) s = fmadd(a_at(i), b_at(i), s);
  return s;
}

template <typename T>
L2R_HD T dot_r(const T* a, const T* b, int n) {
  return dot_r_at<T>([&](int i) { return a[i]; }, [&](int i) { return b[i]; }, n);
}

// <q, anchor_hat> of one token against the anchors in lanes: a_hat(i) gives lane values of
// coordinate i (whatever the layout), q is the token's scalars.
template <typename V, typename T, typename AHat>
L2R_HD V anchor_dot(const T* q, int rank, AHat&& a_hat) {
  V u = V(q[0]) * a_hat(0);
  for (int i = 1; i < rank; ++i) u = fmadd(V(q[i]), a_hat(i), u);
  return u;
}

// anchor_dot for `count` <= N lane values at once (the rank loop outside, so the N chains of FMAs
// run side by side): out[v] = anchor_dot(q, rank, [&](int i) { return a_hat(i, v); }) bit for bit.
template <typename V, int N, typename T, typename AHat>
L2R_HD void anchor_dots(const T* q, int rank, int count, AHat&& a_hat, V* out) {
  const V q0(q[0]);
  for (int v = 0; v < count; ++v) out[v] = q0 * a_hat(0, v);
  for (int i = 1; i < rank; ++i) {
    const V qi(q[i]);
    for (int v = 0; v < count; ++v) out[v] = fmadd(qi, a_hat(i, v), out[v]);
  }
}

// The token's side of SIPS: coefficient of q from its norm.
template <typename T>
L2R_HD NormCoef<T> query_coef(const T* q, int rank, T beta, T eps) {
  return sips_norm_coef(vsqrt(dot_r(q, q, rank)), beta, eps);
}

L2R_ROUTE_MATH_END
