// CUDA kernels of the fused L2R router: forward and recomputing backward, for the three modes of
// route_cuda.h. No torch headers: the ATen glue is route_ops_cuda.cpp, and tests/simt builds this
// file unchanged for the CPU emulator. Every per-token formula is csrc/route/math's (scalar lanes:
// one expert per thread), so the GPU rounds what the CPU does; this file keeps only layout and
// reductions (warp shuffles, per-warp and per-chunk partials).
//
// Forward: route_forward.cuh (one launch: token tiles, the projection and the normalised anchors
// staged by the kernel itself, statistics finalized by the block that takes the last ticket).
//
// Backward layout: one warp per token, the experts spread over its lanes (expert e on lane e % 32).
// The folded projection proj * norm_weight [rp][d] and the pre-normalized anchors coef(|a|) * a,
// transposed to [rp][H][E] so that the lanes of a warp read consecutive words, are prepared in
// fp32 by route_prepare_kernel and staged in shared memory when they fit. One wave of blocks loops
// over the tokens; each block leaves one slot of anchor-gradient and scale partials (its warps' sums
// added in warp order). The column kernel computes the projection's gradient in token chunks (one
// wave of blocks) and finalizes every parameter gradient in the same launch: the block that takes a
// column group's last ticket adds that group's chunks, extra blocks add the anchor slots, and the one
// of those that finishes last completes the anchor rows and the scale. Rank 32 with bf16 x takes
// the column kernel's tensor-core pass instead (route_column_mma.cuh): it computes dL/dx as well,
// from the same read of x, and the token kernel then only scores and saves grad_q. Two launches
// (three with route_prepare_kernel when the anchors do not fit in shared memory). No floating-point atomics:
// every sum has a fixed order, so every result is bitwise reproducible run to run.
#include "route_device.cuh"
#include "route_forward.cuh"
#include "route_column_mma.cuh"

