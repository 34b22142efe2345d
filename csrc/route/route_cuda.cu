// CUDA kernels of the fused L2R router: forward and recomputing backward. No torch headers: the
// ATen glue is route_ops_cuda.cpp, and tests/simt builds this file unchanged for the CPU emulator.
//
// Layout (both directions): one warp per token, kWarpsPerBlock tokens per block at a time, a
// grid-stride loop over tokens. The warp reads its x row once with 16-byte vector loads when x's
// rows are 16-byte aligned (scalar loads otherwise), reduces the low-rank projection with warp
// shuffles, then spreads the experts over its lanes (expert e on lane e % 32) for SIPS, the
// log-sum-exp over anchors and experts, the probabilities and k rounds of warp arg-max for top-k.
// The folded projection proj * norm_weight and the pre-normalized anchors coef(|a|) * a are
// prepared in fp32 by route_prepare_kernel and staged in shared memory when they fit.
//
// Per-token math is route_math.cuh's, shared with the CPU kernels. Cross-token sums (mean_probs,
// tokens_per_expert, every parameter gradient) go through per-block or per-warp partials in a
// fixed layout and a second kernel that adds them in a fixed order: no floating-point atomics, so
// every result is bitwise reproducible run to run.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <utility>

#include "route_cuda.h"
#include "route_math.cuh"

namespace l2r {
namespace route {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kThreads = kWarp * kWarpsPerBlock;
constexpr int kMaxForwardBlocks = 1024;
constexpr int kMaxBackwardBlocks = 256;
constexpr int kColumnThreads = 256;
constexpr int kMaxColumnChunks = 64;
constexpr int kMinColumnChunk = 64;
constexpr int kGenericChunk = 8;  // rank chunk of the generic (r > 32) kernels
constexpr unsigned kFullMask = 0xffffffffu;

// Minimum resident blocks per SM for __launch_bounds__ (R: the template rank, 0 = generic).
// Stating it matters: with a thread bound alone ptxas picks a register budget by its own occupancy
// heuristic and spills to reach it. Four blocks (a 128-register budget) fit the small ranks; large
// ranks keep all their accumulators in registers with two. The launchers also keep the optional
// shared-memory arrays within 1 / min-blocks of the SM's shared memory, so that shared memory
// does not cut occupancy below what the registers allow.
constexpr int forward_min_blocks(int R) { return (R == 0 || R >= 16) ? 2 : 4; }
constexpr int backward_min_blocks(int R) { return (R == 0 || R >= 16) ? 2 : 4; }
constexpr int template_rank(int rp) { return rp > 32 ? 0 : rp; }

// =============================================================================================
// Device helpers
// =============================================================================================

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

__device__ __forceinline__ void store_float(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_float(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }
__device__ __forceinline__ void store_float(__half* p, float v) { *p = __float2half(v); }

// Elements of T in one 16-byte vector.
template <typename T>
struct VecWidth {
  static constexpr int value = static_cast<int>(16 / sizeof(T));
};

// Elements per x load in the projection: 16 bytes, except 8 bytes (4 elements) for 16-bit x with
// 8+ ranks, where 8 elements times R rows of FMAs per step would exceed the register budget.
template <int RC, typename T>
struct ProjectWidth {
  static constexpr int value = (sizeof(T) == 2 && RC >= 8) ? 4 : VecWidth<T>::value;
};

// out[j] = float(p[j]) for one aligned vector of N elements (16 or 8 bytes).
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

// p[j] = T(v[j]) for one 16-byte aligned vector.
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

__device__ __forceinline__ SoftmaxStats<float> warp_merge_stats(SoftmaxStats<float> st) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    SoftmaxStats<float> other;
    other.max = __shfl_xor_sync(kFullMask, st.max, off);
    other.sum = __shfl_xor_sync(kFullMask, st.sum, off);
    st = softmax_stats_merge(st, other);
  }
  return st;
}

// Warp arg-max under candidate_before (a strict total order): every lane ends with the winner.
__device__ __forceinline__ void warp_best(float& key, int& index) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    const float other_key = __shfl_xor_sync(kFullMask, key, off);
    const int other_index = __shfl_xor_sync(kFullMask, index, off);
    if (candidate_before(other_key, other_index, key, index)) {
      key = other_key;
      index = other_index;
    }
  }
}

// An index read from memory, kept inside [0, n) so that a corrupt value cannot address outside.
__device__ __forceinline__ int64_t clamp_index(int64_t i, int n) { return i < 0 ? 0 : (i >= n ? n - 1 : i); }

// Copies n floats to shared memory with the whole block (the caller synchronizes).
__device__ __forceinline__ void stage_to_smem(const float* src, float* dst, int64_t n) {
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) dst[i] = __ldg(src + i);
}

// This lane's share of one x row: acc[j] += <rows[j], x>, sumsq += <x, x>. rows is [RC, d] with
// row stride d; vec: x row and rows are 16-byte aligned and d * sizeof(T) is a multiple of 16.
template <int RC, typename T>
__device__ __forceinline__ void project_lane(const T* xrow, const float* rows, int64_t d, bool vec,
                                             int lane, float (&acc)[RC], float& sumsq) {
  if (vec) {
    constexpr int V = ProjectWidth<RC, T>::value;
    for (int64_t v = lane; v < d / V; v += kWarp) {
      float xv[V];
      load_vec<V>(xrow + v * V, xv);
#pragma unroll
      for (int j = 0; j < V; ++j) sumsq += xv[j] * xv[j];
#pragma unroll
      for (int k = 0; k < RC; ++k) {
        const float* w = rows + k * d + v * V;
#pragma unroll
        for (int j = 0; j < V; j += 4) {
          const float4 w4 = *reinterpret_cast<const float4*>(w + j);
          acc[k] += w4.x * xv[j];
          acc[k] += w4.y * xv[j + 1];
          acc[k] += w4.z * xv[j + 2];
          acc[k] += w4.w * xv[j + 3];
        }
      }
    }
  } else {
    for (int64_t i = lane; i < d; i += kWarp) {
      const float xi = to_float(xrow[i]);
      sumsq += xi * xi;
#pragma unroll
      for (int k = 0; k < RC; ++k) acc[k] += rows[k * d + i] * xi;
    }
  }
}

