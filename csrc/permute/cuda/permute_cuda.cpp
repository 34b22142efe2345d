// ATen glue of the CUDA permute kernels (permute_kernels.cu): argument checks, device guard, output
// and scratch allocation, and a launch plan (permute_launch_plan.h) run on the current stream by
// whichever executor serves CUDA tensors (the nvcc kernels, or l2r_cuda.jit's NVRTC build). No CUDA
// headers: compiled in every build. Nothing here synchronizes with the host: an index outside
// [0, E) is reported through an asynchronous device-side assertion.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "../../common/aten_dtype.h"
#include "../../launch/cuda_op_registration.h"
#include "../../launch/cuda_plan.h"
#include "../permute_checks.h"
#include "permute_launch_plan.h"

namespace l2r {
namespace permute {
namespace {

// Runs a plan on t's device with the executor serving CUDA tensors.
void run(const LaunchPlan& plan, const at::Tensor& t, const char* op) {
  run_cuda_plan(cuda_plan_executor(op), plan, t.device(), op);
}

at::Tensor rows_contiguous(const at::Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> permute_plan_cuda(
    const at::Tensor& indices_in, int64_t num_experts, int64_t align,
    c10::optional<int64_t> capacity, const c10::optional<at::Tensor>& weights) {
  check_plan_inputs(indices_in, num_experts, align, capacity, weights);
  TORCH_CHECK(num_experts < (int64_t{1} << 31), "l2r_cuda.permute: num_experts must be < 2^31, got ",
              num_experts);
  const c10::DeviceGuard guard(indices_in.device());
  const auto indices = indices_in.contiguous();
  const int64_t T = indices.size(0), k = indices.size(1), n = T * k, E = num_experts;
  const auto opts = indices.options().dtype(at::kLong);
  auto row_map = at::empty({T, k}, opts);
  auto offsets = at::empty({E + 1}, opts);
  auto dropped = at::empty({E}, opts);
  at::Tensor w;
  const bool weighted = capacity.has_value() && weights.has_value();
  if (weighted) w = weights->to(at::kFloat).contiguous();
  auto workspace = at::empty({static_cast<int64_t>(plan_workspace_bytes(n, E, weighted))},
                             indices.options().dtype(at::kByte));
  // the error flag and the scan's tickets (permute_plan_launches)
  auto control = at::zeros({plan_control_words(n)}, indices.options().dtype(at::kInt));
  run(permute_plan_launches(indices.data_ptr(), indices.scalar_type() == at::kLong, T, k, E, align,
                            capacity.has_value() ? *capacity : -1, weighted ? w.data_ptr<float>() : nullptr,
                            row_map.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), dropped.data_ptr<int64_t>(),
                            workspace.data_ptr(), control.data_ptr<int32_t>()),
      indices, "permute");
  at::_assert_async(control.narrow(0, 0, 1).eq(0).squeeze(0),
                    "l2r_cuda.permute: indices has a value outside [0, num_experts)");
  return {row_map, offsets, dropped};
}

at::Tensor permute_rows_cuda(const at::Tensor& x_in, const at::Tensor& row_map_in,
                             int64_t num_rows, bool every_row_mapped) {
  check_rows_inputs(x_in, row_map_in, num_rows, "permute");
  const c10::DeviceGuard guard(x_in.device());
  const auto x = rows_contiguous(x_in);
  const auto row_map = row_map_in.contiguous();
  const int64_t d = x.size(1);
  auto out = at::empty({num_rows, d}, x.options().memory_format(at::MemoryFormat::Contiguous));
  auto src = at::empty({num_rows}, row_map.options());
  const int64_t es = x.element_size();
  run(permute_rows_launches(x.data_ptr(), x.stride(0) * es, d * es, row_map.data_ptr<int64_t>(), row_map.size(0),
                            row_map.size(1), num_rows, src.data_ptr<int64_t>(), out.data_ptr(), every_row_mapped),
      x, "permute");
  return out;
}

at::Tensor permute_rows_backward_cuda(const at::Tensor& grad_in, const at::Tensor& row_map_in) {
  TORCH_CHECK(grad_in.dim() == 2, "l2r_cuda.permute_backward: grad_permuted must be [N, d], got ",
              "shape ", grad_in.sizes());
  check_floating(grad_in, "permute_backward", "grad_permuted");
  check_row_map(row_map_in, "permute_backward");
  check_same_device(row_map_in, grad_in, "permute_backward", "row_map", "grad_permuted");
  const c10::DeviceGuard guard(grad_in.device());
  const auto grad = rows_contiguous(grad_in);
  const auto row_map = row_map_in.contiguous();
  const int64_t T = row_map.size(0), k = row_map.size(1), d = grad.size(1);
  auto out = at::empty({T, d}, grad.options().memory_format(at::MemoryFormat::Contiguous));
  run(gather_reduce_launches(dtype_of(grad), grad.data_ptr(), grad.stride(0), grad.size(0),
                             row_map.data_ptr<int64_t>(), nullptr, T, k, d, out.data_ptr()),
      grad, "permute_backward");
  return out;
}

at::Tensor unpermute_cuda(const at::Tensor& y_in, const at::Tensor& row_map_in,
                          const at::Tensor& weights) {
  check_unpermute_inputs(y_in, row_map_in, weights, "unpermute");
  const c10::DeviceGuard guard(y_in.device());
  const auto y = rows_contiguous(y_in);
  const auto row_map = row_map_in.contiguous();
  const auto w = weights.to(acc_type(y)).contiguous();
  const int64_t T = row_map.size(0), k = row_map.size(1), d = y.size(1);
  auto out = at::empty({T, d}, y.options().memory_format(at::MemoryFormat::Contiguous));
  run(gather_reduce_launches(dtype_of(y), y.data_ptr(), y.stride(0), y.size(0), row_map.data_ptr<int64_t>(),
                             w.data_ptr(), T, k, d, out.data_ptr()),
      y, "unpermute");
  return out;
}

std::tuple<at::Tensor, at::Tensor> unpermute_backward_cuda(const at::Tensor& grad_out_in,
                                                           const at::Tensor& y_in,
                                                           const at::Tensor& row_map_in,
                                                           const at::Tensor& weights) {
  check_unpermute_inputs(y_in, row_map_in, weights, "unpermute_backward");
  TORCH_CHECK(grad_out_in.dim() == 2 && grad_out_in.size(0) == row_map_in.size(0) &&
                  grad_out_in.size(1) == y_in.size(1),
              "l2r_cuda.unpermute_backward: grad_out must be [T, d] = [", row_map_in.size(0), ", ",
              y_in.size(1), "], got shape ", grad_out_in.sizes());
  const c10::DeviceGuard guard(y_in.device());
  const auto y = rows_contiguous(y_in);
  const auto row_map = row_map_in.contiguous();
  const auto grad_out = grad_out_in.to(y.scalar_type()).contiguous();
  const auto w = weights.to(acc_type(y)).contiguous();
  const int64_t N = y.size(0), T = row_map.size(0), k = row_map.size(1), d = y.size(1);
  auto grad_y = at::empty({N, d}, y.options().memory_format(at::MemoryFormat::Contiguous));
  auto grad_w = at::empty({T, k}, w.options());
  auto src = at::empty({N}, row_map.options());
  run(unpermute_backward_launches(dtype_of(y), grad_out.data_ptr(), y.data_ptr(), y.stride(0), N,
                                  row_map.data_ptr<int64_t>(), w.data_ptr(), T, k, d, src.data_ptr<int64_t>(),
                                  grad_y.data_ptr(), grad_w.data_ptr()),
      y, "unpermute_backward");
  return {grad_y, grad_w.to(weights.scalar_type())};
}

}  // namespace

void register_permute_cuda_ops(torch::Library& m) {
  m.impl("permute_plan", &permute_plan_cuda);
  m.impl("permute_rows", &permute_rows_cuda);
  m.impl("permute_rows_backward", &permute_rows_backward_cuda);
  m.impl("unpermute", &unpermute_cuda);
  m.impl("unpermute_backward", &unpermute_backward_cuda);
}

}  // namespace permute
}  // namespace l2r

#if defined(L2R_WITH_CUDA)
TORCH_LIBRARY_IMPL(l2r_cuda, CUDA, m) { l2r::permute::register_permute_cuda_ops(m); }
#endif
