"""l2r_cuda.jit: the extension's CUDA kernels compiled at run time with NVRTC, for installs without
a CUDA toolkit (a CPU-only build of l2r_cuda on a GPU machine).

The same ``.cu`` files nvcc builds (csrc/route/cuda/route_cuda.cu, csrc/permute/cuda/
permute_kernels.cu) are compiled by NVRTC for the device's architecture with the extension build's
flags (flags.py), cached on disk (cache.py), loaded and launched through cupy on torch's current
stream (executor.py). What to launch (instantiations, grids, shared memory, parameter structs,
workspace layout) is not decided here: the C++ launch plans decide it for both executors, and the
extension hands each plan over (csrc/launch/python_executor.cpp).

* :func:`status` / ``l2r_cuda.cuda_backend()``: which kernels serve CUDA tensors ("nvcc", "nvrtc",
  none) and why;
* :func:`install` (done by ``import l2r_cuda`` in a CPU-only build when everything is there),
  :func:`use_nvrtc` (a block with NVRTC kernels in a CUDA build, e.g. to compare them);
* ``python -m l2r_cuda.jit --check --arch sm_80 sm_90``: compile everything without a GPU, report
  registers and spills (check.py).
"""

from .backend import install, install_if_possible, status, unavailable_reasons, use_nvrtc
from .compiler import JitUnavailable, compile_kernels
from .executor import NvrtcExecutor
from .nvrtc import CompileError

__all__ = ["status", "install", "install_if_possible", "unavailable_reasons", "use_nvrtc", "compile_kernels",
           "NvrtcExecutor", "JitUnavailable", "CompileError"]