// dL/dx_hat at column i: sum_k grad_q[k] * rows[k, i] (rows: proj * norm_weight).
template <int R>
__device__ __forceinline__ float hat_grad(const float* rows, int64_t d, int64_t i, const float* gq,
                                          int rank) {
  const int n = R > 0 ? R : rank;
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < n; ++k) s += gq[k] * rows[k * d + i];
  return s;
}

// Logits of this lane's experts into logits[e]; returns the warp-merged softmax statistics.
template <int R>
__device__ __forceinline__ SoftmaxStats<float> lane_logits(const float* q, const float* anchor_hat,
                                                           int experts, int anchors, int rank,
                                                           float q_scale, float tau, int lane,
                                                           float* logits) {
  const int rp = R > 0 ? R : rank;
  SoftmaxStats<float> st = softmax_stats_empty<float>();
  for (int e = lane; e < experts; e += kWarp) {
    const float l = expert_logit(q, anchor_hat + static_cast<int64_t>(e) * anchors * rp, anchors,
                                 rp, q_scale, tau);
    logits[e] = l;
    st = softmax_stats_add(st, l);
  }
  return warp_merge_stats(st);
}

// =============================================================================================
// Kernels
// =============================================================================================

// proj_w[k, i] = proj[k, i] * g[i] (0 for padded rows k >= r); anchor_hat[a, j] = coef(|a|) a[j]
// (0 for padded j >= r).
__global__ void route_prepare_kernel(const float* __restrict__ proj, const float* __restrict__ g,
                                     const float* __restrict__ anchors, int rank, int rp, int64_t d,
                                     int64_t num_anchor_rows, float beta, float eps,
                                     float* __restrict__ proj_w, float* __restrict__ anchor_hat) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t n = start; n < rp * d; n += stride) {
    const int64_t k = n / d, i = n % d;
    proj_w[n] = k < rank ? (g ? proj[k * d + i] * g[i] : proj[k * d + i]) : 0.f;
  }
  for (int64_t n = start; n < num_anchor_rows * rp; n += stride) {
    const int64_t a = n / rp;
    const int j = static_cast<int>(n % rp);
    const float* row = anchors + a * rank;
    const NormCoef<float> c = sips_norm_coef(math_sqrt(dot(row, row, rank)), beta, eps);
    anchor_hat[n] = j < rank ? c.coef * row[j] : 0.f;
  }
}

struct ForwardParams {
  const void* x;
  const float* proj_w;      // [rp, d]
  const float* anchor_hat;  // [E, H, rp]
  const float* bias;        // [E] or nullptr
  const float* scale;       // [1]
  float* weights;
  int64_t* indices;
  float* lse;
  float* q_out;
  float* rstd_out;
  float* prob_partials;     // [grid, E]
  int* count_partials;      // [grid, E]
  int64_t tokens, d;
  int rank, rp, experts, anchors, top_k;
  float beta, eps_norm, eps, tau;
  bool use_norm, sigmoid, normalize, vec;
  int64_t proj_smem, anchor_smem;  // offsets (floats) into shared memory, -1: read from global
  int64_t warp_smem, warp_stride;  // per-warp scratch: probs [E] | prob sums [E] | counts [E] |
                                   // selected [k] | q [rp]
};

