"""The NVRTC executor: carries out the launch plans of the extension's CUDA ops (the plans are C++,
csrc/<op>/cuda/*_launch_plan.h; l2r_cuda._C hands each one over, csrc/launch/python_executor.cpp)
with kernels NVRTC compiled from the same .cu files, launched through cupy's CUDA driver API on the
stream the op runs on (torch's current stream).

A plan step is ``(0, kernel name expression, grid, block, dynamic smem bytes, parameter bytes)`` or
``(1, device pointer, byte value, bytes)`` (a memset). Kernels compile on first use, one NVRTC
program per instantiation and architecture (cached on disk, l2r_cuda/jit/cache.py), and load once
per device.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Callable, Optional

import torch

try:
    import cupy
    from cupy.cuda import driver as _driver
    from cupy.cuda import runtime as _runtime
except ImportError:  # cupy is optional: pip install l2r_cuda[cupy]
    cupy = _driver = _runtime = None

from .compiler import compile_kernels
from .sources import KernelSource, kernel_sources

__all__ = ["NvrtcExecutor", "cupy"]

KERNEL, MEMSET = 0, 1
# Above this many bytes of dynamic shared memory a kernel opts in first (csrc/common/launch_plan.h).
DEFAULT_DYNAMIC_SMEM = 48 * 1024
# CUfunction_attribute value of cuFuncSetAttribute (cuda.h; the same in every CUDA 12/13).
CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8


class NvrtcExecutor:
    """The Python object l2r_cuda._C.set_plan_executor() takes: ``limits(device)``,
    ``run(source, steps, device, stream)`` and ``stream_zero_words(device, stream, words)``. ``driver``/``runtime`` (cupy's modules), ``compile``
    (compile_kernels), ``sources`` and ``capability`` are injectable for tests without a GPU."""

    def __init__(self, driver=None, runtime=None, compile: Callable = compile_kernels,
                 sources: Optional[dict[int, KernelSource]] = None,
                 capability: Callable[[int], tuple[int, int]] = torch.cuda.get_device_capability):
        self._driver = driver if driver is not None else _driver
        self._runtime = runtime if runtime is not None else _runtime
        if self._driver is None or self._runtime is None:
            raise RuntimeError("l2r_cuda.jit: the NVRTC executor launches through cupy, which is not installed "
                               "(pip install l2r_cuda[cupy])")
        self._compile = compile
        self._sources = sources
        self._capability = capability
        self._functions: dict[tuple[int, int, str], int] = {}
        self._modules: list[int] = []  # loaded modules stay loaded for the life of the process
        self._zero_words: dict[tuple[int, int], int] = {}  # (device, stream) -> device address
        self._lock = threading.Lock()

    # -- what l2r_cuda._C calls ---------------------------------------------------------------------

    def limits(self, device: int) -> tuple[int, int, int]:
        """Shared memory per block (opt-in maximum) and per SM of ``device``, in bytes, and its
        multiprocessor count."""
        props = torch.cuda.get_device_properties(device)
        return (int(props.shared_memory_per_block_optin), int(props.shared_memory_per_multiprocessor),
                int(props.multi_processor_count))

    def run(self, source: int, steps: list, device: int, stream: int) -> None:
        """Enqueues ``steps`` on ``stream`` (a cudaStream_t of ``device``, the current one) in order."""
        if self._driver.ctxGetCurrent() == 0:  # a thread that never touched the device
            self._runtime.setDevice(device)
        for step in steps:
            if step[0] == MEMSET:
                _, dst, value, nbytes = step
                self._runtime.memsetAsync(dst, value, nbytes, stream)
                continue
            _, name, grid, block, smem, params = step
            function = self.function(device, source, name)
            if smem > DEFAULT_DYNAMIC_SMEM:
                self._driver.funcSetAttribute(function, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem)
            # cuLaunchKernel reads each parameter through an array of pointers: one struct, one pointer.
            struct = ctypes.create_string_buffer(params, len(params))
            pointers = (ctypes.c_void_p * 1)(ctypes.addressof(struct))
            self._driver.launchKernel(function, *grid, *block, smem, stream, ctypes.addressof(pointers), 0)

    # Words per stream kept zero for kernels that leave them zero (the route forward's ticket
    # counters, csrc/route/cuda/route_kernel_params.h kRouteCounterWords; nvcc_executor.cu keeps as many).
    ZERO_WORDS_PER_STREAM = 256

    def stream_zero_words(self, device: int, stream: int, words: int) -> int:
        """The address of ``words`` 32-bit words of ``device``, zero in ``stream``'s order and kept for
        that stream (the plan then needs no memset step before the kernels that use them), or 0: while
        ``stream`` is being captured into a CUDA graph, or for more words than are kept."""
        if not 0 < words <= self.ZERO_WORDS_PER_STREAM or self._runtime.streamIsCapturing(stream):
            return 0
        key = (device, stream)
        with self._lock:
            found = self._zero_words.get(key)
            if found is None:
                if self._driver.ctxGetCurrent() == 0:  # as in run()
                    self._runtime.setDevice(device)
                nbytes = 4 * self.ZERO_WORDS_PER_STREAM
                found = self._runtime.malloc(nbytes)  # never freed: a later op on the stream reuses it
                self._runtime.memsetAsync(found, 0, nbytes, stream)
                self._zero_words[key] = found
        return found

    # -- kernels ------------------------------------------------------------------------------------

    def function(self, device: int, source: int, name: str) -> int:
        """The CUfunction of kernel ``name`` of ``source`` on ``device``: compiled (or read from the
        disk cache) for the device's architecture and loaded on first use."""
        key = (device, source, name)
        found = self._functions.get(key)
        if found is not None:
            return found
        with self._lock:
            found = self._functions.get(key)
            if found is None:
                if self._sources is None:
                    self._sources = kernel_sources()
                compiled = self._compile(self._sources[source], [name], self._capability(device))
                module = self._driver.moduleLoadData(compiled.cubin)
                self._modules.append(module)
                found = self._driver.moduleGetFunction(module, compiled.lowered[name])
                self._functions[key] = found
        return found
