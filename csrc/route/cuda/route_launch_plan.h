// The launch plans of the CUDA route kernels (route_cuda.cu): which instantiations run, grids,
// shared-memory budgets and placement, parameter structs and workspace layout, decided once for
// both executors (common/launch_plan.h): the nvcc-built kernels and l2r_cuda.jit's NVRTC build.
// Raw pointers, the framework-free shape and options of route_options.h and the device's limits
// only: no torch, no CUDA headers. Header-only so that the SIMT emulator builds route_cuda.cu alone.
//
// Every float buffer is float32 and contiguous.
#pragma once

#include <algorithm>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include "../../common/dtype.h"
#include "../../common/launch_plan.h"
#include "../route_options.h"
#include "route_kernel_params.h"

namespace l2r {
namespace route {

struct RouteForwardBuffers {
  // inputs
  const void* x = nullptr;             // [T, d] (kRoute, kLogits)
  DType x_type = DType::kFloat32;
  const float* proj = nullptr;         // [r, d]
  const float* anchors = nullptr;      // [E, H, r]
  const float* norm_weight = nullptr;  // [d] or null
  const float* scale = nullptr;        // [1] (device: no host read, CUDA-graph safe)
  const float* logits_in = nullptr;    // [T, E] (kSelect)
  const float* expert_bias = nullptr;  // [E] or null
  const bool* padding = nullptr;       // [T] or null (true: out of the statistics)
  // outputs
  float* weights = nullptr;            // [T, k]
  int64_t* indices = nullptr;          // [T, k]
  int64_t* tokens_per_expert = nullptr;// [groups, E]
  float* mean_probs = nullptr;         // [groups, E]
  float* lse = nullptr;                // [T]
  float* q = nullptr;                  // [T, r]
  float* rstd = nullptr;               // [T]
  float* logits_out = nullptr;         // [T, E] (kLogits)
  // kRouteCounterWords words that are zero and that nothing else uses while the launch runs (the
  // kernels leave them zero: keep one such buffer per stream), or null: the plan then zeroes words
  // of the workspace first (one more launch; what a CUDA graph capture does).
  unsigned* counters = nullptr;
  float* workspace = nullptr;          // route_forward_workspace_floats()
};

struct RouteBackwardBuffers {
  const float* grad_weights = nullptr;     // [T, k] or null
  const float* grad_mean_probs = nullptr;  // [groups, E] already divided by each group's token
                                           // count (route_checks.h mean_grad_per_token), or null
  const float* grad_lse = nullptr;         // [T] or null
  const float* grad_logits = nullptr;      // [T, E] (kLogits: dL/dl given)
  const void* x = nullptr;
  DType x_type = DType::kFloat32;
  const float* proj = nullptr;
  const float* anchors = nullptr;
  const float* norm_weight = nullptr;
  const float* scale = nullptr;
  const float* logits_in = nullptr;        // kSelect
  const bool* padding = nullptr;
  const int64_t* indices = nullptr;        // [T, k]
  const float* q = nullptr;                // [T, r]
  const float* rstd = nullptr;             // [T]
  bool need_grad_x = true;
  bool need_param_grads = true;
  // outputs
  void* grad_x = nullptr;                  // [T, d] in x's type
  float* grad_proj = nullptr;              // [r, d]
  float* grad_anchors = nullptr;           // [E, H, r]
  float* grad_scale = nullptr;             // [1]
  float* grad_norm_weight = nullptr;       // [d] (when norm_weight and norm)
  float* grad_logits_out = nullptr;        // [T, E] (kSelect)
  int32_t* bad_index = nullptr;            // set to 1 when indices has a value outside [0, E)
  float* workspace = nullptr;              // route_backward_workspace_floats()
};

// ---- kernel instantiations -----------------------------------------------------------------------

// KernelRef.kernel of route_cuda.cu; arg0: template rank (R, or RC of the column kernel), arg1: x's
// DType, arg2: RouteMode. Kernels without template arguments leave them 0.
enum class RouteKernel : int32_t {
  kPrepare = 0,
  kForward = 1,
  kBackwardToken = 3,
  kBackwardColumn = 4,
};

// Template ranks of the forward/backward token kernels (L2R_RANK_SWITCH) and of the column kernel,
// and the x types of the scoring kernels (L2R_FLOAT_DTYPE_SWITCH).
constexpr int kTemplateRanks[] = {1, 2, 4, 8, 16, 32, 0};
constexpr int kColumnRanks[] = {1, 2, 4, kGenericChunk};
constexpr DType kScoreTypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};

inline KernelRef route_kernel(RouteKernel k, int rank = 0, DType type = DType::kFloat32,
                              RouteMode mode = RouteMode::kRoute) {
  return KernelRef{static_cast<int32_t>(k), rank, static_cast<int32_t>(type), static_cast<int32_t>(mode)};
}

// The forward/backward token kernel of (mode, padded rank, x type): kSelect has no x and no rank.
inline KernelRef token_kernel(RouteKernel k, RouteMode mode, int rp, DType x_type) {
  if (mode == RouteMode::kSelect) return route_kernel(k, 1, DType::kFloat32, RouteMode::kSelect);
  return route_kernel(k, template_rank(rp), x_type, mode);
}

// Every instantiation route_cuda.cu's executor can launch (what NVRTC compiles).
inline std::vector<KernelRef> route_kernels() {
  std::vector<KernelRef> all = {route_kernel(RouteKernel::kPrepare)};
  for (RouteKernel k : {RouteKernel::kForward, RouteKernel::kBackwardToken}) {
    all.push_back(token_kernel(k, RouteMode::kSelect, 1, DType::kFloat32));
    for (int rank : kTemplateRanks) {
      for (DType type : kScoreTypes) {
        for (RouteMode mode : {RouteMode::kRoute, RouteMode::kLogits}) all.push_back(route_kernel(k, rank, type, mode));
      }
    }
  }
  for (int rc : kColumnRanks) {
    for (DType type : kScoreTypes) all.push_back(route_kernel(RouteKernel::kBackwardColumn, rc, type));
  }
  return all;
}

inline const char* device_type_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float";
    case DType::kFloat64: return "double";
    case DType::kFloat16: return "__half";
    case DType::kBFloat16: return "__nv_bfloat16";
  }
  return "?";
}

