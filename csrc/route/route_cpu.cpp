// CPU kernels of the fused L2R router: forward and recomputing backward, one token at a time on
// the helpers of route_math.cuh. Reductions over tokens go through fixed-size chunk partials summed
// in chunk order, so every result is bitwise independent of the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../common/cpu_project.h"
#include "../common/cpu_vec.h"
#include "route_checks.h"
#include "route_cpu_avx2.h"
#include "route_math.cuh"

namespace l2r {
namespace route {
namespace {

// Token chunks for deterministic reductions: the split depends on T only, never on threads.
struct TokenChunks {
  int64_t size;
  int64_t count;
};

TokenChunks token_chunks(int64_t tokens) {
  constexpr int64_t kMinChunk = 64, kMaxChunks = 64;
  const int64_t count = std::max<int64_t>(1, std::min(kMaxChunks, (tokens + kMinChunk - 1) / kMinChunk));
  return {(tokens + count - 1) / count, count};
}

// Sums `count` partials of `n` values each (laid out back to back) into out, in partial order.
template <typename acc_t>
void reduce_partials(const acc_t* partials, int64_t count, int64_t n, acc_t* out) {
  at::parallel_for(0, n, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t s = 0;
      for (int64_t c = 0; c < count; ++c) s += partials[c * n + i];
      out[i] = s;
    }
  });
}

// grad_x is as large as x and written once: asks for transparent huge pages before the first touch
// (the kernel otherwise faults it in 4 KiB at a time, a sizable share of the backward). Only the
// 2 MiB-aligned interior; a hint, so failures are ignored.
void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (bytes < 4 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

// mean_probs and tokens_per_expert from per-chunk partials laid out [chunk][stride], summed in
// chunk order (deterministic whatever the thread count).
template <typename acc_t>
void finish_expert_sums(const std::vector<acc_t>& prob_partials,
                        const std::vector<int64_t>& count_partials, int64_t chunk_count,
                        int64_t stride, int64_t experts, int64_t tokens, acc_t* mean_probs,
                        int64_t* tokens_per_expert) {
  for (int64_t e = 0; e < experts; ++e) {
    acc_t s = 0;
    int64_t n = 0;
    for (int64_t c = 0; c < chunk_count; ++c) {
      s += prob_partials[c * stride + e];
      n += count_partials[c * stride + e];
    }
    mean_probs[e] = tokens > 0 ? s / static_cast<acc_t>(tokens) : acc_t(0);
    tokens_per_expert[e] = n;
  }
}

// Router parameters in the accumulation type, prepared once per call.
template <typename acc_t>
struct RouterParams {
  at::Tensor proj;            // [r, d]
  at::Tensor proj_weighted;   // [r, d] proj * norm_weight (folds RMSNorm's affine into W)
  at::Tensor anchors;         // [E, H, r]
  at::Tensor anchor_hat;      // [E, H, r] coef(|a|) * a
  std::vector<NormCoef<acc_t>> anchor_coef;  // [E * H]
  at::Tensor norm_weight;     // [d] or undefined
  acc_t scale;
};

template <typename acc_t>
RouterParams<acc_t> prepare_params(const at::Tensor& proj, const at::Tensor& anchors,
                                   const at::Tensor& scale,
                                   const c10::optional<at::Tensor>& norm_weight, bool use_norm,
                                   acc_t beta, acc_t eps) {
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  RouterParams<acc_t> p;
  p.proj = proj.to(acc).contiguous();
  if (use_norm && norm_weight.has_value()) {
    p.norm_weight = norm_weight->to(acc).contiguous();
    p.proj_weighted = (p.proj * p.norm_weight.unsqueeze(0)).contiguous();
  } else {
    p.proj_weighted = p.proj;
  }
  p.anchors = anchors.to(acc).contiguous();
  p.anchor_hat = at::empty_like(p.anchors);
  const int64_t n = anchors.size(0) * anchors.size(1);
  const int rank = static_cast<int>(anchors.size(2));
  p.anchor_coef.resize(n);
  const acc_t* a = p.anchors.template data_ptr<acc_t>();
  acc_t* a_hat = p.anchor_hat.template data_ptr<acc_t>();
  for (int64_t i = 0; i < n; ++i) {
    const acc_t* ai = a + i * rank;
    p.anchor_coef[i] = sips_norm_coef(math_sqrt(dot(ai, ai, rank)), beta, eps);
    for (int j = 0; j < rank; ++j) a_hat[i * rank + j] = p.anchor_coef[i].coef * ai[j];
  }
  p.scale = scale.to(acc).template item<acc_t>();
  return p;
}

// x row in the accumulation type: a pointer into x when it already is, else a converted copy.
template <typename scalar_t, typename acc_t>
const acc_t* load_row(const scalar_t* x_row, int64_t d, acc_t* buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return x_row;
  } else {
    for (int64_t i = 0; i < d; ++i) buffer[i] = static_cast<acc_t>(x_row[i]);
    return buffer;
  }
}

// q = W x~ (x~ the RMS-normalized token) and its rstd.
template <typename acc_t>
acc_t project_token(const acc_t* x, const acc_t* proj_weighted, int64_t d, int rank, bool use_norm,
                    acc_t eps_norm, acc_t* q) {
  acc_t sum_squares = 0;
  cpu::project(x, proj_weighted, d, rank, q, use_norm ? &sum_squares : nullptr);
  if (!use_norm) return acc_t(1);
  const acc_t rstd = rms_inv_scale(sum_squares, d, eps_norm);
  for (int i = 0; i < rank; ++i) q[i] *= rstd;
  return rstd;
}

// Logits of every expert for one token, and exp(logit - max) of each; returns the softmax
// statistics over experts.
template <typename acc_t>
SoftmaxStats<acc_t> token_logits(const acc_t* q, const RouterParams<acc_t>& p, int64_t experts,
                                 int num_anchors, int rank, acc_t q_scale, acc_t tau,
                                 acc_t* logits, acc_t* exps) {
  const acc_t* a_hat = p.anchor_hat.template data_ptr<acc_t>();
  for (int64_t e = 0; e < experts; ++e) {
    logits[e] = expert_logit(q, a_hat + e * num_anchors * rank, num_anchors, rank, q_scale, tau);
  }
  return softmax_stats_of(logits, experts, exps);
}

// Routing probability from a logit and its exp(logit - max): softmax reuses the exp.
template <typename acc_t>
acc_t token_prob(acc_t logit, acc_t exp_shifted, SoftmaxStats<acc_t> st, bool sigmoid) {
  return sigmoid ? routing_prob(logit, st, true) : exp_shifted / st.sum;
}

#if defined(L2R_HAVE_ROUTE_AVX2)
// ---------------------------------------------------------------------------------------------
// AVX2 fast path (float math): see route_cpu_avx2.h.
// ---------------------------------------------------------------------------------------------

int64_t round_up8(int64_t n) { return (n + 7) & ~int64_t(7); }

// anchor_hat transposed to [r][H][E8], zero padded.
std::vector<float> transposed_anchors(const RouterParams<float>& p, int64_t E, int64_t H, int64_t R) {
  const int64_t E8 = round_up8(E);
  std::vector<float> at(R * H * E8, 0.0f);
  const float* a_hat = p.anchor_hat.data_ptr<float>();
  for (int64_t e = 0; e < E; ++e)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < R; ++i) at[(i * H + h) * E8 + e] = a_hat[(e * H + h) * R + i];
  return at;
}

