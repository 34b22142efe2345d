// ATen glue of the CUDA route kernels (route_cuda.cu; this file is not route_cuda.cpp because both
// would compile to route_cuda.o): argument checks shared with the CPU op,
// fp32 copies of the parameters, output and workspace allocation, launch on the current stream.
// No host synchronization and no data-dependent host control flow, so both ops can be captured
// in a CUDA graph (scale stays on the device). Only c10/cuda headers: ATen/cuda/CUDAContext.h
// would pull in cuSPARSE/cuBLAS headers that a minimal toolkit lacks.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>

#include "route_checks.h"
#include "route_cuda.h"

namespace l2r {
namespace route {
namespace {

void check_cuda_x(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.is_cuda(), "l2r_cuda.", op, ": the CUDA kernel got x on ", x.device());
  TORCH_CHECK(x.scalar_type() != at::kDouble, "l2r_cuda.", op,
              ": float64 x is not supported by the CUDA kernels (they compute in float32); pass "
              "float32, bfloat16 or float16, or run float64 (e.g. gradcheck) on CPU");
}

XType x_type_of(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return XType::kFloat32;
    case at::kBFloat16: return XType::kBFloat16;
    case at::kHalf: return XType::kFloat16;
    default: TORCH_CHECK(false, "l2r_cuda.route: unsupported x dtype ", x.scalar_type());
  }
}

at::Tensor as_f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

at::Tensor as_f32(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? as_f32(*t) : at::Tensor();
}

const float* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<float>() : nullptr;
}

