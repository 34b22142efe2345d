// Device helpers shared by the CUDA route kernels (route_forward.cuh, route_cuda.cu): element
// conversions, vector loads and stores, warp reductions. Included by nvcc, NVRTC and the SIMT
// emulator (g++): no host-only code.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../../common/lanes_array.h"
#include "../math/all.h"
#include "route_kernel_params.h"

namespace l2r {
namespace route {
namespace {

namespace rm = ::l2r::route::math;

constexpr unsigned kFullMask = 0xffffffffu;

// =============================================================================================
// Device helpers: element conversion, vector loads, warp reductions
// =============================================================================================

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

// A 16-bit x element from its bits.
template <typename T>
__device__ __forceinline__ float half_bits_to_float(unsigned short bits);
template <>
__device__ __forceinline__ float half_bits_to_float<__nv_bfloat16>(unsigned short bits) {
  return __bfloat162float(__ushort_as_bfloat16(bits));
}
template <>
__device__ __forceinline__ float half_bits_to_float<__half>(unsigned short bits) {
  return __half2float(__ushort_as_half(bits));
}

__device__ __forceinline__ void store_float(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_float(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }
__device__ __forceinline__ void store_float(__half* p, float v) { *p = __float2half(v); }

template <typename T>
struct VecWidth {
  static constexpr int value = static_cast<int>(16 / sizeof(T));
};

template <int N, typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[N]) {
  static_assert(N * sizeof(T) == 16 || N * sizeof(T) == 8, "16- or 8-byte vectors");
  if constexpr (N * sizeof(T) == 16) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = to_float(e[j]);
  } else {
    const uint2 raw = __ldg(reinterpret_cast<const uint2*>(p));
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = to_float(e[j]);
  }
}

template <typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&v)[VecWidth<T>::value]) {
  uint4 raw;
  T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int j = 0; j < VecWidth<T>::value; ++j) store_float(e + j, v[j]);
  *reinterpret_cast<uint4*>(p) = raw;
}

// Butterfly sum: every lane ends with the same bits (a + b == b + a at every step).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

// The warp sums of N values at once (N a power of two <= 32): lane l ends with the sum of v[l / (32 / N)]
// (v is clobbered). Each step of warp_sum's xor butterfly moves only the half of the values the
// lane keeps (its partner keeps the other half), so a sum costs N - 1 + log2(32 / N) shuffles for
// all N instead of 5 N, and each total is warp_sum's: the same pairs added in the same order, and
// a + b == b + a, so bitwise equal.
template <int N>
__device__ __forceinline__ float warp_sum_scatter(float (&v)[N], int lane) {
  static_assert(N >= 1 && N <= kWarp && (N & (N - 1)) == 0, "a power of two up to the warp size");
#pragma unroll
  for (int half = N / 2, off = kWarp / 2; half >= 1; half /= 2, off /= 2) {
    const bool upper = (lane & off) != 0;  // this lane keeps values [half, 2 half), its partner [0, half)
#pragma unroll
    for (int i = 0; i < half; ++i) {
      const float send = upper ? v[i] : v[i + half];
      const float keep = upper ? v[i + half] : v[i];
      v[i] = keep + __shfl_xor_sync(kFullMask, send, off);
    }
  }
#pragma unroll
  for (int off = kWarp / (2 * N); off > 0; off >>= 1) v[0] += __shfl_xor_sync(kFullMask, v[0], off);
  return v[0];
}

// Max of numbers (no lane holds NaN; NaN is tracked by warp_any).
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) v = lanes::vmax(__shfl_xor_sync(kFullMask, v, off), v);
  return v;
}

__device__ __forceinline__ bool warp_any(bool v) { return __any_sync(kFullMask, v); }

// Whether a row holds a non-finite value (the warp's answer, in every lane).
template <typename T>
__device__ __forceinline__ bool warp_row_has_non_finite(const T* xrow, int64_t d, int lane) {
  bool bad = false;
  for (int64_t i = lane; i < d; i += kWarp) {
    const float v = to_float(xrow[i]);
    bad |= !(lanes::vabs(v) < lanes::poly::kInf);  // inf or NaN
  }
  return warp_any(bad);
}

}  // namespace
}  // namespace route
}  // namespace l2r
