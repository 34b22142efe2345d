// l2r_cuda._C.route_forward_entry: route_forward called from Python without the boxed path.
//
// Why: `torch.ops.l2r_cuda.route_forward(...)` converts each of its 20 arguments to an IValue
// against the schema, dispatches boxed and wraps all 7 outputs as Python tensors: about 10 µs per
// call on this project's CPUs, more than a one-token decode's whole kernel (~2 µs). This entry
// parses the same arguments with the Python C API and calls the op through the dispatcher's typed
// handle, so every dispatch key still applies as it does for torch.ops (autograd, autocast, vmap,
// Python dispatch modes, the profiler, the CPU/CUDA/NVRTC kernels). What it does not see is
// Python-level __torch_function__: it answers NotImplemented for any tensor that is not exactly a
// torch.Tensor (or nn.Parameter) and whenever a torch-function mode is active. It takes only
// calls that are right as they stand: anything the Python layer would report or convert (an
// argument of another type, tensors on two devices, a CUDA tensor without CUDA kernels, a padding
// mask of the wrong dtype or size, seq_len < 1) answers NotImplemented too, and the caller
// (l2r_cuda/ops.py) then takes the checked torch.ops path, whose messages name the argument.
#include "../launch/python_executor.h"  // (first: it includes Python.h)

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>  // at::AutoDispatchBelowAutograd (ATen.h of torch 2.11 does not bring it)
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <optional>
#include <string_view>
#include <tuple>

