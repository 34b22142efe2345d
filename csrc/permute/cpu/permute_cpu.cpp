// CPU kernels of token permutation (docs/SPEC.md "Dispatch"): a counting sort over fixed-size chunks of the
// flat (token, slot) rows (histogram per chunk, prefix over chunks in chunk order, stable position
// assignment), row copies, and token-major gather-reduces for unpermute and the backwards. No
// floating-point reduction depends on the thread count; nothing uses atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <vector>

#include "../permute_checks.h"
#include "../permute_math.cuh"

namespace l2r {
namespace permute {
namespace {

// Stable position of every row inside its expert (rows with expert < 0 are skipped and get -1),
// and the number of rows of every expert.
void stable_positions(const int64_t* expert, int64_t n, int64_t experts, int64_t* pos,
                      std::vector<int64_t>& counts) {
  const int64_t chunks = std::max<int64_t>(1, (n + kCpuChunkRows - 1) / kCpuChunkRows);
  std::vector<int64_t> base(chunks * experts, 0);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      int64_t* h = base.data() + c * experts;
      const int64_t lo = c * kCpuChunkRows, hi = std::min(n, lo + kCpuChunkRows);
      for (int64_t r = lo; r < hi; ++r) {
        if (expert[r] >= 0) ++h[expert[r]];
      }
    }
  });
  counts.assign(experts, 0);
  for (int64_t c = 0; c < chunks; ++c) {
    int64_t* h = base.data() + c * experts;
    for (int64_t e = 0; e < experts; ++e) {
      const int64_t v = h[e];
      h[e] = counts[e];
      counts[e] += v;
    }
  }
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      int64_t* h = base.data() + c * experts;
      const int64_t lo = c * kCpuChunkRows, hi = std::min(n, lo + kCpuChunkRows);
      for (int64_t r = lo; r < hi; ++r) pos[r] = expert[r] >= 0 ? h[expert[r]]++ : -1;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> permute_plan_cpu(
    const at::Tensor& indices, int64_t num_experts, int64_t align, c10::optional<int64_t> capacity,
    const c10::optional<at::Tensor>& weights) {
  check_plan_inputs(indices, num_experts, align, capacity, weights);
  const int64_t T = indices.size(0), k = indices.size(1), n = T * k, E = num_experts;
  auto expert_t = at::empty({n}, indices.options().dtype(at::kLong));
  int64_t* expert = expert_t.data_ptr<int64_t>();
  const auto idx = indices.contiguous();
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "l2r_permute_plan_cpu", [&] {
    const index_t* p = idx.data_ptr<index_t>();
    for (int64_t r = 0; r < n; ++r) {
      expert[r] = checked_expert(p[r], E);
      TORCH_CHECK(expert[r] >= 0, "l2r_cuda.permute: indices[", r / k, ", ", r % k, "] = ",
                  static_cast<int64_t>(p[r]), " is out of range [0, num_experts) = [0, ", E, ")");
    }
  });
  auto pos_t = at::empty({n}, expert_t.options());
  int64_t* pos = pos_t.data_ptr<int64_t>();
  std::vector<int64_t> counts, kept;
  stable_positions(expert, n, E, pos, counts);
  kept = counts;
  if (capacity.has_value()) {
    const int64_t cap = *capacity;
    if (!weights.has_value()) {
      // Keep the first `cap` rows of every expert in token order: positions stay as they are.
      for (int64_t r = 0; r < n; ++r) {
        if (pos[r] >= cap) expert[r] = pos[r] = -1;
      }
      for (int64_t e = 0; e < E; ++e) kept[e] = std::min(counts[e], cap);
    } else {
      // Group the rows by expert (stable), keep the `cap` largest capacity_key of each, then
      // recount the positions of the kept rows.
      const auto w = weights->to(at::kFloat).contiguous();
      const float* wp = w.data_ptr<float>();
      std::vector<int64_t> start(E + 1, 0);
      for (int64_t e = 0; e < E; ++e) start[e + 1] = start[e] + counts[e];
      std::vector<int64_t> grouped(n);
      for (int64_t r = 0; r < n; ++r) grouped[start[expert[r]] + pos[r]] = r;
      at::parallel_for(0, E, 1, [&](int64_t begin, int64_t end) {
        std::vector<uint64_t> keys;
        for (int64_t e = begin; e < end; ++e) {
          if (counts[e] <= cap) continue;
          const int64_t* rows = grouped.data() + start[e];
          uint64_t threshold = ~uint64_t{0};
          if (cap > 0) {
            keys.resize(counts[e]);
            for (int64_t i = 0; i < counts[e]; ++i) keys[i] = capacity_key(wp[rows[i]], rows[i]);
            std::nth_element(keys.begin(), keys.begin() + (cap - 1), keys.end(),
                             std::greater<uint64_t>());
            threshold = keys[cap - 1];
          }
          for (int64_t i = 0; i < counts[e]; ++i) {
            const int64_t r = rows[i];
            if (cap == 0 || capacity_key(wp[r], r) < threshold) expert[r] = -1;
          }
        }
      });
      stable_positions(expert, n, E, pos, kept);
    }
  }
  auto offsets_t = at::empty({E + 1}, expert_t.options());
  auto dropped_t = at::empty({E}, expert_t.options());
  int64_t* offsets = offsets_t.data_ptr<int64_t>();
  int64_t* dropped = dropped_t.data_ptr<int64_t>();
  offsets[0] = 0;
  for (int64_t e = 0; e < E; ++e) {
    offsets[e + 1] = offsets[e] + round_up(kept[e], align);
    dropped[e] = counts[e] - kept[e];
  }
  auto row_map_t = at::empty({T, k}, expert_t.options());
  int64_t* row_map = row_map_t.data_ptr<int64_t>();
  at::parallel_for(0, n, 16384, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) row_map[r] = expert[r] >= 0 ? offsets[expert[r]] + pos[r] : -1;
  });
  return {row_map_t, offsets_t, dropped_t};
}