template <int R, typename T>
__global__ void __launch_bounds__(kThreads, forward_min_blocks(R))
    route_forward_kernel(const ForwardParams p) {
  extern __shared__ float4 smem_vec[];
  float* smem = reinterpret_cast<float*>(smem_vec);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int E = p.experts, H = p.anchors, K = p.top_k;
  const int rp = R > 0 ? R : p.rp;
  const int64_t d = p.d;

  const float* proj_w = p.proj_w;
  if (p.proj_smem >= 0) {
    stage_to_smem(p.proj_w, smem + p.proj_smem, rp * d);
    proj_w = smem + p.proj_smem;
  }
  const float* anchor_hat = p.anchor_hat;
  if (p.anchor_smem >= 0) {
    stage_to_smem(p.anchor_hat, smem + p.anchor_smem, static_cast<int64_t>(E) * H * rp);
    anchor_hat = smem + p.anchor_smem;
  }
  float* probs = smem + p.warp_smem + warp * p.warp_stride;
  float* prob_sum = probs + E;
  int* counts = reinterpret_cast<int*>(prob_sum + E);
  int* selected = counts + E;
  float* q_smem = reinterpret_cast<float*>(selected + K);
  for (int e = lane; e < E; e += kWarp) {
    prob_sum[e] = 0.f;
    counts[e] = 0;
  }
  __syncthreads();

  const float scale = __ldg(p.scale);
  const T* x = static_cast<const T*>(p.x);
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp; t < p.tokens;
       t += warps) {
    const T* xrow = x + t * d;
    // --- RMSNorm + projection: q = (proj * g) x * rstd.
    float q_reg[R > 0 ? R : 1];
    float rstd = 1.f;
    if constexpr (R > 0) {
      float sumsq = 0.f;
#pragma unroll
      for (int k = 0; k < R; ++k) q_reg[k] = 0.f;
      project_lane<R>(xrow, proj_w, d, p.vec, lane, q_reg, sumsq);
      sumsq = warp_sum(sumsq);
#pragma unroll
      for (int k = 0; k < R; ++k) q_reg[k] = warp_sum(q_reg[k]);
      if (p.use_norm) {
        rstd = rms_inv_scale(sumsq, d, p.eps_norm);
#pragma unroll
        for (int k = 0; k < R; ++k) q_reg[k] *= rstd;
      }
#pragma unroll
      for (int k = 0; k < R; ++k) {
        if (k == lane && k < p.rank) p.q_out[t * p.rank + k] = q_reg[k];
      }
    } else {
      for (int c = 0; c < rp; c += kGenericChunk) {
        float acc[kGenericChunk], sumsq = 0.f;
#pragma unroll
        for (int k = 0; k < kGenericChunk; ++k) acc[k] = 0.f;
        project_lane<kGenericChunk>(xrow, proj_w + c * d, d, p.vec, lane, acc, sumsq);
        if (c == 0 && p.use_norm) rstd = rms_inv_scale(warp_sum(sumsq), d, p.eps_norm);
#pragma unroll
        for (int k = 0; k < kGenericChunk; ++k) {
          const float v = warp_sum(acc[k]) * rstd;  // rstd = 1 without norm
          if (lane == 0) q_smem[c + k] = v;
        }
      }
      __syncwarp();
      for (int k = lane; k < p.rank; k += kWarp) p.q_out[t * p.rank + k] = q_smem[k];
    }
    const float* q = R > 0 ? q_reg : q_smem;
    if (lane == 0) p.rstd_out[t] = rstd;

    // --- SIPS against every anchor, log-sum-exp, probabilities.
    const NormCoef<float> qc = sips_norm_coef(math_sqrt(dot(q, q, rp)), p.beta, p.eps);
    const SoftmaxStats<float> st =
        lane_logits<R>(q, anchor_hat, E, H, rp, scale * qc.coef, p.tau, lane, probs);
    if (lane == 0) p.lse[t] = softmax_stats_lse(st);
    for (int e = lane; e < E; e += kWarp) {
      const float prob = routing_prob(probs[e], st, p.sigmoid);
      probs[e] = prob;
      prob_sum[e] += prob;
    }
    __syncwarp();

    // --- Top-k on prob + bias: round j takes the best expert ranked after round j-1's winner.
    float prev_key = 0.f;
    int prev_index = -1;
    for (int j = 0; j < K; ++j) {
      float best_key = 0.f;
      int best_index = -1;
      for (int e = lane; e < E; e += kWarp) {
        const float key = p.bias ? probs[e] + __ldg(p.bias + e) : probs[e];
        if (prev_index >= 0 && !ranks_before(prev_key, prev_index, key, e)) continue;
        if (candidate_before(key, e, best_key, best_index)) {
          best_key = key;
          best_index = e;
        }
      }
      warp_best(best_key, best_index);
      if (lane == 0) selected[j] = best_index;
      prev_key = best_key;
      prev_index = best_index;
    }
    __syncwarp();
    float selected_sum = 0.f;
    if (p.normalize) {
      for (int j = 0; j < K; ++j) selected_sum += probs[selected[j]];
    }
    const float norm = p.normalize ? selected_sum : 1.f;
    for (int j = lane; j < K; j += kWarp) {
      const int e = selected[j];
      p.weights[t * K + j] = probs[e] / norm;
      p.indices[t * K + j] = e;
      counts[e] += 1;
    }
    __syncwarp();
  }

  // Block partials: the warps' sums added in warp order.
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    float s = 0.f;
    int n = 0;
    for (int w = 0; w < kWarpsPerBlock; ++w) {
      const float* wp = smem + p.warp_smem + w * p.warp_stride;
      s += wp[E + e];
      n += reinterpret_cast<const int*>(wp + 2 * E)[e];
    }
    p.prob_partials[static_cast<int64_t>(blockIdx.x) * E + e] = s;
    p.count_partials[static_cast<int64_t>(blockIdx.x) * E + e] = n;
  }
}

// mean_probs[e] and tokens_per_expert[e] from the block partials, added in block order.
__global__ void route_forward_finalize_kernel(const float* __restrict__ prob_partials,
                                              const int* __restrict__ count_partials, int blocks,
                                              int experts, int64_t tokens,
                                              float* __restrict__ mean_probs,
                                              int64_t* __restrict__ tokens_per_expert) {
  for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < experts; e += gridDim.x * blockDim.x) {
    float s = 0.f;
    int64_t n = 0;
    for (int b = 0; b < blocks; ++b) {
      s += prob_partials[static_cast<int64_t>(b) * experts + e];
      n += count_partials[static_cast<int64_t>(b) * experts + e];
    }
    mean_probs[e] = s / static_cast<float>(tokens);
    tokens_per_expert[e] = n;
  }
}

struct BackwardParams {
  const float* grad_weights;     // [T, k] or nullptr
  const float* grad_mean_probs;  // [E] or nullptr
  const float* grad_lse;         // [T] or nullptr
  const void* x;
  const float* proj_w;
  const float* anchor_hat;
  const float* scale;
  const int64_t* indices;
  const float* q_saved;  // [T, r]
  const float* rstd_saved;
  void* grad_x;
  float* grad_q;         // [T, rp] for the column kernel
  float* anchor_slots;   // [slots, E * H * rp], one slot per warp
  float* scale_slots;    // [slots]
  int64_t tokens, d;
  int rank, rp, experts, anchors, top_k;
  float beta, eps, tau;
  bool use_norm, sigmoid, normalize, vec;
  int64_t proj_smem, anchor_smem, acc_smem;  // shared-memory offsets (floats) or -1
  int64_t warp_smem, warp_stride;  // per-warp scratch: logits [E] | probs [E] | dL/dp [E] |
                                   // q [rp] | grad_q [rp] | sum dL/ds a_hat [rp] |
                                   // lane partials [rp, 32] (generic rank only)
};

