// The rank-32 backward's column pass on tensor cores, for bf16 x with 16-byte rows (issue 13: at
// d = 4096, r = 32 the token kernel's float32 dL/dx_hat = grad_q W re-read the 512 KB projection
// per token tile from L2, and the column kernel's float32 FMAs alone cost more than reading x).
//
// A column block (column group of kColumnMmaGroupCols = 128 columns, token chunk) does, for its
// chunk's tokens, both products that need x or the projection by columns:
//   dL/dx[t, i]  = RMSNorm'(sum_k grad_q[t, k] w[k, i])            (w = proj * g, rows >= r zero)
//   M[k, i]     += sum_t (rstd[t] grad_q[t, k]) x[t, i]              (the column partials)
// so x is read once per backward, and the projection once per block. Warp w takes the group's 16
// columns [16 w, 16 w + 16) and every 16-token m-tile of the chunk; nothing is added across warps.
// The block stages each pass's grad_q in the layout each product's A fragments read as float2
// (rows for dL/dx_hat, token pairs for M); RMSNorm's mean_dot comes from the token kernel, which
// has q and grad_q in registers (BackwardParams::mean_dot).
//
// Precision (every operand bf16, every sum float32 on the tensor cores):
// - dL/dx_hat: grad_q and w as two bf16 parts each (v = hi + lo, lo the nearest bf16 to v - hi),
//   three products hi*hi + hi*lo + lo*hi: about 2^-16 relative per product, far below the bf16
//   rounding of the stored dL/dx.
// - M: x is exact in bf16; rstd * grad_q (rounded once in float32) as three bf16 parts (about
//   2^-24), as the forward's projection (route_project_mma.cuh): the parameter gradients keep
//   float32 accuracy.
//
// Fragment mappings (csrc/common/mma_sync.cuh: lane = 4 g + q). The MMA's k order is free when A and
// B agree, and so is the map from n-slots to columns when the result is stored by the same map:
// - dL/dx_hat: A = grad_q [16 tokens x 32 ranks] (k = rank, natural order), B = w [32 ranks x 8] per
//   n-tile j < 2, n-slot n <-> column 4 (n / 2) + 2 j + n % 2 of the warp's 16: lane (g, q)'s C
//   fragments are tokens g and g + 8, columns 4 q .. 4 q + 3, so x and dL/dx move as 8-byte vectors.
// - M: A = (rstd grad_q)^T [32 ranks (two m-tiles) x 16 tokens] (k = token, natural order), B = x
//   [16 tokens x 8] per n-tile j < 2, n-slot n <-> column 2 n + j: a lane reads the 4-byte word of
//   columns 2 g, 2 g + 1 of 4 tokens from the warp's x tile and interleaves two tokens' halves into
//   each B register.
#pragma once

#include "route_device.cuh"
#include "route_project_mma.cuh"

