"""The on-disk cache of NVRTC output: one CUBIN (and its lowered names and compile log) per key,
where the key covers everything that decides the bytes (source hash, architecture, NVRTC version,
options, kernels). Writes are atomic (a temporary file renamed), so concurrent processes at worst
compile the same program twice."""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Optional

from .nvrtc import Compiled

__all__ = ["cache_dir", "load", "store"]


def cache_dir() -> pathlib.Path:
    """``$L2R_CUDA_JIT_CACHE``, else ``$XDG_CACHE_HOME/l2r_cuda/jit``, else ``~/.cache/l2r_cuda/jit``."""
    explicit = os.environ.get("L2R_CUDA_JIT_CACHE")
    if explicit:
        return pathlib.Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "l2r_cuda" / "jit"


def load(key: str) -> Optional[Compiled]:
    cubin, meta = cache_dir() / f"{key}.cubin", cache_dir() / f"{key}.json"
    try:
        info = json.loads(meta.read_text())
        return Compiled(cubin.read_bytes(), dict(info["lowered"]), info["log"])
    except (OSError, ValueError, KeyError):
        return None


def _write_atomic(path: pathlib.Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def store(key: str, compiled: Compiled, description: dict) -> None:
    """Saves ``compiled`` under ``key`` (the CUBIN first: a reader only trusts the JSON it finds)."""
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    _write_atomic(directory / f"{key}.cubin", compiled.cubin)
    meta = dict(description, lowered=compiled.lowered, log=compiled.log)
    _write_atomic(directory / f"{key}.json", json.dumps(meta, indent=1).encode())
