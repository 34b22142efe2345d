// 8 float lanes in an AVX2 register, with the free functions of lanes.h (see there).
//
// Include only from translation units compiled for AVX2+FMA (route/cpu/route_cpu_avx2.cpp sets
// `#pragma GCC target` before any include): the functions below use AVX2/FMA intrinsics directly.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)

#include <immintrin.h>

#include "half_bits.h"
#include "lanes.h"

#define L2R_LANE_FN inline __attribute__((always_inline))

namespace l2r {
namespace lanes {
L2R_ISA_BEGIN

struct Vec8f {
  __m256 v;
  L2R_LANE_FN Vec8f() = default;
  L2R_LANE_FN Vec8f(__m256 x) : v(x) {}
  L2R_LANE_FN Vec8f(float s) : v(_mm256_set1_ps(s)) {}
  static L2R_LANE_FN Vec8f load(const float* p) { return _mm256_loadu_ps(p); }
  L2R_LANE_FN void store(float* p) const { _mm256_storeu_ps(p, v); }
};

struct Mask8 {
  __m256 m;  // all-ones or all-zeros per lane
};

struct Int8 {
  __m256i v;
  L2R_LANE_FN Int8() = default;
  L2R_LANE_FN Int8(__m256i x) : v(x) {}
  L2R_LANE_FN Int8(int32_t s) : v(_mm256_set1_epi32(s)) {}
};

template <>
struct LaneTraits<Vec8f> {
  using Mask = Mask8;
  using Int = Int8;
  using Scalar = float;
  static constexpr int width = 8;
};

L2R_LANE_FN Vec8f operator+(Vec8f a, Vec8f b) { return _mm256_add_ps(a.v, b.v); }
L2R_LANE_FN Vec8f operator-(Vec8f a, Vec8f b) { return _mm256_sub_ps(a.v, b.v); }
L2R_LANE_FN Vec8f operator*(Vec8f a, Vec8f b) { return _mm256_mul_ps(a.v, b.v); }
L2R_LANE_FN Vec8f operator/(Vec8f a, Vec8f b) { return _mm256_div_ps(a.v, b.v); }
L2R_LANE_FN Vec8f operator-(Vec8f a) { return _mm256_xor_ps(a.v, _mm256_set1_ps(-0.0f)); }
L2R_LANE_FN Vec8f& operator+=(Vec8f& a, Vec8f b) { return a = a + b; }
L2R_LANE_FN Vec8f& operator-=(Vec8f& a, Vec8f b) { return a = a - b; }
L2R_LANE_FN Vec8f& operator*=(Vec8f& a, Vec8f b) { return a = a * b; }

L2R_LANE_FN Vec8f fmadd(Vec8f a, Vec8f b, Vec8f c) { return _mm256_fmadd_ps(a.v, b.v, c.v); }
L2R_LANE_FN Vec8f vmax(Vec8f a, Vec8f b) { return _mm256_max_ps(a.v, b.v); }
L2R_LANE_FN Vec8f vmin(Vec8f a, Vec8f b) { return _mm256_min_ps(a.v, b.v); }
L2R_LANE_FN Vec8f vabs(Vec8f a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a.v); }
L2R_LANE_FN Vec8f vsqrt(Vec8f a) { return _mm256_sqrt_ps(a.v); }
L2R_LANE_FN Vec8f vrint(Vec8f a) {
  return _mm256_round_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

L2R_LANE_FN Mask8 lt(Vec8f a, Vec8f b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_LT_OQ)}; }
L2R_LANE_FN Mask8 le(Vec8f a, Vec8f b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_LE_OQ)}; }
L2R_LANE_FN Mask8 gt(Vec8f a, Vec8f b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_GT_OQ)}; }
L2R_LANE_FN Mask8 ge(Vec8f a, Vec8f b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_GE_OQ)}; }
L2R_LANE_FN Mask8 eq(Vec8f a, Vec8f b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_EQ_OQ)}; }
L2R_LANE_FN Mask8 is_nan(Vec8f a) { return {_mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q)}; }

L2R_LANE_FN Vec8f select(Mask8 m, Vec8f a, Vec8f b) { return _mm256_blendv_ps(b.v, a.v, m.m); }
L2R_LANE_FN Int8 select(Mask8 m, Int8 a, Int8 b) {
  return _mm256_blendv_epi8(b.v, a.v, _mm256_castps_si256(m.m));
}
L2R_LANE_FN Mask8 mask_and(Mask8 a, Mask8 b) { return {_mm256_and_ps(a.m, b.m)}; }
L2R_LANE_FN Mask8 mask_or(Mask8 a, Mask8 b) { return {_mm256_or_ps(a.m, b.m)}; }
L2R_LANE_FN Mask8 mask_not(Mask8 a) {
  return {_mm256_xor_ps(a.m, _mm256_castsi256_ps(_mm256_set1_epi32(-1)))};
}
L2R_LANE_FN bool any_of(Mask8 a) { return _mm256_movemask_ps(a.m) != 0; }
// Bit j set when lane j is set.
L2R_LANE_FN int mask_bits(Mask8 a) { return _mm256_movemask_ps(a.m); }

