// The CUDA route forward: x (or given logits) -> logits, probabilities, top-k routing and the
// statistics, in ONE launch (route_forward_kernel; included by route_cuda.cu; the element
// conversions and warp helpers it uses are route_device.cuh's). Every per-token formula is csrc/route/math's; this
// file is layout and reductions only.
//
// Token tiles. A warp owns a tile of TT = tokens_per_warp(R) tokens (route_kernel_params.h) and
// projects all of them at once: its lanes split d (lane l reads the 16-byte vector of columns
// [8l, 8l + 8) of every 256-column chunk of each token row: one 512-byte request per token and
// chunk), and every projection value a lane loads from shared memory serves the TT tokens
// (tokens x rows accumulators in registers). The projection proj * norm_weight is staged in shared
// memory by the block ([rows][columns], 16-byte granules swizzled so that the lanes' two
// consecutive granules fall in distinct banks), in stages of columns when it does not fit; the
// anchors are normalised (coef(|a|) a) and transposed to [rp][H][E] by the block as it stages
// them. Nothing is prepared by another launch.
// After the pass over d a transposed butterfly (each lane keeps half of its values per step, so a
// tile's TT x rows sums cost about TT x rows shuffles) leaves the tile's raw sums in shared memory.
//
// Routing. The scoring keeps the TT tokens as the lanes of ArrayLanes<TT> (common/lanes_array.h):
// each lane scores experts e = lane + 32 j of all TT tokens with math::expert_logit, every anchor
// coordinate loaded once for the TT tokens. Softmax, top-k and weights then use 32 / TT lanes per
// token (lane t * L + m takes experts m, m + L, ...): serial scans per lane and log2(L) shuffles
// per reduction, the selection one round per slot (the largest order key below the last round's).
//
// Tensor cores. Rank 32 with bf16 x (16-byte rows, at least kMmaMinTokens tokens) projects on
// tensor cores instead (project_chunks_mma, route_project_mma.cuh): a block takes kMmaChunks
// chunks of 16 tokens (each chunk one MMA m-tile; its rows are the tokens of the warps' tiles) over
// one range of d, stages that range of proj * norm_weight in float32 and splits each value into
// three bf16 parts as it feeds the MMAs (x is exact in bf16; the parts carry float32's 24 bits). Its
// 8 warps are 4 m-groups x 2 k-groups; the k-groups' sums are added in k-group order, the d
// splits' in split order by the block that takes the chunks' last ticket (counters[1 + block of
// chunks]), which then routes the chunks one after another as above.
//
// Grid. Either every block projects whole rows of the chunks it loops over (persistent blocks), or,
// for few tokens (decode), a chunk's d is split over `splits` blocks that write raw partial sums;
// the block that takes the chunk's last ticket (counters[1 + chunk]) adds them in split order and
// routes the chunk. Statistics: per chunk, the warps' sums added in warp order (on the tensor-core
// path, a block's kMmaChunks chunks into one partial, in chunk order, when statistics groups are
// whole blocks of chunks: the finishing block then has kMmaChunks times fewer partials to add);
// the block that takes the last ticket of counters[0] adds the partials of each statistics group in
// chunk order (a fixed split of the chunks over its threads, then the parts in order). Tickets are
// atomicInc's that wrap back to zero, after a __threadfence() (release) and followed by one
// (acquire); no floating-point atomics, so every result is bitwise reproducible run to run (a
// token's projection sums are associated differently with and without splits).
#pragma once

#include "route_device.cuh"
#include "route_project_mma.cuh"

namespace l2r {
namespace route {
namespace {

using lanes::ArrayLanes;

// ---- x and the staged projection -------------------------------------------------------------

template <typename T>
struct XVec {
  static constexpr int kElems = 16 / static_cast<int>(sizeof(T));  // columns of one 16-byte load
  static constexpr int kChunk = kWarp * kElems;                     // columns of one warp request
};

// The block's dynamic shared memory, addressed with 32-bit float offsets from one extern array
// (every region below is an offset, never a derived pointer: nvcc and NVRTC then both use 32-bit
// shared addresses).
__device__ __forceinline__ float* smem_base() {
  extern __shared__ float4 route_dynamic_smem[];
  return reinterpret_cast<float*>(route_dynamic_smem);
}
__device__ __forceinline__ float& smf(int off) { return smem_base()[off]; }
__device__ __forceinline__ int& smi(int off) { return reinterpret_cast<int*>(smem_base())[off]; }
__device__ __forceinline__ float4& smf4(int off) { return *reinterpret_cast<float4*>(smem_base() + off); }

// Word w of a 16-byte vector.
__device__ __forceinline__ uint32_t word_of(const uint4& raw, int w) {
  return w == 0 ? raw.x : (w == 1 ? raw.y : (w == 2 ? raw.z : raw.w));
}

// Columns [4h, 4h + 4) of a 16-byte vector of x elements, in float (bit operations on the words:
// the vector stays in registers).
template <typename T>
__device__ __forceinline__ void unpack4(const uint4& raw, int h, float (&out)[4]) {
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int j = 0; j < 4; ++j) out[j] = __uint_as_float(word_of(raw, j));
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t word = word_of(raw, 2 * h + j / 2);
      out[j] = half_bits_to_float<T>(static_cast<unsigned short>(j % 2 ? word >> 16 : word & 0xffffu));
    }
  }
}

// Float offset of staged column `col` inside its row: 16-byte granule g lives at g ^ ((g >> 3) & 1),
// so the 8 lanes of a 16-byte shared-memory phase reading granules 2l (or 2l + 1) hit 8 distinct
// groups of 4 banks.
__device__ __forceinline__ int swizzled(int col) {
  const int g = col >> 2;
  return ((g ^ ((g >> 3) & 1)) << 2) | (col & 3);
}

// How a staged row's columns are laid out: the CUDA-core tiles' swizzled 16-byte granules (rows of
// exactly `stride` floats), or plain columns, for the tensor-core fragments (rows padded by 4
// floats instead: kMmaStageStride).
enum class StageLayout { kSwizzled, kPlain };

template <StageLayout L>
__device__ __forceinline__ int staged_col(int col) {
  return L == StageLayout::kSwizzled ? swizzled(col) : col;
}

