"""Which kernels serve CUDA tensors, and installing the NVRTC-compiled ones.

A CUDA build serves CUDA tensors with the kernels nvcc compiled into it. A CPU-only build (no
toolkit at install time, or ``L2R_CUDA=0``) has none; when cupy, an NVRTC binding, the kernel
sources, the CUDA headers and a GPU are all present, :func:`install` gives it the same kernels
compiled at run time (``import l2r_cuda`` does this by itself). The ops, autograd, torch.compile and
the MoE layer do not change: the dispatcher's CUDA implementations are the same C++ glue and launch
plans, only the executor of the plans differs.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from .._library import _C, cuda_built
from . import nvrtc
from .executor import NvrtcExecutor, cupy
from .sources import csrc_dir, cuda_include_dir

__all__ = ["unavailable_reasons", "status", "install", "install_if_possible", "use_nvrtc"]

_installed: Optional[NvrtcExecutor] = None  # the executor install() put in place


def unavailable_reasons() -> list[str]:
    """Why NVRTC kernels cannot serve CUDA tensors here (empty: they can)."""
    reasons = []
    if cupy is None:
        reasons.append("cupy is not installed (pip install l2r_cuda[cupy]; cupy-cuda12x for a CUDA 12 torch)")
    if nvrtc.binding() is None:
        reasons.append("no NVRTC binding (cuda-bindings or cupy)")
    if csrc_dir() is None:
        reasons.append("the kernel sources are not installed (l2r_cuda/csrc)")
    if cuda_include_dir() is None:
        reasons.append("no CUDA headers (cuda_fp16.h: the nvidia-cuda-runtime wheel, or CUDA_HOME)")
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} was built without CUDA")
    elif not torch.cuda.is_available():
        reasons.append("no CUDA device (torch.cuda.is_available() is False)")
    return reasons


def status() -> str:
    """One line: which kernels serve CUDA tensors, or why none do."""
    backend = _C.plan_executor_name()
    if backend == "nvcc":
        return "nvcc: the CUDA kernels compiled into this build serve CUDA tensors"
    if backend == "nvrtc":
        return "nvrtc: CUDA tensors run the same kernels compiled at run time by NVRTC (l2r_cuda.jit)"
    reasons = unavailable_reasons() or ["l2r_cuda.jit.install() was not called"]
    return "none: this build has no CUDA kernels and NVRTC cannot stand in: " + "; ".join(reasons)


def install(executor: Optional[NvrtcExecutor] = None) -> None:
    """Serves CUDA tensors with NVRTC-compiled kernels from now on (in a CUDA build too: the nvcc
    kernels step aside). Raises RuntimeError naming what is missing."""
    global _installed
    if executor is None:
        reasons = unavailable_reasons()
        if reasons:
            raise RuntimeError("l2r_cuda.jit: NVRTC kernels are unavailable: " + "; ".join(reasons))
        executor = NvrtcExecutor()
    _C.set_plan_executor(executor)
    _installed = executor


def install_if_possible() -> bool:
    """What ``import l2r_cuda`` does: in a build without CUDA kernels, install the NVRTC ones when
    everything they need is there. True when they serve CUDA tensors."""
    if cuda_built() or unavailable_reasons():
        return False
    install()
    return True


@contextlib.contextmanager
def use_nvrtc(executor: Optional[NvrtcExecutor] = None) -> Iterator[NvrtcExecutor]:
    """Runs the block with NVRTC-compiled kernels serving CUDA tensors (to compare them with the
    nvcc kernels of a CUDA build), then restores what served them before."""
    global _installed
    previous = _installed
    install(executor)
    try:
        yield _installed
    finally:
        _C.set_plan_executor(previous)  # None: back to the build's own kernels
        _installed = previous
