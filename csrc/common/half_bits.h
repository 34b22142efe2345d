// 16-bit float element types of the framework-free kernels (layout-compatible with c10::BFloat16 and
// c10::Half: two bytes of IEEE bits) and their exact conversions to and from float: round to
// nearest even, as c10 converts (bf16: NaN -> 0x7fc0; fp16: NaN -> 0x7e00 with the sign kept).
// Scalar lanes convert with these; SIMD lanes have their own loads/stores with the same results.
#pragma once

#include "lanes.h"

namespace l2r {

struct bf16_t {
  uint16_t bits;
};
struct fp16_t {
  uint16_t bits;
};

namespace lanes {
L2R_ISA_BEGIN

L2R_HD float bf16_to_float(bf16_t h) { return from_bits(static_cast<int32_t>(uint32_t(h.bits) << 16)); }

L2R_HD bf16_t float_to_bf16(float f) {
  if (f != f) return bf16_t{0x7fc0};
  const uint32_t u = static_cast<uint32_t>(to_bits(f));
  return bf16_t{static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}

L2R_HD float fp16_to_float(fp16_t h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16;
  const uint32_t exponent = (h.bits >> 10) & 0x1fu;
  const uint32_t mantissa = h.bits & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-08f;
    return from_bits(static_cast<int32_t>(sign | uint32_t(to_bits(magnitude))));
  }
  if (exponent == 31) return from_bits(static_cast<int32_t>(sign | 0x7f800000u | (mantissa << 13)));
  return from_bits(static_cast<int32_t>(sign | ((exponent + 112u) << 23) | (mantissa << 13)));
}

// c10's fp16_ieee_from_fp32_value: rounding done by the FPU on a rescaled value.
L2R_HD fp16_t float_to_fp16(float f) {
  const float scale_to_inf = 5.192296858534828e+33f;    // 2^112
  const float scale_to_zero = 7.703719777548943e-34f;   // 2^-110
  float base = (vabs(f) * scale_to_inf) * scale_to_zero;
  const uint32_t w = static_cast<uint32_t>(to_bits(f));
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xff000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = from_bits(static_cast<int32_t>((bias >> 1) + 0x07800000u)) + base;
  const uint32_t bits = static_cast<uint32_t>(to_bits(base));
  const uint32_t exp_bits = (bits >> 13) & 0x00007c00u;
  const uint32_t mantissa_bits = bits & 0x00000fffu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return fp16_t{static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xff000000u ? 0x7e00u : nonsign))};
}

// Loads and stores of W consecutive elements of any element type as one lane value, converted in
// registers: LaneIO<V>::load(p) / LaneIO<V>::store(p, v). Scalar lanes here; SIMD lanes in their
// headers.
template <typename V>
struct LaneIO;

template <>
struct LaneIO<float> {
  static L2R_HD float load(const float* p) { return *p; }
  static L2R_HD float load(const bf16_t* p) { return bf16_to_float(*p); }
  static L2R_HD float load(const fp16_t* p) { return fp16_to_float(*p); }
  static L2R_HD void store(float* p, float v) { *p = v; }
  static L2R_HD void store(bf16_t* p, float v) { *p = float_to_bf16(v); }
  static L2R_HD void store(fp16_t* p, float v) { *p = float_to_fp16(v); }
  template <typename X>
  static L2R_HD void stream(X* p, float v) { store(p, v); }  // scalar lanes: a plain store
};

template <>
struct LaneIO<double> {
  static L2R_HD double load(const double* p) { return *p; }
  static L2R_HD void store(double* p, double v) { *p = v; }
  static L2R_HD void stream(double* p, double v) { *p = v; }
};

L2R_ISA_END
}  // namespace lanes
}  // namespace l2r