// proj * norm_weight, rows [row0, row0 + rows) (zero past the rank), columns [col0, col0 + ncols)
// (zero past d), into shared w + k * stride + staged_col<L>(c - col0). Every thread of the block
// calls it. An item is one column granule (consecutive threads: consecutive granules, coalesced) of
// up to rows_per_item rows: the norm weight is loaded once per item, not once per row, and the items
// stay small enough to spread evenly over the threads (no warp with a long chain of loads).
constexpr int kStageRowsPerItem = 4;
template <StageLayout L = StageLayout::kSwizzled>
__device__ __forceinline__ void stage_projection(const ForwardParams& p, int row0, int rows, int64_t col0, int ncols,
                                                 int w, int stride, int rows_per_item = kStageRowsPerItem) {
  const int64_t d = p.c.d;
  const int rank = p.c.rank;
  const float* __restrict__ proj = p.proj;
  const float* __restrict__ g = p.norm_weight;
  const int per = p.proj_vec ? 4 : 1;  // columns per granule
  const int granules = ncols / per;
  const int per_group = rows < rows_per_item ? rows : rows_per_item;
  const int groups = (rows + per_group - 1) / per_group;
  for (int n = threadIdx.x; n < groups * granules; n += blockDim.x) {
    const int gr = n % granules, k0 = (n / granules) * per_group;
    const int k1 = k0 + per_group < rows ? k0 + per_group : rows;
    const int64_t c = col0 + static_cast<int64_t>(per) * gr;
    if (p.proj_vec) {
      float4 gv = make_float4(1.f, 1.f, 1.f, 1.f);
      if (g != nullptr && c < d) gv = __ldg(reinterpret_cast<const float4*>(g + c));
      for (int k = k0; k < k1; ++k) {
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        if (row0 + k < rank && c < d) {
          v = __ldg(reinterpret_cast<const float4*>(proj + (row0 + k) * d + c));
          if (g != nullptr) v = make_float4(v.x * gv.x, v.y * gv.y, v.z * gv.z, v.w * gv.w);
        }
        smf4(w + k * stride + staged_col<L>(4 * gr)) = v;
      }
    } else {
      const float gc = g != nullptr && c < d ? g[c] : 1.f;
      for (int k = k0; k < k1; ++k) {
        float v = 0.f;
        if (row0 + k < rank && c < d) v = g != nullptr ? proj[(row0 + k) * d + c] * gc : proj[(row0 + k) * d + c];
        smf(w + k * stride + staged_col<L>(gr)) = v;
      }
    }
  }
}

// anchor_hat[(i * H + h) * E + e] = coef(|a_eh|) a_eh[i] (0 for i >= rank), in two steps: the raw
// coordinates copied to their transposed places (element n of the staged array per thread: the
// stores are consecutive words), then one (e, h) column per thread, e fastest (consecutive words
// again), its norm from the staged copy and the column scaled in place. Every thread of the block
// calls it (a __syncthreads separates the two steps); callers __syncthreads before reading it.
__device__ __forceinline__ void stage_anchors(const float* anchors, const KernelConfig& kc, int anchor_hat) {
  const int E = kc.experts, H = kc.anchors, rank = kc.rank, rp = kc.rp;
  for (int n = threadIdx.x; n < rank * H * E; n += blockDim.x) {
    const int e = n % E, h = (n / E) % H, i = n / (E * H);
    smf(anchor_hat + n) = __ldg(anchors + (static_cast<int64_t>(e) * H + h) * rank + i);
  }
  __syncthreads();
  for (int row = threadIdx.x; row < E * H; row += blockDim.x) {
    const int e = row % E, h = row / E;
    auto a = [&](int i) { return smf(anchor_hat + (i * H + h) * E + e); };
    const rm::NormCoef<float> c = rm::sips_norm_coef(lanes::vsqrt(rm::dot_r_at<float>(a, a, rank)), kc.beta, kc.eps);
    for (int i = 0; i < rp; ++i) smf(anchor_hat + (i * H + h) * E + e) = i < rank ? c.coef * a(i) : 0.f;
  }
}

// acc[t][k] += <proj_w row row0 + k, x row t0 + t> over this lane's columns of one warp chunk
// [chunk0, chunk0 + chunk columns); ss[t] += <x, x> when `squares`. w: the staged rows (row k at
// w + k * stride), staged from column stage0.
template <int RC, int TT, typename T>
__device__ __forceinline__ void project_chunk(const T* __restrict__ x, int64_t d, int64_t t0, int ntok, bool vec,
                                              int64_t chunk0, int64_t col_end, int w, int stride,
                                              int64_t stage0, int lane, bool squares, float (&acc)[TT * RC],
                                              float (&ss)[TT]) {
  if (vec) {
    constexpr int kE = XVec<T>::kElems;
    const int64_t col = chunk0 + lane * kE;
    if (col >= col_end) return;
    uint4 raw[TT];
#pragma unroll
    for (int t = 0; t < TT; ++t) {
      raw[t] = t < ntok ? __ldg(reinterpret_cast<const uint4*>(x + (t0 + t) * d + col)) : make_uint4(0u, 0u, 0u, 0u);
    }
    const int wcol = static_cast<int>(col - stage0);
#pragma unroll 1
    for (int h = 0; h < kE / 4; ++h) {
      float xf[TT][4];
#pragma unroll
      for (int t = 0; t < TT; ++t) unpack4<T>(raw[t], h, xf[t]);
      if (squares) {
#pragma unroll
        for (int t = 0; t < TT; ++t) {
#pragma unroll
          for (int j = 0; j < 4; ++j) ss[t] = lanes::fmadd(xf[t][j], xf[t][j], ss[t]);
        }
      }
      const int off = swizzled(wcol + 4 * h);
#pragma unroll
      for (int k = 0; k < RC; ++k) {
        const float4 w4 = smf4(w + k * stride + off);
#pragma unroll
        for (int t = 0; t < TT; ++t) {
          float& a = acc[t * RC + k];
          a = lanes::fmadd(w4.x, xf[t][0], a);
          a = lanes::fmadd(w4.y, xf[t][1], a);
          a = lanes::fmadd(w4.z, xf[t][2], a);
          a = lanes::fmadd(w4.w, xf[t][3], a);
        }
      }
    }
  } else {
    const int64_t col = chunk0 + lane;
    if (col >= col_end) return;
    float xf[TT];
#pragma unroll
    for (int t = 0; t < TT; ++t) xf[t] = t < ntok ? to_float(x[(t0 + t) * d + col]) : 0.f;
    if (squares) {
#pragma unroll
      for (int t = 0; t < TT; ++t) ss[t] = lanes::fmadd(xf[t], xf[t], ss[t]);
    }
    const int off = swizzled(static_cast<int>(col - stage0));
#pragma unroll
    for (int k = 0; k < RC; ++k) {
      const float wk = smf(w + k * stride + off);
#pragma unroll
      for (int t = 0; t < TT; ++t) acc[t * RC + k] = lanes::fmadd(wk, xf[t], acc[t * RC + k]);
    }
  }
}

// Transposed butterfly over the warp: v holds N per-lane partial sums; while more than one value is
// live a step sends half of them to the partner lane (lane ^ O) and keeps the sums of the other
// half, then plain butterfly steps. Afterwards lane l holds the warp totals of values
// [l * N / 32, (l + 1) * N / 32) in v[0..) when N >= 32, else of value l / (32 / N) in v[0].
template <int LIVE, int O, int N>
__device__ __forceinline__ void transpose_reduce_step(float (&v)[N], int lane) {
  if constexpr (O > 0) {
    if constexpr (LIVE > 1) {
      constexpr int H = LIVE / 2;
      const bool upper = (lane & O) != 0;
#pragma unroll
      for (int i = 0; i < H; ++i) {
        const float send = upper ? v[i] : v[i + H];
        const float keep = upper ? v[i + H] : v[i];
        v[i] = keep + __shfl_xor_sync(kFullMask, send, O);
      }
      transpose_reduce_step<H, O / 2>(v, lane);
    } else {
      v[0] += __shfl_xor_sync(kFullMask, v[0], O);
      transpose_reduce_step<1, O / 2>(v, lane);
    }
  }
}