// Per token: dL/dq (saved for the column kernel), dL/dx, and this warp's shares of the anchor
// accumulators and of dL/dscale.
template <int R, typename T>
__global__ void __launch_bounds__(kThreads, backward_min_blocks(R))
    route_backward_token_kernel(const BackwardParams p) {
  extern __shared__ float4 smem_vec[];
  float* smem = reinterpret_cast<float*>(smem_vec);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int E = p.experts, H = p.anchors, K = p.top_k;
  const int rp = R > 0 ? R : p.rp;
  const int64_t d = p.d;
  const int64_t acc_size = static_cast<int64_t>(E) * H * rp;
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;

  const float* proj_w = p.proj_w;
  if (p.proj_smem >= 0) {
    stage_to_smem(p.proj_w, smem + p.proj_smem, rp * d);
    proj_w = smem + p.proj_smem;
  }
  const float* anchor_hat = p.anchor_hat;
  if (p.anchor_smem >= 0) {
    stage_to_smem(p.anchor_hat, smem + p.anchor_smem, acc_size);
    anchor_hat = smem + p.anchor_smem;
  }
  float* logits = smem + p.warp_smem + warp * p.warp_stride;
  float* probs = logits + E;
  float* grad_probs = probs + E;
  float* q_smem = grad_probs + E;
  float* gq_smem = q_smem + rp;
  float* dah_smem = gq_smem + rp;
  float* lane_dah = dah_smem + rp;  // [rp, 32], generic rank only
  float* acc = p.acc_smem >= 0 ? smem + p.acc_smem + warp * acc_size : p.anchor_slots + slot * acc_size;
  for (int64_t i = lane; i < acc_size; i += kWarp) acc[i] = 0.f;
  __syncthreads();

  const float scale = __ldg(p.scale);
  const float inv_tokens = 1.f / static_cast<float>(p.tokens);
  float grad_scale = 0.f;  // lane 0's running sum over this warp's tokens
  const T* x = static_cast<const T*>(p.x);
  T* grad_x = static_cast<T*>(p.grad_x);
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp; t < p.tokens;
       t += warps) {
    float q_reg[R > 0 ? R : 1];
    if constexpr (R > 0) {
#pragma unroll
      for (int k = 0; k < R; ++k) q_reg[k] = k < p.rank ? __ldg(p.q_saved + t * p.rank + k) : 0.f;
    } else {
      for (int k = lane; k < rp; k += kWarp) q_smem[k] = k < p.rank ? p.q_saved[t * p.rank + k] : 0.f;
      __syncwarp();
    }
    const float* q = R > 0 ? q_reg : q_smem;

    // --- Recompute logits and probabilities (bitwise as in the forward).
    const NormCoef<float> qc = sips_norm_coef(math_sqrt(dot(q, q, rp)), p.beta, p.eps);
    const float q_scale = scale * qc.coef;
    const SoftmaxStats<float> st = lane_logits<R>(q, anchor_hat, E, H, rp, q_scale, p.tau, lane, logits);
    for (int e = lane; e < E; e += kWarp) {
      probs[e] = routing_prob(logits[e], st, p.sigmoid);
      grad_probs[e] = p.grad_mean_probs ? p.grad_mean_probs[e] * inv_tokens : 0.f;
    }
    __syncwarp();
    // --- dL/dp of the selected experts, in slot order like the CPU kernel.
    if (p.grad_weights && lane == 0) {
      const float* gw = p.grad_weights + t * K;
      const int64_t* idx = p.indices + t * K;
      float selected_sum = 0.f, grad_dot_weights = 0.f;
      if (p.normalize) {
        for (int j = 0; j < K; ++j) selected_sum += probs[clamp_index(idx[j], E)];
        for (int j = 0; j < K; ++j) grad_dot_weights += gw[j] * probs[clamp_index(idx[j], E)] / selected_sum;
      }
      for (int j = 0; j < K; ++j) {
        if (idx[j] < 0 || idx[j] >= E) continue;  // not from route_forward: never write outside
        grad_probs[idx[j]] += selected_prob_grad(gw[j], grad_dot_weights, selected_sum, p.normalize);
      }
    }
    __syncwarp();
    float p_dot_dp = 0.f;
    if (!p.sigmoid) {
      for (int e = lane; e < E; e += kWarp) p_dot_dp += probs[e] * grad_probs[e];
      p_dot_dp = warp_sum(p_dot_dp);
    }
    const float g_lse = p.grad_lse ? p.grad_lse[t] : 0.f;

    // --- Back through the log-sum-exp over anchors and SIPS, anchor by anchor.
    float dah_reg[R > 0 ? R : 1];
    if constexpr (R > 0) {
#pragma unroll
      for (int i = 0; i < R; ++i) dah_reg[i] = 0.f;
    } else {
      for (int i = 0; i < rp; ++i) lane_dah[i * kWarp + lane] = 0.f;
    }
    float* dah = R > 0 ? dah_reg : lane_dah + lane;
    const int dah_stride = R > 0 ? 1 : kWarp;
    float ds_u_sum = 0.f;
    for (int e = lane; e < E; e += kWarp) {
      const float softmax_p = p.sigmoid ? math_exp(logits[e] - st.max) / st.sum : probs[e];
      const float dl = logit_grad(probs[e], grad_probs[e], p_dot_dp, softmax_p, g_lse, p.sigmoid);
      if (dl == 0.f) continue;  // no gradient reaches this expert's anchors
      for (int h = 0; h < H; ++h) {
        const int64_t eh = static_cast<int64_t>(e) * H + h;
        const float* ah = anchor_hat + eh * rp;
        const float u = dot(q, ah, rp);
        const float ds = dl * anchor_share(q_scale * u, logits[e], p.tau, H);
        ds_u_sum += ds * u;
        const float ds_q = ds * q_scale;
        float* acc_eh = acc + eh * rp;
#pragma unroll
        for (int i = 0; i < rp; ++i) {
          dah[i * dah_stride] += ds * ah[i];
          acc_eh[i] += ds_q * q[i];
        }
      }
    }
    ds_u_sum = warp_sum(ds_u_sum);
    if (lane == 0) grad_scale += qc.coef * ds_u_sum;
    float gq_reg[R > 0 ? R : 1];
    if constexpr (R > 0) {
#pragma unroll
      for (int i = 0; i < R; ++i) dah_reg[i] = warp_sum(dah_reg[i]);
      query_grad(q_reg, dah_reg, ds_u_sum, scale, qc, R, gq_reg);
#pragma unroll
      for (int i = 0; i < R; ++i) {
        if (i == lane) p.grad_q[t * R + i] = gq_reg[i];
      }
    } else {
      for (int i = 0; i < rp; ++i) {
        const float v = warp_sum(lane_dah[i * kWarp + lane]);
        if (lane == 0) dah_smem[i] = v;
      }
      __syncwarp();
      if (lane == 0) query_grad(q_smem, dah_smem, ds_u_sum, scale, qc, rp, gq_smem);
      __syncwarp();
      for (int i = lane; i < rp; i += kWarp) p.grad_q[t * rp + i] = gq_smem[i];
    }
    const float* gq = R > 0 ? gq_reg : gq_smem;

    // --- Back through q = (proj * g) x_hat and RMSNorm: two passes over the row (the second
    // needs mean(dL/dx_hat * x_hat)).
    const T* xrow = x + t * d;
    T* gxrow = grad_x + t * d;
    const float rstd = p.use_norm ? p.rstd_saved[t] : 1.f;
    float mean_dot = 0.f;
    if (p.vec) {
      constexpr int V = VecWidth<T>::value;
      for (int64_t v = lane; v < d / V; v += kWarp) {
        float xv[V], out[V];
        load_vec<V>(xrow + v * V, xv);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          out[j] = hat_grad<R>(proj_w, d, v * V + j, gq, rp);
          mean_dot += out[j] * (xv[j] * rstd);
        }
        if (!p.use_norm) store_vec(gxrow + v * V, out);
      }
    } else {
      for (int64_t i = lane; i < d; i += kWarp) {
        const float gh = hat_grad<R>(proj_w, d, i, gq, rp);
        mean_dot += gh * (to_float(xrow[i]) * rstd);
        if (!p.use_norm) store_float(gxrow + i, gh);
      }
    }
    if (p.use_norm) {
      mean_dot = warp_sum(mean_dot) / static_cast<float>(d);
      if (p.vec) {
        constexpr int V = VecWidth<T>::value;
        for (int64_t v = lane; v < d / V; v += kWarp) {
          float xv[V], out[V];
          load_vec<V>(xrow + v * V, xv);
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const float gh = hat_grad<R>(proj_w, d, v * V + j, gq, rp);
            out[j] = rms_norm_input_grad(gh, xv[j] * rstd, rstd, mean_dot);
          }
          store_vec(gxrow + v * V, out);
        }
      } else {
        for (int64_t i = lane; i < d; i += kWarp) {
          const float gh = hat_grad<R>(proj_w, d, i, gq, rp);
          store_float(gxrow + i, rms_norm_input_grad(gh, to_float(xrow[i]) * rstd, rstd, mean_dot));
        }
      }
    }
    __syncwarp();
  }

  // This warp's slot: its anchor accumulators (from shared memory when they live there).
  if (p.acc_smem >= 0) {
    float* dst = p.anchor_slots + slot * acc_size;
    for (int64_t i = lane; i < acc_size; i += kWarp) dst[i] = acc[i];
  }
  if (lane == 0) p.scale_slots[slot] = grad_scale;
}

