// CUDA kernels of token permutation (docs/SPEC.md "Dispatch"). The dispatch plan is a counting sort
// without data atomics, in two launches: every block ranks its chunk of 256 flat (token, slot) rows
// per expert (chunk histogram); the last block of each segment of chunks (atomic tickets, the
// "last block" pattern) scans its segment's histograms per expert in chunk order, the last segment
// scans the segment totals and the padded expert sizes into offsets (our own multi-block scan: CUB
// cannot run in the SIMT emulator); a second pass writes row = offset[e] + segment base + chunk
// base + rank in chunk. Capacity with router weights selects the kept rows of each expert by a
// radix select of 8-bit digits on unique (weight, token) keys (2 to 8 passes), then recounts. Row copies move 16-byte
// vectors where alignment allows; reductions are token-major gathers in a fixed order (no
// floating-point atomics), so every output is bitwise deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../permute_math.cuh"
#include "permute_kernel_params.h"

namespace l2r {
namespace permute {
namespace {

// ---- dispatch plan -------------------------------------------------------------------------------

// The block's ticket of tickets[word] (after a __syncthreads: every write of the block is before
// thread 0's release fence); true in every thread of the block that took the last of `count`.
// atomicInc wraps the counter back to zero, ready for the next pass.
__device__ __forceinline__ bool last_ticket(unsigned* tickets, int64_t word, int64_t count, int* s_flag) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();  // release: this block's writes before the ticket
    const unsigned ticket = atomicInc(tickets + word, static_cast<unsigned>(count - 1));
    __threadfence();  // acquire: the other blocks' writes before their tickets
    *s_flag = ticket == static_cast<unsigned>(count - 1) ? 1 : 0;
  }
  __syncthreads();
  return *s_flag != 0;
}

__device__ __forceinline__ int64_t kept_rows(int64_t count, int64_t capacity) {
  return (capacity >= 0 && count > capacity) ? capacity : count;
}

// offsets = exclusive scan over experts of round_up(min(count, capacity), align); dropped =
// (counts_all or counts) - kept. One block; s_sum holds blockDim.x partial sums.
__device__ void expert_offsets(const RankScanParams& args, int64_t* s_sum) {
  const int64_t experts = args.experts, align = args.align, capacity = args.capacity;
  const int64_t* counts_all = args.counts_all;
  const int64_t* counts = args.counts;
  int64_t* offsets = args.offsets;
  int64_t* dropped = args.dropped;
  const int tid = threadIdx.x;
  const int64_t per = cdiv(experts, blockDim.x);
  const int64_t lo = per * tid < experts ? per * tid : experts;
  const int64_t hi = lo + per < experts ? lo + per : experts;
  int64_t mine = 0;
  for (int64_t e = lo; e < hi; ++e) mine += round_up(kept_rows(counts[e], capacity), align);
  s_sum[tid] = mine;
  __syncthreads();
  for (int o = 1; o < static_cast<int>(blockDim.x); o <<= 1) {
    const int64_t u = tid >= o ? s_sum[tid - o] : 0;
    __syncthreads();
    s_sum[tid] += u;
    __syncthreads();
  }
  int64_t run = s_sum[tid] - mine;
  for (int64_t e = lo; e < hi; ++e) {
    const int64_t kept = kept_rows(counts[e], capacity);
    offsets[e] = run;
    run += round_up(kept, align);
    if (dropped != nullptr) dropped[e] = (counts_all != nullptr ? counts_all[e] : counts[e]) - kept;
  }
  if (tid == static_cast<int>(blockDim.x) - 1) offsets[experts] = s_sum[tid];
}

// The whole counting pass but the row positions, in one launch (one block per chunk):
// 1. expert of each row (-1 for dropped / out of range), its rank among the chunk's earlier rows
//    of the same expert, and the chunk's histogram row hist[chunk][0, E) (every entry written).
//    Up to kTableExperts experts: the rank in the warp from __match_any_sync, the counts of the
//    earlier warps from a per-warp table of counts in dynamic shared memory; above: by comparing
//    with every row of the chunk.
// 2. The block that takes the last ticket of its segment (seg_chunks consecutive chunks) turns
//    the segment's histogram rows into exclusive prefixes in chunk order, per expert (threads over
//    experts: each step reads one contiguous histogram row), and writes the segment's totals.
// 3. The block that takes the last segment ticket turns the segment totals into exclusive prefixes
//    in segment order, writes counts and the offsets over experts.
// Fixed orders throughout, integer sums: positions do not depend on scheduling. in may alias
// expert_out (pass 2 re-ranks the kept rows).
template <typename index_t>
__global__ void __launch_bounds__(kChunk) rank_scan_kernel(const RankScanParams args) {
  const index_t* in = static_cast<const index_t*>(args.in);
  const int64_t n = args.n, experts = args.experts, seg_chunks = args.seg_chunks;
  int32_t* expert_out = args.expert_out;
  int32_t* __restrict__ local = args.local;
  int32_t* hist = args.hist;
  int64_t* seg_sum = args.seg;
  int32_t* error_flag = args.error_flag;
  __shared__ int32_t s_expert[kChunk];
  __shared__ int64_t s_sum[kChunk];
  __shared__ int s_flag;
  extern __shared__ int32_t s_table[];  // [kChunkWarps][E] when E <= kTableExperts
  const int tid = threadIdx.x;
  const int64_t chunk = blockIdx.x, chunks = gridDim.x;
  const int64_t r = chunk * kChunk + tid;
  int32_t e = -1;
  if (r < n) {
    const int64_t v = checked_expert(in[r], experts);
    if (v < 0 && error_flag != nullptr) atomicOr(error_flag, 1);
    e = static_cast<int32_t>(v);
    expert_out[r] = e;
  }
  int32_t* hist_row = hist + chunk * experts;
  for (int64_t x = tid; x < experts; x += kChunk) hist_row[x] = 0;
  if (experts <= kTableExperts) {
    const int lane = tid & 31, warp = tid >> 5;
    for (int64_t x = tid; x < kChunkWarps * experts; x += kChunk) s_table[x] = 0;
    __syncthreads();
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    const int32_t in_warp = __popc(peers & ((1u << lane) - 1u));
    if (e >= 0 && in_warp == 0) s_table[warp * experts + e] = __popc(peers);
    __syncthreads();
    if (e >= 0) {
      int32_t before = in_warp, total = 0;
      for (int w = 0; w < kChunkWarps; ++w) {
        const int32_t c = s_table[w * experts + e];
        if (w < warp) before += c;
        total += c;
      }
      local[r] = before;
      if (before == total - 1) hist_row[e] = total;
    }
  } else {
    s_expert[tid] = e;
    __syncthreads();
    if (e >= 0) {
      int32_t before = 0;
      bool last = true;
      for (int i = 0; i < kChunk; ++i) {
        if (s_expert[i] == e) {
          if (i < tid) ++before;
          if (i > tid) last = false;
        }
      }
      local[r] = before;
      if (last) hist_row[e] = before + 1;
    }
  }
  // --- 2. the segment's last block
  const int64_t segment = chunk / seg_chunks, c0 = segment * seg_chunks;
  const int64_t c1 = c0 + seg_chunks < chunks ? c0 + seg_chunks : chunks;
  if (!last_ticket(args.tickets, 1 + segment, c1 - c0, &s_flag)) return;
  for (int64_t x = tid; x < experts; x += kChunk) {
    int32_t run = 0;
    for (int64_t c = c0; c < c1; ++c) {
      const int32_t v = hist[c * experts + x];
      hist[c * experts + x] = run;
      run += v;
    }
    seg_sum[segment * experts + x] = run;
  }
  // --- 3. the last segment's block
  const int64_t segments = cdiv(chunks, seg_chunks);
  if (!last_ticket(args.tickets, 0, segments, &s_flag)) return;
  for (int64_t x = tid; x < experts; x += kChunk) {
    int64_t run = 0;
    for (int64_t g = 0; g < segments; ++g) {
      const int64_t v = seg_sum[g * experts + x];
      seg_sum[g * experts + x] = run;
      run += v;
    }
    args.counts[x] = run;
  }
  __syncthreads();
  expert_offsets(args, s_sum);
}

// row_map[r] = offsets[e] + segment prefix + chunk prefix + rank in chunk; -1 when dropped (or
// past capacity).
__global__ void finalize_kernel(const FinalizeParams args) {
  const int32_t* __restrict__ expert = args.expert;
  const int32_t* __restrict__ local = args.local;
  const int32_t* __restrict__ hist = args.hist;
  const int64_t* __restrict__ seg_sum = args.seg;
  const int64_t n = args.n, experts = args.experts, capacity = args.capacity;
  const int64_t* __restrict__ offsets = args.offsets;
  int64_t* __restrict__ row_map = args.row_map;
  const int64_t chunk = blockIdx.x;
  const int64_t r = chunk * kChunk + threadIdx.x;
  if (r >= n) return;
  const int32_t e = expert[r];
  if (e < 0) {
    row_map[r] = -1;
    return;
  }
  const int64_t p = seg_sum[(chunk / args.seg_chunks) * experts + e] + hist[chunk * experts + e] + local[r];
  row_map[r] = (capacity >= 0 && p >= capacity) ? -1 : offsets[e] + p;
}

// grouped[row_map[r]] = r for kept rows. Pass 1 places rows in [0, n) (unpadded, no capacity);
// the bound keeps a corrupt row_map from writing outside `grouped` all the same.
__global__ void group_kernel(const GroupParams args) {
  const int64_t* __restrict__ row_map = args.row_map;
  const int64_t n = args.n;
  int64_t* __restrict__ grouped = args.grouped;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < n;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = row_map[r];
    if (row >= 0 && row < n) grouped[row] = r;
  }
}

