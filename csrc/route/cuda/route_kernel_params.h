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
constexpr int kWarpsPerBlock = 4;
constexpr int kThreads = kWarp * kWarpsPerBlock;
constexpr int kMaxForwardBlocks = 1024;
constexpr int kMaxBackwardBlocks = 256;
constexpr int kColumnThreads = 256;
constexpr int kMaxColumnChunks = 64;
constexpr int kMinColumnChunk = 64;
constexpr int kGenericChunk = 8;  // rank chunk of the generic (r > 32) kernels
constexpr int kElementwiseThreads = 256;
constexpr int kMaxElementwiseBlocks = 1024;

// Minimum resident blocks per SM for __launch_bounds__ (R: the template rank, 0 = generic).
// Stating it matters: with a thread bound alone ptxas picks a register budget by its own occupancy
// heuristic and spills to reach it. Four blocks (a 128-register budget) fit rank 1 and the
// backward's small ranks; the forward at ranks 2-8 (projection, scoring and group-limited selection
// state) just exceeds 128 and gets three (168); large ranks keep all their accumulators in
// registers with two. The plan also keeps the optional shared-memory arrays within 1 / min-blocks
// of the SM's shared memory.
L2R_HD constexpr int forward_min_blocks(int R) { return (R == 0 || R >= 16) ? 2 : (R >= 2 ? 3 : 4); }
L2R_HD constexpr int backward_min_blocks(int R) { return (R == 0 || R >= 16) ? 2 : 4; }
L2R_HD constexpr int template_rank(int rp) { return rp > 32 ? 0 : rp; }

