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


// ---- the block decomposition proposed for the rank-32 forward (docs: README, issue 13) ----------
// A block of 8 warps = 2 m-groups x 4 k-groups covers 2 * S m-tiles (32 S tokens) over one of
// `splits` column ranges of d (split s = blockIdx.x % splits): the float32 projection of its range
// is staged in shared memory 256 columns at a time (read once per block from L2, rows padded by
// 4 floats so that the two rows of a 16-byte phase fall in distinct banks), each warp takes every
// 4th k-block of a stage for its S m-tiles, and the 4 k-groups' sums are added in k-group order
// through shared memory. Writes partials [splits][tokens][rank + 1] (raw sums, then the sum of
// squares). An experiment for the cost model (benchmarks/tensor_core_design.py), checked here.
constexpr int kMGroups = 2, kKGroups = 4, kStageCols = 256, kStageStride = kStageCols + 4;

__host__ __device__ constexpr int split_smem_floats(int S) {
  const int stage = 32 * kStageStride, red = kMGroups * kKGroups * S * 18 * 32;
  return stage > red ? stage : red;
}

template <int S>
__global__ void __launch_bounds__(256, 1) project_split_kernel(const uint16_t* __restrict__ x,
                                                               const float* __restrict__ proj_w, int64_t tokens,
                                                               int64_t d, int rank, int splits,
                                                               float* __restrict__ partials) {
  extern __shared__ float4 split_smem4[];
  float* sm = reinterpret_cast<float*>(split_smem4);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, c = lane % 4;
  const int mg = warp / kKGroups, kg = warp % kKGroups;
  const int split = static_cast<int>(blockIdx.x % splits);
  const int64_t tb = blockIdx.x / splits;
  const int64_t split_cols = (d + splits * 32 - 1) / (splits * 32) * 32;
  const int64_t d0 = split * split_cols, d1 = d0 + split_cols < d ? d0 + split_cols : d;
  const int64_t t_base = tb * 32 * S + mg * 16 * S;
  float acc[S][4][4] = {};
  float sq[S][2] = {};
  for (int64_t s0 = d0; s0 < d1; s0 += kStageCols) {
    __syncthreads();  // every warp is done with the previous stage
    for (int item = tid; item < 32 * kStageCols / 4; item += blockDim.x) {
      const int row = item / (kStageCols / 4), c4 = item % (kStageCols / 4);
      const int64_t col = s0 + 4 * c4;
      float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
      if (row < rank && col + 4 <= d1) {
        v = __ldg(reinterpret_cast<const float4*>(proj_w + row * d + col));
      } else if (row < rank) {
        float f[4] = {0.f, 0.f, 0.f, 0.f};
        for (int e = 0; e < 4; ++e) f[e] = col + e < d1 ? proj_w[row * d + col + e] : 0.f;
        v = make_float4(f[0], f[1], f[2], f[3]);
      }
      *reinterpret_cast<float4*>(sm + row * kStageStride + 4 * c4) = v;
    }
    __syncthreads();
    for (int kb = kg; kb < kStageCols / 32; kb += kKGroups) {
      const int64_t col0 = s0 + 32 * kb;
      if (col0 >= d1) break;
      const int64_t col = col0 + 8 * c;
      uint4 xv[S][2];
#pragma unroll
      for (int m = 0; m < S; ++m) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int64_t row = t_base + 16 * m + g + 8 * h;
          xv[m][h] = row < tokens && col < d1 ? __ldg(reinterpret_cast<const uint4*>(x + row * d + col))
                                              : make_uint4(0u, 0u, 0u, 0u);
        }
      }
      float4 wv[4][2];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float* w = sm + (8 * j + g) * kStageStride + 32 * kb + 8 * c;
        wv[j][0] = *reinterpret_cast<const float4*>(w);
        wv[j][1] = *reinterpret_cast<const float4*>(w + 4);
      }
      l2r::route::project_kblock_mma<S, 3>(xv, wv, acc, sq);
    }
  }
  // the k-groups' sums, added in k-group order (lane fastest: consecutive words)
  __syncthreads();
  float* red = sm + (mg * kKGroups + kg) * S * 18 * 32;
#pragma unroll
  for (int m = 0; m < S; ++m) {
#pragma unroll
    for (int v = 0; v < 16; ++v) red[(m * 18 + v) * 32 + lane] = acc[m][v / 4][v % 4];
    red[(m * 18 + 16) * 32 + lane] = sq[m][0];
    red[(m * 18 + 17) * 32 + lane] = sq[m][1];
  }
  __syncthreads();
  if (kg != 0) return;
  const int rp1 = rank + 1;
#pragma unroll
  for (int m = 0; m < S; ++m) {
    float tot[18];
#pragma unroll
    for (int v = 0; v < 18; ++v) {
      tot[v] = 0.f;
      for (int k = 0; k < kKGroups; ++k) tot[v] += sm[((mg * kKGroups + k) * S * 18 + m * 18 + v) * 32 + lane];
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      tot[16 + h] += __shfl_xor_sync(0xffffffffu, tot[16 + h], 1);
      tot[16 + h] += __shfl_xor_sync(0xffffffffu, tot[16 + h], 2);
    }
#pragma unroll
    for (int v = 0; v < 16; ++v) {
      const int j = v / 4, i = v % 4;
      const int64_t row = t_base + 16 * m + g + 8 * (i / 2);
      const int n = 8 * j + 2 * c + i % 2;
      if (row < tokens && n < rank) partials[(split * tokens + row) * rp1 + n] = tot[v];
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = t_base + 16 * m + g + 8 * h;
      if (c == 0 && row < tokens) partials[(split * tokens + row) * rp1 + rank] = tot[16 + h];
    }
  }
}

template <int S>
int launch_split(const uint16_t* x, const float* proj_w, int64_t tokens, int64_t d, int rank, int splits,
                 float* partials) {
  const int64_t per_block = 32 * S;
  const int blocks = static_cast<int>((tokens + per_block - 1) / per_block) * splits;
  const size_t smem = split_smem_floats(S) * sizeof(float);
  cudaFuncSetAttribute(project_split_kernel<S>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  project_split_kernel<S><<<blocks, 256, smem>>>(x, proj_w, tokens, d, rank, splits, partials);
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

// The block decomposition: s in {1, 2, 4} m-tiles per m-group; -1 for any other.
extern "C" int project_split_launch(const uint16_t* x, const float* proj_w, int64_t tokens, int64_t d, int rank,
                                    int splits, float* partials, int s) {
  using namespace project_mma;
  if (s == 1) return launch_split<1>(x, proj_w, tokens, d, rank, splits, partials);
  if (s == 2) return launch_split<2>(x, proj_w, tokens, d, rank, splits, partials);
  if (s == 4) return launch_split<4>(x, proj_w, tokens, d, rank, splits, partials);
  return -1;
}
