// RMSNorm in front of the projection (docs/SPEC.md): x~ = x * rstd * g, rstd = 1/sqrt(mean(x^2) +
// eps_norm), q = W x~. Kernels fold g into W and compute q = rstd * (W_g x) from one pass over x.
#pragma once

#include "namespace.h"

L2R_ROUTE_MATH_BEGIN

template <typename T>
L2R_HD T rms_inv_scale(T sum_squares, int64_t d, T eps_norm) {
  return T(1) / vsqrt(sum_squares / static_cast<T>(d) + eps_norm);
}

// rstd * (W_g x) equals W_g (x * rstd) up to rounding, except where mean(x^2) overflowed (x near
// its dtype's maximum, or infinite): then rstd = 0 and the normalized row x * 0 is 0 (NaN at an
// infinite x) while W_g x may be infinite. Such rows take q from the normalized row, as the
// reference does: every coordinate is W_g . 0 = 0, or NaN when the row holds a non-finite value.
template <typename T>
L2R_HD bool rms_overflowed(T rstd) {
  return rstd == T(0);
}

template <typename T>
L2R_HD T overflowed_row_projection(bool row_has_non_finite) {
  return row_has_non_finite ? T(lanes::from_bits(int32_t(0x7fc00000))) : T(0);
}

// Normalized input element (before the affine weight).
template <typename V>
L2R_HD V rms_normalized(V x, V rstd) {
  return x * rstd;
}

// dL/dx from dL/dx_hat (after the affine weight: gx_hat = g * dL/dx~) with
// mean_dot = mean_i(gx_hat_i * x_hat_i).
template <typename V>
L2R_HD V rms_norm_input_grad(V gx_hat, V x_hat, V rstd, V mean_dot) {
  return rstd * (gx_hat - x_hat * mean_dot);
}

// rms_norm_input_grad with rstd distributed over the difference, for a backend that folds rstd into
// grad_q (so that W_g^T (rstd * grad_q) = rstd * dL/dx_hat comes out of the projection's transpose
// directly, the affine weight already in W_g): dL/dx = rstd_gx_hat - rstd_mean_dot * x_hat, where
// rstd_mean_dot = rstd * mean_dot. x_hat rather than x keeps the product in range (x near its dtype's
// maximum has a tiny rstd, whose square may underflow).
template <typename V>
L2R_HD V rms_norm_input_grad_scaled(V rstd_gx_hat, V x_hat, V rstd_mean_dot) {
  return fmadd(V(0) - rstd_mean_dot, x_hat, rstd_gx_hat);
}

// RMSNorm's mean_i(dL/dx_hat_i * x_hat_i) for one token, known before its row is read again:
// <grad_q, q> / d, as q = (proj * g) x_hat is the forward's q, so the backward needs neither a
// dL/dx_hat buffer nor a second pass over x. kRank > 0: the rank as a constant (CUDA keeps q and
// grad_q in registers, so every index must be one); 0: the run-time `rank`.
template <int kRank, typename T>
L2R_HD T rms_mean_dot(const T* grad_q, const T* q, int rank, int64_t d) {
  T dot = T(0);
#pragma unroll
  for (int k = 0; k < (kRank > 0 ? kRank : rank); ++k) dot = fmadd(grad_q[k], q[k], dot);
  return dot / static_cast<T>(d);
}

L2R_ROUTE_MATH_END
