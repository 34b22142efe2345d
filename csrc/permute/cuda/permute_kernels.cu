// CUDA kernels of token permutation (SPEC "Dispatch"). The dispatch plan is a counting sort without
// atomics: every block ranks its chunk of 256 flat (token, slot) rows per expert (chunk histogram),
// one block scans the histograms per expert in chunk order and the padded expert sizes into
// offsets (our own scan: CUB cannot run in the SIMT emulator), and a last pass writes
// row = offset[e] + chunk base + rank in chunk. Capacity with router weights selects the kept rows
// of each expert by a 64-step radix select on unique (weight, token) keys, then recounts.
// Row copies move 16-byte vectors where alignment allows; reductions are token-major gathers in a
// fixed order (no floating-point atomics), so every output is bitwise deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "permute_launch.h"
#include "../permute_math.cuh"

namespace l2r {
namespace permute {
namespace {

constexpr int kChunk = 256;         // rows per block of the counting sort (= its block size)
constexpr int kScanThreads = 1024;  // the single-block scan
constexpr int kSelectThreads = 256;
constexpr int kRowThreads = 256;    // row copy / gather blocks
constexpr int kMaxGrid = 65535 * 16;

size_t align_bytes(size_t b) { return (b + 255) / 256 * 256; }
__host__ __device__ inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- dispatch plan -------------------------------------------------------------------------------

// Per chunk: expert of each row (-1 for dropped / out of range), its rank among the chunk's earlier
// rows of the same expert, and the chunk's per-expert count (written by the expert's last row;
// the histogram is zeroed before). in may alias expert_out (pass 2 re-ranks the kept rows).
template <typename index_t>
__global__ void chunk_rank_kernel(const index_t* in, int64_t n, int64_t experts, int32_t* expert_out,
                                  int32_t* __restrict__ local, int64_t* __restrict__ hist,
                                  int32_t* error_flag) {
  __shared__ int32_t s_expert[kChunk];
  const int tid = threadIdx.x;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kChunk + tid;
  int32_t e = -1;
  if (r < n) {
    const int64_t v = checked_expert(in[r], experts);
    if (v < 0 && error_flag != nullptr) *error_flag = 1;
    e = static_cast<int32_t>(v);
    expert_out[r] = e;
  }
  s_expert[tid] = e;
  __syncthreads();
  if (e < 0) return;
  int32_t before = 0;
  bool last = true;
  for (int i = 0; i < kChunk; ++i) {
    if (s_expert[i] == e) {
      if (i < tid) ++before;
      if (i > tid) last = false;
    }
  }
  local[r] = before;
  if (last) hist[static_cast<int64_t>(blockIdx.x) * experts + e] = before + 1;
}

__device__ __forceinline__ int64_t kept_rows(int64_t count, int64_t capacity) {
  return (capacity >= 0 && count > capacity) ? capacity : count;
}

// One block. Phase A: for every expert, the exclusive prefix of its chunk counts in chunk order
// (in place, one warp per expert, 32 chunks per step) and its total -> counts. Phase B: offsets =
// exclusive scan over experts of round_up(min(count, capacity), align); dropped = (counts_all or
// counts) - kept.
__global__ void scan_kernel(int64_t* hist, int64_t chunks, int64_t experts, int64_t align,
                            int64_t capacity, const int64_t* counts_all, int64_t* counts,
                            int64_t* offsets, int64_t* dropped) {
  __shared__ int64_t s_sum[kScanThreads];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warps = blockDim.x >> 5;
  for (int64_t e = warp; e < experts; e += warps) {
    int64_t carry = 0;
    for (int64_t b0 = 0; b0 < chunks; b0 += 32) {
      const int64_t b = b0 + lane;
      const int64_t v = b < chunks ? hist[b * experts + e] : 0;
      int64_t incl = v;
      for (int o = 1; o < 32; o <<= 1) {
        const int64_t u = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += u;
      }
      if (b < chunks) hist[b * experts + e] = carry + incl - v;
      carry += __shfl_sync(0xffffffffu, incl, 31);
    }
    if (lane == 0) counts[e] = carry;
  }
  __syncthreads();
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

// row_map[r] = offsets[e] + chunk base + rank in chunk; -1 when dropped (or past capacity).
__global__ void finalize_kernel(const int32_t* __restrict__ expert, const int32_t* __restrict__ local,
                                const int64_t* __restrict__ hist, int64_t n, int64_t experts,
                                int64_t capacity, const int64_t* __restrict__ offsets,
                                int64_t* __restrict__ row_map) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kChunk + threadIdx.x;
  if (r >= n) return;
  const int32_t e = expert[r];
  if (e < 0) {
    row_map[r] = -1;
    return;
  }
  const int64_t p = hist[static_cast<int64_t>(blockIdx.x) * experts + e] + local[r];
  row_map[r] = (capacity >= 0 && p >= capacity) ? -1 : offsets[e] + p;
}

// grouped[row_map[r]] = r for kept rows. Pass 1 places rows in [0, n) (unpadded, no capacity);
// the bound keeps a corrupt row_map from writing outside `grouped` all the same.
__global__ void group_kernel(const int64_t* __restrict__ row_map, int64_t n,
                             int64_t* __restrict__ grouped) {
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < n;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = row_map[r];
    if (row >= 0 && row < n) grouped[row] = r;
  }
}

// One block per expert over more than `capacity` rows: keep the `capacity` largest capacity_key
// (radix select of the capacity-th largest key, bit by bit), mark the others dropped.
__global__ void select_kernel(const int64_t* __restrict__ grouped, const int64_t* __restrict__ starts,
                              const int64_t* __restrict__ counts, int64_t capacity,
                              const float* __restrict__ w, int32_t* __restrict__ expert) {
  __shared__ int64_t s_red[kSelectThreads];
  const int tid = threadIdx.x;
  const int64_t count = counts[blockIdx.x];
  if (count <= capacity) return;
  const int64_t* rows = grouped + starts[blockIdx.x];
  uint64_t threshold = 0;
  if (capacity > 0) {
    for (int bit = 63; bit >= 0; --bit) {
      const uint64_t candidate = threshold | (uint64_t{1} << bit);
      int64_t c = 0;
      for (int64_t i = tid; i < count; i += blockDim.x) {
        c += capacity_key(w[rows[i]], rows[i]) >= candidate ? 1 : 0;
      }
      s_red[tid] = c;
      __syncthreads();
      for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (tid < s) s_red[tid] += s_red[tid + s];
        __syncthreads();
      }
      const int64_t total = s_red[0];
      __syncthreads();
      if (total >= capacity) threshold = candidate;
    }
  }
  for (int64_t i = tid; i < count; i += blockDim.x) {
    const int64_t r = rows[i];
    if (capacity == 0 || capacity_key(w[r], r) < threshold) expert[r] = -1;
  }
}

// ---- rows ----------------------------------------------------------------------------------------

// src[row_map[r]] = r / divisor for rows in [0, num_rows); src was filled with -1.
__global__ void inverse_kernel(const int64_t* __restrict__ row_map, int64_t n, int64_t divisor,
                               int64_t num_rows, int64_t* __restrict__ src) {
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < n;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = row_map[r];
    if (row >= 0 && row < num_rows) src[row] = r / divisor;
  }
}

