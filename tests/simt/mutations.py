"""Catalogue of realistic GPU-bug mutations of the CUDA kernel sources (csrc/permute/cuda,
csrc/route/cuda and the headers they share: route math, the selection order, the rank switch), for
tests/simt/mutate.py.

Each mutation is one or more exact text replacements (anchored on source text: an anchor that no
longer occurs exactly `count` times is an error, so the catalogue fails loudly when the sources
change and must be re-targeted). A mutant is killed when the emulated kernel tests fail on it:
wrong results, a memcheck / racecheck report, a deadlock, a build error does NOT count (that is a
broken catalogue entry). Equivalent mutants (no observable change by construction) carry the
reason and are excluded from the kill rate.

Classes: barrier (deleted __syncthreads), syncwarp (deleted __syncwarp), shuffle (wrong mask,
lane, direction or step), tail (off-by-one loop bounds / guards), stride (wrong stride or index),
race (racy shared or global counters), lost-update (a plain += where partials were), state (state
carried across tokens / chunks replaced by the last value), dispatch (wrong kernel chosen),
alignment (vector path on rows that are not aligned for it), nan-order (NaN ranked above
numbers), init (missing initialisation).
"""
from __future__ import annotations

from dataclasses import dataclass

PERMUTE = "csrc/permute/cuda/permute_kernels.cu"
PERMUTE_PLAN = "csrc/permute/cuda/permute_launch_plan.h"  # grids, instantiations, memsets of the launches
ROUTE = "csrc/route/cuda/route_cuda.cu"
ROUTE_FWD = "csrc/route/cuda/route_forward.cuh"  # the one-launch forward kernel
ROUTE_DEVICE = "csrc/route/cuda/route_device.cuh"  # warp helpers of the route kernels
ROUTE_PLAN = "csrc/route/cuda/route_launch_plan.h"
ROUTE_MATH = "csrc/route/math/anchor_lse.h"
ROUTE_SELECTION = "csrc/route/math/selection.h"  # top-k insertion and group-limited selection
ORDER = "csrc/common/order.h"  # selection order of route's top-k and permute's capacity
SWITCH = "csrc/common/static_switch.h"

# The emulated tests that exercise each source: pytest invocations (arguments), in the order the
# mutation runner runs them; it stops at the first failure, so the path tests, quick and aimed at
# what the others miss, go first. test_route.py's emulated cases are its `simt` backend's.
PERMUTE_TESTS = [["tests/test_permute_cuda_emulated_paths.py", "tests/test_permute_cuda_emulated.py"]]
ROUTE_TESTS = [["tests/test_route_cuda_emulated_paths.py", "tests/test_route_cuda_emulated.py"],
               ["tests/test_route.py", "-k", "simt"]]
TESTS = {
    PERMUTE: PERMUTE_TESTS,
    PERMUTE_PLAN: PERMUTE_TESTS,
    ROUTE: ROUTE_TESTS,
    ROUTE_FWD: ROUTE_TESTS,
    ROUTE_DEVICE: ROUTE_TESTS,
    ROUTE_PLAN: ROUTE_TESTS,
    ROUTE_MATH: ROUTE_TESTS,
    ROUTE_SELECTION: ROUTE_TESTS,
    SWITCH: ROUTE_TESTS,
    ORDER: ROUTE_TESTS + PERMUTE_TESTS,
}


@dataclass(frozen=True)
class Mutation:
    id: str
    file: str
    edits: tuple  # ((anchor, replacement), ...), applied in order
    klass: str
    why: str
    count: int = 1  # how many times each anchor must occur (all occurrences are replaced)
    equivalent: str | None = None


def M(id, file, find, replace, klass, why, count=1, equivalent=None, more=()):
    return Mutation(id, file, ((find, replace),) + tuple(more), klass, why, count, equivalent)


