// The router parameters in the CPU kernels' layout (Prepared, route_cpu_args.h): W padded and with
// the RMSNorm weight folded in, anchors normalised (coef(|a|) * a) and transposed to
// [r][H][E_pad]. Built once per parameter version and kept in a small cache, so that a decode call
// (T = 1) does only the token's work; param_version.h says when an entry is current.
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <vector>

#include "../../common/cache_aligned.h"
#include "../math/all.h"
#include "../param_version.h"
#include "route_cpu_args.h"

namespace l2r {
namespace route {
namespace cpu {

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

template <typename A>
struct PreparedStorage {
  // 64-byte aligned: the kernels load proj_w / proj rows (their stride is a multiple of 16 floats)
  // and anchors_t rows a whole vector at a time.
  CacheAlignedVector<A> proj_w, proj, norm_weight, anchors_t, anchors;
  std::vector<math::NormCoef<A>> anchor_coef;  // [E * H]
  Prepared<A> view;
};

// What a preparation depends on besides the tensors.
struct PrepareOptions {
  bool use_norm = true;
  double beta = 1.0, eps = 1e-6;
  int width = 1;  // lane width of the kernels: E_pad is a multiple of it
};

// The prepared parameters for these tensors and options: from the cache when they have not changed
// since they were prepared, else prepared now (and cached when every tensor can be tracked).
template <typename A>
std::shared_ptr<const PreparedStorage<A>> prepared_params(const at::Tensor& proj, const at::Tensor& anchors,
                                                          const at::Tensor& scale,
                                                          const c10::optional<at::Tensor>& norm_weight,
                                                          const PrepareOptions& options);

// Drops every cached preparation (after writes the version counters cannot see, param_version.h).
void clear_prepared_cache();

// How many preparations are cached and how many calls found theirs there (tests, benchmarks).
struct PreparedCacheStats {
  int64_t entries = 0, hits = 0, misses = 0;
};
PreparedCacheStats prepared_cache_stats();

}  // namespace cpu
}  // namespace route
}  // namespace l2r
