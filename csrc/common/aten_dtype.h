// at::ScalarType -> DType (common/dtype.h) for the ATen adapters of every op: the one mapping.
#pragma once

#include <ATen/ATen.h>

#include "dtype.h"

namespace l2r {

// The floating dtypes the kernels take (every one has a DType).
inline bool is_kernel_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "l2r_cuda: no kernel for dtype ", t.scalar_type());
  }
}

}  // namespace l2r