int64_t padded_stride(int64_t d) {
  const int64_t s = round_up8(d);
  return s % 1024 == 0 ? s + 16 : s;
}

std::vector<float> padded_rows(const float* src, int64_t rows, int64_t d, int64_t stride) {
  std::vector<float> out(rows * stride, 0.0f);
  for (int64_t k = 0; k < rows; ++k) std::copy(src + k * d, src + k * d + d, out.begin() + k * stride);
  return out;
}

std::vector<float> padded8(const float* v, int64_t n) {
  std::vector<float> out(round_up8(n), 0.0f);
  if (v) std::copy(v, v + n, out.begin());
  return out;
}

// Carves the per-thread scratch of one token loop out of one allocation.
struct ScratchArena {
  std::vector<float> storage;
  float* base;
  size_t used = 0;
  explicit ScratchArena(size_t n) : storage(n + 64 + 8, 0.0f) {
    // 32-byte aligned: parts of the scratch hold __m256
    const uintptr_t p = reinterpret_cast<uintptr_t>(storage.data());
    base = reinterpret_cast<float*>((p + 31) & ~uintptr_t(31));
  }
  float* take(size_t n) {
    float* p = base + used;
    used += (n + 7) & ~size_t(7);
    TORCH_INTERNAL_ASSERT(used + 8 <= storage.size());
    return p;
  }
};