// The C++ name of an instantiation (an NVRTC name expression), e.g.
// "l2r::route::route_forward_kernel<4, __half, l2r::route::RouteMode::kRoute>".
inline std::string route_kernel_name(const KernelRef& ref) {
  static const char* const modes[] = {"kRoute", "kLogits", "kSelect"};
  const std::string ns = "l2r::route::";
  const std::string type = device_type_name(static_cast<DType>(ref.arg1));
  const std::string mode = ns + "RouteMode::" + modes[ref.arg2 >= 0 && ref.arg2 < 3 ? ref.arg2 : 0];
  const std::string rank = std::to_string(ref.arg0);
  switch (static_cast<RouteKernel>(ref.kernel)) {
    case RouteKernel::kPrepare: return ns + "route_prepare_kernel";
    case RouteKernel::kForward: return ns + "route_forward_kernel<" + rank + ", " + type + ", " + mode + ">";
    case RouteKernel::kBackwardToken:
      return ns + "route_backward_token_kernel<" + rank + ", " + type + ", " + mode + ">";
    case RouteKernel::kBackwardColumn: return ns + "route_backward_column_kernel<" + rank + ", " + type + ">";
  }
  return "";
}

// ---- sizes and workspace -------------------------------------------------------------------------

inline int64_t align4(int64_t n) { return (n + 3) / 4 * 4; }

// The sizes and options every route kernel reads, in the kernels' types.
inline KernelConfig kernel_config(const RouteShape& s, const RouteOptions& o, int rp) {
  KernelConfig c;
  c.tokens = s.tokens;
  c.d = s.d;
  c.seq_len = s.seq_len > 0 ? s.seq_len : s.tokens;
  c.rank = s.rank;
  c.rp = rp;
  c.experts = s.experts;
  c.anchors = s.anchors;
  c.top_k = s.top_k;
  set_kernel_options(c, o);
  return c;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Rank the kernels use: r rounded up to 1, 2, 4, 8, 16 or 32 (templated kernels), beyond 32 to a
// multiple of 8 (generic kernel). proj/anchor rows are zero-padded to it, which changes no result.
inline int route_padded_rank(int rank) {
  if (rank <= 32) {
    int rp = 1;
    while (rp < rank) rp *= 2;
    return rp;
  }
  return (rank + kGenericChunk - 1) / kGenericChunk * kGenericChunk;
}

// Blocks of the backward token kernel: one wave of blocks_per_sm blocks per SM (what its shared
// memory and its __launch_bounds__ keep resident: backward_smem), fewer when there are fewer tokens
// than warps.
inline int backward_blocks(int64_t tokens, int blocks_per_sm, const DeviceLimits& limits) {
  const int64_t wave = std::max<int64_t>(1, limits.sm_count) * blocks_per_sm;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(tokens, kWarpsPerBlock), wave)));
}

struct ColumnChunks {
  int64_t size;
  int count;
};

// Column chunks at most (what the workspace holds partials for): kMinColumnChunk tokens each at
// least, kMaxColumnChunks at most.
inline int max_column_chunks(int64_t tokens) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(kMaxColumnChunks, ceil_div(tokens, kMinColumnChunk))));
}

// The column kernel's chunks: as many as keep its column blocks (column_blocks per chunk) and its
// anchor_units blocks within one wave of kColumnMinBlocks blocks per SM, within max_column_chunks.
// One wave: every warp's chain of x loads is as short as the grid allows, and the chunks the last
// block of a column group adds are few.
inline ColumnChunks column_chunks(int64_t tokens, int64_t column_blocks, int64_t anchor_units,
                                  const DeviceLimits& limits) {
  const int64_t wave = std::max<int64_t>(1, limits.sm_count) * kColumnMinBlocks;
  const int64_t count =
      std::max<int64_t>(1, std::min<int64_t>(max_column_chunks(tokens), (wave - anchor_units) / column_blocks));
  return {ceil_div(tokens, count), static_cast<int>(count)};
}

// Column groups of the column kernel: 32 x vectors of V columns (V = 1 off the vector path).
inline int64_t column_groups(int64_t d, int vec_width) { return ceil_div(d, static_cast<int64_t>(kWarp) * vec_width); }

// The column kernel's ticket words: counters[0] for the anchor units, counters[1 + group] for each
// column group (as many as the scalar path's groups: the most there can be).
inline int64_t backward_counter_words(int64_t d) { return 1 + column_groups(d, 1); }

// Workspace regions (floats, each 16-byte aligned). Anchor and scale slots: one per block of the
// token kernel, or one per warp when its warps' accumulators stay in global memory (backward_slots).
struct BackwardWorkspace {
  int64_t anchor_hat, grad_q, mean_dot, column_partials, anchor_slots, scale_slots, acc_total, counters, total;
};