// The (token, slot) flat row that fills each of num_rows output rows, -1 for padding. Checks that
// row_map is a valid partial injection into [0, num_rows).
std::vector<int64_t> inverse_row_map(const at::Tensor& row_map, int64_t num_rows, const char* op) {
  const auto rm = row_map.contiguous();
  const int64_t* p = rm.data_ptr<int64_t>();
  const int64_t n = rm.numel(), k = std::max<int64_t>(1, rm.size(1));
  std::vector<int64_t> src(num_rows, -1);
  for (int64_t r = 0; r < n; ++r) {
    const int64_t row = p[r];
    if (row < 0) continue;
    TORCH_CHECK(row < num_rows, "l2r_cuda.", op, ": row_map[", r / k, ", ", r % k, "] = ", row,
                " is out of range for ", num_rows, " rows");
    TORCH_CHECK(src[row] < 0, "l2r_cuda.", op, ": row_map sends two slots to row ", row);
    src[row] = r;
  }
  return src;
}

// A 2-D tensor whose rows are contiguous (the row stride may be anything).
at::Tensor rows_contiguous(const at::Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
}

// every_row_mapped only spares the CUDA path a reset of its scratch; the CPU inverse is built whole.
at::Tensor permute_rows_cpu(const at::Tensor& x_in, const at::Tensor& row_map, int64_t num_rows,
                            bool /*every_row_mapped*/) {
  check_rows_inputs(x_in, row_map, num_rows, "permute");
  const auto x = rows_contiguous(x_in);
  const int64_t d = x.size(1), k = row_map.size(1);
  auto out = at::empty({num_rows, d}, x.options().memory_format(at::MemoryFormat::Contiguous));
  const auto src = inverse_row_map(row_map, num_rows, "permute");
  const int64_t es = x.element_size(), xs = x.stride(0) * es, row_bytes = d * es;
  const char* xp = static_cast<const char*>(x.data_ptr());
  char* op = static_cast<char*>(out.data_ptr());
  if (row_bytes == 0) return out;
  // Token-major: each x row is read once (and stays in L1) for its k copies, so x is streamed
  // once instead of k times; every output row has exactly one writer. Padding rows are zeroed first.
  const int64_t T = row_map.size(0);
  const auto row_map_c = row_map.contiguous();
  const int64_t* rm = row_map_c.data_ptr<int64_t>();
  at::parallel_for(0, num_rows, std::max<int64_t>(1, 65536 / row_bytes), [&](int64_t b, int64_t e) {
    for (int64_t row = b; row < e; ++row) {
      if (src[row] < 0) std::memset(op + row * row_bytes, 0, row_bytes);
    }
  });
  at::parallel_for(0, T, std::max<int64_t>(1, 65536 / (row_bytes * std::max<int64_t>(1, k))),
                   [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const char* xr = xp + t * xs;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t row = rm[t * k + j];
        if (row >= 0) std::memcpy(op + row * row_bytes, xr, row_bytes);
      }
    }
  });
  return out;
}