// One block per expert over more than `capacity` rows: keep the `capacity` largest capacity_key
// (unique keys), mark the others dropped. Radix select from the top digit down, 8 bits a pass: a
// 256-bin histogram (integer shared atomics: the same counts in any order) of the next digit of the
// keys that share the digits found so far gives the digit of the capacity-th largest key; it stops
// as soon as the keys with the prefix found are exactly the ones still needed: after 2 to 4 passes
// for distinct float weights, 8 at most (64 one-bit passes before).
__global__ void select_kernel(const SelectParams args) {
  const int64_t* __restrict__ grouped = args.grouped;
  const int64_t* __restrict__ starts = args.starts;
  const int64_t* __restrict__ counts = args.counts;
  const int64_t capacity = args.capacity;
  const float* __restrict__ w = args.w;
  int32_t* __restrict__ expert = args.expert;
  __shared__ unsigned long long s_bins[256];
  __shared__ uint64_t s_prefix;
  __shared__ int64_t s_need;
  __shared__ int s_done;
  const int tid = threadIdx.x;
  const int64_t count = counts[blockIdx.x];
  if (count <= capacity) return;
  const int64_t* rows = grouped + starts[blockIdx.x];
  uint64_t threshold = 0;
  if (capacity > 0) {
    uint64_t prefix = 0;  // the digits above `shift` of the capacity-th largest key
    int64_t need = capacity;  // how many keys with that prefix are kept
    int shift = 64;
    for (;;) {
      shift -= 8;
      for (int b = tid; b < 256; b += blockDim.x) s_bins[b] = 0;
      __syncthreads();
      for (int64_t i = tid; i < count; i += blockDim.x) {
        const uint64_t key = capacity_key(w[rows[i]], rows[i]);
        if (shift == 56 || (key >> (shift + 8)) == prefix) atomicAdd(&s_bins[(key >> shift) & 255u], 1ull);
      }
      __syncthreads();
      if (tid == 0) {
        int64_t above = 0;
        int d = 255;
        while (d > 0 && above + static_cast<int64_t>(s_bins[d]) < need) above += static_cast<int64_t>(s_bins[d--]);
        s_prefix = (prefix << 8) | static_cast<uint64_t>(d);
        s_need = need - above;
        s_done = static_cast<int64_t>(s_bins[d]) == need - above ? 1 : 0;
      }
      __syncthreads();
      prefix = s_prefix;
      need = s_need;
      if (s_done != 0 || shift == 0) break;
    }
    threshold = prefix << shift;
  }
  for (int64_t i = tid; i < count; i += blockDim.x) {
    const int64_t r = rows[i];
    if (capacity == 0 || capacity_key(w[r], r) < threshold) expert[r] = -1;
  }
}

