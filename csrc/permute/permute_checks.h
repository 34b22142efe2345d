// Argument checks of the permute ops, shared by the CPU and CUDA registrations: every message names
// the argument and the value received.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include "../common/aten_dtype.h"

#include <limits>

namespace l2r {
namespace permute {

inline void check_floating(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(is_kernel_float(t.scalar_type()), "l2r_cuda.", op, ": ", name,
              " must be float32, float64, bfloat16 or float16, got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op,
                              const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "l2r_cuda.", op, ": ", name, " is on ", t.device(),
              " but ", ref_name, " is on ", ref.device(), "; all inputs must be on one device");
}

// row_map [T, k] int64 (the permutation produced by permute_plan).
inline void check_row_map(const at::Tensor& row_map, const char* op) {
  TORCH_CHECK(row_map.dim() == 2, "l2r_cuda.", op, ": row_map must be [T, k], got shape ",
              row_map.sizes());
  TORCH_CHECK(row_map.scalar_type() == at::kLong, "l2r_cuda.", op,
              ": row_map must be int64, got ", row_map.scalar_type());
}

inline void check_plan_inputs(const at::Tensor& indices, int64_t num_experts, int64_t align,
                              const c10::optional<int64_t>& capacity,
                              const c10::optional<at::Tensor>& weights) {
  TORCH_CHECK(indices.dim() == 2, "l2r_cuda.permute: indices must be [T, k], got shape ",
              indices.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt,
              "l2r_cuda.permute: indices must be int64 or int32, got ", indices.scalar_type());
  TORCH_CHECK(num_experts >= 1, "l2r_cuda.permute: num_experts must be >= 1, got ", num_experts);
  TORCH_CHECK(align >= 1, "l2r_cuda.permute: align must be >= 1, got ", align);
  TORCH_CHECK(!capacity.has_value() || *capacity >= 0,
              "l2r_cuda.permute: capacity must be >= 0 or None, got ", capacity.value_or(0));
  TORCH_CHECK(indices.numel() < (int64_t{1} << 32),
              "l2r_cuda.permute: T * k must be < 2^32, got ", indices.numel());
  // Every offset is at most T*k + E*(align-1) (fixed_num_rows): it must fit int64, or offsets and
  // row indices would wrap.
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  TORCH_CHECK(align - 1 <= (kMax - indices.numel()) / num_experts, "l2r_cuda.permute: align = ", align,
              " with num_experts = ", num_experts, " and T * k = ", indices.numel(),
              " overflows int64 row offsets (T*k + E*(align-1) must fit)");
  if (weights.has_value()) {
    check_floating(*weights, "permute", "weights");
    check_same_device(*weights, indices, "permute", "weights", "indices");
    TORCH_CHECK(weights->sizes() == indices.sizes(), "l2r_cuda.permute: weights must be [T, k] = ",
                indices.sizes(), " like indices, got shape ", weights->sizes());
  }
}

inline void check_rows_inputs(const at::Tensor& x, const at::Tensor& row_map, int64_t num_rows,
                              const char* op) {
  TORCH_CHECK(x.dim() == 2, "l2r_cuda.", op, ": x must be [T, d], got ", x.dim(), "-D shape ",
              x.sizes());
  check_floating(x, op, "x");
  check_row_map(row_map, op);
  check_same_device(row_map, x, op, "row_map", "x");
  TORCH_CHECK(row_map.size(0) == x.size(0), "l2r_cuda.", op, ": row_map is [T, k] = ",
              row_map.sizes(), " but x has T = ", x.size(0));
  TORCH_CHECK(num_rows >= 0, "l2r_cuda.", op, ": num_rows must be >= 0, got ", num_rows);
}

// y [N, d], row_map [T, k], weights [T, k].
inline void check_unpermute_inputs(const at::Tensor& y, const at::Tensor& row_map,
                                   const at::Tensor& weights, const char* op) {
  TORCH_CHECK(y.dim() == 2, "l2r_cuda.", op, ": y must be [N, d], got ", y.dim(), "-D shape ",
              y.sizes());
  check_floating(y, op, "y");
  check_row_map(row_map, op);
  check_floating(weights, op, "weights");
  check_same_device(row_map, y, op, "row_map", "y");
  check_same_device(weights, y, op, "weights", "y");
  TORCH_CHECK(weights.sizes() == row_map.sizes(), "l2r_cuda.", op, ": weights must be [T, k] = ",
              row_map.sizes(), " like row_map, got shape ", weights.sizes());
}

// Accumulation dtype: float64 inputs keep float64 (for gradcheck); everything else is fp32.
inline at::ScalarType acc_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace permute
}  // namespace l2r