// out[t] = sum_j w[t, j] * y[row_map[t, j]] (w = 1 when weights is null), accumulated in acc_t in
// slot order; slots with row_map < 0 are skipped (they add exactly zero, even to NaN rows).
template <typename scalar_t, typename acc_t>
void gather_reduce(const scalar_t* y, int64_t y_stride, const int64_t* row_map, const acc_t* w,
                   scalar_t* out, int64_t T, int64_t k, int64_t d) {
  at::parallel_for(0, T, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, d * k)),
                   [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(d);
    for (int64_t t = begin; t < end; ++t) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t j = 0; j < k; ++j) {
        const int64_t row = row_map[t * k + j];
        if (row < 0) continue;
        const scalar_t* src = y + row * y_stride;
        const acc_t wj = w ? w[t * k + j] : acc_t(1);
        for (int64_t i = 0; i < d; ++i) acc[i] += wj * static_cast<acc_t>(src[i]);
      }
      scalar_t* dst = out + t * d;
      for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<scalar_t>(acc[i]);
    }
  });
}

void check_rows_in_range(const at::Tensor& row_map, int64_t num_rows, const char* op) {
  const int64_t* p = row_map.data_ptr<int64_t>();
  const int64_t n = row_map.numel(), k = std::max<int64_t>(1, row_map.size(1));
  for (int64_t r = 0; r < n; ++r) {
    TORCH_CHECK(p[r] < num_rows, "l2r_cuda.", op, ": row_map[", r / k, ", ", r % k, "] = ", p[r],
                " is out of range for y with ", num_rows, " rows");
  }
}

// grad_x[t] = sum_j grad_permuted[row_map[t, j]] (the backward of permute_rows).
at::Tensor permute_rows_backward_cpu(const at::Tensor& grad_in, const at::Tensor& row_map_in) {
  TORCH_CHECK(grad_in.dim() == 2, "l2r_cuda.permute_backward: grad_permuted must be [N, d], got ",
              "shape ", grad_in.sizes());
  check_floating(grad_in, "permute_backward", "grad_permuted");
  check_row_map(row_map_in, "permute_backward");
  const auto grad = rows_contiguous(grad_in);
  const auto row_map = row_map_in.contiguous();
  check_rows_in_range(row_map, grad.size(0), "permute_backward");
  const int64_t T = row_map.size(0), k = row_map.size(1), d = grad.size(1);
  auto out = at::empty({T, d}, grad.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(),
                                  "l2r_permute_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gather_reduce<scalar_t, acc_t>(grad.data_ptr<scalar_t>(), grad.stride(0),
                                   row_map.data_ptr<int64_t>(), nullptr, out.data_ptr<scalar_t>(),
                                   T, k, d);
  });
  return out;
}