L2R_LANE_FN Int8 to_bits(Vec8f v) { return _mm256_castps_si256(v.v); }
L2R_LANE_FN Vec8f from_bits(Int8 i) { return _mm256_castsi256_ps(i.v); }
L2R_LANE_FN Vec8f to_float(Int8 i) { return _mm256_cvtepi32_ps(i.v); }
L2R_LANE_FN Int8 to_int(Vec8f v) { return _mm256_cvtps_epi32(v.v); }
L2R_LANE_FN Int8 shift_right(Int8 i, int n) { return _mm256_srai_epi32(i.v, n); }
L2R_LANE_FN Int8 shift_left(Int8 i, int n) { return _mm256_slli_epi32(i.v, n); }
L2R_LANE_FN Int8 operator+(Int8 a, Int8 b) { return _mm256_add_epi32(a.v, b.v); }
L2R_LANE_FN Int8 operator-(Int8 a, Int8 b) { return _mm256_sub_epi32(a.v, b.v); }
L2R_LANE_FN Int8 operator&(Int8 a, Int8 b) { return _mm256_and_si256(a.v, b.v); }
L2R_LANE_FN Int8 operator|(Int8 a, Int8 b) { return _mm256_or_si256(a.v, b.v); }

// Horizontal reductions (backends' reduction topology: lanes 0..7 in a fixed tree).
L2R_LANE_FN float hsum(Vec8f v) {
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v.v), _mm256_extractf128_ps(v.v, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 0x1)));
}

// Max over lanes; no lane may be NaN (callers track NaN separately).
L2R_LANE_FN float hmax(Vec8f v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v.v), _mm256_extractf128_ps(v.v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 0x1));
  return _mm_cvtss_f32(m);
}

// Lane j is `value` where j >= first, `keep` elsewhere (the padded experts of a last block).
L2R_LANE_FN Vec8f blend_from_lane(Vec8f keep, Vec8f value, int first) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 m = _mm256_castsi256_ps(_mm256_cmpgt_epi32(lane, _mm256_set1_epi32(first - 1)));
  return _mm256_blendv_ps(keep.v, value.v, m);
}

// In a register from here on (lanes.h).
L2R_LANE_FN void pin_register(Vec8f& a) { asm("" : "+x"(a.v)); }

template <>
struct LaneIO<Vec8f> {
  // Any other element type: converted lane by lane with the scalar conversions (a new dtype works
  // at every width before it gets an in-register conversion of its own).
  template <typename X>
  static L2R_LANE_FN Vec8f load(const X* p) {
    alignas(64) float lanes[8];
    for (int j = 0; j < 8; ++j) lanes[j] = LaneIO<float>::load(p + j);
    return load(static_cast<const float*>(lanes));
  }
  template <typename X>
  static L2R_LANE_FN void store(X* p, Vec8f v) {
    alignas(64) float lanes[8];
    store(static_cast<float*>(lanes), v);
    for (int j = 0; j < 8; ++j) LaneIO<float>::store(p + j, lanes[j]);
  }
  static L2R_LANE_FN Vec8f load(const float* p) { return _mm256_loadu_ps(p); }
  static L2R_LANE_FN Vec8f load(const bf16_t* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static L2R_LANE_FN Vec8f load(const fp16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static L2R_LANE_FN void store(float* p, Vec8f v) { _mm256_storeu_ps(p, v.v); }
  static L2R_LANE_FN void store(bf16_t* p, Vec8f v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), bf16_bits(v));
  }
  static L2R_LANE_FN void store(fp16_t* p, Vec8f v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), fp16_bits(v));
  }
  // Non-temporal stores (lanes_avx512.h): p aligned to 32 bytes for float, 16 for 16-bit types.
  template <typename X>
  static L2R_LANE_FN void stream(X* p, Vec8f v) { store(p, v); }
  static L2R_LANE_FN void stream(float* p, Vec8f v) { _mm256_stream_ps(p, v.v); }
  static L2R_LANE_FN void stream(bf16_t* p, Vec8f v) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), bf16_bits(v));
  }
  static L2R_LANE_FN void stream(fp16_t* p, Vec8f v) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), fp16_bits(v));
  }

 private:
  // Round to nearest even as float_to_bf16 (NaN -> 0x7fc0).
  static L2R_LANE_FN __m128i bf16_bits(Vec8f v) {
    const __m256i b = _mm256_castps_si256(v.v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(v.v, v.v, _CMP_UNORD_Q)));
    const __m128i lo = _mm256_castsi256_si128(r), hi = _mm256_extracti128_si256(r, 1);
    return _mm_packus_epi32(lo, hi);
  }
  static L2R_LANE_FN __m128i fp16_bits(Vec8f v) { return _mm256_cvtps_ph(v.v, _MM_FROUND_TO_NEAREST_INT); }
};

// Orders this thread's non-temporal stores (LaneIO::stream) before what it does next.
L2R_LANE_FN void stream_fence(Vec8f) { _mm_sfence(); }

L2R_ISA_END
}  // namespace lanes
}  // namespace l2r

#endif
