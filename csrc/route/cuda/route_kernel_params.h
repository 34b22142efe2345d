// What the CUDA route kernels (route_cuda.cu) and their launch plan (route_launch_plan.h) share: the
// launch constants and each kernel's parameter struct. Every kernel takes one of these structs by
// value; the nvcc path passes it with <<<>>>, the NVRTC path (l2r_cuda/jit) as raw bytes through
// cuLaunchKernel, so the host compiler and NVRTC must lay the structs out identically: fixed-width
// fields only, and the offsets pinned below (a layout that differs fails to compile on either side).
//
// Included by nvcc, NVRTC, g++ (the plan, the SIMT emulator): no host-only headers.
#pragma once

#include "../../common/hd.h"
#include "../route_options.h"

namespace l2r {
namespace route {

// What one launch computes: the fused router (x -> routing), the logits alone (route_logits), or
// the routing of given logits (route_select, the linear router's routing).
enum class RouteMode : int { kRoute = 0, kLogits = 1, kSelect = 2 };

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;  // backward token kernel
constexpr int kThreads = kWarp * kWarpsPerBlock;
constexpr int kColumnThreads = 256;
constexpr int kMaxColumnChunks = 64;
constexpr int kMinColumnChunk = 64;
constexpr int kGenericChunk = 8;  // rank chunk of the generic (r > 32) kernels
constexpr int kElementwiseThreads = 256;
constexpr int kColumnWarps = kColumnThreads / kWarp;
// Blocks of route_backward_column_kernel its __launch_bounds__ keeps resident per SM: the plan
// sizes its column chunks so that the grid is one wave of them.
constexpr int kColumnMinBlocks = 2;
// Tokens of a column chunk whose grad_q and rstd rows a block stages in shared memory at a time.
constexpr int kColumnTile = 256;
// The column kernel's tensor-core pass (route_column_mma.cuh): columns per warp (two MMA n-tiles:
// what keeps its fragments within the 128 registers of kColumnMinBlocks blocks) and per block.
constexpr int kColumnMmaWarpCols = 16;
constexpr int kColumnMmaGroupCols = kColumnMmaWarpCols * kColumnWarps;
constexpr int kMaxElementwiseBlocks = 1024;

// Minimum resident blocks per SM for the backward token kernel's __launch_bounds__ (R: the template
// rank, 0 = generic): four blocks (a 128-register budget) fit its small ranks, large ranks keep all
// their accumulators in registers with two. Rank 8 takes two since its grad_x tile (4 tokens' grad_q
// rows and dL/dx_hat: 64 floats) spills under 128 registers; at d = 2048 its staged projection and
// anchors (113 KB) allowed only two blocks per SM anyway.
L2R_HD constexpr int backward_min_blocks(int R) { return (R == 0 || R >= 8) ? 2 : 4; }
L2R_HD constexpr int template_rank(int rp) { return rp > 32 ? 0 : rp; }
// The backward token kernel's grad_x tiles: a warp takes its tokens in tiles of this many (its
// consecutive tokens, so every per-warp sum keeps its order) and computes their dL/dx in one pass over
// d, each staged projection granule it reads from shared memory serving every token of the tile.
// Templated ranks only (the tile's grad_q rows live in registers, R per token: 4 tokens up to rank
// 16, 2 at rank 32, where 4 rows would spill); the generic rank goes one by one.
L2R_HD constexpr int backward_tile_tokens(int R) { return R <= 0 ? 1 : R <= 16 ? 4 : 2; }
// Within a tile, a warp takes the anchors' part of the backward (the log-sum-exp over anchors and
// SIPS: every anchor read, every accumulator update) for pairs of tokens, each pair's dL/dl and
// anchor statistics in slots of its scratch; templated ranks up to 8 only (both tokens' q and
// sum dL/ds a_hat rows live in registers: at rank 16 and 32 they would not fit beside the rest).
L2R_HD constexpr int backward_pair_tokens(int R) { return R > 0 && R <= 8 ? 2 : 1; }
// The backward token kernel's per-warp scratch, in floats (BackwardParams::warp_stride's layout),
// one formula for the launch plan and the kernel: where the grad_x tile's grad_q rows start (on a
// 16-byte boundary), and the whole.
L2R_HD constexpr int64_t backward_tile_offset(int64_t experts, int rp) {
  return ((2 + 3 * backward_pair_tokens(template_rank(rp))) * experts + 3LL * rp + (rp > 32 ? 32LL * rp : 0) + 3) /
         4 * 4;
}
L2R_HD constexpr int64_t backward_warp_floats(int64_t experts, int rp) {
  return backward_tile_offset(experts, rp) + backward_tile_tokens(template_rank(rp)) * (rp + 1LL);
}

// ---- the forward kernel's token tiles ----------------------------------------------------------
// A warp projects a tile of tokens_per_warp(R) tokens at once, `tile_rows(R)` rows of the projection
// per pass over d (all rp rows for the templated ranks, 8 at a time for the generic one): each
// projection value it loads from shared memory serves every token of its tile, and the tile's
// accumulators (tokens x rows) stay within 64 registers. A block of `warps` warps routes a chunk of
// warps * tokens_per_warp tokens (route_options.h TokenChunks: never straddling a statistics group).
L2R_HD constexpr int tile_rows(int R) { return R > 0 ? R : kGenericChunk; }
L2R_HD constexpr int tokens_per_warp(int R) {
  return tile_rows(R) <= 8 ? 4 : 2;
}
constexpr int kMaxForwardWarps = 16;
// Warps per block at most for template rank R (the kernel's __launch_bounds__): 16 (a 128-register
// budget) for every rank but 32, whose 2 x 32 accumulators spill at 128 registers; it gets 8.
L2R_HD constexpr int forward_max_warps(int R) { return R == 32 ? kMaxForwardWarps / 2 : kMaxForwardWarps; }
// Few-token grids (fewer blocks than SMs): warps per block that leave each thread at most this many
// 16-byte loads of the staged projection (route_launch_plan.h forward_layout).
constexpr int kStageGranulesPerThread = 8;
// The rank-32 forward on tensor cores (bf16 x; route_forward.cuh route_chunks_mma, the plan's
// forward_mma_layout): a block of kMmaWarps warps = kMmaMGroups m-groups x kMmaKGroups k-groups
// projects kMmaChunks chunks of 16 tokens (one MMA m-tile each: 8 warps x 2 tokens, the
// chunks of tokens_per_warp(32)) over one range of d, with the float32 projection staged
// kMmaStageCols columns at a time (rows padded by 4 floats) and split into three bf16 parts.
// (4 x 2 with 2 m-tiles each rather than 2 x 4 with 4: 64 fewer accumulator and x registers per
// thread, which the rank-32 kernel, at 254 registers, needs to stay free of spills.)
constexpr int kMmaWarps = 8, kMmaMGroups = 4, kMmaKGroups = 2, kMmaTilesPerGroup = 2;
constexpr int kMmaChunks = kMmaMGroups * kMmaTilesPerGroup;
constexpr int kMmaTileTokens = 16;
constexpr int kMmaStageCols = 256, kMmaStageStride = kMmaStageCols + 4;
// Raw sums of a block's tokens: [kMmaChunks * 16][33] (32 ranks, then the sum of squares).
constexpr int kMmaSumStride = 33;
constexpr int kMmaSumFloats = kMmaChunks * kMmaTileTokens * kMmaSumStride;
static_assert(kMmaSumFloats % 4 == 0, "the splits' sums are added as float4s");
// Values per lane per m-tile after the pass over d: 16 accumulators (two m16n8 tiles' 4 x 4) and 2
// sums of squares (the lane's rows g and g + 8).
constexpr int kMmaLaneSums = 18;
// The staged projection, then (after the pass over d) the k-groups' partial sums: kMmaLaneSums
// values per lane per m-tile.
constexpr int kMmaReduceFloats = kMmaWarps * kMmaTilesPerGroup * kMmaLaneSums * kWarp;
constexpr int kMmaRegionFloats =
    32 * kMmaStageStride > kMmaReduceFloats ? 32 * kMmaStageStride : kMmaReduceFloats;
// Fewer tokens than this keep the CUDA-core path (decode: its d split spreads one chunk's columns).
constexpr int64_t kMmaMinTokens = kMmaChunks * kMmaTileTokens;

// Persistent counters: words a caller keeps zero between launches (every kernel leaves them zero).
// The forward uses [0] for its finished tiles and [1, 1 + kMaxSplitTiles) for the d-split tiles.
constexpr int kMaxSplitTiles = 64;
constexpr int kRouteCounterWords = 128;

// route_prepare_kernel: anchor_hat = coef(|a|) a transposed, for token kernels whose shared
// memory cannot hold the normalised anchors.
struct PrepareParams {
  const float* anchors;  // [E, H, r]
  float* anchor_hat;     // [rp, H, E]
  int rank, rp, experts, anchors_per_expert;
  float beta, eps;
};

// Sizes and options every route kernel reads (from RouteShape and RouteOptions, in float).
struct KernelConfig {
  int64_t tokens, d, seq_len;
  int rank, rp, experts, anchors, top_k;
  float beta, eps_norm, eps, tau, scaling;
  bool use_norm, sigmoid, normalize;
  int num_groups, topk_groups;
  GroupScore group_score;
};

// route_forward_kernel: x (or given logits) -> routing of every token and the statistics, in one
// launch. Projection sums of d-split tiles and the statistics' chunk partials go through the
// workspace; the block that finishes last (an atomic ticket on `counters`) adds the partials.
struct ForwardParams {
  const void* x;            // [T, d] (kRoute, kLogits)
  const float* proj;        // [r, d]
  const float* norm_weight; // [d] or nullptr: folded into the projection while it is staged
  const float* anchors;     // [E, H, r]: normalised while they are staged
  const float* anchor_hat;  // [rp, H, E] normalised by route_prepare_kernel when they do not fit
  const float* bias;        // [E] or nullptr
  const float* scale;       // [1]
  const float* logits_in;   // [T, E] (kSelect)
  const bool* padding;      // [T] or nullptr
  float* weights;
  int64_t* indices;
  float* lse;
  float* q_out;
  float* rstd_out;
  float* logits_out;        // [T, E] (kLogits)
  float* mean_probs;        // [groups, E]
  int64_t* tokens_per_expert;
  float* prob_partials;     // [chunks / partial_chunks, E]
  int* count_partials;      // [chunks / partial_chunks, E]
  int* token_partials;      // [chunks / partial_chunks]: counted tokens
  float* split_partials;    // [chunks, splits, tile tokens, rp + 1] (splits > 1)
  unsigned* counters;       // kRouteCounterWords, zero at launch and left zero
  TokenChunks chunks;
  KernelConfig c;
  int32_t splits;           // d splits per chunk (1: a block projects whole rows)
  int32_t split_cols;       // columns per split (a multiple of 256)
  int32_t stage_cols;       // columns of the projection staged in shared memory at a time
  int32_t vec;              // x rows are 16-byte vectors (aligned, d * sizeof(x) % 16 == 0)
  int32_t proj_vec;         // proj and norm_weight rows are float4 vectors
  int32_t finishers;        // tickets of counters[0]: blocks (splits == 1) or chunks (splits > 1)
  int32_t mma_splits;       // > 0: the tensor-core path (rank 32, bf16 x) with this many d splits
                            // (split_cols columns each) per block of kMmaChunks chunks
  int32_t mma_sum_smem;     // its raw sums [kMmaChunks * 16][kMmaSumStride] (shared float offset)
  // shared memory (float offsets): staged projection [tile_rows][stage_cols] (swizzled granules),
  // normalised anchors [rp][H][E], bias [E], per-warp scratch of warp_stride floats each
  int32_t proj_smem, anchor_smem, bias_smem, warp_smem, warp_stride, logit_stride;
  // Consecutive chunks summed into one statistics partial (in chunk order, by the one block that
  // routes them all): kMmaChunks on the tensor-core path when every statistics group is whole
  // blocks of chunks, else 1. The finishing block then adds chunks.per_seq / partial_chunks
  // partials per statistics group.
  int32_t partial_chunks;
};

struct BackwardParams {
  const float* grad_weights;     // [T, k] or nullptr
  const float* grad_mean_probs;  // [groups, E] pre-divided, or nullptr
  const float* grad_lse;         // [T] or nullptr
  const float* grad_logits;      // [T, E] (kLogits)
  const void* x;
  const float* proj;        // [r, d]: staged times g (zero rows to rp) when proj_smem >= 0
  const float* g;           // [d] norm weight folded into the projection, or nullptr
  const float* anchors;     // [E, H, r]: normalised and transposed while staged (anchor_smem >= 0)
  const float* anchor_hat;  // [rp, H, E] by route_prepare_kernel (anchor_smem < 0)
  const float* scale;
  const float* logits_in;        // kSelect
  const bool* padding;
  const int64_t* indices;
  const float* q_saved;  // [T, r]
  const float* rstd_saved;
  void* grad_x;
  float* grad_logits_out;  // kSelect
  float* grad_q;           // [T, rp] for the column kernel
  float* anchor_slots;     // [slots, rp * H * E]: one slot per block (per warp when the warps'
                           // accumulators do not fit in shared memory: acc_smem < 0)
  float* scale_slots;      // [slots]
  int32_t* bad_index;
  unsigned* counters;      // the column kernel's ticket words, zeroed here (or nullptr)
  KernelConfig c;
  bool vec, need_grad_x, need_param_grads;
  bool proj_vec;           // d % 4 == 0 and proj, g 16-byte aligned: staged as float4
  int32_t counter_words;   // words of counters this kernel zeroes (the column kernel's tickets)
  int64_t proj_smem, anchor_smem, acc_smem;  // shared-memory offsets (floats) or -1
  int64_t warp_smem, warp_stride;  // per-warp scratch: logits [E] | probs [E] | the pair's slots
                                   // [pair][dL/dl [E] | lsum [E] | shift [E]] | q [rp] | grad_q [rp] |
                                   // sum dL/ds a_hat [rp] | lane partials [rp, 32] (generic rank) |
                                   // from backward_tile_offset (16-byte aligned): the grad_x tile's
                                   // grad_q rows [tile][rp] and mean_dot [tile] (backward_warp_floats)
  bool save_grad_q;  // write grad_q for the column kernel (its parameter gradients, or its
                     // tensor-core dL/dx when need_grad_x is false here: route_column_mma.cuh)
  float* mean_dot;   // [T]: RMSNorm's <grad_q, q> / d of each token for the tensor-core pass's
                     // dL/dx (rank 32, with RMSNorm), or nullptr
};

// route_backward_column_kernel: the projection's gradient and, in the same launch, the finalize
// of every parameter gradient. A 1-D grid: blocks [0, groups * chunks * rank_chunks) write the
// column partials partials[c, k, i] of chunk c (column group, then chunk, then rank chunk from the
// block index); the block that takes its column group's last ticket (counters[1 + group]) adds the
// group's chunks into grad_proj and grad_norm_weight. The anchor_units blocks after them add the
// anchor slots of 32 accumulator elements each into acc_total, and the one that takes the last
// ticket of counters[0] finishes every anchor row and the scale.
struct ColumnParams {
  const void* x;
  const float* rstd;
  const float* grad_q;           // [T, rp]
  float* partials;               // [chunks, rp, d]
  const float* anchor_slots;     // [slots, rp * H * E]
  const float* scale_slots;      // [slots]
  const float* proj;
  const float* g;
  const float* anchors;
  float* acc_total;              // [E * H, rp]: the anchor accumulators summed over the slots
  float* grad_proj;
  float* grad_norm_weight;
  float* grad_anchors;
  float* grad_scale;
  unsigned* counters;            // 1 + groups words, zero at launch (the token kernel zeroes them), left zero
  int64_t tokens, d, chunk, slots;
  int32_t chunks, rank, rp, experts, anchors_per_expert;
  int32_t groups;                // column groups of 32 x-vector widths
  int32_t rank_chunks;           // rp / RC
  int32_t anchor_units;          // blocks of 32 anchor accumulator elements
  float beta, eps;
  bool use_norm;
  bool vec;  // x rows are 16-byte vectors (route_launch_plan.h rows_aligned)
  bool mma;  // rank 32, bf16 x rows of 16-byte vectors: the tensor-core pass of route_column_mma.cuh
             // (one rank chunk of all 32 rows; the <8, bf16> instantiation runs it)
  bool need_param_grads;  // false: the tensor-core pass writes dL/dx only (no partials, no tickets)
  void* grad_x;           // the tensor-core pass's dL/dx [T, d] (x's dtype), or nullptr
  const float* mean_dot;  // [T]: RMSNorm's mean_dot of each token for that dL/dx (the token
                          // kernel's BackwardParams::mean_dot), or nullptr without RMSNorm
};

// The layout every compiler must agree on (LP64 host and 64-bit device).
L2R_FIELD_AT(PrepareParams, rank, 16);
L2R_FIELD_AT(PrepareParams, eps, 36);
static_assert(sizeof(PrepareParams) == 40, "PrepareParams");
L2R_FIELD_AT(KernelConfig, rank, 24);
L2R_FIELD_AT(KernelConfig, beta, 44);
L2R_FIELD_AT(KernelConfig, use_norm, 64);
L2R_FIELD_AT(KernelConfig, num_groups, 68);
L2R_FIELD_AT(KernelConfig, group_score, 76);
static_assert(sizeof(KernelConfig) == 80, "KernelConfig");
L2R_FIELD_AT(ForwardParams, chunks, 176);
L2R_FIELD_AT(ForwardParams, c, 208);
L2R_FIELD_AT(ForwardParams, splits, 288);
L2R_FIELD_AT(ForwardParams, finishers, 308);
L2R_FIELD_AT(ForwardParams, mma_splits, 312);
L2R_FIELD_AT(ForwardParams, logit_stride, 340);
L2R_FIELD_AT(ForwardParams, partial_chunks, 344);
static_assert(sizeof(ForwardParams) == 352, "ForwardParams");
L2R_FIELD_AT(BackwardParams, bad_index, 160);
L2R_FIELD_AT(BackwardParams, c, 176);
L2R_FIELD_AT(BackwardParams, vec, 256);
L2R_FIELD_AT(BackwardParams, need_param_grads, 258);
L2R_FIELD_AT(BackwardParams, proj_vec, 259);
L2R_FIELD_AT(BackwardParams, counter_words, 260);
L2R_FIELD_AT(BackwardParams, proj_smem, 264);
L2R_FIELD_AT(BackwardParams, warp_stride, 296);
L2R_FIELD_AT(BackwardParams, save_grad_q, 304);
L2R_FIELD_AT(BackwardParams, mean_dot, 312);
static_assert(sizeof(BackwardParams) == 320, "BackwardParams");
L2R_FIELD_AT(ColumnParams, tokens, 120);
L2R_FIELD_AT(ColumnParams, chunks, 152);
L2R_FIELD_AT(ColumnParams, groups, 172);
L2R_FIELD_AT(ColumnParams, beta, 184);
L2R_FIELD_AT(ColumnParams, use_norm, 192);
L2R_FIELD_AT(ColumnParams, vec, 193);
L2R_FIELD_AT(ColumnParams, mma, 194);
L2R_FIELD_AT(ColumnParams, grad_x, 200);
L2R_FIELD_AT(ColumnParams, mean_dot, 208);
static_assert(sizeof(ColumnParams) == 216, "ColumnParams");

}  // namespace route
}  // namespace l2r
