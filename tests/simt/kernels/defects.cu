// Kernels with planted GPU bugs, for tests/simt/test_sanitizer.py: each one must be reported by the
// emulator's memory checker (built with sanitize=True) by kind, kernel, block, thread, address,
// size and the buffer involved. Each comes with a correct twin that must pass the same checks.
// Written as ordinary CUDA (they also compile with nvcc).
#include <cuda_runtime.h>

#include <cstdint>

namespace defects {

// Out-of-bounds write: thread n writes out[n] (one past the end) when the guard is off by one.
__global__ void fill_kernel(float* out, int n, int off_by_one) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (off_by_one ? i <= n : i < n) out[i] = 1.0f;
}

// 16-byte vector loads of float rows that start at `offset` floats: misaligned unless
// offset % 4 == 0 (x86 would not mind; the GPU raises "misaligned address").
__global__ void vec_copy_kernel(const float* x, int offset, int vecs, float4* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < vecs) out[i] = reinterpret_cast<const float4*>(x + offset)[i];
}

// Per-block histogram. Lost update: every thread adds into the shared counts with a plain +=
// (fibers switch only at barriers, so the emulator alone computes the right sum). Correct twin:
// atomicAdd.
__global__ void histogram_kernel(const int* keys, int n, int bins, int use_atomic, int* hist) {
  __shared__ int counts[64];
  for (int b = threadIdx.x; b < bins; b += blockDim.x) counts[b] = 0;
  __syncthreads();
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    if (use_atomic) {
      atomicAdd(&counts[keys[i]], 1);
    } else {
      counts[keys[i]] += 1;
    }
  }
  __syncthreads();
  for (int b = threadIdx.x; b < bins; b += blockDim.x) hist[blockIdx.x * bins + b] = counts[b];
}

// Two blocks write the same global word: every block stores its sum to total[0] (a race across
// blocks); correct twin: total[blockIdx.x].
__global__ void block_total_kernel(const float* x, int per_block, int shared_slot, float* total) {
  __shared__ float s[32];
  const int lane = threadIdx.x;
  float v = 0.f;
  for (int i = lane; i < per_block; i += 32) v += x[blockIdx.x * per_block + i];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  s[lane] = v;
  __syncwarp();
  if (lane == 0) total[shared_slot ? 0 : blockIdx.x] = s[31];
}

// Lanes exchange values through shared memory, ordered by a shuffle instead of a __syncwarp: the
// shuffle waits for every lane, but it does not order memory (PTX: only bar.warp.sync does), so
// this is a race (the selftest's warp_exchange_kernel is the same exchange with no order at all).
__global__ void shuffle_ordered_kernel(int* out) {
  __shared__ int s[32];
  const int lane = threadIdx.x & 31;
  s[lane] = lane * 10;
  const int v = __shfl_xor_sync(0xffffffffu, lane, 1);
  out[lane] = s[(lane + 1) & 31] + 0 * v;
}

// "Last block finishes": every block stores its partial sum, and the block that takes the last
// ticket of the counter adds them all in block order. Correct with a __threadfence() before the
// ticket (release: the partial is visible before the counter moves) and one after it (acquire: the
// last block reads the partials after it saw the count); `broken` 1 drops the first, 2 the second.
// The counter must be zero at launch; atomicInc wraps it back to zero.
__global__ void last_block_sum_kernel(const float* x, int per_block, int broken, float* partials,
                                      unsigned* counter, float* total) {
  __shared__ bool last;
  const int lane = threadIdx.x;
  float v = 0.f;
  for (int i = lane; i < per_block; i += 32) v += x[blockIdx.x * per_block + i];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (lane == 0) partials[blockIdx.x] = v;
  __syncthreads();
  if (lane == 0) {
    if (broken != 1) __threadfence();
    const unsigned ticket = atomicInc(counter, gridDim.x - 1);
    if (broken != 2) __threadfence();
    last = ticket == gridDim.x - 1;
  }
  __syncthreads();
  if (last && lane == 0) {
    float s = 0.f;
    for (unsigned b = 0; b < gridDim.x; ++b) s += partials[b];
    *total = s;
  }
}

// Global scratch staged within one block: every thread stores its x in the scratch, the block
// waits, and thread i reads its neighbour's entry. With `skip_last` the last thread stores nothing
// (a guard off by one), so thread n - 2 reads scratch nothing wrote: memory a GPU hands out with
// undefined content (cudaMalloc, at::empty), whatever the emulator's host memory happens to hold.
__global__ void stage_rotate_kernel(const float* x, int n, int skip_last, float* scratch, float* out) {
  const int i = threadIdx.x;
  if (i < n - (skip_last ? 1 : 0)) scratch[i] = x[i];
  __syncthreads();
  if (i < n) out[i] = scratch[(i + 1) % n];
}

