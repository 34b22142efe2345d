// The routing projection on tensor cores: raw sums <proj_w row n, x row t> of 16-token m-tiles
// against all 32 rows of a rank-32 projection, one 32-column k-block at a time, for bf16 x, with
// the float32 projection split into bf16 parts (hi + mid + lo) so that the products keep float32
// accuracy. The building block of the rank-32 forward's tensor-core path (issue 13: at d = 4096,
// r = 32 the float32 FMAs alone cost 2.7x the time of reading x); checked against a float64
// product in the SIMT emulator (tests/simt/test_project_mma.py) and on a GPU (scripts/gpu_check.sh,
// tests/gpu/project_mma_main.cu). Device code only; every lane of the warp calls it (mma.sync).
//
// Lane l = 4g + c of a k-block [col0, col0 + 32) holds x columns [col0 + 8c, col0 + 8c + 8) of
// rows g and g + 8 of each m-tile (two 16-byte loads per m-tile) and the same 8 columns of
// projection rows 8j + g, j < 4. The MMA's k order is a permutation of the columns (any order
// gives the same dot product as long as A and B agree): k-step s uses the lane's columns
// 8c + 4s + {0, 1} as k-slots 2c, 2c + 1 and 8c + 4s + {2, 3} as k-slots 2c + 8, 2c + 9
// (csrc/common/mma_sync.cuh's fragment table), so x and the projection both load as whole
// 16-byte vectors and no lane exchanges anything.
#pragma once

#include "../../common/hd.h"

#include "../../common/mma_sync.cuh"

namespace l2r {
namespace route {

// Rows of the projection one call covers: 4 n-tiles of 8.
constexpr int kMmaRank = 32;

// The nearest bf16 to a finite float (round to nearest, ties to even), as its bits.
__device__ __forceinline__ uint16_t bf16_bits_rn(float v) {
  const uint32_t u = __float_as_uint(v);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
__device__ __forceinline__ float bf16_bits_value(uint16_t b) { return __uint_as_float(static_cast<uint32_t>(b) << 16); }

// acc[m][j][i] += the lane's C fragment i of m-tile m, n-tile j (token 16m + g + 8 (i / 2), rank
// 8j + 2c + i % 2) over one k-block; ss[m][h] += squares of the lane's x of row g + 8h of m-tile m.
// Each projection value w enters as kParts bf16 parts, each the nearest bf16 to the remainder after
// the parts before it (every remainder exact in float): three parts carry w to within 2^-24 |w|
// (8 + 8 + 8 significant bits); fewer lose float32 accuracy (bf16 alone: about 2^-9; the tests show
// that two are not enough either).
// x[m][h]: the lane's 8 bf16 columns of row g + 8h of m-tile m (zero past d or past the tokens).
// w[j][0..1]: projection row 8j + g, the lane's 8 columns as floats (zero past d or the rank).
template <int MT, int kParts>
__device__ __forceinline__ void project_kblock_mma(const uint4 (&x)[MT][2], const float4 (&w)[4][2],
                                                   float (&acc)[MT][4][4], float (&ss)[MT][2]) {
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint32_t words[4] = {x[m][h].x, x[m][h].y, x[m][h].z, x[m][h].w};
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const float lo = bf16_bits_value(static_cast<uint16_t>(words[q] & 0xffffu));
        const float hi = bf16_bits_value(static_cast<uint16_t>(words[q] >> 16));
        ss[m][h] = fmaf(lo, lo, ss[m][h]);
        ss[m][h] = fmaf(hi, hi, ss[m][h]);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float cols[8] = {w[j][0].x, w[j][0].y, w[j][0].z, w[j][0].w, w[j][1].x, w[j][1].y, w[j][1].z, w[j][1].w};
    // Part p of each value from its remainder after parts 0 .. p - 1, recomputed per part: the 24
    // parts of the lane's 8 values are never all live (registers are the scarce resource here).
    float rest[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) rest[e] = cols[e];
#pragma unroll
    for (int p = 0; p < kParts; ++p) {
      uint16_t part[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        part[e] = bf16_bits_rn(rest[e]);
        rest[e] -= bf16_bits_value(part[e]);
      }
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        const uint32_t b[2] = {l2r::pack_bf16x2(part[4 * s], part[4 * s + 1]),
                               l2r::pack_bf16x2(part[4 * s + 2], part[4 * s + 3])};
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          const uint32_t s0 = s == 0 ? x[m][0].x : x[m][0].z, s1 = s == 0 ? x[m][0].y : x[m][0].w;
          const uint32_t t0 = s == 0 ? x[m][1].x : x[m][1].z, t1 = s == 0 ? x[m][1].y : x[m][1].w;
          const uint32_t a[4] = {s0, t0, s1, t1};  // row g, row g + 8, then the upper k-slots
          l2r::mma_m16n8k16_bf16(acc[m][j], a, b, acc[m][j]);
        }
      }
    }
  }
}

}  // namespace route
}  // namespace l2r