inline BackwardWorkspace backward_workspace(RouteMode mode, const RouteShape& s, int64_t slots) {
  const int rp = route_padded_rank(s.rank);
  const int64_t acc = static_cast<int64_t>(s.experts) * s.anchors * rp;
  BackwardWorkspace w{};
  if (mode == RouteMode::kSelect) return w;
  w.anchor_hat = 0;
  w.grad_q = w.anchor_hat + align4(acc);
  w.mean_dot = w.grad_q + align4(s.tokens * rp);  // the tensor-core column pass's RMSNorm term
  w.column_partials = w.mean_dot + align4(s.tokens);
  w.anchor_slots = w.column_partials + align4(static_cast<int64_t>(max_column_chunks(s.tokens)) * rp * s.d);
  w.scale_slots = w.anchor_slots + align4(slots * acc);
  w.acc_total = w.scale_slots + align4(slots);
  w.counters = w.acc_total + align4(acc);
  w.total = w.counters + align4(backward_counter_words(s.d));
  return w;
}

// ---- shared memory -------------------------------------------------------------------------------

// Optional shared memory per block: what leaves room for min_blocks blocks per SM (1 KiB of each
// block's share is reserved by the hardware).
inline int64_t smem_budget(const DeviceLimits& limits, int min_blocks) {
  const int64_t share = limits.smem_per_sm / min_blocks - 1024;
  return share < limits.smem_per_block_optin ? share : limits.smem_per_block_optin;
}

// Places the optional shared-memory arrays after the mandatory per-warp scratch (plus `extra`
// floats), in priority order, while the total stays within budget_bytes. Returns the total bytes,
// or -1 when the mandatory part alone exceeds limit_bytes.
inline int64_t place_smem(int64_t limit_bytes, int64_t budget_bytes, int64_t warp_floats, int64_t extra,
                          int64_t* warp_off, std::initializer_list<std::pair<int64_t, int64_t*>> optional) {
  *warp_off = 0;
  int64_t used = align4(warp_floats) * kWarpsPerBlock + align4(extra);
  if (used * 4 > limit_bytes) return -1;
  for (const auto& item : optional) {
    const int64_t n = align4(item.first);
    if (item.first > 0 && (used + n) * 4 <= budget_bytes) {
      *item.second = used;
      used += n;
    } else {
      *item.second = -1;
    }
  }
  return used * 4;
}

// The backward token kernel's shared memory: per-warp scratch, then (in priority order, while they
// fit) the warps' anchor accumulators, the normalised anchors and the folded projection, within the
// share of backward_min_blocks blocks per SM; when the projection is then left in global memory
// (where every token re-reads it) but fits the share of 2 blocks per SM, 2 blocks per SM.
struct BackwardSmem {
  int64_t warp_stride = 0, warp_smem = 0, acc_smem = -1, anchor_smem = -1, proj_smem = -1, bytes = -1;
  int blocks_per_sm = 1;
};

inline BackwardSmem backward_smem(RouteMode mode, const RouteShape& s, const DeviceLimits& limits, bool param_grads) {
  const bool scores = mode != RouteMode::kSelect;
  const int rp = route_padded_rank(s.rank);
  const int64_t acc_size = static_cast<int64_t>(s.experts) * s.anchors * rp;
  auto place = [&](int blocks_per_sm) {
    BackwardSmem b;
    b.blocks_per_sm = blocks_per_sm;
    b.warp_stride = align4(backward_warp_floats(s.experts, rp));
    b.bytes = place_smem(limits.smem_per_block_optin, smem_budget(limits, blocks_per_sm), b.warp_stride, 0,
                         &b.warp_smem,
                         {{scores && param_grads ? acc_size * kWarpsPerBlock : 0, &b.acc_smem},
                          {scores ? acc_size : 0, &b.anchor_smem},
                          {scores ? rp * s.d : 0, &b.proj_smem}});
    return b;
  };
  const BackwardSmem most = place(backward_min_blocks(template_rank(rp)));
  if (!scores || most.bytes < 0 || most.proj_smem >= 0 || most.blocks_per_sm <= 2) return most;
  const BackwardSmem two = place(2);
  return two.proj_smem >= 0 ? two : most;
}

// The column kernel's dynamic shared memory: its ticket flag (4 floats; the rest is static).
inline int64_t backward_column_smem_bytes() { return 4 * 4; }

// Anchor and scale slots of the token kernel's grid (see BackwardWorkspace).
inline int64_t backward_slots(RouteMode mode, const RouteShape& s, const DeviceLimits& limits) {
  const BackwardSmem sm = backward_smem(mode, s, limits, true);
  const int64_t blocks = backward_blocks(s.tokens, sm.blocks_per_sm, limits);
  return sm.acc_smem >= 0 ? blocks : blocks * kWarpsPerBlock;
}

inline int64_t route_backward_workspace_floats(RouteMode mode, const RouteShape& s, const DeviceLimits& limits) {
  return backward_workspace(mode, s, backward_slots(mode, s, limits)).total;
}

inline int elementwise_blocks(int64_t n) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(n, kElementwiseThreads), kMaxElementwiseBlocks)));
}

// Bytes of one element of a scoring kernel's x (float32, float16 or bfloat16).
inline int64_t score_elem_bytes(DType type) { return type == DType::kFloat32 ? 4 : 2; }

inline bool rows_aligned(const void* x, int64_t d, DType type) {
  const int64_t elem = score_elem_bytes(type);
  return reinterpret_cast<uintptr_t>(x) % 16 == 0 && (d * elem) % 16 == 0;
}