avx2::TokenScores take_token_scores(ScratchArena& arena, int64_t H, int64_t E8) {
  avx2::TokenScores S;
  S.u = arena.take(H * E8);
  S.ex = arena.take(H * E8);
  S.lsum = arena.take(E8);
  S.logits = arena.take(E8);
  S.exps = arena.take(E8);
  S.probs = arena.take(E8);
  return S;
}

template <typename scalar_t>
void route_forward_avx2(const at::Tensor& x, const RouterParams<float>& p, const float* bias,
                        const RouteDims& dims, int top_k, bool use_norm, bool sigmoid,
                        bool normalize, float eps_norm, float eps, float beta, float tau,
                        float* weights, int64_t* indices, int64_t* tokens_per_expert,
                        float* mean_probs, float* lse, float* q_out, float* rstd_out) {
  const int64_t T = dims.tokens, d = dims.d, E = dims.experts, H = dims.anchors, R = dims.rank;
  const int64_t E8 = round_up8(E);
  const std::vector<float> at = transposed_anchors(p, E, H, R);
  const std::vector<float> bias8 = padded8(bias, E);
  avx2::ForwardArgs A;
  A.d = d;
  A.rank = static_cast<int>(R);
  A.top_k = top_k;
  A.use_norm = use_norm;
  A.sigmoid = sigmoid;
  A.normalize = normalize;
  A.eps_norm = eps_norm;
  A.eps = eps;
  A.beta = beta;
  A.tau = tau;
  A.scale = p.scale;
  const int64_t stride = padded_stride(d);
  const std::vector<float> pw_padded = padded_rows(p.proj_weighted.data_ptr<float>(), R, d, stride);
  A.proj_weighted = pw_padded.data();
  A.proj_stride = stride;
  A.proj_weighted_dense = p.proj_weighted.data_ptr<float>();
  A.bias = bias ? bias8.data() : nullptr;
  A.anchors = avx2::AnchorLayout{static_cast<int>(E), static_cast<int>(E8), static_cast<int>(H),
                                 static_cast<int>(R), at.data()};
  const TokenChunks chunks = token_chunks(T);
  std::vector<float> prob_partials(chunks.count * E8, 0.0f);
  std::vector<int64_t> count_partials(chunks.count * E8, 0);
  const scalar_t* xp = x.data_ptr<scalar_t>();

  at::parallel_for(0, chunks.count, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    ScratchArena arena(8 * stride + 8 * 9 * 8 + E8 + 3 * top_k + 6 * E8 + 2 * H * E8 + 128);
    avx2::ForwardScratch W;
    W.rows = std::is_same_v<scalar_t, float> ? nullptr : arena.take(8 * stride);
    W.row_stride = stride;
    W.acc = reinterpret_cast<__m256*>(arena.take(8 * 9 * 8));
    W.keys = arena.take(E8);
    W.top_keys = reinterpret_cast<uint64_t*>(arena.take(2 * top_k));
    W.top_idx = reinterpret_cast<int*>(arena.take(top_k));
    W.scores = take_token_scores(arena, H, E8);
    for (int64_t c = chunk_begin; c < chunk_end; ++c) {
      avx2::forward_tokens(xp, c * chunks.size, std::min(T, (c + 1) * chunks.size), A, W,
                           prob_partials.data() + c * E8, count_partials.data() + c * E8,
                           weights, indices, lse, q_out, rstd_out);
    }
  });

  finish_expert_sums(prob_partials, count_partials, chunks.count, E8, E, T, mean_probs,
                     tokens_per_expert);
}
#endif

template <typename scalar_t, typename acc_t>
void route_forward_kernel(const at::Tensor& x, const RouterParams<acc_t>& p, const acc_t* bias,
                          const RouteDims& dims, int top_k, bool use_norm, bool sigmoid,
                          bool normalize, acc_t eps_norm, acc_t eps, acc_t beta, acc_t tau,
                          acc_t* weights, int64_t* indices, int64_t* tokens_per_expert,
                          acc_t* mean_probs, acc_t* lse, acc_t* q_out, acc_t* rstd_out) {
#if defined(L2R_HAVE_ROUTE_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) {
    if (cpu::cpu_has_avx2()) {
      return route_forward_avx2<scalar_t>(x, p, bias, dims, top_k, use_norm, sigmoid, normalize,
                                          eps_norm, eps, beta, tau, weights, indices,
                                          tokens_per_expert, mean_probs, lse, q_out, rstd_out);
    }
  }
