// exp, log and tanh: one policy for every backend.
//
// Float lanes (scalar float on the CPU and on every CUDA thread, 8 and 16 SIMD lanes on the CPU)
// use the polynomials below, written once over the lane type, so a given input gives the same bits
// on every backend and at every width. They are within 2 ulp of the correctly rounded result over
// their range (our own minimax-style fits; tanh from Cephes' tanhf):
//   vexp: x > 88.7228 -> +inf, x < -86 -> 0 (no denormal results), NaN -> NaN;
//   vlog: 0 -> -inf, x < 0 or NaN -> NaN, +inf -> +inf, denormals handled;
//   vtanh: odd, |x| >= 9 -> +-1 exactly, NaN -> NaN.
// Double lanes (float64 inputs, which exist for gradcheck) use the platform's exp/log/tanh.
#pragma once

#include "lanes.h"

#if !defined(__CUDACC_RTC__) && !defined(L2R_ON_DEVICE)
#include <cmath>
#endif

namespace l2r {
namespace lanes {
L2R_ISA_BEGIN

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
#if defined(__CUDACC_RTC__)  // NVRTC has neither __builtin_huge_valf nor a constexpr overflow
constexpr float kInf = __builtin_bit_cast(float, 0x7f800000u);
#else
constexpr float kInf = __builtin_huge_valf();
#endif
// tanh(x) = x + x^3 * (t0 + t1 x^2 + ... + t4 x^8) for |x| < 0.625 (Cephes tanhf)
constexpr float kTanhSmall = 0.625f;
constexpr float kT0 = -3.33332819422e-1f, kT1 = 1.33314422036e-1f, kT2 = -5.37397155531e-2f,
                kT3 = 2.06390887954e-2f, kT4 = -5.70498872745e-3f;
}  // namespace poly

// p * 2^n for p in [0.5, 2) and integral n in [-124, 128] (vexp's range): exact, or +inf where it
// overflows. Computed as (p * 2^(n-1)) * 2, so that n = 128 needs no exponent field of 255; a lane
// type may override it with an instruction that gives the same bits (AVX-512: vscalefps).
template <typename V>
L2R_HD V times_pow2(V p, V n) {
  const V half_scale = from_bits(shift_left(to_int(n) + IntLane<V>(126), 23));
  return (p * half_scale) * V(2.0f);
}

// x = m * 2^e with m in [1, 2) and e integral (both exact in float), for positive finite x,
// denormals included; any values elsewhere (vlog replaces those lanes). A lane type may override it
// with instructions that give the same bits there (AVX-512: vgetexpps, vgetmantps).
template <typename V>
L2R_HD void exponent_mantissa(V x, V& e, V& m) {
  using namespace poly;
  const auto tiny = lt(x, V(kMinNormal));
  const V xs = select(tiny, x * V(8388608.0f), x);  // 2^23
  const auto bits = to_bits(xs);
  e = to_float(shift_right(bits, 23)) - select(tiny, V(150.0f), V(127.0f));
  m = from_bits((bits & IntLane<V>(0x007fffff)) | IntLane<V>(0x3f800000));
}

template <typename V>
L2R_HD V vexp(V x) {
  using namespace poly;
  const auto nan = is_nan(x);
  const auto over = gt(x, V(kExpMax));
  const auto under = lt(x, V(kExpMin));
  // Clamped so that the exponent stays in range; the masks fix the clamped lanes.
  const V xc = vmin(vmax(x, V(kExpMin)), V(kExpMax));
  const V n = vrint(xc * V(kLog2e));  // |n| <= 128
  const V neg_n = V(0.0f) - n;
  V f = fmadd(neg_n, V(kLn2Hi), xc);
  f = fmadd(neg_n, V(kLn2Lo), f);
  V q = fmadd(V(kE4), f, V(kE3));
  q = fmadd(q, f, V(kE2));
  q = fmadd(q, f, V(kE1));
  q = fmadd(q, f, V(kE0));
  const V p = V(1.0f) + fmadd(f * f, q, f);
  V r = times_pow2(p, n);
  r = select(over, V(kInf), r);
  r = select(under, V(0.0f), r);
  return select(nan, x, r);
}

template <typename V>
L2R_HD V vlog(V x) {
  using namespace poly;
  const auto not_pos = mask_not(gt(x, V(0.0f)));  // x <= 0 or NaN
  const auto is_zero = eq(x, V(0.0f));
  const auto is_inf = eq(x, V(kInf));
  V e, m;
  exponent_mantissa(x, e, m);
  const auto big = gt(m, V(kSqrt2));
  m = select(big, m * V(0.5f), m);
  e = select(big, e + V(1.0f), e);
  const V z = m - V(1.0f);
  V p = fmadd(V(kL7), z, V(kL6));
  p = fmadd(p, z, V(kL5));
  p = fmadd(p, z, V(kL4));
  p = fmadd(p, z, V(kL3));
  p = fmadd(p, z, V(kL2));
  p = fmadd(p, z, V(kL1));
  p = fmadd(p, z, V(kL0));
  const V z2 = z * z;
  V y = fmadd(z2 * z, p, V(-0.5f) * z2);  // log(1 + z) - z
  y = fmadd(e, V(kLn2Lo), y);
  V r = fmadd(e, V(kLn2Hi), y + z);
  r = select(is_inf, x, r);
  r = select(not_pos, V(from_bits(int32_t(0x7fc00000))), r);  // quiet NaN
  return select(is_zero, V(-kInf), r);
}

template <typename V>
L2R_HD V vtanh(V x) {
  using namespace poly;
  const V a = vabs(x);
  const auto small = lt(a, V(kTanhSmall));
  const V z = x * x;
  V p = fmadd(V(kT4), z, V(kT3));
  p = fmadd(p, z, V(kT2));
  p = fmadd(p, z, V(kT1));
  p = fmadd(p, z, V(kT0));
  const V y_small = fmadd(x * z, p, x);
  // 1 - 2 / (exp(2|x|) + 1): exp overflows to inf for |x| > 44, giving exactly 1.
  const V t = V(1.0f) - V(2.0f) / (vexp(a + a) + V(1.0f));
  const V y_large = select(lt(x, V(0.0f)), V(0.0f) - t, t);
  return select(small, y_small, y_large);  // NaN: not small, and t is NaN
}

// Double lanes: the platform's functions (float64 is the gradcheck path, not a fast path).
L2R_HD double vexp(double x) {
#if defined(L2R_ON_DEVICE)
  return exp(x);
#else
  return std::exp(x);
#endif
}
L2R_HD double vlog(double x) {
#if defined(L2R_ON_DEVICE)
  return log(x);
#else
  return std::log(x);
#endif
}
L2R_HD double vtanh(double x) {
#if defined(L2R_ON_DEVICE)
  return tanh(x);
#else
  return std::tanh(x);
#endif
}

L2R_ISA_END
}  // namespace lanes
}  // namespace l2r
