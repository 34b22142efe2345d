// The bridge to l2r_cuda.jit (Python C API, no pybind11): a PlanExecutor that hands each launch plan
// to a Python object, which launches NVRTC-compiled kernels with cuLaunchKernel through cupy; and
// the functions of l2r_cuda._C that l2r_cuda.jit needs (install the executor, which executor serves
// CUDA tensors, the kernel instantiations of each .cu source). In a CPU-only build, installing the
// executor also registers the CUDA implementations of the ops, the same glue a CUDA build registers.
#include "python_executor.h"

#include <torch/library.h>

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "../permute/cuda/permute_launch_plan.h"
#include "../route/cuda/route_launch_plan.h"
#include "cuda_op_registration.h"
#include "plan_executor.h"

namespace l2r {
namespace {

struct Gil {
  PyGILState_STATE state = PyGILState_Ensure();
  ~Gil() { PyGILState_Release(state); }
};

// The pending Python exception as "Type: message" (and cleared).
std::string take_python_error() {
  PyObject *type = nullptr, *value = nullptr, *traceback = nullptr;
  PyErr_Fetch(&type, &value, &traceback);
  PyErr_NormalizeException(&type, &value, &traceback);
  std::string message = "Python error";
  if (type != nullptr) message = reinterpret_cast<PyTypeObject*>(type)->tp_name;
  if (value != nullptr) {
    if (PyObject* text = PyObject_Str(value)) {
      if (const char* s = PyUnicode_AsUTF8(text)) message += std::string(": ") + s;
      Py_DECREF(text);
    }
  }
  Py_XDECREF(type);
  Py_XDECREF(value);
  Py_XDECREF(traceback);
  PyErr_Clear();
  return message;
}

std::string kernel_name(KernelSource source, const KernelRef& ref) {
  return source == KernelSource::kRoute ? route::route_kernel_name(ref) : permute::permute_kernel_name(ref);
}

// One step as a tuple: (0, name, (gx, gy, gz), (bx, by, bz), smem, params bytes) or
// (1, dst, byte value, bytes).
PyObject* step_tuple(KernelSource source, const LaunchStep& s) {
  if (s.kind == StepKind::kMemset) {
    return Py_BuildValue("(iKiL)", 1, static_cast<unsigned long long>(reinterpret_cast<uintptr_t>(s.memset_dst)),
                         s.memset_value, static_cast<long long>(s.memset_bytes));
  }
  const std::string name = kernel_name(source, s.kernel);
  return Py_BuildValue("(is(III)(III)Ly#)", 0, name.c_str(), s.grid[0], s.grid[1], s.grid[2], s.block[0], s.block[1],
                       s.block[2], static_cast<long long>(s.smem_bytes), reinterpret_cast<const char*>(s.params),
                       static_cast<Py_ssize_t>(s.params_bytes));
}

class PythonExecutor final : public PlanExecutor {
 public:
  // Holds a reference to `executor` for the life of the process (see set_plan_executor).
  explicit PythonExecutor(PyObject* executor) : executor_(executor) { Py_INCREF(executor_); }

  const char* name() const override { return "nvrtc"; }

  std::string limits(int device, DeviceLimits* out) override {
    const Gil gil;
    PyObject* result = PyObject_CallMethod(executor_, "limits", "i", device);
    if (result == nullptr) return take_python_error();
    long long per_block = 0, per_sm = 0, sms = 0;
    const bool ok = PyArg_ParseTuple(result, "LLL", &per_block, &per_sm, &sms);
    Py_DECREF(result);
    if (!ok) return take_python_error();
    out->smem_per_block_optin = per_block;
    out->smem_per_sm = per_sm;
    out->sm_count = sms;
    return {};
  }

  std::string run(const LaunchPlan& plan, int device, void* stream) override {
    const Gil gil;
    PyObject* steps = PyList_New(plan.count);
    if (steps == nullptr) return take_python_error();
    for (int i = 0; i < plan.count; ++i) {
      PyObject* step = step_tuple(plan.source, plan.steps[i]);
      if (step == nullptr) {
        Py_DECREF(steps);
        return take_python_error();
      }
      PyList_SET_ITEM(steps, i, step);  // steals the reference
    }
    PyObject* result = PyObject_CallMethod(executor_, "run", "iOiK", static_cast<int>(plan.source), steps, device,
                                           static_cast<unsigned long long>(reinterpret_cast<uintptr_t>(stream)));
    Py_DECREF(steps);
    if (result == nullptr) return take_python_error();
    Py_DECREF(result);
    return {};
  }

