// AVX2 + FMA fast path of the CPU route kernels (float math only; float64 keeps the portable
// per-token loops). Everything per token is vectorized over experts: anchors are stored transposed,
// [r][H][E8] with E8 = E rounded up to 8 (zero padding), so the scores of 8 experts come out of r
// FMAs, the anchor max / log-sum-exp over H is lane-wise, and exp / log are the polynomial
// exp_poly / log_poly of route_math.cuh transcribed lane for lane (same operations, same bits).
// Summation orders depend on E, H, r and d only: never on the batch or on the thread count.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "../common/cpu_project.h"
#include "route_math.cuh"

#define L2R_AVX2_FN __attribute__((target("avx2,fma,f16c"))) static inline

namespace l2r {
namespace route {
namespace avx2 {

// ------------------------------------------------------------------------------------------------
// exp_poly / log_poly, 8 lanes.
// ------------------------------------------------------------------------------------------------

L2R_AVX2_FN __m256 exp8(__m256 x) {
  using namespace poly;
  const __m256 nan_mask = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  const __m256 over = _mm256_cmp_ps(x, _mm256_set1_ps(kExpMax), _CMP_GT_OQ);
  const __m256 under = _mm256_cmp_ps(x, _mm256_set1_ps(kExpMin), _CMP_LT_OQ);
  // clamp so that the integer part stays in range; the masks above fix the clamped lanes
  const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(kExpMin)), _mm256_set1_ps(kExpMax));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 nn = _mm256_sub_ps(_mm256_setzero_ps(), n);
  __m256 f = _mm256_fmadd_ps(nn, _mm256_set1_ps(kLn2Hi), xc);
  f = _mm256_fmadd_ps(nn, _mm256_set1_ps(kLn2Lo), f);
  __m256 q = _mm256_fmadd_ps(_mm256_set1_ps(kE4), f, _mm256_set1_ps(kE3));
  q = _mm256_fmadd_ps(q, f, _mm256_set1_ps(kE2));
  q = _mm256_fmadd_ps(q, f, _mm256_set1_ps(kE1));
  q = _mm256_fmadd_ps(q, f, _mm256_set1_ps(kE0));
  const __m256 p = _mm256_add_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(_mm256_mul_ps(f, f), q, f));
  const __m256i ni = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(126));
  const __m256 half_scale = _mm256_castsi256_ps(_mm256_slli_epi32(ni, 23));
  __m256 r = _mm256_mul_ps(_mm256_mul_ps(p, half_scale), _mm256_set1_ps(2.0f));
  r = _mm256_blendv_ps(r, _mm256_set1_ps(INFINITY), over);
  r = _mm256_blendv_ps(r, _mm256_setzero_ps(), under);
  return _mm256_blendv_ps(r, x, nan_mask);
}

L2R_AVX2_FN __m256 log8(__m256 x) {
  using namespace poly;
  const __m256 zero = _mm256_setzero_ps();
  const __m256 not_pos = _mm256_cmp_ps(x, zero, _CMP_NGT_UQ);  // x <= 0 or NaN
  const __m256 is_zero = _mm256_cmp_ps(x, zero, _CMP_EQ_OQ);
  const __m256 is_inf = _mm256_cmp_ps(x, _mm256_set1_ps(INFINITY), _CMP_EQ_OQ);
  const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(kMinNormal), _CMP_LT_OQ);
  const __m256 xs = _mm256_blendv_ps(x, _mm256_mul_ps(x, _mm256_set1_ps(8388608.0f)), tiny);
  const __m256i e_bias = _mm256_blendv_epi8(_mm256_set1_epi32(127), _mm256_set1_epi32(150),
                                            _mm256_castps_si256(tiny));
  const __m256i bits = _mm256_castps_si256(xs);
  __m256i e = _mm256_sub_epi32(_mm256_srai_epi32(bits, 23), e_bias);
  __m256 m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)),
                                                 _mm256_set1_epi32(0x3f800000)));
  const __m256 big = _mm256_cmp_ps(m, _mm256_set1_ps(kSqrt2), _CMP_GT_OQ);
  m = _mm256_blendv_ps(m, _mm256_mul_ps(m, _mm256_set1_ps(0.5f)), big);
  e = _mm256_sub_epi32(e, _mm256_castps_si256(big));  // big lanes are -1 as integers: e += 1
  const __m256 z = _mm256_sub_ps(m, _mm256_set1_ps(1.0f));
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(kL7), z, _mm256_set1_ps(kL6));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(kL5));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(kL4));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(kL3));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(kL2));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(kL1));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(kL0));
  const __m256 z2 = _mm256_mul_ps(z, z);
  const __m256 fe = _mm256_cvtepi32_ps(e);
  __m256 y = _mm256_fmadd_ps(_mm256_mul_ps(z2, z), p, _mm256_mul_ps(_mm256_set1_ps(-0.5f), z2));
  y = _mm256_fmadd_ps(fe, _mm256_set1_ps(kLn2Lo), y);
  __m256 r = _mm256_fmadd_ps(fe, _mm256_set1_ps(kLn2Hi), _mm256_add_ps(y, z));
  r = _mm256_blendv_ps(r, x, is_inf);
  r = _mm256_blendv_ps(r, _mm256_set1_ps(NAN), not_pos);
  return _mm256_blendv_ps(r, _mm256_set1_ps(-INFINITY), is_zero);
}

