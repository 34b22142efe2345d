// ATen adapter of the CPU route kernels: argument checks (route_checks.h), the instruction set
// (cpu_isa), parameter preparation, chunked threading and the reductions over chunks, for
// route_forward/route_backward, route_logits (+backward) and route_select (+backward). The token
// loops are route_cpu_kernel.h's, compiled once per instruction set.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#include "../../common/aten_dtype.h"
#include "../../common/cache_aligned.h"
#include "../math/all.h"
#include "../route_checks.h"
#include "../route_outputs.h"
#include "route_cpu_args.h"
#include "route_cpu_buffers.h"
#include "route_cpu_prepare.h"

namespace l2r {
namespace route {
namespace cpu {
namespace {

// ---- instruction set --------------------------------------------------------------------------

bool cpu_has(const char* isa) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (std::string(isa) == "avx2") {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  }
  if (std::string(isa) == "avx512") {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  }
#endif
  return std::string(isa) == "portable";
}

// Whether the forward prefetches the next group's rows of x into L2 (XPrefetch in
// route_cpu_kernel.h, where the measurements are): on AMD processors, where it measured up to 1.3x
// faster, and not on Intel ones, where it measured 4-11 % slower; L2R_CPU_X_PREFETCH=1 / =0 forces
// it either way (read once).
bool next_x_prefetch_helps() {
  static const bool helps = [] {
    if (const char* forced = std::getenv("L2R_CPU_X_PREFETCH")) {
      const std::string want(forced);
      TORCH_CHECK(want == "0" || want == "1", "L2R_CPU_X_PREFETCH must be 0 or 1, got '", want, "'");
      return want == "1";
    }
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    return __builtin_cpu_is("amd") != 0;
#else
    return false;
#endif
  }();
  return helps;
}

std::string best_isa() {
  if (cpu_has("avx512")) return "avx512";
  if (cpu_has("avx2")) return "avx2";
  return "portable";
}

// The float kernels in use: the best the CPU has, unless L2R_CPU_ISA (or the legacy
// L2R_CPU_PORTABLE=1) or cpu_isa() chose another.
std::mutex isa_mutex;
std::string& current_isa() {
  static std::string isa = [] {
    if (const char* forced = std::getenv("L2R_CPU_ISA")) {
      const std::string want(forced);
      TORCH_CHECK(want == "portable" || want == "avx2" || want == "avx512",
                  "L2R_CPU_ISA must be portable, avx2 or avx512, got '", want, "'");
      TORCH_CHECK(cpu_has(want.c_str()), "L2R_CPU_ISA=", want, " but this CPU does not support it");
      return want;
    }
    if (std::getenv("L2R_CPU_PORTABLE") != nullptr) return std::string("portable");
    return best_isa();
  }();
  return isa;
}

Kernels<float> float_kernels() {
  std::lock_guard<std::mutex> lock(isa_mutex);
  const std::string& isa = current_isa();
#if defined(__x86_64__) && defined(__GNUC__)
  if (isa == "avx512") return avx512_kernels();
  if (isa == "avx2") return avx2_kernels();
#endif
  return portable_kernels_float();
}

template <typename A>
Kernels<A> kernels_for();
template <>
Kernels<float> kernels_for<float>() { return float_kernels(); }
template <>
Kernels<double> kernels_for<double>() { return portable_kernels_double(); }

// ---- parameters -------------------------------------------------------------------------------

PrepareOptions prepare_options(const RouteOptions& o, int width) {
  PrepareOptions p;
  p.use_norm = o.use_norm();
  p.beta = o.beta;
  p.eps = o.eps;
  p.width = width;
  return p;
}

template <typename A>
Options<A> kernel_options(const RouteOptions& o) {
  Options<A> k;
  set_kernel_options(k, o);
  return k;
}

// Chunks of at least 64 tokens, at most 64 per T (plus group boundaries).
TokenChunks cpu_chunks(const RouteShape& s) {
  constexpr int64_t kMinChunk = 64, kMaxChunks = 64;
  const int64_t count = std::max<int64_t>(1, std::min(kMaxChunks, (s.tokens + kMinChunk - 1) / kMinChunk));
  return make_token_chunks(s, (s.tokens + count - 1) / count);
}

// Outputs at least this large are written with non-temporal stores.
constexpr size_t kStreamedOutputBytes = size_t(16) << 20;

// The kernels' scratch: one buffer per thread, kept between calls (a decode call would otherwise
// spend about as long in malloc/free of its ~20 KB as in its arithmetic), zeroed for each use so
// that nothing of an earlier call can reach a result.
template <typename A>
A* thread_scratch(int64_t count) {
  thread_local std::vector<A> buffer;
  const size_t needed = static_cast<size_t>(count) + 64;
  if (buffer.size() < needed) buffer.resize(needed);
  A* aligned = reinterpret_cast<A*>((reinterpret_cast<uintptr_t>(buffer.data()) + 63) & ~uintptr_t(63));
  std::fill(aligned, aligned + count, A(0));
  return aligned;
}

// Runs every chunk of [0, count) once, the chunks claimed one at a time, in order, from a shared
// counter by each thread of the pool, rather than split into one fixed range per thread: a thread
// that the OS or the hypervisor deschedules then holds back only the chunk it is on, while the
// others take the rest. On the 2-vCPU VMs of this project the slow calls of a run of identical
// forward+backward calls (4-7 ms over a median of 12 ms, 1-3 % of the calls) used no more CPU
// time, faulted no more pages and ran no garbage collection; they had 1-2 involuntary context
// switches against 0.4 (python -m benchmarks.spikes). `python -m benchmarks.compare_chunk_claiming`
// on an Intel Xeon VM (2 vCPUs, load average 0.96-1.29, 180 calls per setting): with a neighbour
// process busy 3 ms of every 10 ms, forward+backward took a median 15.72 ms claimed against
// 17.42 ms in fixed ranges (p90 18.16 / 19.56, max 21.0 / 32.8 ms); without one, 12.97 against
// 12.55 ms (p90 14.54 / 14.60). Each chunk writes only its own partials,
// added later in chunk order, so the results do not depend on which thread ran which chunk.
// make_worker() is called once per thread and returns that thread's body(chunk).
template <typename MakeWorker>
void for_each_claimed_chunk(int64_t count, MakeWorker&& make_worker) {
  static const bool fixed_split = [] {  // L2R_CPU_FIXED_CHUNKS=1: the former fixed ranges, to compare
    const char* v = std::getenv("L2R_CPU_FIXED_CHUNKS");
    return v != nullptr && std::string(v) == "1";
  }();
  if (fixed_split) {
    at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
      auto body = make_worker();
      for (int64_t c = begin; c < end; ++c) body(c);
    });
    return;
  }
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(count, at::get_num_threads()));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    auto body = make_worker();
    for (int64_t c = next.fetch_add(1, std::memory_order_relaxed); c < count;
         c = next.fetch_add(1, std::memory_order_relaxed)) {
      body(c);
    }
  });
}

