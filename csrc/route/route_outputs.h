// The output tensors of the routing ops (route_forward, route_select), allocated in one place for
// the CPU and CUDA adapters: weights [T, k] and lse [T] in the math dtype, indices [T, k] int64, and
// the statistics tokens_per_expert / mean_probs ([E], or [T / seq_len, E] per sequence), zeros
// unless the kernels write every entry.
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>

#include <tuple>
#include <vector>

#include "route_options.h"

namespace l2r {
namespace route {

// An uninitialised tensor; CPU tensors come straight from the CPU allocator (a decode call
// allocates nine small tensors, and going through the dispatcher's at::empty costs about as much
// as each allocation itself).
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return options.device().is_cpu() ? at::detail::empty_cpu(sizes, options) : at::empty(sizes, options);
}

struct RoutingOutputs {
  at::Tensor weights, indices, tokens_per_expert, mean_probs, lse;

  // like: a tensor on the op's device; acc: the math dtype; seq_len: the op's argument (0: none);
  // statistics_written: the kernels write every statistics entry (else they start as zeros).
  RoutingOutputs(const RouteShape& s, int64_t seq_len, const at::Tensor& like, at::ScalarType acc,
                 bool statistics_written = false) {
    const auto f = like.options().dtype(acc);
    const auto i64 = like.options().dtype(at::kLong);
    const std::vector<int64_t> stats = seq_len > 0 ? std::vector<int64_t>{s.num_seqs(), s.experts}
                                                   : std::vector<int64_t>{s.experts};
    weights = empty_output({s.tokens, s.top_k}, f);
    indices = empty_output({s.tokens, s.top_k}, i64);
    tokens_per_expert = statistics_written ? empty_output(stats, i64) : at::zeros(stats, i64);
    mean_probs = statistics_written ? empty_output(stats, f) : at::zeros(stats, f);
    lse = empty_output({s.tokens}, f);
  }

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> tuple() const {
    return {weights, indices, tokens_per_expert, mean_probs, lse};
  }
};

}  // namespace route
}  // namespace l2r