#endif
  const int64_t T = dims.tokens, d = dims.d, E = dims.experts;
  const int rank = static_cast<int>(dims.rank), H = static_cast<int>(dims.anchors);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const acc_t* proj_weighted = p.proj_weighted.template data_ptr<acc_t>();
  const TokenChunks chunks = token_chunks(T);
  std::vector<acc_t> prob_partials(chunks.count * E, acc_t(0));
  std::vector<int64_t> count_partials(chunks.count * E, 0);

  at::parallel_for(0, chunks.count, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<acc_t> row(d), logits(E), exps(E), top_keys(top_k);
    std::vector<int> top_idx(top_k);
    for (int64_t c = chunk_begin; c < chunk_end; ++c) {
      acc_t* prob_sum = prob_partials.data() + c * E;
      int64_t* counts = count_partials.data() + c * E;
      const int64_t t_end = std::min(T, (c + 1) * chunks.size);
      for (int64_t t = c * chunks.size; t < t_end; ++t) {
        const acc_t* xt = load_row(xp + t * d, d, row.data());
        acc_t* q = q_out + t * rank;
        rstd_out[t] = project_token(xt, proj_weighted, d, rank, use_norm, eps_norm, q);
        const NormCoef<acc_t> qc = sips_norm_coef(math_sqrt(dot(q, q, rank)), beta, eps);
        const SoftmaxStats<acc_t> st =
            token_logits(q, p, E, H, rank, p.scale * qc.coef, tau, logits.data(), exps.data());
        lse[t] = softmax_stats_lse(st);
        int count = 0;
        for (int64_t e = 0; e < E; ++e) {
          const acc_t prob = token_prob(logits[e], exps[e], st, sigmoid);
          logits[e] = prob;  // logits are no longer needed: keep the probabilities in place
          prob_sum[e] += prob;
          count = top_k_insert(top_keys.data(), top_idx.data(), count, top_k,
                               bias ? prob + bias[e] : prob, static_cast<int>(e));
        }
        acc_t selected_sum = 0;
        for (int j = 0; j < top_k; ++j) selected_sum += logits[top_idx[j]];
        const acc_t norm = normalize ? selected_sum : acc_t(1);
        for (int j = 0; j < top_k; ++j) {
          weights[t * top_k + j] = logits[top_idx[j]] / norm;
          indices[t * top_k + j] = top_idx[j];
          counts[top_idx[j]] += 1;
        }
      }
    }
  });

  finish_expert_sums(prob_partials, count_partials, chunks.count, E, E, T, mean_probs,
                     tokens_per_expert);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
route_forward_cpu(const at::Tensor& x_in, const at::Tensor& proj, const at::Tensor& anchors,
                  const at::Tensor& scale, const c10::optional<at::Tensor>& norm_weight,
                  const c10::optional<at::Tensor>& expert_bias, int64_t top_k, double beta,
                  c10::optional<c10::string_view> norm, double eps_norm, double eps, double tau,
                  c10::string_view score, bool normalize) {
  const RouteDims dims = check_route_inputs(x_in, proj, anchors, scale, norm_weight, expert_bias);
  check_route_options(dims, top_k, beta, eps, tau);
  const bool sigmoid = parse_score(std::string(score));
  const bool use_norm = parse_norm(norm);
  const auto acc = route_acc_type(x_in);
  const auto f = x_in.options().dtype(acc);
  const int64_t T = dims.tokens, E = dims.experts;
  at::Tensor weights = at::empty({T, top_k}, f);
  at::Tensor indices = at::empty({T, top_k}, x_in.options().dtype(at::kLong));
  at::Tensor tokens_per_expert = at::zeros({E}, x_in.options().dtype(at::kLong));
  at::Tensor mean_probs = at::zeros({E}, f);
  at::Tensor lse = at::empty({T}, f);
  at::Tensor q = at::empty({T, dims.rank}, f);
  at::Tensor rstd = at::empty({T}, f);
  if (T == 0) return {weights, indices, tokens_per_expert, mean_probs, lse, q, rstd};
  const at::Tensor x = x_in.contiguous();

  AT_DISPATCH_FLOATING_TYPES(acc, "route_forward_cpu_acc", [&] {
    using acc_t = scalar_t;
    const auto params = prepare_params<acc_t>(proj, anchors, scale, norm_weight, use_norm,
                                              static_cast<acc_t>(beta), static_cast<acc_t>(eps));
    at::Tensor bias;
    if (expert_bias.has_value()) bias = expert_bias->to(acc).contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "route_forward_cpu", [&] {
      route_forward_kernel<scalar_t, acc_t>(
          x, params, bias.defined() ? bias.data_ptr<acc_t>() : nullptr, dims,
          static_cast<int>(top_k), use_norm, sigmoid, normalize, static_cast<acc_t>(eps_norm),
          static_cast<acc_t>(eps), static_cast<acc_t>(beta), static_cast<acc_t>(tau),
          weights.data_ptr<acc_t>(), indices.data_ptr<int64_t>(),
          tokens_per_expert.data_ptr<int64_t>(), mean_probs.data_ptr<acc_t>(),
          lse.data_ptr<acc_t>(), q.data_ptr<acc_t>(), rstd.data_ptr<acc_t>());
    });
  });
  return {weights, indices, tokens_per_expert, mean_probs, lse, q, rstd};
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