template <typename A, typename Args, typename Run>
void run_chunks(const Args& args, int64_t (*scratch_size)(const Args&), Run&& run) {
  for_each_claimed_chunk(args.chunks.count, [&] {
    A* scratch = thread_scratch<A>(scratch_size(args));  // zeroed once per thread, as per range before
    return [&, scratch](int64_t c) { run(args, c, c + 1, scratch); };
  });
}

// Non-padding tokens of each statistics group.
std::vector<int64_t> counted_per_group(const RouteShape& s, const bool* padding) {
  std::vector<int64_t> counted(s.num_seqs(), s.seq_len);
  if (padding == nullptr) return counted;
  for (int64_t t = 0; t < s.tokens; ++t) counted[t / s.seq_len] -= padding[t] ? 1 : 0;
  return counted;
}

// mean_probs [groups, E] and tokens_per_expert (every entry written) from the chunk partials, each
// group's chunks added in chunk order.
template <typename A>
void finish_statistics(const CacheAlignedVector<A>& prob_partials, const std::vector<int64_t>& count_partials,
                       const TokenChunks& chunks, int64_t groups, int E, int E8,
                       const std::vector<int64_t>& counted, A* mean_probs, int64_t* tokens_per_expert) {
  for (int64_t s = 0; s < groups; ++s) {
    for (int e = 0; e < E; ++e) {
      A sum = A(0);
      int64_t n = 0;
      for (int64_t c = s * chunks.per_seq; c < (s + 1) * chunks.per_seq && c < chunks.count; ++c) {
        sum += prob_partials[c * E8 + e];
        n += count_partials[c * E8 + e];
      }
      mean_probs[s * E + e] = math::mean_over_tokens(sum, counted[s]);
      tokens_per_expert[s * E + e] = n;
    }
  }
}