void check_launch(cudaError_t err, const char* op, const RouteDims& dims, int64_t top_k) {
  TORCH_CHECK(err != cudaErrorInvalidValue, "l2r_cuda.", op,
              ": E = ", dims.experts, ", k = ", top_k, ", r = ", dims.rank,
              " need more shared memory per warp (about (3 E + k + 3 r) floats) than this GPU has");
  TORCH_CHECK(err == cudaSuccess, "l2r_cuda.", op, ": CUDA launch failed: ", cudaGetErrorString(err));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

RouteCudaShape cuda_shape(const RouteDims& dims, int64_t top_k) {
  TORCH_CHECK(top_k <= (int64_t{1} << 30), "l2r_cuda.route: top_k = ", top_k, " is too large");
  return RouteCudaShape{dims.tokens, dims.d, static_cast<int>(dims.rank),
                        static_cast<int>(dims.experts), static_cast<int>(dims.anchors),
                        static_cast<int>(top_k)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
route_forward_cuda(const at::Tensor& x_in, const at::Tensor& proj, const at::Tensor& anchors,
                   const at::Tensor& scale, const c10::optional<at::Tensor>& norm_weight,
                   const c10::optional<at::Tensor>& expert_bias, int64_t top_k, double beta,
                   c10::optional<c10::string_view> norm, double eps_norm, double eps, double tau,
                   c10::string_view score, bool normalize) {
  const RouteDims dims = check_route_inputs(x_in, proj, anchors, scale, norm_weight, expert_bias);
  check_route_options(dims, top_k, beta, eps, tau);
  check_cuda_x(x_in, "route");
  const bool sigmoid = parse_score(std::string(score));
  const bool use_norm = parse_norm(norm);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto f = x_in.options().dtype(at::kFloat);
  const int64_t T = dims.tokens, E = dims.experts;
  at::Tensor weights = at::empty({T, top_k}, f);
  at::Tensor indices = at::empty({T, top_k}, x_in.options().dtype(at::kLong));
  at::Tensor tokens_per_expert = at::zeros({E}, x_in.options().dtype(at::kLong));
  at::Tensor mean_probs = at::zeros({E}, f);
  at::Tensor lse = at::empty({T}, f);
  at::Tensor q = at::empty({T, dims.rank}, f);
  at::Tensor rstd = at::empty({T}, f);
  if (T == 0) return {weights, indices, tokens_per_expert, mean_probs, lse, q, rstd};

  const at::Tensor x = x_in.contiguous();
  const at::Tensor proj32 = as_f32(proj), anchors32 = as_f32(anchors);
  const at::Tensor scale32 = scale.to(at::kFloat).reshape({1}).contiguous();
  const at::Tensor g32 = use_norm ? as_f32(norm_weight) : at::Tensor();
  const at::Tensor bias32 = as_f32(expert_bias);
  const RouteCudaShape shape = cuda_shape(dims, top_k);
  const RouteCudaOptions opt{static_cast<float>(beta), static_cast<float>(eps_norm),
                             static_cast<float>(eps), static_cast<float>(tau), use_norm, sigmoid,
                             normalize};
  at::Tensor workspace = at::empty({route_forward_workspace_floats(shape)}, f);
  const cudaError_t err = launch_route_forward(
      x.data_ptr(), x_type_of(x), proj32.data_ptr<float>(), anchors32.data_ptr<float>(),
      ptr_or_null(g32), ptr_or_null(bias32), scale32.data_ptr<float>(), shape, opt,
      weights.data_ptr<float>(), indices.data_ptr<int64_t>(), tokens_per_expert.data_ptr<int64_t>(),
      mean_probs.data_ptr<float>(), lse.data_ptr<float>(), q.data_ptr<float>(),
      rstd.data_ptr<float>(), workspace.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream());
  check_launch(err, "route", dims, top_k);
  return {weights, indices, tokens_per_expert, mean_probs, lse, q, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_backward_cuda(
    const c10::optional<at::Tensor>& grad_weights, const c10::optional<at::Tensor>& grad_mean_probs,
    const c10::optional<at::Tensor>& grad_lse, const at::Tensor& x_in, const at::Tensor& proj,
    const at::Tensor& anchors, const at::Tensor& scale,
    const c10::optional<at::Tensor>& norm_weight, const at::Tensor& indices_in,
    const at::Tensor& q_in, const at::Tensor& rstd_in, double beta,
    c10::optional<c10::string_view> norm, double eps, double tau, c10::string_view score,
    bool normalize) {
  const RouteBackwardSetup setup = check_route_backward_inputs(
      grad_weights, grad_mean_probs, grad_lse, x_in, proj, anchors, scale, norm_weight, indices_in,
      q_in, rstd_in, beta, norm, eps, tau, score);
  const RouteDims& dims = setup.dims;
  const int64_t T = dims.tokens, E = dims.experts, d = dims.d, rank = dims.rank;
  const int64_t top_k = setup.top_k;
  const bool sigmoid = setup.sigmoid, use_norm = setup.use_norm;
  check_cuda_x(x_in, "route_backward");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto f = x_in.options().dtype(at::kFloat);
  const bool has_norm_weight = use_norm && norm_weight.has_value();

  at::Tensor grad_x = at::empty_like(x_in, at::MemoryFormat::Contiguous);
  at::Tensor grad_proj = at::zeros({rank, d}, f);
  at::Tensor grad_anchors = at::zeros({E, dims.anchors, rank}, f);
  at::Tensor grad_scale = at::zeros({1}, f);
  at::Tensor grad_norm_weight = has_norm_weight ? at::zeros({d}, f) : at::empty({0}, f);
  if (T > 0) {
    const at::Tensor x = x_in.contiguous();
    const at::Tensor proj32 = as_f32(proj), anchors32 = as_f32(anchors);
    const at::Tensor scale32 = scale.to(at::kFloat).reshape({1}).contiguous();
    const at::Tensor g32 = has_norm_weight ? as_f32(norm_weight) : at::Tensor();
    const at::Tensor gw = as_f32(grad_weights), gm = as_f32(grad_mean_probs), gl = as_f32(grad_lse);
    const at::Tensor q = as_f32(q_in), rstd = as_f32(rstd_in);
    const at::Tensor indices = indices_in.to(at::kLong).contiguous();
    const RouteCudaShape shape = cuda_shape(dims, top_k);
    const RouteCudaOptions opt{static_cast<float>(beta), 0.f, static_cast<float>(eps),
                               static_cast<float>(tau), use_norm, sigmoid, normalize};
    at::Tensor workspace = at::empty({route_backward_workspace_floats(shape)}, f);
    const cudaError_t err = launch_route_backward(
        ptr_or_null(gw), ptr_or_null(gm), ptr_or_null(gl), x.data_ptr(), x_type_of(x),
        proj32.data_ptr<float>(), anchors32.data_ptr<float>(), ptr_or_null(g32),
        scale32.data_ptr<float>(), indices.data_ptr<int64_t>(), q.data_ptr<float>(),
        rstd.data_ptr<float>(), shape, opt, grad_x.data_ptr(), grad_proj.data_ptr<float>(),
        grad_anchors.data_ptr<float>(), grad_scale.data_ptr<float>(),
        has_norm_weight ? grad_norm_weight.data_ptr<float>() : nullptr,
        workspace.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream());
    check_launch(err, "route_backward", dims, top_k);
  }
  return {grad_x, grad_proj.to(proj.scalar_type()), grad_anchors.to(anchors.scalar_type()),
          grad_scale.reshape(scale.sizes()).to(scale.scalar_type()),
          has_norm_weight ? grad_norm_weight.to(norm_weight->scalar_type()) : grad_norm_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(l2r_cuda, CUDA, m) {
  m.impl("route_forward", &route_forward_cuda);
  m.impl("route_backward", &route_backward_cuda);
}

}  // namespace route
}  // namespace l2r