// route_prepare_kernel: proj_w = proj * g (zero rows past r), anchor_hat = coef(|a|) a transposed.
struct PrepareParams {
  const float* proj;     // [r, d]
  const float* g;        // [d] or null
  const float* anchors;  // [E, H, r]
  float* proj_w;         // [rp, d]
  float* anchor_hat;     // [rp, H, E]
  int64_t d;
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

struct ForwardParams {
  const void* x;
  const float* proj_w;      // [rp, d]
  const float* anchor_hat;  // [rp, H, E]
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
  float* prob_partials;     // [chunks, E]
  int* count_partials;      // [chunks, E]
  int* token_partials;      // [chunks]: counted tokens
  TokenChunks chunks;
  KernelConfig c;
  bool vec;
  int64_t proj_smem, anchor_smem;  // offsets (floats) into shared memory, -1: read from global
  int64_t warp_smem, warp_stride;  // per-warp scratch: logits/probs [E] | exps [E] | prob sums [E]
                                   // | counts [E] | selected [k] | q [rp]
};

// route_forward_finalize_kernel: mean_probs and tokens_per_expert from the chunk partials.
struct ForwardFinalizeParams {
  const float* prob_partials;
  const int* count_partials;
  const int* token_partials;
  float* mean_probs;
  int64_t* tokens_per_expert;
  TokenChunks chunks;
  int experts;
};

struct BackwardParams {
  const float* grad_weights;     // [T, k] or nullptr
  const float* grad_mean_probs;  // [groups, E] pre-divided, or nullptr
  const float* grad_lse;         // [T] or nullptr
  const float* grad_logits;      // [T, E] (kLogits)
  const void* x;
  const float* proj_w;
  const float* anchor_hat;
  const float* scale;
  const float* logits_in;        // kSelect
  const bool* padding;
  const int64_t* indices;
  const float* q_saved;  // [T, r]
  const float* rstd_saved;
  void* grad_x;
  float* grad_logits_out;  // kSelect
  float* grad_q;           // [T, rp] for the column kernel
  float* anchor_slots;     // [slots, rp * H * E], one slot per warp
  float* scale_slots;      // [slots]
  int32_t* bad_index;
  KernelConfig c;
  bool vec, need_grad_x, need_param_grads;
  int64_t proj_smem, anchor_smem, acc_smem;  // shared-memory offsets (floats) or -1
  int64_t warp_smem, warp_stride;  // per-warp scratch: logits [E] | probs [E] | dL/dp [E] |
                                   // lsum [E] | shift [E] | q [rp] | grad_q [rp] |
                                   // sum dL/ds a_hat [rp] | lane partials [rp, 32] (generic rank)
};

// route_backward_column_kernel: partials[c, k, i] over chunk c's tokens; grid (columns, chunks,
// rank chunks).
struct ColumnParams {
  const void* x;
  const float* rstd;
  const float* grad_q;
  float* partials;
  int64_t tokens, d, chunk;
  int rp;
  bool use_norm;
};

// route_backward_finalize_kernel: parameter gradients from the partials and slots.
struct BackwardFinalizeParams {
  const float* column_partials;
  const float* anchor_slots;
  const float* scale_slots;
  const float* proj;
  const float* g;
  const float* anchors;
  float* acc_total;
  float* grad_proj;
  float* grad_norm_weight;
  float* grad_anchors;
  float* grad_scale;
  int64_t slots, d;
  int chunks, rank, rp, experts, anchors_per_expert;
  float beta, eps;
};

// The layout every compiler must agree on (LP64 host and 64-bit device).
L2R_FIELD_AT(PrepareParams, d, 40);
L2R_FIELD_AT(PrepareParams, anchors_per_expert, 60);
L2R_FIELD_AT(PrepareParams, eps, 68);
static_assert(sizeof(PrepareParams) == 72, "PrepareParams");
L2R_FIELD_AT(KernelConfig, rank, 24);
L2R_FIELD_AT(KernelConfig, beta, 44);
L2R_FIELD_AT(KernelConfig, use_norm, 64);
L2R_FIELD_AT(KernelConfig, num_groups, 68);
L2R_FIELD_AT(KernelConfig, group_score, 76);
static_assert(sizeof(KernelConfig) == 80, "KernelConfig");
L2R_FIELD_AT(ForwardParams, chunks, 128);
L2R_FIELD_AT(ForwardParams, c, 160);
L2R_FIELD_AT(ForwardParams, vec, 240);
L2R_FIELD_AT(ForwardParams, proj_smem, 248);
L2R_FIELD_AT(ForwardParams, warp_stride, 272);
static_assert(sizeof(ForwardParams) == 280, "ForwardParams");
L2R_FIELD_AT(ForwardFinalizeParams, chunks, 40);
L2R_FIELD_AT(ForwardFinalizeParams, experts, 72);
static_assert(sizeof(ForwardFinalizeParams) == 80, "ForwardFinalizeParams");
L2R_FIELD_AT(BackwardParams, bad_index, 144);
L2R_FIELD_AT(BackwardParams, c, 152);
L2R_FIELD_AT(BackwardParams, vec, 232);
L2R_FIELD_AT(BackwardParams, need_param_grads, 234);
L2R_FIELD_AT(BackwardParams, proj_smem, 240);
L2R_FIELD_AT(BackwardParams, warp_stride, 272);
static_assert(sizeof(BackwardParams) == 280, "BackwardParams");
L2R_FIELD_AT(ColumnParams, tokens, 32);
L2R_FIELD_AT(ColumnParams, rp, 56);
L2R_FIELD_AT(ColumnParams, use_norm, 60);
static_assert(sizeof(ColumnParams) == 64, "ColumnParams");
L2R_FIELD_AT(BackwardFinalizeParams, slots, 88);
L2R_FIELD_AT(BackwardFinalizeParams, chunks, 104);
L2R_FIELD_AT(BackwardFinalizeParams, anchors_per_expert, 120);
L2R_FIELD_AT(BackwardFinalizeParams, eps, 128);
static_assert(sizeof(BackwardFinalizeParams) == 136, "BackwardFinalizeParams");

}  // namespace route
}  // namespace l2r
