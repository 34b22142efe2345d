// Top-k search of one token's selection keys on AVX-512, without a data-dependent branch: the keys
// become the 64-bit order keys of common/order.h (8 per register), each register is sorted by a
// bitonic network, and sorted registers merge pairwise keeping the best 8. Chooses exactly the
// experts select_top_k (route_cpu_kernel.h) chooses, in the same order: the order keys are the
// one total order, and a sorting network only reorders them. For k <= 8.
//
// Include only from the AVX-512 translation unit (route_cpu_avx512.cpp), after the kernel header.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)

#include <immintrin.h>

#include "../../common/lanes_avx512.h"
#include "../../common/order.h"

namespace l2r {
namespace route {
namespace cpu {
L2R_ISA_BEGIN

namespace top_k_avx512 {

// One compare-exchange layer: lane i meets lane partner[i]; lanes in `low` keep the smaller key.
L2R_LANE_FN __m512i exchange(__m512i v, __m512i partner, __mmask8 low) {
  const __m512i p = _mm512_permutexvar_epi64(partner, v);
  return _mm512_mask_blend_epi64(low, _mm512_max_epu64(v, p), _mm512_min_epu64(v, p));
}

struct Partners {
  __m512i x1, x2, x3, x7;  // lane i ^ 1, ^ 2, ^ 3, ^ 7
};

L2R_LANE_FN Partners partners() {
  return {_mm512_set_epi64(6, 7, 4, 5, 2, 3, 0, 1), _mm512_set_epi64(5, 4, 7, 6, 1, 0, 3, 2),
          _mm512_set_epi64(4, 5, 6, 7, 0, 1, 2, 3), _mm512_set_epi64(0, 1, 2, 3, 4, 5, 6, 7)};
}

// 8 keys in descending order (bitonic sort, merging blocks of 1, 2, 4 with a reversal).
L2R_LANE_FN __m512i sort8(__m512i v, const Partners& p) {
  v = exchange(v, p.x1, 0xAA);
  v = exchange(v, p.x3, 0xCC);
  v = exchange(v, p.x1, 0xAA);
  v = exchange(v, p.x7, 0xF0);
  v = exchange(v, p.x2, 0xCC);
  return exchange(v, p.x1, 0xAA);
}

// The best 8 of two descending registers, descending: max(a, reversed b) holds them as a bitonic
// sequence, which three half-cleaners sort.
L2R_LANE_FN __m512i merge8(__m512i a, __m512i b, const Partners& p) {
  __m512i v = _mm512_max_epu64(a, _mm512_permutexvar_epi64(p.x7, b));
  v = exchange(v, _mm512_set_epi64(3, 2, 1, 0, 7, 6, 5, 4), 0xF0);
  v = exchange(v, p.x2, 0xCC);
  return exchange(v, p.x1, 0xAA);
}

// Order keys of keys[b, b + 16) as two registers of 8 (experts b..b+7, b+8..b+15); experts >= E get
// the key below every order key.
L2R_LANE_FN void order_keys16(const float* keys, int b, int E, __m512i& lo, __m512i& hi) {
  const __m512 v = _mm512_add_ps(_mm512_loadu_ps(keys + b), _mm512_setzero_ps());  // -0 -> +0
  const __m512i u = _mm512_castps_si512(v);
  const __m512i flip = _mm512_or_si512(_mm512_srai_epi32(u, 31), _mm512_set1_epi32(int32_t(0x80000000u)));
  const __mmask16 number = _mm512_cmp_ps_mask(v, v, _CMP_ORD_Q);
  const __mmask16 valid = E - b >= 16 ? __mmask16(0xffff) : __mmask16((1u << (E - b)) - 1u);
  const __m512i ordered = _mm512_maskz_xor_epi32(number, u, flip);  // NaN -> 0
  const __m512i rev_index =
      _mm512_sub_epi32(_mm512_set1_epi32(-1), _mm512_add_epi32(_mm512_set1_epi32(b),
                                                               _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6,
                                                                                5, 4, 3, 2, 1, 0)));
  const __m256i o0 = _mm512_castsi512_si256(ordered);
  const __m256i o1 = _mm512_extracti64x4_epi64(ordered, 1);
  const __m256i r0 = _mm512_castsi512_si256(rev_index);
  const __m256i r1 = _mm512_extracti64x4_epi64(rev_index, 1);
  lo = _mm512_maskz_or_epi64(__mmask8(valid & 0xff), _mm512_slli_epi64(_mm512_cvtepu32_epi64(o0), 32),
                             _mm512_cvtepu32_epi64(r0));
  hi = _mm512_maskz_or_epi64(__mmask8(valid >> 8), _mm512_slli_epi64(_mm512_cvtepu32_epi64(o1), 32),
                             _mm512_cvtepu32_epi64(r1));
}

}  // namespace top_k_avx512

// The k <= 8 best of keys[0, E) (E_pad = E rounded up to 16, keys readable up to it), best first,
// as expert indices.
inline void select_top_k_network(const float* keys, int E, int E_pad, int k, int64_t* out) {
  using namespace top_k_avx512;
  const Partners p = partners();
  __m512i best = _mm512_setzero_si512();
  for (int b = 0; b < E_pad; b += 16) {
    __m512i lo, hi;
    order_keys16(keys, b, E, lo, hi);
    const __m512i block = merge8(sort8(lo, p), sort8(hi, p), p);
    best = b == 0 ? block : merge8(best, block, p);
  }
  alignas(64) uint64_t top[8];
  _mm512_store_si512(top, best);
  for (int j = 0; j < k; ++j) out[j] = order_key_index(top[j]);
}

template <>
struct TopKNetwork<lanes::Vec16f> {
  static constexpr int max_k = 8;
  static void select(const float* keys, int E, int E_pad, int k, int64_t* out) {
    select_top_k_network(keys, E, E_pad, k, out);
  }
};

L2R_ISA_END
}  // namespace cpu
}  // namespace route
}  // namespace l2r

#endif