// ---- rows ----------------------------------------------------------------------------------------

// src[row_map[r]] = r / divisor for rows in [0, num_rows) (rows no slot maps to keep what src held).
__global__ void inverse_kernel(const InverseParams args) {
  const int64_t* __restrict__ row_map = args.row_map;
  const int64_t n = args.n, divisor = args.divisor, num_rows = args.num_rows;
  int64_t* __restrict__ src = args.src;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < n;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = row_map[r];
    if (row >= 0 && row < num_rows) src[row] = r / divisor;
  }
}

// Output row `row` is x[t] when src[row] holds a slot r that maps to it (row_map[r] == row, t =
// r / k), zero otherwise. The launch plan sets src to -1 before the inverse where some row may have
// no slot (permute_rows_launches), so such a row holds -1; the check against row_map (injective on
// rows) still holds for any content of src.
template <typename V>
__global__ void copy_rows_kernel(const CopyRowsParams args) {
  const char* __restrict__ x = static_cast<const char*>(args.x);
  const int64_t x_stride_bytes = args.x_stride_bytes, num_rows = args.num_rows, vecs = args.vecs;
  const int64_t slots = args.slots, k = args.k;
  const int64_t* __restrict__ src = args.src;
  const int64_t* __restrict__ row_map = args.row_map;
  const int tpr = args.tpr;
  char* __restrict__ out = static_cast<char*>(args.out);
  const int64_t per_block = blockDim.x / tpr;
  const int lane = threadIdx.x % tpr;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * per_block + threadIdx.x / tpr;
       row < num_rows; row += static_cast<int64_t>(gridDim.x) * per_block) {
    V* dst = reinterpret_cast<V*>(out + row * vecs * static_cast<int64_t>(sizeof(V)));
    const int64_t r = src[row];
    if (r >= 0 && r < slots && row_map[r] == row) {
      const V* s = reinterpret_cast<const V*>(x + (r / k) * x_stride_bytes);
      for (int64_t i = lane; i < vecs; i += tpr) dst[i] = s[i];
    } else {
      const V zero{};
      for (int64_t i = lane; i < vecs; i += tpr) dst[i] = zero;
    }
  }
}