namespace l2r {
namespace route {
namespace {

using ForwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using ForwardSignature = ForwardOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                        const std::optional<at::Tensor>&, int64_t, double,
                                        std::optional<c10::string_view>, double, double, double, c10::string_view,
                                        bool, int64_t, int64_t, c10::string_view, double, int64_t);

// The routing outputs route() returns (q and rstd, kept for the backward, stay in C++).
constexpr int kReturned = 5;
// Positions in the options tuple of l2r_cuda.ops.checked_options (route_forward's schema order
// from top_k to routed_scaling_factor).
constexpr Py_ssize_t kOptionCount = 12;

// Why an argument cannot take this path (the caller then calls torch.ops, which reports errors
// with the schema's own messages).
struct NotHere {};

const at::Tensor& tensor_arg(PyObject* obj) {
  if (!THPVariable_CheckExact(obj)) throw NotHere{};
  return THPVariable_Unpack(obj);
}

std::optional<at::Tensor> optional_tensor_arg(PyObject* obj) {
  if (obj == Py_None) return std::nullopt;
  return tensor_arg(obj);
}

int64_t int_arg(PyObject* obj) {
  if (!PyLong_CheckExact(obj)) throw NotHere{};
  const long long v = PyLong_AsLongLong(obj);
  if (v == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    throw NotHere{};
  }
  return v;
}

double float_arg(PyObject* obj) {
  if (!PyFloat_CheckExact(obj)) throw NotHere{};
  return PyFloat_AS_DOUBLE(obj);
}

bool bool_arg(PyObject* obj) {
  if (!PyBool_Check(obj)) throw NotHere{};
  return obj == Py_True;
}

c10::string_view str_arg(PyObject* obj) {
  if (!PyUnicode_CheckExact(obj)) throw NotHere{};
  Py_ssize_t size = 0;
  const char* data = PyUnicode_AsUTF8AndSize(obj, &size);
  if (data == nullptr) {
    PyErr_Clear();
    throw NotHere{};
  }
  return c10::string_view(data, static_cast<size_t>(size));
}

std::optional<c10::string_view> optional_str_arg(PyObject* obj) {
  if (obj == Py_None) return std::nullopt;
  return str_arg(obj);
}

// route_forward's operator, looked up once (the schema lives as long as the library).
const c10::OperatorHandle& route_forward_operator() {
  static const c10::OperatorHandle op = c10::Dispatcher::singleton().findSchemaOrThrow("l2r_cuda::route_forward", "");
  return op;
}

// Whether route_forward has a CUDA kernel now (nvcc-built, or registered by l2r_cuda.jit later).
bool has_cuda_kernel() { return route_forward_operator().hasKernelForDispatchKey(c10::DispatchKey::CUDA); }

bool requires_grad(const at::Tensor& t) { return t.defined() && t.requires_grad(); }
bool requires_grad(const std::optional<at::Tensor>& t) { return t.has_value() && t->requires_grad(); }

// route_forward_entry(x [..., d], proj, anchors, scale, norm_weight, expert_bias, padding_mask,
// options, seq_len or None, result_type) -> result_type(weights, indices, tokens_per_expert,
// mean_probs, lse), or NotImplemented. result_type: a tuple subclass without fields of its own
// (l2r_cuda.RouteOutput), built here rather than from a second tuple.
PyObject* route_forward_entry(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 10) {
    PyErr_Format(PyExc_TypeError, "route_forward_entry takes 10 arguments, got %zd", nargs);
    return nullptr;
  }
  PyObject* result_type = args[9];
  if (!PyType_Check(result_type) ||
      !PyType_IsSubtype(reinterpret_cast<PyTypeObject*>(result_type), &PyTuple_Type)) {
    PyErr_SetString(PyExc_TypeError, "route_forward_entry: result_type must be a tuple type");
    return nullptr;
  }
  if (at::impl::torch_function_mode_enabled()) Py_RETURN_NOTIMPLEMENTED;
  PyObject* options = args[7];
  if (!PyTuple_CheckExact(options) || PyTuple_GET_SIZE(options) != kOptionCount) Py_RETURN_NOTIMPLEMENTED;
  const auto option = [&](Py_ssize_t i) { return PyTuple_GET_ITEM(options, i); };
  ForwardOutputs out;
  try {
    const at::Tensor& x_in = tensor_arg(args[0]);
    const at::Tensor& proj = tensor_arg(args[1]);
    const at::Tensor& anchors = tensor_arg(args[2]);
    const at::Tensor& scale = tensor_arg(args[3]);
    const std::optional<at::Tensor> norm_weight = optional_tensor_arg(args[4]);
    const std::optional<at::Tensor> expert_bias = optional_tensor_arg(args[5]);
    std::optional<at::Tensor> padding_mask = optional_tensor_arg(args[6]);
    if (x_in.dim() < 1) throw NotHere{};
    const c10::Device device = x_in.device();
    const auto on_device = [&](const std::optional<at::Tensor>& t) { return !t.has_value() || t->device() == device; };
    if (proj.device() != device || anchors.device() != device || scale.device() != device || !on_device(norm_weight) ||
        !on_device(expert_bias) || !on_device(padding_mask)) {
      throw NotHere{};
    }
    if (device.is_cuda() && !has_cuda_kernel()) throw NotHere{};
    const at::Tensor x = x_in.dim() == 2 ? x_in : x_in.reshape({-1, x_in.size(-1)});
    if (padding_mask.has_value()) {
      if (padding_mask->scalar_type() != at::kBool || padding_mask->numel() != x.size(0)) throw NotHere{};
      padding_mask = padding_mask->reshape({-1});
    }
    const int64_t top_k = int_arg(option(0));
    const double beta = float_arg(option(1));
    const std::optional<c10::string_view> norm = optional_str_arg(option(2));
    const double eps_norm = float_arg(option(3));
    const double eps = float_arg(option(4));
    const double tau = float_arg(option(5));
    const c10::string_view score = str_arg(option(6));
    const bool normalize = bool_arg(option(7));
    const int64_t num_groups = int_arg(option(8));
    const int64_t topk_groups = int_arg(option(9));
    const c10::string_view group_score = str_arg(option(10));
    const double routed_scaling_factor = float_arg(option(11));
    const int64_t seq_len = args[8] == Py_None ? 0 : int_arg(args[8]);
    if (args[8] != Py_None && seq_len < 1) throw NotHere{};

    static const auto op = route_forward_operator().typed<ForwardSignature>();
    const auto call = [&] {
      return op.call(x, proj, anchors, scale, norm_weight, expert_bias, padding_mask, top_k, beta, norm, eps_norm,
                     eps, tau, score, normalize, num_groups, topk_groups, group_score, routed_scaling_factor,
                     seq_len);
    };
    // The autograd kernel register_autograd installs is Python and would only redispatch when no
    // gradient can flow: go below it then (as l2r_cuda.ops._call_op does).
    const bool grad_can_flow = at::GradMode::is_enabled() &&
                               (requires_grad(x) || requires_grad(proj) || requires_grad(anchors) ||
                                requires_grad(scale) || requires_grad(norm_weight));
    pybind11::gil_scoped_release no_gil;
    if (grad_can_flow) {
      out = call();
    } else {
      at::AutoDispatchBelowAutograd below;
      out = call();
    }
  } catch (const NotHere&) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  PyTypeObject* type = reinterpret_cast<PyTypeObject*>(result_type);
  PyObject* result = type->tp_alloc(type, kReturned);
  if (result == nullptr) return nullptr;
  PyTuple_SET_ITEM(result, 0, THPVariable_Wrap(std::move(std::get<0>(out))));
  PyTuple_SET_ITEM(result, 1, THPVariable_Wrap(std::move(std::get<1>(out))));
  PyTuple_SET_ITEM(result, 2, THPVariable_Wrap(std::move(std::get<2>(out))));
  PyTuple_SET_ITEM(result, 3, THPVariable_Wrap(std::move(std::get<3>(out))));
  PyTuple_SET_ITEM(result, 4, THPVariable_Wrap(std::move(std::get<4>(out))));
  return result;
  END_HANDLE_TH_ERRORS
}

PyMethodDef kMethods[] = {
    {"route_forward_entry", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(route_forward_entry)),
     METH_FASTCALL,
     "route_forward through the dispatcher's typed handle (no boxing): the routing outputs, or "
     "NotImplemented when an argument needs torch.ops (a tensor subclass, a torch-function mode)."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

PyMethodDef* route_python_methods() { return kMethods; }

}  // namespace route
}  // namespace l2r