// Column partials M[c, k, i] = sum over chunk c's tokens of grad_q[t, k] * x_hat[t, i]; grid
// (columns / kColumnThreads, chunks, rank chunks of RC).
template <int RC, typename T>
__global__ void __launch_bounds__(kColumnThreads)
    route_backward_column_kernel(const T* __restrict__ x, const float* __restrict__ rstd,
                                 const float* __restrict__ grad_q, int64_t tokens, int64_t d,
                                 int rp, int64_t chunk, bool use_norm, float* __restrict__ partials) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kColumnThreads + threadIdx.x;
  if (i >= d) return;
  const int k0 = blockIdx.z * RC;
  const int64_t t0 = blockIdx.y * chunk;
  const int64_t t1 = t0 + chunk < tokens ? t0 + chunk : tokens;
  float acc[RC];
#pragma unroll
  for (int k = 0; k < RC; ++k) acc[k] = 0.f;
  for (int64_t t = t0; t < t1; ++t) {
    const float xh = to_float(x[t * d + i]) * (use_norm ? __ldg(rstd + t) : 1.f);
#pragma unroll
    for (int k = 0; k < RC; ++k) acc[k] += __ldg(grad_q + t * rp + k0 + k) * xh;
  }
#pragma unroll
  for (int k = 0; k < RC; ++k) partials[(blockIdx.y * static_cast<int64_t>(rp) + k0 + k) * d + i] = acc[k];
}

// Parameter gradients from the partials, each added in a fixed order. Items: d columns
// (grad_proj, grad_norm_weight), E * H anchors, 1 scale.
__global__ void route_backward_finalize_kernel(
    const float* __restrict__ column_partials, int chunks, const float* __restrict__ anchor_slots,
    const float* __restrict__ scale_slots, int64_t slots, const float* __restrict__ proj,
    const float* __restrict__ g, const float* __restrict__ anchors, int rank, int rp, int64_t d,
    int64_t num_anchor_rows, float beta, float eps, float* __restrict__ acc_total,
    float* __restrict__ grad_proj, float* __restrict__ grad_norm_weight,
    float* __restrict__ grad_anchors, float* __restrict__ grad_scale) {
  const int64_t items = d + num_anchor_rows + 1;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; n < items; n += stride) {
    if (n < d) {
      // grad_proj[k, i] = g_i * M[k, i]; grad_g[i] = sum_k proj[k, i] * M[k, i].
      float gg = 0.f;
      for (int k = 0; k < rank; ++k) {
        float m = 0.f;
        for (int c = 0; c < chunks; ++c) m += column_partials[(static_cast<int64_t>(c) * rp + k) * d + n];
        grad_proj[k * d + n] = g ? g[n] * m : m;
        gg += proj[k * d + n] * m;
      }
      if (g) grad_norm_weight[n] = gg;
    } else if (n < d + num_anchor_rows) {
      const int64_t a = n - d;
      const int64_t acc_size = num_anchor_rows * rp;
      float* acc = acc_total + a * rp;
      for (int j = 0; j < rp; ++j) {
        float s = 0.f;
        for (int64_t sl = 0; sl < slots; ++sl) s += anchor_slots[sl * acc_size + a * rp + j];
        acc[j] = s;
      }
      const float* row = anchors + a * rank;
      const NormCoef<float> c = sips_norm_coef(math_sqrt(dot(row, row, rank)), beta, eps);
      anchor_grad(acc, row, c, rank, grad_anchors + a * rank);
    } else {
      float s = 0.f;
      for (int64_t sl = 0; sl < slots; ++sl) s += scale_slots[sl];
      *grad_scale = s;
    }
  }
}