// ---- gather-reduce and unpermute backward --------------------------------------------------------

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename scalar_t>
__device__ __forceinline__ scalar_t from_acc(float v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename scalar_t>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ scalar_t store_cast(acc_t v) {
  if constexpr (sizeof(scalar_t) == sizeof(double)) {
    return v;
  } else {
    return from_acc<scalar_t>(v);
  }
}

template <typename scalar_t, int N>
struct alignas(sizeof(scalar_t) * N) Pack {
  scalar_t v[N];
};

// out[t] = sum_j w[t, j] * y[row_map[t, j]]; tpr threads per token, N elements per load.
template <typename scalar_t, int N>
__global__ void gather_reduce_kernel(const GatherReduceParams args) {
  using acc_t = typename Acc<scalar_t>::type;
  const scalar_t* __restrict__ y = static_cast<const scalar_t*>(args.y);
  const int64_t y_stride = args.y_stride, y_rows = args.y_rows, T = args.T, k = args.k, d = args.d;
  const int64_t* __restrict__ row_map = args.row_map;
  const acc_t* __restrict__ w = static_cast<const acc_t*>(args.w);
  const int tpr = args.tpr;
  scalar_t* __restrict__ out = static_cast<scalar_t*>(args.out);
  using P = Pack<scalar_t, N>;
  const int64_t per_block = blockDim.x / tpr;
  const int lane = threadIdx.x % tpr;
  const int64_t vecs = d / N;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * per_block + threadIdx.x / tpr; t < T;
       t += static_cast<int64_t>(gridDim.x) * per_block) {
    for (int64_t i = lane; i < vecs; i += tpr) {
      acc_t acc[N];
      for (int m = 0; m < N; ++m) acc[m] = acc_t(0);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t row = row_map[t * k + j];
        if (row < 0 || row >= y_rows) continue;
        const acc_t wj = w != nullptr ? w[t * k + j] : acc_t(1);
        const P p = reinterpret_cast<const P*>(y + row * y_stride)[i];
        for (int m = 0; m < N; ++m) acc[m] += wj * to_acc(p.v[m]);
      }
      P o;
      for (int m = 0; m < N; ++m) o.v[m] = store_cast<scalar_t, acc_t>(acc[m]);
      reinterpret_cast<P*>(out + t * d)[i] = o;
    }
  }
}

