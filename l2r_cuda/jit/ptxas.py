"""ptxas's resource report (``-Xptxas -v``: registers, spills, stack, shared memory per kernel), as
nvcc prints it and as NVRTC puts it in its program log. No imports beyond the standard library:
tests/test_cuda_compile.py loads this file for nvcc's reports without the built extension."""

from __future__ import annotations

import re

__all__ = ["parse_ptxas", "strip_internal_namespaces"]


def parse_ptxas(text: str) -> list[dict]:
    """One record per kernel (``name``: the mangled name; ``registers``, ``stack``, ``spill_stores``,
    ``spill_loads``, ``smem`` in bytes) from an ``-Xptxas -v`` report."""
    kernels: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            current = kernels.setdefault(m.group(1), {"name": m.group(1)})
            continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            current = kernels.setdefault(m.group(1), {"name": m.group(1)})
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            current["smem"] = int(s.group(1)) if s else 0
    return [k for k in kernels.values() if "registers" in k]


def strip_internal_namespaces(mangled: str) -> str:
    """A mangled name without its anonymous-namespace component (``<len>_GLOBAL__N_...``), whose
    hash differs between compilers and translation units: what makes nvcc's and NVRTC's names of
    one kernel comparable."""
    out, i = [], 0
    for m in re.finditer(r"(\d+)_GLOBAL__N_", mangled):
        if m.start() < i:
            continue
        length = int(m.group(1))
        out.append(mangled[i:m.start()])
        i = m.start() + len(m.group(1)) + length
    out.append(mangled[i:])
    return "".join(out)