// =============================================================================================
// Launchers
// =============================================================================================

int64_t align4(int64_t n) { return (n + 3) / 4 * 4; }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int forward_blocks(int64_t tokens) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(tokens, kWarpsPerBlock), kMaxForwardBlocks)));
}

int backward_blocks(int64_t tokens) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(tokens, kWarpsPerBlock), kMaxBackwardBlocks)));
}

struct ColumnChunks {
  int64_t size;
  int count;
};

ColumnChunks column_chunks(int64_t tokens) {
  const int64_t count = std::max<int64_t>(1, std::min<int64_t>(kMaxColumnChunks, ceil_div(tokens, kMinColumnChunk)));
  return {ceil_div(tokens, count), static_cast<int>(count)};
}

// Workspace regions (floats, each 16-byte aligned).
struct ForwardWorkspace {
  int64_t proj_w, anchor_hat, prob_partials, count_partials, total;
};

ForwardWorkspace forward_workspace(const RouteCudaShape& s) {
  const int rp = route_padded_rank(s.rank);
  const int64_t blocks = forward_blocks(s.tokens);
  ForwardWorkspace w;
  w.proj_w = 0;
  w.anchor_hat = w.proj_w + align4(rp * s.d);
  w.prob_partials = w.anchor_hat + align4(static_cast<int64_t>(s.experts) * s.anchors * rp);
  w.count_partials = w.prob_partials + align4(blocks * s.experts);
  w.total = w.count_partials + align4(blocks * s.experts);
  return w;
}

struct BackwardWorkspace {
  int64_t proj_w, anchor_hat, grad_q, column_partials, anchor_slots, scale_slots, acc_total, total;
};

BackwardWorkspace backward_workspace(const RouteCudaShape& s) {
  const int rp = route_padded_rank(s.rank);
  const int64_t slots = static_cast<int64_t>(backward_blocks(s.tokens)) * kWarpsPerBlock;
  const int64_t acc = static_cast<int64_t>(s.experts) * s.anchors * rp;
  BackwardWorkspace w;
  w.proj_w = 0;
  w.anchor_hat = w.proj_w + align4(rp * s.d);
  w.grad_q = w.anchor_hat + align4(acc);
  w.column_partials = w.grad_q + align4(s.tokens * rp);
  w.anchor_slots = w.column_partials + align4(static_cast<int64_t>(column_chunks(s.tokens).count) * rp * s.d);
  w.scale_slots = w.anchor_slots + align4(slots * acc);
  w.acc_total = w.scale_slots + align4(slots);
  w.total = w.acc_total + align4(acc);
  return w;
}

// The most dynamic shared memory one block may use, and the SM's total.
cudaError_t smem_limits(int64_t* per_block, int64_t* per_sm) {
  int device = 0, block = 0, sm = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&block, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device);
  if (err != cudaSuccess) return err;
  *per_block = block;
  *per_sm = sm;
  return cudaSuccess;
}

// Optional shared memory per block: what leaves room for min_blocks blocks per SM (1 KiB of each
// block's share is reserved by the hardware).
int64_t smem_budget(int64_t per_block, int64_t per_sm, int min_blocks) {
  const int64_t share = per_sm / min_blocks - 1024;
  return share < per_block ? share : per_block;
}

// Places the optional shared-memory arrays after the mandatory per-warp scratch, in priority
// order, while the total stays within budget_bytes. Returns the total bytes, or -1 when the
// scratch alone exceeds limit_bytes.
int64_t place_smem(int64_t limit_bytes, int64_t budget_bytes, int64_t warp_floats,
                   int64_t* warp_off, std::initializer_list<std::pair<int64_t, int64_t*>> optional) {
  int64_t used = 0;
  *warp_off = 0;
  used = align4(warp_floats) * kWarpsPerBlock;
  if (used * 4 > limit_bytes) return -1;
  for (const auto& item : optional) {
    const int64_t n = align4(item.first);
    if ((used + n) * 4 <= budget_bytes) {
      *item.second = used;
      used += n;
    } else {
      *item.second = -1;
    }
  }
  return used * 4;
}

template <typename Kernel>
cudaError_t prepare_launch(Kernel kernel, int64_t smem_bytes) {
  if (smem_bytes > 48 * 1024) {
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                static_cast<int>(smem_bytes));
  }
  return cudaSuccess;
}