// ---- route_forward / route_select -----------------------------------------------------------

using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Shared by route_forward (x given) and route_select (logits given).
template <typename A>
void run_forward(ForwardArgs<A>& args, const Kernels<A>& kernels, const RouteShape& s,
                 const c10::optional<at::Tensor>& expert_bias, const c10::optional<at::Tensor>& padding_mask,
                 int E8, const RoutingOutputs& out) {
  std::vector<A> bias;
  if (expert_bias.has_value()) {
    const at::Tensor b = expert_bias->to(c10::CppTypeToScalarType<A>::value).contiguous();
    bias.assign(E8, A(0));
    std::copy(b.data_ptr<A>(), b.data_ptr<A>() + s.experts, bias.begin());
    args.bias = bias.data();
  }
  at::Tensor padding;
  if (padding_mask.has_value()) {
    padding = padding_mask->reshape({-1}).contiguous();
    args.padding = padding.data_ptr<bool>();
  }
  args.chunks = cpu_chunks(s);
  args.prefetch_next_x = next_x_prefetch_helps();
  CacheAlignedVector<A> prob_partials(args.chunks.count * E8, A(0));
  std::vector<int64_t> count_partials(args.chunks.count * E8, 0);
  args.prob_partials = prob_partials.data();
  args.count_partials = count_partials.data();
  args.weights = out.weights.data_ptr<A>();
  args.indices = out.indices.data_ptr<int64_t>();
  args.lse = out.lse.data_ptr<A>();
  run_chunks<A>(args, kernels.forward_scratch, kernels.forward);
  finish_statistics<A>(prob_partials, count_partials, args.chunks, s.num_seqs(), s.experts, E8,
                       counted_per_group(s, args.padding), out.mean_probs.data_ptr<A>(),
                       out.tokens_per_expert.data_ptr<int64_t>());
}