L2R_AVX2_FN float hsum(__m256 v) { return cpu::hsum_avx2(v); }

L2R_AVX2_FN float hmax(__m256 v) {  // no NaN inside (callers track NaN separately)
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 0x1));
  return _mm_cvtss_f32(m);
}

// ------------------------------------------------------------------------------------------------
// Rows of x in and gradients out, converted to / from float.
// ------------------------------------------------------------------------------------------------

template <typename scalar_t>
L2R_AVX2_FN const float* load_row(const scalar_t* x, int64_t d, float* buffer) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return x;
  } else {
    int64_t i = 0;
    for (; i + 8 <= d; i += 8) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i));
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        _mm256_storeu_ps(buffer + i, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
      } else {
        _mm256_storeu_ps(buffer + i, _mm256_cvtph_ps(h));
      }
    }
    for (; i < d; ++i) buffer[i] = static_cast<float>(x[i]);
    return buffer;
  }
}

// 8 floats to scalar_t with round-to-nearest-even (what c10's conversions do).
template <typename scalar_t>
L2R_AVX2_FN void store8(scalar_t* out, __m256 v) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    _mm256_storeu_ps(out, v);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const __m256i b = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    // pack 8 x u32 (all < 2^16) into 8 x u16
    const __m128i lo = _mm256_castsi256_si128(r), hi = _mm256_extracti128_si256(r, 1);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_packus_epi32(lo, hi));
  } else {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
}

// ------------------------------------------------------------------------------------------------
// Scores of one token against every anchor.
// ------------------------------------------------------------------------------------------------

struct AnchorLayout {
  int experts, experts8, anchors, rank;
  const float* at;  // [rank][anchors][experts8]: coef(|a|) * a, transposed, zero padded
  int64_t size() const { return int64_t(rank) * anchors * experts8; }
};

// Per-token scratch, experts8-long rows (u and ex: anchors rows each).
struct TokenScores {
  float* u;       // [H][E8] <q, anchor_hat>
  float* ex;      // [H][E8] exp(s / tau - m) (H > 1)
  float* lsum;    // [E8]    sum_h ex
  float* logits;  // [E8]    padded lanes -inf
  float* exps;    // [E8]    exp(logit - shift)
  float* probs;   // [E8]    padded lanes 0
};