template <int R, typename T>
cudaError_t launch_forward_typed(const ForwardParams& p, int blocks, int64_t smem, cudaStream_t stream) {
  cudaError_t err = prepare_launch(route_forward_kernel<R, T>, smem);
  if (err != cudaSuccess) return err;
  route_forward_kernel<R, T><<<blocks, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_forward_rank(const ForwardParams& p, int blocks, int64_t smem, cudaStream_t stream) {
  switch (p.rp) {
    case 1: return launch_forward_typed<1, T>(p, blocks, smem, stream);
    case 2: return launch_forward_typed<2, T>(p, blocks, smem, stream);
    case 4: return launch_forward_typed<4, T>(p, blocks, smem, stream);
    case 8: return launch_forward_typed<8, T>(p, blocks, smem, stream);
    case 16: return launch_forward_typed<16, T>(p, blocks, smem, stream);
    case 32: return launch_forward_typed<32, T>(p, blocks, smem, stream);
    default: return launch_forward_typed<0, T>(p, blocks, smem, stream);
  }
}

template <int R, typename T>
cudaError_t launch_backward_typed(const BackwardParams& p, int blocks, int64_t smem, cudaStream_t stream) {
  cudaError_t err = prepare_launch(route_backward_token_kernel<R, T>, smem);
  if (err != cudaSuccess) return err;
  route_backward_token_kernel<R, T><<<blocks, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward_rank(const BackwardParams& p, int blocks, int64_t smem, cudaStream_t stream) {
  switch (p.rp) {
    case 1: return launch_backward_typed<1, T>(p, blocks, smem, stream);
    case 2: return launch_backward_typed<2, T>(p, blocks, smem, stream);
    case 4: return launch_backward_typed<4, T>(p, blocks, smem, stream);
    case 8: return launch_backward_typed<8, T>(p, blocks, smem, stream);
    case 16: return launch_backward_typed<16, T>(p, blocks, smem, stream);
    case 32: return launch_backward_typed<32, T>(p, blocks, smem, stream);
    default: return launch_backward_typed<0, T>(p, blocks, smem, stream);
  }
}

template <typename T>
cudaError_t launch_column(const void* x, const float* rstd, const float* grad_q, int64_t tokens,
                          int64_t d, int rp, const ColumnChunks& chunks, bool use_norm,
                          float* partials, cudaStream_t stream) {
  const int rc = rp < kGenericChunk ? rp : kGenericChunk;
  const dim3 grid(static_cast<unsigned>(ceil_div(d, kColumnThreads)), static_cast<unsigned>(chunks.count),
                  static_cast<unsigned>(rp / rc));
  const T* xt = static_cast<const T*>(x);
  switch (rc) {
    case 1:
      route_backward_column_kernel<1, T><<<grid, kColumnThreads, 0, stream>>>(xt, rstd, grad_q, tokens, d, rp, chunks.size, use_norm, partials);
      break;
    case 2:
      route_backward_column_kernel<2, T><<<grid, kColumnThreads, 0, stream>>>(xt, rstd, grad_q, tokens, d, rp, chunks.size, use_norm, partials);
      break;
    case 4:
      route_backward_column_kernel<4, T><<<grid, kColumnThreads, 0, stream>>>(xt, rstd, grad_q, tokens, d, rp, chunks.size, use_norm, partials);
      break;
    default:
      route_backward_column_kernel<kGenericChunk, T><<<grid, kColumnThreads, 0, stream>>>(xt, rstd, grad_q, tokens, d, rp, chunks.size, use_norm, partials);
      break;
  }
  return cudaGetLastError();
}

int elementwise_blocks(int64_t n) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(n, 256), 1024)));
}

bool rows_aligned(const void* x, int64_t d, XType type) {
  const int64_t elem = type == XType::kFloat32 ? 4 : 2;
  return reinterpret_cast<uintptr_t>(x) % 16 == 0 && (d * elem) % 16 == 0;
}

}  // namespace

int route_padded_rank(int rank) {
  if (rank <= 32) {
    int rp = 1;
    while (rp < rank) rp *= 2;
    return rp;
  }
  return (rank + kGenericChunk - 1) / kGenericChunk * kGenericChunk;
}

int64_t route_forward_workspace_floats(const RouteCudaShape& s) { return forward_workspace(s).total; }

int64_t route_backward_workspace_floats(const RouteCudaShape& s) { return backward_workspace(s).total; }

cudaError_t launch_route_forward(const void* x, XType x_type, const float* proj,
                                 const float* anchors, const float* norm_weight,
                                 const float* expert_bias, const float* scale,
                                 const RouteCudaShape& shape, const RouteCudaOptions& opt,
                                 float* weights, int64_t* indices, int64_t* tokens_per_expert,
                                 float* mean_probs, float* lse, float* q, float* rstd,
                                 float* workspace, cudaStream_t stream) {
  if (shape.tokens == 0) return cudaSuccess;
  const int rp = route_padded_rank(shape.rank);
  const int64_t num_anchor_rows = static_cast<int64_t>(shape.experts) * shape.anchors;
  const ForwardWorkspace ws = forward_workspace(shape);
  ForwardParams p;
  p.x = x;
  p.proj_w = workspace + ws.proj_w;
  p.anchor_hat = workspace + ws.anchor_hat;
  p.bias = expert_bias;
  p.scale = scale;
  p.weights = weights;
  p.indices = indices;
  p.lse = lse;
  p.q_out = q;
  p.rstd_out = rstd;
  p.prob_partials = workspace + ws.prob_partials;
  p.count_partials = reinterpret_cast<int*>(workspace + ws.count_partials);
  p.tokens = shape.tokens;
  p.d = shape.d;
  p.rank = shape.rank;
  p.rp = rp;
  p.experts = shape.experts;
  p.anchors = shape.anchors;
  p.top_k = shape.top_k;
  p.beta = opt.beta;
  p.eps_norm = opt.eps_norm;
  p.eps = opt.eps;
  p.tau = opt.tau;
  p.use_norm = opt.use_norm;
  p.sigmoid = opt.sigmoid;
  p.normalize = opt.normalize;
  p.vec = rows_aligned(x, shape.d, x_type);
  p.warp_stride = align4(3LL * shape.experts + shape.top_k + rp);

  int64_t limit = 0, per_sm = 0;
  cudaError_t err = smem_limits(&limit, &per_sm);
  if (err != cudaSuccess) return err;
  const int64_t budget = smem_budget(limit, per_sm, forward_min_blocks(template_rank(rp)));
  const int64_t smem = place_smem(limit, budget, p.warp_stride, &p.warp_smem,
                                  {{num_anchor_rows * rp, &p.anchor_smem}, {rp * shape.d, &p.proj_smem}});
  if (smem < 0) return cudaErrorInvalidValue;

  const int64_t prep_items = std::max<int64_t>(rp * shape.d, num_anchor_rows * rp);
  route_prepare_kernel<<<elementwise_blocks(prep_items), 256, 0, stream>>>(
      proj, opt.use_norm ? norm_weight : nullptr, anchors, shape.rank, rp, shape.d, num_anchor_rows,
      opt.beta, opt.eps, workspace + ws.proj_w, workspace + ws.anchor_hat);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  const int blocks = forward_blocks(shape.tokens);
  switch (x_type) {
    case XType::kFloat32: err = launch_forward_rank<float>(p, blocks, smem, stream); break;
    case XType::kBFloat16: err = launch_forward_rank<__nv_bfloat16>(p, blocks, smem, stream); break;
    case XType::kFloat16: err = launch_forward_rank<__half>(p, blocks, smem, stream); break;
    default: return cudaErrorInvalidValue;
  }
  if (err != cudaSuccess) return err;
  route_forward_finalize_kernel<<<elementwise_blocks(shape.experts), 256, 0, stream>>>(
      p.prob_partials, p.count_partials, blocks, shape.experts, shape.tokens, mean_probs,
      tokens_per_expert);
  return cudaGetLastError();
}