template <int N>
__device__ __forceinline__ void transpose_reduce(float (&v)[N], int lane) {
  transpose_reduce_step<N, kWarp / 2>(v, lane);
}

// ---- per-warp scratch --------------------------------------------------------------------------

// A warp's shared-memory scratch for one tile: offsets of its regions (forward_warp_floats in
// route_launch_plan.h lists the same regions in the same order).
struct WarpScratch {
  int q;         // [rp][TT]: raw sums, then q (tokens contiguous: one ArrayLanes per row)
  int ss;        // [TT]: raw sums of squares
  int total;     // [TT]: sum of p over experts (sigmoid balance)
  int probs;     // [TT][logit_stride]: logits, then probabilities
  int keys;      // [TT][logit_stride]: exps, then selection keys, then selection flags (int)
  int selected;  // [TT][k] (int)
  int selprob;   // [TT][lane_rows(k)]: the selected experts' probabilities
  int group;     // [TT][G]: group scores (grouped selection)
  int prob_sum;  // [E]: this warp's sum of p^ over its counted tokens of the chunk
  int counts;    // [E] (int): its selections per expert
  int tokens;    // [1] (int): its counted tokens
};

__device__ __forceinline__ int smem_align4(int n) { return (n + 3) / 4 * 4; }

// A row stride of at least n floats that is L = 32 / tt modulo 32 (route_launch_plan.h
// forward_logit_stride): lane t * L + m reading word m + L s of row t hits bank t * L + m + L s, so
// the tile's tokens never share a bank.
__device__ __forceinline__ int lane_rows(int n, int tt) {
  const int l = kWarp / tt;
  return (n - l + kWarp - 1) / kWarp * kWarp + l;
}

__device__ __forceinline__ WarpScratch warp_scratch(const ForwardParams& p, int tt, int warp) {
  const int rp = p.c.rp, E = p.c.experts, K = p.c.top_k, LS = p.logit_stride;
  const int G = p.c.num_groups > 1 ? p.c.num_groups : 0;
  WarpScratch w;
  w.q = p.warp_smem + warp * p.warp_stride;
  w.ss = w.q + smem_align4(rp * tt);
  w.total = w.ss + smem_align4(tt);
  w.probs = w.total + smem_align4(tt);
  w.keys = w.probs + smem_align4(tt * LS);
  w.selected = w.keys + smem_align4(tt * LS);
  w.selprob = w.selected + smem_align4(tt * K);
  w.group = w.selprob + smem_align4(tt * lane_rows(K, tt));
  w.prob_sum = w.group + smem_align4(tt * G);
  w.counts = w.prob_sum + smem_align4(E);
  w.tokens = w.counts + smem_align4(E);
  return w;
}

// TT consecutive shared floats from offset off as one ArrayLanes.
template <int TT>
__device__ __forceinline__ ArrayLanes<TT> load_lanes(int off) {
  const float* p = smem_base() + off;
  ArrayLanes<TT> v;
  if constexpr (TT % 4 == 0) {
#pragma unroll
    for (int i = 0; i < TT; i += 4) {
      const float4 f = *reinterpret_cast<const float4*>(p + i);
      v.v[i] = f.x;
      v.v[i + 1] = f.y;
      v.v[i + 2] = f.z;
      v.v[i + 3] = f.w;
    }
  } else if constexpr (TT == 2) {
    const float2 f = *reinterpret_cast<const float2*>(p);
    v.v[0] = f.x;
    v.v[1] = f.y;
  } else {
#pragma unroll
    for (int i = 0; i < TT; ++i) v.v[i] = p[i];
  }
  return v;
}

// ---- projection of a tile ----------------------------------------------------------------------

// Raw projection sums of this warp's tokens [t0, t0 + ntok) over columns [col_begin, col_end) into
// ws.q ([rp][TT]) and ws.ss. The projection is staged by the whole block: `resident` when it was
// staged once for the kernel (one row block, every column of the range), else per (row block,
// stage) here, so every warp of the block must call this the same number of times.
template <int R, typename T>
__device__ __forceinline__ void project_tile(const ForwardParams& p, const WarpScratch& ws,
                                             int64_t t0, int ntok, int64_t col_begin, int64_t col_end, bool resident,
                                             int lane) {
  constexpr int RC = tile_rows(R), TT = tokens_per_warp(R);
  const T* x = static_cast<const T*>(p.x);
  const int64_t d = p.c.d;
  const int rp = p.c.rp;
  const int passes = rp / RC;
  const int64_t chunk_cols = p.vec ? XVec<T>::kChunk : kWarp;
  const int w = p.proj_smem;
  float ss[TT];
#pragma unroll
  for (int t = 0; t < TT; ++t) ss[t] = 0.f;
  for (int pass = 0; pass < passes; ++pass) {
    float acc[TT * RC];  // acc[t * RC + k]: token t, row pass * RC + k
#pragma unroll
    for (int n = 0; n < TT * RC; ++n) acc[n] = 0.f;
    for (int64_t stage0 = col_begin; stage0 < col_end; stage0 += p.stage_cols) {
      const int64_t stage_end = stage0 + p.stage_cols < col_end ? stage0 + p.stage_cols : col_end;
      if (!resident) {
        __syncthreads();  // every warp is done with the previous stage
        stage_projection(p, pass * RC, RC, stage0, p.stage_cols, w, p.stage_cols);
        __syncthreads();
      }
      if (ntok > 0) {
        for (int64_t chunk0 = stage0; chunk0 < stage_end; chunk0 += chunk_cols) {
          project_chunk<RC, TT, T>(x, d, t0, ntok, p.vec, chunk0, stage_end, w, p.stage_cols, stage0, lane, pass == 0,
                                   acc, ss);
        }
      }
    }
    if (ntok > 0) {
      float(&v)[TT * RC] = acc;
      transpose_reduce(v, lane);
      // v[j] is the total of value index idx = t * RC + k (see transpose_reduce)
      constexpr int kPer = TT * RC >= kWarp ? TT * RC / kWarp : 1;
      constexpr int kSpread = TT * RC >= kWarp ? 1 : kWarp / (TT * RC);
      if (lane % kSpread == 0) {
#pragma unroll
        for (int j = 0; j < kPer; ++j) {
          const int idx = (TT * RC >= kWarp ? lane * kPer : lane / kSpread) + j;
          const int t = idx / RC, k = idx % RC;
          smf(ws.q + (pass * RC + k) * TT + t) = v[j];
        }
      }
    }
  }
  if (ntok > 0) {
    transpose_reduce(ss, lane);
    constexpr int kSpread = kWarp / TT;
    if (lane % kSpread == 0) smf(ws.ss + lane / kSpread) = ss[0];
  }
}

// ---- projection on tensor cores (rank 32, bf16 x) -------------------------------------------------

template <typename T>
struct IsBf16 {
  static constexpr bool value = false;
};
template <>
struct IsBf16<__nv_bfloat16> {
  static constexpr bool value = true;
};