// Rows are spread over blocks as groups of `tpr` threads (a power of two <= kRowThreads).
struct RowLayout {
  int tpr;
  int64_t grid;
};

RowLayout row_layout(int64_t rows, int64_t units_per_row) {
  int tpr = 1;
  while (tpr < kRowThreads && tpr < units_per_row) tpr <<= 1;
  const int64_t per_block = kRowThreads / tpr;
  int64_t grid = cdiv(rows, per_block);
  if (grid > kMaxGrid) grid = kMaxGrid;
  return {tpr, grid < 1 ? 1 : grid};
}

template <typename V>
__global__ void copy_rows_kernel(const char* __restrict__ x, int64_t x_stride_bytes,
                                 const int64_t* __restrict__ src, int64_t num_rows, int64_t vecs,
                                 int tpr, char* __restrict__ out) {
  const int64_t per_block = blockDim.x / tpr;
  const int lane = threadIdx.x % tpr;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * per_block + threadIdx.x / tpr;
       row < num_rows; row += static_cast<int64_t>(gridDim.x) * per_block) {
    V* dst = reinterpret_cast<V*>(out + row * vecs * static_cast<int64_t>(sizeof(V)));
    const int64_t t = src[row];
    if (t >= 0) {
      const V* s = reinterpret_cast<const V*>(x + t * x_stride_bytes);
      for (int64_t i = lane; i < vecs; i += tpr) dst[i] = s[i];
    } else {
      const V zero{};
      for (int64_t i = lane; i < vecs; i += tpr) dst[i] = zero;
    }
  }
}

