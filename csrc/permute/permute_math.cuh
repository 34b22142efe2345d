// Index math of token permutation (docs/SPEC.md "Dispatch"), shared verbatim by the CPU kernels
// (permute_cpu.cpp) and the CUDA kernels (permute_kernels.cu). Every row/offset is int64.
#pragma once

#include "../common/hd.h"
#include "../common/order.h"

namespace l2r {
namespace permute {

// Flat (token, slot) rows are cut into chunks of this many rows for the counting sort. The split
// depends on the row count only, never on the thread count, so positions are reproducible.
constexpr int64_t kCpuChunkRows = 4096;

// n rounded up to a multiple of align (align >= 1).
L2R_HD int64_t round_up(int64_t n, int64_t align) { return (n + align - 1) / align * align; }

// Output rows of `fixed_size=True`: every (token, slot) row plus the worst-case alignment padding
// of every expert. An upper bound of the exact padded total, known from shapes alone.
L2R_HD int64_t fixed_num_rows(int64_t tokens, int64_t k, int64_t experts, int64_t align) {
  return tokens * k + experts * (align - 1);
}

// Expert of a (token, slot) row, or -1 when the index is outside [0, E) (the caller reports it).
template <typename index_t>
L2R_HD int64_t checked_expert(index_t v, int64_t experts) {
  const int64_t e = static_cast<int64_t>(v);
  return (e >= 0 && e < experts) ? e : -1;
}

// Keep-priority of a row under `capacity` with router weights: larger key = kept first, in the one
// selection order of common/order.h (weight descending, -0 == +0, NaN below every number, ties to
// the lower flat row = lower token, since a token has at most one row per expert). Keys are unique
// inside an expert, so "the capacity largest keys" is a well-defined set. flat_row < 2^32
// (check_plan_inputs).
L2R_HD uint64_t capacity_key(float w, int64_t flat_row) {
  return order_key(w, static_cast<uint32_t>(flat_row));
}

}  // namespace permute
}  // namespace l2r
