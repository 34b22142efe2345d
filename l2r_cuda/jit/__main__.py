"""``python -m l2r_cuda.jit``: which kernels serve CUDA tensors; with ``--check``, compile every
kernel instantiation with NVRTC (no GPU needed) and report registers and spills per kernel.

    python -m l2r_cuda.jit --check --arch sm_80 sm_90 [--json out.json] [--no-cache]

Exit status: 0 ok, 1 a spill, 2 a compile error or something NVRTC needs is missing.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from .backend import status
from .check import compile_all, format_table, spills
from .compiler import JitUnavailable
from .nvrtc import CompileError


def _default_archs() -> list[str]:
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return [f"sm_{major}{minor}"]
    return ["sm_80", "sm_90"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m l2r_cuda.jit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compile every kernel with NVRTC and report")
    parser.add_argument("--arch", nargs="+", default=None, help="e.g. sm_80 sm_90 (default: this GPU, or both)")
    parser.add_argument("--json", default=None, help="also write the per-kernel records to this file")
    parser.add_argument("--no-cache", action="store_true", help="compile even when the disk cache has the CUBIN")
    parser.add_argument("--jobs", type=int, default=2, help="programs compiled at once (default 2)")
    args = parser.parse_args(argv)
    print(f"l2r_cuda: {status()}")
    if not args.check:
        return 0
    archs = args.arch or _default_archs()
    try:
        records = compile_all(archs, use_cache=not args.no_cache, jobs=args.jobs)
    except (JitUnavailable, CompileError) as e:
        print(f"l2r_cuda.jit --check: {e}", file=sys.stderr)
        return 2
    print(format_table(records))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    bad = spills(records)
    kernels = len({r["kernel"] for r in records})
    print(f"\n{kernels} kernels, {len(records)} (kernel, arch) compiles by NVRTC for {' '.join(archs)}: "
          f"{len(bad)} with register spills")
    for r in bad:
        print(f"  SPILL sm_{r['arch']} {r['kernel']}: {r['spill_stores']} B stores, {r['spill_loads']} B loads",
              file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
