// 16 float lanes in an AVX-512 register, with the free functions of lanes.h (see there).
//
// Include only from translation units compiled for AVX-512 F/DQ/BW/VL (x86-64-v4;
// route/cpu/route_cpu_avx512.cpp sets `#pragma GCC target` before any include).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)

#include <immintrin.h>

#include "half_bits.h"
#include "lanes.h"

#define L2R_LANE_FN inline __attribute__((always_inline))

namespace l2r {
namespace lanes {
L2R_ISA_BEGIN

struct Vec16f {
  __m512 v;
  L2R_LANE_FN Vec16f() = default;
  L2R_LANE_FN Vec16f(__m512 x) : v(x) {}
  L2R_LANE_FN Vec16f(float s) : v(_mm512_set1_ps(s)) {}
  static L2R_LANE_FN Vec16f load(const float* p) { return _mm512_loadu_ps(p); }
  L2R_LANE_FN void store(float* p) const { _mm512_storeu_ps(p, v); }
};

struct Mask16 {
  __mmask16 m;
};

struct Int16 {
  __m512i v;
  L2R_LANE_FN Int16() = default;
  L2R_LANE_FN Int16(__m512i x) : v(x) {}
  L2R_LANE_FN Int16(int32_t s) : v(_mm512_set1_epi32(s)) {}
};

template <>
struct LaneTraits<Vec16f> {
  using Mask = Mask16;
  using Int = Int16;
  using Scalar = float;
  static constexpr int width = 16;
};

L2R_LANE_FN Vec16f operator+(Vec16f a, Vec16f b) { return _mm512_add_ps(a.v, b.v); }
L2R_LANE_FN Vec16f operator-(Vec16f a, Vec16f b) { return _mm512_sub_ps(a.v, b.v); }
L2R_LANE_FN Vec16f operator*(Vec16f a, Vec16f b) { return _mm512_mul_ps(a.v, b.v); }
L2R_LANE_FN Vec16f operator/(Vec16f a, Vec16f b) { return _mm512_div_ps(a.v, b.v); }
L2R_LANE_FN Vec16f operator-(Vec16f a) { return _mm512_xor_ps(a.v, _mm512_set1_ps(-0.0f)); }
L2R_LANE_FN Vec16f& operator+=(Vec16f& a, Vec16f b) { return a = a + b; }
L2R_LANE_FN Vec16f& operator-=(Vec16f& a, Vec16f b) { return a = a - b; }
L2R_LANE_FN Vec16f& operator*=(Vec16f& a, Vec16f b) { return a = a * b; }

L2R_LANE_FN Vec16f fmadd(Vec16f a, Vec16f b, Vec16f c) { return _mm512_fmadd_ps(a.v, b.v, c.v); }
// x86 max/min semantics (second operand on NaN), as the scalar and AVX2 lanes: the AVX-512
// instructions have exactly these.
L2R_LANE_FN Vec16f vmax(Vec16f a, Vec16f b) { return _mm512_max_ps(a.v, b.v); }
L2R_LANE_FN Vec16f vmin(Vec16f a, Vec16f b) { return _mm512_min_ps(a.v, b.v); }
L2R_LANE_FN Vec16f vabs(Vec16f a) { return _mm512_abs_ps(a.v); }
L2R_LANE_FN Vec16f vsqrt(Vec16f a) { return _mm512_sqrt_ps(a.v); }
L2R_LANE_FN Vec16f vrint(Vec16f a) {
  return _mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

L2R_LANE_FN Mask16 lt(Vec16f a, Vec16f b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_LT_OQ)}; }
L2R_LANE_FN Mask16 le(Vec16f a, Vec16f b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_LE_OQ)}; }
L2R_LANE_FN Mask16 gt(Vec16f a, Vec16f b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_GT_OQ)}; }
L2R_LANE_FN Mask16 ge(Vec16f a, Vec16f b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_GE_OQ)}; }
L2R_LANE_FN Mask16 eq(Vec16f a, Vec16f b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_EQ_OQ)}; }
L2R_LANE_FN Mask16 is_nan(Vec16f a) { return {_mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q)}; }

L2R_LANE_FN Vec16f select(Mask16 m, Vec16f a, Vec16f b) { return _mm512_mask_blend_ps(m.m, b.v, a.v); }
L2R_LANE_FN Int16 select(Mask16 m, Int16 a, Int16 b) { return _mm512_mask_blend_epi32(m.m, b.v, a.v); }
L2R_LANE_FN Mask16 mask_and(Mask16 a, Mask16 b) { return {static_cast<__mmask16>(a.m & b.m)}; }
L2R_LANE_FN Mask16 mask_or(Mask16 a, Mask16 b) { return {static_cast<__mmask16>(a.m | b.m)}; }
L2R_LANE_FN Mask16 mask_not(Mask16 a) { return {static_cast<__mmask16>(~a.m)}; }
L2R_LANE_FN bool any_of(Mask16 a) { return a.m != 0; }
L2R_LANE_FN int mask_bits(Mask16 a) { return a.m; }