CATALOGUE: list[Mutation] = [
    # ------------------------------------------------------------------ permute: dispatch plan
    M("permute.rank.no_barrier", PERMUTE,
      "  s_expert[tid] = e;\n  __syncthreads();\n", "  s_expert[tid] = e;\n",
      "barrier", "chunk ranks read s_expert before every thread of the chunk stored its expert"),
    M("permute.rank.last_row_skipped", PERMUTE,
      "  for (int i = 0; i < kChunk; ++i) {\n    if (s_expert[i] == e) {",
      "  for (int i = 0; i < kChunk - 1; ++i) {\n    if (s_expert[i] == e) {",
      "tail", "off-by-one: the chunk's last row never counts as an earlier or a later row"),
    M("permute.rank.self_counted", PERMUTE,
      "      if (i < tid) ++before;", "      if (i <= tid) ++before;",
      "tail", "off-by-one: a row counts itself among the earlier rows of its expert"),
    M("permute.rank.hist_plus_eq", PERMUTE,
      "  if (last) hist[static_cast<int64_t>(blockIdx.x) * experts + e] = before + 1;",
      "  hist[static_cast<int64_t>(blockIdx.x) * experts + e] += 1;",
      "lost-update", "every row of a chunk adds 1 to the chunk histogram with a plain += (the issue's "
      "shortcut: right in an emulator that never interleaves a read-modify-write, a lost update on a GPU)"),
    M("permute.rank.flag_not_set", PERMUTE,
      "    if (v < 0 && error_flag != nullptr) *error_flag = 1;\n", "",
      "init", "an out-of-range index is dropped silently"),
    M("permute.rank.block_dim_index", PERMUTE,
      "  const int64_t r = static_cast<int64_t>(blockIdx.x) * kChunk + tid;\n  int32_t e = -1;",
      "  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + tid;\n  int32_t e = -1;",
      "stride", "row index from blockDim.x instead of the chunk size",
      equivalent="the launch uses kChunk threads per block, so blockDim.x == kChunk at every launch"),
    M("permute.scan.shfl_down", PERMUTE,
      "const int64_t u = __shfl_up_sync(0xffffffffu, incl, o);",
      "const int64_t u = __shfl_down_sync(0xffffffffu, incl, o);",
      "shuffle", "inclusive scan shuffles the wrong way"),
    M("permute.scan.no_lane_guard", PERMUTE,
      "        if (lane >= o) incl += u;", "        incl += u;",
      "shuffle", "shfl_up returns a lane's own value below the offset: adding it double counts"),
    M("permute.scan.carry_lane30", PERMUTE,
      "      carry += __shfl_sync(0xffffffffu, incl, 31);", "      carry += __shfl_sync(0xffffffffu, incl, 30);",
      "shuffle", "the running carry takes lane 30's inclusive sum: a step of 32 chunks loses its last one"),
    M("permute.scan.tail_unguarded", PERMUTE,
      "      const int64_t v = b < chunks ? hist[b * experts + e] : 0;",
      "      const int64_t v = hist[b * experts + e];",
      "tail", "the last step of 32 chunks reads past the histogram"),
    M("permute.scan.expert_split_floor", PERMUTE,
      "  const int64_t per = cdiv(experts, blockDim.x);", "  const int64_t per = experts / blockDim.x;",
      "tail", "experts split over the scan threads with a floor: the remainder is never scanned"),
    M("permute.scan.no_barrier_before_scan", PERMUTE,
      "  s_sum[tid] = mine;\n  __syncthreads();\n", "  s_sum[tid] = mine;\n",
      "barrier", "the block scan reads s_sum before every thread stored its share"),
    M("permute.scan.no_barrier_in_scan", PERMUTE,
      "    const int64_t u = tid >= o ? s_sum[tid - o] : 0;\n    __syncthreads();\n",
      "    const int64_t u = tid >= o ? s_sum[tid - o] : 0;\n",
      "barrier", "Hillis-Steele step writes s_sum while other threads still read the previous step"),
    M("permute.scan.total_by_thread0", PERMUTE,
      "  if (tid == static_cast<int>(blockDim.x) - 1) offsets[experts] = s_sum[tid];",
      "  if (tid == 0) offsets[experts] = s_sum[tid];",
      "stride", "the grand total is taken from the first thread's inclusive sum"),
    M("permute.finalize.capacity_off_by_one", PERMUTE,
      "  row_map[r] = (capacity >= 0 && p >= capacity) ? -1 : offsets[e] + p;",
      "  row_map[r] = (capacity >= 0 && p > capacity) ? -1 : offsets[e] + p;",
      "tail", "one row too many is kept per expert under a capacity"),
    M("permute.group.block_stride", PERMUTE,
      "    if (row >= 0 && row < n) grouped[row] = r;\n  }",
      "    if (row >= 0 && row < n) grouped[row] = r;\n    r -= static_cast<int64_t>(gridDim.x - 1) * blockDim.x;\n  }",
      "stride", "grid-stride loop advancing by one block: blocks write the same rows"),
    M("permute.select.no_barrier_after_total", PERMUTE,
      "      const int64_t total = s_red[0];\n      __syncthreads();\n",
      "      const int64_t total = s_red[0];\n",
      "barrier", "the next bit's partial counts overwrite s_red[0] before every thread read the total"),
    M("permute.select.no_barrier_in_reduce", PERMUTE,
      "        if (tid < s) s_red[tid] += s_red[tid + s];\n        __syncthreads();\n",
      "        if (tid < s) s_red[tid] += s_red[tid + s];\n",
      "barrier", "tree reduction without a barrier between levels"),
    M("permute.select.tie_kept", PERMUTE,
      "    if (capacity == 0 || capacity_key(w[r], r) < threshold) expert[r] = -1;",
      "    if (capacity == 0 || capacity_key(w[r], r) <= threshold) expert[r] = -1;",
      "tail", "the capacity-th row itself is dropped"),
    # ------------------------------------------------------------------ permute: rows
    M("permute.rows.8_byte_to_vec16", PERMUTE_PLAN,
      "  const int bytes = a % 16 == 0 ? 16 : a % 8 == 0 ? 8 : a % 4 == 0 ? 4 : 2;",
      "  const int bytes = a % 8 == 0 ? 16 : a % 4 == 0 ? 4 : 2;",
      "alignment", "8-byte aligned rows sent to the 16-byte copy kernel (x86 does not fault; a GPU raises "
      "misaligned address)"),
    M("permute.rows.2_byte_to_vec4", PERMUTE_PLAN,
      "  const int bytes = a % 16 == 0 ? 16 : a % 8 == 0 ? 8 : a % 4 == 0 ? 4 : 2;",
      "  const int bytes = a % 16 == 0 ? 16 : a % 8 == 0 ? 8 : a % 2 == 0 ? 4 : 2;",
      "alignment", "2-byte aligned rows sent to the 4-byte copy kernel"),
    M("permute.rows.padding_not_zeroed", PERMUTE,
      "      const V zero{};\n      for (int64_t i = lane; i < vecs; i += tpr) dst[i] = zero;\n",
      "      const V zero{};\n",
      "init", "padding rows keep whatever the output buffer held"),
    M("permute.rows.tail_vector", PERMUTE,
      "      for (int64_t i = lane; i < vecs; i += tpr) dst[i] = s[i];",
      "      for (int64_t i = lane; i < vecs - 1; i += tpr) dst[i] = s[i];",
      "tail", "the last vector of every copied row is skipped"),
    M("permute.rows.token_divisor", PERMUTE_PLAN,
      "                InverseParams{row_map, src_scratch, n, k, num_rows});",
      "                InverseParams{row_map, src_scratch, n, 1, num_rows});",
      "stride", "flat (token, slot) index used as the token"),
    M("permute.rows.layout_wider", PERMUTE_PLAN,
      "  while (tpr < kRowThreads && tpr < units_per_row) tpr <<= 1;",
      "  while (tpr < kRowThreads && tpr <= units_per_row) tpr <<= 1;",
      "stride", "threads per row rounded one power of two too far",
      equivalent="only leaves more lanes of a row idle: every row is still copied / reduced by the same "
                 "per-lane loops, in the same order"),
    M("permute.gather.stride_d", PERMUTE,
      "        const P p = reinterpret_cast<const P*>(y + row * y_stride)[i];",
      "        const P p = reinterpret_cast<const P*>(y + row * d)[i];",
      "stride", "gather reads y rows at stride d instead of y_stride (a strided y)"),
    M("permute.gather.rows_unchecked", PERMUTE,
      "        if (row < 0 || row >= y_rows) continue;\n        const acc_t wj",
      "        if (row < 0) continue;\n        const acc_t wj",
      "tail", "slots whose row lies past y_rows are read instead of skipped"),
    M("permute.gather.last_slot_only", PERMUTE,
      "        for (int m = 0; m < N; ++m) acc[m] += wj * to_acc(p.v[m]);",
      "        for (int m = 0; m < N; ++m) acc[m] = wj * to_acc(p.v[m]);",
      "state", "the reduction keeps only the last slot of the token"),
    M("permute.gather.f64_as_f32", PERMUTE_PLAN,
      "  plan.kernel(permute_kernel(PermuteKernel::kGatherReduce, static_cast<int>(dtype), n),",
      "  plan.kernel(permute_kernel(PermuteKernel::kGatherReduce, static_cast<int>(dtype == DType::kFloat64 ? DType::kFloat32 : dtype), n),",
      "dispatch", "float64 dispatched to the float kernel"),
    M("permute.gather.stride_not_checked", PERMUTE_PLAN,
      "  const bool ok = d % wide == 0 && stride % wide == 0 &&",
      "  const bool ok = d % wide == 0 &&",
      "alignment", "vector loads chosen without checking the row stride: rows after the first are misaligned"),
    M("permute.grad_rows.slot_as_token", PERMUTE,
      "    const P* g = reinterpret_cast<const P*>(grad_out + (r / k) * d);",
      "    const P* g = reinterpret_cast<const P*>(grad_out + (r % k) * d);",
      "stride", "grad_y rows take the slot number as the token"),
    M("permute.grad_rows.f64_as_f32", PERMUTE_PLAN,
      "    plan.kernel(permute_kernel(PermuteKernel::kGradRows, static_cast<int>(dtype), pw),",
      "    plan.kernel(permute_kernel(PermuteKernel::kGradRows, static_cast<int>(dtype == DType::kFloat64 ? DType::kFloat32 : dtype), pw),",
      "dispatch", "float64 backward rows dispatched to the float kernel"),
    M("permute.grad_w.half_warp_tree", PERMUTE,
      "    for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffffu, s, o);",
      "    for (int o = 8; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffffu, s, o);",
      "shuffle", "the shuffle tree starts one step short: lanes 16-31 never reach lane 0"),
    M("permute.grad_w.half_mask", PERMUTE,
      "    for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffffu, s, o);",
      "    for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0x0000ffffu, s, o);",
      "shuffle", "shuffle mask naming half the warp while all 32 lanes call it"),
    M("permute.backward.src_not_reset", PERMUTE_PLAN,
      "    plan.memset(src_scratch, 0xff, y_rows * 8);\n", "",
      "init", "the inverse map is not reset: rows nobody routes to keep stale sources"),
    M("route.fwd.no_syncwarp_before_selection", ROUTE_FWD,
      "    if (m == 0) smf(ws.total + t) = total;\n  }\n  __syncwarp();\n  // --- top-k",
      "    if (m == 0) smf(ws.total + t) = total;\n  }\n  // --- top-k",
      "syncwarp", "group-limited selection reads other lanes' selection keys without a __syncwarp after they "
      "were written"),
    M("route.fwd.no_syncwarp_before_topk", ROUTE_FWD,
      "    previous = best;\n  }\n  __syncwarp();\n",
      "    previous = best;\n  }\n",
      "syncwarp", "the weights read the selected experts (written by the token's first lane) without a "
      "__syncwarp after the top-k rounds"),
    M("route.fwd.no_syncwarp_end_of_token", ROUTE_FWD,
      "      route_chunk(c, t0, ntok);\n      __syncthreads();  // the next chunk reuses every warp's scratch\n",
      "      route_chunk(c, t0, ntok);\n",
      "barrier", "the next chunk overwrites the per-warp scratch while other warps still read this chunk's "
      "sums (the old per-token __syncwarp's role, per chunk in the tiled kernel)"),
    M("route.fwd.no_barrier_before_partials", ROUTE_FWD,
      "      select_tile<TT>(p, ws, t0, ntok, lane);\n      __syncthreads();\n",
      "      select_tile<TT>(p, ws, t0, ntok, lane);\n",
      "barrier", "chunk partials read other warps' sums before they finished"),
    M("route.fwd.block_wide_counts", ROUTE_FWD,
      "    smi(ws.counts + e) = n;",
      "    smi(warp_scratch(p, TT, 0).counts + e) += n;  // one counter array per block",
      "lost-update", "all warps of a block add into one shared counts[] with a plain += (the issue's shortcut)",
      more=(("      n += smi(ws.counts + e);", "      if (w == 0) n += smi(ws.counts + e);"),)),
    M("route.fwd.prob_sum_last_token", ROUTE_FWD,
      "      s += rm::balance_prob(smf(ws.probs + u * LS + e), smf(ws.total + u), p.c.sigmoid);",
      "      s = rm::balance_prob(smf(ws.probs + u * LS + e), smf(ws.total + u), p.c.sigmoid);",
      "state", "mean_probs from the warp's last token only (state across tokens)"),
    M("route.fwd.init_tail", ROUTE_FWD,
      "  for (int e = lane; e < E; e += kWarp) {\n    float s = 0.f;\n    int n = 0;",
      "  for (int e = lane; e < E - 1; e += kWarp) {\n    float s = 0.f;\n    int n = 0;",
      "init", "the last expert's per-warp sums are never written (stale scratch from the previous chunk)"),
    M("route.fwd.token_stride_one", ROUTE_FWD,
      "    *t0 = p.chunks.begin(c) + static_cast<int64_t>(warp) * TT;",
      "    *t0 = p.chunks.begin(c) + static_cast<int64_t>(warp);",
      "stride", "warp tiles start one token apart instead of a tile apart: warps process each other's tokens"),
    M("route.fwd.q_out_padded", ROUTE_FWD,
      "  for (int idx = lane; idx < ntok * rank; idx += kWarp) {\n    const int t = idx / rank, i = idx % rank;",
      "  for (int idx = lane; idx < ntok * rp; idx += kWarp) {\n    const int t = idx / rp, i = idx % rp;",
      "tail", "padded rank rows written to q (into the next token's q, past the end for the last)"),
    M("route.fwd.mean_over_chunks", ROUTE_FWD,
      "      tokens += p.token_partials[c];", "      tokens += 1;",
      "stride", "mean over chunks instead of tokens"),
    M("route.fwd.no_release_fence", ROUTE_FWD,
      "    __threadfence();  // release: this block's writes before the ticket\n", "",
      "race", "the last block may read chunk partials another block wrote before its ticket was visible"),
    M("route.fwd.no_acquire_fence", ROUTE_FWD,
      "    __threadfence();  // acquire: the other blocks' writes before their tickets\n", "",
      "race", "the last block reads the other blocks' partials without ordering them after their tickets"),
    M("route.fwd.split_sum_one", ROUTE_FWD,
      "      for (int u = 0; u < p.splits; ++u) {", "      for (int u = 0; u < 1; ++u) {",
      "tail", "the d-split path keeps the first split's partial sums only"),
    M("route.fwd.ticket_not_wrapped", ROUTE_FWD,
      "    const unsigned ticket = atomicInc(counters + word, tickets - 1);  // wraps back to 0",
      "    const unsigned ticket = atomicAdd(counters + word, 1u);",
      "state", "the ticket counter is left at the block count: the next launch finds no last block"),
    M("route.warp_max_key.shfl_down", ROUTE_FWD,
      "      const uint64_t other = __shfl_xor_sync(kFullMask, best, o);",
      "      const uint64_t other = __shfl_down_sync(kFullMask, best, o);",
      "shuffle", "top-k arg-max by a down-shuffle tree: only the token's first lane ends with the winner"),
    M("route.warp_sum.short_tree", ROUTE_DEVICE,
      "  for (int off = kWarp / 2; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);",
      "  for (int off = kWarp / 2; off > 1; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);",
      "shuffle", "butterfly sum one step short"),
    M("route.fwd.transpose_reduce_short", ROUTE_FWD,
      "      v[0] += __shfl_xor_sync(kFullMask, v[0], O);\n      transpose_reduce_step<1, O / 2>(v, lane);",
      "      transpose_reduce_step<1, O / 2>(v, lane);",
      "shuffle", "the projection's transposed butterfly skips its plain steps: partial sums of part of the warp"),
    M("route.topk.previous_inclusive", ROUTE_FWD,
      "      if (key < previous && key > best) {", "      if (key <= previous && key > best) {",
      "tail", "a top-k round may take the previous round's winner again"),
    M("route.order.nan_first", ORDER,
      "  uint32_t ordered = 0;  // NaN: below every number", "  uint32_t ordered = 0xffffffffu;  // NaN",
      "nan-order", "NaN keys ranked above every number (route top-k and permute capacity share the order)"),
    # ------------------------------------------------------------------ route: group-limited top-k
    M("route.select.group_score_always_max", ROUTE_SELECTION,
      "  return policy == GroupScore::kMax ? best : best + second;",
      "  return best;",
      "dispatch", "top2_sum (DeepSeek-V3) scores a group by its best expert alone, as max (V2) does"),
    M("route.select.best_two_drops_second", ROUTE_SELECTION,
      "    } else if (key > second) {\n      second = key;\n    }",
      "    }",
      "init", "a group's second-best key is only ever the previous best: a key between the two is lost"),
    M("route.select.group_mask_ignored", ROUTE_SELECTION,
      "  return num_groups <= 1 || ((kept_group_mask >> group_of(expert, experts, num_groups)) & 1u);",
      "  return true;",
      "dispatch", "group-limited top-k selects from every group, as if topk_groups == num_groups"),
    M("route.math.anchor_tail", ROUTE_MATH,
      "  V lsum = V(0);\n  for (int h = 0; h < anchors; ++h) {",
      "  V lsum = V(0);\n  for (int h = 0; h < anchors - 1; ++h) {",
      "tail", "the anchor log-sum-exp drops the last anchor"),
    M("route.rows_aligned.8_bytes", ROUTE_PLAN,
      "  return reinterpret_cast<uintptr_t>(x) % 16 == 0 && (d * elem) % 16 == 0;",
      "  return reinterpret_cast<uintptr_t>(x) % 8 == 0 && (d * elem) % 8 == 0;",
      "alignment", "8-byte aligned x rows sent to the 16-byte vector loads"),
    M("route.dispatch.logits_as_route", ROUTE,
      "        constexpr RouteMode kMode = kLogits ? RouteMode::kLogits : RouteMode::kRoute;",
      "        constexpr RouteMode kMode = RouteMode::kRoute;",
      "dispatch", "route_logits dispatched to the routing kernels"),
    M("route.dispatch.rank16_as_32", SWITCH,
      "    case 16: { constexpr int CONST_NAME = 16; __VA_ARGS__ } break; \\",
      "    case 16: { constexpr int CONST_NAME = 32; __VA_ARGS__ } break; \\",
      "dispatch", "rank 16 dispatched to the rank-32 kernels"),
    M("route.prepare.no_padding_zero", ROUTE,
      "    proj_w[n] = k < rank ? (g ? proj[k * d + i] * g[i] : proj[k * d + i]) : 0.f;",
      "    proj_w[n] = g ? proj[k * d + i] * g[i] : proj[k * d + i];",
      "tail", "padded projection rows read past proj instead of being zero"),
    M("route.project.no_swizzle", ROUTE_FWD,
      "  return ((g ^ ((g >> 3) & 1)) << 2) | (col & 3);",
      "  return col;",
      "dispatch", "the staged projection without its granule swizzle (replaces route.project_width.vec8_bf16: "
      "ProjectWidth went with the old per-token projection)",
      equivalent="staging and reading use the same column map, so only shared-memory bank conflicts change"),
    # ------------------------------------------------------------------ route: backward
    M("route.bwd.no_syncwarp_after_probs", ROUTE,
      "      for (int e = lane; e < E; e += kWarp) probs[e] = rm::routing_prob(logits[e], probs[e], st.sum, p.c.sigmoid);\n      __syncwarp();\n",
      "      for (int e = lane; e < E; e += kWarp) probs[e] = rm::routing_prob(logits[e], probs[e], st.sum, p.c.sigmoid);\n",
      "syncwarp", "lane 0 reads other lanes' probabilities before a __syncwarp",
      equivalent="token_logit_grads reads only the lane's own probabilities (and writes its own dL/dp) until "
                 "its own __syncwarp; lane 0 reads the selected experts' probabilities after it"),
    M("route.bwd.no_syncwarp_after_selected", ROUTE,
      "                                             selected_sum, p.c.normalize);\n      }\n    }\n  }\n  __syncwarp();\n",
      "                                             selected_sum, p.c.normalize);\n      }\n    }\n  }\n",
      "syncwarp", "lanes read dL/dp that lane 0 just updated without a __syncwarp"),
    M("route.bwd.grad_scale_last_token", ROUTE,
      "      if (lane == 0) grad_scale += rm::scale_grad(ds_u_sum, qc);",
      "      if (lane == 0) grad_scale = rm::scale_grad(ds_u_sum, qc);",
      "state", "grad_scale keeps only the warp's last token (state across tokens)"),
    M("route.bwd.acc_last_token", ROUTE,
      "            if (acc) acc[off] = lanes::fmadd(ds_q, q[i], acc[off]);",
      "            if (acc) acc[off] = lanes::fmadd(ds_q, q[i], 0.f);",
      "state", "anchor accumulators keep only the warp's last token"),
    M("route.bwd.scalar_tail", ROUTE,
      "            const float gh = hat_grad(i);", "            const float gh = i + 1 < d ? hat_grad(i) : 0.f;",
      "tail", "scalar path drops the row's last column from mean(dL/dx_hat * x_hat)"),
    M("route.bwd.hat_grad_granules_unswapped", ROUTE,
      "      const float4 hi = swap ? a : b;",
      "      const float4 hi = b;",
      "stride", "lanes that read their two projection granules in swapped order keep the wrong upper one"),
    M("route.column.tail_unclamped", ROUTE,
      "  const int64_t t1 = t0 + chunk < tokens ? t0 + chunk : tokens;",
      "  const int64_t t1 = t0 + chunk;",
      "tail", "the last column chunk runs past the last token"),
    M("route.column.chunk_size_fixed", ROUTE,
      "  const int64_t t0 = blockIdx.y * chunk;", "  const int64_t t0 = blockIdx.y * kMinColumnChunk;",
      "stride", "column chunks assumed to be kMinColumnChunk tokens"),
    M("route.finalize.last_chunk_only", ROUTE,
      "        for (int c = warp; c < p.chunks; c += kFinalizeWarps) m += p.column_partials[",
      "        for (int c = warp; c < p.chunks; c += kFinalizeWarps) m = p.column_partials[",
      "state", "the finalize keeps only each warp's last column chunk (re-anchored on the tree finalize)"),
    M("route.finalize.last_slot_dropped", ROUTE,
      "      for (int64_t sl = warp; sl < slots; sl += kFinalizeWarps) s += p.anchor_slots[sl * acc_size + o];",
      "      for (int64_t sl = warp; sl < slots - 1; sl += kFinalizeWarps) s += p.anchor_slots[sl * acc_size + o];",
      "tail", "the anchor gradient drops the last slot (re-anchored on the tree finalize)"),
    M("route.finalize.last_warp_sum_dropped", ROUTE,
      "  for (int w = 1; w < kFinalizeWarps; ++w) s += smf(4 + w * kWarp + lane);",
      "  for (int w = 1; w < kFinalizeWarps - 1; ++w) s += smf(4 + w * kWarp + lane);",
      "tail", "the finalize's warp sums drop the last warp's stripe of chunks and slots"),
    M("route.finalize.no_ticket", ROUTE,
      "  if (!last_ticket(p.counters, 0, gridDim.x)) return;",
      "  if (blockIdx.x != 0) return;",
      "race", "the anchor rows are finished by block 0, not by the block that finishes last"),
    M("route.finalize.ticket_not_zeroed", ROUTE,
      "  if (p.counters != nullptr && start == 0) *p.counters = 0u;  // the finalize kernel's ticket word\n",
      "",
      "init", "the finalize's ticket word is left as the workspace held it"),
    M("route.bwd.block_slot_drops_warp", ROUTE,
      "          for (int w = 1; w < kWarpsPerBlock; ++w) s += warp_acc[w * acc_size + i];",
      "          for (int w = 1; w < kWarpsPerBlock - 1; ++w) s += warp_acc[w * acc_size + i];",
      "tail", "a block's anchor slot drops its last warp's accumulators"),
    M("route.bwd.block_slot_no_barrier", ROUTE,
      "        if (lane == 0) logits[0] = grad_scale;  // (the warp's scratch is free after its last token)\n        __syncthreads();\n",
      "        if (lane == 0) logits[0] = grad_scale;  // (the warp's scratch is free after its last token)\n",
      "barrier", "a block adds its warps' accumulators before every warp finished its tokens"),
]


def by_id() -> dict[str, Mutation]:
    out = {}
    for m in CATALOGUE:
        assert m.id not in out, f"duplicate mutation id {m.id}"
        out[m.id] = m
    return out


# A fixed sample for CI (within 5 minutes on a 2-core machine): one of each class the issue saw
# survive (lost update, state across tokens, paths never run: stride, misaligned vector, float64
# dispatch; NaN ordering) plus a deleted barrier and a deleted __syncwarp.
CI_SAMPLE = [
    "permute.rank.hist_plus_eq",
    "permute.gather.stride_d",
    "permute.rows.8_byte_to_vec16",
    "permute.gather.f64_as_f32",
    "permute.scan.no_barrier_in_scan",
    "route.fwd.block_wide_counts",
    "route.bwd.grad_scale_last_token",
    "route.order.nan_first",
    "route.fwd.no_syncwarp_end_of_token",
]