ForwardResult route_forward_cpu(const at::Tensor& x_in, const at::Tensor& proj, const at::Tensor& anchors,
                                const at::Tensor& scale, const c10::optional<at::Tensor>& norm_weight,
                                const c10::optional<at::Tensor>& expert_bias,
                                const c10::optional<at::Tensor>& padding_mask, int64_t top_k, double beta,
                                c10::optional<c10::string_view> norm, double eps_norm, double eps, double tau,
                                c10::string_view score, bool normalize, int64_t num_groups,
                                int64_t topk_groups, c10::string_view group_score,
                                double routed_scaling_factor, int64_t seq_len) {
  const RouteCall call = check_route_forward_args(
      x_in, proj, anchors, scale, norm_weight, expert_bias, padding_mask, top_k, beta, norm, eps_norm,
      eps, tau, score, normalize, num_groups, topk_groups, group_score, routed_scaling_factor, seq_len);
  const RouteShape& s = call.shape;
  const auto acc = route_acc_type(x_in);
  const auto f = x_in.options().dtype(acc);
  const int64_t T = s.tokens;
  // run_forward's finish_statistics writes every statistics entry when there are tokens.
  const RoutingOutputs out(s, seq_len, x_in, acc, /*statistics_written=*/T > 0);
  at::Tensor q = empty_output({T, s.rank}, f);
  at::Tensor rstd = empty_output({T}, f);
  const auto result = [&] { return std::tuple_cat(out.tuple(), std::make_tuple(q, rstd)); };
  if (T == 0) return result();
  const at::Tensor x = x_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES(acc, "route_forward_cpu", [&] {
    using A = scalar_t;
    const Kernels<A> kernels = kernels_for<A>();
    const auto P = prepared_params<A>(proj, anchors, scale, norm_weight, prepare_options(call.opt, kernels.width));
    ForwardArgs<A> args;
    args.shape = s;
    args.opt = kernel_options<A>(call.opt);
    args.params = &P->view;
    args.x = x.data_ptr();
    args.x_type = dtype_of(x);
    args.q = q.data_ptr<A>();
    args.rstd = rstd.data_ptr<A>();
    run_forward<A>(args, kernels, s, expert_bias, padding_mask, P->view.experts_padded, out);
  });
  return result();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_select_cpu(
    const at::Tensor& logits_in, const c10::optional<at::Tensor>& expert_bias,
    const c10::optional<at::Tensor>& padding_mask, int64_t top_k, c10::string_view score, bool normalize,
    int64_t num_groups, int64_t topk_groups, c10::string_view group_score, double routed_scaling_factor,
    int64_t seq_len) {
  const RouteCall call = check_route_select_args(logits_in, expert_bias, padding_mask, top_k, score, normalize,
                                                 num_groups, topk_groups, group_score, routed_scaling_factor,
                                                 seq_len);
  const RouteShape& s = call.shape;
  const auto acc = route_acc_type(logits_in);
  const RoutingOutputs out(s, seq_len, logits_in, acc, /*statistics_written=*/s.tokens > 0);
  if (s.tokens == 0) return out.tuple();
  const at::Tensor logits = logits_in.to(acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES(acc, "route_select_cpu", [&] {
    using A = scalar_t;
    const Kernels<A> kernels = kernels_for<A>();
    ForwardArgs<A> args;
    args.shape = s;
    args.opt = kernel_options<A>(call.opt);
    args.logits_in = logits.data_ptr<A>();
    const int E8 = static_cast<int>(round_up(s.experts, kernels.width));
    Prepared<A> layout;  // only the padded width is read on this path
    layout.experts = s.experts;
    layout.experts_padded = E8;
    layout.anchors = 1;
    args.params = &layout;
    run_forward<A>(args, kernels, s, expert_bias, padding_mask, E8, out);
  });
  return out.tuple();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> route_logits_cpu(
    const at::Tensor& x_in, const at::Tensor& proj, const at::Tensor& anchors, const at::Tensor& scale,
    const c10::optional<at::Tensor>& norm_weight, double beta, c10::optional<c10::string_view> norm,
    double eps_norm, double eps, double tau) {
  const char* op = "route_logits";
  RouteShape s = check_scoring_inputs(x_in, proj, anchors, scale, norm_weight, op);
  check_scoring_options(beta, eps, tau, op);
  RouteOptions o;
  o.beta = beta;
  o.eps_norm = eps_norm;
  o.eps = eps;
  o.tau = tau;
  o.norm = parse_norm(norm, op);
  const auto acc = route_acc_type(x_in);
  const auto f = x_in.options().dtype(acc);
  const int64_t T = s.tokens;
  at::Tensor logits = at::empty({T, s.experts}, f);
  at::Tensor q = at::empty({T, s.rank}, f);
  at::Tensor rstd = at::empty({T}, f);
  if (T == 0) return {logits, q, rstd};
  const at::Tensor x = x_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES(acc, "route_logits_cpu", [&] {
    using A = scalar_t;
    const Kernels<A> kernels = kernels_for<A>();
    const auto P = prepared_params<A>(proj, anchors, scale, norm_weight, prepare_options(o, kernels.width));
    ForwardArgs<A> args;
    args.shape = s;
    args.opt = kernel_options<A>(o);
    args.params = &P->view;
    args.x = x.data_ptr();
    args.x_type = dtype_of(x);
    args.select = false;
    args.q = q.data_ptr<A>();
    args.rstd = rstd.data_ptr<A>();
    args.logits_out = logits.data_ptr<A>();
    args.chunks = cpu_chunks(s);
    args.prefetch_next_x = next_x_prefetch_helps();
    run_chunks<A>(args, kernels.forward_scratch, kernels.forward);
  });
  return {logits, q, rstd};
}

// ---- backward -------------------------------------------------------------------------------

using BackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Reports an out-of-range index of route_backward's `indices` (found by a kernel, which wrote
// nothing out of bounds and stopped).
void report_bad_index(const at::Tensor& indices, int64_t experts) {
  const at::Tensor bad = (indices < 0).logical_or(indices >= experts).nonzero();
  TORCH_CHECK(bad.size(0) == 0, "l2r_cuda.route_backward: indices must be in [0, E) = [0, ", experts,
              "), got indices[", bad[0][0].item<int64_t>(), ", ", bad[0][1].item<int64_t>(), "] = ",
              indices[bad[0][0].item<int64_t>()][bad[0][1].item<int64_t>()].item<int64_t>());
  TORCH_CHECK(false, "l2r_cuda.route_backward: indices out of range");
}

// Runs the backward token loops over every chunk; true when a kernel found an index outside
// [0, E) (it then stopped without writing out of bounds).
template <typename A>
bool run_backward_chunks(const BackwardArgs<A>& args, const Kernels<A>& kernels) {
  std::atomic<int32_t> bad{0};
  run_chunks<A>(args, kernels.backward_scratch, [&](const BackwardArgs<A>& a, int64_t begin, int64_t end, A* scratch) {
    BackwardArgs<A> local = a;
    int32_t local_bad = 0;
    local.bad_index = &local_bad;
    kernels.backward(local, begin, end, scratch);
    if (local_bad) bad.store(1);
  });
  return bad.load() != 0;
}

// mean_probs' gradient per token of each group (mean_grad_per_token), padded to E8.
template <typename A>
std::vector<A> padded_mean_grads(const at::Tensor& grad_mean_probs, const RouteShape& s,
                                 const c10::optional<at::Tensor>& padding_mask, int E8) {
  const at::Tensor g = mean_grad_per_token(grad_mean_probs, s, padding_mask, c10::CppTypeToScalarType<A>::value);
  const int64_t groups = g.size(0);
  const A* gp = g.data_ptr<A>();
  std::vector<A> out(groups * E8, A(0));
  for (int64_t q = 0; q < groups; ++q) {
    for (int e = 0; e < s.experts; ++e) out[q * E8 + e] = gp[q * s.experts + e];
  }
  return out;
}

// grad_proj and grad_norm_weight from M = sum_t grad_q x_hat^T (the kernels' summed partials, rows
// m_stride apart): grad_proj = M * g (M without a norm weight) and grad_norm_weight = sum_k proj * M
// (k in order), as dL/dx~ = proj^T grad_q gives sum_t dL/dx~ * x_hat = sum_k proj * M.
template <typename A>
void finish_projection_grads(const A* M, int64_t m_stride, const PreparedStorage<A>& P, int64_t R, int64_t d,
                             at::Tensor& grad_proj, at::Tensor& grad_norm_weight, const at::TensorOptions& f) {
  const A* g = P.view.norm_weight;
  const A* W = P.view.proj;
  const int64_t w_stride = P.view.proj_stride;
  grad_proj = at::empty({R, d}, f);
  A* gp = grad_proj.data_ptr<A>();
  for (int64_t k = 0; k < R; ++k) {
    for (int64_t i = 0; i < d; ++i) gp[k * d + i] = g ? M[k * m_stride + i] * g[i] : M[k * m_stride + i];
  }
  if (g == nullptr) {
    grad_norm_weight = at::empty({0}, f);
    return;
  }
  grad_norm_weight = at::empty({d}, f);
  A* gn = grad_norm_weight.data_ptr<A>();
  for (int64_t i = 0; i < d; ++i) {
    A s = W[i] * M[i];
    for (int64_t k = 1; k < R; ++k) s = math::fmadd(W[k * w_stride + i], M[k * m_stride + i], s);
    gn[i] = s;
  }
}

// Shared by route_backward and route_logits_backward: runs the token loops, then reduces the
// chunk partials and finishes the parameter gradients.
template <typename A>
BackwardResult run_backward(BackwardArgs<A>& args, const Kernels<A>& kernels, const PreparedStorage<A>& P,
                            const at::Tensor& x, const at::Tensor& proj, const at::Tensor& anchors,
                            const at::Tensor& scale, const c10::optional<at::Tensor>& norm_weight,
                            const at::Tensor& indices, bool need_grad_x, bool need_param_grads) {
  const RouteShape& s = args.shape;
  const int64_t T = s.tokens, d = s.d, R = s.rank, E = s.experts, H = s.anchors;
  const int E8 = P.view.experts_padded;
  const auto f = x.options().dtype(c10::CppTypeToScalarType<A>::value);
  const bool has_norm_weight = P.view.norm_weight != nullptr;
  at::Tensor grad_x;
  if (need_grad_x) {
    grad_x = recycled_empty(x.sizes(), x.options());  // x is contiguous
    args.grad_x = grad_x.data_ptr();
    // Larger than the caches keep for whoever reads it next: written past them, without the read
    // for ownership a normal store of a missing line costs.
    args.stream_grad_x = grad_x.nbytes() >= kStreamedOutputBytes;
  }
  args.need_grad_x = need_grad_x;
  args.need_param_grads = need_param_grads;
  args.chunks = cpu_chunks(s);
  // Uninitialised: each chunk zeroes its own partial when it starts (in parallel, into the cache it
  // then accumulates in) rather than one thread zeroing all of them here (5.3 MB at OLMoE T=8192).
  const at::Tensor partials_storage = at::empty({need_param_grads ? args.chunks.count * args.partial_size() : 0}, f);
  A* const partials = partials_storage.data_ptr<A>();
  args.partials = need_param_grads ? partials : nullptr;
  if (T > 0 && run_backward_chunks(args, kernels)) report_bad_index(indices, E);
  at::Tensor grad_proj, grad_anchors, grad_scale, grad_norm_weight;
  if (need_param_grads) {
    const int64_t size = args.partial_size();
    std::vector<A> totals(size, A(0));
    // Each total adds its chunks in chunk order from zero; a block of totals at a time takes one
    // chunk's values after the other (contiguous, vectorizable) rather than one total all its chunks
    // (a strided gather per value).
    at::parallel_for(0, size, 2048, [&](int64_t begin, int64_t end) {
      A* total = totals.data();
      for (int64_t c = 0; c < args.chunks.count; ++c) {
        const A* part = partials + c * size;
        for (int64_t i = begin; i < end; ++i) total[i] += part[i];
      }
    });
    finish_projection_grads<A>(totals.data(), args.proj_row_stride(), P, R, d, grad_proj, grad_norm_weight, f);
    // grad_a = coef_a * acc + radial_a * <acc, a> * a from the summed (transposed) accumulators.
    grad_anchors = at::empty({E, H, R}, f);
    const A* acc_t = totals.data() + args.proj_partial();
    A* ga = grad_anchors.data_ptr<A>();
    std::vector<A> acc_row(R);
    for (int64_t e = 0; e < E; ++e) {
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t i = 0; i < R; ++i) acc_row[i] = acc_t[(i * H + h) * E8 + e];
        math::anchor_grad(acc_row.data(), P.anchors.data() + (e * H + h) * R, P.anchor_coef[e * H + h],
                          static_cast<int>(R), ga + (e * H + h) * R);
      }
    }
    grad_scale = at::full(scale.sizes(), totals[args.scale_offset()], f);
  } else {
    grad_proj = at::zeros({R, d}, f);
    grad_anchors = at::zeros({E, H, R}, f);
    grad_scale = at::zeros(scale.sizes(), f);
    grad_norm_weight = has_norm_weight ? at::zeros({d}, f) : at::empty({0}, f);
  }
  // The op returns a grad_x either way; when it is not wanted (x needs no gradient) it is zeros, from
  // the recycled blocks: a fresh 64 MiB at::zeros_like (OLMoE T=8192) page-faults on every call.
  if (!need_grad_x) grad_x = recycled_empty(x.sizes(), x.options()).zero_();
  return scoring_grads_as_inputs(grad_x, grad_proj, grad_anchors, grad_scale, grad_norm_weight, proj, anchors, scale,
                                 norm_weight);
}

BackwardResult route_backward_cpu(
    const c10::optional<at::Tensor>& grad_weights, const c10::optional<at::Tensor>& grad_mean_probs,
    const c10::optional<at::Tensor>& grad_lse, const at::Tensor& x_in, const at::Tensor& proj,
    const at::Tensor& anchors, const at::Tensor& scale, const c10::optional<at::Tensor>& norm_weight,
    const c10::optional<at::Tensor>& padding_mask, const at::Tensor& indices_in, const at::Tensor& q_in,
    const at::Tensor& rstd_in, double beta, c10::optional<c10::string_view> norm, double eps, double tau,
    c10::string_view score, bool normalize, double routed_scaling_factor, int64_t seq_len,
    std::array<bool, 2> output_mask) {
  const RouteCall call = check_route_backward_args(
      grad_weights, grad_mean_probs, grad_lse, x_in, proj, anchors, scale, norm_weight, padding_mask,
      indices_in, q_in, rstd_in, beta, norm, eps, tau, score, normalize, routed_scaling_factor, seq_len);
  const RouteShape& s = call.shape;
  const auto acc = route_acc_type(x_in);
  BackwardResult result;
  AT_DISPATCH_FLOATING_TYPES(acc, "route_backward_cpu", [&] {
    using A = scalar_t;
    const Kernels<A> kernels = kernels_for<A>();
    const auto P = prepared_params<A>(proj, anchors, scale, norm_weight, prepare_options(call.opt, kernels.width));
    const at::Tensor x = x_in.contiguous();
    const auto as_acc = [&](const c10::optional<at::Tensor>& t) {
      return t.has_value() ? t->to(acc).contiguous() : at::Tensor();
    };
    const at::Tensor gw = as_acc(grad_weights), gl = as_acc(grad_lse);
    const at::Tensor q = q_in.to(acc).contiguous(), rstd = rstd_in.to(acc).contiguous();
    const at::Tensor indices = indices_in.to(at::kLong).contiguous();
    at::Tensor padding;
    std::vector<A> gm;
    BackwardArgs<A> args;
    args.shape = s;
    args.opt = kernel_options<A>(call.opt);
    args.params = &P->view;
    args.x = x.data_ptr();
    args.x_type = dtype_of(x);
    args.grad_weights = gw.defined() ? gw.data_ptr<A>() : nullptr;
    args.grad_lse = gl.defined() ? gl.data_ptr<A>() : nullptr;
    if (grad_mean_probs.has_value() && s.tokens > 0) {
      gm = padded_mean_grads<A>(*grad_mean_probs, s, padding_mask, P->view.experts_padded);
      args.grad_mean_probs = gm.data();
    }
    if (padding_mask.has_value()) {
      padding = padding_mask->reshape({-1}).contiguous();
      args.padding = padding.data_ptr<bool>();
    }
    args.indices = indices.data_ptr<int64_t>();
    args.q = q.data_ptr<A>();
    args.rstd = rstd.data_ptr<A>();
    result = run_backward<A>(args, kernels, *P, x, proj, anchors, scale, norm_weight, indices,
                             output_mask[0], output_mask[1]);
  });
  return result;
}

BackwardResult route_logits_backward_cpu(const at::Tensor& grad_logits, const at::Tensor& x_in,
                                         const at::Tensor& proj, const at::Tensor& anchors,
                                         const at::Tensor& scale, const c10::optional<at::Tensor>& norm_weight,
                                         const at::Tensor& q_in, const at::Tensor& rstd_in, double beta,
                                         c10::optional<c10::string_view> norm, double eps, double tau,
                                         std::array<bool, 2> output_mask) {
  const char* op = "route_logits_backward";
  const RouteShape s = check_route_logits_backward_args(grad_logits, x_in, proj, anchors, scale, norm_weight,
                                                        q_in, rstd_in, beta, eps, tau);
  RouteOptions o;
  o.beta = beta;
  o.eps = eps;
  o.tau = tau;
  o.norm = parse_norm(norm, op);
  const auto acc = route_acc_type(x_in);
  BackwardResult result;
  AT_DISPATCH_FLOATING_TYPES(acc, "route_logits_backward_cpu", [&] {
    using A = scalar_t;
    const Kernels<A> kernels = kernels_for<A>();
    const auto P = prepared_params<A>(proj, anchors, scale, norm_weight, prepare_options(o, kernels.width));
    const at::Tensor x = x_in.contiguous();
    const at::Tensor gl = grad_logits.to(acc).contiguous();
    const at::Tensor q = q_in.to(acc).contiguous(), rstd = rstd_in.to(acc).contiguous();
    BackwardArgs<A> args;
    args.shape = s;
    args.opt = kernel_options<A>(o);
    args.params = &P->view;
    args.x = x.data_ptr();
    args.x_type = dtype_of(x);
    args.grad_logits = gl.data_ptr<A>();
    args.q = q.data_ptr<A>();
    args.rstd = rstd.data_ptr<A>();
    result = run_backward<A>(args, kernels, *P, x, proj, anchors, scale, norm_weight, at::Tensor(),
                             output_mask[0], output_mask[1]);
  });
  return result;
}

at::Tensor route_select_backward_cpu(const c10::optional<at::Tensor>& grad_weights,
                                     const c10::optional<at::Tensor>& grad_mean_probs,
                                     const c10::optional<at::Tensor>& grad_lse, const at::Tensor& logits_in,
                                     const c10::optional<at::Tensor>& padding_mask, const at::Tensor& indices_in,
                                     c10::string_view score, bool normalize, double routed_scaling_factor,
                                     int64_t seq_len) {
  const RouteCall call = check_route_select_backward_args(grad_weights, grad_mean_probs, grad_lse, logits_in,
                                                          padding_mask, indices_in, score, normalize,
                                                          routed_scaling_factor, seq_len);
  const RouteShape& s = call.shape;
  const auto acc = route_acc_type(logits_in);
  at::Tensor grad_logits = at::zeros({s.tokens, int64_t(s.experts)}, logits_in.options().dtype(acc));
  if (s.tokens == 0) return grad_logits.to(logits_in.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(acc, "route_select_backward_cpu", [&] {
    using A = scalar_t;
    const Kernels<A> kernels = kernels_for<A>();
    const at::Tensor logits = logits_in.to(acc).contiguous();
    const auto as_acc = [&](const c10::optional<at::Tensor>& t) {
      return t.has_value() ? t->to(acc).contiguous() : at::Tensor();
    };
    const at::Tensor gw = as_acc(grad_weights), gl = as_acc(grad_lse);
    const at::Tensor indices = indices_in.to(at::kLong).contiguous();
    const int E8 = static_cast<int>(round_up(s.experts, kernels.width));
    Prepared<A> layout;
    layout.experts = s.experts;
    layout.experts_padded = E8;
    layout.anchors = 1;
    layout.rank = 1;
    std::vector<A> gm;
    at::Tensor padding;
    BackwardArgs<A> args;
    args.shape = s;
    args.opt = kernel_options<A>(call.opt);
    args.params = &layout;
    args.logits_in = logits.data_ptr<A>();
    args.grad_weights = gw.defined() ? gw.data_ptr<A>() : nullptr;
    args.grad_lse = gl.defined() ? gl.data_ptr<A>() : nullptr;
    if (grad_mean_probs.has_value()) {
      gm = padded_mean_grads<A>(*grad_mean_probs, s, padding_mask, E8);
      args.grad_mean_probs = gm.data();
    }
    if (padding_mask.has_value()) {
      padding = padding_mask->reshape({-1}).contiguous();
      args.padding = padding.data_ptr<bool>();
    }
    args.indices = indices.data_ptr<int64_t>();
    args.grad_logits_out = grad_logits.data_ptr<A>();
    args.chunks = cpu_chunks(s);
    if (run_backward_chunks(args, kernels)) report_bad_index(indices, s.experts);
  });
  return grad_logits;
}

}  // namespace

// The op cpu_isa (registration.cpp): the CPU instruction set the float route kernels use, after
// optionally choosing one ("portable", "avx2", "avx512", "auto" = the best this CPU has).
std::string cpu_isa_op(c10::optional<c10::string_view> set) {
  if (set.has_value()) {
    std::string want(set->data(), set->size());
    if (want == "auto") want = best_isa();
    TORCH_CHECK(want == "portable" || want == "avx2" || want == "avx512",
                "l2r_cuda.cpu_isa: isa must be 'portable', 'avx2', 'avx512' or 'auto', got '", want, "'");
    TORCH_CHECK(cpu_has(want.c_str()), "l2r_cuda.cpu_isa: this CPU does not support ", want);
    std::lock_guard<std::mutex> lock(isa_mutex);
    current_isa() = want;
  }
  std::lock_guard<std::mutex> lock(isa_mutex);
  return current_isa();
}

void clear_prepared_cache_op() { clear_prepared_cache(); }

std::vector<int64_t> prepared_cache_stats_op() {
  const PreparedCacheStats s = prepared_cache_stats();
  return {s.entries, s.hits, s.misses};
}

int64_t release_recycled_buffers_op() { return release_recycled_buffers(); }

std::vector<int64_t> recycled_buffer_stats_op() {
  const RecycledStats s = recycled_stats();
  return {s.free_blocks, s.free_bytes, s.reused, s.fresh};
}

TORCH_LIBRARY_IMPL(l2r_cuda, CPU, m) {
  m.impl("route_forward", &route_forward_cpu);
  m.impl("route_backward", &route_backward_cpu);
  m.impl("route_logits", &route_logits_cpu);
  m.impl("route_logits_backward", &route_logits_backward_cpu);
  m.impl("route_select", &route_select_cpu);
  m.impl("route_select_backward", &route_select_backward_cpu);
}

}  // namespace cpu
}  // namespace route
}  // namespace l2r
