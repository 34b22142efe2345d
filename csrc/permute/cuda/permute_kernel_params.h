// What the CUDA permute kernels (permute_kernels.cu) and their launch plans
// (permute_launch_plan.h) share: block sizes and each kernel's parameter struct. Every kernel takes
// one struct by value, passed with <<<>>> (nvcc) or as raw bytes through cuLaunchKernel (NVRTC,
// l2r_cuda/jit): fixed-width fields, offsets pinned below for every compiler.
//
// Included by nvcc, NVRTC and g++: no host-only headers.
#pragma once

#include "../../common/hd.h"

namespace l2r {
namespace permute {

constexpr int kChunk = 256;         // rows per block of the counting sort (= its block size)
constexpr int kChunkWarps = kChunk / 32;
// Up to this many experts the chunk ranks come from per-warp counts in dynamic shared memory
// (kChunkWarps x E int32: 32 KiB at most, no opt-in); above, from a scan over the chunk's rows.
constexpr int64_t kTableExperts = 1024;
constexpr int kSelectThreads = 256;
constexpr int kRowThreads = 256;    // row copy / gather blocks
constexpr int kIndexThreads = 256;  // group / inverse blocks
constexpr int64_t kMaxGrid = 65535 * 16;

L2R_HD int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// rank_scan_kernel<index_t> (one block per chunk of kChunk rows; at least one block): expert, rank
// in chunk and chunk histogram of rows [0, n) of `in`; then, in the block that takes a segment's
// last ticket, the in-segment prefixes of its chunks' histograms and the segment's totals; in the
// block that takes the last segment ticket, the prefixes over segments, counts, offsets, dropped.
struct RankScanParams {
  const void* in;  // index_t [n]
  int32_t* expert_out;
  int32_t* local;
  int32_t* hist;              // [chunks][E]: chunk counts, then in-segment exclusive prefixes
  int64_t* seg;               // [segments][E]: segment totals, then exclusive prefixes over segments
  int32_t* error_flag;        // or null
  unsigned* tickets;          // [1 + segments], zero (every ticket wraps back to zero)
  const int64_t* counts_all;  // or null
  int64_t* counts;
  int64_t* offsets;
  int64_t* dropped;  // or null
  int64_t n, experts, seg_chunks, align, capacity;
};

// finalize_kernel: row_map from chunk prefixes and ranks.
struct FinalizeParams {
  const int32_t* expert;
  const int32_t* local;
  const int32_t* hist;
  const int64_t* seg;
  const int64_t* offsets;
  int64_t* row_map;
  int64_t n, experts, seg_chunks, capacity;
};

// group_kernel: grouped[row_map[r]] = r.
struct GroupParams {
  const int64_t* row_map;
  int64_t* grouped;
  int64_t n;
};

// select_kernel (one block per expert): the kept rows of experts over capacity.
struct SelectParams {
  const int64_t* grouped;
  const int64_t* starts;
  const int64_t* counts;
  const float* w;
  int32_t* expert;
  int64_t capacity;
};

// inverse_kernel: src[row_map[r]] = r / divisor.
struct InverseParams {
  const int64_t* row_map;
  int64_t* src;
  int64_t n, divisor, num_rows;
};

// copy_rows_kernel<V>: out rows from x rows through src (slots, checked against row_map).
struct CopyRowsParams {
  const void* x;
  const int64_t* src;
  const int64_t* row_map;
  void* out;
  int64_t x_stride_bytes, num_rows, vecs, slots, k;
  int32_t tpr;
};

// gather_reduce_kernel<scalar_t, N>: out[t] = sum_j w[t, j] * y[row_map[t, j]].
struct GatherReduceParams {
  const void* y;
  const int64_t* row_map;
  const void* w;  // accumulation type [T*k], or null (1)
  void* out;
  int64_t y_stride, y_rows, T, k, d;
  int32_t tpr;
};

// grad_rows_kernel<scalar_t, N>: grad_y[row] = w[r] * grad_out[r / k] (r = src[row], checked
// against row_map).
struct GradRowsParams {
  const void* grad_out;
  const int64_t* src;
  const int64_t* row_map;
  const void* w;  // accumulation type
  void* grad_y;
  int64_t rows, slots, k, d;
  int32_t tpr;
};

// grad_weights_kernel<scalar_t>: grad_w[r] = <y[row_map[r]], grad_out[r / k]>.
struct GradWeightsParams {
  const void* grad_out;
  const void* y;
  const int64_t* row_map;
  void* grad_w;  // accumulation type
  int64_t y_stride, y_rows, n, k, d;
};

// The layout every compiler must agree on (LP64 host and 64-bit device).
L2R_FIELD_AT(RankScanParams, n, 88);
static_assert(sizeof(RankScanParams) == 128, "RankScanParams");
L2R_FIELD_AT(FinalizeParams, n, 48);
static_assert(sizeof(FinalizeParams) == 80, "FinalizeParams");
L2R_FIELD_AT(GroupParams, n, 16);
static_assert(sizeof(GroupParams) == 24, "GroupParams");
L2R_FIELD_AT(SelectParams, capacity, 40);
static_assert(sizeof(SelectParams) == 48, "SelectParams");
L2R_FIELD_AT(InverseParams, n, 16);
static_assert(sizeof(InverseParams) == 40, "InverseParams");
L2R_FIELD_AT(CopyRowsParams, x_stride_bytes, 32);
L2R_FIELD_AT(CopyRowsParams, tpr, 72);
static_assert(sizeof(CopyRowsParams) == 80, "CopyRowsParams");
L2R_FIELD_AT(GatherReduceParams, y_stride, 32);
L2R_FIELD_AT(GatherReduceParams, tpr, 72);
static_assert(sizeof(GatherReduceParams) == 80, "GatherReduceParams");
L2R_FIELD_AT(GradRowsParams, rows, 40);
L2R_FIELD_AT(GradRowsParams, tpr, 72);
static_assert(sizeof(GradRowsParams) == 80, "GradRowsParams");
L2R_FIELD_AT(GradWeightsParams, y_stride, 32);
static_assert(sizeof(GradWeightsParams) == 72, "GradWeightsParams");

}  // namespace permute
}  // namespace l2r