// Block b of the tensor-core path: chunks [kMmaChunks * (b / splits), + kMmaChunks) over columns
// split = b % splits (route_kernel_params.h). Warp w = (m-group w / kMmaKGroups, k-group
// w % kMmaKGroups): the m-group's kMmaTilesPerGroup chunks, each one MMA m-tile (row r of chunk c:
// token begin(c) + r, zero past end(c)), against every kMmaKGroups-th k-block of each staged
// range of the projection (proj * norm_weight, zero past the rank and past the split). The
// k-groups' sums are added in k-group order into `out` ([kMmaChunks * 16][kMmaSumStride]: raw
// sums, then the sum of squares), shared memory (smem_out) or the block's global partials.
__device__ __forceinline__ void project_chunks_mma(const ForwardParams& p, int64_t first_chunk, int split,
                                                   int warp, int lane, float* gmem_out, int smem_out) {
  const int mg = warp / kMmaKGroups, kg = warp % kMmaKGroups, g = lane / 4, c = lane % 4;
  const int64_t d = p.c.d, d0 = static_cast<int64_t>(split) * p.split_cols;
  const int64_t d1 = d0 + p.split_cols < d ? d0 + p.split_cols : d;
  const uint16_t* __restrict__ x = static_cast<const uint16_t*>(p.x);
  const int region = p.proj_smem;
  // The lane's rows: tokens (-1: none) of rows g and g + 8 of each of its m-tiles (32-bit: the
  // registers are scarce here, and T < 2^31).
  int32_t rows[kMmaTilesPerGroup][2];
#pragma unroll
  for (int m = 0; m < kMmaTilesPerGroup; ++m) {
    const int64_t ch = first_chunk + mg * kMmaTilesPerGroup + m;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t t = ch < p.chunks.count ? p.chunks.begin(ch) + g + 8 * h : -1;
      rows[m][h] = t >= 0 && t < p.chunks.end(ch) ? static_cast<int32_t>(t) : -1;
    }
  }
  float acc[kMmaTilesPerGroup][4][4];
  float sq[kMmaTilesPerGroup][2];
#pragma unroll
  for (int m = 0; m < kMmaTilesPerGroup; ++m) {
    sq[m][0] = sq[m][1] = 0.f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[m][j][i] = 0.f;
    }
  }
  for (int64_t s0 = d0; s0 < d1; s0 += kMmaStageCols) {
    __syncthreads();  // every warp is done with the previous stage
    // 32 rows of kMmaStageCols columns, 8 rows per item: one item per thread (float4 granules), so
    // one load of the norm weight per thread and stage.
    stage_projection<StageLayout::kPlain>(p, 0, 32, s0, kMmaStageCols, region, kMmaStageStride,
                                          32 * kMmaStageCols / 4 / (kMmaWarps * kWarp));
    __syncthreads();
#pragma unroll 1
    for (int kb = kg; kb < kMmaStageCols / 32; kb += kMmaKGroups) {
      const int64_t col = s0 + 32 * kb + 8 * c;
      if (s0 + 32 * kb >= d1) break;
      uint4 xv[kMmaTilesPerGroup][2];
#pragma unroll
      for (int m = 0; m < kMmaTilesPerGroup; ++m) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          xv[m][h] = rows[m][h] >= 0 && col < d1
                         ? __ldg(reinterpret_cast<const uint4*>(x + static_cast<int64_t>(rows[m][h]) * d + col))
                         : make_uint4(0u, 0u, 0u, 0u);
        }
      }
      float4 wv[4][2];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int off = region + (8 * j + g) * kMmaStageStride + 32 * kb + 8 * c;
        wv[j][0] = smf4(off);
        wv[j][1] = smf4(off + 4);
      }
      project_kblock_mma<kMmaTilesPerGroup, 3>(xv, wv, acc, sq);
    }
  }
  // The k-groups' sums through shared memory (lane fastest), added in k-group order.
  __syncthreads();
  const int mine = region + warp * kMmaTilesPerGroup * kMmaLaneSums * kWarp;
#pragma unroll
  for (int m = 0; m < kMmaTilesPerGroup; ++m) {
#pragma unroll
    for (int v = 0; v < 16; ++v) smf(mine + (m * kMmaLaneSums + v) * kWarp + lane) = acc[m][v / 4][v % 4];
    smf(mine + (m * kMmaLaneSums + 16) * kWarp + lane) = sq[m][0];
    smf(mine + (m * kMmaLaneSums + 17) * kWarp + lane) = sq[m][1];
  }
  __syncthreads();
  if (kg != 0) return;
#pragma unroll 1
  for (int m = 0; m < kMmaTilesPerGroup; ++m) {
    float tot[kMmaLaneSums];
#pragma unroll
    for (int v = 0; v < kMmaLaneSums; ++v) {
      tot[v] = 0.f;
#pragma unroll
      for (int k = 0; k < kMmaKGroups; ++k) {
        const int warp_k = mg * kMmaKGroups + k;  // the warp of m-group mg and k-group k
        tot[v] += smf(region + ((warp_k * kMmaTilesPerGroup + m) * kMmaLaneSums + v) * kWarp + lane);
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      tot[16 + h] += __shfl_xor_sync(kFullMask, tot[16 + h], 1);
      tot[16 + h] += __shfl_xor_sync(kFullMask, tot[16 + h], 2);
    }
    const int tile_row0 = (mg * kMmaTilesPerGroup + m) * kMmaTileTokens;
    auto put = [&](int row, int col, float v) {
      const int n = (tile_row0 + row) * kMmaSumStride + col;
      if (gmem_out != nullptr) {
        gmem_out[n] = v;
      } else {
        smf(smem_out + n) = v;
      }
    };
#pragma unroll
    for (int v = 0; v < 16; ++v) put(g + 8 * ((v % 4) / 2), 8 * (v / 4) + 2 * c + v % 2, tot[v]);
    if (c == 0) {
      put(g, 32, tot[16]);
      put(g + 8, 32, tot[17]);
    }
  }
}

// ---- routing of a tile ---------------------------------------------------------------------------

__device__ __forceinline__ bool token_counted(const ForwardParams& p, int64_t t) {
  return p.padding == nullptr || !p.padding[t];
}

// Group-limited selection: the kept groups of token (t, group of lanes m) as a bit mask, the set
// math::kept_groups names (the topk_groups best (group score, group) order keys), every lane of the
// token's lanes ending with it.
template <int L>
__device__ __forceinline__ uint64_t kept_groups_of(const ForwardParams& p, int keys, int group_scores, int m) {
  const int E = p.c.experts, G = p.c.num_groups, per = E / G;
  for (int g = 0; g < G; ++g) {
    rm::BestTwo<uint64_t> best;
    for (int e = g * per + m; e < (g + 1) * per; e += L) best.offer(order_key(smf(keys + e), static_cast<uint32_t>(e)));
#pragma unroll
    for (int o = L / 2; o > 0; o >>= 1) {
      const uint64_t ob = __shfl_xor_sync(kFullMask, best.best, o);
      const uint64_t os = __shfl_xor_sync(kFullMask, best.second, o);
      best.offer(ob);
      best.offer(os);
    }
    if (m == 0) {
      smf(group_scores + g) = rm::group_score(order_key_value(best.best), order_key_value(best.second), p.c.group_score);
    }
  }
  __syncwarp();
  uint64_t kept = 0;
  for (int g = m; g < G; g += L) {
    const uint64_t key = order_key(smf(group_scores + g), static_cast<uint32_t>(g));
    int before = 0;
    for (int j = 0; j < G; ++j) before += order_key(smf(group_scores + j), static_cast<uint32_t>(j)) > key ? 1 : 0;
    if (before < p.c.topk_groups) kept |= uint64_t(1) << g;
  }
#pragma unroll
  for (int o = L / 2; o > 0; o >>= 1) kept |= __shfl_xor_sync(kFullMask, kept, o);
  return kept;
}