// grad_y[row] = w[r] * grad_out[r / k] with r = src[row] (flat slot) when that slot maps to row
// (src is -1 where no slot maps: see copy_rows_kernel), zero elsewhere.
template <typename scalar_t, int N>
__global__ void grad_rows_kernel(const GradRowsParams args) {
  using acc_t = typename Acc<scalar_t>::type;
  const scalar_t* __restrict__ grad_out = static_cast<const scalar_t*>(args.grad_out);
  const int64_t* __restrict__ src = args.src;
  const int64_t* __restrict__ row_map = args.row_map;
  const acc_t* __restrict__ w = static_cast<const acc_t*>(args.w);
  const int64_t rows = args.rows, slots = args.slots, k = args.k, d = args.d;
  const int tpr = args.tpr;
  scalar_t* __restrict__ grad_y = static_cast<scalar_t*>(args.grad_y);
  using P = Pack<scalar_t, N>;
  const int64_t per_block = blockDim.x / tpr;
  const int lane = threadIdx.x % tpr;
  const int64_t vecs = d / N;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * per_block + threadIdx.x / tpr; row < rows;
       row += static_cast<int64_t>(gridDim.x) * per_block) {
    const int64_t r = src[row];
    P* dst = reinterpret_cast<P*>(grad_y + row * d);
    if (r < 0 || r >= slots || row_map[r] != row) {
      P z;
      for (int m = 0; m < N; ++m) z.v[m] = store_cast<scalar_t, acc_t>(acc_t(0));
      for (int64_t i = lane; i < vecs; i += tpr) dst[i] = z;
      continue;
    }
    const acc_t wr = w[r];
    const P* g = reinterpret_cast<const P*>(grad_out + (r / k) * d);
    for (int64_t i = lane; i < vecs; i += tpr) {
      const P gi = g[i];
      P o;
      for (int m = 0; m < N; ++m) o.v[m] = store_cast<scalar_t, acc_t>(wr * to_acc(gi.v[m]));
      dst[i] = o;
    }
  }
}

