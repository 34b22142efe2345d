// Kernels used only by tests/simt/test_simt.py (the emulator's own self-test).
// Written as ordinary CUDA: they also compile with nvcc.
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <cassert>

namespace selftest {

__device__ __forceinline__ int pow2_ceil(int v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

// ---------------------------------------------------------------- block reduction (shared memory)
__global__ void block_sum_kernel(const float* __restrict__ x, float* __restrict__ out, int n) {
  __shared__ float s[1024];
  const int t = threadIdx.x;
  const int i = blockIdx.x * blockDim.x + t;
  s[t] = i < n ? x[i] : 0.0f;
  __syncthreads();
  for (int stride = pow2_ceil(blockDim.x) / 2; stride > 0; stride >>= 1) {
    if (t < stride && t + stride < (int)blockDim.x) s[t] += s[t + stride];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = s[0];
}

// The same reduction with the __syncthreads() inside the loop removed (a bug
// the emulator must expose under random thread order).
__global__ void block_sum_broken_kernel(const float* __restrict__ x, float* __restrict__ out, int n) {
  __shared__ float s[1024];
  const int t = threadIdx.x;
  const int i = blockIdx.x * blockDim.x + t;
  s[t] = i < n ? x[i] : 0.0f;
  __syncthreads();
  for (int stride = pow2_ceil(blockDim.x) / 2; stride > 0; stride >>= 1) {
    if (t < stride && t + stride < (int)blockDim.x) s[t] += s[t + stride];
  }
  __syncthreads();
  if (t == 0) out[blockIdx.x] = s[0];
}

// ---------------------------------------------------------------- warp-shuffle reduction
__global__ void __launch_bounds__(1024) warp_sum_kernel(const float* __restrict__ x, float* __restrict__ out, int n) {
  __shared__ float warp_sums[32];
  const int t = threadIdx.x;
  const int i = blockIdx.x * blockDim.x + t;
  const int lane = t & 31, warp = t >> 5;
  const int nwarps = (blockDim.x + 31) / 32;
  const int nl = min(32, (int)blockDim.x - warp * 32);  // lanes in this (maybe partial) warp
  const unsigned mask = nl == 32 ? 0xffffffffu : ((1u << nl) - 1u);
  float v = i < n ? x[i] : 0.0f;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    float o = __shfl_down_sync(mask, v, off);
    if (lane + off < nl) v += o;
  }
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {  // second stage: requires blockDim.x >= 32 (full first warp)
    float w = lane < nwarps ? warp_sums[lane] : 0.0f;
    for (int off = 16; off > 0; off >>= 1) w += __shfl_xor_sync(0xffffffffu, w, off);
    if (lane == 0) out[blockIdx.x] = w;
  }
}

// ballot / any / all / shfl_up / width-limited shfl / activemask
__global__ void vote_kernel(const int* __restrict__ x, unsigned* __restrict__ out, int n) {
  const int t = threadIdx.x;
  const int lane = t & 31, warp = t >> 5;
  const int nl = min(32, (int)blockDim.x - warp * 32);
  const unsigned mask = nl == 32 ? 0xffffffffu : ((1u << nl) - 1u);
  const int v = t < n ? x[t] : 0;
  unsigned b = __ballot_sync(mask, v > 0);
  int any = __any_sync(mask, v > 5);
  int all = __all_sync(mask, v >= 0);
  int up = __shfl_up_sync(mask, v, 1);               // lane 0 keeps its own value
  int bc = __shfl_sync(mask, v, 3, 8);               // broadcast lane 3 of each 8-lane segment
  unsigned am = __activemask();
  out[t * 6 + 0] = b;
  out[t * 6 + 1] = (unsigned)any;
  out[t * 6 + 2] = (unsigned)all;
  out[t * 6 + 3] = (unsigned)up;
  out[t * 6 + 4] = (unsigned)bc;
  out[t * 6 + 5] = am;
  (void)lane;
}

// a full-mask shuffle on a partial warp (a bug: lanes 16..31 do not exist)
__global__ void full_mask_partial_warp_kernel(float* out) {
  float v = (float)threadIdx.x;
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

// missing __syncwarp between a shared-memory write and a read by another lane
__global__ void warp_exchange_kernel(int* out, int with_syncwarp) {
  __shared__ int s[32];
  const int lane = threadIdx.x & 31;
  s[lane] = lane * 10;
  if (with_syncwarp) __syncwarp();
  out[lane] = s[(lane + 1) & 31];
}

// ---------------------------------------------------------------- deadlocks
__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < 16) __syncthreads();
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void shfl_exited_lane_kernel(float* out) {
  if (threadIdx.x == 5) return;
  float v = (float)threadIdx.x;
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

__global__ void early_exit_barrier_kernel(const float* x, float* out, int n) {
  // threads past n return early; the others keep using __syncthreads (allowed:
  // exited threads leave the barrier)
  __shared__ float s[256];
  const int t = threadIdx.x;
  if (t >= n) return;
  s[t] = x[t];
  __syncthreads();
  out[t] = s[n - 1 - t];
}

__global__ void assert_kernel(int* out) {
  assert(threadIdx.x != 3);
  out[threadIdx.x] = 1;
}

__global__ void trap_kernel(int* out) {
  if (threadIdx.x == 7 && blockIdx.x == 1) __trap();
  out[threadIdx.x] = 1;
}

// ---------------------------------------------------------------- dynamic shared memory, templates
__global__ void reverse_dyn_kernel(const float* __restrict__ x, float* __restrict__ y, int n) {
  extern __shared__ __align__(16) float buf[];
  const int t = threadIdx.x;
  const int base = blockIdx.x * blockDim.x;
  if (base + t < n) buf[t] = x[base + t];
  __syncthreads();
  const int cnt = min((int)blockDim.x, n - base);
  if (t < cnt) y[base + t] = buf[cnt - 1 - t];
}

// extern __shared__ of a different type in another kernel (aliases the same buffer)
__global__ void dyn_two_arrays_kernel(int* out, int n) {
  extern __shared__ unsigned char smem_raw[];
  int* a = reinterpret_cast<int*>(smem_raw);
  float* b = reinterpret_cast<float*>(smem_raw + n * sizeof(int));
  const int t = threadIdx.x;
  a[t] = t;
  b[t] = 2.0f * t;
  __syncthreads();
  out[t] = a[n - 1 - t] + (int)b[n - 1 - t];
}

template <typename T, int K>
__global__ void scale_kernel(T* __restrict__ x, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) x[i] = x[i] * static_cast<T>(K);
}

// 2-D grid / block indexing
__global__ void index2d_kernel(int* out, int w, int h) {
  const int x = blockIdx.x * blockDim.x + threadIdx.x;
  const int y = blockIdx.y * blockDim.y + threadIdx.y;
  if (x < w && y < h) out[y * w + x] = y * 1000 + x + (gridDim.x * 0);
}

// ---------------------------------------------------------------- bf16 / half conversions
__global__ void convert_kernel(const float* __restrict__ x, unsigned short* __restrict__ bf, unsigned short* __restrict__ hf,
                               float* __restrict__ bf_back, float* __restrict__ hf_back, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  __nv_bfloat16 b = __float2bfloat16_rn(x[i]);
  __half h = __float2half_rn(x[i]);
  bf[i] = __bfloat16_as_ushort(b);
  hf[i] = __half_as_ushort(h);
  bf_back[i] = __bfloat162float(b);
  hf_back[i] = __half2float(h);
}

// ---------------------------------------------------------------- atomics
__global__ void atomics_kernel(const int* __restrict__ keys, const float* __restrict__ vals, int n, int* hist,
                               float* fsum, int* imax, int* imin, unsigned* bits, unsigned long long* u64,
                               int* cas_counter, int* last) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  atomicAdd(&hist[keys[i]], 1);
  atomicAdd(fsum, vals[i]);
  atomicMax(imax, keys[i] * 3 - 7);
  atomicMin(imin, keys[i] * 3 - 7);
  atomicOr(bits, 1u << (keys[i] & 31));
  atomicAdd(u64, (unsigned long long)keys[i] << 33);
  // increment via a CAS loop
  int old = *cas_counter, assumed;
  do {
    assumed = old;
    old = atomicCAS(cas_counter, assumed, assumed + 1);
  } while (old != assumed);
  atomicExch(last, i);
}

__global__ void syncthreads_count_kernel(const int* x, int* out) {
  const int t = threadIdx.x;
  int c = __syncthreads_count(x[t] > 0);
  int a = __syncthreads_and(x[t] > 0);
  int o = __syncthreads_or(x[t] > 0);
  if (t == 0) { out[0] = c; out[1] = a; out[2] = o; }
}

// many barriers: for timing
__global__ void barrier_loop_kernel(float* out, int iters) {
  __shared__ float s[1024];
  const int t = threadIdx.x;
  float acc = 0.0f;
  s[t] = (float)t;
  for (int k = 0; k < iters; ++k) {
    __syncthreads();
    acc += s[(t + k) % blockDim.x];
  }
  out[blockIdx.x * blockDim.x + t] = acc;
}

// ---------------------------------------------------------------- host launchers (raw pointers + stream)
void launch_block_sum(const float* x, float* out, int n, int block, bool broken, cudaStream_t stream) {
  const int grid = (n + block - 1) / block;
  if (broken)
    block_sum_broken_kernel<<<grid, block, 0, stream>>>(x, out, n);
  else
    block_sum_kernel<<<grid, block, 0, stream>>>(x, out, n);
}

}  // namespace selftest