// proj rows (and the norm weight, when given) are float4 vectors.
inline bool proj_rows_aligned(const float* proj, const float* g, int64_t d) {
  return d % 4 == 0 && reinterpret_cast<uintptr_t>(proj) % 16 == 0 && (g == nullptr || reinterpret_cast<uintptr_t>(g) % 16 == 0);
}

inline bool supported_score_type(DType t) {
  return t == DType::kFloat32 || t == DType::kFloat16 || t == DType::kBFloat16;
}

inline void plan_prepare(LaunchPlan& plan, const float* anchors, const RouteShape& s, int rp, float beta, float eps,
                         float* anchor_hat) {
  PrepareParams pp{};
  pp.anchors = anchors;
  pp.anchor_hat = anchor_hat;
  pp.rank = s.rank;
  pp.rp = rp;
  pp.experts = s.experts;
  pp.anchors_per_expert = s.anchors;
  pp.beta = beta;
  pp.eps = eps;
  plan.kernel(route_kernel(RouteKernel::kPrepare), elementwise_blocks(static_cast<int64_t>(s.experts) * s.anchors * rp),
              kElementwiseThreads, 0, pp);
}

// ---- plans ---------------------------------------------------------------------------------------

// ---- forward ------------------------------------------------------------------------------------

// Rows of a token's logits in a warp's scratch: at least E, and L = 32 / TT (the lanes per token in
// the selection) modulo 32, so that the TT tokens' rows start in distinct banks (lane t * L + m reads
// row t, column m + L s: conflict-free).
inline int forward_logit_stride(int experts, int tt) {
  const int lanes_per_token = kWarp / tt;
  return (experts - lanes_per_token + kWarp - 1) / kWarp * kWarp + lanes_per_token;
}

// A warp's scratch in floats (route_forward.cuh warp_scratch: the same regions in the same order;
// forward_layout adds the group scores), at least 5 * 32 (the statistics finalize reuses the warps'
// scratch as 5 floats per thread).
inline int64_t forward_warp_floats(const RouteShape& s, RouteMode mode, int rp, int tt) {
  const int64_t ls = forward_logit_stride(s.experts, tt);
  const int64_t k = mode == RouteMode::kLogits ? 0 : s.top_k;
  const int64_t n = align4(rp * tt) + 2 * align4(tt) + 2 * align4(tt * ls) + align4(tt * k) +
                    align4(tt * forward_logit_stride(static_cast<int>(k), tt)) + 2 * align4(s.experts) + 4;
  return std::max<int64_t>(n, 5 * kWarp);
}

// The forward's d split: into how many column ranges a chunk's projection is split over blocks
// when the chunks alone would leave SMs idle. As many as fill the SMs (ceil(sms / chunks), at most
// one per 256-column unit), but never more blocks than one wave holds: a split whose blocks make a
// second, partial wave (64 chunks x 3 splits = 192 blocks of one resident block per SM on 132 SMs:
// mixtral T = 1024 r = 32, olmoe T = 4096) takes about twice one wave's time, where one split fewer
// (128 blocks of a third more columns each) runs in one wave.
// resident(split_cols): blocks per SM with a staged range of split_cols columns.
template <typename Resident>
inline int64_t forward_splits(int64_t chunks, int64_t d_units, int64_t sms, Resident&& resident) {
  int64_t splits = std::min<int64_t>(d_units, ceil_div(sms, chunks));
  while (splits > 1 && chunks * splits > sms * resident(ceil_div(d_units, splits) * 256)) --splits;
  return splits;
}

// Everything the forward plan decides: the block, the grid, the shared memory and the workspace.
struct ForwardLayout {
  Status status = Status::kOk;
  int rp = 0, tt = 0, rows = 0, warps = 0, logit_stride = 0;
  int64_t warp_floats = 0;
  TokenChunks chunks;
  int splits = 1, split_cols = 0, stage_cols = 0;
  int mma_splits = 0;  // > 0: the tensor-core layout (forward_mma_layout)
  int32_t mma_sum_smem = -1;
  int partial_chunks = 1;  // ForwardParams::partial_chunks
  int64_t blocks = 0, finishers = 0;
  int32_t proj_smem = 0, anchor_smem = -1, bias_smem = 0, warp_smem = 0;
  int64_t smem_bytes = 0;
  // workspace (floats)
  int64_t anchor_hat = -1, prob_partials = 0, count_partials = 0, token_partials = 0, split_partials = 0,
          counters = 0, total = 0;
};

inline int64_t round_up_to(int64_t n, int64_t m) { return ceil_div(n, m) * m; }

