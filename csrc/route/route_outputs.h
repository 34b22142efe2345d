// The output tensors of the routing ops (route_forward, route_select), allocated in one place for
// the CPU and CUDA adapters: weights [T, k] and lse [T] in the math dtype, indices [T, k] int64, and
// the statistics tokens_per_expert / mean_probs ([E], or [T / seq_len, E] per sequence), zeros.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "route_options.h"

namespace l2r {
namespace route {

struct RoutingOutputs {
  at::Tensor weights, indices, tokens_per_expert, mean_probs, lse;

  // like: a tensor on the op's device; acc: the math dtype; seq_len: the op's argument (0: none).
  RoutingOutputs(const RouteShape& s, int64_t seq_len, const at::Tensor& like, at::ScalarType acc) {
    const auto f = like.options().dtype(acc);
    const std::vector<int64_t> stats = seq_len > 0 ? std::vector<int64_t>{s.num_seqs(), s.experts}
                                                   : std::vector<int64_t>{s.experts};
    weights = at::empty({s.tokens, s.top_k}, f);
    indices = at::empty({s.tokens, s.top_k}, like.options().dtype(at::kLong));
    tokens_per_expert = at::zeros(stats, like.options().dtype(at::kLong));
    mean_probs = at::zeros(stats, f);
    lse = at::empty({s.tokens}, f);
  }

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> tuple() const {
    return {weights, indices, tokens_per_expert, mean_probs, lse};
  }
};

}  // namespace route
}  // namespace l2r
