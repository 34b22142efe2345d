"""The compile check that needs no GPU: every kernel instantiation of every .cu source compiled by
NVRTC for the given architectures, with ptxas's registers, spills and stack per kernel. A compile
error or a spill fails it (``python -m l2r_cuda.jit --check --arch sm_80 sm_90``)."""

from __future__ import annotations

import concurrent.futures
from typing import Iterable, Optional, Sequence

from .compiler import arch_of, compile_kernels
from .ptxas import parse_ptxas
from .sources import KernelSource, kernel_sources

__all__ = ["compile_all", "spills", "format_table"]


def _records(source: KernelSource, arch: int, use_cache: bool) -> list[dict]:
    compiled = compile_kernels(source, source.kernels, arch, use_cache=use_cache)
    expression_of = {lowered: expression for expression, lowered in compiled.lowered.items()}
    records = [dict(r, arch=arch, source=source.path, kernel=expression_of.get(r["name"], r["name"]))
               for r in parse_ptxas(compiled.log)]
    missing = sorted(set(source.kernels) - {r["kernel"] for r in records})
    if missing:
        raise RuntimeError(f"l2r_cuda.jit: NVRTC's report for {source.path} on sm_{arch} lacks "
                           f"{len(missing)} kernels: {missing[:3]}")
    return records


def compile_all(archs: Iterable, *, use_cache: bool = True, sources: Optional[Sequence[KernelSource]] = None,
                jobs: int = 2) -> list[dict]:
    """One record per (kernel, architecture): ``kernel`` (the name expression), ``name`` (mangled),
    ``source``, ``arch``, ``registers``, ``spill_stores``, ``spill_loads``, ``stack``, ``smem``.
    Raises nvrtc.CompileError (with NVRTC's log) when a source does not compile."""
    sources = list(sources if sources is not None else kernel_sources().values())
    work = [(source, arch_of(a)) for source in sources for a in archs]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:  # NVRTC releases the GIL
        results = list(pool.map(lambda w: _records(w[0], w[1], use_cache), work))
    return [r for records in results for r in records]


def spills(records: Iterable[dict]) -> list[dict]:
    return [r for r in records if r.get("spill_stores", 0) or r.get("spill_loads", 0)]


def format_table(records: list[dict]) -> str:
    """Markdown: one row per kernel, registers (spill stores/loads, bytes) per architecture."""
    archs = sorted({r["arch"] for r in records})
    rows: dict[str, dict[int, dict]] = {}
    for r in records:
        rows.setdefault(r["kernel"], {})[r["arch"]] = r
    lines = ["| kernel | " + " | ".join(f"sm_{a} registers | sm_{a} spills (B)" for a in archs) + " |",
             "|---|" + "---:|---:|" * len(archs)]
    for kernel in sorted(rows):
        cells = []
        for a in archs:
            r = rows[kernel].get(a)
            cells += [str(r["registers"]), f"{r.get('spill_stores', 0)}/{r.get('spill_loads', 0)}"] if r else ["-", "-"]
        lines.append(f"| `{kernel}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)
