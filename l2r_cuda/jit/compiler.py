"""Compiling the extension's kernel sources with NVRTC: the options (the nvcc build's device flags,
l2r_cuda/jit/flags.py, for one architecture, with ptxas's resource report), and a cached compile of
a set of kernel instantiations of one source."""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Optional, Sequence

from . import cache, nvrtc
from .flags import CXX_STANDARD, FP_CONTRACT, TORCH_HALF_DEFINES
from .sources import KernelSource, csrc_dir, cuda_headers_hash, cuda_include_dir, source_hash

__all__ = ["JitUnavailable", "arch_of", "nvrtc_options", "compile_kernels"]


class JitUnavailable(RuntimeError):
    """Something NVRTC compilation needs is missing (binding, sources, CUDA headers)."""


def arch_of(spec) -> int:
    """80 from 'sm_80', '80', 80 or (8, 0)."""
    if isinstance(spec, tuple):
        return spec[0] * 10 + spec[1]
    text = str(spec).lower().removeprefix("sm_").removeprefix("compute_")
    if not text.isdigit():
        raise ValueError(f"l2r_cuda.jit: not a GPU architecture: {spec!r} (expected e.g. sm_90)")
    return int(text)


def nvrtc_options(arch: int, csrc: pathlib.Path, cuda_include: str) -> list[str]:
    """The NVRTC options of one architecture: a CUBIN for sm_<arch>, the extension build's C++
    standard, floating-point contract and half-type defines (flags.py), the include paths, and
    ptxas's resource report in the log."""
    return [f"--gpu-architecture=sm_{arch}", CXX_STANDARD, *FP_CONTRACT, *TORCH_HALF_DEFINES,
            f"--include-path={csrc}", f"--include-path={cuda_include}", "-Xptxas=-v"]


def _requirements() -> tuple[pathlib.Path, str]:
    csrc = csrc_dir()
    if csrc is None:
        raise JitUnavailable("l2r_cuda.jit: the kernel sources (l2r_cuda/csrc or a checkout's csrc/) are not "
                             "installed; reinstall l2r_cuda from a wheel or an sdist")
    include = cuda_include_dir()
    if include is None:
        raise JitUnavailable("l2r_cuda.jit: no CUDA headers (cuda_fp16.h) found: install the CUDA runtime "
                             "wheel (pip install nvidia-cuda-runtime, which torch's CUDA wheels bring) or "
                             "set CUDA_HOME to a toolkit")
    if nvrtc.binding() is None:
        raise JitUnavailable("l2r_cuda.jit: no NVRTC binding: install cuda-bindings or cupy "
                             "(pip install l2r_cuda[cupy])")
    return csrc, include


def compile_kernels(source: KernelSource, kernels: Sequence[str], arch, *,
                    use_cache: bool = True, prefer: Optional[str] = None) -> nvrtc.Compiled:
    """A CUBIN for ``arch`` of ``source`` (the .cu file nvcc builds) with the instantiations
    ``kernels`` (name expressions), from the disk cache when the sources, NVRTC, the options and the
    kernels are unchanged. Raises :class:`JitUnavailable` or :class:`nvrtc.CompileError`."""
    csrc, include = _requirements()
    arch = arch_of(arch)
    options = nvrtc_options(arch, csrc, include)
    path = csrc / source.path
    kernels = sorted(set(kernels))
    # The include directory's location does not change the output: only the options that can.
    key_options = [o for o in options if not o.startswith("--include-path=")]
    description = {"source": source.path, "arch": f"sm_{arch}", "nvrtc": list(nvrtc.version()),
                   "options": key_options, "kernels": kernels, "sources": source_hash(csrc),
                   "cuda_headers": cuda_headers_hash(include)}
    key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:32]
    if use_cache:
        hit = cache.load(key)
        if hit is not None:
            return hit
    compiled = nvrtc.compile_program(path.read_text(), str(path), kernels, options, prefer=prefer)
    if use_cache:
        cache.store(key, compiled, description)
    return compiled