L2R_LANE_FN Int16 to_bits(Vec16f v) { return _mm512_castps_si512(v.v); }
L2R_LANE_FN Vec16f from_bits(Int16 i) { return _mm512_castsi512_ps(i.v); }
L2R_LANE_FN Vec16f to_float(Int16 i) { return _mm512_cvtepi32_ps(i.v); }
L2R_LANE_FN Int16 to_int(Vec16f v) { return _mm512_cvtps_epi32(v.v); }
L2R_LANE_FN Int16 shift_right(Int16 i, int n) { return _mm512_srai_epi32(i.v, static_cast<unsigned>(n)); }
L2R_LANE_FN Int16 shift_left(Int16 i, int n) { return _mm512_slli_epi32(i.v, static_cast<unsigned>(n)); }
L2R_LANE_FN Int16 operator+(Int16 a, Int16 b) { return _mm512_add_epi32(a.v, b.v); }
L2R_LANE_FN Int16 operator-(Int16 a, Int16 b) { return _mm512_sub_epi32(a.v, b.v); }
L2R_LANE_FN Int16 operator&(Int16 a, Int16 b) { return _mm512_and_si512(a.v, b.v); }
L2R_LANE_FN Int16 operator|(Int16 a, Int16 b) { return _mm512_or_si512(a.v, b.v); }

// Horizontal reductions in a fixed tree: the two 256-bit halves added, then as 8 lanes.
L2R_LANE_FN float hsum(Vec16f v) {
  const __m256 lo = _mm512_castps512_ps256(v.v);
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v.v), 1));
  const __m256 s8 = _mm256_add_ps(lo, hi);
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 0x1)));
}

L2R_LANE_FN float hmax(Vec16f v) { return _mm512_reduce_max_ps(v.v); }

L2R_LANE_FN Vec16f blend_from_lane(Vec16f keep, Vec16f value, int first) {
  const __mmask16 m = first >= 16 ? 0 : static_cast<__mmask16>(0xffffu << (first < 0 ? 0 : first));
  return _mm512_mask_blend_ps(m, keep.v, value.v);
}

// fastmath.h's exponent steps in one instruction each, with the generic steps' bits on their
// domain: p * 2^n (times_pow2: p * 2^(n-1) is a normal float there, so both round the exact
// product once), and the exponent and [1, 2) mantissa of a positive finite x, denormals
// normalized (exponent_mantissa). tests/cpp/lane_math_check.cpp sweeps the float bit patterns.
L2R_LANE_FN Vec16f times_pow2(Vec16f p, Vec16f n) { return _mm512_scalef_ps(p.v, n.v); }
L2R_LANE_FN void exponent_mantissa(Vec16f x, Vec16f& e, Vec16f& m) {
  e = _mm512_getexp_ps(x.v);
  m = _mm512_getmant_ps(x.v, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_zero);
}

// In a register from here on (lanes.h).
L2R_LANE_FN void pin_register(Vec16f& a) { asm("" : "+v"(a.v)); }

template <>
struct LaneIO<Vec16f> {
  // Any other element type: converted lane by lane with the scalar conversions (a new dtype works
  // at every width before it gets an in-register conversion of its own).
  template <typename X>
  static L2R_LANE_FN Vec16f load(const X* p) {
    alignas(64) float lanes[16];
    for (int j = 0; j < 16; ++j) lanes[j] = LaneIO<float>::load(p + j);
    return load(static_cast<const float*>(lanes));
  }
  template <typename X>
  static L2R_LANE_FN void store(X* p, Vec16f v) {
    alignas(64) float lanes[16];
    store(static_cast<float*>(lanes), v);
    for (int j = 0; j < 16; ++j) LaneIO<float>::store(p + j, lanes[j]);
  }
  static L2R_LANE_FN Vec16f load(const float* p) { return _mm512_loadu_ps(p); }
  static L2R_LANE_FN Vec16f load(const bf16_t* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static L2R_LANE_FN Vec16f load(const fp16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static L2R_LANE_FN void store(float* p, Vec16f v) { _mm512_storeu_ps(p, v.v); }
  static L2R_LANE_FN void store(bf16_t* p, Vec16f v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bf16_bits(v));
  }
  static L2R_LANE_FN void store(fp16_t* p, Vec16f v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), fp16_bits(v));
  }
  // Non-temporal stores (past the caches, without reading the line first) for outputs too large to
  // stay cached: p aligned to the stored size (64 bytes for float, 32 for 16-bit types); the writer
  // calls stream_fence before others may read. Same bits as store.
  template <typename X>
  static L2R_LANE_FN void stream(X* p, Vec16f v) { store(p, v); }
  static L2R_LANE_FN void stream(float* p, Vec16f v) { _mm512_stream_ps(p, v.v); }
  static L2R_LANE_FN void stream(bf16_t* p, Vec16f v) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), bf16_bits(v));
  }
  static L2R_LANE_FN void stream(fp16_t* p, Vec16f v) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), fp16_bits(v));
  }

 private:
  // Round to nearest even as float_to_bf16 (NaN -> 0x7fc0).
  static L2R_LANE_FN __m256i bf16_bits(Vec16f v) {
    const __m512i b = _mm512_castps_si512(v.v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v.v, v.v, _CMP_UNORD_Q), r, _mm512_set1_epi32(0x7fc0));
    return _mm512_cvtepi32_epi16(r);
  }
  static L2R_LANE_FN __m256i fp16_bits(Vec16f v) { return _mm512_cvtps_ph(v.v, _MM_FROUND_TO_NEAREST_INT); }
};

// Orders this thread's non-temporal stores (LaneIO::stream) before what it does next.
L2R_LANE_FN void stream_fence(Vec16f) { _mm_sfence(); }

L2R_ISA_END
}  // namespace lanes
}  // namespace l2r

#endif
