// The CPU route kernels, written once over a lane type V (float or double: one expert at a time;
// Vec8f / Vec16f: 8 or 16 experts at a time) and instantiated per instruction set by
// route_cpu_{portable,avx2,avx512}.cpp. Only memory layout and reductions live here; every formula
// is csrc/route/math's.
//
// Layout: anchors transposed to [r][H][E_pad] (E_pad = E rounded up to the lane width, zero
// padding), so the scores of W experts come out of r FMAs and everything per expert is lane-wise.
// Tokens go through in groups of 8 so that each block of the projection rows, loaded once, serves
// 8 tokens while it is in L1. Summation orders depend on E, H, r, d and the lane width only: never
// on the batch or the thread count.
#pragma once

#include <algorithm>
#include <type_traits>

#include "../../common/half_bits.h"
#include "../../common/static_switch.h"
#include "../math/all.h"
#include "route_cpu_args.h"

namespace l2r {
namespace route {
namespace cpu {
L2R_ISA_BEGIN

using namespace ::l2r::lanes;
namespace rm = ::l2r::route::math;

constexpr int kGroup = 8;               // tokens per backward projection group
constexpr int kForwardGroup = 12;       // tokens per forward projection group
constexpr int64_t kForwardBlock = 512;  // d-block of the forward projection (floats)
constexpr int64_t kBackwardBlock = 256; // d-block of the backward projection
constexpr int kMaxRowsInRegisters = 8;  // projection rows kept in lane accumulators at once
constexpr int kForwardPrefetchBytes = 512;  // how far ahead in its row project_tile asks for x
constexpr int kScoredTogether = 2;      // tokens the forward scores side by side (score_tokens)
// The two d-blocks measured against larger ones on an AMD EPYC (Zen 4) VM: no block size beat
// the committed ones beyond noise (OLMoE d = 2048, r = 8, H = 4, norm weight; each block size
// from a temporary environment variable read per call, the sizes interleaved in one process,
// median of 15 rounds' medians; load average 0.1-0.5). Forward, no grad, fp32: T = 240 one thread
// 0.192 / 0.219 / 0.193 / 0.188 ms for 512 / 1024 / 2048 / 4096, two threads 0.117 / 0.112 ms for
// 512 / 2048; T = 8192 one thread 9.03 / 8.93 ms, two threads 5.39 / 5.25 ms (IQRs ~0.2-1 ms);
// bf16 T = 8192 two threads 4.83 / 4.67 ms. Forward + backward, fp32, backward block 256 / 512 /
// 1024 / 2048: T = 2048 one thread 10.2 / 10.0 / 10.2 / 9.1 ms (IQRs ~1 ms); T = 8192 two threads
// 18.1 / 18.0 / - / 17.5 ms (IQRs 1-2.6 ms). A standalone copy of project_tile (3 tokens x 8 rows,
// 12-token groups, no scoring) ran ~20 % faster with 2048-float blocks than with 512 (x in L2/L3),
// but that did not carry over to the kernel; separate processes per setting showed a 20 % gain at
// T = 240 that vanished once the settings were interleaved in one process. The Intel Xeon VM
// (AVX-512, 2026-12-04; the block from a temporary environment variable read per call, interleaved
// in one process, median of 15 rounds' medians of 7 calls, fp32 forward, T = 8192, load average
// ~0.4) agreed: 2 threads 3.23 / 3.22 / 3.26 ms for 128 / 256 / 512 (IQRs 0.06-0.07 ms) and
// 3.52 / 3.58 / 3.69 ms for 512 / 1024 / 2048 in a second run (IQRs 0.18-0.33); 1 thread
// 7.30 / 7.46 / 7.57 ms for 256 / 512 / 2048 (IQRs 0.5-0.9 ms).

template <typename V>
constexpr int width_of() {
  return LaneTraits<V>::width;
}

template <typename V>
L2R_HD V lane_load(const ScalarOf<V>* p) {
  return LaneIO<V>::load(p);
}

template <typename V>
L2R_HD void lane_store(ScalarOf<V>* p, V v) {
  LaneIO<V>::store(p, v);
}

// Scratch carved out of one allocation (the adapter allocates per thread).
template <typename A>
struct Arena {
  A* base;
  int64_t used = 0;
  A* take(int64_t n) {
    A* p = base + used;
    used += (n + 15) & ~int64_t(15);  // keeps every piece 64-byte aligned for float
    return p;
  }
};

// Per-token scores, experts_padded-long rows (u and ex: H rows each).
template <typename A>
struct TokenScores {
  A* u;       // [H][E_pad] <q, anchor_hat>
  A* ex;      // [H][E_pad] stage-2 exps (H > 1)
  A* lsum;    // [E_pad]
  A* logits;  // [E_pad], padded lanes -inf
  A* exps;    // [E_pad] exp(l - shift)
  A* probs;   // [E_pad], padded lanes 0
  A* keys;    // [E_pad] selection keys
};

template <typename A>
int64_t token_scores_size(int H, int E_pad) {
  // every piece is rounded up to 16 values by Arena::take
  return (2 * int64_t(H) + 5) * ((int64_t(E_pad) + 15) / 16 * 16);
}

template <typename A>
TokenScores<A> take_token_scores(Arena<A>& arena, int H, int E_pad) {
  TokenScores<A> S;
  S.u = arena.take(int64_t(H) * E_pad);
  S.ex = arena.take(int64_t(H) * E_pad);
  S.lsum = arena.take(E_pad);
  S.logits = arena.take(E_pad);
  S.exps = arena.take(E_pad);
  S.probs = arena.take(E_pad);
  S.keys = arena.take(E_pad);
  return S;
}

// ================================================================================================
// Projection: q_j = W x_j for a group of tokens, d in blocks so that a block of W stays in L1
// while every token of the group uses it. Each lane sums its positions in increasing order.
// ================================================================================================

// Vector registers of the lane type's instruction set (AVX-512: 32; AVX2 and scalar SSE: 16).
template <typename V>
constexpr int vector_registers() {
  return width_of<V>() >= 16 ? 32 : 16;
}

// Tokens per projection tile for ROWS rows: every accumulator (TT x (ROWS + 1) with the squares),
// the TT x values and one W value in registers, and a divisor of kForwardGroup (no partial tiles
// in full groups).
template <typename V, int ROWS>
constexpr int tile_tokens() {
  int fit = (vector_registers<V>() - 1) / (ROWS + 2);
  if (fit < 1) fit = 1;
  int tt = 1;
  for (int t = 1; t <= fit; ++t) {
    if (kForwardGroup % t == 0) tt = t;
  }
  return tt;
}

// Whether project_tile asks for x kForwardPrefetchBytes ahead of each load (into L1): the hardware
// prefetchers follow a row only within its current d-block, and a group's rows are read a d-block
// at a time, token after token. Measured, T = 8192 rows streamed from DRAM, OLMoE d = 2048, r = 8:
// - 16-float lanes (AVX-512) on float x, one whole line per load: this project's Intel (AVX-512/AMX)
//   VM, 1 thread, ~8 % faster; bf16 x there (half a line per load) gained nothing, and an earlier
//   AMD Zen 5 VM measured prefetching slower;
// - 8-float lanes (AVX2), float and 16-bit x: an AMD EPYC VM without AVX-512, 2 threads, the builds
//   with and without interleaved (benchmarks/results/compare_prefetch_avx2.md): forward fp32 13.60 ->
//   12.97 ms, bf16 11.85 -> 11.34 ms (0.94-0.96x in two runs, within IQRs of ~1.4 ms); forward +
//   backward 0.97-1.16x, inside its 4-7 ms IQRs. Distances of 512 B to 4 KiB measured alike;
// - 16-float lanes on float x, an AMD EPYC (Zen 4) VM: distances of 0 (the line being loaded: no
//   prefetch ahead), 512, 1024 and 2048 B alike (T = 8192: 1 thread 11.7-12.2 ms, 2 threads
//   5.9-6.4 ms; T = 240: 0.23-0.26 ms; median of 3 processes each, alternated, the distance from a
//   temporary environment variable read once per tile, not committed).
template <typename V, typename X>
constexpr bool prefetches_x() {
  return width_of<V>() * sizeof(X) == 64 || width_of<V>() == 8;
}

// One d-block [b0, b1) for a tile of TT tokens and ROWS rows, every accumulator in a register: a
// W load serves TT tokens and an x load ROWS rows, so the loop is bound by the FMA ports rather
// than by loads. acc: [TT][ROWS + 1] (the last: sum of squares, when SQUARES).
template <int TT, int ROWS, bool SQUARES, typename V, typename X>
inline void project_tile(const X* const* xs, const ScalarOf<V>* W, int64_t w_stride, int64_t b0, int64_t b1,
                         V* acc) {
  constexpr int kW = width_of<V>();
  V a[TT][ROWS];
  V sq[TT];
#pragma GCC unroll 16
  for (int t = 0; t < TT; ++t) {
#pragma GCC unroll 16
    for (int j = 0; j < ROWS; ++j) a[t][j] = acc[t * (ROWS + 1) + j];
    sq[t] = acc[t * (ROWS + 1) + ROWS];
  }
  for (int64_t i = b0; i < b1; i += kW) {
    V xv[TT];
#pragma GCC unroll 16
    for (int t = 0; t < TT; ++t) {
      if constexpr (prefetches_x<V, X>()) {
        __builtin_prefetch(reinterpret_cast<const char*>(xs[t] + i) + kForwardPrefetchBytes, 0, 3);
      }
      xv[t] = LaneIO<V>::load(xs[t] + i);
      if constexpr (SQUARES) sq[t] = fmadd(xv[t], xv[t], sq[t]);
    }
#pragma GCC unroll 16
    for (int j = 0; j < ROWS; ++j) {
      V w = lane_load<V>(W + j * w_stride + i);
      pin_register(w);  // one load for the TT tokens, not one folded into each FMA
#pragma GCC unroll 16
      for (int t = 0; t < TT; ++t) a[t][j] = fmadd(xv[t], w, a[t][j]);
    }
  }
#pragma GCC unroll 16
  for (int t = 0; t < TT; ++t) {
#pragma GCC unroll 16
    for (int j = 0; j < ROWS; ++j) acc[t * (ROWS + 1) + j] = a[t][j];
    acc[t * (ROWS + 1) + ROWS] = sq[t];
  }
}

// q[j][0, ROWS) = <W rows, x_j>, squares[j] = <x_j, x_j> when squares is not null, for the
// count <= kForwardGroup tokens xs. acc: [kForwardGroup][ROWS + 1] lanes. Tokens past the last
// full tile go through one-token tiles (a decode call projects its token once, not TT times);
// every token's sums come out the same in either tile.
template <int ROWS, typename V, typename X>
inline void project_group_rows(const X* const* xs, int count, const ScalarOf<V>* W, int64_t w_stride,
                               int64_t d, int q_stride, ScalarOf<V>* q, ScalarOf<V>* squares, V* acc) {
  using A = ScalarOf<V>;
  constexpr int kW = width_of<V>();
  constexpr int TT = tile_tokens<V, ROWS>();
  const int64_t dv = d / kW * kW;
  const int in_full_tiles = count / TT * TT;
  for (int j = 0; j < count * (ROWS + 1); ++j) acc[j] = V(A(0));
  for (int64_t b0 = 0; b0 < dv; b0 += kForwardBlock) {
    const int64_t b1 = b0 + kForwardBlock < dv ? b0 + kForwardBlock : dv;
    for (int t0 = 0; t0 < in_full_tiles; t0 += TT) {
      if (squares) {
        project_tile<TT, ROWS, true, V, X>(xs + t0, W, w_stride, b0, b1, acc + t0 * (ROWS + 1));
      } else {
        project_tile<TT, ROWS, false, V, X>(xs + t0, W, w_stride, b0, b1, acc + t0 * (ROWS + 1));
      }
    }
    for (int t0 = in_full_tiles; t0 < count; ++t0) {
      if (squares) {
        project_tile<1, ROWS, true, V, X>(xs + t0, W, w_stride, b0, b1, acc + t0 * (ROWS + 1));
      } else {
        project_tile<1, ROWS, false, V, X>(xs + t0, W, w_stride, b0, b1, acc + t0 * (ROWS + 1));
      }
    }
  }
  for (int j = 0; j < count; ++j) {
    const X* x = xs[j];
    for (int r = 0; r < ROWS; ++r) {
      A s = hsum(acc[j * (ROWS + 1) + r]);
      for (int64_t i = dv; i < d; ++i) s = fmadd(W[r * w_stride + i], LaneIO<A>::load(x + i), s);
      q[j * q_stride + r] = s;
    }
    if (squares) {
      A s = hsum(acc[j * (ROWS + 1) + ROWS]);
      for (int64_t i = dv; i < d; ++i) {
        const A xi = LaneIO<A>::load(x + i);
        s = fmadd(xi, xi, s);
      }
      squares[j] = s;
    }
  }
}

// All rows, kMaxRowsInRegisters at a time (the first pass also sums the squares). x streams in with
// the hardware prefetchers following the group's rows, helped by project_tile's own prefetch where
// that measured faster (prefetches_x).
template <typename V, typename X>
inline void project_group(const X* const* xs, int count, const ScalarOf<V>* W, int64_t w_stride,
                          int64_t d, int rank, ScalarOf<V>* q, ScalarOf<V>* squares, V* acc) {
  for (int r0 = 0; r0 < rank; r0 += kMaxRowsInRegisters) {
    const ScalarOf<V>* Wg = W + int64_t(r0) * w_stride;
    ScalarOf<V>* qg = q + r0;
    ScalarOf<V>* sq = r0 == 0 ? squares : nullptr;
    const int rows = rank - r0 < kMaxRowsInRegisters ? rank - r0 : kMaxRowsInRegisters;
#define L2R_PROJECT_ROWS(N)                                                                      \
  case N:                                                                                        \
    project_group_rows<N, V, X>(xs, count, Wg, w_stride, d, rank, qg, sq, acc); \
    break;
    switch (rows) {
      L2R_PROJECT_ROWS(1)
      L2R_PROJECT_ROWS(2)
      L2R_PROJECT_ROWS(3)
      L2R_PROJECT_ROWS(4)
      L2R_PROJECT_ROWS(5)
      L2R_PROJECT_ROWS(6)
      L2R_PROJECT_ROWS(7)
      default: L2R_PROJECT_ROWS(8)
    }
#undef L2R_PROJECT_ROWS
  }
}

// Whether a row holds an infinite or NaN value (the rows whose mean square overflowed,
// math::rms_overflowed, need to know).
template <typename A, typename X>
inline bool row_has_non_finite(const X* x, int64_t d) {
  for (int64_t i = 0; i < d; ++i) {
    if (!(vabs(LaneIO<A>::load(x + i)) < A(poly::kInf))) return true;
  }
  return false;
}

// ================================================================================================
// Scores of one token: u, the experts' logits (anchor log-sum-exp), softmax statistics, p.
// ================================================================================================

// What score_tokens runs between its steps (once per block of anchor dots and per block of experts'
// logits): nothing, or the forward's prefetches of the next group's x (XPrefetch).
struct NoStep {
  void operator()() const {}
};

// Prefetches of the next group's rows of x into L2, a few per call between the scoring passes of
// the current group, so that its projection reads x from L2 instead of waiting on memory: the whole
// rows, every 64-byte line, row after row a line at a time (the rows' first lines come first).
// Measured:
// - first d-block only, one prefetch per 128 bytes (an L2 that fetches a line's 128-byte pair with
//   it), the hardware prefetchers left to keep ahead past it: this project's Intel AVX-512 VM,
//   1 thread, T = 8192 rows from DRAM, CPU time per token, interleaved: fp32 x 763 -> 699 ns, bf16
//   665 -> 638 ns; the whole rows at one prefetch per 128 bytes gained no more there (717 -> 660 ns);
// - an AMD EPYC (Zen 4) VM: the first block only at 128 bytes changed nothing against no prefetch
//   (1 thread, fp32 ~12.6 ms per call), the whole rows at 128 bytes nothing either, the whole rows
//   at every 64-byte line 12.6 -> 9.7 ms (1 thread) and, 2 threads, fp32 6.42 -> 5.54 ms, bf16
//   5.31 -> 4.92 ms (median of 5 processes' medians each, alternated; no-grad route() on OLMoE's
//   shape, r = 8, H = 4, T = 8192). Every line has to be asked for there (as if its L2 did not
//   fetch a line's pair; that was not measured by itself), and the scoring of a group (~0.5 us per
//   token) is long enough to bring in the next group's 12 rows (96 KiB of fp32 x at d = 2048).
//   Also measured there, no better beyond noise (median of 3 processes each, alternated; fp32 1
//   thread 11.0-11.5 ms, 2 threads 5.7-6.1 ms, bf16 2 threads 5.0-5.4 ms for every variant): the
//   group 2 or 3 groups ahead instead of the next one; the prefetches spread over the projection's
//   tiles as well as the scoring; x on 2 MiB pages (madvise before first touch: 1 thread 9.8-10.3 ms
//   against 9.3-11.0 ms on 4 KiB pages). What x streamed from DRAM still costs there is small next to
//   the compute: `python -m benchmarks.dram_penalty` (ops interleaved in one process, T = 240
//   cached against T = 8192 streamed, ns per token, fp32): route 948 -> 1184 (1 thread, 1.25x),
//   608 -> 693 (2 threads, 1.14x), where PyTorch's own GEMM x @ W^T (W [64, 2048]) goes 3408 ->
//   5132 (1.51x) and 2036 -> 2825 (1.39x): the forward is bound by its arithmetic on this VM.
//   Interleaved in one process (variants from a temporary environment variable read per call,
//   median of 15 rounds' medians, 2 threads, fp32, T = 8192, load average 0.1) the differences
//   are smaller than those between processes: committed 5.74 ms, no XPrefetch 5.97 ms, the first
//   group of each chunk also prefetched (from the previous chunk's last group) 5.69 ms; in a second
//   run (IQRs ~0.3-1 ms) committed 5.45, prefetcht0 instead of prefetcht1 5.89, two groups ahead
//   5.81, all of a group's prefetches at once 6.03, across chunks 5.60 ms.
// - an Intel Xeon VM (family 6 model 167, AVX-512 with AVX512_BF16; 2026-12-04): slower with the
//   prefetches, interleaved in one process (median of 15 rounds' medians, T = 8192, load average
//   below 1.1): 2 threads fp32 3.17 ms without against 3.55 ms with, bf16 2.87 against 3.10 ms,
//   1 thread fp32 6.75 against 7.04 ms. Its own prefetchers keep up with the rows there. Lighter
//   variants did not help either (same setup, 2 threads fp32, load average 0.4-0.5): none 3.31 ms,
//   every line 3.82, only the first 1 / 2 / 4 / 32 lines of each row 3.38 / 3.36 / 3.30 / 3.29,
//   the first 2 KiB at one per 128 bytes 3.27, 2 lines into L1 3.38 (IQRs 0.05-0.14 ms).
//   Nor did scoring the previous group between the projection tiles of the next (so that the
//   scoring runs while the rows stream in; results bitwise the same): 2 threads fp32 3.26 ms
//   against 3.27 / 3.32 ms for a pair of tokens scored every 1 / 3 tiles (31 rounds, IQRs 0.05-
//   0.06 ms); 1 thread 6.72 against 6.71 / 6.80 (IQRs 0.25-0.3 ms); bf16 2 threads 2.94 against
//   2.96 / 3.02 (load average 0.5-0.66; an earlier run at 1.4-1.9 agreed). With x cached (T = 240) a call
//   costs ~720 ns per token on one thread, streamed ~1000: at 2 threads the forward is mostly
//   arithmetic here, the scoring (score_tokens + finish_token) ~35 % of it (perf, r = 8, H = 4).
// So the forward prefetches only on AMD processors (ForwardArgs::prefetch_next_x, set by
// route_cpu.cpp; L2R_CPU_X_PREFETCH=0/1 overrides). With x cached (T = 240, 1.9 MB) the prefetches
// cost ~5 % (perf samples), so only an x of kPrefetchedXBytes or more is prefetched.
constexpr int64_t kPrefetchedXBytes = int64_t(16) << 20;

struct XPrefetch {
  static constexpr int64_t kStride = 64;  // one prefetch per cache line
  const char* rows[kForwardGroup];
  int count = 0, row = 0;
  int64_t point = 0, points = 0;  // prefetches per row
  int per_call = 0;