template <typename acc_t>
struct BackwardPartials {
  // One chunk's share of the cross-token sums, back to back: [grad_proj r*d | anchor_acc E*H*r |
  // grad_norm_weight d | grad_scale 1].
  int64_t proj_size, anchor_size, norm_size;
  int64_t size() const { return proj_size + anchor_size + norm_size + 1; }
};

#if defined(L2R_HAVE_ROUTE_AVX2)
template <typename scalar_t>
void route_backward_avx2(const float* grad_weights, const float* grad_mean_probs,
                         const float* grad_lse, const at::Tensor& x, const RouterParams<float>& p,
                         const int64_t* indices, const float* q_saved, const float* rstd_saved,
                         const RouteDims& dims, int top_k, bool use_norm, bool sigmoid,
                         bool normalize, float eps, float beta, float tau, scalar_t* grad_x,
                         std::vector<float>& partials, const BackwardPartials<float>& layout,
                         const TokenChunks& chunks) {
  const int64_t T = dims.tokens, d = dims.d, E = dims.experts, H = dims.anchors, R = dims.rank;
  const int64_t E8 = round_up8(E);
  const std::vector<float> at = transposed_anchors(p, E, H, R);
  const std::vector<float> gm8 = padded8(grad_mean_probs, E);
  avx2::BackwardArgs A;
  A.d = d;
  A.rank = static_cast<int>(R);
  A.top_k = top_k;
  A.use_norm = use_norm;
  A.sigmoid = sigmoid;
  A.normalize = normalize;
  A.eps = eps;
  A.beta = beta;
  A.tau = tau;
  A.scale = p.scale;
  A.inv_tokens = 1.0f / static_cast<float>(T);
  // rows padded to a stride that is not a multiple of 4 KiB: r rows read side by side would
  // otherwise share L1 sets
  const int64_t stride = padded_stride(d);
  const std::vector<float> proj_padded = padded_rows(p.proj.data_ptr<float>(), R, d, stride);
  A.proj = proj_padded.data();
  A.proj_stride = stride;
  A.norm_weight = p.norm_weight.defined() ? p.norm_weight.data_ptr<float>() : nullptr;
  A.grad_weights = grad_weights;
  A.grad_mean_probs = grad_mean_probs ? gm8.data() : nullptr;
  A.grad_lse = grad_lse;
  A.indices = indices;
  A.q = q_saved;
  A.rstd = rstd_saved;
  A.anchors = avx2::AnchorLayout{static_cast<int>(E), static_cast<int>(E8), static_cast<int>(H),
                                 static_cast<int>(R), at.data()};
  const scalar_t* xp = x.data_ptr<scalar_t>();

  at::parallel_for(0, chunks.count, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    ScratchArena arena(16 * stride + 8 * avx2::kProjBlock + 2 * E8 + 18 * R + 6 * E8 +
                       2 * H * E8 + 128);
    avx2::BackwardScratch W;
    W.rows = std::is_same_v<scalar_t, float> ? nullptr : arena.take(8 * stride);
    W.buffer = arena.take(8 * stride);
    W.grad_probs = arena.take(E8);
    W.dl = arena.take(E8);
    W.lanes = arena.take(R * 8);
    W.ds_anchor_hat = arena.take(R);
    W.grad_q = arena.take(8 * R);
    W.x_norm = arena.take(8 * avx2::kProjBlock);
    W.xn_stride = stride;
    W.scores = take_token_scores(arena, H, E8);
    for (int64_t c = chunk_begin; c < chunk_end; ++c) {
      float* part = partials.data() + c * layout.size();
      float* grad_proj = part;
      float* anchor_acc = part + layout.proj_size;
      float* grad_norm_weight = anchor_acc + layout.anchor_size;
      float* grad_scale = grad_norm_weight + layout.norm_size;
      avx2::backward_tokens(xp, c * chunks.size, std::min(T, (c + 1) * chunks.size), A, W,
                            grad_proj, anchor_acc, layout.norm_size ? grad_norm_weight : nullptr,
                            grad_scale, grad_x);
    }
  });
}

