"""The CPU route forward+backward with its chunks claimed from a shared counter (the default) or
split into one fixed range per thread (L2R_CPU_FIXED_CHUNKS=1, read once per process), with and
without a neighbour process that takes part of one CPU, in alternating processes.

    python -m benchmarks.compare_chunk_claiming [--rounds 4] [--threads 2] [--neighbour-ms 3]

OLMoE's router shape (d = 2048, E = 64, k = 8, r = 8, H = 4), T = 8192, float32 x, gradients of
weights, mean_probs and lse. Each process times 45 identical calls after 3 warm-up calls. The
neighbour busy-waits --neighbour-ms of every 10 ms. Prints the median, 90th percentile and maximum
over all calls of each setting, and the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time
from benchmarks.spikes import fwd_bwd_step
step = fwd_bwd_step(int(sys.argv[1]))
for _ in range(3):
    grads = step()
times = []
for _ in range(45):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
print(json.dumps({"times": times, "check": float(sum(t.double().sum() for t in grads))}))
"""

NEIGHBOUR = """
import sys, time
busy = float(sys.argv[1]) / 1e3
while True:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < busy:
        pass
    time.sleep(max(0.0, 0.010 - busy))
"""


def run(fixed: bool, threads: int) -> dict:
    env = dict(os.environ, L2R_CPU_FIXED_CHUNKS="1" if fixed else "0")
    r = subprocess.run([sys.executable, "-c", CHILD, str(threads)], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare_chunk_claiming",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--neighbour-ms", type=float, default=3.0)
    args = p.parse_args(argv)
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    checks = set()
    for neighbour in (False, True):
        times = {"claimed": [], "fixed": []}
        proc = (subprocess.Popen([sys.executable, "-c", NEIGHBOUR, str(args.neighbour_ms)]) if neighbour else None)
        try:
            for rnd in range(args.rounds):
                for name in (("claimed", "fixed") if rnd % 2 == 0 else ("fixed", "claimed")):
                    out = run(name == "fixed", args.threads)
                    times[name] += out["times"]
                    checks.add(out["check"])
        finally:
            if proc is not None:
                proc.kill()
        label = f"neighbour busy {args.neighbour_ms:g} ms of 10" if neighbour else "no neighbour"
        for name, ts in times.items():
            ts = sorted(ts)
            print(f"  {label:26s} {name:8s} median {statistics.median(ts) * 1e3:6.2f} ms  "
                  f"p90 {ts[int(0.9 * len(ts))] * 1e3:6.2f}  max {ts[-1] * 1e3:6.2f}  ({len(ts)} calls)")
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}; gradients identical in every "
          f"process: {len(checks) == 1}")
    return 0 if len(checks) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