// grad_w[r] = <y[row_map[r]], grad_out[r / k]>: one warp per slot, fixed shuffle tree.
template <typename scalar_t>
__global__ void grad_weights_kernel(const GradWeightsParams args) {
  using acc_t = typename Acc<scalar_t>::type;
  const scalar_t* __restrict__ grad_out = static_cast<const scalar_t*>(args.grad_out);
  const scalar_t* __restrict__ y = static_cast<const scalar_t*>(args.y);
  const int64_t y_stride = args.y_stride, y_rows = args.y_rows, n = args.n, k = args.k, d = args.d;
  const int64_t* __restrict__ row_map = args.row_map;
  acc_t* __restrict__ grad_w = static_cast<acc_t*>(args.grad_w);
  const int lane = threadIdx.x & 31;
  const int64_t warps = blockDim.x / 32;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * warps + threadIdx.x / 32; r < n;
       r += static_cast<int64_t>(gridDim.x) * warps) {
    const int64_t row = row_map[r];
    acc_t s = 0;
    if (row >= 0 && row < y_rows) {
      const scalar_t* yr = y + row * y_stride;
      const scalar_t* g = grad_out + (r / k) * d;
      for (int64_t i = lane; i < d; i += 32) s += to_acc(yr[i]) * to_acc(g[i]);
    }
    for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffffu, s, o);
    if (lane == 0) grad_w[r] = s;
  }
}

}  // namespace
}  // namespace permute
}  // namespace l2r

#if !defined(__CUDACC_RTC__)
// =============================================================================================
// Host: the nvcc executor of the permute launch plans (permute_launch_plan.h decides everything;
// this part maps each planned instantiation to its <<<>>> launch). NVRTC compiles the kernels above
// from this same file and launches them from l2r_cuda/jit.
// =============================================================================================
#include "../../common/static_switch.h"
#include "../../launch/cuda/execute_plan.h"
#include "permute_launch.h"