inline ForwardLayout forward_layout(RouteMode mode, const RouteShape& s, const DeviceLimits& limits, int groups) {
  ForwardLayout f;
  const bool scores = mode != RouteMode::kSelect;
  f.rp = scores ? route_padded_rank(s.rank) : 1;
  const int R = scores ? template_rank(f.rp) : 1;
  f.rows = scores ? tile_rows(R) : 1;
  f.tt = tokens_per_warp(R);
  f.logit_stride = forward_logit_stride(s.experts, f.tt);
  f.warp_floats = forward_warp_floats(s, mode, f.rp, f.tt) + align4(static_cast<int64_t>(f.tt) * groups);
  const int64_t sms = std::max<int64_t>(1, limits.sm_count);
  const int64_t d_units = scores ? ceil_div(s.d, 256) : 1;
  // Warps per block: enough tokens per block for a full grid, fewer for small T (more, smaller
  // chunks: the decode path), at most forward_max_warps(R).
  int64_t warps = ceil_div(s.tokens * d_units, static_cast<int64_t>(f.tt) * sms);
  warps = std::min<int64_t>(forward_max_warps(R), std::max<int64_t>(1, warps));
  const int64_t budget = limits.smem_per_block_optin / 4;  // floats
  int64_t anchors = scores ? align4(static_cast<int64_t>(s.experts) * s.anchors * f.rp) : 0;
  // floats of a block of w warps besides its staged projection, and the staged columns that fit
  // beside them (whole 256-column units)
  const auto fixed_floats = [&](int64_t w) { return 4 + anchors + align4(s.experts) + w * f.warp_floats; };
  const auto stage_fit = [&](int64_t w) { return (budget - fixed_floats(w)) / f.rows / 256 * 256; };
  for (;;) {
    const int64_t fixed = fixed_floats(warps);
    const int64_t min_stage = scores ? f.rows * 256 : 0;
    if (fixed + min_stage <= budget) break;
    if (warps > 1) {
      warps /= 2;
    } else if (anchors > 0) {
      anchors = 0;  // normalised by route_prepare_kernel into the workspace, read from global memory
    } else {
      f.status = Status::kSharedMemoryTooSmall;
      return f;
    }
  }
  f.chunks = make_token_chunks(s, warps * f.tt);
  // d split: a chunk's columns over several blocks when the chunks alone would leave SMs idle.
  if (scores && f.chunks.count <= kMaxSplitTiles && 2 * f.chunks.count <= sms && d_units >= 2) {
    // blocks of `warps` warps resident per SM: the kernel's register budget is forward_max_warps(R)
    // warps per SM (__launch_bounds__), and a block stages rows x split columns of the projection
    const int64_t by_registers = std::max<int64_t>(1, forward_max_warps(R) / warps);
    const int64_t splits = forward_splits(f.chunks.count, d_units, sms, [&](int64_t split_cols) {
      const int64_t bytes = 4 * (fixed_floats(warps) + f.rows * std::min<int64_t>(split_cols, stage_fit(warps)));
      return std::max<int64_t>(1, std::min<int64_t>(by_registers, limits.smem_per_sm / (bytes + 1024)));
    });
    f.split_cols = static_cast<int>(ceil_div(d_units, splits) * 256);
    f.splits = static_cast<int>(ceil_div(s.d, f.split_cols));
  }
  const int64_t range = f.splits > 1 ? f.split_cols : round_up_to(s.d, 256);
  // Staging warps: a grid of fewer blocks than SMs (few tokens) is bound by each block's chain of
  // projection loads (rows x range floats staged by its threads), so such a block gets more warps
  // than it has token tiles (the chunks keep their size: the extra warps get no tokens and only
  // stage), for at most kStageGranulesPerThread 16-byte loads per thread, while the staged range
  // still fits.
  if (scores && f.chunks.count * f.splits < sms) {
    const int64_t want = ceil_div(f.rows * range / 4, kWarp * kStageGranulesPerThread);
    int64_t staging = std::min<int64_t>(forward_max_warps(R), std::max<int64_t>(warps, want));
    while (staging > warps &&
           fixed_floats(staging) + f.rows * range > budget) {
      staging = std::max<int64_t>(warps, staging / 2);
    }
    warps = staging;
  }
  f.warps = static_cast<int>(warps);
  const int64_t fixed = fixed_floats(warps);
  if (scores) {
    const int64_t fit = stage_fit(warps);
    f.stage_cols = static_cast<int>(std::min<int64_t>(range, fit));
  }
  f.proj_smem = 4;
  const int64_t proj = static_cast<int64_t>(f.rows) * f.stage_cols;
  f.anchor_smem = anchors > 0 ? static_cast<int32_t>(f.proj_smem + proj) : -1;
  f.bias_smem = static_cast<int32_t>(f.proj_smem + proj + anchors);
  f.warp_smem = static_cast<int32_t>(f.bias_smem + align4(s.experts));
  f.smem_bytes = (f.warp_smem + warps * f.warp_floats) * 4;
  if (f.splits > 1) {
    f.blocks = f.chunks.count * f.splits;
    f.finishers = f.chunks.count;
  } else {
    const int64_t per_sm = std::max<int64_t>(
        1, std::min<int64_t>(limits.smem_per_sm / (f.smem_bytes + 1024), 64 / warps));
    f.blocks = std::max<int64_t>(1, std::min<int64_t>(f.chunks.count, sms * per_sm));
    f.finishers = f.blocks;
  }
  // workspace
  int64_t at = 0;
  auto take = [&](int64_t n) {
    const int64_t off = at;
    at += align4(n);
    return off;
  };
  if (scores && anchors == 0) f.anchor_hat = take(static_cast<int64_t>(s.experts) * s.anchors * f.rp);
  f.prob_partials = take(f.chunks.count * s.experts);
  f.count_partials = take(f.chunks.count * s.experts);
  f.token_partials = take(f.chunks.count);
  f.split_partials = take(f.splits > 1 ? f.chunks.count * f.splits * warps * f.tt * (f.rp + 1) : 0);
  f.counters = take(kRouteCounterWords);
  f.total = at;
  return f;
}