namespace l2r {
namespace route {
namespace {

// The logit of expert e for token q, and its anchors' stage-2 shift and sum (math/anchor_lse.h).
template <int R>
__device__ __forceinline__ rm::ExpertLogit<float> expert_logit_of(const float* q, const float* anchor_hat,
                                                                 int e, int E, int H, int rp,
                                                                 float q_scale, float sot, float tau) {
  const int n = R > 0 ? R : rp;
  const auto u_of = [&](int h) {
    return rm::anchor_dot<float>(q, n, [&](int i) { return anchor_hat[(static_cast<int64_t>(i) * H + h) * E + e]; });
  };
  return held_expert_logit<float>(H, q_scale, sot, tau, u_of);
}

// Softmax statistics over the experts of one token from logits[e] (lane's experts; warp-merged).
__device__ __forceinline__ rm::SoftmaxStats<float> warp_softmax_stats(const float* logits, float* exps,
                                                                      int E, int lane) {
  float m = -lanes::poly::kInf;
  bool nan = false;
  for (int e = lane; e < E; e += kWarp) {
    nan |= lanes::is_nan(logits[e]);
    m = lanes::vmax(logits[e], m);
  }
  rm::SoftmaxStats<float> st;
  st.max = warp_any(nan) ? lanes::from_bits(int32_t(0x7fc00000)) : warp_max(m);
  const float shift = rm::softmax_shift(st.max);
  float sum = 0.f;
  for (int e = lane; e < E; e += kWarp) {
    exps[e] = rm::logit_exp(logits[e], shift);
    sum += exps[e];
  }
  st.sum = warp_sum(sum);
  return st;
}

__device__ __forceinline__ float warp_total(const float* v, int E, int lane) {
  float s = 0.f;
  for (int e = lane; e < E; e += kWarp) s += v[e];
  return warp_sum(s);
}

// =============================================================================================
// Backward kernels (and the prepare kernel of their folded projection and normalised anchors)
// =============================================================================================

// anchor_hat[(i * H + h) * E + e] = coef(|a|) a[e, h, i] (0 for padded i >= r): the normalised
// anchors of token kernels whose shared memory cannot hold them (they stage them otherwise).
__global__ void route_prepare_kernel(const PrepareParams p) {
  const float* __restrict__ anchors = p.anchors;
  float* __restrict__ anchor_hat = p.anchor_hat;
  const int rank = p.rank, rp = p.rp, experts = p.experts, anchors_per_expert = p.anchors_per_expert;
  const float beta = p.beta, eps = p.eps;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t rows = static_cast<int64_t>(experts) * anchors_per_expert;
  for (int64_t n = start; n < rows * rp; n += stride) {
    const int64_t a = n / rp;  // anchor row e * H + h
    const int i = static_cast<int>(n % rp);
    const float* row = anchors + a * rank;
    const rm::NormCoef<float> c = rm::sips_norm_coef(lanes::vsqrt(rm::dot_r(row, row, rank)), beta, eps);
    const int64_t e = a / anchors_per_expert, h = a % anchors_per_expert;
    anchor_hat[(i * anchors_per_expert + h) * experts + e] = i < rank ? c.coef * row[i] : 0.f;
  }
}

// The folded projection proj * g into shared memory [rp][d] (rows k >= r zero), 16-byte granules
// when proj_vec.
__device__ __forceinline__ void stage_folded_projection(const BackwardParams& p, float* dst, int rp) {
  const float* __restrict__ proj = p.proj;
  const float* __restrict__ g = p.g;
  const int64_t d = p.c.d;
  const int rank = p.c.rank;
  if (p.proj_vec) {
    const int64_t granules = d / 4;
    for (int64_t n = threadIdx.x; n < rp * granules; n += blockDim.x) {
      const int64_t k = n / granules, c = 4 * (n % granules);
      float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
      if (k < rank) {  // padded rows stay zero
        v = __ldg(reinterpret_cast<const float4*>(proj + k * d + c));
        if (g != nullptr) {
          const float4 gv = __ldg(reinterpret_cast<const float4*>(g + c));
          v = make_float4(v.x * gv.x, v.y * gv.y, v.z * gv.z, v.w * gv.w);
        }
      }
      *reinterpret_cast<float4*>(dst + k * d + c) = v;
    }
  } else {
    for (int64_t n = threadIdx.x; n < rp * d; n += blockDim.x) {
      const int64_t k = n / d, i = n % d;
      dst[n] = k < rank ? (g ? proj[k * d + i] * g[i] : proj[k * d + i]) : 0.f;
    }
  }
}

// dL/dl of every expert of token t into dl[] (= grad_probs storage), from its probabilities.
__device__ __forceinline__ void token_logit_grads(const BackwardParams& p, int64_t t, int lane,
                                                  const float* logits, const float* probs,
                                                  const rm::SoftmaxStats<float>& st, float* dl) {
  const int E = p.c.experts, K = p.c.top_k;
  const bool counted = p.padding == nullptr || !p.padding[t];
  if (p.grad_mean_probs && counted) {
    const float* g = p.grad_mean_probs + (t / p.c.seq_len) * E;
    float total = 1.f, g_dot_balance = 0.f;
    if (p.c.sigmoid) {
      total = warp_total(probs, E, lane);
      float dot = 0.f;
      for (int e = lane; e < E; e += kWarp) dot = lanes::fmadd(g[e], rm::balance_prob(probs[e], total, true), dot);
      g_dot_balance = warp_sum(dot);
    }
    for (int e = lane; e < E; e += kWarp) dl[e] = rm::balance_prob_grad(g[e], g_dot_balance, total, p.c.sigmoid);
  } else {
    for (int e = lane; e < E; e += kWarp) dl[e] = 0.f;
  }
  __syncwarp();
  // dL/dp of the selected experts, in slot order (lane 0): the indices are checked, never trusted.
  if (p.grad_weights && lane == 0) {
    const float* gw = p.grad_weights + t * K;
    const int64_t* idx = p.indices + t * K;
    bool valid = true;
    for (int j = 0; j < K; ++j) valid &= rm::valid_expert(idx[j], E);
    if (!valid) {
      *p.bad_index = 1;
    } else {
      float selected_sum = 0.f, grad_dot_weights = 0.f;
      if (p.c.normalize) {
        for (int j = 0; j < K; ++j) selected_sum += probs[idx[j]];
        for (int j = 0; j < K; ++j) {
          grad_dot_weights += rm::weight_dot_term(rm::scaled_weight_grad(gw[j], p.c.scaling), probs[idx[j]], selected_sum);
        }
      }
      for (int j = 0; j < K; ++j) {
        dl[idx[j]] += rm::selected_prob_grad(rm::scaled_weight_grad(gw[j], p.c.scaling), grad_dot_weights,
                                             selected_sum, p.c.normalize);
      }
    }
  }
  __syncwarp();
  float p_dot_dp = 0.f;
  if (!p.c.sigmoid) {
    for (int e = lane; e < E; e += kWarp) p_dot_dp = lanes::fmadd(probs[e], dl[e], p_dot_dp);
    p_dot_dp = warp_sum(p_dot_dp);
  }
  const float g_lse = p.grad_lse ? p.grad_lse[t] : 0.f;
  for (int e = lane; e < E; e += kWarp) {
    const float softmax_p = p.c.sigmoid ? rm::softmax_of(rm::logit_exp(logits[e], rm::softmax_shift(st.max)), st.sum) : probs[e];
    dl[e] = rm::logit_grad(probs[e], dl[e], p_dot_dp, softmax_p, g_lse, p.c.sigmoid);
  }
  __syncwarp();
}

// dL/dx_hat of the V = 4 or 8 columns [c, c + V) of a row (c a multiple of 4): sum_k gq[k] w[k, i]
// (the scalar path's order) with w = proj * g: rows [0, rows) of `w_rows` (the rest zero), times g
// when g is not null (w_rows then is proj in global memory; staged rows are folded already), read
// as 16-byte granules. With V = 8 each lane reads two granules 32 bytes apart from the next lane's;
// lanes whose bit 2 is set read them in swapped order, so that the 8 lanes of each quarter-warp
// request fall in distinct banks. For the N tokens of a grad_x tile at once (gq_of(u, k): token u's
// grad_q[k]): each granule read serves all of them.
template <int R, int V, int N, typename GradQ>
__device__ __forceinline__ void hat_grad_vec(const float* w_rows, const float* g, int rows, int64_t d, int n,
                                             const GradQ& gq_of, int64_t c, int lane, float (&out)[N][V]) {
  static_assert(V == 4 || V == 8, "16-byte x vectors of float or 16-bit elements");
  const int swap = V == 8 ? (lane >> 2) & 1 : 0;
  // the granules of row k in column order (lo, hi), from base
  auto granules = [&](const float* base, float4& lo, float4& hi) {
    const float4* row = reinterpret_cast<const float4*>(base);
    const float4 a = row[swap];
    lo = a;
    if constexpr (V == 8) {
      const float4 b = row[swap ^ 1];
      lo = swap ? b : a;
      hi = swap ? a : b;
    }
  };
  float4 g_lo = make_float4(1.f, 1.f, 1.f, 1.f), g_hi = g_lo;
  if (g != nullptr) granules(g + c, g_lo, g_hi);
  auto row_values = [&](int k, float(&w)[V]) {
    float4 lo = make_float4(0.f, 0.f, 0.f, 0.f), hi = lo;
    if (k < rows) granules(w_rows + k * d + c, lo, hi);
    if (g != nullptr) {
      lo = make_float4(lo.x * g_lo.x, lo.y * g_lo.y, lo.z * g_lo.z, lo.w * g_lo.w);
      hi = make_float4(hi.x * g_hi.x, hi.y * g_hi.y, hi.z * g_hi.z, hi.w * g_hi.w);
    }
    w[0] = lo.x;
    w[1] = lo.y;
    w[2] = lo.z;
    w[3] = lo.w;
    if constexpr (V == 8) {
      w[4] = hi.x;
      w[5] = hi.y;
      w[6] = hi.z;
      w[7] = hi.w;
    }
  };
  float w[V];
  row_values(0, w);
#pragma unroll
  for (int u = 0; u < N; ++u) {
    const float gq0 = gq_of(u, 0);
#pragma unroll
    for (int j = 0; j < V; ++j) out[u][j] = gq0 * w[j];
  }
#pragma unroll
  for (int k = 1; k < (R > 0 ? R : n); ++k) {
    row_values(k, w);
#pragma unroll
    for (int u = 0; u < N; ++u) {
      const float gqk = gq_of(u, k);
#pragma unroll
      for (int j = 0; j < V; ++j) out[u][j] = lanes::fmadd(gqk, w[j], out[u][j]);
    }
  }
}

// Per token: dL/dq (saved for the column kernel), dL/dx, and this warp's shares of the anchor
// accumulators and of dL/dscale.
template <int R, typename T, RouteMode M>
__global__ void __launch_bounds__(kThreads, backward_min_blocks(R))
    route_backward_token_kernel(const BackwardParams p) {
  float* smem = smem_base();
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int E = p.c.experts, H = p.c.anchors;
  const int rp = R > 0 ? R : p.c.rp;
  const int64_t d = p.c.d;
  const int64_t acc_size = static_cast<int64_t>(E) * H * rp;
  const int64_t warp_slot = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;  // acc_smem < 0

  // The projection's rows: proj in global memory times g on the fly, or proj * g staged here.
  const float* w_rows = p.proj;
  const float* w_g = p.g;
  int w_nrows = p.c.rank;
  const float* anchor_hat = p.anchor_hat;
  if constexpr (M != RouteMode::kSelect) {
    if (p.counters != nullptr && blockIdx.x == 0) {  // the column kernel's tickets
      for (int n = threadIdx.x; n < p.counter_words; n += blockDim.x) p.counters[n] = 0u;
    }
    if (p.proj_smem >= 0) {
      stage_folded_projection(p, smem + p.proj_smem, rp);
      w_rows = smem + p.proj_smem;
      w_g = nullptr;
      w_nrows = rp;
    }
    if (p.anchor_smem >= 0) {
      stage_anchors(p.anchors, p.c, static_cast<int>(p.anchor_smem));
      anchor_hat = smem + p.anchor_smem;
    }
  }
  float* logits = smem + p.warp_smem + warp * p.warp_stride;
  float* probs = logits + E;
  // the pair's slots (route_kernel_params.h backward_pair_tokens): dL/dl [E] | lsum [E] | shift [E]
  constexpr int kPair = M != RouteMode::kSelect ? backward_pair_tokens(R) : 1;
  const auto slot_dl = [&](int s) { return probs + E + s * 3 * E; };
  float* q_smem = probs + E + kPair * 3 * E;
  float* gq_smem = q_smem + rp;
  float* dah_smem = gq_smem + rp;
  float* lane_dah = dah_smem + rp;  // [rp, 32], generic rank only
  // The grad_x tile (route_kernel_params.h backward_tile_tokens): its tokens' grad_q rows and
  // mean_dot, kept from their scoring passes for the one pass over d that serves them all.
  constexpr int kTile = M != RouteMode::kSelect ? backward_tile_tokens(R) : 1;
  float* tile_gq = logits + backward_tile_offset(E, rp);  // [kTile][rp]
  float* tile_mean_dot = tile_gq + kTile * rp;
  float* acc = nullptr;
  if (M != RouteMode::kSelect && p.need_param_grads) {
    acc = p.acc_smem >= 0 ? smem + p.acc_smem + warp * acc_size : p.anchor_slots + warp_slot * acc_size;
    for (int64_t i = lane; i < acc_size; i += kWarp) acc[i] = 0.f;
  }
  __syncthreads();

  const float scale = M != RouteMode::kSelect ? __ldg(p.scale) : 0.f;
  float grad_scale = 0.f;  // lane 0's running sum over this warp's tokens
  const T* x = static_cast<const T*>(p.x);
  T* grad_x = static_cast<T*>(p.grad_x);
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  // token t's saved q, rows >= rank zero (templated ranks: registers; generic: q_smem)
  const auto load_q = [&](int64_t t, float* q_reg) {
    if constexpr (R > 0) {
#pragma unroll
      for (int k = 0; k < R; ++k) q_reg[k] = k < p.c.rank ? __ldg(p.q_saved + t * p.c.rank + k) : 0.f;
    } else {
      for (int k = lane; k < rp; k += kWarp) q_smem[k] = k < p.c.rank ? p.q_saved[t * p.c.rank + k] : 0.f;
      __syncwarp();
    }
  };
  for (int64_t t0 = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp; t0 < p.c.tokens;
       t0 += kTile * warps) {
    // the tile: the warp's next tokens t0, t0 + warps, ... (in the order of its per-warp sums)
    const int64_t left = (p.c.tokens - t0 + warps - 1) / warps;
    const int tile_n = left < kTile ? static_cast<int>(left) : kTile;
    for (int a0 = 0; a0 < tile_n; a0 += kPair) {
      const int pair_n = tile_n - a0 < kPair ? tile_n - a0 : kPair;
      // --- Recompute each token's logits and probabilities (bitwise as in the forward), and dL/dl
      // into its slot.
      for (int s = 0; s < pair_n; ++s) {
        const int64_t t = t0 + (a0 + s) * warps;
        float* dl = slot_dl(s);
        float* lsums = dl + E;
        float* shifts = lsums + E;
        if constexpr (M != RouteMode::kSelect) {
          float q_reg[R > 0 ? R : 1];
          load_q(t, q_reg);
          const float* q = R > 0 ? q_reg : q_smem;
          const rm::NormCoef<float> qc = rm::query_coef(q, rp, p.c.beta, p.c.eps);
          const float q_scale = scale * qc.coef;
          const float sot = q_scale / p.c.tau;
          for (int e = lane; e < E; e += kWarp) {
            const rm::ExpertLogit<float> el = expert_logit_of<R>(q, anchor_hat, e, E, H, rp, q_scale, sot, p.c.tau);
            logits[e] = el.logit;
            lsums[e] = el.lsum;
            shifts[e] = el.shift;
          }
        } else {
          for (int e = lane; e < E; e += kWarp) logits[e] = p.logits_in[t * E + e];
        }
        __syncwarp();
        if constexpr (M == RouteMode::kLogits) {
          for (int e = lane; e < E; e += kWarp) dl[e] = p.grad_logits[t * E + e];
        } else {
          const rm::SoftmaxStats<float> st = warp_softmax_stats(logits, probs, E, lane);
          for (int e = lane; e < E; e += kWarp) probs[e] = rm::routing_prob(logits[e], probs[e], st.sum, p.c.sigmoid);
          __syncwarp();
          token_logit_grads(p, t, lane, logits, probs, st, dl);
        }
        if constexpr (M == RouteMode::kSelect) {
          for (int e = lane; e < E; e += kWarp) p.grad_logits_out[t * E + e] = dl[e];
        }
        __syncwarp();
      }
      if constexpr (M != RouteMode::kSelect) {
        // --- Back through the log-sum-exp over anchors and SIPS, anchor by anchor, for the pair's
        // tokens at once: each anchor read and each accumulator update serves both (their terms
        // added in token order, as one token at a time would).
        float q_reg[kPair][R > 0 ? R : 1];
        rm::NormCoef<float> qc[kPair];
        float q_scale[kPair], sot[kPair], ds_u_sum[kPair];
        float dah_reg[kPair][R > 0 ? R : 1];
#pragma unroll
        for (int s = 0; s < kPair; ++s) {
          if (s < pair_n) load_q(t0 + (a0 + s) * warps, q_reg[s]);  // (the generic rank: q_smem holds it)
          qc[s] = rm::query_coef(R > 0 ? q_reg[s] : q_smem, rp, p.c.beta, p.c.eps);
          q_scale[s] = scale * qc[s].coef;
          sot[s] = q_scale[s] / p.c.tau;
          ds_u_sum[s] = 0.f;
          if constexpr (R > 0) {
#pragma unroll
            for (int i = 0; i < R; ++i) dah_reg[s][i] = 0.f;
          }
        }
        if constexpr (R == 0) {
          for (int i = 0; i < rp; ++i) lane_dah[i * kWarp + lane] = 0.f;
        }
        const auto q_at = [&](int s, int i) { return R > 0 ? q_reg[s][R > 0 ? i : 0] : q_smem[i]; };
        const auto dah_at = [&](int s, int i) -> float& {
          return R > 0 ? dah_reg[s][R > 0 ? i : 0] : lane_dah[i * kWarp + lane];
        };
        for (int e = lane; e < E; e += kWarp) {
          // the expert's dL/dl and anchor statistics of each token, read once for all its anchors
          float dle[kPair], lsum[kPair], shift[kPair];
#pragma unroll
          for (int s = 0; s < kPair; ++s) {
            const float* dl = slot_dl(s < pair_n ? s : 0);
            dle[s] = dl[e];
            lsum[s] = dl[E + e];
            shift[s] = dl[2 * E + e];
          }
          for (int h = 0; h < H; ++h) {
            // the anchor's coordinates, read once for u and for dL/dq (templated ranks: registers;
            // the accumulator stores in between could alias them, so the compiler would reload)
            float a_reg[R > 0 ? R : 1] = {};
            if constexpr (R > 0) {
#pragma unroll
              for (int i = 0; i < R; ++i) a_reg[i] = anchor_hat[(static_cast<int64_t>(i) * H + h) * E + e];
            }
            const auto a_of = [&](int i) {
              return R > 0 ? a_reg[R > 0 ? i : 0] : anchor_hat[(static_cast<int64_t>(i) * H + h) * E + e];
            };
            float ds_q[kPair];
#pragma unroll
            for (int s = 0; s < kPair; ++s) {
              ds_q[s] = 0.f;
              if (s >= pair_n) continue;
              const float u = rm::anchor_dot<float>(R > 0 ? q_reg[s] : q_smem, rp, a_of);
              const float share = H == 1 ? 1.f : rm::anchor_share(H, rm::anchor_exp(sot[s] * u, shift[s]), lsum[s]);
              const float ds = rm::score_grad(dle[s], share);
              ds_u_sum[s] = lanes::fmadd(ds, u, ds_u_sum[s]);
              ds_q[s] = rm::anchor_acc_coef(ds, q_scale[s]);
#pragma unroll
              for (int i = 0; i < rp; ++i) dah_at(s, i) = lanes::fmadd(ds, a_of(i), dah_at(s, i));
            }
            if (acc) {
#pragma unroll
              for (int i = 0; i < rp; ++i) {
                const int64_t off = (static_cast<int64_t>(i) * H + h) * E + e;
                float a = acc[off];
#pragma unroll
                for (int s = 0; s < kPair; ++s) {
                  if (s < pair_n) a = lanes::fmadd(ds_q[s], q_at(s, i), a);
                }
                acc[off] = a;
              }
            }
          }
        }
#pragma unroll
        for (int s = 0; s < kPair; ++s) {
          if (s >= pair_n) continue;
          const int u = a0 + s;  // the token's place in the tile
          const int64_t t = t0 + u * warps;
          ds_u_sum[s] = warp_sum(ds_u_sum[s]);
          if (lane == 0) grad_scale += rm::scale_grad(ds_u_sum[s], qc[s]);
          if constexpr (R > 8) {
            // the larger templated ranks: one warp sum per row, lane i writes grad_q[i] (the
            // scattered sums below index their rows at run time, which puts dah in local memory here)
#pragma unroll
            for (int i = 0; i < R; ++i) {
              const float gq_i = rm::query_grad(q_reg[s][i], warp_sum(dah_reg[s][i]), ds_u_sum[s], scale, qc[s]);
              dah_reg[s][i] = gq_i;  // every lane has the token's whole grad_q row from here
              if (i == lane) {
                if (p.save_grad_q) p.grad_q[t * R + i] = gq_i;
                if (p.need_grad_x) tile_gq[u * R + i] = gq_i;
              }
            }
            // RMSNorm's mean_dot for the tensor-core column pass's dL/dx (route_column_mma.cuh),
            // from the registers: the pass then stages neither q nor a second copy of the formula
            if (p.mean_dot != nullptr && lane == 0) p.mean_dot[t] = rm::rms_mean_dot<R>(dah_reg[s], q_reg[s], R, d);
          } else if constexpr (R > 0) {
            // lane l: grad_q[l / (32 / R)], written by the first lane of each group of 32 / R
            const float dah_sum = warp_sum_scatter<R>(dah_reg[s], lane);
            const int own = lane / (kWarp / R);
            float q_own = q_reg[s][0];
#pragma unroll
            for (int i = 1; i < R; ++i) q_own = i == own ? q_reg[s][i] : q_own;
            const float gq_own = rm::query_grad(q_own, dah_sum, ds_u_sum[s], scale, qc[s]);
            if (lane % (kWarp / R) == 0) {
              if (p.save_grad_q) p.grad_q[t * R + own] = gq_own;
              if (p.need_grad_x) tile_gq[u * R + own] = gq_own;
            }
          } else {
            for (int i = 0; i < rp; ++i) {
              const float v = warp_sum(lane_dah[i * kWarp + lane]);
              if (lane == 0) dah_smem[i] = v;
            }
            __syncwarp();
            if (lane == 0) {
              for (int i = 0; i < rp; ++i) {
                gq_smem[i] = rm::query_grad(q_smem[i], dah_smem[i], ds_u_sum[s], scale, qc[s]);
              }
            }
            __syncwarp();
            if (p.save_grad_q) {
              for (int i = lane; i < rp; i += kWarp) p.grad_q[t * rp + i] = gq_smem[i];
            }
          }

          // --- Kept for the tile's grad_x pass: RMSNorm's mean(dL/dx_hat * x_hat) is <grad_q, q> / d,
          // as q = (proj * g) x_hat (the forward's q).
          if (p.need_grad_x) {
            if constexpr (R == 0) {
              for (int i = lane; i < rp; i += kWarp) tile_gq[u * rp + i] = gq_smem[i];
            }
            __syncwarp();  // the token's grad_q row is whole
            if (lane == 0) {
              tile_mean_dot[u] =
                  p.c.use_norm ? rm::rms_mean_dot<R>(tile_gq + u * rp, R > 0 ? q_reg[s] : q_smem, rp, d) : 0.f;
            }
          }
        }
        __syncwarp();  // the slots are read before the next pair's tokens overwrite them
      }
    }

    // --- Back through q = (proj * g) x_hat and RMSNorm for the tile's tokens, in one pass over d.
    if constexpr (M != RouteMode::kSelect) {
      if (p.need_grad_x) {
        const bool norm = p.c.use_norm;
        const int n = R > 0 ? R : rp;
        // templated ranks: the tile's grad_q rows in registers (zero past the warp's last token;
        // rank 8 takes the 2-block register budget for them, route_kernel_params.h)
        float gq_tile[kTile][R > 0 ? R : 1] = {};
        if constexpr (R > 0) {
#pragma unroll
          for (int u = 0; u < kTile; ++u) {
#pragma unroll
            for (int k = 0; k < R; ++k) gq_tile[u][k] = u < tile_n ? tile_gq[u * R + k] : 0.f;
          }
        }
        const auto gq_of = [&](int u, int k) { return R > 0 ? gq_tile[u][R > 0 ? k : 0] : tile_gq[u * rp + k]; };
        // 16-byte x vectors, and projection rows read as 16-byte granules (staged, or aligned)
        if (p.vec && (p.proj_smem >= 0 || p.proj_vec)) {
          constexpr int V = VecWidth<T>::value;
          float rstd[kTile], mean_dot[kTile];
#pragma unroll
          for (int u = 0; u < kTile; ++u) {
            rstd[u] = norm && u < tile_n ? p.rstd_saved[t0 + u * warps] : 1.f;
            mean_dot[u] = u < tile_n ? tile_mean_dot[u] : 0.f;
          }
          for (int64_t v = lane; v < d / V; v += kWarp) {
            float out[kTile][V];
            hat_grad_vec<R, V, kTile>(w_rows, w_g, w_nrows, d, n, gq_of, v * V, lane, out);
#pragma unroll
            for (int u = 0; u < kTile; ++u) {
              if (u >= tile_n) continue;
              if (norm) {
                // x read here, token by token, not for the whole tile before the projection pass: the
                // tile's x vectors and its dL/dx_hat at once would not fit in registers
                float xv[V];
                load_vec<V>(x + (t0 + u * warps) * d + v * V, xv);
#pragma unroll
                for (int j = 0; j < V; ++j) {
                  out[u][j] = rm::rms_norm_input_grad(out[u][j], rm::rms_normalized(xv[j], rstd[u]), rstd[u],
                                                      mean_dot[u]);
                }
              }
              store_vec(grad_x + (t0 + u * warps) * d + v * V, out[u]);
            }
          }
        } else {
          for (int u = 0; u < tile_n; ++u) {
            const int64_t t = t0 + u * warps;
            const T* xrow = x + t * d;
            T* gxrow = grad_x + t * d;
            const float rstd = norm ? p.rstd_saved[t] : 1.f;
            const float mean_dot = tile_mean_dot[u];
            const float* gq = tile_gq + u * rp;
            auto w_at = [&](int k, int64_t i) {
              return k < w_nrows ? (w_g ? w_rows[k * d + i] * w_g[i] : w_rows[k * d + i]) : 0.f;
            };
            auto hat_grad = [&](int64_t i) {
              float s = gq[0] * w_at(0, i);
              for (int k = 1; k < n; ++k) s = lanes::fmadd(gq[k], w_at(k, i), s);
              return s;
            };
            for (int64_t i = lane; i < d; i += kWarp) {
              const float gh = hat_grad(i);
              store_float(gxrow + i, norm ? rm::rms_norm_input_grad(gh, rm::rms_normalized(to_float(xrow[i]), rstd),
                                                                     rstd, mean_dot)
                                          : gh);
            }
          }
        }
        __syncwarp();  // the tile's rows are read before the next tile's tokens overwrite them
      }
    }
  }

  if constexpr (M != RouteMode::kSelect) {
    if (p.need_param_grads) {
      if (p.acc_smem >= 0) {
        // The block's slot: its warps' accumulators and scale sums added in warp order.
        if (lane == 0) logits[0] = grad_scale;  // (the warp's scratch is free after its last token)
        __syncthreads();
        const float* warp_acc = smem + p.acc_smem;
        float* dst = p.anchor_slots + static_cast<int64_t>(blockIdx.x) * acc_size;
        for (int64_t i = threadIdx.x; i < acc_size; i += blockDim.x) {
          float s = warp_acc[i];
          for (int w = 1; w < kWarpsPerBlock; ++w) s += warp_acc[w * acc_size + i];
          dst[i] = s;
        }
        if (threadIdx.x == 0) {
          float s = smem[p.warp_smem];
          for (int w = 1; w < kWarpsPerBlock; ++w) s += smem[p.warp_smem + w * p.warp_stride];
          p.scale_slots[blockIdx.x] = s;
        }
      } else if (lane == 0) {
        p.scale_slots[warp_slot] = grad_scale;  // the warp's accumulators are already its slot
      }
    }
  }
}

// ---- route_backward_column_kernel (route_kernel_params.h ColumnParams) ---------------------------

// Column partials M[c, k, i] = sum over chunk c's tokens of grad_q[t, k] * x_hat[t, i] of the
// block's column group (32 V columns), chunk c and rank chunk [k0, k0 + RC). Lane l of every warp
// takes the V columns [V l, V l + V) of the group (one 16-byte x load per token on the vector path,
// V = 1 otherwise), the block's warps split the chunk's tokens (warp w: tokens w, w + 8, ...), whose
// grad_q and rstd rows the block stages in shared memory kColumnTile tokens at a time (one x load
// per token in each warp's chain), and their sums are added in warp order through `red`, one rank
// row at a time: M[c, k] of the group's columns is one partial per block.
template <int RC, typename T, int V>
__device__ __forceinline__ void column_partials(const ColumnParams& p, int64_t group, int64_t c, int k0, float* red,
                                                float* gq_tile, float* rstd_tile) {
  // the warps' sums [warp][j][lane], rows of kWarp + kWarp / V floats: the adding threads (block
  // column c = V l + j) then read distinct banks
  constexpr int kRow = kWarp + kWarp / V;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const float* __restrict__ rstd = p.rstd;
  const float* __restrict__ grad_q = p.grad_q;
  const int64_t tokens = p.tokens, d = p.d, chunk = p.chunk;
  const int rp = p.rp;
  const bool use_norm = p.use_norm;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t i0 = group + static_cast<int64_t>(lane) * V;  // V divides d on the vector path
  const int64_t t0 = c * chunk;
  const int64_t t1 = t0 + chunk < tokens ? t0 + chunk : tokens;
  float acc[RC][V];
#pragma unroll
  for (int k = 0; k < RC; ++k) {
#pragma unroll
    for (int j = 0; j < V; ++j) acc[k][j] = 0.f;
  }
  for (int64_t s0 = t0; s0 < t1; s0 += kColumnTile) {
    const int n = static_cast<int>(t1 - s0 < kColumnTile ? t1 - s0 : kColumnTile);
    if constexpr (RC % 4 == 0) {  // rows of RC floats at multiples of 4 (rp, k0 too): 16-byte loads
      for (int m = threadIdx.x; m < n * (RC / 4); m += kColumnThreads) {
        const int u = m / (RC / 4), kk = 4 * (m % (RC / 4));
        *reinterpret_cast<float4*>(gq_tile + u * RC + kk) =
            __ldg(reinterpret_cast<const float4*>(grad_q + (s0 + u) * rp + k0 + kk));
      }
    } else {
      for (int m = threadIdx.x; m < n * RC; m += kColumnThreads) {
        gq_tile[m] = __ldg(grad_q + (s0 + m / RC) * rp + k0 + m % RC);
      }
    }
    if (use_norm) {
      for (int m = threadIdx.x; m < n; m += kColumnThreads) rstd_tile[m] = __ldg(rstd + s0 + m);
    }
    __syncthreads();
    if (i0 < d) {
      for (int u = warp; u < n; u += kColumnWarps) {
        const int64_t t = s0 + u;
        float xh[V];
        if constexpr (V > 1) {
          load_vec<V>(x + t * d + i0, xh);
        } else {
          xh[0] = to_float(x[t * d + i0]);
        }
        if (use_norm) {
          const float r = rstd_tile[u];
#pragma unroll
          for (int j = 0; j < V; ++j) xh[j] = rm::rms_normalized(xh[j], r);
        }
#pragma unroll
        for (int k = 0; k < RC; ++k) {
          const float g = gq_tile[u * RC + k];
#pragma unroll
          for (int j = 0; j < V; ++j) acc[k][j] = lanes::fmadd(g, xh[j], acc[k][j]);
        }
      }
    }
    __syncthreads();  // the tile is read before the next one overwrites it
  }
  const int col = threadIdx.x;  // the block column this thread adds: lane col / V's column j = col % V
  const int64_t i = group + col;
#pragma unroll
  for (int k = 0; k < RC; ++k) {
#pragma unroll
    for (int j = 0; j < V; ++j) red[(warp * V + j) * kRow + lane] = acc[k][j];
    __syncthreads();
    if (col < kWarp * V && i < d) {
      float s = red[(col % V) * kRow + col / V];
#pragma unroll
      for (int w = 1; w < kColumnWarps; ++w) s += red[(w * V + col % V) * kRow + col / V];
      p.partials[(c * static_cast<int64_t>(rp) + k0 + k) * d + i] = s;
    }
    __syncthreads();
  }
}

// W consecutive floats (W = 4: one 16-byte load; the caller keeps them aligned). Not load_vec: its
// __ldg goes through the read-only cache, and these are partials other blocks wrote in this launch.
template <int W>
__device__ __forceinline__ void load_floats(const float* src, float (&v)[W]) {
  if constexpr (W == 4) {
    const float4 a = *reinterpret_cast<const float4*>(src);
    v[0] = a.x;
    v[1] = a.y;
    v[2] = a.z;
    v[3] = a.w;
  } else {
#pragma unroll
    for (int j = 0; j < W; ++j) v[j] = src[j];
  }
}

// The block that took its column group's last ticket: the group's partials of every chunk added
// (units of W columns of one rank row: thread u % per of a pass adds the chunks s, s + stripes, ...
// of stripe s = tid / per, then the stripes in order), the totals M[k, i] written over chunk 0's
// partials; then per column grad_proj[k, i] = g_i M[k, i] and grad_g[i] = sum_k proj[k, i] M[k, i].
template <int W>
__device__ __forceinline__ void finish_column_group(const ColumnParams& p, int64_t group, int cols, float* red) {
  const int64_t d = p.d;
  const int rp = p.rp, chunks = p.chunks;
  const int per_row = cols / W;
  const int units = rp * per_row;
  const int stripes = units < kColumnThreads ? kColumnThreads / units : 1;
  const int per = kColumnThreads / stripes;  // units of one pass
  const int tid = threadIdx.x, s = tid / per, slot = tid % per;
  for (int base = 0; base < units; base += per) {
    const int u = base + slot;
    const int64_t off = static_cast<int64_t>(u / per_row) * d + group + static_cast<int64_t>(u % per_row) * W;
    float v[W];
#pragma unroll
    for (int j = 0; j < W; ++j) v[j] = 0.f;
    if (u < units && s < stripes) {
      for (int c = s; c < chunks; c += stripes) {
        float m[W];
        load_floats<W>(p.partials + static_cast<int64_t>(c) * rp * d + off, m);
#pragma unroll
        for (int j = 0; j < W; ++j) v[j] += m[j];
      }
    }
#pragma unroll
    for (int j = 0; j < W; ++j) red[j * kColumnThreads + tid] = v[j];
    __syncthreads();
    if (s == 0 && u < units) {
#pragma unroll
      for (int j = 0; j < W; ++j) {
        float total = red[j * kColumnThreads + slot];
        for (int q = 1; q < stripes; ++q) total += red[j * kColumnThreads + q * per + slot];
        p.partials[off + j] = total;
      }
    }
    __syncthreads();
  }
  for (int j = tid; j < cols; j += kColumnThreads) {
    const int64_t i = group + j;
    float gg = 0.f;
    for (int k = 0; k < p.rank; ++k) {
      const float m = p.partials[k * d + i];
      p.grad_proj[k * d + i] = p.g ? p.g[i] * m : m;
      gg = lanes::fmadd(p.proj[k * d + i], m, gg);
    }
    if (p.g) p.grad_norm_weight[i] = gg;
  }
}

// Anchor unit b: the anchor slots of the 32 accumulator elements [32 b, 32 b + 32) ([rp][H][E])
// added into acc_total ([E * H][rp]): W consecutive elements per thread (W = 4, one 16-byte load,
// when the slots are 16-byte rows), the 32 / W units of W elements over 256 / (32 / W) stripes of
// slots (thread: unit tid % (32 / W), slots s, s + stripes, ... of stripe s = tid / (32 / W)), then
// the stripes' sums in stripe order. The unit that takes the last ticket of counters[0] then
// finishes every anchor row (anchor_grad needs the whole row) and the scale (its slots striped over
// the threads, the threads' sums added in thread order by the warps' sums).
template <int W>
__device__ __forceinline__ void add_anchor_slots(const ColumnParams& p, int64_t unit, int64_t acc_size, float* red) {
  constexpr int kUnits = kWarp / W, kStripes = kColumnThreads / kUnits;
  const int q = threadIdx.x % kUnits, s = threadIdx.x / kUnits;
  const int64_t o = unit * kWarp + q * W;  // [rp][H][E]; with W = 4 a unit is all in or all out
  float v[W];
#pragma unroll
  for (int j = 0; j < W; ++j) v[j] = 0.f;
  if (o < acc_size) {
    for (int64_t sl = s; sl < p.slots; sl += kStripes) {
      float m[W];
      load_floats<W>(p.anchor_slots + sl * acc_size + o, m);
#pragma unroll
      for (int j = 0; j < W; ++j) v[j] += m[j];
    }
  }
  if constexpr (W == 4) {
    *reinterpret_cast<float4*>(red + s * kWarp + q * W) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
    red[s * kWarp + q] = v[0];
  }
  __syncthreads();
  const int e = threadIdx.x;
  const int64_t oe = unit * kWarp + e;
  if (e < kWarp && oe < acc_size) {
    float total = red[e];
    for (int w = 1; w < kStripes; ++w) total += red[w * kWarp + e];
    const int64_t rows = static_cast<int64_t>(p.experts) * p.anchors_per_expert;
    const int64_t i = oe / rows, a = (oe % rows) % p.experts * p.anchors_per_expert + (oe % rows) / p.experts;
    p.acc_total[a * p.rp + i] = total;  // row a = e * H + h
  }
}

__device__ __forceinline__ void finish_anchors(const ColumnParams& p, int64_t unit, float* red) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t slots = p.slots;
  const int rank = p.rank, rp = p.rp;
  const int64_t rows = static_cast<int64_t>(p.experts) * p.anchors_per_expert;
  const int64_t acc_size = rows * rp;
  if (acc_size % 4 == 0) {
    add_anchor_slots<4>(p, unit, acc_size, red);
  } else {
    add_anchor_slots<1>(p, unit, acc_size, red);
  }
  if (!last_ticket(p.counters, 0, static_cast<unsigned>(p.anchor_units))) return;
  for (int64_t a = threadIdx.x; a < rows; a += blockDim.x) {
    const float* row = p.anchors + a * rank;
    const rm::NormCoef<float> c = rm::sips_norm_coef(lanes::vsqrt(rm::dot_r(row, row, rank)), p.beta, p.eps);
    rm::anchor_grad(p.acc_total + a * rp, row, c, rank, p.grad_anchors + a * rank);
  }
  float s = 0.f;
  for (int64_t sl = threadIdx.x; sl < slots; sl += blockDim.x) s += p.scale_slots[sl];
  s = warp_sum(s);
  if (lane == 0) red[warp] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = red[0];
    for (int w = 1; w < kColumnWarps; ++w) total += red[w];
    *p.grad_scale = total;
  }
}

// (2 blocks per SM, kColumnMinBlocks: without a minimum ptxas 13 keeps <1, bf16> at 32 registers
// and spills on sm_80). Dynamic shared memory: the ticket flag (4 floats).
template <int RC, typename T>
__global__ void __launch_bounds__(kColumnThreads, kColumnMinBlocks)
    route_backward_column_kernel(const ColumnParams p) {
  constexpr int V = VecWidth<T>::value;
  // the warps' sums of column_partials ([warps][V][32 + 32 / V] floats; at least the 4 * 256 of
  // finish_column_group)
  constexpr int kRed = kColumnWarps * V * (kWarp + kWarp / V) > 4 * kColumnThreads
                           ? kColumnWarps * V * (kWarp + kWarp / V) : 4 * kColumnThreads;
  __shared__ float red[kRed];
  __shared__ float gq_tile[kColumnTile * RC];  // the staged tile's grad_q rows [token][k - k0]
  __shared__ float rstd_tile[kColumnTile];
  const int64_t column_blocks = static_cast<int64_t>(p.groups) * p.chunks * p.rank_chunks;
  const int64_t b = blockIdx.x;
  if (b >= column_blocks) {
    finish_anchors(p, b - column_blocks, red);
    return;
  }
  const int64_t g = b % p.groups, c = (b / p.groups) % p.chunks;
  const int k0 = static_cast<int>(b / (static_cast<int64_t>(p.groups) * p.chunks)) * RC;
  const int width = p.vec ? V : 1;
  int64_t group = g * kWarp * width;
  bool mma = false;
  if constexpr (RC == 8 && IsBf16<T>::value) mma = p.mma;
  if (mma) {
    if constexpr (RC == 8 && IsBf16<T>::value) {
      group = g * kColumnMmaGroupCols;
      column_pass_mma<T>(p, group, c);  // all 32 rank rows: rank_chunks is 1
      if (!p.need_param_grads) return;
    }
  } else if (p.vec) {
    column_partials<RC, T, V>(p, group, c, k0, red, gq_tile, rstd_tile);
  } else {
    column_partials<RC, T, 1>(p, group, c, k0, red, gq_tile, rstd_tile);
  }
  if (!last_ticket(p.counters, 1 + static_cast<int>(g), static_cast<unsigned>(p.chunks * p.rank_chunks))) return;
  const int64_t group_cols = mma ? kColumnMmaGroupCols : kWarp * width;
  const int cols = static_cast<int>(p.d - group < group_cols ? p.d - group : group_cols);
  if (p.vec) {
    finish_column_group<4>(p, group, cols, red);
  } else {
    finish_column_group<1>(p, group, cols, red);
  }
}

}  // namespace
}  // namespace route
}  // namespace l2r