// q of the tile from its raw sums (rstd, the overflowed-row rule), written to ws.q, q_out, rstd_out.
template <int R, typename T>
__device__ __forceinline__ void finish_rows(const ForwardParams& p, const WarpScratch& ws,
                                            int64_t t0, int ntok, int lane) {
  constexpr int TT = tokens_per_warp(R);
  using AL = ArrayLanes<TT>;
  const int rp = p.c.rp, rank = p.c.rank;
  const int64_t d = p.c.d;
  AL rstd(1.f);
  if (p.c.use_norm) rstd = rm::rms_inv_scale(load_lanes<TT>(ws.ss), d, AL(p.c.eps_norm));
  AL overflow_value(0.f);
  bool overflowed[TT];
#pragma unroll
  for (int t = 0; t < TT; ++t) {
    overflowed[t] = p.c.use_norm && t < ntok && rm::rms_overflowed(rstd[t]);
    if (overflowed[t]) {  // the same in every lane: a warp-wide scan of the row
      overflow_value[t] = rm::overflowed_row_projection<float>(
          warp_row_has_non_finite(static_cast<const T*>(p.x) + (t0 + t) * d, d, lane));
    }
  }
  __syncwarp();
  for (int idx = lane; idx < rp * TT; idx += kWarp) {
    const int t = idx % TT;
    float r = rstd[0], over = overflow_value[0];
    bool is_over = overflowed[0];
#pragma unroll
    for (int u = 1; u < TT; ++u) {  // token t's values without indexing registers at run time
      r = t == u ? rstd[u] : r;
      over = t == u ? overflow_value[u] : over;
      is_over = t == u ? overflowed[u] : is_over;
    }
    smf(ws.q + idx) = is_over ? over : smf(ws.q + idx) * r;  // rstd = 1 without norm
  }
  __syncwarp();
  for (int idx = lane; idx < ntok * rank; idx += kWarp) {
    const int t = idx / rank, i = idx % rank;
    p.q_out[(t0 + t) * rank + i] = smf(ws.q + i * TT + t);
  }
#pragma unroll
  for (int t = 0; t < TT; ++t) {
    if (lane == t && t < ntok) p.rstd_out[t0 + t] = rstd[t];
  }
}

// Logits of the tile's tokens into ws.probs (and logits_out in kLogits mode): expert e = lane + 32 j
// of ScoreTokens tokens at a time, every anchor coordinate loaded once for them (their q, at most 32
// registers, and the exp/log polynomials' temporaries must fit in registers beside it).
template <int R, int TT>
struct ScoreTokens {
  static constexpr int by_rank = R == 0 ? TT : (32 / R < 1 ? 1 : (32 / R > 4 ? 4 : 32 / R));
  static constexpr int value = TT < by_rank ? TT : by_rank;
};

// Anchors per expert whose dot products score_tile keeps in registers (more are recomputed).
constexpr int kHeldAnchors = 4;

// v[h] for a run-time h < N without indexing registers at run time (a chain of selects).
template <typename V, int N>
__device__ __forceinline__ V held_value(const V (&v)[N], int h) {
  V out = v[0];
#pragma unroll
  for (int j = 1; j < N; ++j) out = h == j ? v[j] : out;
  return out;
}

// An expert's logit from its anchors' dot products u_of(h) (math/anchor_lse.h's expert_logit asks
// for each u_h twice: its max pass, then its exp pass). Up to kHeldAnchors anchors each u_h is
// computed once and held in registers, so each anchor coordinate is read once per token group;
// more anchors are recomputed. Shared by the forward's scoring and the backward's recomputed logits.
template <typename V, typename UOf>
__device__ __forceinline__ rm::ExpertLogit<V> held_expert_logit(int H, V q_scale, V sot, V tau, const UOf& u_of) {
  if (H <= kHeldAnchors) {
    V u[kHeldAnchors];
#pragma unroll
    for (int h = 0; h < kHeldAnchors; ++h) u[h] = h < H ? u_of(h) : V(0.f);
    return rm::expert_logit<V>(H, q_scale, sot, tau, [&](int h) { return held_value(u, h); }, [](int, V) {});
  }
  return rm::expert_logit<V>(H, q_scale, sot, tau, u_of, [](int, V) {});
}

// Experts per lane select_tile keeps in registers: all of E <= 64 for the 4-token tiles of rank 4
// and up (8 lanes a token); 4 otherwise (with 8, ranks 1-2 spilled on sm_80 and the rank-32
// kernel went from 168 to 254 registers, for no expert more at E <= 64 with 16 lanes a token).
L2R_HD constexpr int cached_experts(int R) {
  return tokens_per_warp(R) >= 4 && (R == 0 || R >= 4) ? 8 : 4;
}

template <int R, RouteMode M>
__device__ __forceinline__ void score_tile(const ForwardParams& p, int anchor_smem,
                                           const WarpScratch& ws, int64_t t0, int ntok,
                                           float scale, int lane) {
  constexpr int TT = tokens_per_warp(R), SB = ScoreTokens<R, TT>::value;
  using AL = ArrayLanes<SB>;
  const int E = p.c.experts, H = p.c.anchors, rp = p.c.rp, LS = p.logit_stride;
  // q: registers for the templated ranks (n = R: every index a constant), shared memory for the
  // generic one
  const int n = R > 0 ? R : rp;
  auto a_hat = [&](int i, int h, int e) {  // staged, or prepared in global memory
    const int n = (i * H + h) * E + e;
    return anchor_smem >= 0 ? smf(anchor_smem + n) : p.anchor_hat[n];
  };
  auto score = [&](const AL* q, int first) {
    const rm::NormCoef<AL> qc = rm::query_coef(q, n, AL(p.c.beta), AL(p.c.eps));
    const AL q_scale = AL(scale) * qc.coef;
    const AL sot = q_scale / AL(p.c.tau);
    for (int e = lane; e < E; e += kWarp) {
      const auto u_of = [&](int h) { return rm::anchor_dot<AL>(q, n, [&](int i) { return AL(a_hat(i, h, e)); }); };
      const rm::ExpertLogit<AL> el = held_expert_logit<AL>(H, q_scale, sot, AL(p.c.tau), u_of);
#pragma unroll
      for (int u = 0; u < SB; ++u) {
        const int t = first + u;
        smf(ws.probs + t * LS + e) = el.logit[u];
        if (M == RouteMode::kLogits && t < ntok) p.logits_out[(t0 + t) * E + e] = el.logit[u];
      }
    }
  };
#pragma unroll 1
  for (int first = 0; first < TT; first += SB) {
    if (first >= ntok) break;
    if constexpr (R > 0) {
      AL q[R];
#pragma unroll
      for (int i = 0; i < R; ++i) q[i] = load_lanes<SB>(ws.q + i * TT + first);
      score(q, first);
    } else {
      static_assert(SB == TT, "the generic rank reads whole tiles of q from shared memory");
      score(reinterpret_cast<const AL*>(smem_base() + ws.q), first);
    }
  }
  __syncwarp();
}