cudaError_t launch_route_backward(const float* grad_weights, const float* grad_mean_probs,
                                  const float* grad_lse, const void* x, XType x_type,
                                  const float* proj, const float* anchors,
                                  const float* norm_weight, const float* scale,
                                  const int64_t* indices, const float* q, const float* rstd,
                                  const RouteCudaShape& shape, const RouteCudaOptions& opt,
                                  void* grad_x, float* grad_proj, float* grad_anchors,
                                  float* grad_scale, float* grad_norm_weight, float* workspace,
                                  cudaStream_t stream) {
  if (shape.tokens == 0) return cudaSuccess;
  const int rp = route_padded_rank(shape.rank);
  const int64_t num_anchor_rows = static_cast<int64_t>(shape.experts) * shape.anchors;
  const BackwardWorkspace ws = backward_workspace(shape);
  const float* g = opt.use_norm ? norm_weight : nullptr;
  BackwardParams p;
  p.grad_weights = grad_weights;
  p.grad_mean_probs = grad_mean_probs;
  p.grad_lse = grad_lse;
  p.x = x;
  p.proj_w = workspace + ws.proj_w;
  p.anchor_hat = workspace + ws.anchor_hat;
  p.scale = scale;
  p.indices = indices;
  p.q_saved = q;
  p.rstd_saved = rstd;
  p.grad_x = grad_x;
  p.grad_q = workspace + ws.grad_q;
  p.anchor_slots = workspace + ws.anchor_slots;
  p.scale_slots = workspace + ws.scale_slots;
  p.tokens = shape.tokens;
  p.d = shape.d;
  p.rank = shape.rank;
  p.rp = rp;
  p.experts = shape.experts;
  p.anchors = shape.anchors;
  p.top_k = shape.top_k;
  p.beta = opt.beta;
  p.eps = opt.eps;
  p.tau = opt.tau;
  p.use_norm = opt.use_norm;
  p.sigmoid = opt.sigmoid;
  p.normalize = opt.normalize;
  p.vec = rows_aligned(x, shape.d, x_type) && rows_aligned(grad_x, shape.d, x_type);
  const bool generic = rp > 32;
  p.warp_stride = align4(3LL * shape.experts + 3LL * rp + (generic ? kWarp * rp : 0));

  int64_t limit = 0, per_sm = 0;
  cudaError_t err = smem_limits(&limit, &per_sm);
  if (err != cudaSuccess) return err;
  const int64_t budget = smem_budget(limit, per_sm, backward_min_blocks(template_rank(rp)));
  const int64_t acc_size = num_anchor_rows * rp;
  const int64_t smem = place_smem(limit, budget, p.warp_stride, &p.warp_smem,
                                  {{acc_size * kWarpsPerBlock, &p.acc_smem},
                                   {acc_size, &p.anchor_smem},
                                   {rp * shape.d, &p.proj_smem}});
  if (smem < 0) return cudaErrorInvalidValue;

  const int64_t prep_items = std::max<int64_t>(rp * shape.d, acc_size);
  route_prepare_kernel<<<elementwise_blocks(prep_items), 256, 0, stream>>>(
      proj, g, anchors, shape.rank, rp, shape.d, num_anchor_rows, opt.beta, opt.eps,
      workspace + ws.proj_w, workspace + ws.anchor_hat);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  const int blocks = backward_blocks(shape.tokens);
  switch (x_type) {
    case XType::kFloat32: err = launch_backward_rank<float>(p, blocks, smem, stream); break;
    case XType::kBFloat16: err = launch_backward_rank<__nv_bfloat16>(p, blocks, smem, stream); break;
    case XType::kFloat16: err = launch_backward_rank<__half>(p, blocks, smem, stream); break;
    default: return cudaErrorInvalidValue;
  }
  if (err != cudaSuccess) return err;

  const ColumnChunks chunks = column_chunks(shape.tokens);
  float* column_partials = workspace + ws.column_partials;
  switch (x_type) {
    case XType::kFloat32:
      err = launch_column<float>(x, rstd, p.grad_q, shape.tokens, shape.d, rp, chunks, opt.use_norm, column_partials, stream);
      break;
    case XType::kBFloat16:
      err = launch_column<__nv_bfloat16>(x, rstd, p.grad_q, shape.tokens, shape.d, rp, chunks, opt.use_norm, column_partials, stream);
      break;
    default:
      err = launch_column<__half>(x, rstd, p.grad_q, shape.tokens, shape.d, rp, chunks, opt.use_norm, column_partials, stream);
      break;
  }
  if (err != cudaSuccess) return err;

  const int64_t items = shape.d + num_anchor_rows + 1;
  route_backward_finalize_kernel<<<elementwise_blocks(items), 256, 0, stream>>>(
      column_partials, chunks.count, p.anchor_slots, p.scale_slots,
      static_cast<int64_t>(blocks) * kWarpsPerBlock, proj, g, anchors, shape.rank, rp, shape.d,
      num_anchor_rows, opt.beta, opt.eps, workspace + ws.acc_total, grad_proj, grad_norm_weight,
      grad_anchors, grad_scale);
  return cudaGetLastError();
}

}  // namespace route
}  // namespace l2r
