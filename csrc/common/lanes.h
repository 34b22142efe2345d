// Scalar lanes: float and double as lane types of width 1, usable on the host and the device.
//
// The per-token math (csrc/route/math/) is written once over a lane type V: a scalar here (the
// portable CPU path, every CUDA thread), or 8/16 floats of a SIMD register (lanes_avx2.h,
// lanes_avx512.h). Every lane type offers the same free functions:
//   V arithmetic (+ - * /), fmadd(a, b, c) = a*b+c rounded once, vmax/vmin (x86 max/min
//   semantics: a > b ? a : b, so a NaN in either operand returns the second), vabs, vsqrt, vrint,
//   comparisons lt/le/gt/ge/eq -> Mask<V>, is_nan, select(mask, a, b), mask_and/or/not, any_of;
//   for float lanes also the 32-bit integer view (to_bits/from_bits, IntLane<V> with + - & | << >>
//   and to_float/to_int) that the polynomial exp/log of fastmath.h need.
// Scalar lanes compute every lane operation exactly as one SIMD lane does, so a formula gives the
// same bits at every width (tests/cpp/lane_math_check.cpp checks it helper by helper).
#pragma once

#include "hd.h"

namespace l2r {
namespace lanes {
L2R_ISA_BEGIN

template <typename V>
struct LaneTraits;

template <>
struct LaneTraits<float> {
  using Mask = bool;
  using Int = int32_t;
  using Scalar = float;
  static constexpr int width = 1;
};

template <>
struct LaneTraits<double> {
  using Mask = bool;
  using Int = int64_t;
  using Scalar = double;
  static constexpr int width = 1;
};

template <typename V>
using Mask = typename LaneTraits<V>::Mask;
template <typename V>
using IntLane = typename LaneTraits<V>::Int;
template <typename V>
using ScalarOf = typename LaneTraits<V>::Scalar;

// ---- arithmetic ---------------------------------------------------------------------------------

L2R_HD float fmadd(float a, float b, float c) {
#if defined(L2R_ON_DEVICE)
  return __fmaf_rn(a, b, c);
#else
  return __builtin_fmaf(a, b, c);
#endif
}

L2R_HD double fmadd(double a, double b, double c) {
#if defined(L2R_ON_DEVICE)
  return __fma_rn(a, b, c);
#else
  return __builtin_fma(a, b, c);
#endif
}

L2R_HD float vmax(float a, float b) { return a > b ? a : b; }
L2R_HD double vmax(double a, double b) { return a > b ? a : b; }
L2R_HD float vmin(float a, float b) { return a < b ? a : b; }
L2R_HD double vmin(double a, double b) { return a < b ? a : b; }

L2R_HD float vabs(float a) {
#if defined(L2R_ON_DEVICE)
  return fabsf(a);
#else
  return __builtin_fabsf(a);
#endif
}
L2R_HD double vabs(double a) {
#if defined(L2R_ON_DEVICE)
  return fabs(a);
#else
  return __builtin_fabs(a);
#endif
}

// Correctly rounded square root on every backend (IEEE sqrt; nvcc's default -prec-sqrt=true).
L2R_HD float vsqrt(float a) {
#if defined(L2R_ON_DEVICE)
  return __fsqrt_rn(a);
#else
  return __builtin_sqrtf(a);
#endif
}
L2R_HD double vsqrt(double a) {
#if defined(L2R_ON_DEVICE)
  return sqrt(a);
#else
  return __builtin_sqrt(a);
#endif
}

// Round to the nearest integer, ties to even (the current rounding mode on the host).
L2R_HD float vrint(float a) {
#if defined(L2R_ON_DEVICE)
  return rintf(a);
#else
  return __builtin_rintf(a);
#endif
}

// ---- comparisons, masks, select -----------------------------------------------------------------

template <typename T>
L2R_HD bool lt(T a, T b) { return a < b; }
template <typename T>
L2R_HD bool le(T a, T b) { return a <= b; }
template <typename T>
L2R_HD bool gt(T a, T b) { return a > b; }
template <typename T>
L2R_HD bool ge(T a, T b) { return a >= b; }
template <typename T>
L2R_HD bool eq(T a, T b) { return a == b; }
template <typename T>
L2R_HD bool is_nan(T a) { return a != a; }

L2R_HD float select(bool m, float a, float b) { return m ? a : b; }
L2R_HD double select(bool m, double a, double b) { return m ? a : b; }
L2R_HD int32_t select(bool m, int32_t a, int32_t b) { return m ? a : b; }

L2R_HD bool mask_and(bool a, bool b) { return a && b; }
L2R_HD bool mask_or(bool a, bool b) { return a || b; }
L2R_HD bool mask_not(bool a) { return !a; }
L2R_HD bool any_of(bool a) { return a; }

// ---- 32-bit integer view of float lanes ---------------------------------------------------------

L2R_HD int32_t to_bits(float v) {
#if defined(L2R_DEVICE_COMPILE) && defined(__CUDA_ARCH__)
  return __float_as_int(v);
#else
  int32_t i;
  __builtin_memcpy(&i, &v, sizeof(i));
  return i;
#endif
}

L2R_HD float from_bits(int32_t i) {
#if defined(L2R_DEVICE_COMPILE) && defined(__CUDA_ARCH__)
  return __int_as_float(i);
#else
  float v;
  __builtin_memcpy(&v, &i, sizeof(v));
  return v;
#endif
}

L2R_HD float to_float(int32_t i) { return static_cast<float>(i); }
// v is integral and in range (the callers round first).
L2R_HD int32_t to_int(float v) { return static_cast<int32_t>(v); }
// Arithmetic shift right of an int lane (the exponent field of a positive float).
L2R_HD int32_t shift_right(int32_t i, int n) { return i >> n; }
L2R_HD int32_t shift_left(int32_t i, int n) {
  return static_cast<int32_t>(static_cast<uint32_t>(i) << n);
}

// ---- horizontal reductions (a scalar lane is its own sum and max) --------------------------------

L2R_HD float hsum(float v) { return v; }
L2R_HD double hsum(double v) { return v; }
L2R_HD float hmax(float v) { return v; }
L2R_HD double hmax(double v) { return v; }
L2R_HD int mask_bits(bool m) { return m ? 1 : 0; }
// Lane j takes `value` where j >= first (the padded experts of a last block): none for a scalar
// lane unless first <= 0.
L2R_HD float blend_from_lane(float keep, float value, int first) { return first <= 0 ? value : keep; }
L2R_HD double blend_from_lane(double keep, double value, int first) { return first <= 0 ? value : keep; }

// A value the compiler must keep in a register from here on (it may otherwise fold a load into
// every instruction that uses it, one load per use): no code for scalar lanes.
L2R_HD void pin_register(float&) {}
L2R_HD void pin_register(double&) {}

// Orders the non-temporal stores (LaneIO::stream) of this thread before what it does next: no
// code for scalar lanes, whose streams are plain stores.
L2R_HD void stream_fence(float) {}
L2R_HD void stream_fence(double) {}

L2R_ISA_END
}  // namespace lanes
}  // namespace l2r
