"""Two builds of l2r_cuda timed against each other in one run, interleaved: a regression check.

    python -m benchmarks.compare_builds --baseline /path/to/other/worktree [--candidate .] [options]

Each build runs in a worker process of its own (two builds cannot share a process: both register
the ``l2r_cuda`` ops), importing ``l2r_cuda`` from its tree (built in place). The driver asks the
workers for one block of calls each in turn, round after round (which worker goes first alternates),
so a slow spell of the machine hits both builds alike. Reported per (dtype, mode): each build's
median and IQR over the blocks, the candidate / baseline ratio, and how far their outputs differ on
the same inputs; with the machine's load at the start and the end (``--strict`` refuses a busy
machine). Default shape: the OLMoE acceptance row (d=2048, E=64, k=8, T=8192, r=8, H=4).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Dict, List

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import _timing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The worker: inputs from fixed seeds, then one block of timed calls per request line.
WORKER = r"""
import json, math, sys, time
import torch
import torch.nn.functional as F
import l2r_cuda

cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg["threads"])
d, E, k, T, r, H = (cfg[n] for n in ("d", "E", "k", "T", "r", "H"))
dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
steps, outputs = {}, {}
for name in cfg["dtypes"]:
    dt = dtypes[name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, d, generator=g).to(dt)
    proj = (torch.randn(r, d, generator=g) / math.sqrt(d)).to(dt)
    anchors = F.normalize(torch.randn(E, H, r, generator=g), dim=-1).to(dt)
    scale = torch.tensor(5.0).to(dt)
    nw = (1 + 0.1 * torch.randn(d, generator=g)).to(dt)
    gw, gm, gl = torch.randn(T, k, generator=g), torch.randn(E, generator=g), torch.randn(T, generator=g)

    def fwd(x=x, proj=proj, anchors=anchors, scale=scale, nw=nw):
        with torch.no_grad():
            return l2r_cuda.route(x, proj, anchors, scale, top_k=k, norm_weight=nw)

    leaves = [t.detach().clone().requires_grad_(True) for t in (x, proj, anchors, scale, nw)]

    def fwdbwd(leaves=leaves, gw=gw, gm=gm, gl=gl):
        xs, p, a, s, w = leaves
        out = l2r_cuda.route(xs, p, a, s, top_k=k, norm_weight=w)
        return torch.autograd.grad([out.weights, out.mean_probs, out.lse], leaves, [gw, gm, gl])

    steps[(name, "fwd")] = fwd
    steps[(name, "fwdbwd")] = fwdbwd
    out = fwd()
    grads = fwdbwd()
    outputs[name] = {"weights": out.weights.double().flatten().tolist()[:4096],
                     "indices": out.indices.flatten().tolist()[:4096],
                     "grad_x": grads[0].double().flatten()[::997].tolist()}
isa = torch.ops.l2r_cuda.cpu_isa() if hasattr(torch.ops.l2r_cuda, "cpu_isa") else "avx2 or portable (no cpu_isa op)"
print(json.dumps({"ready": True, "outputs": outputs, "isa": isa}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    fn = steps[(req["dtype"], req["mode"])]
    times = []
    for _ in range(req["calls"]):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"times": times}), flush=True)
"""


class Worker:
    def __init__(self, tree: str, cfg: dict):
        env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
        env.pop("PYTHONSTARTUP", None)
        self.tree = tree
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(cfg)], cwd=os.path.abspath(tree),
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = self._read()
        self.outputs, self.isa = ready["outputs"], ready["isa"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker for {self.tree} exited (code {self.proc.wait()})")
        return json.loads(line)

    def block(self, dtype: str, mode: str, calls: int) -> List[float]:
        self.proc.stdin.write(json.dumps({"dtype": dtype, "mode": mode, "calls": calls}) + "\n")
        self.proc.stdin.flush()
        return self._read()["times"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _differences(a: dict, b: dict) -> str:
    w = max((abs(x - y) for x, y in zip(a["weights"], b["weights"])), default=0.0)
    same_idx = sum(x == y for x, y in zip(a["indices"], b["indices"])) / max(1, len(a["indices"]))
    gx = max((abs(x - y) for x, y in zip(a["grad_x"], b["grad_x"])), default=0.0)
    scale = max((abs(y) for y in b["grad_x"]), default=1.0) or 1.0
    return f"max|dw| {w:.1e}, indices equal {100 * same_idx:.2f}%, max|d grad_x| / max|grad_x| {gx / scale:.1e}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare_builds", description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", required=True, help="tree of the baseline build (l2r_cuda built in place)")
    p.add_argument("--candidate", default=ROOT, help="tree of the candidate build (default: this one)")
    for name, default in (("d", 2048), ("E", 64), ("k", 8), ("T", 8192), ("r", 8), ("H", 4)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else os.cpu_count())
    p.add_argument("--rounds", type=int, default=15, help="blocks per build and case")
    p.add_argument("--calls", type=int, default=5, help="calls per block")
    p.add_argument("--strict", action="store_true", help="refuse to time on a busy machine")
    args = p.parse_args(argv)

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = _timing.machine_load(1.0)
    print(f"load at start: {_timing.describe_load(load)}", flush=True)
    if _timing.is_busy(load, cpus):
        print("WARNING: the machine is busy" + ("; --strict: not timing" if args.strict else ""), flush=True)
        if args.strict:
            return 3
    cfg = dict(d=args.d, E=args.E, k=args.k, T=args.T, r=args.r, H=args.H, threads=args.threads, dtypes=args.dtypes)
    workers = {"baseline": Worker(args.baseline, cfg), "candidate": Worker(args.candidate, cfg)}
    times: Dict[tuple, List[float]] = {}
    try:
        for rnd in range(args.rounds):
            for dtype in args.dtypes:
                for mode in args.modes:
                    order = ["baseline", "candidate"] if rnd % 2 == 0 else ["candidate", "baseline"]
                    for who in order:
                        block = workers[who].block(dtype, mode, args.calls)
                        times.setdefault((who, dtype, mode), []).append(statistics.median(block))
    finally:
        for w in workers.values():
            w.close()
    end = _timing.machine_load(1.0)
    print(f"load at end: {_timing.describe_load(end)}")
    print(f"\nshape d={args.d} E={args.E} k={args.k} T={args.T} r={args.r} H={args.H}, {args.threads} thread(s), "
          f"{args.rounds} interleaved blocks of {args.calls} calls per build and case (block value: median call)")
    print(f"baseline {args.baseline} (cpu_isa {workers['baseline'].isa}); "
          f"candidate {args.candidate} (cpu_isa {workers['candidate'].isa})\n")
    print("| dtype | mode | baseline median (IQR) | candidate median (IQR) | candidate / baseline | outputs |")
    print("|---|---|---|---|---|---|")
    for dtype in args.dtypes:
        diff = _differences(workers["candidate"].outputs[dtype], workers["baseline"].outputs[dtype])
        for mode in args.modes:
            m = {who: _timing.Measurement(times[(who, dtype, mode)], args.calls, "perf_counter")
                 for who in workers}
            cells = [f"{m[w].median * 1e3:.2f} ms ({m[w].iqr * 1e3:.2f})" for w in ("baseline", "candidate")]
            print(f"| {dtype} | {mode} | {cells[0]} | {cells[1]} | "
                  f"{m['candidate'].median / m['baseline'].median:.3f} | {diff} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