// The tensor-core layout of the rank-32 forward (bf16 x with 16-byte rows, at least kMmaMinTokens
// tokens; route_kernel_params.h kMma*): kMmaWarps warps, chunks of 16 tokens (one MMA m-tile),
// a block per kMmaChunks chunks and d split. The split spreads the chunks' columns over the SMs
// when there are fewer blocks of chunks than SMs (at most kMaxSplitTiles of them: one ticket word
// each); each block stages its own range of the projection. Status kSharedMemoryTooSmall when it
// does not fit (the plan keeps forward_layout's CUDA-core path).
inline ForwardLayout forward_mma_layout(RouteMode mode, const RouteShape& s, const DeviceLimits& limits, int groups) {
  ForwardLayout f;
  f.rp = route_padded_rank(s.rank);
  f.rows = tile_rows(32);
  f.tt = tokens_per_warp(32);
  f.logit_stride = forward_logit_stride(s.experts, f.tt);
  f.warp_floats = forward_warp_floats(s, mode, f.rp, f.tt) + align4(static_cast<int64_t>(f.tt) * groups);
  f.warps = kMmaWarps;
  f.chunks = make_token_chunks(s, kMmaWarps * f.tt);
  const int64_t sms = std::max<int64_t>(1, limits.sm_count);
  const int64_t blocks_of_chunks = ceil_div(f.chunks.count, kMmaChunks);
  const int64_t d_units = ceil_div(s.d, kMmaStageCols);
  int64_t splits = 1;
  if (blocks_of_chunks <= kMaxSplitTiles) splits = std::max<int64_t>(1, std::min<int64_t>(sms / blocks_of_chunks, d_units));
  f.split_cols = static_cast<int>(ceil_div(d_units, splits) * kMmaStageCols);
  f.mma_splits = static_cast<int>(ceil_div(s.d, f.split_cols));
  const int64_t budget = limits.smem_per_block_optin / 4;  // floats
  int64_t anchors = align4(static_cast<int64_t>(s.experts) * s.anchors * f.rp);
  const auto total = [&](int64_t a) {
    return 4 + kMmaRegionFloats + align4(kMmaSumFloats) + a + align4(s.experts) + kMmaWarps * f.warp_floats;
  };
  if (total(anchors) > budget) anchors = 0;  // normalised by route_prepare_kernel into the workspace
  if (total(anchors) > budget) {
    f.status = Status::kSharedMemoryTooSmall;
    return f;
  }
  f.proj_smem = 4;
  f.mma_sum_smem = f.proj_smem + kMmaRegionFloats;
  f.anchor_smem = anchors > 0 ? static_cast<int32_t>(f.mma_sum_smem + align4(kMmaSumFloats)) : -1;
  f.bias_smem = static_cast<int32_t>(f.mma_sum_smem + align4(kMmaSumFloats) + anchors);
  f.warp_smem = static_cast<int32_t>(f.bias_smem + align4(s.experts));
  f.smem_bytes = (f.warp_smem + kMmaWarps * f.warp_floats) * 4;
  f.blocks = blocks_of_chunks * f.mma_splits;
  f.finishers = blocks_of_chunks;
  // A block routes its kMmaChunks chunks itself, in order: one statistics partial for all of them
  // when no block of chunks straddles two statistics groups.
  f.partial_chunks = f.chunks.per_seq % kMmaChunks == 0 ? kMmaChunks : 1;
  int64_t at = 0;
  auto take = [&](int64_t n) {
    const int64_t off = at;
    at += align4(n);
    return off;
  };
  if (anchors == 0) f.anchor_hat = take(static_cast<int64_t>(s.experts) * s.anchors * f.rp);
  const int64_t partials = f.chunks.count / f.partial_chunks;
  f.prob_partials = take(partials * s.experts);
  f.count_partials = take(partials * s.experts);
  f.token_partials = take(partials);
  f.split_partials = take(f.mma_splits > 1 ? blocks_of_chunks * f.mma_splits * kMmaSumFloats : 0);
  f.counters = take(kRouteCounterWords);
  f.total = at;
  return f;
}

// Whether the backward's column kernel takes its tensor-core pass (route_column_mma.cuh) for this
// shape and x dtype (the caller adds: x and dL/dx rows of 16-byte vectors).
inline bool backward_column_mma(RouteMode mode, const RouteShape& s, DType x_type) {
  return mode != RouteMode::kSelect && route_padded_rank(s.rank) == 32 && x_type == DType::kBFloat16;
}

// Whether a forward of this shape may take the tensor-core layout (the x buffer decides the rest:
// bf16 with 16-byte rows). The kernel keeps its rows' tokens in 32 bits.
inline bool forward_mma_shape(RouteMode mode, const RouteShape& s) {
  return mode != RouteMode::kSelect && template_rank(route_padded_rank(s.rank)) == 32 && s.tokens >= kMmaMinTokens &&
         s.tokens < (int64_t{1} << 31);
}

inline int forward_groups(RouteMode mode, const RouteOptions& o) {
  return mode != RouteMode::kLogits && o.num_groups > 1 ? o.num_groups : 0;
}

// Scratch (in floats) the forward plan needs on a device with these limits; the caller allocates
// it (any contents).
inline int64_t route_forward_workspace_floats(RouteMode mode, const RouteShape& s, const RouteOptions& o,
                                              const DeviceLimits& limits) {
  const int64_t simt = forward_layout(mode, s, limits, forward_groups(mode, o)).total;
  if (!forward_mma_shape(mode, s)) return simt;
  const ForwardLayout m = forward_mma_layout(mode, s, limits, forward_groups(mode, o));
  return m.status == Status::kOk ? std::max<int64_t>(simt, m.total) : simt;
}

