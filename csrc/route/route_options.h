// What one route call computes, parsed once from the op's arguments (route_args.h for ATen) and
// handed to every backend: the sizes (RouteShape) and the options (RouteOptions), with the policy
// strings of the schema turned into enums. Framework-free: CPU kernels, CUDA launchers, the SIMT
// emulator and NVRTC all see the same structs.
#pragma once

#include "../common/hd.h"

namespace l2r {
namespace route {

enum class Score : int { kSoftmax = 0, kSigmoid = 1 };
enum class Norm : int { kNone = 0, kRms = 1 };
// Group score of group-limited top-k: sum of the two best keys (DeepSeek-V3) or the best (V2).
enum class GroupScore : int { kTop2Sum = 0, kMax = 1 };

struct RouteShape {
  int64_t tokens;   // T
  int64_t d;
  int rank;         // r
  int experts;      // E
  int anchors;      // H
  int top_k;        // k
  int64_t seq_len;  // tokens per statistics group: mean_probs/tokens_per_expert are [T / seq_len, E]

  L2R_HD int64_t num_seqs() const { return seq_len > 0 ? tokens / seq_len : 0; }
};

struct RouteOptions {
  double beta = 1.0;
  double eps_norm = 1e-6;
  double eps = 1e-6;
  double tau = 1.0;
  Score score = Score::kSoftmax;
  Norm norm = Norm::kRms;
  bool normalize = false;
  int num_groups = 1;   // 1: no group limit
  int topk_groups = 1;
  GroupScore group_score = GroupScore::kTop2Sum;
  double routed_scaling_factor = 1.0;

  L2R_HD bool sigmoid() const { return score == Score::kSigmoid; }
  L2R_HD bool use_norm() const { return norm == Norm::kRms; }
  L2R_HD bool grouped() const { return num_groups > 1; }
};

#if !defined(__CUDACC_RTC__)
// The options every kernel reads, in its math type: the CPU kernels' Options<A> and the CUDA
// KernelConfig carry the same fields under the same names, filled here for both.
template <typename KernelOptions>
inline void set_kernel_options(KernelOptions& k, const RouteOptions& o) {
  using A = decltype(k.beta);
  k.beta = static_cast<A>(o.beta);
  k.eps_norm = static_cast<A>(o.eps_norm);
  k.eps = static_cast<A>(o.eps);
  k.tau = static_cast<A>(o.tau);
  k.scaling = static_cast<A>(o.routed_scaling_factor);
  k.use_norm = o.use_norm();
  k.sigmoid = o.sigmoid();
  k.normalize = o.normalize;
  k.num_groups = o.num_groups;
  k.topk_groups = o.topk_groups;
  k.group_score = o.group_score;
}
#endif  // !__CUDACC_RTC__

// Tokens in chunks for the cross-token sums: chunk c holds tokens [begin(c), end(c)) of statistics
// group seq(c), never straddling two groups, each of at most `size` tokens. The split depends on
// the sizes only (never on threads or scheduling), so partial sums added in chunk order are
// reproducible. Each backend picks its chunk size (more, smaller chunks for a GPU).
struct TokenChunks {
  int64_t seq_len = 0;  // tokens per group
  int64_t size = 1;     // tokens per chunk (the last chunk of a group may be shorter)
  int64_t per_seq = 0;  // chunks per group
  int64_t count = 0;    // chunks in all

  L2R_HD int64_t seq(int64_t c) const { return c / per_seq; }
  L2R_HD int64_t begin(int64_t c) const { return seq(c) * seq_len + (c % per_seq) * size; }
  L2R_HD int64_t end(int64_t c) const {
    const int64_t e = begin(c) + size, group_end = (seq(c) + 1) * seq_len;
    return e < group_end ? e : group_end;
  }
};

L2R_HD TokenChunks make_token_chunks(const RouteShape& s, int64_t chunk_size) {
  TokenChunks c;
  if (s.tokens == 0 || s.seq_len == 0) return c;
  c.seq_len = s.seq_len;
  c.size = chunk_size < 1 ? 1 : chunk_size;
  c.per_seq = (s.seq_len + c.size - 1) / c.size;
  c.count = s.num_seqs() * c.per_seq;
  return c;
}

}  // namespace route
}  // namespace l2r