namespace l2r {
namespace permute {
namespace {

template <typename V>
cudaError_t launch_copy_rows(const LaunchStep& s, cudaStream_t stream) {
  copy_rows_kernel<V><<<grid_of(s), block_of(s), s.smem_bytes, stream>>>(s.params_as<CopyRowsParams>());
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_row_kernel(const LaunchStep& s, cudaStream_t stream) {
  constexpr int kWide = 16 / sizeof(scalar_t);
  const dim3 grid = grid_of(s), block = block_of(s);
  const bool wide = s.kernel.arg1 == kWide;
  if (!wide && s.kernel.arg1 != 1) return cudaErrorInvalidValue;
  switch (static_cast<PermuteKernel>(s.kernel.kernel)) {
    case PermuteKernel::kGatherReduce:
      if (wide) {
        gather_reduce_kernel<scalar_t, kWide><<<grid, block, s.smem_bytes, stream>>>(s.params_as<GatherReduceParams>());
      } else {
        gather_reduce_kernel<scalar_t, 1><<<grid, block, s.smem_bytes, stream>>>(s.params_as<GatherReduceParams>());
      }
      break;
    case PermuteKernel::kGradRows:
      if (wide) {
        grad_rows_kernel<scalar_t, kWide><<<grid, block, s.smem_bytes, stream>>>(s.params_as<GradRowsParams>());
      } else {
        grad_rows_kernel<scalar_t, 1><<<grid, block, s.smem_bytes, stream>>>(s.params_as<GradRowsParams>());
      }
      break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_grad_weights(const LaunchStep& s, cudaStream_t stream) {
  grad_weights_kernel<scalar_t><<<grid_of(s), block_of(s), s.smem_bytes, stream>>>(s.params_as<GradWeightsParams>());
  return cudaGetLastError();
}

cudaError_t launch_permute_step(const LaunchStep& s, cudaStream_t stream) {
  const dim3 grid = grid_of(s), block = block_of(s);
  const KernelRef& k = s.kernel;
  cudaError_t err = cudaErrorInvalidValue;  // an instantiation no plan asks for
  switch (static_cast<PermuteKernel>(k.kernel)) {
    case PermuteKernel::kRankScan:
      if (k.arg0 == 8) {
        rank_scan_kernel<int64_t><<<grid, block, s.smem_bytes, stream>>>(s.params_as<RankScanParams>());
      } else {
        rank_scan_kernel<int32_t><<<grid, block, s.smem_bytes, stream>>>(s.params_as<RankScanParams>());
      }
      return cudaGetLastError();
    case PermuteKernel::kFinalize:
      finalize_kernel<<<grid, block, s.smem_bytes, stream>>>(s.params_as<FinalizeParams>());
      return cudaGetLastError();
    case PermuteKernel::kGroup:
      group_kernel<<<grid, block, s.smem_bytes, stream>>>(s.params_as<GroupParams>());
      return cudaGetLastError();
    case PermuteKernel::kSelect:
      select_kernel<<<grid, block, s.smem_bytes, stream>>>(s.params_as<SelectParams>());
      return cudaGetLastError();
    case PermuteKernel::kInverse:
      inverse_kernel<<<grid, block, s.smem_bytes, stream>>>(s.params_as<InverseParams>());
      return cudaGetLastError();
    case PermuteKernel::kCopyRows:
      switch (k.arg0) {
        case 16: return launch_copy_rows<uint4>(s, stream);
        case 8: return launch_copy_rows<uint2>(s, stream);
        case 4: return launch_copy_rows<unsigned int>(s, stream);
        case 2: return launch_copy_rows<unsigned short>(s, stream);
        default: return err;
      }
    case PermuteKernel::kGatherReduce:
    case PermuteKernel::kGradRows:
      L2R_DTYPE_SWITCH(static_cast<DType>(k.arg0), scalar_t, return err, { err = launch_row_kernel<scalar_t>(s, stream); });
      return err;
    case PermuteKernel::kGradWeights:
      L2R_DTYPE_SWITCH(static_cast<DType>(k.arg0), scalar_t, return err, { err = launch_grad_weights<scalar_t>(s, stream); });
      return err;
  }
  return err;
}

cudaError_t run(const LaunchPlan& plan, cudaStream_t stream) {
  return plan.ok() ? execute_permute_plan(plan, stream) : cudaErrorInvalidValue;
}

}  // namespace

cudaError_t execute_permute_plan(const LaunchPlan& plan, cudaStream_t stream) {
  return execute_plan(plan, stream, launch_permute_step);
}

cudaError_t launch_permute_plan(const void* indices, bool indices_int64, int64_t T, int64_t k,
                                int64_t experts, int64_t align, int64_t capacity,
                                const float* weights, int64_t* row_map, int64_t* offsets,
                                int64_t* dropped, void* workspace, int32_t* control,
                                cudaStream_t stream) {
  return run(permute_plan_launches(indices, indices_int64, T, k, experts, align, capacity, weights, row_map,
                                   offsets, dropped, workspace, control),
             stream);
}

cudaError_t launch_permute_rows(const void* x, int64_t x_row_stride_bytes, int64_t row_bytes,
                                const int64_t* row_map, int64_t T, int64_t k, int64_t num_rows,
                                int64_t* src_scratch, void* out, bool every_row_mapped, cudaStream_t stream) {
  return run(permute_rows_launches(x, x_row_stride_bytes, row_bytes, row_map, T, k, num_rows, src_scratch, out,
                                   every_row_mapped),
             stream);
}

cudaError_t launch_gather_reduce(DType dtype, const void* y, int64_t y_row_stride, int64_t y_rows,
                                 const int64_t* row_map, const void* w, int64_t T, int64_t k,
                                 int64_t d, void* out, cudaStream_t stream) {
  return run(gather_reduce_launches(dtype, y, y_row_stride, y_rows, row_map, w, T, k, d, out), stream);
}

cudaError_t launch_unpermute_backward(DType dtype, const void* grad_out, const void* y,
                                      int64_t y_row_stride, int64_t y_rows, const int64_t* row_map,
                                      const void* w, int64_t T, int64_t k, int64_t d,
                                      int64_t* src_scratch, void* grad_y, void* grad_w,
                                      cudaStream_t stream) {
  return run(unpermute_backward_launches(dtype, grad_out, y, y_row_stride, y_rows, row_map, w, T, k, d,
                                         src_scratch, grad_y, grad_w),
             stream);
}

}  // namespace permute
}  // namespace l2r
#endif  // !__CUDACC_RTC__