  // executor.stream_zero_words(device, stream, words) -> device pointer or 0 (optional method).
  unsigned* stream_zero_words(int device, void* stream, int words) override {
    const Gil gil;
    if (!PyObject_HasAttrString(executor_, "stream_zero_words")) return nullptr;
    PyObject* result = PyObject_CallMethod(executor_, "stream_zero_words", "iKi", device,
                                           static_cast<unsigned long long>(reinterpret_cast<uintptr_t>(stream)), words);
    if (result == nullptr) {
      PyErr_Clear();  // no words: the plan zeroes its own (the op still runs)
      return nullptr;
    }
    const unsigned long long address = PyLong_AsUnsignedLongLong(result);
    Py_DECREF(result);
    if (PyErr_Occurred()) {
      PyErr_Clear();
      return nullptr;
    }
    return reinterpret_cast<unsigned*>(static_cast<uintptr_t>(address));
  }

 private:
  PyObject* executor_;
};

void register_cuda_ops_once() {
#if !defined(L2R_WITH_CUDA)
  // A CPU-only build has no CUDA implementations until an executor can serve them.
  static std::once_flag once;
  std::call_once(once, [] {
    // Lives as long as the process: the registrations are the dispatcher's from now on.
    auto* library = new torch::Library(torch::Library::IMPL, "l2r_cuda", c10::DispatchKey::CUDA, __FILE__, __LINE__);
    route::register_route_cuda_ops(*library);
    permute::register_permute_cuda_ops(*library);
  });
#endif
}

// _C.set_plan_executor(executor or None): executor.limits(device) -> (per-block opt-in, per-SM)
// shared-memory bytes; executor.run(source, steps, device, stream) enqueues the steps; optionally
// executor.stream_zero_words(device, stream, words) -> the address of words kept zero for that
// stream, or 0 (PlanExecutor::stream_zero_words).
PyObject* set_plan_executor(PyObject*, PyObject* executor) {
  // Executors are never freed: a running op may still hold the previous one.
  static std::vector<std::unique_ptr<PythonExecutor>> installed;
  if (executor == Py_None) {
    set_plan_executor_override(nullptr);
    Py_RETURN_NONE;
  }
  for (const char* method : {"limits", "run"}) {
    if (!PyObject_HasAttrString(executor, method)) {
      PyErr_Format(PyExc_TypeError, "l2r_cuda._C.set_plan_executor: the executor has no %s() method", method);
      return nullptr;
    }
  }
  try {
    register_cuda_ops_once();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  installed.push_back(std::make_unique<PythonExecutor>(executor));
  set_plan_executor_override(installed.back().get());
  Py_RETURN_NONE;
}

// _C.plan_executor_name() -> "nvcc", "nvrtc" or None: what serves CUDA tensors now.
PyObject* plan_executor_name(PyObject*, PyObject*) {
  PlanExecutor* executor = plan_executor();
  if (executor == nullptr) Py_RETURN_NONE;
  return PyUnicode_FromString(executor->name());
}

// _C.kernel_sources() -> [(source id, path under csrc/, [name expression of every instantiation])].
PyObject* kernel_sources(PyObject*, PyObject*) {
  struct Source {
    KernelSource id;
    const char* path;
    std::vector<KernelRef> kernels;
  };
  const Source sources[] = {{KernelSource::kRoute, "route/cuda/route_cuda.cu", route::route_kernels()},
                            {KernelSource::kPermute, "permute/cuda/permute_kernels.cu", permute::permute_kernels()}};
  PyObject* list = PyList_New(0);
  if (list == nullptr) return nullptr;
  for (const Source& source : sources) {
    PyObject* names = PyList_New(0);
    if (names == nullptr) {
      Py_DECREF(list);
      return nullptr;
    }
    for (const KernelRef& ref : source.kernels) {
      PyObject* name = PyUnicode_FromString(kernel_name(source.id, ref).c_str());
      if (name == nullptr || PyList_Append(names, name) != 0) {
        Py_XDECREF(name);
        Py_DECREF(names);
        Py_DECREF(list);
        return nullptr;
      }
      Py_DECREF(name);
    }
    PyObject* entry = Py_BuildValue("(isN)", static_cast<int>(source.id), source.path, names);
    if (entry == nullptr || PyList_Append(list, entry) != 0) {
      Py_XDECREF(entry);
      Py_DECREF(list);
      return nullptr;
    }
    Py_DECREF(entry);
  }
  return list;
}

PyMethodDef kMethods[] = {
    {"set_plan_executor", set_plan_executor, METH_O,
     "Install (or, with None, remove) the executor that runs launch plans for CUDA tensors."},
    {"plan_executor_name", plan_executor_name, METH_NOARGS,
     "'nvcc', 'nvrtc' or None: which kernels serve CUDA tensors now."},
    {"kernel_sources", kernel_sources, METH_NOARGS,
     "[(source id, path under csrc/, [NVRTC name expression of every kernel instantiation])]."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

PyMethodDef* python_methods() { return kMethods; }

}  // namespace l2r