using namespace selftest;

extern "C" {
int st_warp_sum(const float* x, float* out, int n, int block) {
  warp_sum_kernel<<<(n + block - 1) / block, block>>>(x, out, n);
  return (int)cudaGetLastError();
}
int st_vote(const int* x, unsigned* out, int n, int block) {
  vote_kernel<<<1, block>>>(x, out, n);
  return (int)cudaGetLastError();
}
int st_full_mask_partial(float* out) {
  full_mask_partial_warp_kernel<<<1, 16>>>(out);
  return (int)cudaGetLastError();
}
int st_warp_exchange(int* out, int with_syncwarp) {
  warp_exchange_kernel<<<1, 32>>>(out, with_syncwarp);
  return (int)cudaGetLastError();
}
int st_divergent_barrier(int* out) {
  divergent_barrier_kernel<<<2, 64>>>(out);
  return (int)cudaGetLastError();
}
int st_shfl_exited(float* out) {
  shfl_exited_lane_kernel<<<1, 32>>>(out);
  return (int)cudaGetLastError();
}
int st_early_exit(const float* x, float* out, int n, int block) {
  early_exit_barrier_kernel<<<1, block>>>(x, out, n);
  return (int)cudaGetLastError();
}
int st_trap(int* out) {
  trap_kernel<<<2, 32>>>(out);
  return (int)cudaGetLastError();
}
int st_assert(int* out) {
  assert_kernel<<<1, 8>>>(out);
  return (int)cudaGetLastError();
}
int st_reverse_dyn(const float* x, float* y, int n, int block) {
  reverse_dyn_kernel<<<(n + block - 1) / block, block, block * sizeof(float)>>>(x, y, n);
  return (int)cudaGetLastError();
}
int st_dyn_two(int* out, int n) {
  dyn_two_arrays_kernel<<<1, n, n * (sizeof(int) + sizeof(float)), nullptr>>>(out, n);
  return (int)cudaGetLastError();
}
int st_big_dyn(const float* x, float* y, int n, int set_attr) {
  // 64 KiB of dynamic shared memory needs the opt-in attribute
  const int smem = 64 * 1024;
  if (set_attr) cudaFuncSetAttribute(reverse_dyn_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  reverse_dyn_kernel<<<(n + 255) / 256, 256, smem>>>(x, y, n);
  return (int)cudaGetLastError();
}
int st_scale(float* xf, int* xi, int n) {
  scale_kernel<float, 3><<<(n + 127) / 128, 128>>>(xf, n);
  scale_kernel<int, 5><<<dim3((n + 63) / 64), dim3(64), 0, 0>>>(xi, n);
  return (int)cudaGetLastError();
}
int st_index2d(int* out, int w, int h) {
  dim3 block(8, 4);
  dim3 grid((w + block.x - 1) / block.x, (h + block.y - 1) / block.y);
  index2d_kernel<<<grid, block>>>(out, w, h);
  return (int)cudaGetLastError();
}
int st_convert(const float* x, unsigned short* bf, unsigned short* hf, float* bfb, float* hfb, int n) {
  convert_kernel<<<(n + 255) / 256, 256>>>(x, bf, hf, bfb, hfb, n);
  return (int)cudaGetLastError();
}
int st_atomics(const int* keys, const float* vals, int n, int* hist, float* fsum, int* imax, int* imin, unsigned* bits,
               unsigned long long* u64, int* cas_counter, int* last) {
  atomics_kernel<<<(n + 127) / 128, 128>>>(keys, vals, n, hist, fsum, imax, imin, bits, u64, cas_counter, last);
  return (int)cudaGetLastError();
}
int st_syncthreads_count(const int* x, int* out, int block) {
  syncthreads_count_kernel<<<1, block>>>(x, out);
  return (int)cudaGetLastError();
}
int st_barrier_loop(float* out, int blocks, int block, int iters) {
  barrier_loop_kernel<<<blocks, block>>>(out, iters);
  return (int)cudaGetLastError();
}
int st_bad_config(float* out) {
  barrier_loop_kernel<<<1, 2048>>>(out, 1);
  return (int)cudaGetLastError();
}
}