// Fills the scores of one token; returns the softmax statistics over experts (softmax_stats_of).
L2R_AVX2_FN SoftmaxStats<float> score_token(const float* q, const AnchorLayout& L, float q_scale,
                                            float tau, bool sigmoid, const TokenScores& S) {
  const int R = L.rank, H = L.anchors, E8 = L.experts8;
  const float scale_over_tau = q_scale / tau;
  const __m256 sot = _mm256_set1_ps(scale_over_tau), qs = _mm256_set1_ps(q_scale);
  const __m256 vtau = _mm256_set1_ps(tau);
  const __m256 ninf = _mm256_set1_ps(-INFINITY);
  __m256 lmax = ninf, lnan = _mm256_setzero_ps();
  for (int b = 0; b < E8; b += 8) {
    __m256 m = ninf, has_nan = _mm256_setzero_ps();
    __m256 logit = _mm256_setzero_ps();
    for (int h = 0; h < H; ++h) {
      const float* col = L.at + int64_t(h) * E8 + b;
      __m256 u = _mm256_mul_ps(_mm256_set1_ps(q[0]), _mm256_loadu_ps(col));
      for (int i = 1; i < R; ++i) {
        u = _mm256_fmadd_ps(_mm256_set1_ps(q[i]), _mm256_loadu_ps(col + int64_t(i) * H * E8), u);
      }
      _mm256_storeu_ps(S.u + h * E8 + b, u);
      if (H > 1) {
        const __m256 v = _mm256_mul_ps(sot, u);
        has_nan = _mm256_or_ps(has_nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        m = _mm256_max_ps(v, m);
      } else {
        logit = _mm256_mul_ps(qs, u);  // H = 1: l = s
      }
    }
    if (H > 1) {
      // expert_logit: sum of exp(v - m), then expert_logit_finish
      const __m256 m_safe = _mm256_blendv_ps(m, _mm256_setzero_ps(),
                                             _mm256_cmp_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), m),
                                                           _mm256_set1_ps(INFINITY), _CMP_EQ_OQ));
      __m256 sum = _mm256_setzero_ps();
      for (int h = 0; h < H; ++h) {
        const __m256 v = _mm256_mul_ps(sot, _mm256_loadu_ps(S.u + h * E8 + b));
        const __m256 e = exp8(_mm256_sub_ps(v, m_safe));
        _mm256_storeu_ps(S.ex + h * E8 + b, e);
        sum = _mm256_add_ps(sum, e);
      }
      _mm256_storeu_ps(S.lsum + b, sum);
      const __m256 is_inf = _mm256_cmp_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), m),
                                          _mm256_set1_ps(INFINITY), _CMP_EQ_OQ);
      logit = _mm256_mul_ps(vtau, _mm256_add_ps(m, log8(sum)));
      logit = _mm256_blendv_ps(logit, _mm256_mul_ps(vtau, m), is_inf);
      logit = _mm256_blendv_ps(logit, _mm256_set1_ps(NAN), has_nan);
    } else {
      _mm256_storeu_ps(S.lsum + b, _mm256_set1_ps(1.0f));
    }
    if (b + 8 > L.experts) {  // padded experts: never selected, no probability
      const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      const __m256 pad = _mm256_castsi256_ps(
          _mm256_cmpgt_epi32(_mm256_add_epi32(lane, _mm256_set1_epi32(b)), _mm256_set1_epi32(L.experts - 1)));
      logit = _mm256_blendv_ps(logit, ninf, pad);
    }
    _mm256_storeu_ps(S.logits + b, logit);
    lnan = _mm256_or_ps(lnan, _mm256_cmp_ps(logit, logit, _CMP_UNORD_Q));
    lmax = _mm256_max_ps(logit, lmax);
  }
  // softmax_stats_of over experts
  SoftmaxStats<float> st;
  const bool has_nan = _mm256_movemask_ps(lnan) != 0;
  st.max = has_nan ? NAN : hmax(lmax);
  const float shift = st.max == -INFINITY ? 0.0f : st.max;
  const __m256 vshift = _mm256_set1_ps(shift);
  __m256 vsum = _mm256_setzero_ps();
  for (int b = 0; b < E8; b += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(S.logits + b), vshift));
    _mm256_storeu_ps(S.exps + b, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  st.sum = hsum(vsum);
  // routing_prob (softmax reuses the exp)
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 vs = _mm256_set1_ps(st.sum);
  for (int b = 0; b < E8; b += 8) {
    __m256 p;
    if (sigmoid) {
      const __m256 l = _mm256_loadu_ps(S.logits + b);
      p = _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), l))));
    } else {
      p = _mm256_div_ps(_mm256_loadu_ps(S.exps + b), vs);
    }
    _mm256_storeu_ps(S.probs + b, p);
  }
  return st;
}

// ------------------------------------------------------------------------------------------------
// Backward of one token through the experts' scores: given dl (dL/dlogit, [E8]), accumulates
// acc[r][H][E8] += ds * q_scale * q and returns sum_h,e ds * anchor_hat (ds_anchor_hat [r]) and
// sum ds * u.
// ------------------------------------------------------------------------------------------------

L2R_AVX2_FN float scores_backward(const float* q, const AnchorLayout& L, float q_scale,
                                  const TokenScores& S, const float* dl, float* acc,
                                  float* ds_anchor_hat, float* lane_scratch /* [r * 8] */) {
  const int R = L.rank, H = L.anchors, E8 = L.experts8;
  const int64_t row = int64_t(H) * E8;
  __m256 dsu = _mm256_setzero_ps();
  for (int i = 0; i < R; ++i) _mm256_storeu_ps(lane_scratch + i * 8, _mm256_setzero_ps());
  const __m256 qs = _mm256_set1_ps(q_scale);
  for (int b = 0; b < E8; b += 8) {
    const __m256 dlv = _mm256_loadu_ps(dl + b);
    const __m256 lsum = _mm256_loadu_ps(S.lsum + b);
    for (int h = 0; h < H; ++h) {
      // anchor_share_from_exp
      const __m256 ds = H == 1 ? dlv : _mm256_mul_ps(dlv, _mm256_div_ps(_mm256_loadu_ps(S.ex + h * E8 + b), lsum));
      dsu = _mm256_fmadd_ps(ds, _mm256_loadu_ps(S.u + h * E8 + b), dsu);
      const __m256 ds_q = _mm256_mul_ps(ds, qs);
      const int64_t off = int64_t(h) * E8 + b;
      for (int i = 0; i < R; ++i) {
        float* lane = lane_scratch + i * 8;
        _mm256_storeu_ps(lane, _mm256_fmadd_ps(ds, _mm256_loadu_ps(L.at + i * row + off), _mm256_loadu_ps(lane)));
        float* a = acc + i * row + off;
        _mm256_storeu_ps(a, _mm256_fmadd_ps(ds_q, _mm256_set1_ps(q[i]), _mm256_loadu_ps(a)));
      }
    }
  }
  for (int i = 0; i < R; ++i) ds_anchor_hat[i] = hsum(_mm256_loadu_ps(lane_scratch + i * 8));
  return hsum(dsu);
}

