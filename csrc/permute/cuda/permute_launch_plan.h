// The launch plans of the CUDA permute kernels (permute_kernels.cu), decided once for both
// executors (common/launch_plan.h): the nvcc-built kernels and l2r_cuda.jit's NVRTC build. Which
// instantiation (index type, vector width, element type), grids, scratch layout. Host code only,
// framework-free, header-only (the SIMT emulator builds permute_kernels.cu alone).
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "../../common/dtype.h"
#include "../../common/launch_plan.h"
#include "permute_kernel_params.h"

namespace l2r {
namespace permute {

// KernelRef.kernel of permute_kernels.cu. Template arguments: kRankScan arg0 = bytes of the index
// type (4, 8); kCopyRows arg0 = bytes of the copied vector (16, 8, 4, 2); kGatherReduce and
// kGradRows arg0 = DType, arg1 = elements per load (1 or 16 bytes' worth); kGradWeights arg0 =
// DType.
enum class PermuteKernel : int32_t {
  kRankScan = 0,
  kFinalize = 1,
  kGroup = 2,
  kSelect = 3,
  kInverse = 4,
  kCopyRows = 5,
  kGatherReduce = 6,
  kGradRows = 7,
  kGradWeights = 8,
};

constexpr DType kRowTypes[] = {DType::kFloat32, DType::kFloat64, DType::kFloat16, DType::kBFloat16};
constexpr int kCopyBytes[] = {16, 8, 4, 2};

inline KernelRef permute_kernel(PermuteKernel k, int arg0 = 0, int arg1 = 0) {
  return KernelRef{static_cast<int32_t>(k), arg0, arg1, 0};
}

inline int64_t element_bytes(DType t) { return t == DType::kFloat64 ? 8 : (t == DType::kFloat32 ? 4 : 2); }

// Elements per 16-byte load of type t (the wide instantiation of the row kernels).
inline int wide_width(DType t) { return static_cast<int>(16 / element_bytes(t)); }

// Every instantiation permute_kernels.cu's executor can launch (what NVRTC compiles).
inline std::vector<KernelRef> permute_kernels() {
  std::vector<KernelRef> all = {permute_kernel(PermuteKernel::kRankScan, 4), permute_kernel(PermuteKernel::kRankScan, 8),
                                permute_kernel(PermuteKernel::kFinalize),
                                permute_kernel(PermuteKernel::kGroup), permute_kernel(PermuteKernel::kSelect),
                                permute_kernel(PermuteKernel::kInverse)};
  for (int bytes : kCopyBytes) all.push_back(permute_kernel(PermuteKernel::kCopyRows, bytes));
  for (DType t : kRowTypes) {
    for (int n : {1, wide_width(t)}) {
      all.push_back(permute_kernel(PermuteKernel::kGatherReduce, static_cast<int>(t), n));
      all.push_back(permute_kernel(PermuteKernel::kGradRows, static_cast<int>(t), n));
    }
    all.push_back(permute_kernel(PermuteKernel::kGradWeights, static_cast<int>(t)));
  }
  return all;
}

// The C++ name of an instantiation (an NVRTC name expression).
inline std::string permute_kernel_name(const KernelRef& ref) {
  const std::string ns = "l2r::permute::";
  auto type = [](int32_t t) -> std::string {
    switch (static_cast<DType>(t)) {
      case DType::kFloat32: return "float";
      case DType::kFloat64: return "double";
      case DType::kFloat16: return "__half";
      case DType::kBFloat16: return "__nv_bfloat16";
    }
    return "?";
  };
  auto vector = [](int32_t bytes) -> std::string {
    return bytes == 16 ? "uint4" : bytes == 8 ? "uint2" : bytes == 4 ? "unsigned int" : "unsigned short";
  };
  const std::string n = std::to_string(ref.arg1);
  switch (static_cast<PermuteKernel>(ref.kernel)) {
    case PermuteKernel::kRankScan: return ns + "rank_scan_kernel<" + (ref.arg0 == 8 ? "int64_t" : "int32_t") + ">";
    case PermuteKernel::kFinalize: return ns + "finalize_kernel";
    case PermuteKernel::kGroup: return ns + "group_kernel";
    case PermuteKernel::kSelect: return ns + "select_kernel";
    case PermuteKernel::kInverse: return ns + "inverse_kernel";
    case PermuteKernel::kCopyRows: return ns + "copy_rows_kernel<" + vector(ref.arg0) + ">";
    case PermuteKernel::kGatherReduce: return ns + "gather_reduce_kernel<" + type(ref.arg0) + ", " + n + ">";
    case PermuteKernel::kGradRows: return ns + "grad_rows_kernel<" + type(ref.arg0) + ", " + n + ">";
    case PermuteKernel::kGradWeights: return ns + "grad_weights_kernel<" + type(ref.arg0) + ">";
  }
  return "";
}

// ---- layout --------------------------------------------------------------------------------------

inline int64_t align_bytes(int64_t b) { return (b + 255) / 256 * 256; }

inline int64_t capped_grid(int64_t blocks) { return blocks < kMaxGrid ? (blocks < 1 ? 1 : blocks) : kMaxGrid; }

// Rows are spread over blocks as groups of `tpr` threads (a power of two <= kRowThreads).
struct RowLayout {
  int tpr;
  int64_t grid;
};

inline RowLayout row_layout(int64_t rows, int64_t units_per_row) {
  int tpr = 1;
  while (tpr < kRowThreads && tpr < units_per_row) tpr <<= 1;
  return {tpr, capped_grid(cdiv(rows, kRowThreads / tpr))};
}

// Elements per load of the row kernels: 16 bytes when d, the stride and both pointers allow it.
inline int pack_width(DType t, const void* a, const void* b, int64_t stride, int64_t d) {
  const int wide = wide_width(t);
  const bool ok = d % wide == 0 && stride % wide == 0 && reinterpret_cast<uintptr_t>(a) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(b) % 16 == 0;
  return ok ? wide : 1;
}

// The counting sort's blocks: one per chunk of kChunk rows (at least one: its last block writes
// counts and offsets), grouped into segments of about sqrt(chunks) chunks, so that both levels of
// the multi-block scan (a segment's chunks, then the segments) are short.
struct PlanGrid {
  int64_t chunks, seg_chunks, segments;
};

inline PlanGrid plan_grid(int64_t n) {
  const int64_t chunks = n > 0 ? cdiv(n, kChunk) : 1;
  int64_t seg = 1;
  while (seg * seg < chunks) ++seg;
  return {chunks, seg, cdiv(chunks, seg)};
}

// int32 words of the control block permute_plan_launches takes, zeroed by the caller: the error
// flag, then the scan's tickets (the final one, one per segment).
inline int64_t plan_control_words(int64_t n) { return 2 + plan_grid(n).segments; }

// Bytes of scratch memory permute_plan_launches needs for n = T * k rows and E experts.
inline size_t plan_workspace_bytes(int64_t n, int64_t experts, bool with_weights) {
  const PlanGrid g = plan_grid(n);
  int64_t b = 2 * align_bytes(n * 4) + align_bytes(g.chunks * experts * 4) + align_bytes(g.segments * experts * 8) +
              align_bytes(experts * 8) + align_bytes((experts + 1) * 8);
  if (with_weights) b += align_bytes(n * 8);
  return static_cast<size_t>(b);
}

struct PlanScratch {
  int32_t* expert;
  int32_t* local;
  int32_t* hist;
  int64_t* seg;
  int64_t* counts;
  int64_t* starts;
  int64_t* grouped;
};

inline PlanScratch carve(void* workspace, int64_t n, int64_t experts, bool with_weights) {
  char* p = static_cast<char*>(workspace);
  const PlanGrid g = plan_grid(n);
  PlanScratch s{};
  s.expert = reinterpret_cast<int32_t*>(p);
  p += align_bytes(n * 4);
  s.local = reinterpret_cast<int32_t*>(p);
  p += align_bytes(n * 4);
  s.hist = reinterpret_cast<int32_t*>(p);
  p += align_bytes(g.chunks * experts * 4);
  s.seg = reinterpret_cast<int64_t*>(p);
  p += align_bytes(g.segments * experts * 8);
  s.counts = reinterpret_cast<int64_t*>(p);
  p += align_bytes(experts * 8);
  s.starts = reinterpret_cast<int64_t*>(p);
  p += align_bytes((experts + 1) * 8);
  s.grouped = with_weights ? reinterpret_cast<int64_t*>(p) : nullptr;
  return s;
}

// ---- plans ---------------------------------------------------------------------------------------

// Histogram + multi-block scan (one launch), then the row positions (a second one), over the rows
// of `in` (indices on pass 1, the masked experts after). tickets: the zeroed tickets of the control
// block (they wrap back to zero, so the second pass of a capacity plan reuses them).
inline void plan_counting_pass(LaunchPlan& plan, const void* in, int index_bytes, int64_t n, int64_t experts,
                               int64_t align, int64_t capacity, const int64_t* counts_all, const PlanScratch& s,
                               int64_t* counts, int64_t* offsets, int64_t* dropped, int64_t* row_map,
                               int32_t* error_flag, unsigned* tickets) {
  const PlanGrid g = plan_grid(n);
  const int64_t table_bytes = experts <= kTableExperts ? kChunkWarps * experts * 4 : 0;
  plan.kernel(permute_kernel(PermuteKernel::kRankScan, index_bytes), g.chunks, kChunk, table_bytes,
              RankScanParams{in, s.expert, s.local, s.hist, s.seg, error_flag, tickets, counts_all, counts, offsets,
                             dropped, n, experts, g.seg_chunks, align, capacity});
  if (n > 0) {
    plan.kernel(permute_kernel(PermuteKernel::kFinalize), g.chunks, kChunk, 0,
                FinalizeParams{s.expert, s.local, s.hist, s.seg, offsets, row_map, n, experts, g.seg_chunks, capacity});
  }
}

// Counting-sort dispatch plan of indices [T, k] (int64 when indices_int64, else int32): row_map
// [T*k] int64, offsets [E+1] int64, dropped [E] int64. capacity < 0: none. weights (float32 [T*k],
// nullable) only matter with a capacity. control: plan_control_words(T * k) int32 words zeroed by
// the caller; control[0], the error flag, is set to 1 when an index is outside [0, E) (such slots
// are dropped), the others are tickets (zero again when the plan has run). Without a capacity: two
// launches. Positions are stable by flat row (token, slot)
// and do not depend on scheduling.
inline LaunchPlan permute_plan_launches(const void* indices, bool indices_int64, int64_t T, int64_t k,
                                        int64_t experts, int64_t align, int64_t capacity, const float* weights,
                                        int64_t* row_map, int64_t* offsets, int64_t* dropped, void* workspace,
                                        int32_t* control) {
  LaunchPlan plan(KernelSource::kPermute);
  const int64_t n = T * k;
  const int index_bytes = indices_int64 ? 8 : 4;
  const bool weighted = capacity >= 0 && weights != nullptr;
  const PlanScratch s = carve(workspace, n, experts, weighted);
  int32_t* error_flag = control;
  unsigned* tickets = reinterpret_cast<unsigned*>(control + 1);
  if (!weighted) {
    plan_counting_pass(plan, indices, index_bytes, n, experts, align, capacity, nullptr, s, s.counts, offsets,
                       dropped, row_map, error_flag, tickets);
    return plan;
  }
  // Pass 1: group every row by expert (unpadded), select the kept rows of full experts.
  plan_counting_pass(plan, indices, index_bytes, n, experts, 1, -1, nullptr, s, s.counts, s.starts, nullptr,
                     row_map, error_flag, tickets);
  if (n > 0) {
    plan.kernel(permute_kernel(PermuteKernel::kGroup), capped_grid(cdiv(n, kIndexThreads)), kIndexThreads, 0,
                GroupParams{row_map, s.grouped, n});
  }
  plan.kernel(permute_kernel(PermuteKernel::kSelect), experts, kSelectThreads, 0,
              SelectParams{s.grouped, s.starts, s.counts, weights, s.expert, capacity});
  // Pass 2: rank the kept rows again, padded; dropped = all rows - kept rows.
  // (s.starts is free again and receives the kept counts.)
  plan_counting_pass(plan, s.expert, 4, n, experts, align, -1, s.counts, s, s.starts, offsets, dropped, row_map,
                     nullptr, tickets);
  return plan;
}

// out [num_rows, row_bytes]: row row_map[t, j] is x[t] (rows x_row_stride_bytes apart), other
// rows zero. src_scratch: num_rows int64, any content: the inverse writes it, then the copy reads
// it. Rows no slot maps to (padding) are left unwritten by the inverse; the copy's check against
// row_map alone would keep them right, but it would read memory nothing wrote, which
// compute-sanitizer's initcheck reports (it did on an H200, 640 reports in scripts/gpu_sanitize.py).
// So the scratch is set to -1 first (a memset, one more step) unless every_row_mapped: the caller
// knows every row in [0, num_rows) is some slot's (permute() without align, capacity padding or a
// fixed size: the plan's row_map is onto). Results are the same either way; a caller that claims
// it wrongly only brings back the unwritten reads.
inline LaunchPlan permute_rows_launches(const void* x, int64_t x_row_stride_bytes, int64_t row_bytes,
                                        const int64_t* row_map, int64_t T, int64_t k, int64_t num_rows,
                                        int64_t* src_scratch, void* out, bool every_row_mapped) {
  LaunchPlan plan(KernelSource::kPermute);
  const int64_t n = T * k;
  if (num_rows == 0 || row_bytes == 0) return plan;
  if (!every_row_mapped) plan.memset(src_scratch, 0xFF, num_rows * static_cast<int64_t>(sizeof(int64_t)));
  if (n > 0) {
    plan.kernel(permute_kernel(PermuteKernel::kInverse), capped_grid(cdiv(n, kIndexThreads)), kIndexThreads, 0,
                InverseParams{row_map, src_scratch, n, 1, num_rows});
  }
  const uintptr_t a = reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(out) |
                      static_cast<uintptr_t>(x_row_stride_bytes) | static_cast<uintptr_t>(row_bytes);
  const int bytes = a % 16 == 0 ? 16 : a % 8 == 0 ? 8 : a % 4 == 0 ? 4 : 2;
  const int64_t vecs = row_bytes / bytes;
  const RowLayout l = row_layout(num_rows, vecs);
  plan.kernel(permute_kernel(PermuteKernel::kCopyRows, bytes), l.grid, kRowThreads, 0,
              CopyRowsParams{x, src_scratch, row_map, out, x_row_stride_bytes, num_rows, vecs, n, k, l.tpr});
  return plan;
}

// out [T, d] = sum_j w[t, j] * y[row_map[t, j]] in the accumulation type (double for kFloat64,
// else float); w (accumulation type, [T*k]) null means 1. Slots with row_map outside [0, y_rows)
// are skipped. y rows are y_row_stride elements apart; out is contiguous.
inline LaunchPlan gather_reduce_launches(DType dtype, const void* y, int64_t y_row_stride, int64_t y_rows,
                                         const int64_t* row_map, const void* w, int64_t T, int64_t k, int64_t d,
                                         void* out) {
  LaunchPlan plan(KernelSource::kPermute);
  if (T == 0 || d == 0) return plan;
  const int n = pack_width(dtype, y, out, y_row_stride, d);
  const RowLayout l = row_layout(T, d / n);
  plan.kernel(permute_kernel(PermuteKernel::kGatherReduce, static_cast<int>(dtype), n), l.grid, kRowThreads, 0,
              GatherReduceParams{y, row_map, w, out, y_row_stride, y_rows, T, k, d, l.tpr});
  return plan;
}

// grad_y [y_rows, d] (w[t, j] * grad_out[t] at row row_map[t, j], zero elsewhere) and grad_w
// [T*k] (accumulation type; <y[row_map[t, j]], grad_out[t]>, zero where dropped). grad_out is
// contiguous [T, d]; src_scratch: y_rows int64, any content (set to -1 first, as in
// permute_rows_launches).
inline LaunchPlan unpermute_backward_launches(DType dtype, const void* grad_out, const void* y,
                                              int64_t y_row_stride, int64_t y_rows, const int64_t* row_map,
                                              const void* w, int64_t T, int64_t k, int64_t d, int64_t* src_scratch,
                                              void* grad_y, void* grad_w) {
  LaunchPlan plan(KernelSource::kPermute);
  const int64_t n = T * k;
  if (d == 0) {
    if (n > 0) plan.memset(grad_w, 0, n * (dtype == DType::kFloat64 ? 8 : 4));
    return plan;
  }
  if (y_rows > 0) {
    plan.memset(src_scratch, 0xFF, y_rows * static_cast<int64_t>(sizeof(int64_t)));
    if (n > 0) {
      plan.kernel(permute_kernel(PermuteKernel::kInverse), capped_grid(cdiv(n, kIndexThreads)), kIndexThreads, 0,
                  InverseParams{row_map, src_scratch, n, 1, y_rows});
    }
    const int pw = pack_width(dtype, grad_out, grad_y, d, d);
    const RowLayout l = row_layout(y_rows, d / pw);
    plan.kernel(permute_kernel(PermuteKernel::kGradRows, static_cast<int>(dtype), pw), l.grid, kRowThreads, 0,
                GradRowsParams{grad_out, src_scratch, row_map, w, grad_y, y_rows, n, k, d, l.tpr});
  }
  if (n > 0) {
    plan.kernel(permute_kernel(PermuteKernel::kGradWeights, static_cast<int>(dtype)),
                capped_grid(cdiv(n, kRowThreads / 32)), kRowThreads, 0,
                GradWeightsParams{grad_out, y, row_map, grad_w, y_row_stride, y_rows, n, k, d});
  }
  return plan;
}

}  // namespace permute
}  // namespace l2r