inline LaunchPlan route_forward_launches(RouteMode mode, const RouteShape& shape, const RouteOptions& opt,
                                         const RouteForwardBuffers& buf, const DeviceLimits& limits) {
  LaunchPlan plan(KernelSource::kRoute);
  if (shape.tokens == 0) {  // no tokens: one statistics group of zeros
    if (mode == RouteMode::kLogits) return plan;
    plan.memset(buf.mean_probs, 0, static_cast<int64_t>(sizeof(float)) * shape.experts);
    plan.memset(buf.tokens_per_expert, 0, static_cast<int64_t>(sizeof(int64_t)) * shape.experts);
    return plan;
  }
  const bool scores = mode != RouteMode::kSelect;
  if (scores && !supported_score_type(buf.x_type)) {
    plan.status = Status::kUnsupportedDType;
    return plan;
  }
  ForwardLayout f = forward_layout(mode, shape, limits, forward_groups(mode, opt));
  if (forward_mma_shape(mode, shape) && buf.x_type == DType::kBFloat16 && rows_aligned(buf.x, shape.d, buf.x_type)) {
    const ForwardLayout m = forward_mma_layout(mode, shape, limits, forward_groups(mode, opt));
    if (m.status == Status::kOk) f = m;
  }
  if (f.status != Status::kOk) {
    plan.status = f.status;
    return plan;
  }
  ForwardParams p{};
  p.x = buf.x;
  p.proj = buf.proj;
  p.norm_weight = opt.use_norm() ? buf.norm_weight : nullptr;
  p.anchors = buf.anchors;
  p.anchor_hat = f.anchor_hat >= 0 ? buf.workspace + f.anchor_hat : nullptr;
  p.bias = buf.expert_bias;
  p.scale = buf.scale;
  p.logits_in = buf.logits_in;
  p.padding = buf.padding;
  p.weights = buf.weights;
  p.indices = buf.indices;
  p.lse = buf.lse;
  p.q_out = buf.q;
  p.rstd_out = buf.rstd;
  p.logits_out = buf.logits_out;
  p.mean_probs = buf.mean_probs;
  p.tokens_per_expert = buf.tokens_per_expert;
  p.prob_partials = buf.workspace + f.prob_partials;
  p.count_partials = reinterpret_cast<int*>(buf.workspace + f.count_partials);
  p.token_partials = reinterpret_cast<int*>(buf.workspace + f.token_partials);
  p.split_partials = buf.workspace + f.split_partials;
  p.counters = buf.counters != nullptr ? buf.counters : reinterpret_cast<unsigned*>(buf.workspace + f.counters);
  p.chunks = f.chunks;
  p.c = kernel_config(shape, opt, f.rp);
  if (mode == RouteMode::kLogits) {
    p.c.top_k = 0;
    p.c.num_groups = 1;
  }
  p.splits = f.splits;
  p.split_cols = f.split_cols;
  p.stage_cols = f.stage_cols;
  p.vec = scores && rows_aligned(buf.x, shape.d, buf.x_type);
  p.proj_vec = scores && proj_rows_aligned(buf.proj, p.norm_weight, shape.d);
  p.finishers = static_cast<int32_t>(f.finishers);
  p.proj_smem = f.proj_smem;
  p.anchor_smem = f.anchor_smem;
  p.bias_smem = f.bias_smem;
  p.warp_smem = f.warp_smem;
  p.warp_stride = static_cast<int32_t>(f.warp_floats);
  p.logit_stride = f.logit_stride;
  p.mma_splits = f.mma_splits;
  p.mma_sum_smem = f.mma_sum_smem;
  p.partial_chunks = f.partial_chunks;
  const bool tickets = mode != RouteMode::kLogits || f.splits > 1 || f.mma_splits > 1;
  if (buf.counters == nullptr && tickets) {
    plan.memset(p.counters, 0, static_cast<int64_t>(sizeof(unsigned)) * kRouteCounterWords);
  }
  if (f.anchor_hat >= 0) {
    plan_prepare(plan, buf.anchors, shape, f.rp, p.c.beta, p.c.eps, buf.workspace + f.anchor_hat);
  }
  plan.kernel(token_kernel(RouteKernel::kForward, mode, f.rp, buf.x_type), f.blocks, f.warps * kWarp, f.smem_bytes, p);
  return plan;
}