// Hints the lines of n floats from p into the cache (x rows stream from memory in short runs,
// which the hardware prefetcher alone follows late).
L2R_AVX2_FN void prefetch_floats(const float* p, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) _mm_prefetch(reinterpret_cast<const char*>(p + i), _MM_HINT_T0);
}

// One token, one block [b0, b1) of d: x~ out, grad_x_norm (W^T grad_q), grad_norm_weight, and the
// running mean_dot lanes. ROWS = rank when known at compile time (0: any rank).
template <int ROWS, typename scalar_t>
L2R_AVX2_FN __m256 backward_block(const float* xt, const float* W, int64_t w_stride, const float* g,
                                  bool use_norm, __m256 vr, const float* gq, int rank, int64_t b0,
                                  int64_t b1, float* xnj, float* buf, float* grad_norm_weight,
                                  scalar_t* gx, __m256 mdj) {
  constexpr int kMax = ROWS > 0 ? ROWS : 1;
  __m256 c[kMax];
  for (int k = 0; k < kMax; ++k) c[k] = _mm256_set1_ps(gq[k]);
  for (int64_t i = b0; i < b1; i += 8) {
    const __m256 xv = _mm256_loadu_ps(xt + i);
    const __m256 xhat = use_norm ? _mm256_mul_ps(xv, vr) : xv;
    const __m256 gv = g ? _mm256_loadu_ps(g + i) : _mm256_set1_ps(1.0f);
    _mm256_storeu_ps(xnj + i, g ? _mm256_mul_ps(xhat, gv) : xhat);
    __m256 gxn = _mm256_mul_ps(c[0], _mm256_loadu_ps(W + i));
    if constexpr (ROWS > 0) {
      for (int k = 1; k < ROWS; ++k) gxn = _mm256_fmadd_ps(c[k], _mm256_loadu_ps(W + k * w_stride + i), gxn);
    } else {
      for (int k = 1; k < rank; ++k) {
        gxn = _mm256_fmadd_ps(_mm256_set1_ps(gq[k]), _mm256_loadu_ps(W + k * w_stride + i), gxn);
      }
    }
    if (!use_norm) {
      store8(gx + i, gxn);
      continue;
    }
    if (g) {
      _mm256_storeu_ps(grad_norm_weight + i,
                       _mm256_fmadd_ps(gxn, xhat, _mm256_loadu_ps(grad_norm_weight + i)));
      gxn = _mm256_mul_ps(gxn, gv);  // now dL/dx_hat
    }
    mdj = _mm256_fmadd_ps(gxn, xhat, mdj);
    _mm256_storeu_ps(buf + i, gxn);
  }
  return mdj;
}

// Backward through q = W x~ and RMSNorm for a group of `count` <= 8 tokens, d in blocks so that the
// block of W (and of x~) stays in L1 while every token of the group uses it:
//   grad_x_norm = W^T grad_q, grad_norm_weight += grad_x_norm * x_hat (token order),
//   grad_proj += grad_q x~^T (token order), grad_x = rms_norm_input_grad(...).
// xs[j]: float rows; grad_q: [count][rank]; buffer: [count][stride]; xn: [count][kProjBlock].
constexpr int64_t kProjBlock = 256;