namespace l2r {
namespace route {

constexpr int kColumnMmaTile = 64;        // tokens staged per pass (4 m-tiles)
constexpr int kColumnMmaStride = 40;      // floats per staged grad_q row [token][rank]: dL/dx_hat's
                                          // float2 A reads (row g, word 2 q) fall in distinct 8-byte
                                          // bank pairs of each half-warp (4 g + q of 16)
constexpr int kColumnMmaPairStride = 72;  // floats per staged pair row of rstd * grad_q [pair][rank][2]
                                          // (a rank of two tokens side by side): M's float2 A reads
                                          // (pair q, rank g) fall in distinct bank pairs (4 q + g),
                                          // the staging float4 stores of 8 lanes in one row's 32 words
constexpr int kColumnMmaXStride = 12;     // 32-bit words per row of a warp's x tile (16 tokens x 16
                                          // bf16 columns): the B reads of M (rows 2 q + b, word g) fall
                                          // in distinct banks (24 q + g), the 8-byte stores at most 2-way

// v = hi + lo as bf16 bit patterns (lo the nearest bf16 to v - hi, which float holds exactly).
__device__ __forceinline__ void bf16_split2(float v, uint16_t& hi, uint16_t& lo) {
  hi = bf16_bits_rn(v);
  lo = bf16_bits_rn(v - bf16_bits_value(hi));
}

// The column block (group: its first column; c: its chunk) of route_backward_column_kernel's
// tensor-core pass: dL/dx of the chunk's tokens in the group's columns (p.grad_x not null), and
// the column partials partials[c, k, i] of all 32 ranks (p.need_param_grads).
template <typename T>
__device__ __forceinline__ void column_pass_mma(const ColumnParams& p, int64_t group, int64_t c) {
  __shared__ __align__(16) float gq_rows[kColumnMmaTile * kColumnMmaStride];  // grad_q [token][rank]
  __shared__ __align__(16) float s_pairs[kColumnMmaTile / 2 * kColumnMmaPairStride];  // rstd grad_q
  __shared__ float tok_rstd[kColumnMmaTile];                                 // 0 past the tokens
  __shared__ float tok_mean_dot[kColumnMmaTile];
  __shared__ __align__(16) uint32_t x_tiles[kColumnWarps][16 * kColumnMmaXStride];  // per warp
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int g = lane / 4, q = lane % 4;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  T* __restrict__ grad_x = static_cast<T*>(p.grad_x);
  const float* __restrict__ grad_q = p.grad_q;
  const int64_t d = p.d, tokens = p.tokens;
  const int rank = p.rank;
  const bool use_norm = p.use_norm, want_gx = grad_x != nullptr, want_m = p.need_param_grads;
  const int64_t col0 = group + static_cast<int64_t>(kColumnMmaWarpCols) * warp;
  const int64_t t0 = c * p.chunk;
  const int64_t t1 = t0 + p.chunk < tokens ? t0 + p.chunk : tokens;

  // B fragments of dL/dx_hat for the whole chunk: [n-tile j][k-step s][part hi, lo][register].
  uint32_t wb[2][2][2][2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int64_t col = col0 + 4 * (g / 2) + 2 * j + g % 2;
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      uint16_t hi[4], lo[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int k = 16 * s + 2 * q + (e & 1) + 8 * (e >> 1);  // b[0]: k-slots 2q, 2q + 1; b[1]: + 8
        float w = 0.f;
        if (want_gx && k < rank && col < d) {
          w = __ldg(p.proj + k * d + col);
          if (p.g != nullptr) w *= __ldg(p.g + col);
        }
        bf16_split2(w, hi[e], lo[e]);
      }
      wb[j][s][0][0] = pack_bf16x2(hi[0], hi[1]);
      wb[j][s][0][1] = pack_bf16x2(hi[2], hi[3]);
      wb[j][s][1][0] = pack_bf16x2(lo[0], lo[1]);
      wb[j][s][1][1] = pack_bf16x2(lo[2], lo[3]);
    }
  }