  template <typename X>
  void start(const X* const* xs, int n, int64_t d, int calls) {
    count = n;
    row = 0;
    point = 0;
    const int64_t bytes = d * int64_t(sizeof(X));
    points = n > 0 ? (bytes + kStride - 1) / kStride : 0;
    for (int j = 0; j < n; ++j) rows[j] = reinterpret_cast<const char*>(xs[j]);
    per_call = calls > 0 ? static_cast<int>((points * n + calls - 1) / calls) : 0;
  }
  // Point i of every row, then point i + 1: the rows' first lines come first.
  void operator()() {
    for (int k = 0; k < per_call && point < points; ++k) {
      __builtin_prefetch(rows[row] + point * kStride, 0, 2);
      if (++row == count) {
        row = 0;
        ++point;
      }
    }
  }
};

// Softmax statistics over the experts of N tokens, exp(l - shift) and p, from S[n].logits. The N
// tokens go through each pass side by side: one token's passes are a chain of dependent
// reductions (max, then exps and their sum, then p), too long for the out-of-order window to
// overlap with the next token's, so N independent chains keep the vector units busy.
template <typename V, int N>
inline void token_probs(int E8, bool sigmoid, const TokenScores<ScalarOf<V>>* S, rm::SoftmaxStats<ScalarOf<V>>* st) {
  using A = ScalarOf<V>;
  constexpr int kW = width_of<V>();
  V lmax[N];
  Mask<V> lnan[N];
#pragma GCC unroll 4
  for (int n = 0; n < N; ++n) {
    lmax[n] = V(-poly::kInf);
    lnan[n] = is_nan(V(A(0)));
  }
  for (int b = 0; b < E8; b += kW) {
#pragma GCC unroll 4
    for (int n = 0; n < N; ++n) {
      const V l = lane_load<V>(S[n].logits + b);
      lnan[n] = mask_or(lnan[n], is_nan(l));
      lmax[n] = vmax(l, lmax[n]);
    }
  }
  V shift[N], vsum[N];
#pragma GCC unroll 4
  for (int n = 0; n < N; ++n) {
    st[n].max = any_of(lnan[n]) ? A(from_bits(int32_t(0x7fc00000))) : hmax(lmax[n]);
    shift[n] = V(rm::softmax_shift(st[n].max));
    vsum[n] = V(A(0));
  }
  for (int b = 0; b < E8; b += kW) {
#pragma GCC unroll 4
    for (int n = 0; n < N; ++n) {
      const V e = rm::logit_exp(lane_load<V>(S[n].logits + b), shift[n]);
      lane_store(S[n].exps + b, e);
      vsum[n] = vsum[n] + e;
    }
  }
  V sum[N];
#pragma GCC unroll 4
  for (int n = 0; n < N; ++n) {
    st[n].sum = hsum(vsum[n]);
    sum[n] = V(st[n].sum);
  }
  for (int b = 0; b < E8; b += kW) {
#pragma GCC unroll 4
    for (int n = 0; n < N; ++n) {
      lane_store(S[n].probs + b, rm::routing_prob(lane_load<V>(S[n].logits + b), lane_load<V>(S[n].exps + b),
                                                  sum[n], sigmoid));
    }
  }
}

template <typename V>
inline rm::SoftmaxStats<ScalarOf<V>> token_probs(int E8, bool sigmoid, const TokenScores<ScalarOf<V>>& S) {
  rm::SoftmaxStats<ScalarOf<V>> st;
  token_probs<V, 1>(E8, sigmoid, &S, &st);
  return st;
}

// The scores of N tokens (q[n], q_scale[n]) into S[n], side by side pass by pass (as token_probs):
// each token's values are computed exactly as alone.
template <typename V, int N, typename Step = NoStep>
inline void score_tokens(const ScalarOf<V>* const* q, const Prepared<ScalarOf<V>>& P, const ScalarOf<V>* q_scale,
                         ScalarOf<V> tau, bool sigmoid, const TokenScores<ScalarOf<V>>* S,
                         rm::SoftmaxStats<ScalarOf<V>>* st, Step&& step = {}) {
  using A = ScalarOf<V>;
  constexpr int kW = width_of<V>();
  const int R = P.rank, H = P.anchors, E = P.experts, E8 = P.experts_padded;
  const V vtau(tau), ninf(-poly::kInf);
  V vq_scale[N], vsot[N];
#pragma GCC unroll 4
  for (int n = 0; n < N; ++n) {
    vq_scale[n] = V(q_scale[n]);
    vsot[n] = V(q_scale[n] / tau);
  }
  // u of every (anchor, expert) lane of the [H][E_pad] rows, kDots lane values at a time.
  constexpr int kDots = 8;
  const int64_t n_u = int64_t(H) * E8;
  for (int64_t c0 = 0; c0 < n_u; c0 += kDots * kW) {
    const A* at = P.anchors_t + c0;
    const auto a_hat = [&](int i, int v) { return lane_load<V>(at + i * n_u + v * kW); };
    const int count = c0 + kDots * kW <= n_u ? kDots : static_cast<int>((n_u - c0) / kW);
    step();
#pragma GCC unroll 4
    for (int n = 0; n < N; ++n) {
      V u[kDots];
      if (count == kDots) {
        rm::anchor_dots<V, kDots>(q[n], R, kDots, a_hat, u);
        for (int v = 0; v < kDots; ++v) lane_store(S[n].u + c0 + v * kW, u[v]);
      } else {
        rm::anchor_dots<V, kDots>(q[n], R, count, a_hat, u);
        for (int v = 0; v < count; ++v) lane_store(S[n].u + c0 + v * kW, u[v]);
      }
    }
  }
  for (int b = 0; b < E8; b += kW) {
    step();
#pragma GCC unroll 4
    for (int n = 0; n < N; ++n) {
      const TokenScores<A>& Sn = S[n];
      const rm::ExpertLogit<V> el = rm::expert_logit<V>(
          H, vq_scale[n], vsot[n], vtau, [&](int h) { return lane_load<V>(Sn.u + int64_t(h) * E8 + b); },
          [&](int h, V ex) { lane_store(Sn.ex + int64_t(h) * E8 + b, ex); });
      V logit = el.logit;
      if (b + kW > E) logit = blend_from_lane(logit, ninf, E - b);  // padded experts: never chosen
      lane_store(Sn.logits + b, logit);
      lane_store(Sn.lsum + b, el.lsum);
    }
  }
  token_probs<V, N>(E8, sigmoid, S, st);
}

template <typename V>
inline rm::SoftmaxStats<ScalarOf<V>> score_token(const ScalarOf<V>* q, const Prepared<ScalarOf<V>>& P,
                                                 ScalarOf<V> q_scale, ScalarOf<V> tau, bool sigmoid,
                                                 const TokenScores<ScalarOf<V>>& S) {
  rm::SoftmaxStats<ScalarOf<V>> st;
  score_tokens<V, 1>(&q, P, &q_scale, tau, sigmoid, &S, &st);
  return st;
}

// From given logits (route_select): the same statistics and probabilities.
template <typename V>
inline rm::SoftmaxStats<ScalarOf<V>> score_from_logits(const ScalarOf<V>* logits, int E, int E8,
                                                       bool sigmoid, const TokenScores<ScalarOf<V>>& S) {
  for (int e = 0; e < E; ++e) S.logits[e] = logits[e];
  for (int e = E; e < E8; ++e) S.logits[e] = -poly::kInf;
  return token_probs<V>(E8, sigmoid, S);
}

template <typename V>
inline ScalarOf<V> lane_total(const ScalarOf<V>* v, int E8) {
  constexpr int kW = width_of<V>();
  V s(ScalarOf<V>(0));
  for (int b = 0; b < E8; b += kW) s = s + lane_load<V>(v + b);
  return hsum(s);
}

// ================================================================================================
// Selection
// ================================================================================================

// Top-k of keys[0, E) (every expert a candidate). Experts come in index order, so once the list is
// full a key can only enter by ranking before the last entry: lane blocks where none does are
// skipped with one compare.
template <typename V>
inline void select_top_k(const ScalarOf<V>* keys, int E, int k,
                         typename OrderKeyOf<ScalarOf<V>>::type* top, int64_t* out) {
  using A = ScalarOf<V>;
  constexpr int kW = width_of<V>();
  int count = 0, e = 0;
  for (; e < E && e < k; ++e) count = rm::top_k_insert(top, count, k, order_key(keys[e], uint32_t(e)));
  for (; e + kW <= E; e += kW) {
    const A threshold = OrderKeyOf<A>::value(top[k - 1]);
    const V kv = lane_load<V>(keys + e);
    // A number enters past a NaN; past a number only a larger key does.
    const auto enter = threshold != threshold ? mask_not(is_nan(kv)) : gt(kv, V(threshold));
    int bits = mask_bits(enter);
    while (bits) {
      const int lane = __builtin_ctz(static_cast<unsigned>(bits));
      bits &= bits - 1;
      count = rm::top_k_insert(top, count, k, order_key(keys[e + lane], uint32_t(e + lane)));
    }
  }
  for (; e < E; ++e) count = rm::top_k_insert(top, count, k, order_key(keys[e], uint32_t(e)));
  for (int j = 0; j < k; ++j) out[j] = order_key_index(top[j]);
}

// A lane type's branch-free top-k search for k <= max_k, where it has one
// (route_cpu_top_k_avx512.h specializes this for AVX-512); else select_top_k. Both choose the same
// experts in the same order.
template <typename V>
struct TopKNetwork {
  static constexpr int max_k = 0;
  static void select(const ScalarOf<V>*, int, int, int, int64_t*) {}
};

// Group-limited top-k: the best groups by group score, then top-k over their experts only.
template <typename A>
inline void select_top_k_grouped(const A* keys, int E, int k, const Options<A>& opt,
                                 typename OrderKeyOf<A>::type* top, A* group_scores, int64_t* out) {
  using K = typename OrderKeyOf<A>::type;
  const int G = opt.num_groups, per = E / G;
  for (int g = 0; g < G; ++g) {
    rm::BestTwo<K> best;
    for (int e = g * per; e < (g + 1) * per; ++e) best.offer(order_key(keys[e], uint32_t(e)));
    group_scores[g] = rm::group_score(OrderKeyOf<A>::value(best.best), OrderKeyOf<A>::value(best.second),
                                      opt.group_score);
  }
  const uint64_t kept = rm::kept_groups(group_scores, G, opt.topk_groups);
  int count = 0;
  for (int e = 0; e < E; ++e) {
    if (rm::in_kept_group(e, kept, E, G)) count = rm::top_k_insert(top, count, k, order_key(keys[e], uint32_t(e)));
  }
  for (int j = 0; j < k; ++j) out[j] = order_key_index(top[j]);
}

// ================================================================================================
// Forward
// ================================================================================================

template <typename V>
int64_t forward_scratch_size(const ForwardArgs<ScalarOf<V>>& a) {
  const int E8 = a.params ? a.params->experts_padded : a.shape.experts;
  const int H = a.params ? a.params->anchors : 1;
  return kScoredTogether * token_scores_size<ScalarOf<V>>(H, E8) +
         int64_t(kForwardGroup) * (kMaxRowsInRegisters + 1) * width_of<V>() + 4 * int64_t(a.shape.top_k) +
         rm::kMaxGroups + int64_t(kForwardGroup) * a.shape.rank + 256;
}

// The routing of one token from its probabilities: statistics partials, selection, weights.
template <typename V>
inline void finish_token(const ForwardArgs<ScalarOf<V>>& a, int64_t t, int E8,
                         const TokenScores<ScalarOf<V>>& S, ScalarOf<V>* prob_sum, int64_t* counts,
                         typename OrderKeyOf<ScalarOf<V>>::type* top, ScalarOf<V>* group_scores,
                         int64_t* chosen) {
  using A = ScalarOf<V>;
  constexpr int kW = width_of<V>();
  const int E = a.shape.experts, k = a.shape.top_k;
  const bool counted = a.padding == nullptr || !a.padding[t];
  if (counted) {
    const V total(a.opt.sigmoid ? lane_total<V>(S.probs, E8) : A(1));
    for (int b = 0; b < E8; b += kW) {
      const V p = rm::balance_prob(lane_load<V>(S.probs + b), total, a.opt.sigmoid);
      lane_store(prob_sum + b, lane_load<V>(prob_sum + b) + p);
    }
  }
  for (int b = 0; b < E8; b += kW) {
    const V p = lane_load<V>(S.probs + b);
    lane_store(S.keys + b, a.bias ? rm::selection_key(p, lane_load<V>(a.bias + b)) : p);
  }
  if (a.opt.num_groups > 1) {
    select_top_k_grouped(S.keys, E, k, a.opt, top, group_scores, chosen);
  } else if (k <= TopKNetwork<V>::max_k) {
    TopKNetwork<V>::select(S.keys, E, E8, k, chosen);
  } else {
    select_top_k<V>(S.keys, E, k, top, chosen);
  }
  A selected_sum = A(0);
  if (a.opt.normalize) {
    for (int j = 0; j < k; ++j) selected_sum += S.probs[chosen[j]];
  }
  for (int j = 0; j < k; ++j) {
    a.weights[t * k + j] = rm::selected_weight(S.probs[chosen[j]], selected_sum, a.opt.normalize, a.opt.scaling);
    a.indices[t * k + j] = chosen[j];
    if (counted) counts[chosen[j]] += 1;
  }
}

template <typename V, typename X>
void forward_chunks_typed(const ForwardArgs<ScalarOf<V>>& a, int64_t c_begin, int64_t c_end,
                          ScalarOf<V>* scratch) {
  using A = ScalarOf<V>;
  using K = typename OrderKeyOf<A>::type;
  const Prepared<A>* P = a.params;
  const int E = a.shape.experts, R = a.shape.rank;
  const int E8 = P ? P->experts_padded : E;
  const int H = P ? P->anchors : 1;
  const int64_t d = a.shape.d;
  Arena<A> arena{scratch};
  TokenScores<A> S[kScoredTogether];
  for (TokenScores<A>& Sn : S) Sn = take_token_scores<A>(arena, H, E8);
  V* acc = reinterpret_cast<V*>(
      arena.take(int64_t(kForwardGroup) * (kMaxRowsInRegisters + 1) * width_of<V>()));
  K* top = reinterpret_cast<K*>(arena.take(4 * int64_t(a.shape.top_k)));
  A* group_scores = arena.take(rm::kMaxGroups);
  int64_t* chosen = reinterpret_cast<int64_t*>(arena.take(2 * int64_t(a.shape.top_k)));
  A* group_q = arena.take(int64_t(kForwardGroup) * R);
  const X* x = static_cast<const X*>(a.x);
  // XPrefetch calls per scored token pair (score_tokens: blocks of anchor dots, then the blocks of
  // experts).
  constexpr int64_t kDotValues = 8 * width_of<V>();
  const int steps_per_pair = P ? static_cast<int>((int64_t(H) * E8 + kDotValues - 1) / kDotValues) + E8 / width_of<V>() : 0;
  XPrefetch prefetch;
  const bool prefetches = a.prefetch_next_x && a.shape.tokens * d * int64_t(sizeof(X)) >= kPrefetchedXBytes;

  for (int64_t c = c_begin; c < c_end; ++c) {
    const int64_t t_begin = a.chunks.begin(c), t_end = a.chunks.end(c);
    A* prob_sum = a.prob_partials ? a.prob_partials + c * E8 : nullptr;
    int64_t* counts = a.count_partials ? a.count_partials + c * E8 : nullptr;
    for (int64_t g0 = t_begin; g0 < t_end; g0 += kForwardGroup) {
      const int count = static_cast<int>(t_end - g0 < kForwardGroup ? t_end - g0 : kForwardGroup);
      A squares[kForwardGroup];
      if (a.logits_in == nullptr) {
        const X* xs[kForwardGroup];
        for (int j = 0; j < count; ++j) xs[j] = x + (g0 + j) * d;
        project_group<V, X>(xs, count, P->proj_w, P->proj_stride, d, R, group_q,
                            a.opt.use_norm ? squares : nullptr, acc);
        const int64_t n0 = g0 + kForwardGroup;
        const int next = !prefetches ? 0
                         : static_cast<int>(t_end - n0 < kForwardGroup ? (t_end > n0 ? t_end - n0 : 0) : kForwardGroup);
        const X* next_xs[kForwardGroup];
        for (int j = 0; j < next; ++j) next_xs[j] = x + (n0 + j) * d;
        prefetch.start(next_xs, next, d, steps_per_pair * ((count + kScoredTogether - 1) / kScoredTogether));
      }
      if (a.logits_in != nullptr) {  // route_select: from the given logits
        for (int j = 0; j < count; ++j) {
          const int64_t t = g0 + j;
          const rm::SoftmaxStats<A> st = score_from_logits<V>(a.logits_in + t * E, E, E8, a.opt.sigmoid, S[0]);
          if (!a.select) continue;
          a.lse[t] = rm::stats_lse(st);
          finish_token<V>(a, t, E8, S[0], prob_sum, counts, top, group_scores, chosen);
        }
        continue;
      }
      for (int j0 = 0; j0 < count; j0 += kScoredTogether) {
        const int n_tokens = count - j0 < kScoredTogether ? count - j0 : kScoredTogether;
        const A* qs[kScoredTogether];
        A q_scale[kScoredTogether];
        for (int n = 0; n < n_tokens; ++n) {
          const int j = j0 + n;
          const int64_t t = g0 + j;
          A* q = a.q ? a.q + t * R : group_q + j * R;
          const A* qg = group_q + j * R;
          A rstd = A(1);
          if (a.opt.use_norm) {
            rstd = rm::rms_inv_scale(squares[j], d, a.opt.eps_norm);
            if (rm::rms_overflowed(rstd)) {
              const A v = rm::overflowed_row_projection<A>(row_has_non_finite<A>(x + t * d, d));
              for (int i = 0; i < R; ++i) q[i] = v;
            } else {
              for (int i = 0; i < R; ++i) q[i] = qg[i] * rstd;
            }
          } else if (q != qg) {
            for (int i = 0; i < R; ++i) q[i] = qg[i];
          }
          if (a.rstd) a.rstd[t] = rstd;
          qs[n] = q;
          q_scale[n] = P->scale * rm::query_coef(q, R, a.opt.beta, a.opt.eps).coef;
        }
        rm::SoftmaxStats<A> st[kScoredTogether];
        const auto score = [&](auto&& step) {
          if (n_tokens == kScoredTogether) {
            score_tokens<V, kScoredTogether>(qs, *P, q_scale, a.opt.tau, a.opt.sigmoid, S, st, step);
          } else {
            for (int n = 0; n < n_tokens; ++n) {
              score_tokens<V, 1>(qs + n, *P, q_scale + n, a.opt.tau, a.opt.sigmoid, S + n, st + n, step);
            }
          }
        };
        if (prefetches) {  // the scoring without prefetches (x cached) stays as it was
          score(prefetch);
        } else {
          score(NoStep{});
        }
        for (int n = 0; n < n_tokens; ++n) {  // in token order: the statistics sums keep theirs
          const int64_t t = g0 + j0 + n;
          if (a.logits_out) {
            for (int e = 0; e < E; ++e) a.logits_out[t * E + e] = S[n].logits[e];
          }
          if (!a.select) continue;
          a.lse[t] = rm::stats_lse(st[n]);
          finish_token<V>(a, t, E8, S[n], prob_sum, counts, top, group_scores, chosen);
        }
      }
    }
  }
}

template <typename V>
void forward_chunks(const ForwardArgs<ScalarOf<V>>& a, int64_t c_begin, int64_t c_end,
                    ScalarOf<V>* scratch) {
  if constexpr (std::is_same_v<ScalarOf<V>, double>) {
    forward_chunks_typed<V, double>(a, c_begin, c_end, scratch);
  } else {
    // float64 x goes to the double kernels (the adapter dispatches it there)
    L2R_HOST_FLOAT_DTYPE_SWITCH(a.x_type, X, __builtin_trap(), { forward_chunks_typed<V, X>(a, c_begin, c_end, scratch); });
  }
}

// ================================================================================================
// Backward
// ================================================================================================

template <typename V>
int64_t backward_scratch_size(const BackwardArgs<ScalarOf<V>>& a) {
  const int E8 = a.params ? a.params->experts_padded : a.shape.experts;
  const int H = a.params ? a.params->anchors : 1;
  const int64_t R = a.shape.rank, W = width_of<V>();
  return kScoredTogether * token_scores_size<ScalarOf<V>>(H, E8) + 2 * int64_t(E8) + R * W + 4 * R +
         2 * int64_t(kGroup) * R + int64_t(kGroup) * kBackwardBlock + int64_t(kGroup) * (a.shape.d + 16) + 256;
}

// dL/dp of one token: through mean_probs (balancing probabilities) and the selected weights.
template <typename V>
inline bool token_prob_grads(const BackwardArgs<ScalarOf<V>>& a, int64_t t, int E8,
                             const TokenScores<ScalarOf<V>>& S, ScalarOf<V>* grad_probs) {
  using A = ScalarOf<V>;
  constexpr int kW = width_of<V>();
  const int E = a.shape.experts, k = a.shape.top_k;
  const bool counted = a.padding == nullptr || !a.padding[t];
  if (a.grad_mean_probs && counted) {
    const int64_t seq = a.shape.seq_len > 0 ? t / a.shape.seq_len : 0;
    const A* g = a.grad_mean_probs + seq * E8;
    const bool sigmoid = a.opt.sigmoid;
    A total = A(1), g_dot_balance = A(0);
    if (sigmoid) {
      total = lane_total<V>(S.probs, E8);
      V dot(A(0));
      for (int b = 0; b < E8; b += kW) {
        dot = fmadd(lane_load<V>(g + b), rm::balance_prob(lane_load<V>(S.probs + b), V(total), true), dot);
      }
      g_dot_balance = hsum(dot);
    }
    for (int b = 0; b < E8; b += kW) {
      lane_store(grad_probs + b, rm::balance_prob_grad(lane_load<V>(g + b), V(g_dot_balance), V(total), sigmoid));
    }
  } else {
    for (int b = 0; b < E8; b += kW) lane_store(grad_probs + b, V(A(0)));
  }
  if (a.grad_weights == nullptr) return true;
  const A* gw = a.grad_weights + t * k;
  const int64_t* idx = a.indices + t * k;
  for (int j = 0; j < k; ++j) {
    if (!rm::valid_expert(idx[j], E)) return false;
  }
  A selected_sum = A(0), grad_dot_weights = A(0);
  if (a.opt.normalize) {
    for (int j = 0; j < k; ++j) selected_sum += S.probs[idx[j]];
    for (int j = 0; j < k; ++j) {
      grad_dot_weights += rm::weight_dot_term(rm::scaled_weight_grad(gw[j], a.opt.scaling), S.probs[idx[j]], selected_sum);
    }
  }
  for (int j = 0; j < k; ++j) {
    grad_probs[idx[j]] += rm::selected_prob_grad(rm::scaled_weight_grad(gw[j], a.opt.scaling), grad_dot_weights,
                                                 selected_sum, a.opt.normalize);
  }
  return true;
}

// dL/dl per expert into dl.
template <typename V>
inline void token_logit_grads(const BackwardArgs<ScalarOf<V>>& a, int64_t t, int E8,
                              const rm::SoftmaxStats<ScalarOf<V>>& st, const TokenScores<ScalarOf<V>>& S,
                              const ScalarOf<V>* grad_probs, ScalarOf<V>* dl) {
  using A = ScalarOf<V>;
  constexpr int kW = width_of<V>();
  const bool sigmoid = a.opt.sigmoid;
  A p_dot_dp = A(0);
  if (!sigmoid) {
    V acc(A(0));
    for (int b = 0; b < E8; b += kW) acc = fmadd(lane_load<V>(S.probs + b), lane_load<V>(grad_probs + b), acc);
    p_dot_dp = hsum(acc);
  }
  const V g_lse(a.grad_lse ? a.grad_lse[t] : A(0)), vpd(p_dot_dp), sum(st.sum);
  for (int b = 0; b < E8; b += kW) {
    const V p = lane_load<V>(S.probs + b);
    const V softmax_p = sigmoid ? rm::softmax_of(lane_load<V>(S.exps + b), sum) : p;
    lane_store(dl + b, rm::logit_grad(p, lane_load<V>(grad_probs + b), vpd, softmax_p, g_lse, sigmoid));
  }
}

// Back through the anchors' log-sum-exp and SIPS for one token: anchor accumulators
// acc[r][H][E_pad] += ds * q_scale * q (skipped when acc is null), ds_anchor_hat[r] =
// sum ds * anchor_hat; returns sum ds * u. RMAX > 0: rank <= RMAX, the ds_anchor_hat lanes in
// registers (each a chain of FMAs in the same order as through memory, where every step waited on
// the previous one's store); RMAX = 0: any rank, the lanes in `lanes`.
template <int RMAX, typename V>
inline ScalarOf<V> scores_backward_ranked(const ScalarOf<V>* q, const Prepared<ScalarOf<V>>& P,
                                          ScalarOf<V> q_scale, const TokenScores<ScalarOf<V>>& S,
                                          const ScalarOf<V>* dl, ScalarOf<V>* acc, ScalarOf<V>* ds_anchor_hat,
                                          ScalarOf<V>* lanes /* [r][W] */) {
  using A = ScalarOf<V>;
  constexpr int kW = width_of<V>();
  const int R = P.rank, H = P.anchors, E8 = P.experts_padded;
  const int64_t row = int64_t(H) * E8;
  V dsu(A(0));
  V reg[RMAX > 0 ? RMAX : 1];
  if constexpr (RMAX > 0) {
#pragma GCC unroll 16
    for (int i = 0; i < RMAX; ++i) reg[i] = V(A(0));
  } else {
    for (int i = 0; i < R; ++i) lane_store(lanes + i * kW, V(A(0)));
  }
  const V vq_scale(q_scale);
  for (int b = 0; b < E8; b += kW) {
    const V dlv = lane_load<V>(dl + b);
    const V lsum = lane_load<V>(S.lsum + b);
    for (int h = 0; h < H; ++h) {
      const int64_t off = int64_t(h) * E8 + b;
      const V share = H == 1 ? V(A(1)) : rm::anchor_share(H, lane_load<V>(S.ex + off), lsum);
      const V ds = rm::score_grad(dlv, share);
      dsu = fmadd(ds, lane_load<V>(S.u + off), dsu);
      const V ds_q = rm::anchor_acc_coef(ds, vq_scale);
      if constexpr (RMAX > 0) {
#pragma GCC unroll 16
        for (int i = 0; i < RMAX; ++i) {
          if (i < R) {
            reg[i] = fmadd(ds, lane_load<V>(P.anchors_t + i * row + off), reg[i]);
            if (acc) {
              A* ai = acc + i * row + off;
              lane_store(ai, fmadd(ds_q, V(q[i]), lane_load<V>(ai)));
            }
          }
        }
      } else {
        for (int i = 0; i < R; ++i) {
          A* lane = lanes + i * kW;
          lane_store(lane, fmadd(ds, lane_load<V>(P.anchors_t + i * row + off), lane_load<V>(lane)));
          if (acc) {
            A* ai = acc + i * row + off;
            lane_store(ai, fmadd(ds_q, V(q[i]), lane_load<V>(ai)));
          }
        }
      }
    }
  }
  if constexpr (RMAX > 0) {
#pragma GCC unroll 16
    for (int i = 0; i < RMAX; ++i) {
      if (i < R) ds_anchor_hat[i] = hsum(reg[i]);
    }
  } else {
    for (int i = 0; i < R; ++i) ds_anchor_hat[i] = hsum(lane_load<V>(lanes + i * kW));
  }
  return hsum(dsu);
}

template <typename V>
inline ScalarOf<V> scores_backward(const ScalarOf<V>* q, const Prepared<ScalarOf<V>>& P,
                                   ScalarOf<V> q_scale, const TokenScores<ScalarOf<V>>& S,
                                   const ScalarOf<V>* dl, ScalarOf<V>* acc, ScalarOf<V>* ds_anchor_hat,
                                   ScalarOf<V>* lanes /* [r][W] */) {
  if (P.rank <= kMaxRowsInRegisters) {
    return scores_backward_ranked<kMaxRowsInRegisters, V>(q, P, q_scale, S, dl, acc, ds_anchor_hat, lanes);
  }
  return scores_backward_ranked<0, V>(q, P, q_scale, S, dl, acc, ds_anchor_hat, lanes);
}

// Whether a row of grad_x takes non-temporal stores: when the output is too large to stay cached
// (the adapter decides) and the row is aligned to a whole vector of X.
template <typename V, typename X>
inline bool streams_row(const X* row, bool stream) {
  return stream && reinterpret_cast<uintptr_t>(row) % (width_of<V>() * sizeof(X)) == 0;
}

// grad_x is written where it is computed, in the projection backward's loop. On the Intel Xeon VM
// (2026-12-05, OLMoE fp32, T = 8192, 2 threads) those stores cost ~2.5 ms of an ~11-14 ms forward +
// backward (a temporary switch that skipped them, interleaved in one process: 11.7 against 14.3
// ms in a slow spell): about what the backward's read of x and write of grad_x take with the cores
// doing nothing else (benchmarks/stream_bandwidth.c: non-temporal copy of 64 MiB, 2.5 ms), so the
// loop's arithmetic hides little of it. Staging a group's rows in scratch (plain stores, in L2) and
// streaming them out a few lines per step while the next group scores was slower, whether all of
// a group's 8 rows were staged (11.98 ms) or 2 / 4 / 6 of them (11.17-11.61 ms), against 11.16-11.34
// ms for these direct stores (13 interleaved rounds, load average 0.6-1.3): the staging copy costs
// more than the overlap gains.
template <typename V, typename X>
inline void store_grad_x(X* p, V v, bool stream) {
  if (stream) {
    LaneIO<V>::stream(p, v);
  } else {
    LaneIO<V>::store(p, v);
  }
}

// What the backward projection of one group reads and writes (projection_backward_group). The sums
// over the projection's rows run on the forward's W_g (the norm weight folded in) against grad_q
// scaled by rstd, which gives rstd * dL/dx_hat directly (rm::rms_norm_input_grad_scaled); grad_proj's
// partial is M = sum_t grad_q x_hat^T, from which the adapter finishes both grad_proj = M * g and
// grad_norm_weight = sum_k W * M (finish_projection_grads). Per element and token that leaves 2 * rank
// FMAs (the sum and M) and 2 operations (x_hat and the input gradient), where the unfolded form took
// 6: x_hat, x_hat * g for grad_proj, dL/dx~ * g, grad_norm_weight's FMA and the input gradient's 2.
template <typename V, typename X>
struct ProjectionBackward {
  using A = ScalarOf<V>;
  const X* const* xs;     // [count] rows of x
  const A* W;             // W_g: proj with the norm weight folded in, [r][w_stride]
  int64_t w_stride;
  const A* rstd;          // [count]
  const A* grad_q;        // [count][rank]
  const A* grad_q_rstd;   // [count][rank]: rstd * grad_q (grad_q itself without RMSNorm)
  int rank;
  bool use_norm, need_grad_x;
  bool stream;            // grad_x by non-temporal stores (where a row is aligned for them)
  A* grad_proj;           // [rank][proj_stride] chunk partial of M, or null (parameter grads not wanted)
  int64_t proj_stride;
  int64_t d;
  A* buffer;              // [count][stride]: the running W_g^T grad_q_rstd over row chunks (rank > 8)
  A* xn;                  // [count][kBackwardBlock]: x_hat of the current d-block (for grad_proj)
  int64_t stride;
  X* const* gx;           // [count] rows of grad_x
  const A* rstd_mean_dot; // [count] rstd * mean_i dL/dx_hat_i * x_hat_i: rm::rms_mean_dot (read only with RMSNorm)
  const X* const* next_xs;  // [kGroup] rows of the next group (prefetched into L2), or null
  bool fresh;             // the chunk's first group: grad_proj's vector part [0, d / W * W) is written, not added to
};

// Tokens per backward tile for a row chunk of ROWS: the TT x ROWS scaled grad_q values and 4 lane
// values per token (x_hat, rstd, the W_g^T sum, rstd * mean_dot) in registers, plus W and a spare.
template <typename V, int ROWS>
constexpr int backward_tile_tokens() {
  const int fit = (vector_registers<V>() - 3) / (ROWS + 4);
  return fit < 1 ? 1 : fit > kGroup ? kGroup : fit;
}

// One tile of TT tokens, rows [r0, r0 + ROWS) of the projection, one d-block [b0, b1): every
// per-element sum keeps its order (W_g^T grad_q_rstd over rows k in order), each W load serves TT
// tokens and each x_hat value every row. FIRST: the row chunk that starts the sum (and stores x_hat
// for grad_proj_update); LAST: the one that finishes it (grad_x); middle chunks carry the sum in the
// buffer. grad_x is written here, in the pass that reads x: RMSNorm's mean_dot is known before it
// (rm::rms_mean_dot).
template <int TT, int ROWS, bool FIRST, bool LAST, typename V, typename X>
inline void projection_backward_tile(const ProjectionBackward<V, X>& a, int t0, int r0, int64_t b0, int64_t b1) {
  using A = ScalarOf<V>;
  constexpr int kW = width_of<V>();
  V c[TT][ROWS];
  V r[TT], rmd[TT];
#pragma GCC unroll 16
  for (int t = 0; t < TT; ++t) {
#pragma GCC unroll 16
    for (int k = 0; k < ROWS; ++k) c[t][k] = V(a.grad_q_rstd[(t0 + t) * a.rank + r0 + k]);
    r[t] = V(a.rstd[t0 + t]);
    rmd[t] = V(a.use_norm ? a.rstd_mean_dot[t0 + t] : A(0));
  }
  // Locals: the stores below could alias the struct's fields as far as the compiler knows.
  const A* const W = a.W + int64_t(r0) * a.w_stride;
  const int64_t w_stride = a.w_stride, stride = a.stride;
  A* const xn_out = FIRST && a.grad_proj ? a.xn + int64_t(t0) * kBackwardBlock : nullptr;
  A* const buffer = a.buffer + int64_t(t0) * stride;
  const bool use_norm = a.use_norm, need_grad_x = a.need_grad_x;
  const X* xs[TT];
  X* gx[TT];
  bool stream[TT];
#pragma GCC unroll 16
  for (int t = 0; t < TT; ++t) {
    xs[t] = a.xs[t0 + t];
    gx[t] = a.gx[t0 + t];
    stream[t] = streams_row<V>(gx[t], a.stream);
  }
  const X* next[TT];
  const bool prefetch = a.next_xs != nullptr;
#pragma GCC unroll 16
  for (int t = 0; t < TT; ++t) next[t] = prefetch ? a.next_xs[t0 + t] : nullptr;
  for (int64_t i = b0; i < b1; i += kW) {
    if (prefetch) {  // the next group's x, position for position: it arrives while that group scores
#pragma GCC unroll 16
      for (int t = 0; t < TT; ++t) __builtin_prefetch(next[t] + i, 0, 2);
    }
    V xhat[TT], sum[TT];
#pragma GCC unroll 16
    for (int t = 0; t < TT; ++t) {
      sum[t] = V(A(0));  // set below when need_grad_x (which the compiler cannot follow)
      xhat[t] = V(A(0));
      if (xn_out || (LAST && use_norm && need_grad_x)) {
        const V xv = LaneIO<V>::load(xs[t] + i);
        xhat[t] = use_norm ? rm::rms_normalized(xv, r[t]) : xv;
      }
    }
    if (xn_out) {  // x_hat for grad_proj_update
#pragma GCC unroll 16
      for (int t = 0; t < TT; ++t) lane_store(xn_out + t * kBackwardBlock + (i - b0), xhat[t]);
    }
    if (!need_grad_x) continue;
#pragma GCC unroll 16
    for (int k = 0; k < ROWS; ++k) {
      V w = lane_load<V>(W + k * w_stride + i);
      pin_register(w);  // one load for the TT tokens
#pragma GCC unroll 16
      for (int t = 0; t < TT; ++t) {
        if (FIRST && k == 0) {
          sum[t] = c[t][0] * w;
        } else if (k == 0) {
          sum[t] = fmadd(c[t][0], w, lane_load<V>(buffer + t * stride + i));
        } else {
          sum[t] = fmadd(c[t][k], w, sum[t]);
        }
      }
    }
    if constexpr (!LAST) {
#pragma GCC unroll 16
      for (int t = 0; t < TT; ++t) lane_store(buffer + t * stride + i, sum[t]);
    } else {
#pragma GCC unroll 16
      for (int t = 0; t < TT; ++t) {
        store_grad_x(gx[t] + i, use_norm ? rm::rms_norm_input_grad_scaled(sum[t], xhat[t], rmd[t]) : sum[t], stream[t]);
      }
    }
  }
}

// M[k0 + k][i0 + v * W ...] += grad_q[t][k0 + k] * x_hat_t for the group's tokens in order, in a
// register tile of ROWS rows x VECS lane vectors: each x_hat load serves ROWS rows, each grad_q value
// VECS vectors.
template <int ROWS, int VECS, typename V>
inline void grad_proj_tile(ScalarOf<V>* gp, int64_t proj_stride, const ScalarOf<V>* xn, const ScalarOf<V>* grad_q,
                           int rank, int count, int k0, int64_t i0, int64_t b0, bool fresh) {
  constexpr int kW = width_of<V>();
  V acc[ROWS][VECS];
#pragma GCC unroll 16
  for (int k = 0; k < ROWS; ++k) {
#pragma GCC unroll 16
    for (int v = 0; v < VECS; ++v) {
      acc[k][v] = fresh ? V(ScalarOf<V>(0)) : lane_load<V>(gp + (k0 + k) * proj_stride + i0 + v * kW);
    }
  }
  for (int t = 0; t < count; ++t) {
    V x[VECS];
#pragma GCC unroll 16
    for (int v = 0; v < VECS; ++v) x[v] = lane_load<V>(xn + t * kBackwardBlock + (i0 - b0) + v * kW);
#pragma GCC unroll 16
    for (int k = 0; k < ROWS; ++k) {
      const V c(grad_q[t * rank + k0 + k]);
#pragma GCC unroll 16
      for (int v = 0; v < VECS; ++v) acc[k][v] = fmadd(c, x[v], acc[k][v]);
    }
  }
#pragma GCC unroll 16
  for (int k = 0; k < ROWS; ++k) {
#pragma GCC unroll 16
    for (int v = 0; v < VECS; ++v) lane_store(gp + (k0 + k) * proj_stride + i0 + v * kW, acc[k][v]);
  }
}

template <int ROWS, typename V>
inline void grad_proj_rows(ScalarOf<V>* gp, int64_t proj_stride, const ScalarOf<V>* xn, const ScalarOf<V>* grad_q,
                           int rank, int count, int k0, int64_t b0, int64_t b1, bool fresh) {
  constexpr int kW = width_of<V>();
  int64_t i0 = b0;
  for (; i0 + 4 * kW <= b1; i0 += 4 * kW) grad_proj_tile<ROWS, 4, V>(gp, proj_stride, xn, grad_q, rank, count, k0, i0, b0, fresh);
  for (; i0 < b1; i0 += kW) grad_proj_tile<ROWS, 1, V>(gp, proj_stride, xn, grad_q, rank, count, k0, i0, b0, fresh);
}

// M += grad_q x_hat^T over the d-block [b0, b1) for the group's tokens, in token order. fresh:
// the chunk's first group, whose sums start from zero in registers (the same bits as adding to a
// zeroed partial) so that the partial's vector part needs no zeroing beforehand.
template <typename V>
inline void grad_proj_update(ScalarOf<V>* gp, int64_t proj_stride, const ScalarOf<V>* xn, const ScalarOf<V>* grad_q,
                             int rank, int count, int64_t b0, int64_t b1, bool fresh) {
  int k0 = 0;
  for (; k0 + 4 <= rank; k0 += 4) grad_proj_rows<4, V>(gp, proj_stride, xn, grad_q, rank, count, k0, b0, b1, fresh);
  for (; k0 < rank; ++k0) grad_proj_rows<1, V>(gp, proj_stride, xn, grad_q, rank, count, k0, b0, b1, fresh);
}

// The tiles of one row chunk over the group's tokens (full tiles, then single tokens).
template <int ROWS, bool FIRST, bool LAST, typename V, typename X>
inline void projection_backward_tiles(const ProjectionBackward<V, X>& a, int count, int r0, int64_t b0,
                                      int64_t b1) {
  constexpr int TT = backward_tile_tokens<V, ROWS>();
  int t0 = 0;
  for (; t0 + TT <= count; t0 += TT) projection_backward_tile<TT, ROWS, FIRST, LAST, V, X>(a, t0, r0, b0, b1);
  for (; t0 < count; ++t0) projection_backward_tile<1, ROWS, FIRST, LAST, V, X>(a, t0, r0, b0, b1);
}

// Backward through q = rstd * (W_g x) for a group of `count` <= kGroup tokens, d in blocks so that
// the blocks of W_g and of grad_proj's partial stay in L1 while the group's tiles use them, rows in
// chunks of kMaxRowsInRegisters:
//   grad_x = W_g^T grad_q (without RMSNorm) or rms_norm_input_grad_scaled(W_g^T (rstd grad_q), x_hat,
//   rstd mean_dot); M += grad_q x_hat^T (token order).
template <typename V, typename X>
inline void projection_backward_group(const ProjectionBackward<V, X>& a, int count) {
  using A = ScalarOf<V>;
  constexpr int kW = width_of<V>();
  const int64_t d = a.d;
  const int64_t dv = d / kW * kW;
  const int rank = a.rank;
  for (int64_t b0 = 0; b0 < dv; b0 += kBackwardBlock) {
    const int64_t b1 = b0 + kBackwardBlock < dv ? b0 + kBackwardBlock : dv;
    for (int r0 = 0; r0 < rank; r0 += kMaxRowsInRegisters) {
      const int rows = rank - r0 < kMaxRowsInRegisters ? rank - r0 : kMaxRowsInRegisters;
      const bool first = r0 == 0, last = r0 + rows == rank;
      if (!last) {  // a full chunk of kMaxRowsInRegisters = 8 rows
        if (first) {
          projection_backward_tiles<8, true, false, V, X>(a, count, r0, b0, b1);
        } else {
          projection_backward_tiles<8, false, false, V, X>(a, count, r0, b0, b1);
        }
        continue;
      }
#define L2R_BACKWARD_ROWS(N)                                                        \
  case N:                                                                           \
    if (first) {                                                                    \
      projection_backward_tiles<N, true, true, V, X>(a, count, r0, b0, b1);         \
    } else {                                                                        \
      projection_backward_tiles<N, false, true, V, X>(a, count, r0, b0, b1);        \
    }                                                                               \
    break;
      switch (rows) {
        L2R_BACKWARD_ROWS(1)
        L2R_BACKWARD_ROWS(2)
        L2R_BACKWARD_ROWS(3)
        L2R_BACKWARD_ROWS(4)
        L2R_BACKWARD_ROWS(5)
        L2R_BACKWARD_ROWS(6)
        L2R_BACKWARD_ROWS(7)
        default: L2R_BACKWARD_ROWS(8)
      }
#undef L2R_BACKWARD_ROWS
    }
    if (a.grad_proj) grad_proj_update<V>(a.grad_proj, a.proj_stride, a.xn, a.grad_q, rank, count, b0, b1, a.fresh);
  }
  const A* W = a.W;
  for (int j = 0; j < count; ++j) {
    const X* xt = a.xs[j];
    const A* gq = a.grad_q + j * rank;
    const A* gqr = a.grad_q_rstd + j * rank;
    const A r = a.rstd[j];
    for (int64_t i = dv; i < d; ++i) {  // tail, same formulas
      const A xi = LaneIO<A>::load(xt + i);
      const A xhat = a.use_norm ? rm::rms_normalized(xi, r) : xi;
      if (a.grad_proj) {
        for (int k = 0; k < rank; ++k) {
          A& gp = a.grad_proj[k * a.proj_stride + i];
          gp = fmadd(gq[k], xhat, gp);
        }
      }
      if (!a.need_grad_x) continue;
      A sum = gqr[0] * W[i];
      for (int k = 1; k < rank; ++k) sum = fmadd(gqr[k], W[k * a.w_stride + i], sum);
      LaneIO<A>::store(a.gx[j] + i, a.use_norm ? rm::rms_norm_input_grad_scaled(sum, xhat, a.rstd_mean_dot[j]) : sum);
    }
  }
}

template <typename V, typename X>
void backward_chunks_typed(const BackwardArgs<ScalarOf<V>>& a, int64_t c_begin, int64_t c_end,
                           ScalarOf<V>* scratch) {
  using A = ScalarOf<V>;
  const Prepared<A>* P = a.params;
  const int E = a.shape.experts, R = a.shape.rank;
  const int E8 = P ? P->experts_padded : E;
  const int H = P ? P->anchors : 1;
  const int64_t d = a.shape.d;
  const int64_t stride = d + 16;
  Arena<A> arena{scratch};
  TokenScores<A> scored[kScoredTogether];
  for (int n = 0; n < kScoredTogether; ++n) scored[n] = take_token_scores<A>(arena, H, E8);
  rm::SoftmaxStats<A> scored_st[kScoredTogether];
  A* grad_probs = arena.take(E8);
  A* dl = arena.take(E8);
  A* lanes = arena.take(int64_t(R) * width_of<V>());
  A* ds_anchor_hat = arena.take(R);
  A* grad_q = arena.take(int64_t(kGroup) * R);
  A* grad_q_rstd = arena.take(int64_t(kGroup) * R);
  A rstd_mean_dot[kGroup];
  A* xn = arena.take(int64_t(kGroup) * kBackwardBlock);
  A* buffer = arena.take(int64_t(kGroup) * stride);
  const X* x = static_cast<const X*>(a.x);
  X* grad_x = static_cast<X*>(a.grad_x);

  for (int64_t c = c_begin; c < c_end; ++c) {
    const int64_t t_begin = a.chunks.begin(c), t_end = a.chunks.end(c);
    A* part = a.partials ? a.partials + c * a.partial_size() : nullptr;
    if (part) {
      // The adapter leaves partials uninitialised. The vector part of each grad_proj row is the first
      // group's to write (ProjectionBackward::fresh; 66 of the 76 KB at OLMoE's shape); the rest
      // (tail columns, padding, anchor and scale sums) starts from zero here.
      const int64_t dv = d / width_of<V>() * width_of<V>(), row_stride = a.proj_row_stride();
      for (int k = 0; k < R; ++k) std::fill(part + k * row_stride + dv, part + (k + 1) * row_stride, A(0));
      std::fill(part + a.proj_partial(), part + a.partial_size(), A(0));
    }
    A* grad_proj = part;
    A* anchor_acc = part ? part + a.proj_partial() : nullptr;
    A* grad_scale = part ? anchor_acc + a.anchor_partial() : nullptr;
    const X* xs[kGroup];
    X* gxs[kGroup];
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int j_group = static_cast<int>((t - t_begin) % kGroup);
      // The scores again, kScoredTogether tokens side by side as the forward scores them (each
      // token's values exactly as alone): the first token of each run scores the run.
      const int slot = a.logits_in ? 0 : static_cast<int>((t - t_begin) % kScoredTogether);
      const TokenScores<A>& S = scored[slot];
      if (a.logits_in) {
        scored_st[0] = score_from_logits<V>(a.logits_in + t * E, E, E8, a.opt.sigmoid, S);
      } else if (slot == 0) {
        const int run = t_end - t >= kScoredTogether ? kScoredTogether : static_cast<int>(t_end - t);
        const A* qs[kScoredTogether];
        A q_scales[kScoredTogether];
        for (int n = 0; n < run; ++n) {
          qs[n] = a.q + (t + n) * R;
          q_scales[n] = P->scale * rm::query_coef(qs[n], R, a.opt.beta, a.opt.eps).coef;
        }
        if (run == kScoredTogether) {
          score_tokens<V, kScoredTogether>(qs, *P, q_scales, a.opt.tau, a.opt.sigmoid, scored, scored_st);
        } else {
          for (int n = 0; n < run; ++n) scored_st[n] = score_token<V>(qs[n], *P, q_scales[n], a.opt.tau, a.opt.sigmoid, scored[n]);
        }
      }
      const rm::SoftmaxStats<A> st = scored_st[slot];
      if (a.grad_logits) {
        for (int e = 0; e < E; ++e) dl[e] = a.grad_logits[t * E + e];
        for (int e = E; e < E8; ++e) dl[e] = A(0);
      } else {
        if (!token_prob_grads<V>(a, t, E8, S, grad_probs)) {
          *a.bad_index = 1;  // the adapter reports it; nothing was written out of bounds
          return;
        }
        token_logit_grads<V>(a, t, E8, st, S, grad_probs, dl);
      }
      if (a.grad_logits_out) {  // route_select's backward: dL/dl is the result
        for (int e = 0; e < E; ++e) a.grad_logits_out[t * E + e] = dl[e];
        continue;
      }
      const A* q = a.q + t * R;
      const rm::NormCoef<A> qc = rm::query_coef(q, R, a.opt.beta, a.opt.eps);
      const A q_scale = P->scale * qc.coef;
      A* gq = grad_q + j_group * R;
      const A ds_u_sum = scores_backward<V>(q, *P, q_scale, S, dl, a.need_param_grads ? anchor_acc : nullptr,
                                            ds_anchor_hat, lanes);
      if (a.need_param_grads) *grad_scale += rm::scale_grad(ds_u_sum, qc);
      for (int i = 0; i < R; ++i) gq[i] = rm::query_grad(q[i], ds_anchor_hat[i], ds_u_sum, P->scale, qc);
      if (a.opt.use_norm) {  // without RMSNorm rstd is 1: the tiles take grad_q itself
        const A r = a.rstd[t];
        A* gqr = grad_q_rstd + j_group * R;
        for (int i = 0; i < R; ++i) gqr[i] = r * gq[i];
        rstd_mean_dot[j_group] = r * rm::rms_mean_dot<0>(gq, q, R, d);
      }
      xs[j_group] = x + t * d;
      gxs[j_group] = grad_x ? grad_x + t * d : nullptr;
      if (j_group == kGroup - 1 || t + 1 == t_end) {
        const int64_t t0 = t - j_group;
        ProjectionBackward<V, X> pb;
        pb.xs = xs;
        pb.W = P->proj_w;
        pb.w_stride = P->proj_stride;
        pb.rstd = a.rstd + t0;
        pb.grad_q = grad_q;
        pb.grad_q_rstd = a.opt.use_norm ? grad_q_rstd : grad_q;
        pb.rank = R;
        pb.use_norm = a.opt.use_norm;
        pb.need_grad_x = a.need_grad_x;
        pb.grad_proj = a.need_param_grads ? grad_proj : nullptr;
        pb.proj_stride = a.proj_row_stride();
        pb.d = d;
        pb.buffer = buffer;
        pb.stride = stride;
        pb.gx = gxs;
        pb.rstd_mean_dot = rstd_mean_dot;
        pb.stream = a.stream_grad_x;
        pb.xn = xn;
        pb.fresh = t0 == t_begin;
        const X* next_xs[kGroup];
        for (int j = 0; j < kGroup; ++j) {
          const int64_t tn = t0 + kGroup + j < a.shape.tokens ? t0 + kGroup + j : a.shape.tokens - 1;
          next_xs[j] = x + tn * d;
        }
        pb.next_xs = next_xs;
        projection_backward_group<V, X>(pb, j_group + 1);
      }
    }
  }
}

template <typename V>
void backward_chunks(const BackwardArgs<ScalarOf<V>>& a, int64_t c_begin, int64_t c_end,
                     ScalarOf<V>* scratch) {
  if constexpr (std::is_same_v<ScalarOf<V>, double>) {
    backward_chunks_typed<V, double>(a, c_begin, c_end, scratch);
  } else {
    L2R_HOST_FLOAT_DTYPE_SWITCH(a.x_type, X, __builtin_trap(), { backward_chunks_typed<V, X>(a, c_begin, c_end, scratch); });
  }
  stream_fence(V(ScalarOf<V>(0)));  // grad_x's non-temporal stores, before the threads join
}

template <typename V>
Kernels<ScalarOf<V>> make_kernels(const char* isa) {
  Kernels<ScalarOf<V>> k;
  k.isa = isa;
  k.width = width_of<V>();
  k.forward_scratch = &forward_scratch_size<V>;
  k.forward = &forward_chunks<V>;
  k.backward_scratch = &backward_scratch_size<V>;
  k.backward = &backward_chunks<V>;
  return k;
}

L2R_ISA_END
}  // namespace cpu
}  // namespace route
}  // namespace l2r