template <typename scalar_t>
L2R_AVX2_FN void projection_backward_group(const float* const* xs, const float* W, int64_t w_stride,
                                           const float* g, int64_t d, int rank, bool use_norm,
                                           const float* rstd, const float* grad_q, int count,
                                           float* grad_proj, float* grad_norm_weight,
                                           float* buffer, int64_t stride, float* xn,
                                           scalar_t* const* gx, const float* next_rows,
                                           int next_count) {
  const int64_t dv = d & ~int64_t(7);
  __m256 md[8];
  for (int j = 0; j < 8; ++j) md[j] = _mm256_setzero_ps();
  for (int64_t b0 = 0; b0 < dv; b0 += kProjBlock) {
    const int64_t b1 = b0 + kProjBlock < dv ? b0 + kProjBlock : dv;
    for (int j = 0; j < count; ++j) {
      const float* xt = xs[j];
      const float* gq = grad_q + j * rank;
      const __m256 vr = _mm256_set1_ps(rstd[j]);
      float* xnj = xn + j * kProjBlock - b0;
      float* buf = buffer + j * stride;
      if (b1 < dv) {
        prefetch_floats(xt + b1, b1 + kProjBlock < dv ? kProjBlock : dv - b1);
      } else if (j < next_count) {  // the next group's first block
        prefetch_floats(next_rows + j * d, kProjBlock < dv ? kProjBlock : dv);
      }
      __m256 mdj = md[j];
      switch (rank) {
#define L2R_BWD_BLOCK(R_) \
  mdj = backward_block<R_, scalar_t>(xt, W, w_stride, g, use_norm, vr, gq, rank, b0, b1, xnj, buf, \
                                     grad_norm_weight, gx[j], mdj)
        case 1: L2R_BWD_BLOCK(1); break;
        case 2: L2R_BWD_BLOCK(2); break;
        case 3: L2R_BWD_BLOCK(3); break;
        case 4: L2R_BWD_BLOCK(4); break;
        case 8: L2R_BWD_BLOCK(8); break;
        default: L2R_BWD_BLOCK(0); break;
#undef L2R_BWD_BLOCK
      }
      md[j] = mdj;
    }
    for (int k = 0; k < rank; ++k) {
      float* gp = grad_proj + k * d;
      __m256 c[8];
      for (int j = 0; j < 8; ++j) c[j] = _mm256_set1_ps(j < count ? grad_q[j * rank + k] : 0.0f);
      if (count == 8) {  // the common case, unrolled so that c[] stays in registers
        for (int64_t i = b0; i < b1; i += 8) {
          __m256 acc = _mm256_loadu_ps(gp + i);
          for (int j = 0; j < 8; ++j) {
            acc = _mm256_fmadd_ps(c[j], _mm256_loadu_ps(xn + j * kProjBlock + (i - b0)), acc);
          }
          _mm256_storeu_ps(gp + i, acc);
        }
        continue;
      }
      for (int64_t i = b0; i < b1; i += 8) {
        __m256 acc = _mm256_loadu_ps(gp + i);
        for (int j = 0; j < count; ++j) {
          acc = _mm256_fmadd_ps(c[j], _mm256_loadu_ps(xn + j * kProjBlock + (i - b0)), acc);
        }
        _mm256_storeu_ps(gp + i, acc);
      }
    }
  }
  for (int j = 0; j < count; ++j) {
    const float* xt = xs[j];
    const float* gq = grad_q + j * rank;
    const float r = rstd[j];
    float* buf = buffer + j * stride;
    float mean_dot = use_norm ? hsum(md[j]) : 0.0f;
    for (int64_t i = dv; i < d; ++i) {  // tail, same formulas
      const float xhat = use_norm ? xt[i] * r : xt[i];
      const float xn_i = g ? xhat * g[i] : xhat;
      for (int k = 0; k < rank; ++k) grad_proj[k * d + i] = poly_fma(gq[k], xn_i, grad_proj[k * d + i]);
      float gxn = gq[0] * W[i];
      for (int k = 1; k < rank; ++k) gxn = poly_fma(gq[k], W[k * w_stride + i], gxn);
      if (!use_norm) {
        gx[j][i] = static_cast<scalar_t>(gxn);
        continue;
      }
      if (g) {
        grad_norm_weight[i] = poly_fma(gxn, xhat, grad_norm_weight[i]);
        gxn *= g[i];
      }
      mean_dot = poly_fma(gxn, xhat, mean_dot);
      buf[i] = gxn;
    }
    if (!use_norm) continue;
    mean_dot /= static_cast<float>(d);
    const __m256 vr = _mm256_set1_ps(r), vmd = _mm256_set1_ps(mean_dot);
    for (int64_t i = 0; i < dv; i += 8) {
      const __m256 xhat = _mm256_mul_ps(_mm256_loadu_ps(xt + i), vr);
      // rms_norm_input_grad: rstd * (gx_hat - x_hat * mean_dot)
      const __m256 v = _mm256_mul_ps(vr, _mm256_sub_ps(_mm256_loadu_ps(buf + i), _mm256_mul_ps(xhat, vmd)));
      store8(gx[j] + i, v);
    }
    for (int64_t i = dv; i < d; ++i) {
      gx[j][i] = static_cast<scalar_t>(rms_norm_input_grad(buf[i], xt[i] * r, r, mean_dot));
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Forward projection of a group of tokens, d in blocks so that the block of W stays in L1 while
// every token of the group uses it. Each lane still sums its positions in increasing order, so
// the result is bitwise that of cpu::project_avx2 token by token.
// ------------------------------------------------------------------------------------------------

template <int ROWS>
L2R_AVX2_FN void project_block(const float* x, const float* W, int64_t w_stride, int64_t b0,
                               int64_t b1, __m256* acc, bool with_squares) {
  __m256 a[ROWS];
  for (int j = 0; j < ROWS; ++j) a[j] = acc[j];
  __m256 sq = acc[ROWS];
  for (int64_t i = b0; i < b1; i += 8) {
    const __m256 xv = _mm256_loadu_ps(x + i);
    if (with_squares) sq = _mm256_fmadd_ps(xv, xv, sq);
    for (int j = 0; j < ROWS; ++j) a[j] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(W + j * w_stride + i), a[j]);
  }
  for (int j = 0; j < ROWS; ++j) acc[j] = a[j];
  acc[ROWS] = sq;
}

template <int ROWS>
L2R_AVX2_FN void project_group_rows(const float* const* xs, int count, const float* W,
                                    int64_t w_stride, int64_t d, float* q, float* squares,
                                    __m256* acc /* [8][ROWS + 1] */, const float* next_rows,
                                    int next_count) {
  const int64_t dv = d & ~int64_t(7);
  for (int j = 0; j < count * (ROWS + 1); ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t b0 = 0; b0 < dv; b0 += 512) {
    const int64_t b1 = b0 + 512 < dv ? b0 + 512 : dv;
    for (int j = 0; j < count; ++j) {
      if (b1 < dv) {
        prefetch_floats(xs[j] + b1, b1 + 512 < dv ? 512 : dv - b1);
      } else if (j < next_count) {  // the next group's first block
        prefetch_floats(next_rows + j * d, 512 < dv ? 512 : dv);
      }
      project_block<ROWS>(xs[j], W, w_stride, b0, b1, acc + j * (ROWS + 1), squares != nullptr);
    }
  }
  for (int j = 0; j < count; ++j) {
    const float* x = xs[j];
    for (int r = 0; r < ROWS; ++r) {
      float s = hsum(acc[j * (ROWS + 1) + r]);
      for (int64_t i = dv; i < d; ++i) s += W[r * w_stride + i] * x[i];
      q[j * ROWS + r] = s;
    }
    if (squares) {
      float s = hsum(acc[j * (ROWS + 1) + ROWS]);
      for (int64_t i = dv; i < d; ++i) s += x[i] * x[i];
      squares[j] = s;
    }
  }
}

// q[j] = W x_j (rank <= 8; W rows w_stride apart), squares[j] = <x_j, x_j> when squares != null.
// next_rows: the next group's rows (contiguous, d apart; null if unknown), prefetched at the end.
L2R_AVX2_FN void project_group(const float* const* xs, int count, const float* W, int64_t w_stride,
                               int64_t d, int rank, float* q, float* squares, __m256* acc,
                               const float* next_rows, int next_count) {
  switch (rank) {
    case 1: return project_group_rows<1>(xs, count, W, w_stride, d, q, squares, acc, next_rows, next_count);
    case 2: return project_group_rows<2>(xs, count, W, w_stride, d, q, squares, acc, next_rows, next_count);
    case 3: return project_group_rows<3>(xs, count, W, w_stride, d, q, squares, acc, next_rows, next_count);
    case 4: return project_group_rows<4>(xs, count, W, w_stride, d, q, squares, acc, next_rows, next_count);
    case 5: return project_group_rows<5>(xs, count, W, w_stride, d, q, squares, acc, next_rows, next_count);
    case 6: return project_group_rows<6>(xs, count, W, w_stride, d, q, squares, acc, next_rows, next_count);
    case 7: return project_group_rows<7>(xs, count, W, w_stride, d, q, squares, acc, next_rows, next_count);
    default: return project_group_rows<8>(xs, count, W, w_stride, d, q, squares, acc, next_rows, next_count);
  }
}

// ------------------------------------------------------------------------------------------------
// Token loops.
// ------------------------------------------------------------------------------------------------

struct ForwardArgs {
  int64_t d;
  int rank, top_k;
  bool use_norm, sigmoid, normalize;
  float eps_norm, eps, beta, tau, scale;
  const float* proj_weighted;  // [r, proj_stride]
  int64_t proj_stride;
  const float* proj_weighted_dense;  // [r, d]
  const float* bias;           // [E8] zero padded, or null
  AnchorLayout anchors;
};

struct ForwardScratch {
  float* rows;  // [8][row_stride]: a group of x rows as float (bf16 / fp16 x)
  int64_t row_stride;
  __m256* acc;  // [8][9]
  float* keys;  // [E8]
  uint64_t* top_keys;  // [k] rank_key
  int* top_idx;  // [k]
  TokenScores scores;
};

// Top-k of keys[0, E) in top_k_insert's order, through rank_key (one integer compare per step).
// Experts come in index order, so once the list is full a key can only enter by being greater
// than the last entry (or a number where the last is NaN): blocks of 8 where none is are skipped.
L2R_AVX2_FN void select_top_k(const float* keys, int experts, int k, uint64_t* top, int* top_idx) {
  int count = 0, e = 0;
  auto offer = [&](int i) __attribute__((always_inline)) {
    const uint64_t rk = rank_key(keys[i], i);
    int pos = count < k ? count : k;
    if (pos == k && rk <= top[k - 1]) return;
    if (pos == k) --pos;
    while (pos > 0 && rk > top[pos - 1]) {
      top[pos] = top[pos - 1];
      --pos;
    }
    top[pos] = rk;
    if (count < k) ++count;
  };
  for (; e < experts && e < k; ++e) offer(e);
  for (; e + 8 <= experts; e += 8) {
    const float thr = keys[rank_key_index(top[k - 1])];
    const __m256 kv = _mm256_loadu_ps(keys + e);
    const __m256 enter = thr != thr ? _mm256_cmp_ps(kv, kv, _CMP_ORD_Q)
                                    : _mm256_cmp_ps(kv, _mm256_set1_ps(thr), _CMP_GT_OQ);
    int mask = _mm256_movemask_ps(enter);
    while (mask) {
      const int lane = __builtin_ctz(mask);
      mask &= mask - 1;
      offer(e + lane);
    }
  }
  for (; e < experts; ++e) offer(e);
  for (int j = 0; j < k; ++j) top_idx[j] = rank_key_index(top[j]);
}

template <typename scalar_t>
L2R_AVX2_FN void forward_tokens(const scalar_t* x, int64_t t_begin, int64_t t_end,
                                const ForwardArgs& A, const ForwardScratch& W, float* prob_sum,
                                int64_t* counts, float* weights, int64_t* indices, float* lse,
                                float* q_out, float* rstd_out) {
  const int R = A.rank, k = A.top_k, E = A.anchors.experts, E8 = A.anchors.experts8;
  const TokenScores& S = W.scores;
  for (int64_t g0 = t_begin; g0 < t_end; g0 += 8) {
    const int count = static_cast<int>(t_end - g0 < 8 ? t_end - g0 : 8);
    const float* xs[8];
    for (int j = 0; j < count; ++j) {
      xs[j] = load_row(x + (g0 + j) * A.d, A.d, W.rows ? W.rows + j * W.row_stride : nullptr);
    }
    float squares[8];
    if (R <= 8) {
      const int64_t next_count = t_end - (g0 + 8) < 8 ? t_end - (g0 + 8) : 8;
      const float* next_rows = nullptr;
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (next_count > 0) next_rows = x + (g0 + 8) * A.d;
      }
      project_group(xs, count, A.proj_weighted, A.proj_stride, A.d, R, q_out + g0 * R,
                    A.use_norm ? squares : nullptr, W.acc, next_rows, static_cast<int>(next_count));
    } else {
      for (int j = 0; j < count; ++j) {
        cpu::project_avx2(xs[j], A.proj_weighted_dense, A.d, R, q_out + (g0 + j) * R,
                          A.use_norm ? squares + j : nullptr);
      }
    }
    for (int j = 0; j < count; ++j) {
      const int64_t t = g0 + j;
      float* q = q_out + t * R;
      float rstd = 1.0f;
      if (A.use_norm) {
        rstd = rms_inv_scale(squares[j], A.d, A.eps_norm);
        for (int i = 0; i < R; ++i) q[i] *= rstd;
      }
      rstd_out[t] = rstd;
      const NormCoef<float> qc = sips_norm_coef(math_sqrt(dot(q, q, R)), A.beta, A.eps);
      const SoftmaxStats<float> st = score_token(q, A.anchors, A.scale * qc.coef, A.tau, A.sigmoid, S);
      lse[t] = softmax_stats_lse(st);
      for (int b = 0; b < E8; b += 8) {
        const __m256 p = _mm256_loadu_ps(S.probs + b);
        _mm256_storeu_ps(prob_sum + b, _mm256_add_ps(_mm256_loadu_ps(prob_sum + b), p));
        _mm256_storeu_ps(W.keys + b, A.bias ? _mm256_add_ps(p, _mm256_loadu_ps(A.bias + b)) : p);
      }
      select_top_k(W.keys, E, k, W.top_keys, W.top_idx);
      float selected_sum = 0.0f;
      for (int jj = 0; jj < k; ++jj) selected_sum += S.probs[W.top_idx[jj]];
      const float norm = A.normalize ? selected_sum : 1.0f;
      for (int jj = 0; jj < k; ++jj) {
        weights[t * k + jj] = S.probs[W.top_idx[jj]] / norm;
        indices[t * k + jj] = W.top_idx[jj];
        counts[W.top_idx[jj]] += 1;
      }
    }
  }
}

struct BackwardArgs {
  int64_t d;
  int rank, top_k;
  bool use_norm, sigmoid, normalize;
  float eps, beta, tau, scale, inv_tokens;
  const float* proj;         // [r, proj_stride]
  int64_t proj_stride;
  const float* norm_weight;  // [d] or null
  const float* grad_weights;     // [T, k] or null
  const float* grad_mean_probs;  // [E8] zero padded, or null
  const float* grad_lse;         // [T] or null
  const int64_t* indices;        // [T, k]
  const float* q;                // [T, r]
  const float* rstd;             // [T]
  AnchorLayout anchors;
};

struct BackwardScratch {
  float* rows;         // [8][xn_stride]: x of a group of tokens as float (bf16 / fp16 x)
  float* buffer;       // [8][xn_stride]
  float* grad_probs;   // [E8]
  float* dl;           // [E8]
  float* lanes;        // [r * 8]
  float* ds_anchor_hat;  // [r]
  float* grad_q;       // [8][r]: a group of tokens
  float* x_norm;       // [8][kProjBlock]: a block of their x~
  int64_t xn_stride;
  TokenScores scores;
};

// Chunk partials: grad_proj [r, d], anchor accumulators [r][H][E8], grad_norm_weight [d] (may be
// null), grad_scale.
template <typename scalar_t>
L2R_AVX2_FN void backward_tokens(const scalar_t* x, int64_t t_begin, int64_t t_end,
                                 const BackwardArgs& A, const BackwardScratch& W, float* grad_proj,
                                 float* anchor_acc, float* grad_norm_weight, float* grad_scale,
                                 scalar_t* grad_x) {
  const int R = A.rank, k = A.top_k, E8 = A.anchors.experts8;
  const TokenScores& S = W.scores;
  const float* xs[8];
  scalar_t* gxs[8];
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int j_group = static_cast<int>((t - t_begin) % 8);
    float* grad_q = W.grad_q + j_group * R;
    const float* q = A.q + t * R;
    const NormCoef<float> qc = sips_norm_coef(math_sqrt(dot(q, q, R)), A.beta, A.eps);
    const float q_scale = A.scale * qc.coef;
    const SoftmaxStats<float> st = score_token(q, A.anchors, q_scale, A.tau, A.sigmoid, S);
    for (int b = 0; b < E8; b += 8) {
      _mm256_storeu_ps(W.grad_probs + b, A.grad_mean_probs
                                             ? _mm256_mul_ps(_mm256_loadu_ps(A.grad_mean_probs + b),
                                                             _mm256_set1_ps(A.inv_tokens))
                                             : _mm256_setzero_ps());
    }
    if (A.grad_weights) {
      const float* gw = A.grad_weights + t * k;
      const int64_t* idx = A.indices + t * k;
      float selected_sum = 0.0f, grad_dot_weights = 0.0f;
      if (A.normalize) {
        for (int j = 0; j < k; ++j) selected_sum += S.probs[idx[j]];
        for (int j = 0; j < k; ++j) grad_dot_weights += gw[j] * S.probs[idx[j]] / selected_sum;
      }
      for (int j = 0; j < k; ++j) {
        W.grad_probs[idx[j]] += selected_prob_grad(gw[j], grad_dot_weights, selected_sum, A.normalize);
      }
    }
    float p_dot_dp = 0.0f;
    if (!A.sigmoid) {
      __m256 acc = _mm256_setzero_ps();
      for (int b = 0; b < E8; b += 8) {
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(S.probs + b), _mm256_loadu_ps(W.grad_probs + b), acc);
      }
      p_dot_dp = hsum(acc);
    }
    const float g_lse = A.grad_lse ? A.grad_lse[t] : 0.0f;
    // logit_grad, 8 experts at a time
    const __m256 one = _mm256_set1_ps(1.0f), vgl = _mm256_set1_ps(g_lse);
    const __m256 vpd = _mm256_set1_ps(p_dot_dp), vsum = _mm256_set1_ps(st.sum);
    for (int b = 0; b < E8; b += 8) {
      const __m256 p = _mm256_loadu_ps(S.probs + b), dp = _mm256_loadu_ps(W.grad_probs + b);
      __m256 dl;
      if (A.sigmoid) {
        const __m256 softmax_p = _mm256_div_ps(_mm256_loadu_ps(S.exps + b), vsum);
        dl = _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(dp, p), _mm256_sub_ps(one, p)),
                           _mm256_mul_ps(vgl, softmax_p));
      } else {
        dl = _mm256_add_ps(_mm256_mul_ps(p, _mm256_sub_ps(dp, vpd)), _mm256_mul_ps(vgl, p));
      }
      _mm256_storeu_ps(W.dl + b, dl);
    }
    const float ds_u_sum =
        scores_backward(q, A.anchors, q_scale, S, W.dl, anchor_acc, W.ds_anchor_hat, W.lanes);
    *grad_scale += qc.coef * ds_u_sum;
    query_grad(q, W.ds_anchor_hat, ds_u_sum, A.scale, qc, R, grad_q);
    xs[j_group] = load_row(x + t * A.d, A.d, W.rows ? W.rows + j_group * W.xn_stride : nullptr);
    gxs[j_group] = grad_x + t * A.d;
    if (j_group == 7 || t + 1 == t_end) {
      const int64_t t0 = t - j_group;
      const int64_t next_count = t_end - (t0 + 8) < 8 ? t_end - (t0 + 8) : 8;
      const float* next_rows = nullptr;
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (next_count > 0) next_rows = x + (t0 + 8) * A.d;
      }
      projection_backward_group(xs, A.proj, A.proj_stride, A.norm_weight, A.d, R, A.use_norm,
                                A.rstd + t0, W.grad_q, j_group + 1, grad_proj, grad_norm_weight,
                                W.buffer, W.xn_stride, W.x_norm, gxs, next_rows,
                                static_cast<int>(next_count));
    }
  }
}

}  // namespace avx2
}  // namespace route
}  // namespace l2r

#define L2R_HAVE_ROUTE_AVX2 1
#endif
