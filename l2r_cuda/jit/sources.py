"""Where l2r_cuda.jit finds what it compiles: the kernel sources (the very ``.cu`` files nvcc builds,
shipped inside the package as ``l2r_cuda/csrc`` or read from a source checkout's ``csrc``), the CUDA
headers NVRTC needs (``cuda_fp16.h``, ``cuda_bf16.h``: from the CUDA wheels torch installs, else a
toolkit), and a hash of the sources for the compile cache."""

from __future__ import annotations

import functools
import glob
import hashlib
import os
import pathlib
import sysconfig
from dataclasses import dataclass
from typing import Optional

try:
    from cuda import pathfinder as _pathfinder
except ImportError:  # cuda-pathfinder comes with cuda-bindings and cupy; without it, search by hand
    _pathfinder = None

from .._library import _C

__all__ = ["KernelSource", "csrc_dir", "kernel_sources", "cuda_include_dir", "source_hash", "cuda_headers_hash"]

_PACKAGE = pathlib.Path(__file__).resolve().parents[1]
_SOURCE_SUFFIXES = (".cu", ".cuh", ".h")
_CUDA_HEADERS = ("cuda_fp16.h", "cuda_fp16.hpp", "cuda_bf16.h", "cuda_bf16.hpp")


@dataclass(frozen=True)
class KernelSource:
    id: int                  # the plan's KernelSource (csrc/common/launch_plan.h)
    path: str                # under csrc/, e.g. "route/cuda/route_cuda.cu"
    kernels: tuple[str, ...]  # the name expression of every instantiation its executor launches


def csrc_dir() -> Optional[pathlib.Path]:
    """The kernel sources: the package's copy (wheels, setup.py build_py) or the checkout's csrc/."""
    for candidate in (_PACKAGE / "csrc", _PACKAGE.parent / "csrc"):
        if (candidate / "common" / "launch_plan.h").is_file():
            return candidate
    return None


def kernel_sources() -> dict[int, KernelSource]:
    """Every .cu source of the extension's launch plans, by source id (from l2r_cuda._C, which
    holds the plans and so the list of instantiations they can ask for)."""
    return {sid: KernelSource(sid, path, tuple(names)) for sid, path, names in _C.kernel_sources()}


def _has_fp16_header(path) -> bool:
    return path is not None and os.path.isfile(os.path.join(path, "cuda_fp16.h"))


def cuda_include_dir() -> Optional[str]:
    """A directory with the CUDA headers the kernels include (cuda_fp16.h, cuda_bf16.h): the CUDA
    runtime wheel's (nvidia/cu*/include, installed with torch) or a toolkit's (CUDA_HOME,
    /usr/local/cuda)."""
    if _pathfinder is not None:
        try:
            found = _pathfinder.find_nvidia_header_directory("cudart")
        except Exception:  # noqa: BLE001 (pathfinder raises its own errors for absent headers)
            found = None
        if _has_fp16_header(found):
            return found
    site = sysconfig.get_paths()["purelib"]
    for found in sorted(glob.glob(os.path.join(site, "nvidia", "*", "include"))) + sorted(
            glob.glob(os.path.join(site, "nvidia", "cuda_runtime", "include"))):
        if _has_fp16_header(found):
            return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and _has_fp16_header(os.path.join(home, "include")):
            return os.path.join(home, "include")
    return None


def _hash_files(root: pathlib.Path, paths) -> str:
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(str(path.relative_to(root)).encode())
        h.update(b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def source_hash(root: pathlib.Path) -> str:
    """A hash of every kernel source and header under ``root`` (a conservative cache key: any edit
    under csrc/ recompiles). Computed once per process."""
    return _hash_files(root, [p for p in root.rglob("*") if p.suffix in _SOURCE_SUFFIXES])


@functools.lru_cache(maxsize=None)
def cuda_headers_hash(include: str) -> str:
    """A hash of the CUDA headers the kernels include (the half and bfloat16 types)."""
    root = pathlib.Path(include)
    return _hash_files(root, [root / n for n in _CUDA_HEADERS if (root / n).is_file()])