// Probabilities, z-loss statistic, selection and weights of the tile's tokens from ws.probs (the
// logits), then this warp's statistics (prob_sum, counts, tokens) for the chunk.
template <int TT, int kCachedExperts>
__device__ __forceinline__ void select_tile(const ForwardParams& p, const WarpScratch& ws, int64_t t0, int ntok,
                                            int lane) {
  constexpr int L = kWarp / TT;
  const int E = p.c.experts, K = p.c.top_k, LS = p.logit_stride;
  const int t = lane / L, m = lane % L;
  const bool live = t < ntok;
  const int probs = ws.probs + t * LS, keys = ws.keys + t * LS;
  // The lane's first kCachedExperts experts (m, m + L, ...) stay in registers from the logits to
  // the top-k (logit, exp, probability, selection key); the others go through shared memory at
  // every pass. Every pass visits the lane's experts in ascending order either way.
  const bool biased = p.bias != nullptr;
  float cl[kCachedExperts];  // logits, then probabilities
  float ck[kCachedExperts];  // exps, then selection keys
  // --- softmax statistics over the token's experts (its L lanes)
  float mx = -lanes::poly::kInf;
  bool nan = false;
#pragma unroll
  for (int s = 0; s < kCachedExperts; ++s) {
    const int e = m + s * L;
    cl[s] = e < E ? smf(probs + e) : 0.f;
    if (e < E) {
      nan |= lanes::is_nan(cl[s]);
      mx = lanes::vmax(cl[s], mx);
    }
  }
  for (int e = m + kCachedExperts * L; e < E; e += L) {
    const float l = smf(probs + e);
    nan |= lanes::is_nan(l);
    mx = lanes::vmax(l, mx);
  }
#pragma unroll
  for (int o = L / 2; o > 0; o >>= 1) mx = lanes::vmax(__shfl_xor_sync(kFullMask, mx, o), mx);
  const unsigned group_bits = L == kWarp ? kFullMask : ((1u << L) - 1u) << (t * L);
  rm::SoftmaxStats<float> st;
  st.max = (__ballot_sync(kFullMask, nan) & group_bits) ? lanes::from_bits(int32_t(0x7fc00000)) : mx;
  const float shift = rm::softmax_shift(st.max);
  float sum = 0.f;
#pragma unroll
  for (int s = 0; s < kCachedExperts; ++s) {
    if (m + s * L < E) {
      ck[s] = rm::logit_exp(cl[s], shift);
      sum += ck[s];
    }
  }
  for (int e = m + kCachedExperts * L; e < E; e += L) {
    const float ex = rm::logit_exp(smf(probs + e), shift);
    smf(keys + e) = ex;
    sum += ex;
  }
#pragma unroll
  for (int o = L / 2; o > 0; o >>= 1) sum += __shfl_xor_sync(kFullMask, sum, o);
  st.sum = sum;
  if (m == 0 && live) p.lse[t0 + t] = rm::stats_lse(st);
  float total = 0.f;
#pragma unroll
  for (int s = 0; s < kCachedExperts; ++s) {
    const int e = m + s * L;
    if (e < E) {
      cl[s] = rm::routing_prob(cl[s], ck[s], st.sum, p.c.sigmoid);
      ck[s] = biased ? rm::selection_key(cl[s], smf(p.bias_smem + e)) : cl[s];
      smf(probs + e) = cl[s];
      smf(keys + e) = ck[s];  // group-limited selection reads every key of the token
      total += cl[s];
    }
  }
  for (int e = m + kCachedExperts * L; e < E; e += L) {
    const float pe = rm::routing_prob(smf(probs + e), smf(keys + e), st.sum, p.c.sigmoid);
    smf(probs + e) = pe;
    smf(keys + e) = biased ? rm::selection_key(pe, smf(p.bias_smem + e)) : pe;
    total += pe;
  }
  if (p.c.sigmoid) {
#pragma unroll
    for (int o = L / 2; o > 0; o >>= 1) total += __shfl_xor_sync(kFullMask, total, o);
    if (m == 0) smf(ws.total + t) = total;
  }
  __syncwarp();
  // --- top-k: round j takes the largest order key below round j-1's (keys are unique per expert)
  uint64_t kept = ~uint64_t(0);
  if (p.c.num_groups > 1) kept = kept_groups_of<L>(p, keys, ws.group + t * p.c.num_groups, m);
  const int selected = ws.selected + t * K, selprob = ws.selprob + t * lane_rows(K, TT);
  // the cached experts as order keys (0: past E or outside the kept groups), with their
  // probabilities when biased
  uint64_t cached[kCachedExperts];
  float cached_p[kCachedExperts];
#pragma unroll
  for (int s = 0; s < kCachedExperts; ++s) {
    const int e = m + s * L;
    const bool candidate = e < E && rm::in_kept_group(e, kept, E, p.c.num_groups);
    cached[s] = candidate ? order_key(ck[s], static_cast<uint32_t>(e)) : 0;
    cached_p[s] = candidate && biased ? cl[s] : 0.f;
  }
  uint64_t previous = ~uint64_t(0);
  for (int j = 0; j < K; ++j) {
    // each lane's best candidate, then the token's best over its L lanes; its probability is the
    // key's value without a bias, else carried along from the lane that holds the expert (the
    // weights then read it from selprob: no gather of random experts' probabilities)
    uint64_t best = 0;
    float best_p = 0.f;
#pragma unroll
    for (int s = 0; s < kCachedExperts; ++s) {
      if (cached[s] < previous && cached[s] > best) {
        best = cached[s];
        best_p = cached_p[s];
      }
    }
    for (int e = m + kCachedExperts * L; e < E; e += L) {
      if (!rm::in_kept_group(e, kept, E, p.c.num_groups)) continue;
      const uint64_t key = order_key(smf(keys + e), static_cast<uint32_t>(e));
      if (key < previous && key > best) {
        best = key;
        if (biased) best_p = smf(probs + e);
      }
    }
#pragma unroll
    for (int o = L / 2; o > 0; o >>= 1) {
      const uint64_t other = __shfl_xor_sync(kFullMask, best, o);
      const float other_p = biased ? __shfl_xor_sync(kFullMask, best_p, o) : 0.f;
      if (other > best) {
        best = other;
        best_p = other_p;
      }
    }
    if (m == 0) {
      smi(selected + j) = static_cast<int>(order_key_index(best));
      smf(selprob + j) = biased ? best_p : order_key_value(best);
    }
    previous = best;
  }
  // Selection flags over the keys, for the statistics: the selected experts are the candidates
  // whose (unique) order keys are at least the last round's.
#pragma unroll
  for (int s = 0; s < kCachedExperts; ++s) {
    const int e = m + s * L;
    if (e < E) smi(keys + e) = cached[s] != 0 && cached[s] >= previous ? 1 : 0;
  }
  for (int e = m + kCachedExperts * L; e < E; e += L) {
    const uint64_t key =
        rm::in_kept_group(e, kept, E, p.c.num_groups) ? order_key(smf(keys + e), static_cast<uint32_t>(e)) : 0;
    smi(keys + e) = key != 0 && key >= previous ? 1 : 0;
  }
  __syncwarp();
  // --- weights
  float selected_sum = 0.f;
  if (p.c.normalize) {
    for (int j = 0; j < K; ++j) selected_sum += smf(selprob + j);
  }
  for (int j = m; j < K; j += L) {
    if (!live) break;
    p.weights[(t0 + t) * K + j] =
        rm::selected_weight(smf(selprob + j), selected_sum, p.c.normalize, p.c.scaling);
    p.indices[(t0 + t) * K + j] = smi(selected + j);
  }
  __syncwarp();
  // --- this warp's statistics of the chunk: expert e = lane + 32 j sums its tokens in order
  for (int e = lane; e < E; e += kWarp) {
    float s = 0.f;
    int n = 0;
    for (int u = 0; u < ntok; ++u) {
      if (!token_counted(p, t0 + u)) continue;
      s += rm::balance_prob(smf(ws.probs + u * LS + e), smf(ws.total + u), p.c.sigmoid);
      n += smi(ws.keys + u * LS + e);  // the selection flag
    }
    smf(ws.prob_sum + e) = s;
    smi(ws.counts + e) = n;
  }
  int counted = 0;
  for (int u = 0; u < ntok; ++u) counted += token_counted(p, t0 + u) ? 1 : 0;
  if (lane == 0) smi(ws.tokens) = counted;
}

