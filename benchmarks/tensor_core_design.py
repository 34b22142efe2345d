"""The cost model on the block decomposition proposed for the rank-32 forward's tensor-core
projection (tests/simt/kernels/project_mma.cu, project_split_kernel): bf16 x [T, d] against the
float32 projection split into three bf16 parts, d split over `splits` blocks, 32 S tokens per block.
A design experiment, not the route kernel: it runs only the projection (writing raw sums per split),
so the forward's routing and the sum over splits are not in these times. Modelled, not measured.

    python -m benchmarks.tensor_core_design [--tokens 1024 8192] [--d 4096] [--configs 2:2 4:2 ...]
        [--out benchmarks/results/tensor_core_design.md]

Registers come from nvcc -Xptxas -v when the toolkit is found (the occupancy), else 160.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import _gpu_cost as cost  # noqa: E402
from tests.simt import harness as simt  # noqa: E402

KERNEL = ROOT / "tests" / "simt" / "kernels" / "project_mma.cu"


def registers_by_s() -> dict[int, int]:
    """S -> registers of project_split_kernel<S> on sm_90 (ptxas), {} without nvcc."""
    nvcc = next((str(p) for p in (Path("/usr/local/cuda/bin/nvcc"),) if p.is_file()), None)
    if nvcc is None:
        return {}
    out = subprocess.run([nvcc, "-std=c++17", "-O3", "-arch=sm_90", f"-I{ROOT / 'csrc'}", "-cubin", str(KERNEL),
                          "-o", "/dev/null", "-Xptxas", "-v"], capture_output=True, text=True).stderr
    regs, current = {}, None
    for line in out.splitlines():
        m = re.search(r"Compiling entry function '.*project_split_kernelILi(\d+)E", line)
        if m:
            current = int(m.group(1))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and current is not None:
            regs[current] = int(m.group(1))
            current = None
    return regs


def aligned(a: np.ndarray) -> np.ndarray:
    """A copy of a at a 256-byte aligned address, as cudaMalloc gives (numpy guarantees only 16
    bytes, which would split every 64-byte run of a row over three 32-byte sectors)."""
    raw = np.empty(a.nbytes + 256, np.uint8)
    off = (-raw.ctypes.data) % 256
    out = raw[off:off + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", nargs="+", type=int, default=[1024, 8192])
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--configs", nargs="+", default=["2:1", "2:2", "4:1", "4:2"],
                   help="S:splits pairs (S m-tiles per m-group: 32 S tokens per block)")
    p.add_argument("--out", help="also write the table to this markdown file")
    args = p.parse_args(argv)
    lib = simt.build(sources=[KERNEL], include_dirs=[ROOT / "csrc"], name="project_mma")
    simt.set_checks(lib, memcheck=False, racecheck=False, counters=True)
    regs = registers_by_s()
    dev = cost.DEVICES["H200"]
    lines: list[str] = []

    def emit(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    emit("# Rank-32 projection on tensor cores: the block decomposition, modelled")
    emit("")
    emit(f"`python -m benchmarks.tensor_core_design {' '.join(argv if argv is not None else sys.argv[1:])}` at "
         f"{head}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. **Modelled** on the H200 "
         "(benchmarks/_gpu_cost.py on the SIMT emulator's counters), not measured. Projection only "
         f"(`project_split_kernel<S>` of tests/simt/kernels/project_mma.cu, d = {args.d}, rank 32, bf16 x, three "
         "bf16 parts of the projection, raw sums written per d split): no routing, no sum over the splits. "
         "S: m-tiles per m-group (32 S tokens per block); times in µs; % = reading x at HBM peak / estimate.")
    emit("")
    emit(f"registers (ptxas sm_90): {regs or 'nvcc not found, 160 assumed'}")
    emit("")
    emit("| T | S | splits | grid | regs | warps/SM | dram | l2 | l1 | smem | tensor | latency | est. µs | "
         "x at HBM peak µs | % | emulated s |")
    emit("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for T in args.tokens:
        x = aligned(rng.integers(0, 1 << 14, size=(T, args.d), dtype=np.uint16))  # finite bf16 bits
        w = aligned(rng.standard_normal((32, args.d)).astype(np.float32))
        roof_us = T * args.d * 2 / (dev.hbm_gbs * 1e9) * 1e6
        for cfg in args.configs:
            s, splits = (int(v) for v in cfg.split(":"))
            part = aligned(np.zeros((splits, T, 33), np.float32))
            simt.counters(lib)
            t0 = time.time()
            rc = simt.call(lib, "project_split_launch", simt.ptr(x), simt.ptr(w), simt.ctypes.c_int64(T),
                           simt.ctypes.c_int64(args.d), simt.ctypes.c_int(32), simt.ctypes.c_int(splits),
                           simt.ptr(part), simt.ctypes.c_int(s))
            secs = time.time() - t0
            assert rc == 0
            (rec,) = simt.counters(lib)
            rec["kernel"] = f"project_split_kernel<{s}>"
            est = cost.estimate(dev, rec, {cost.normalize_kernel(rec["kernel"]): regs.get(s, 160)})
            t = est.terms_us
            emit(f"| {T} | {s} | {splits} | {rec['grid'][0]} × 256 | {est.registers} | {est.warps_per_sm} | " +
                  " | ".join(f"{t[k]:.1f}" for k in ("dram", "l2", "l1", "smem", "tensor", "latency")) +
                  f" | {est.time_us:.1f} ({est.bound}) | {roof_us:.1f} | {100 * roof_us / est.time_us:.1f} | "
                 f"{secs:.0f} |")
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