#if !defined(__CUDACC_RTC__)
// =============================================================================================
// Host: the nvcc executor of the route launch plans (route_launch_plan.h decides everything; this
// part only maps each planned instantiation to its <<<>>> launch). NVRTC compiles the kernels
// above from this same file and launches them from l2r_cuda/jit.
// =============================================================================================
#include "../../common/static_switch.h"
#include "../../launch/cuda/execute_plan.h"
#include "route_cuda.h"

namespace l2r {
namespace route {
namespace {

template <int R, typename T, RouteMode M>
struct ForwardLaunch {
  static cudaError_t run(const LaunchStep& s, cudaStream_t stream) {
    const cudaError_t err = allow_dynamic_smem(route_forward_kernel<R, T, M>, s.smem_bytes);
    if (err != cudaSuccess) return err;
    route_forward_kernel<R, T, M><<<grid_of(s), block_of(s), s.smem_bytes, stream>>>(s.params_as<ForwardParams>());
    return cudaGetLastError();
  }
};

template <int R, typename T, RouteMode M>
struct BackwardLaunch {
  static cudaError_t run(const LaunchStep& s, cudaStream_t stream) {
    const cudaError_t err = allow_dynamic_smem(route_backward_token_kernel<R, T, M>, s.smem_bytes);
    if (err != cudaSuccess) return err;
    route_backward_token_kernel<R, T, M><<<grid_of(s), block_of(s), s.smem_bytes, stream>>>(
        s.params_as<BackwardParams>());
    return cudaGetLastError();
  }
};

// The token kernel instantiations of x type T: every (rank, mode) but kSelect.
template <template <int, typename, RouteMode> class Launch, typename T>
cudaError_t launch_token_kernel_of(const LaunchStep& s, cudaStream_t stream) {
  const KernelRef& k = s.kernel;
  const RouteMode mode = static_cast<RouteMode>(k.arg2);
  cudaError_t err = cudaErrorInvalidValue;  // an instantiation no plan asks for
  L2R_RANK_SWITCH(k.arg0, kRank, return err, {
    L2R_BOOL_SWITCH(mode == RouteMode::kLogits, kLogits, {
      constexpr RouteMode kMode = kLogits ? RouteMode::kLogits : RouteMode::kRoute;
      err = Launch<kRank, T, kMode>::run(s, stream);
    });
  });
  return err;
}

template <int RC, typename T>
cudaError_t launch_column(const LaunchStep& s, cudaStream_t stream) {
  route_backward_column_kernel<RC, T><<<grid_of(s), block_of(s), s.smem_bytes, stream>>>(s.params_as<ColumnParams>());
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_column_kernel_of(const LaunchStep& s, cudaStream_t stream) {
  switch (s.kernel.arg0) {
    case 1: return launch_column<1, T>(s, stream);
    case 2: return launch_column<2, T>(s, stream);
    case 4: return launch_column<4, T>(s, stream);
    case kGenericChunk: return launch_column<kGenericChunk, T>(s, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

// The instantiations of one kernel (forward, backward token or backward column) for x type T
// (route_kernels() lists the same set). nvcc spends nearly all of the extension's build in these:
// the H200 machine's build took 280-308 s on 16 cores, waiting on this one file; on a 2-core VM,
// nvcc for sm_90 took 217 s for this file with every instantiation, and at most 61 s for one of the
// nine parts (the forward kernels of one type; 2026-12-04). So the nvcc build
// (L2R_ROUTE_CUDA_APART, setup.py and CMakeLists.txt) compiles each (kernel, type) in its own
// translation unit, csrc/route/cuda/apart/*.cu, in parallel; the SIMT emulator and
// tests/test_cuda_compile.py, which build this file alone, get them all here. NVRTC compiles only
// the kernels above.
template <RouteKernel K, typename T>
cudaError_t launch_kernel_of_type(const LaunchStep& s, cudaStream_t stream) {
  if constexpr (K == RouteKernel::kForward) return launch_token_kernel_of<ForwardLaunch, T>(s, stream);
  if constexpr (K == RouteKernel::kBackwardToken) return launch_token_kernel_of<BackwardLaunch, T>(s, stream);
  if constexpr (K == RouteKernel::kBackwardColumn) return launch_column_kernel_of<T>(s, stream);
  return cudaErrorInvalidValue;
}

#if defined(L2R_ROUTE_CUDA_APART)  // instantiated in csrc/route/cuda/apart/*.cu; else by launch_kernel below
#define L2R_ROUTE_KERNELS_OF_TYPE(K, T) \
  extern template cudaError_t launch_kernel_of_type<RouteKernel::K, T>(const LaunchStep&, cudaStream_t);
#define L2R_ROUTE_KERNEL_TYPES(K)          \
  L2R_ROUTE_KERNELS_OF_TYPE(K, float)      \
  L2R_ROUTE_KERNELS_OF_TYPE(K, __half)     \
  L2R_ROUTE_KERNELS_OF_TYPE(K, __nv_bfloat16)
L2R_ROUTE_KERNEL_TYPES(kForward)
L2R_ROUTE_KERNEL_TYPES(kBackwardToken)
L2R_ROUTE_KERNEL_TYPES(kBackwardColumn)
#undef L2R_ROUTE_KERNEL_TYPES
#undef L2R_ROUTE_KERNELS_OF_TYPE
#endif

#if !defined(L2R_ROUTE_CUDA_APART_KERNEL)  // csrc/route/cuda/apart/*.cu: the instantiation only
namespace {

template <RouteKernel K>
cudaError_t launch_kernel(const LaunchStep& s, cudaStream_t stream) {
  if (K != RouteKernel::kBackwardColumn && static_cast<RouteMode>(s.kernel.arg2) == RouteMode::kSelect) {
    if constexpr (K == RouteKernel::kForward) return ForwardLaunch<1, float, RouteMode::kSelect>::run(s, stream);
    if constexpr (K == RouteKernel::kBackwardToken) return BackwardLaunch<1, float, RouteMode::kSelect>::run(s, stream);
  }
  cudaError_t err = cudaErrorInvalidValue;
  L2R_FLOAT_DTYPE_SWITCH(static_cast<DType>(s.kernel.arg1), scalar_t, return err,
                         { err = launch_kernel_of_type<K, scalar_t>(s, stream); });
  return err;
}

cudaError_t launch_route_step(const LaunchStep& s, cudaStream_t stream) {
  const dim3 grid = grid_of(s), block = block_of(s);
  switch (static_cast<RouteKernel>(s.kernel.kernel)) {
    case RouteKernel::kPrepare:
      route_prepare_kernel<<<grid, block, s.smem_bytes, stream>>>(s.params_as<PrepareParams>());
      return cudaGetLastError();
    case RouteKernel::kForward: return launch_kernel<RouteKernel::kForward>(s, stream);
    case RouteKernel::kBackwardToken: return launch_kernel<RouteKernel::kBackwardToken>(s, stream);
    case RouteKernel::kBackwardColumn: return launch_kernel<RouteKernel::kBackwardColumn>(s, stream);
  }
  return cudaErrorInvalidValue;
}

Status run(const LaunchPlan& plan, cudaStream_t stream, cudaError_t* err) {
  if (!plan.ok()) return plan.status;
  *err = execute_route_plan(plan, stream);
  return *err == cudaSuccess ? Status::kOk : Status::kCudaError;
}

}  // namespace

cudaError_t execute_route_plan(const LaunchPlan& plan, cudaStream_t stream) {
  return execute_plan(plan, stream, launch_route_step);
}

Status launch_route_forward(RouteMode mode, const RouteShape& shape, const RouteOptions& opt,
                            const RouteForwardBuffers& buf, cudaStream_t stream, cudaError_t* err) {
  DeviceLimits limits;
  *err = current_device_limits(&limits);
  if (*err != cudaSuccess) return Status::kCudaError;
  return run(route_forward_launches(mode, shape, opt, buf, limits), stream, err);
}

Status launch_route_backward(RouteMode mode, const RouteShape& shape, const RouteOptions& opt,
                             const RouteBackwardBuffers& buf, cudaStream_t stream, cudaError_t* err) {
  DeviceLimits limits;
  *err = current_device_limits(&limits);
  if (*err != cudaSuccess) return Status::kCudaError;
  return run(route_backward_launches(mode, shape, opt, buf, limits), stream, err);
}

#endif  // !L2R_ROUTE_CUDA_APART_KERNEL

}  // namespace route
}  // namespace l2r
#endif  // !__CUDACC_RTC__