at::Tensor unpermute_cpu(const at::Tensor& y_in, const at::Tensor& row_map_in,
                         const at::Tensor& weights) {
  check_unpermute_inputs(y_in, row_map_in, weights, "unpermute");
  const auto y = rows_contiguous(y_in);
  const auto row_map = row_map_in.contiguous();
  check_rows_in_range(row_map, y.size(0), "unpermute");
  const int64_t T = row_map.size(0), k = row_map.size(1), d = y.size(1);
  auto out = at::empty({T, d}, y.options().memory_format(at::MemoryFormat::Contiguous));
  const auto w = weights.to(acc_type(y)).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "l2r_unpermute_cpu",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gather_reduce<scalar_t, acc_t>(y.data_ptr<scalar_t>(), y.stride(0), row_map.data_ptr<int64_t>(),
                                   w.data_ptr<acc_t>(), out.data_ptr<scalar_t>(), T, k, d);
  });
  return out;
}

// grad_y[row_map[t, j]] = w[t, j] * grad_out[t] (zero on padding rows: one writer per row) and
// grad_weights[t, j] = <y[row_map[t, j]], grad_out[t]> (zero for dropped slots).
std::tuple<at::Tensor, at::Tensor> unpermute_backward_cpu(const at::Tensor& grad_out_in,
                                                          const at::Tensor& y_in,
                                                          const at::Tensor& row_map_in,
                                                          const at::Tensor& weights) {
  check_unpermute_inputs(y_in, row_map_in, weights, "unpermute_backward");
  TORCH_CHECK(grad_out_in.dim() == 2 && grad_out_in.size(0) == row_map_in.size(0) &&
                  grad_out_in.size(1) == y_in.size(1),
              "l2r_cuda.unpermute_backward: grad_out must be [T, d] = [", row_map_in.size(0), ", ",
              y_in.size(1), "], got shape ", grad_out_in.sizes());
  const auto y = rows_contiguous(y_in);
  const auto row_map = row_map_in.contiguous();
  const auto grad_out = grad_out_in.to(y.scalar_type()).contiguous();
  const int64_t N = y.size(0), T = row_map.size(0), k = row_map.size(1), d = y.size(1);
  const auto src = inverse_row_map(row_map, N, "unpermute_backward");
  const auto acc = acc_type(y);
  const auto w = weights.to(acc).contiguous();
  auto grad_y = at::empty({N, d}, y.options().memory_format(at::MemoryFormat::Contiguous));
  auto grad_w = at::empty({T, k}, w.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(),
                                  "l2r_unpermute_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* gp = grad_out.data_ptr<scalar_t>();
    const acc_t* wp = w.data_ptr<acc_t>();
    const int64_t* rm = row_map.data_ptr<int64_t>();
    scalar_t* gy = grad_y.data_ptr<scalar_t>();
    acc_t* gw = grad_w.data_ptr<acc_t>();
    const int64_t ys = y.stride(0);
    at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, d)),
                     [&](int64_t b, int64_t e) {
      for (int64_t row = b; row < e; ++row) {
        scalar_t* dst = gy + row * d;
        const int64_t r = src[row];
        if (r < 0) {
          std::fill(dst, dst + d, scalar_t(0));
          continue;
        }
        const acc_t wr = wp[r];
        const scalar_t* g = gp + (r / k) * d;
        for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<scalar_t>(wr * static_cast<acc_t>(g[i]));
      }
    });
    at::parallel_for(0, T * k, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, d)),
                     [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const int64_t row = rm[r];
        acc_t s = 0;
        if (row >= 0) {
          const scalar_t* yr = yp + row * ys;
          const scalar_t* g = gp + (r / k) * d;
          for (int64_t i = 0; i < d; ++i) s += static_cast<acc_t>(yr[i]) * static_cast<acc_t>(g[i]);
        }
        gw[r] = s;
      }
    });
  });
  return {grad_y, grad_w.to(weights.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(l2r_cuda, CPU, m) {
  m.impl("permute_plan", &permute_plan_cpu);
  m.impl("permute_rows", &permute_rows_cpu);
  m.impl("permute_rows_backward", &permute_rows_backward_cpu);
  m.impl("unpermute", &unpermute_cpu);
  m.impl("unpermute_backward", &unpermute_backward_cpu);
}

}  // namespace permute
}  // namespace l2r