bool backward_uses_avx2(at::ScalarType acc) {
  return acc == at::kFloat && cpu::cpu_has_avx2();
}
#else
bool backward_uses_avx2(at::ScalarType) { return false; }
#endif

template <typename scalar_t, typename acc_t>
void route_backward_kernel(const acc_t* grad_weights, const acc_t* grad_mean_probs,
                           const acc_t* grad_lse, const at::Tensor& x, const RouterParams<acc_t>& p,
                           const int64_t* indices, const acc_t* q_saved, const acc_t* rstd_saved,
                           const RouteDims& dims, int top_k, bool use_norm, bool sigmoid,
                           bool normalize, acc_t eps, acc_t beta, acc_t tau, scalar_t* grad_x,
                           std::vector<acc_t>& partials, const BackwardPartials<acc_t>& layout,
                           const TokenChunks& chunks) {
#if defined(L2R_HAVE_ROUTE_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) {
    if (backward_uses_avx2(at::kFloat)) {
      return route_backward_avx2<scalar_t>(grad_weights, grad_mean_probs, grad_lse, x, p, indices,
                                           q_saved, rstd_saved, dims, top_k, use_norm, sigmoid,
                                           normalize, eps, beta, tau, grad_x, partials, layout,
                                           chunks);
    }
  }
