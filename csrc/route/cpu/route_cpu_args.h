// The interface between the CPU route adapter (route_cpu.cpp: ATen, threads, allocation) and the
// CPU kernels compiled once per instruction set (route_cpu_kernel.h instantiated by
// route_cpu_{portable,avx2,avx512}.cpp). Raw pointers and sizes only.
#pragma once

#include "../../common/dtype.h"
#include "../../common/half_bits.h"
#include "../route_options.h"

namespace l2r {
namespace route {
namespace cpu {

// Router parameters in the math type A, laid out for the kernels; built once per parameter
// version (route_cpu_prepare.h caches them).
template <typename A>
struct Prepared {
  int64_t d = 0;
  int64_t proj_stride = 0;  // row stride of proj_w / proj (>= d, padded, zero tail)
  int rank = 0, experts = 0, anchors = 0;
  int experts_padded = 0;   // E rounded up to the lane width the layout was built for
  const A* proj_w = nullptr;       // [r][proj_stride] proj * norm_weight (proj without norm weight)
  const A* proj = nullptr;         // [r][proj_stride] proj (grad_norm_weight = sum_k proj * M)
  const A* norm_weight = nullptr;  // [d] or null
  const A* anchors_t = nullptr;    // [r][H][experts_padded] coef(|a|) * a, zero padded
  A scale = 0;
};

template <typename A>
struct Options {
  A beta, eps_norm, eps, tau, scaling;
  bool use_norm, sigmoid, normalize;
  int num_groups, topk_groups;
  GroupScore group_score;
};

// What the forward token loop reads and writes. Either x (route_forward, route_logits) or
// logits_in (route_select, which starts from given logits) is set.
template <typename A>
struct ForwardArgs {
  RouteShape shape;
  Options<A> opt;
  const Prepared<A>* params = nullptr;
  const void* x = nullptr;           // [T, d] in x_type
  DType x_type = DType::kFloat32;
  const A* logits_in = nullptr;      // [T, E]
  bool select = true;                // false: logits only (route_logits)
  const A* bias = nullptr;           // [experts_padded] zero padded, or null
  const bool* padding = nullptr;     // [T] (true: excluded from the statistics), or null
  TokenChunks chunks;
  bool prefetch_next_x = false;      // XPrefetch the next group's rows (where that measured faster)
  // outputs (null when not wanted)
  A* weights = nullptr;              // [T, k]
  int64_t* indices = nullptr;        // [T, k]
  A* lse = nullptr;                  // [T]
  A* q = nullptr;                    // [T, r]
  A* rstd = nullptr;                 // [T]
  A* logits_out = nullptr;           // [T, E]
  A* prob_partials = nullptr;        // [chunks][experts_padded] sums of p^
  int64_t* count_partials = nullptr; // [chunks][experts_padded]
};

template <typename A>
struct BackwardArgs {
  RouteShape shape;
  Options<A> opt;
  const Prepared<A>* params = nullptr;
  const void* x = nullptr;               // [T, d] (null for route_select's backward)
  DType x_type = DType::kFloat32;
  const A* logits_in = nullptr;          // route_select: the logits the forward started from
  const A* grad_weights = nullptr;       // [T, k] or null
  const A* grad_mean_probs = nullptr;    // [num_seqs, experts_padded] pre-divided by the group's
                                         // token count, zero padded, or null
  const A* grad_lse = nullptr;           // [T] or null
  const A* grad_logits = nullptr;        // [T, E]: dL/dl given (route_logits' backward)
  const int64_t* indices = nullptr;      // [T, k]
  const A* q = nullptr;                  // [T, r]
  const A* rstd = nullptr;               // [T]
  const bool* padding = nullptr;         // [T] or null
  TokenChunks chunks;
  bool need_grad_x = true;
  bool need_param_grads = true;
  bool stream_grad_x = false;            // grad_x too large to stay cached: non-temporal stores
  // outputs
  void* grad_x = nullptr;                // [T, d] in x_type
  A* grad_logits_out = nullptr;          // [T, E] (route_select's backward)
  A* partials = nullptr;                 // [chunks][partial_size()]
  int32_t* bad_index = nullptr;          // set to 1 when indices has a value outside [0, E)

  // One chunk's share of the cross-token sums, back to back: M = sum_t grad_q x_hat^T
  // [r][proj_row_stride()] (grad_proj and grad_norm_weight come from it) | anchor accumulators
  // [r][H][experts_padded] | grad_scale [1]. The M rows are padded so that row k + 1 never sits a
  // multiple of 4 KiB after row k (a load of one row right after a store to the other would wait
  // on the store: 4K aliasing).
  int64_t proj_row_stride() const { return (shape.d + 15) / 16 * 16 + 16; }
  int64_t proj_partial() const { return int64_t(shape.rank) * proj_row_stride(); }
  int64_t anchor_partial() const {
    return int64_t(shape.rank) * shape.anchors * (params ? params->experts_padded : 0);
  }
  int64_t scale_offset() const { return proj_partial() + anchor_partial(); }
  // Rounded up to 16 values, so that every chunk's share starts 64-byte aligned (in aligned storage)
  // and with it each grad_proj row the kernels load and store a vector at a time.
  int64_t partial_size() const { return (scale_offset() + 1 + 15) / 16 * 16; }
};

// The kernels of one instruction set for one math type.
template <typename A>
struct Kernels {
  const char* isa;
  int width;  // lanes over experts: the layout's experts_padded is a multiple of it
  int64_t (*forward_scratch)(const ForwardArgs<A>&);
  void (*forward)(const ForwardArgs<A>&, int64_t chunk_begin, int64_t chunk_end, A* scratch);
  int64_t (*backward_scratch)(const BackwardArgs<A>&);
  void (*backward)(const BackwardArgs<A>&, int64_t chunk_begin, int64_t chunk_end, A* scratch);
};

Kernels<float> portable_kernels_float();
Kernels<double> portable_kernels_double();
Kernels<float> avx2_kernels();    // only on x86-64 builds; call when the CPU has AVX2+FMA+F16C
Kernels<float> avx512_kernels();  // only on x86-64 builds; call when the CPU has AVX-512 F/DQ/BW/VL

}  // namespace cpu
}  // namespace route
}  // namespace l2r