// ---- statistics ----------------------------------------------------------------------------------

// Chunk c's partials: the warps' sums added in warp order, into partial c / partial_chunks: the
// first chunk of a run writes it, the next ones add to it (chunk order; every thread reads back
// only what it wrote itself, so no fence is needed). After a __syncthreads.
__device__ __forceinline__ void write_chunk_partials(const ForwardParams& p, int tt, int64_t c, int nwarps) {
  const int E = p.c.experts;
  const int64_t slot = c / p.partial_chunks;
  const bool first = c % p.partial_chunks == 0;
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    float s = 0.f;
    int n = 0;
    for (int w = 0; w < nwarps; ++w) {
      const WarpScratch ws = warp_scratch(p, tt, w);
      s += smf(ws.prob_sum + e);
      n += smi(ws.counts + e);
    }
    p.prob_partials[slot * E + e] = first ? s : p.prob_partials[slot * E + e] + s;
    p.count_partials[slot * E + e] = first ? n : p.count_partials[slot * E + e] + n;
  }
  if (threadIdx.x == 0) {
    int n = 0;
    for (int w = 0; w < nwarps; ++w) n += smi(warp_scratch(p, tt, w).tokens);
    p.token_partials[slot] = first ? n : p.token_partials[slot] + n;
  }
}

// mean_probs and tokens_per_expert of every statistics group from the partials (write_chunk_partials:
// one per chunk, or per run of partial_chunks chunks), each group's partials added in chunk order:
// item (group, expert) over `parts` threads, each adding a fixed run of partials, then the runs in
// order. The runs sit part-major ([part][item]) so that
// consecutive threads touch consecutive shared words (and consecutive experts' partials in global
// memory). scratch: shared offset of 5 * blockDim.x floats (8-byte aligned).
__device__ __forceinline__ void finalize_statistics(const ForwardParams& p, int scratch) {
  const TokenChunks& ch = p.chunks;
  const int E = p.c.experts;
  const int64_t groups = ch.count / ch.per_seq;
  const int64_t per_group = ch.per_seq / p.partial_chunks;  // partials per statistics group
  const int64_t items = groups * E;
  const int64_t threads = blockDim.x;
  const int64_t parts = items >= threads ? 1 : (threads / items < per_group ? threads / items : per_group);
  const int64_t per_part = (per_group + parts - 1) / parts;
  float* part_sum = smem_base() + scratch;
  int64_t* part_count = reinterpret_cast<int64_t*>(part_sum + threads);
  int64_t* part_tokens = part_count + threads;
  for (int64_t n = threadIdx.x; n < items * parts; n += threads) {
    const int64_t part = n / items, item = n % items;
    const int64_t s = item / E, e = item % E;
    const int64_t c0 = s * per_group + part * per_part;
    const int64_t c1 = c0 + per_part < (s + 1) * per_group ? c0 + per_part : (s + 1) * per_group;
    float sum = 0.f;
    int64_t count = 0, tokens = 0;
    for (int64_t c = c0; c < c1; ++c) {
      sum += p.prob_partials[c * E + e];
      count += p.count_partials[c * E + e];
      tokens += p.token_partials[c];
    }
    if (parts == 1) {
      p.mean_probs[item] = rm::mean_over_tokens(sum, tokens);
      p.tokens_per_expert[item] = count;
    } else {
      part_sum[n] = sum;
      part_count[n] = count;
      part_tokens[n] = tokens;
    }
  }
  if (parts == 1) return;
  __syncthreads();
  for (int64_t item = threadIdx.x; item < items; item += threads) {
    float sum = 0.f;
    int64_t count = 0, tokens = 0;
    for (int64_t part = 0; part < parts; ++part) {
      sum += part_sum[part * items + item];
      count += part_count[part * items + item];
      tokens += part_tokens[part * items + item];
    }
    p.mean_probs[item] = rm::mean_over_tokens(sum, tokens);
    p.tokens_per_expert[item] = count;
  }
}

// The block's ticket of counters[word] (after a __syncthreads: every write of the block is before
// thread 0's release fence); true in every thread of the block that took the last one.
// The flag word of the block (shared offset 0).
constexpr int kFlagSmem = 0;

__device__ __forceinline__ bool last_ticket(unsigned* counters, int word, unsigned tickets) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();  // release: this block's writes before the ticket
    const unsigned ticket = atomicInc(counters + word, tickets - 1);  // wraps back to 0
    __threadfence();  // acquire: the other blocks' writes before their tickets
    smi(kFlagSmem) = ticket == tickets - 1 ? 1 : 0;
  }
  __syncthreads();
  return smi(kFlagSmem) != 0;
}

// ---- the kernel ----------------------------------------------------------------------------------