inline LaunchPlan route_backward_launches(RouteMode mode, const RouteShape& shape, const RouteOptions& opt,
                                      const RouteBackwardBuffers& buf, const DeviceLimits& limits) {
  LaunchPlan plan(KernelSource::kRoute);
  if (shape.tokens == 0) {  // no tokens: zero parameter gradients
    if (mode != RouteMode::kSelect && buf.need_param_grads) {
      plan.memset(buf.grad_proj, 0, static_cast<int64_t>(sizeof(float)) * shape.rank * shape.d);
      plan.memset(buf.grad_anchors, 0, static_cast<int64_t>(sizeof(float)) * shape.experts * shape.anchors * shape.rank);
      plan.memset(buf.grad_scale, 0, static_cast<int64_t>(sizeof(float)));
      if (opt.use_norm() && buf.norm_weight) {
        plan.memset(buf.grad_norm_weight, 0, static_cast<int64_t>(sizeof(float)) * shape.d);
      }
    }
    return plan;
  }
  const bool scores = mode != RouteMode::kSelect;
  if (scores && !supported_score_type(buf.x_type)) {
    plan.status = Status::kUnsupportedDType;
    return plan;
  }
  const int rp = route_padded_rank(shape.rank);
  const int64_t slots = backward_slots(mode, shape, limits);
  const BackwardWorkspace ws = backward_workspace(mode, shape, slots);
  const float* g = opt.use_norm() ? buf.norm_weight : nullptr;
  BackwardParams p{};
  p.grad_weights = buf.grad_weights;
  p.grad_mean_probs = buf.grad_mean_probs;
  p.grad_lse = buf.grad_lse;
  p.grad_logits = buf.grad_logits;
  p.x = buf.x;
  p.proj = buf.proj;
  p.g = g;
  p.anchors = buf.anchors;
  p.anchor_hat = buf.workspace + ws.anchor_hat;
  p.scale = buf.scale;
  p.logits_in = buf.logits_in;
  p.padding = buf.padding;
  p.indices = buf.indices;
  p.q_saved = buf.q;
  p.rstd_saved = buf.rstd;
  p.grad_x = buf.grad_x;
  p.grad_logits_out = buf.grad_logits_out;
  p.grad_q = buf.workspace + ws.grad_q;
  p.anchor_slots = buf.workspace + ws.anchor_slots;
  p.scale_slots = buf.workspace + ws.scale_slots;
  p.bad_index = buf.bad_index;
  p.c = kernel_config(shape, opt, rp);
  p.need_grad_x = scores && buf.need_grad_x;
  p.need_param_grads = scores && buf.need_param_grads;
  p.vec = scores && rows_aligned(buf.x, shape.d, buf.x_type) &&
          (!p.need_grad_x || rows_aligned(buf.grad_x, shape.d, buf.x_type));
  // Rank 32 with bf16 x: the column kernel's tensor-core pass computes dL/dx and the projection's
  // partials from one read of x (route_column_mma.cuh); the token kernel then saves grad_q only.
  const bool column_mma = backward_column_mma(mode, shape, buf.x_type) && p.vec;
  const bool column_grad_x = column_mma && p.need_grad_x;
  p.need_grad_x = p.need_grad_x && !column_grad_x;
  p.save_grad_q = p.need_param_grads || column_grad_x;
  p.mean_dot = column_grad_x && opt.use_norm() ? buf.workspace + ws.mean_dot : nullptr;
  const BackwardSmem sm = backward_smem(mode, shape, limits, p.need_param_grads);
  if (sm.bytes < 0) {
    plan.status = Status::kSharedMemoryTooSmall;
    return plan;
  }
  p.warp_stride = sm.warp_stride;
  p.warp_smem = sm.warp_smem;
  p.acc_smem = sm.acc_smem;
  p.anchor_smem = sm.anchor_smem;
  p.proj_smem = sm.proj_smem;
  unsigned* counters = reinterpret_cast<unsigned*>(buf.workspace + ws.counters);
  p.counters = p.need_param_grads ? counters : nullptr;
  p.counter_words = static_cast<int32_t>(backward_counter_words(shape.d));
  p.proj_vec = scores && proj_rows_aligned(buf.proj, g, shape.d);
  if (scores && sm.anchor_smem < 0) {  // anchors the token kernel cannot stage: normalised first
    plan_prepare(plan, buf.anchors, shape, rp, p.c.beta, p.c.eps, buf.workspace + ws.anchor_hat);
  }
  const int blocks = backward_blocks(shape.tokens, sm.blocks_per_sm, limits);
  plan.kernel(token_kernel(RouteKernel::kBackwardToken, mode, rp, buf.x_type), blocks, kThreads, sm.bytes, p);
  if (!p.need_param_grads && !column_grad_x) return plan;

  ColumnParams c{};
  c.x = buf.x;
  c.rstd = buf.rstd;
  c.grad_q = p.grad_q;
  c.partials = buf.workspace + ws.column_partials;
  c.anchor_slots = p.anchor_slots;
  c.scale_slots = p.scale_slots;
  c.proj = buf.proj;
  c.g = g;
  c.anchors = buf.anchors;
  c.acc_total = buf.workspace + ws.acc_total;
  c.grad_proj = buf.grad_proj;
  c.grad_norm_weight = buf.grad_norm_weight;
  c.grad_anchors = buf.grad_anchors;
  c.grad_scale = buf.grad_scale;
  c.counters = counters;
  c.vec = rows_aligned(buf.x, shape.d, buf.x_type);
  const int rc = rp < kGenericChunk ? rp : kGenericChunk;
  c.groups = static_cast<int32_t>(column_mma ? ceil_div(shape.d, static_cast<int64_t>(kColumnMmaGroupCols))
                                             : column_groups(shape.d, c.vec ? static_cast<int>(16 / score_elem_bytes(buf.x_type)) : 1));
  c.mma = column_mma;
  c.need_param_grads = p.need_param_grads;
  c.grad_x = column_grad_x ? buf.grad_x : nullptr;
  c.mean_dot = p.mean_dot;
  c.rank_chunks = column_mma ? 1 : rp / rc;
  c.anchor_units = p.need_param_grads
                       ? static_cast<int32_t>(ceil_div(static_cast<int64_t>(shape.experts) * shape.anchors * rp, kWarp))
                       : 0;
  const ColumnChunks chunks =
      column_chunks(shape.tokens, static_cast<int64_t>(c.groups) * c.rank_chunks, c.anchor_units, limits);
  c.tokens = shape.tokens;
  c.d = shape.d;
  c.chunk = chunks.size;
  c.slots = p.acc_smem >= 0 ? blocks : static_cast<int64_t>(blocks) * kWarpsPerBlock;
  c.chunks = chunks.count;
  c.rank = shape.rank;
  c.rp = rp;
  c.experts = shape.experts;
  c.anchors_per_expert = shape.anchors;
  c.beta = p.c.beta;
  c.eps = p.c.eps;
  c.use_norm = opt.use_norm();
  const int64_t column_blocks = static_cast<int64_t>(c.groups) * c.chunks * c.rank_chunks;
  plan.kernel(route_kernel(RouteKernel::kBackwardColumn, rc, buf.x_type),
              column_blocks + c.anchor_units, kColumnThreads, backward_column_smem_bytes(), c);
  return plan;
}

}  // namespace route
}  // namespace l2r