  float macc[2][2][4];  // M: [rank m-tile][n-tile][C fragment]
#pragma unroll
  for (int mr = 0; mr < 2; ++mr) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int i = 0; i < 4; ++i) macc[mr][j][i] = 0.f;
    }
  }

  uint32_t* xs = x_tiles[warp];
  for (int64_t s0 = t0; s0 < t1; s0 += kColumnMmaTile) {
    const int n = static_cast<int>(t1 - s0 < kColumnMmaTile ? t1 - s0 : kColumnMmaTile);
    // Stage the pass's grad_q ([T, 32], zero past its tokens) twice: as rows [token][rank] (A of
    // dL/dx_hat) and, times rstd, as token pairs [pair][rank][2] (A of M, whose k is the token: a
    // float2 there is one rank of two tokens). A thread takes ranks 2 j, 2 j + 1 of a token pair:
    // 16 threads read two whole 128-byte rows.
    static_assert(kColumnMmaTile / 2 * 16 % kColumnThreads == 0, "whole staging rounds");
    for (int m = threadIdx.x; m < kColumnMmaTile / 2 * 16; m += kColumnThreads) {
      const int pr = m / 16, j = m % 16, u = 2 * pr;
      float2 v[2] = {make_float2(0.f, 0.f), make_float2(0.f, 0.f)};
      float r[2] = {0.f, 0.f};
#pragma unroll
      for (int b = 0; b < 2; ++b) {
        if (u + b < n) {
          v[b] = __ldg(reinterpret_cast<const float2*>(grad_q + (s0 + u + b) * 32 + 2 * j));
          r[b] = use_norm ? __ldg(p.rstd + s0 + u + b) : 1.f;
        }
        *reinterpret_cast<float2*>(gq_rows + (u + b) * kColumnMmaStride + 2 * j) = v[b];
      }
      *reinterpret_cast<float4*>(s_pairs + pr * kColumnMmaPairStride + 4 * j) =
          make_float4(r[0] * v[0].x, r[1] * v[1].x, r[0] * v[0].y, r[1] * v[1].y);
    }
    // rstd and RMSNorm's mean_dot = <grad_q, q> / d (the token kernel's) for the dL/dx epilogue
    for (int u = threadIdx.x; u < kColumnMmaTile; u += kColumnThreads) {
      tok_rstd[u] = u < n ? (use_norm ? __ldg(p.rstd + s0 + u) : 1.f) : 0.f;
      tok_mean_dot[u] = u < n && want_gx && use_norm ? __ldg(p.mean_dot + s0 + u) : 0.f;
    }
    __syncthreads();

    for (int r0 = 0; r0 < n; r0 += 16) {
      // x of tokens r0 + g and r0 + g + 8, columns 4 q .. 4 q + 3 (zero past the tokens or d): the
      // epilogue's x_hat, and the warp's x tile that M's B fragments are read from
      uint2 xr[2] = {make_uint2(0u, 0u), make_uint2(0u, 0u)};
      if (want_m || (want_gx && use_norm)) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int u = r0 + g + 8 * h;
          if (u < n && col0 + 4 * q < d) xr[h] = __ldg(reinterpret_cast<const uint2*>(x + (s0 + u) * d + col0 + 4 * q));
        }
      }
      if (want_m) {
#pragma unroll
        for (int h = 0; h < 2; ++h) *reinterpret_cast<uint2*>(xs + (g + 8 * h) * kColumnMmaXStride + 2 * q) = xr[h];
        __syncwarp();
      }
      if (want_gx) {
        float acc[2][4];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[j][i] = 0.f;
        }
