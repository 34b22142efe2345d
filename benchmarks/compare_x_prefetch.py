"""The CPU forward with and without its prefetch of the next rows of x (L2R_CPU_X_PREFETCH=1 / 0,
read once per process), in alternating processes on one machine.

    python -m benchmarks.compare_x_prefetch [--rounds 7] [--threads 2] [--dtype float32]

OLMoE's router shape (d = 2048, E = 64, k = 8, r = 8, H = 4), T = 8192 rows (64 MiB of fp32 x,
streamed from DRAM), no grad. Each round runs one process per setting, in alternating order; a
process times 9 calls after 5 warm-up calls and reports their median. Prints the median and
interquartile range of the rounds' medians per setting, the load average before and after, and
the CPU model. The kernel's default (route_cpu.cpp: on AMD processors only) came from this
comparison.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import statistics, sys, time, torch, l2r_cuda
threads, dtype = int(sys.argv[1]), getattr(torch, sys.argv[2])
torch.set_num_threads(threads)
g = torch.Generator().manual_seed(0)
T, d, E, k, r, H = 8192, 2048, 64, 8, 8, 4
x = torch.randn(T, d, generator=g).to(dtype)
proj, anchors = torch.randn(r, d, generator=g) / d ** 0.5, torch.randn(E, H, r, generator=g)
norm_weight = 1 + 0.1 * torch.randn(d, generator=g)
with torch.no_grad():
    for _ in range(5):
        out = l2r_cuda.route(x, proj, anchors, 5.0, top_k=k, norm_weight=norm_weight)
    times = []
    for _ in range(9):
        t0 = time.perf_counter()
        l2r_cuda.route(x, proj, anchors, 5.0, top_k=k, norm_weight=norm_weight)
        times.append(time.perf_counter() - t0)
print(statistics.median(times), int(out.indices.sum()))
"""


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare_x_prefetch", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args(argv)
    print(f"CPU: {cpu_model()}; load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    medians = {"1": [], "0": []}
    checks = set()
    for rnd in range(args.rounds):
        for flag in (("1", "0") if rnd % 2 == 0 else ("0", "1")):
            env = dict(os.environ, L2R_CPU_X_PREFETCH=flag)
            r = subprocess.run([sys.executable, "-c", CHILD, str(args.threads), args.dtype], env=env, cwd=ROOT,
                               capture_output=True, text=True, timeout=600)
            if r.returncode != 0:
                print(r.stderr[-3000:], file=sys.stderr)
                return 1
            median, check = r.stdout.split()
            medians[flag].append(float(median))
            checks.add(check)
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"T = 8192, d = 2048, r = 8, H = 4, {args.dtype} x, {args.threads} thread(s), {args.rounds} rounds")
    for flag, name in (("1", "prefetch"), ("0", "no prefetch")):
        v = sorted(medians[flag])
        q = statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3
        print(f"  {name:12s} median {statistics.median(v) * 1e3:.3f} ms  (IQR {q[0] * 1e3:.3f}-{q[2] * 1e3:.3f})")
    ratio = statistics.median(medians["0"]) / statistics.median(medians["1"])
    print(f"  no prefetch / prefetch = {ratio:.3f}; indices identical across settings: {len(checks) == 1}")
    return 0 if len(checks) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