#endif
  const int64_t T = dims.tokens, d = dims.d, E = dims.experts;
  const int rank = static_cast<int>(dims.rank), H = static_cast<int>(dims.anchors);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const acc_t* proj = p.proj.template data_ptr<acc_t>();
  const acc_t* a_hat = p.anchor_hat.template data_ptr<acc_t>();
  const acc_t* g = p.norm_weight.defined() ? p.norm_weight.template data_ptr<acc_t>() : nullptr;
  const acc_t inv_tokens = acc_t(1) / static_cast<acc_t>(T);

  at::parallel_for(0, chunks.count, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<acc_t> row(d), x_norm(d), grad_x_norm(d), logits(E), exps(E), probs(E), grad_probs(E);
    std::vector<acc_t> ds_anchor_hat(rank), grad_q(rank);
    for (int64_t c = chunk_begin; c < chunk_end; ++c) {
      acc_t* part = partials.data() + c * layout.size();
      acc_t* grad_proj = part;
      acc_t* anchor_acc = part + layout.proj_size;
      acc_t* grad_norm_weight = anchor_acc + layout.anchor_size;
      acc_t& grad_scale = grad_norm_weight[layout.norm_size];
      const int64_t t_end = std::min(T, (c + 1) * chunks.size);
      for (int64_t t = c * chunks.size; t < t_end; ++t) {
        const acc_t* q = q_saved + t * rank;
        const NormCoef<acc_t> qc = sips_norm_coef(math_sqrt(dot(q, q, rank)), beta, eps);
        const acc_t q_scale = p.scale * qc.coef;
        const SoftmaxStats<acc_t> st =
            token_logits(q, p, E, H, rank, q_scale, tau, logits.data(), exps.data());
        for (int64_t e = 0; e < E; ++e) {
          probs[e] = token_prob(logits[e], exps[e], st, sigmoid);
          grad_probs[e] = grad_mean_probs ? grad_mean_probs[e] * inv_tokens : acc_t(0);
        }
        if (grad_weights) {
          const acc_t* gw = grad_weights + t * top_k;
          const int64_t* idx = indices + t * top_k;
          acc_t selected_sum = 0, grad_dot_weights = 0;
          if (normalize) {
            for (int j = 0; j < top_k; ++j) selected_sum += probs[idx[j]];
            for (int j = 0; j < top_k; ++j) grad_dot_weights += gw[j] * probs[idx[j]] / selected_sum;
          }
          for (int j = 0; j < top_k; ++j) {
            grad_probs[idx[j]] += selected_prob_grad(gw[j], grad_dot_weights, selected_sum, normalize);
          }
        }
        acc_t p_dot_dp = 0;
        if (!sigmoid) {
          for (int64_t e = 0; e < E; ++e) p_dot_dp += probs[e] * grad_probs[e];
        }
        const acc_t g_lse = grad_lse ? grad_lse[t] : acc_t(0);

        // Back through LSE over anchors and SIPS, recomputing each anchor's score.
        acc_t ds_u_sum = 0;
        for (int i = 0; i < rank; ++i) ds_anchor_hat[i] = 0;
        for (int64_t e = 0; e < E; ++e) {
          const acc_t softmax_p = sigmoid ? exps[e] / st.sum : probs[e];
          const acc_t dl = logit_grad(probs[e], grad_probs[e], p_dot_dp, softmax_p, g_lse, sigmoid);
          if (dl == acc_t(0)) continue;  // saves the E*H*r work of experts with no gradient
          for (int h = 0; h < H; ++h) {
            const int64_t eh = e * H + h;
            const acc_t* ah = a_hat + eh * rank;
            const acc_t u = dot(q, ah, rank);
            const acc_t ds = dl * anchor_share(q_scale * u, logits[e], tau, H);
            ds_u_sum += ds * u;
            for (int i = 0; i < rank; ++i) ds_anchor_hat[i] += ds * ah[i];
            const acc_t ds_q = ds * q_scale;
            acc_t* acc_eh = anchor_acc + eh * rank;
            for (int i = 0; i < rank; ++i) acc_eh[i] += ds_q * q[i];
          }
        }
        grad_scale += qc.coef * ds_u_sum;
        query_grad(q, ds_anchor_hat.data(), ds_u_sum, p.scale, qc, rank, grad_q.data());

        // Back through the projection q = W x~ and RMSNorm.
        const acc_t* xt = load_row(xp + t * d, d, row.data());
        const acc_t rstd = rstd_saved[t];
        for (int64_t i = 0; i < d; ++i) {
          x_norm[i] = use_norm ? xt[i] * rstd * (g ? g[i] : acc_t(1)) : xt[i];
          grad_x_norm[i] = 0;
        }
        for (int k = 0; k < rank; ++k) {
          cpu::axpy(grad_q[k], proj + k * d, grad_x_norm.data(), d);
          cpu::axpy(grad_q[k], x_norm.data(), grad_proj + k * d, d);
        }
        scalar_t* gx = grad_x + t * d;
        if (!use_norm) {
          for (int64_t i = 0; i < d; ++i) gx[i] = static_cast<scalar_t>(grad_x_norm[i]);
          continue;
        }
        acc_t mean_dot = 0;
        for (int64_t i = 0; i < d; ++i) {
          const acc_t x_hat = xt[i] * rstd;
          if (g) {
            grad_norm_weight[i] += grad_x_norm[i] * x_hat;
            grad_x_norm[i] *= g[i];  // now dL/dx_hat
          }
          mean_dot += grad_x_norm[i] * x_hat;
        }
        mean_dot /= static_cast<acc_t>(d);
        for (int64_t i = 0; i < d; ++i) {
          gx[i] = static_cast<scalar_t>(rms_norm_input_grad(grad_x_norm[i], xt[i] * rstd, rstd, mean_dot));
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_backward_cpu(
    const c10::optional<at::Tensor>& grad_weights, const c10::optional<at::Tensor>& grad_mean_probs,
    const c10::optional<at::Tensor>& grad_lse, const at::Tensor& x_in, const at::Tensor& proj,
    const at::Tensor& anchors, const at::Tensor& scale,
    const c10::optional<at::Tensor>& norm_weight, const at::Tensor& indices_in,
    const at::Tensor& q_in, const at::Tensor& rstd_in, double beta,
    c10::optional<c10::string_view> norm, double eps, double tau, c10::string_view score,
    bool normalize) {
  const RouteBackwardSetup setup = check_route_backward_inputs(
      grad_weights, grad_mean_probs, grad_lse, x_in, proj, anchors, scale, norm_weight, indices_in,
      q_in, rstd_in, beta, norm, eps, tau, score);
  const RouteDims& dims = setup.dims;
  const int64_t T = dims.tokens, E = dims.experts, d = dims.d, rank = dims.rank;
  const int64_t top_k = setup.top_k;
  const bool sigmoid = setup.sigmoid, use_norm = setup.use_norm;
  const auto acc = route_acc_type(x_in);

  at::Tensor grad_x = at::empty_like(x_in, at::MemoryFormat::Contiguous);
  advise_huge_pages(grad_x.data_ptr(), grad_x.nbytes());
  at::Tensor grad_proj, grad_anchors, grad_scale, grad_norm_weight;
  const bool has_norm_weight = use_norm && norm_weight.has_value();

  AT_DISPATCH_FLOATING_TYPES(acc, "route_backward_cpu_acc", [&] {
    using acc_t = scalar_t;
    const auto params = prepare_params<acc_t>(proj, anchors, scale, norm_weight, use_norm,
                                              static_cast<acc_t>(beta), static_cast<acc_t>(eps));
    // The AVX2 path keeps the anchor accumulators transposed and padded: [r][H][E8].
    const bool transposed = backward_uses_avx2(acc);
    const int64_t E8 = (E + 7) & ~int64_t(7);
    BackwardPartials<acc_t> layout{rank * d, (transposed ? E8 : E) * dims.anchors * rank,
                                   has_norm_weight ? d : 0};
    const TokenChunks chunks = token_chunks(T);
    std::vector<acc_t> partials(T > 0 ? chunks.count * layout.size() : 0, acc_t(0));
    std::vector<acc_t> totals(layout.size(), acc_t(0));
    auto as_acc = [&](const c10::optional<at::Tensor>& t) {
      return t.has_value() ? t->to(acc).contiguous() : at::Tensor();
    };
    const at::Tensor gw = as_acc(grad_weights), gm = as_acc(grad_mean_probs), gl = as_acc(grad_lse);
    const at::Tensor q = q_in.to(acc).contiguous(), rstd = rstd_in.to(acc).contiguous();
    const at::Tensor indices = indices_in.to(at::kLong).contiguous();
    if (T > 0) {
      const at::Tensor x = x_in.contiguous();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "route_backward_cpu", [&] {
        route_backward_kernel<scalar_t, acc_t>(
            gw.defined() ? gw.data_ptr<acc_t>() : nullptr,
            gm.defined() ? gm.data_ptr<acc_t>() : nullptr,
            gl.defined() ? gl.data_ptr<acc_t>() : nullptr, x, params, indices.data_ptr<int64_t>(),
            q.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(), dims, static_cast<int>(top_k), use_norm,
            sigmoid, normalize, static_cast<acc_t>(eps), static_cast<acc_t>(beta),
            static_cast<acc_t>(tau), grad_x.data_ptr<scalar_t>(), partials, layout, chunks);
      });
      reduce_partials(partials.data(), chunks.count, layout.size(), totals.data());
    }
    const auto f = x_in.options().dtype(acc);
    grad_proj = at::from_blob(totals.data(), {rank, d}, f).clone();
    // anchors: grad_a = coef_a * acc + radial_a * <acc, a> * a, from the summed accumulators.
    grad_anchors = at::empty({E, dims.anchors, rank}, f);
    const acc_t* acc_sum = totals.data() + layout.proj_size;
    std::vector<acc_t> acc_untransposed;
    if (transposed) {
      const int64_t H = dims.anchors;
      acc_untransposed.resize(E * H * rank);
      for (int64_t e = 0; e < E; ++e)
        for (int64_t h = 0; h < H; ++h)
          for (int64_t i = 0; i < rank; ++i)
            acc_untransposed[(e * H + h) * rank + i] = acc_sum[(i * H + h) * E8 + e];
      acc_sum = acc_untransposed.data();
    }
    const acc_t* a = params.anchors.template data_ptr<acc_t>();
    acc_t* ga = grad_anchors.data_ptr<acc_t>();
    for (int64_t i = 0; i < E * dims.anchors; ++i) {
      anchor_grad(acc_sum + i * rank, a + i * rank, params.anchor_coef[i], static_cast<int>(rank),
                  ga + i * rank);
    }
    grad_norm_weight = has_norm_weight
                           ? at::from_blob(totals.data() + layout.proj_size + layout.anchor_size, {d}, f).clone()
                           : at::empty({0}, f);
    grad_scale = at::full(scale.sizes(), totals[layout.size() - 1], f);
  });
  return {grad_x, grad_proj.to(proj.scalar_type()), grad_anchors.to(anchors.scalar_type()),
          grad_scale.to(scale.scalar_type()),
          has_norm_weight ? grad_norm_weight.to(norm_weight->scalar_type()) : grad_norm_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(l2r_cuda, CPU, m) {
  m.impl("route_forward", &route_forward_cpu);
  m.impl("route_backward", &route_backward_cpu);
}

}  // namespace route
}  // namespace l2r