#pragma unroll
        for (int s = 0; s < 2; ++s) {
          // A: tokens r0 + g, r0 + g + 8; ranks 16 s + 2 q + {0, 1}, and + 8
          const float* ra = gq_rows + (r0 + g) * kColumnMmaStride + 16 * s + 2 * q;
          const float* rb = ra + 8 * kColumnMmaStride;
          const float2 v[4] = {*reinterpret_cast<const float2*>(ra), *reinterpret_cast<const float2*>(rb),
                               *reinterpret_cast<const float2*>(ra + 8), *reinterpret_cast<const float2*>(rb + 8)};
          uint32_t ahi[4], alo[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            uint16_t h0, l0, h1, l1;
            bf16_split2(v[e].x, h0, l0);
            bf16_split2(v[e].y, h1, l1);
            ahi[e] = pack_bf16x2(h0, h1);
            alo[e] = pack_bf16x2(l0, l1);
          }
#pragma unroll
          for (int j = 0; j < 2; ++j) {  // the small products first
            mma_m16n8k16_bf16(acc[j], alo, wb[j][s][0], acc[j]);
            mma_m16n8k16_bf16(acc[j], ahi, wb[j][s][1], acc[j]);
            mma_m16n8k16_bf16(acc[j], ahi, wb[j][s][0], acc[j]);
          }
        }
        const int64_t col = col0 + 4 * q;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int u = r0 + g + 8 * h;
          if (u < n && col < d) {
            const int64_t t = s0 + u;
            float out[4];  // columns 4 q + 2 j + b: C fragment 2 h + b of n-tile j
#pragma unroll
            for (int j = 0; j < 2; ++j) {
              out[2 * j] = acc[j][2 * h];
              out[2 * j + 1] = acc[j][2 * h + 1];
            }
            if (use_norm) {
              const uint32_t words[2] = {xr[h].x, xr[h].y};
              const float r = tok_rstd[u], md = tok_mean_dot[u];
#pragma unroll
              for (int e = 0; e < 4; ++e) {
                const uint32_t w = words[e / 2];
                const float xv = bf16_bits_value(static_cast<uint16_t>(e % 2 ? w >> 16 : w & 0xffffu));
                out[e] = rm::rms_norm_input_grad(out[e], rm::rms_normalized(xv, r), r, md);
              }
            }
            uint2 raw;
            T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
            for (int k = 0; k < 4; ++k) store_float(e + k, out[k]);
            *reinterpret_cast<uint2*>(grad_x + t * d + col) = raw;
          }
        }
      }
      if (want_m) {
        // B: x of the tokens at k-slots 2q, 2q + 1, 2q + 8, 2q + 9, columns 2 g (n-tile 0) and
        // 2 g + 1 (n-tile 1), from the warp's tile
        uint32_t xb[2][2];  // [n-tile][register]
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const uint32_t lo_tok = xs[(2 * q + 8 * r) * kColumnMmaXStride + g];
          const uint32_t hi_tok = xs[(2 * q + 1 + 8 * r) * kColumnMmaXStride + g];
          xb[0][r] = (lo_tok & 0xffffu) | (hi_tok << 16);
          xb[1][r] = (lo_tok >> 16) | (hi_tok & 0xffff0000u);
        }
        __syncwarp();  // the tile is read before the next m-tile's x overwrites it
#pragma unroll
        for (int mr = 0; mr < 2; ++mr) {
          // A: ranks 16 mr + g (+ 8) by tokens 2 q, 2 q + 1 (+ 8), one float2 of the token pairs:
          // rstd * grad_q as three bf16 parts, each the nearest bf16 to the remainder after the
          // parts before it (as in route_project_mma.cuh), the largest first; value 2 e + b is the
          // lower (b = 0) or upper k of register e
          float rest[8];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int k = 16 * mr + g + 8 * (e & 1);
            const int pr = r0 / 2 + q + 4 * (e >> 1);
            const float2 v = *reinterpret_cast<const float2*>(s_pairs + pr * kColumnMmaPairStride + 2 * k);
            rest[2 * e] = v.x;
            rest[2 * e + 1] = v.y;
          }
#pragma unroll
          for (int pp = 0; pp < 3; ++pp) {
            uint32_t a[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const uint16_t lo = bf16_bits_rn(rest[2 * e]), hi = bf16_bits_rn(rest[2 * e + 1]);
              rest[2 * e] -= bf16_bits_value(lo);
              rest[2 * e + 1] -= bf16_bits_value(hi);
              a[e] = pack_bf16x2(lo, hi);
            }
#pragma unroll
            for (int j = 0; j < 2; ++j) mma_m16n8k16_bf16(macc[mr][j], a, xb[j], macc[mr][j]);
          }
        }
      }
    }
    __syncthreads();  // the pass's rows are read before the next pass overwrites them
  }

  if (want_m) {
    // C fragment i of (mr, j): rank 16 mr + g + 8 (i / 2), column 2 (2 q + i % 2) + j
#pragma unroll
    for (int mr = 0; mr < 2; ++mr) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int k = 16 * mr + g + 8 * (i / 2);
          const int64_t col = col0 + 2 * (2 * q + i % 2) + j;
          if (col < d) p.partials[(c * 32 + k) * d + col] = macc[mr][j][i];
        }
      }
    }
  }
}

}  // namespace route
}  // namespace l2r