template <typename V>
void copy_rows(const void* x, int64_t x_stride_bytes, const int64_t* src, int64_t num_rows,
               int64_t row_bytes, void* out, cudaStream_t stream) {
  const int64_t vecs = row_bytes / static_cast<int64_t>(sizeof(V));
  const RowLayout l = row_layout(num_rows, vecs);
  copy_rows_kernel<V><<<static_cast<unsigned>(l.grid), kRowThreads, 0, stream>>>(
      static_cast<const char*>(x), x_stride_bytes, src, num_rows, vecs, l.tpr,
      static_cast<char*>(out));
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
__global__ void gather_reduce_kernel(const scalar_t* __restrict__ y, int64_t y_stride, int64_t y_rows,
                                     const int64_t* __restrict__ row_map,
                                     const typename Acc<scalar_t>::type* __restrict__ w, int64_t T,
                                     int64_t k, int64_t d, int tpr, scalar_t* __restrict__ out) {
  using acc_t = typename Acc<scalar_t>::type;
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

// grad_y[row] = w[r] * grad_out[r / k] with r = src[row] (flat slot), zero where src < 0.
template <typename scalar_t, int N>
__global__ void grad_rows_kernel(const scalar_t* __restrict__ grad_out, const int64_t* __restrict__ src,
                                 const typename Acc<scalar_t>::type* __restrict__ w, int64_t rows,
                                 int64_t k, int64_t d, int tpr, scalar_t* __restrict__ grad_y) {
  using acc_t = typename Acc<scalar_t>::type;
  using P = Pack<scalar_t, N>;
  const int64_t per_block = blockDim.x / tpr;
  const int lane = threadIdx.x % tpr;
  const int64_t vecs = d / N;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * per_block + threadIdx.x / tpr; row < rows;
       row += static_cast<int64_t>(gridDim.x) * per_block) {
    const int64_t r = src[row];
    P* dst = reinterpret_cast<P*>(grad_y + row * d);
    if (r < 0) {
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
__global__ void grad_weights_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ y,
                                    int64_t y_stride, int64_t y_rows,
                                    const int64_t* __restrict__ row_map, int64_t n, int64_t k,
                                    int64_t d, typename Acc<scalar_t>::type* __restrict__ grad_w) {
  using acc_t = typename Acc<scalar_t>::type;
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

template <typename scalar_t>
int pack_width(const void* a, const void* b, int64_t stride, int64_t d) {
  constexpr int kWide = 16 / sizeof(scalar_t);
  const bool ok = d % kWide == 0 && stride % kWide == 0 &&
                  reinterpret_cast<uintptr_t>(a) % 16 == 0 && reinterpret_cast<uintptr_t>(b) % 16 == 0;
  return ok ? kWide : 1;
}

template <typename scalar_t>
void gather_reduce_typed(const void* y, int64_t y_stride, int64_t y_rows, const int64_t* row_map,
                         const void* w, int64_t T, int64_t k, int64_t d, void* out,
                         cudaStream_t stream) {
  using acc_t = typename Acc<scalar_t>::type;
  constexpr int kWide = 16 / sizeof(scalar_t);
  const int n = pack_width<scalar_t>(y, out, y_stride, d);
  const RowLayout l = row_layout(T, d / n);
  const auto* yp = static_cast<const scalar_t*>(y);
  const auto* wp = static_cast<const acc_t*>(w);
  auto* op = static_cast<scalar_t*>(out);
  if (n == kWide) {
    gather_reduce_kernel<scalar_t, kWide><<<static_cast<unsigned>(l.grid), kRowThreads, 0, stream>>>(
        yp, y_stride, y_rows, row_map, wp, T, k, d, l.tpr, op);
  } else {
    gather_reduce_kernel<scalar_t, 1><<<static_cast<unsigned>(l.grid), kRowThreads, 0, stream>>>(
        yp, y_stride, y_rows, row_map, wp, T, k, d, l.tpr, op);
  }
}

template <typename scalar_t>
void unpermute_backward_typed(const void* grad_out, const void* y, int64_t y_stride, int64_t y_rows,
                              const int64_t* row_map, const void* w, int64_t T, int64_t k, int64_t d,
                              int64_t* src, void* grad_y, void* grad_w, cudaStream_t stream) {
  using acc_t = typename Acc<scalar_t>::type;
  constexpr int kWide = 16 / sizeof(scalar_t);
  const int64_t n = T * k;
  if (y_rows > 0) {
    cudaMemsetAsync(src, 0xff, y_rows * sizeof(int64_t), stream);
    if (n > 0) {
      const int64_t grid = cdiv(n, 256) < kMaxGrid ? cdiv(n, 256) : kMaxGrid;
      inverse_kernel<<<static_cast<unsigned>(grid), 256, 0, stream>>>(row_map, n, 1, y_rows, src);
    }
    const int pw = pack_width<scalar_t>(grad_out, grad_y, d, d);
    const RowLayout l = row_layout(y_rows, d / pw);
    const auto* gp = static_cast<const scalar_t*>(grad_out);
    const auto* wp = static_cast<const acc_t*>(w);
    auto* gy = static_cast<scalar_t*>(grad_y);
    if (pw == kWide) {
      grad_rows_kernel<scalar_t, kWide><<<static_cast<unsigned>(l.grid), kRowThreads, 0, stream>>>(
          gp, src, wp, y_rows, k, d, l.tpr, gy);
    } else {
      grad_rows_kernel<scalar_t, 1><<<static_cast<unsigned>(l.grid), kRowThreads, 0, stream>>>(
          gp, src, wp, y_rows, k, d, l.tpr, gy);
    }
  }
  if (n > 0) {
    const int64_t grid = cdiv(n, kRowThreads / 32) < kMaxGrid ? cdiv(n, kRowThreads / 32) : kMaxGrid;
    grad_weights_kernel<scalar_t><<<static_cast<unsigned>(grid), kRowThreads, 0, stream>>>(
        static_cast<const scalar_t*>(grad_out), static_cast<const scalar_t*>(y), y_stride, y_rows,
        row_map, n, k, d, static_cast<acc_t*>(grad_w));
  }
}

struct PlanScratch {
  int32_t* expert;
  int32_t* local;
  int64_t* hist;
  int64_t* counts;
  int64_t* starts;
  int64_t* grouped;
};

PlanScratch carve(void* workspace, int64_t n, int64_t experts, bool with_weights) {
  char* p = static_cast<char*>(workspace);
  const int64_t chunks = cdiv(n, kChunk);
  PlanScratch s{};
  s.expert = reinterpret_cast<int32_t*>(p);
  p += align_bytes(n * sizeof(int32_t));
  s.local = reinterpret_cast<int32_t*>(p);
  p += align_bytes(n * sizeof(int32_t));
  s.hist = reinterpret_cast<int64_t*>(p);
  p += align_bytes(chunks * experts * sizeof(int64_t));
  s.counts = reinterpret_cast<int64_t*>(p);
  p += align_bytes(experts * sizeof(int64_t));
  s.starts = reinterpret_cast<int64_t*>(p);
  p += align_bytes((experts + 1) * sizeof(int64_t));
  s.grouped = with_weights ? reinterpret_cast<int64_t*>(p) : nullptr;
  return s;
}

// Histogram + scan + finalize over the rows of `in` (indices on pass 1, the masked experts after).
template <typename index_t>
void counting_pass(const index_t* in, int64_t n, int64_t experts, int64_t align, int64_t capacity,
                   const int64_t* counts_all, const PlanScratch& s, int64_t* counts,
                   int64_t* offsets, int64_t* dropped, int64_t* row_map, int32_t* error_flag,
                   cudaStream_t stream) {
  const int64_t chunks = cdiv(n, kChunk);
  if (chunks > 0) {
    cudaMemsetAsync(s.hist, 0, chunks * experts * sizeof(int64_t), stream);
    chunk_rank_kernel<index_t><<<static_cast<unsigned>(chunks), kChunk, 0, stream>>>(
        in, n, experts, s.expert, s.local, s.hist, error_flag);
  }
  scan_kernel<<<1, kScanThreads, 0, stream>>>(s.hist, chunks, experts, align, capacity, counts_all,
                                              counts, offsets, dropped);
  if (chunks > 0) {
    finalize_kernel<<<static_cast<unsigned>(chunks), kChunk, 0, stream>>>(
        s.expert, s.local, s.hist, n, experts, capacity, offsets, row_map);
  }
}

template <typename index_t>
void plan_typed(const index_t* indices, int64_t n, int64_t experts, int64_t align, int64_t capacity,
                const float* weights, int64_t* row_map, int64_t* offsets, int64_t* dropped,
                void* workspace, int32_t* error_flag, cudaStream_t stream) {
  const bool weighted = capacity >= 0 && weights != nullptr;
  const PlanScratch s = carve(workspace, n, experts, weighted);
  if (!weighted) {
    counting_pass<index_t>(indices, n, experts, align, capacity, nullptr, s, s.counts, offsets,
                           dropped, row_map, error_flag, stream);
    return;
  }
  // Pass 1: group every row by expert (unpadded), select the kept rows of full experts.
  counting_pass<index_t>(indices, n, experts, 1, -1, nullptr, s, s.counts, s.starts, nullptr,
                         row_map, error_flag, stream);
  if (n > 0) {
    const int64_t grid = cdiv(n, 256) < kMaxGrid ? cdiv(n, 256) : kMaxGrid;
    group_kernel<<<static_cast<unsigned>(grid), 256, 0, stream>>>(row_map, n, s.grouped);
  }
  select_kernel<<<static_cast<unsigned>(experts), kSelectThreads, 0, stream>>>(
      s.grouped, s.starts, s.counts, capacity, weights, s.expert);
  // Pass 2: rank the kept rows again, padded; dropped = all rows - kept rows.
  // (s.starts is free again and receives the kept counts.)
  counting_pass<int32_t>(s.expert, n, experts, align, -1, s.counts, s, s.starts, offsets, dropped,
                         row_map, nullptr, stream);
}

}  // namespace

size_t plan_workspace_bytes(int64_t n, int64_t experts, bool with_weights) {
  const int64_t chunks = cdiv(n, kChunk);
  size_t b = 2 * align_bytes(n * sizeof(int32_t)) + align_bytes(chunks * experts * sizeof(int64_t)) +
             align_bytes(experts * sizeof(int64_t)) + align_bytes((experts + 1) * sizeof(int64_t));
  if (with_weights) b += align_bytes(n * sizeof(int64_t));
  return b;
}

cudaError_t launch_permute_plan(const void* indices, bool indices_int64, int64_t T, int64_t k,
                                int64_t experts, int64_t align, int64_t capacity,
                                const float* weights, int64_t* row_map, int64_t* offsets,
                                int64_t* dropped, void* workspace, int32_t* error_flag,
                                cudaStream_t stream) {
  const int64_t n = T * k;
  if (indices_int64) {
    plan_typed<int64_t>(static_cast<const int64_t*>(indices), n, experts, align, capacity, weights,
                        row_map, offsets, dropped, workspace, error_flag, stream);
  } else {
    plan_typed<int32_t>(static_cast<const int32_t*>(indices), n, experts, align, capacity, weights,
                        row_map, offsets, dropped, workspace, error_flag, stream);
  }
  return cudaGetLastError();
}

cudaError_t launch_permute_rows(const void* x, int64_t x_row_stride_bytes, int64_t row_bytes,
                                const int64_t* row_map, int64_t T, int64_t k, int64_t num_rows,
                                int64_t* src_scratch, void* out, cudaStream_t stream) {
  const int64_t n = T * k;
  if (num_rows == 0 || row_bytes == 0) return cudaGetLastError();
  cudaMemsetAsync(src_scratch, 0xff, num_rows * sizeof(int64_t), stream);
  if (n > 0) {
    const int64_t grid = cdiv(n, 256) < kMaxGrid ? cdiv(n, 256) : kMaxGrid;
    inverse_kernel<<<static_cast<unsigned>(grid), 256, 0, stream>>>(row_map, n, k, num_rows,
                                                                    src_scratch);
  }
  const uintptr_t a = reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(out) |
                      static_cast<uintptr_t>(x_row_stride_bytes) | static_cast<uintptr_t>(row_bytes);
  if (a % 16 == 0) {
    copy_rows<uint4>(x, x_row_stride_bytes, src_scratch, num_rows, row_bytes, out, stream);
  } else if (a % 8 == 0) {
    copy_rows<uint2>(x, x_row_stride_bytes, src_scratch, num_rows, row_bytes, out, stream);
  } else if (a % 4 == 0) {
    copy_rows<unsigned int>(x, x_row_stride_bytes, src_scratch, num_rows, row_bytes, out, stream);
  } else {
    copy_rows<unsigned short>(x, x_row_stride_bytes, src_scratch, num_rows, row_bytes, out, stream);
  }
  return cudaGetLastError();
}

cudaError_t launch_gather_reduce(DType dtype, const void* y, int64_t y_row_stride, int64_t y_rows,
                                 const int64_t* row_map, const void* w, int64_t T, int64_t k,
                                 int64_t d, void* out, cudaStream_t stream) {
  if (T == 0 || d == 0) return cudaGetLastError();
  switch (dtype) {
    case DType::kFloat32:
      gather_reduce_typed<float>(y, y_row_stride, y_rows, row_map, w, T, k, d, out, stream);
      break;
    case DType::kFloat64:
      gather_reduce_typed<double>(y, y_row_stride, y_rows, row_map, w, T, k, d, out, stream);
      break;
    case DType::kFloat16:
      gather_reduce_typed<__half>(y, y_row_stride, y_rows, row_map, w, T, k, d, out, stream);
      break;
    case DType::kBFloat16:
      gather_reduce_typed<__nv_bfloat16>(y, y_row_stride, y_rows, row_map, w, T, k, d, out, stream);
      break;
  }
  return cudaGetLastError();
}

cudaError_t launch_unpermute_backward(DType dtype, const void* grad_out, const void* y,
                                      int64_t y_row_stride, int64_t y_rows, const int64_t* row_map,
                                      const void* w, int64_t T, int64_t k, int64_t d,
                                      int64_t* src_scratch, void* grad_y, void* grad_w,
                                      cudaStream_t stream) {
  if (d == 0) {
    if (T * k > 0) cudaMemsetAsync(grad_w, 0, T * k * (dtype == DType::kFloat64 ? 8 : 4), stream);
    return cudaGetLastError();
  }
  switch (dtype) {
    case DType::kFloat32:
      unpermute_backward_typed<float>(grad_out, y, y_row_stride, y_rows, row_map, w, T, k, d,
                                      src_scratch, grad_y, grad_w, stream);
      break;
    case DType::kFloat64:
      unpermute_backward_typed<double>(grad_out, y, y_row_stride, y_rows, row_map, w, T, k, d,
                                       src_scratch, grad_y, grad_w, stream);
      break;
    case DType::kFloat16:
      unpermute_backward_typed<__half>(grad_out, y, y_row_stride, y_rows, row_map, w, T, k, d,
                                       src_scratch, grad_y, grad_w, stream);
      break;
    case DType::kBFloat16:
      unpermute_backward_typed<__nv_bfloat16>(grad_out, y, y_row_stride, y_rows, row_map, w, T, k,
                                              d, src_scratch, grad_y, grad_w, stream);
      break;
  }
  return cudaGetLastError();
}

}  // namespace permute
}  // namespace l2r