// The two halves of a scratch round trip in separate launches (and the atomic way to fill it).
__global__ void store_kernel(const float* x, int n, float* scratch) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) scratch[i] = x[i];
}

__global__ void exchange_kernel(const float* x, int n, float* scratch) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) atomicExch(&scratch[i], x[i]);
}

__global__ void load_kernel(const float* src, int n, float* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = src[i];
}

}  // namespace defects

extern "C" int df_fill(float* out, int n, int off_by_one) {
  defects::fill_kernel<<<(n + 64) / 64, 64>>>(out, n, off_by_one);
  return static_cast<int>(cudaDeviceSynchronize());
}

extern "C" int df_vec_copy(const float* x, int offset, int vecs, float* out) {
  defects::vec_copy_kernel<<<(vecs + 31) / 32, 32>>>(x, offset, vecs, reinterpret_cast<float4*>(out));
  return static_cast<int>(cudaDeviceSynchronize());
}

extern "C" int df_histogram(const int* keys, int n, int bins, int use_atomic, int* hist, int blocks) {
  defects::histogram_kernel<<<blocks, 128>>>(keys, n, bins, use_atomic, hist);
  return static_cast<int>(cudaDeviceSynchronize());
}

extern "C" int df_block_total(const float* x, int per_block, int blocks, int shared_slot, float* total) {
  defects::block_total_kernel<<<blocks, 32>>>(x, per_block, shared_slot, total);
  return static_cast<int>(cudaDeviceSynchronize());
}

extern "C" int df_shuffle_ordered(int* out) {
  defects::shuffle_ordered_kernel<<<1, 32>>>(out);
  return static_cast<int>(cudaDeviceSynchronize());
}


extern "C" int df_last_block_sum(const float* x, int per_block, int blocks, int broken, float* partials,
                                 unsigned* counter, float* total) {
  defects::last_block_sum_kernel<<<blocks, 32>>>(x, per_block, broken, partials, counter, total);
  return static_cast<int>(cudaDeviceSynchronize());
}

// A cudaMalloc scratch of n floats written in one of these ways, then read by load_kernel.
enum ScratchFill {
  kFillNothing = 0,
  kFillStoreKernel = 1,  // store_kernel, an earlier launch
  kFillAtomicKernel = 2,  // exchange_kernel
  kFillMemset = 3,  // cudaMemsetAsync of all n floats
  kFillMemsetHalf = 4,  // cudaMemsetAsync of the first n / 2 floats only
  kFillMemcpy = 5,  // cudaMemcpy from x
};

extern "C" int df_scratch_load(const float* x, int n, int fill, float* out) {
  float* scratch = nullptr;
  if (cudaMalloc(&scratch, static_cast<size_t>(n) * sizeof(float)) != cudaSuccess) return -1;
  const int blocks = (n + 63) / 64;
  switch (fill) {
    case kFillStoreKernel: defects::store_kernel<<<blocks, 64>>>(x, n, scratch); break;
    case kFillAtomicKernel: defects::exchange_kernel<<<blocks, 64>>>(x, n, scratch); break;
    case kFillMemset: cudaMemsetAsync(scratch, 0, static_cast<size_t>(n) * sizeof(float), nullptr); break;
    case kFillMemsetHalf: cudaMemsetAsync(scratch, 0, static_cast<size_t>(n / 2) * sizeof(float), nullptr); break;
    case kFillMemcpy:
      cudaMemcpyAsync(scratch, x, static_cast<size_t>(n) * sizeof(float), cudaMemcpyHostToDevice, nullptr);
      break;
    default: break;
  }
  defects::load_kernel<<<blocks, 64>>>(scratch, n, out);
  const int err = static_cast<int>(cudaDeviceSynchronize());
  cudaFree(scratch);
  return err;
}

extern "C" int df_stage_rotate(const float* x, int n, int skip_last, float* out) {
  float* scratch = nullptr;
  if (cudaMalloc(&scratch, static_cast<size_t>(n) * sizeof(float)) != cudaSuccess) return -1;
  defects::stage_rotate_kernel<<<1, n>>>(x, n, skip_last, scratch, out);
  const int err = static_cast<int>(cudaDeviceSynchronize());
  cudaFree(scratch);
  return err;
}

extern "C" int df_load(const float* src, int n, float* out) {
  defects::load_kernel<<<(n + 63) / 64, 64>>>(src, n, out);
  return static_cast<int>(cudaDeviceSynchronize());
}