template <int R, typename T, RouteMode M>
__global__ void __launch_bounds__(forward_max_warps(R) * kWarp, 1) route_forward_kernel(const ForwardParams p) {
  constexpr int TT = tokens_per_warp(R);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
  const int E = p.c.experts;
  if (p.bias != nullptr) {
    for (int e = threadIdx.x; e < E; e += blockDim.x) smf(p.bias_smem + e) = __ldg(p.bias + e);
  }
  bool resident = false;
  if constexpr (M != RouteMode::kSelect) {
    // normalised anchors: staged here, or prepared in global memory when they do not fit
    if (p.anchor_smem >= 0) stage_anchors(p.anchors, p.c, p.anchor_smem);
    // One row block whose columns all fit: staged once for every chunk of this block.
    const int64_t range = p.splits > 1 ? p.split_cols : p.c.d;
    resident = tile_rows(R) == p.c.rp && range <= p.stage_cols;
    if (resident) {
      const int64_t col0 = p.splits > 1 ? (blockIdx.x % p.splits) * static_cast<int64_t>(p.split_cols) : 0;
      stage_projection(p, 0, tile_rows(R), col0, p.stage_cols, p.proj_smem, p.stage_cols);
    }
  }
  __syncthreads();
  // (warp_scratch is recomputed where it is used: its offsets are not kept live in registers
  // across the projection)
  const int64_t tile = static_cast<int64_t>(nwarps) * TT;
  auto tokens_of = [&](int64_t c, int64_t* t0) {
    *t0 = p.chunks.begin(c) + static_cast<int64_t>(warp) * TT;
    const int64_t n = p.chunks.end(c) - *t0;
    return static_cast<int>(n < 0 ? 0 : (n < TT ? n : TT));
  };
  auto route_chunk = [&](int64_t c, int64_t t0, int ntok) {
    const WarpScratch ws = warp_scratch(p, TT, warp);
    if constexpr (M != RouteMode::kSelect) {
      finish_rows<R, T>(p, ws, t0, ntok, lane);
      score_tile<R, M>(p, p.anchor_smem, ws, t0, ntok, __ldg(p.scale), lane);
    } else {
      for (int n = lane; n < ntok * E; n += kWarp) smf(ws.probs + (n / E) * p.logit_stride + n % E) = p.logits_in[t0 * E + n];
      __syncwarp();
    }
    if constexpr (M != RouteMode::kLogits) {
      select_tile<TT, cached_experts(R)>(p, ws, t0, ntok, lane);
      __syncthreads();
      write_chunk_partials(p, TT, c, nwarps);
    }
  };

  bool mma = false;
  if constexpr (R == 32 && IsBf16<T>::value && M != RouteMode::kSelect) mma = p.mma_splits > 0;
  int64_t c_begin = blockIdx.x;  // the first chunk this block routes (then every gridDim.x-th)
  if (mma) {
    if constexpr (R == 32 && IsBf16<T>::value && M != RouteMode::kSelect) {
      // --- tensor cores: kMmaChunks chunks over one range of columns (route_kernel_params.h),
      // routed one after another by the loop below (its only other use is the persistent path's)
      const int splits = p.mma_splits;
      const int64_t sc = blockIdx.x / splits;
      const int split = static_cast<int>(blockIdx.x % splits);
      c_begin = sc * kMmaChunks;
      if (splits == 1) {
        project_chunks_mma(p, c_begin, 0, warp, lane, nullptr, p.mma_sum_smem);
      } else {
        float* part = p.split_partials + (sc * splits + split) * static_cast<int64_t>(kMmaSumFloats);
        project_chunks_mma(p, c_begin, split, warp, lane, part, -1);
        if (!last_ticket(p.counters, 1 + static_cast<int>(sc), static_cast<unsigned>(splits))) return;
        // the last block of the chunks: the splits' sums added in split order
        // (16-byte loads: kMmaSumFloats and the block's partials are multiples of 4 floats)
        const float4* all = reinterpret_cast<const float4*>(p.split_partials + sc * splits * static_cast<int64_t>(kMmaSumFloats));
        for (int n = threadIdx.x; n < kMmaSumFloats / 4; n += blockDim.x) {
          float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
          for (int u = 0; u < splits; ++u) {
            const float4 w = all[static_cast<int64_t>(u) * (kMmaSumFloats / 4) + n];
            v = make_float4(v.x + w.x, v.y + w.y, v.z + w.z, v.w + w.w);
          }
          smf4(p.mma_sum_smem + 4 * n) = v;
        }
      }
      __syncthreads();
    }
  }
  if (!mma && p.splits > 1) {
    // --- d split: this block's raw sums of chunk c over one range of columns
    const int64_t c = blockIdx.x / p.splits;
    const int s = static_cast<int>(blockIdx.x % p.splits);
    int64_t t0;
    const int ntok = tokens_of(c, &t0);
    const WarpScratch ws = warp_scratch(p, TT, warp);
    const int64_t col_begin = static_cast<int64_t>(s) * p.split_cols;
    const int64_t col_end = col_begin + p.split_cols < p.c.d ? col_begin + p.split_cols : p.c.d;
    project_tile<R, T>(p, ws, t0, ntok, col_begin, col_end, resident, lane);
    __syncwarp();
    const int rp1 = p.c.rp + 1;
    float* mine = p.split_partials + ((c * p.splits + s) * tile + static_cast<int64_t>(warp) * TT) * rp1;
    for (int n = lane; n < ntok * rp1; n += kWarp) {
      const int t = n / rp1, k = n % rp1;
      mine[n] = k < p.c.rp ? smf(ws.q + k * TT + t) : smf(ws.ss + t);
    }
    if (!last_ticket(p.counters, 1 + static_cast<int>(c), static_cast<unsigned>(p.splits))) return;
    // --- the chunk's last block: sums over the splits in split order, then the routing
    for (int n = lane; n < ntok * rp1; n += kWarp) {
      const int t = n / rp1, k = n % rp1;
      float v = 0.f;
      for (int u = 0; u < p.splits; ++u) {
        v += p.split_partials[((c * p.splits + u) * tile + static_cast<int64_t>(warp) * TT) * rp1 + n];
      }
      if (k < p.c.rp) {
        smf(ws.q + k * TT + t) = v;
      } else {
        smf(ws.ss + t) = v;
      }
    }
    __syncwarp();
    route_chunk(c, t0, ntok);
  } else {
    // Persistent blocks: chunks blockIdx.x, + gridDim.x, ...; the tensor-core path: its block's
    // kMmaChunks chunks in order (c_begin is a multiple of kMmaChunks: c % kMmaChunks is the chunk's
    // place in the block's sums). Only c and mma stay live across route_chunk, which needs every
    // register it can get at rank 32.
    for (int64_t c = c_begin; c < p.chunks.count; c += mma ? 1 : gridDim.x) {
      int64_t t0;
      const int ntok = tokens_of(c, &t0);
      if constexpr (M != RouteMode::kSelect) {
        if (mma) {
          const WarpScratch ws = warp_scratch(p, TT, warp);
          const int i = static_cast<int>(c % kMmaChunks);
          for (int n = lane; n < TT * kMmaSumStride; n += kWarp) {
            const int t = n / kMmaSumStride, k = n % kMmaSumStride;
            const float v = smf(p.mma_sum_smem + (i * kMmaTileTokens + warp * TT + t) * kMmaSumStride + k);
            if (k == 32) {
              smf(ws.ss + t) = v;
            } else if (k < p.c.rp) {
              smf(ws.q + k * TT + t) = v;
            }
          }
        } else {
          project_tile<R, T>(p, warp_scratch(p, TT, warp), t0, ntok, 0, p.c.d, resident, lane);
        }
        __syncwarp();
      }
      route_chunk(c, t0, ntok);
      __syncthreads();  // the next chunk reuses every warp's scratch
      if (mma && c % kMmaChunks == kMmaChunks - 1) break;
    }
  }
  if constexpr (M != RouteMode::kLogits) {
    if (!last_ticket(p.counters, 0, static_cast<unsigned>(p.finishers))) return;
    finalize_statistics(p, p.warp_smem);
  }
}

}  // namespace
}  // namespace route
}  // namespace l2r
