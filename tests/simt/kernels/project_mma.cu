// The tensor-core projection block (csrc/route/cuda/route_project_mma.cuh) on its own: each warp
// projects MT m-tiles of 16 tokens of bf16 x [tokens, d] against a float32 projection [rank <= 32, d]
// (proj_w, the norm weight already folded in) over every 32-column k-block, then writes the raw
// sums q [tokens, rank] and the sums of squares ss [tokens]. Built by the SIMT emulator
// (tests/simt/test_project_mma.py) and by nvcc on a GPU (tests/gpu/project_mma_main.cu).
#include <cuda_runtime.h>
#include <stdint.h>

#include "route/cuda/route_project_mma.cuh"

namespace project_mma {

template <int MT, int kParts>
__global__ void project_kernel(const uint16_t* __restrict__ x, const float* __restrict__ proj_w, int64_t tokens,
                               int64_t d, int rank, float* __restrict__ q, float* __restrict__ ss) {
  const int lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const int64_t t_base = (static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32) * 16 * MT;
  float acc[MT][4][4] = {};
  float sq[MT][2] = {};
  for (int64_t col0 = 0; col0 < d; col0 += 32) {
    const int64_t col = col0 + 8 * c;
    const bool whole = col + 8 <= d;  // (d % 8 == 0: 16-byte aligned rows)
    uint4 xv[MT][2];
#pragma unroll
    for (int m = 0; m < MT; ++m) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t row = t_base + 16 * m + g + 8 * h;
        uint32_t wd[4] = {0u, 0u, 0u, 0u};
        if (row < tokens && whole) {
          const uint4 v = *reinterpret_cast<const uint4*>(x + row * d + col);
          wd[0] = v.x, wd[1] = v.y, wd[2] = v.z, wd[3] = v.w;
        } else if (row < tokens) {
          for (int e = 0; e < 8; ++e) {
            if (col + e < d) wd[e / 2] |= static_cast<uint32_t>(x[row * d + col + e]) << (16 * (e % 2));
          }
        }
        xv[m][h] = make_uint4(wd[0], wd[1], wd[2], wd[3]);
      }
    }
    float4 wv[4][2];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int n = 8 * j + g;
      float f[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      if (n < rank) {
        for (int e = 0; e < 8; ++e) f[e] = col + e < d ? proj_w[n * d + col + e] : 0.f;
      }
      wv[j][0] = make_float4(f[0], f[1], f[2], f[3]);
      wv[j][1] = make_float4(f[4], f[5], f[6], f[7]);
    }
    l2r::route::project_kblock_mma<MT, kParts>(xv, wv, acc, sq);
  }
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      sq[m][h] += __shfl_xor_sync(0xffffffffu, sq[m][h], 1);
      sq[m][h] += __shfl_xor_sync(0xffffffffu, sq[m][h], 2);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t row = t_base + 16 * m + g + 8 * (i / 2);
        const int n = 8 * j + 2 * c + i % 2;
        if (row < tokens && n < rank) q[row * rank + n] = acc[m][j][i];
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = t_base + 16 * m + g + 8 * h;
      if (c == 0 && row < tokens) ss[row] = sq[m][h];
    }
  }
}

template <int MT, int kParts>
int launch(const uint16_t* x, const float* proj_w, int64_t tokens, int64_t d, int rank, float* q, float* ss,
           int warps) {
  const int64_t per_block = 16 * MT * warps;
  const int blocks = static_cast<int>((tokens + per_block - 1) / per_block);
  project_kernel<MT, kParts><<<blocks, 32 * warps>>>(x, proj_w, tokens, d, rank, q, ss);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace project_mma

// mt in {1, 2}, parts in {1, 2, 3}; -1 for any other.
extern "C" int project_mma_launch(const uint16_t* x, const float* proj_w, int64_t tokens, int64_t d, int rank,
                                  float* q, float* ss, int mt, int parts, int warps) {
  using namespace project_mma;
  if (mt == 1 && parts == 1) return launch<1, 1>(x, proj_w, tokens, d, rank, q, ss, warps);
  if (mt == 1 && parts == 2) return launch<1, 2>(x, proj_w, tokens, d, rank, q, ss, warps);
  if (mt == 1 && parts == 3) return launch<1, 3>(x, proj_w, tokens, d, rank, q, ss, warps);
  if (mt == 2 && parts == 3) return launch<2, 3>(x, proj_w, tokens, d, rank, q, ss, warps);
  return -1;
}
