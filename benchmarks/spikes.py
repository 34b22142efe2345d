"""Where a slow call of identical route forward+backward calls loses its time: for each call the
wall time, the process's CPU time (all threads), page faults, context switches and Python garbage
collections, and the same figures for the typical call.

    python -m benchmarks.spikes [--calls 450] [--threads 2] [--dtype float32]

OLMoE's router shape (d = 2048, E = 64, k = 8, r = 8, H = 4), T = 8192, float32 x, gradients of
weights, mean_probs and lse with respect to x, proj, anchors and the norm weight (the benchmark's
forward+backward step). A call that is slow while the process used no more CPU time than usual,
faulted no more pages and ran no collection was not running: its threads were descheduled
(another process, or the hypervisor taking the virtual CPUs). Prints the load average with it.
"""
from __future__ import annotations

import argparse
import gc
import os
import resource
import statistics
import sys
import time


def fwd_bwd_step(threads: int, dtype: str = "float32"):
    """The benchmark's forward+backward call at OLMoE's router shape, T = 8192 (also run by
    benchmarks/compare_chunk_claiming.py): a callable returning the four gradients."""
    import torch

    import l2r_cuda

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    T, d, E, k, r, H = 8192, 2048, 64, 8, 8, 4
    x = torch.randn(T, d, generator=g).to(getattr(torch, dtype)).requires_grad_()
    proj = (torch.randn(r, d, generator=g) / d ** 0.5).requires_grad_()
    anchors = torch.randn(E, H, r, generator=g).requires_grad_()
    norm_weight = (1 + 0.1 * torch.randn(d, generator=g)).requires_grad_()
    gw, gm, gl = torch.randn(T, k, generator=g), torch.randn(E, generator=g), torch.randn(T, generator=g)

    def step():
        out = l2r_cuda.route(x, proj, anchors, 5.0, top_k=k, norm_weight=norm_weight)
        return torch.autograd.grad([out.weights, out.mean_probs, out.lse], [x, proj, anchors, norm_weight],
                                   [gw, gm, gl])

    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.spikes", description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=450)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--slow", type=float, default=1.3, help="a call slower than this times the median is listed")
    args = p.parse_args(argv)

    step = fwd_bwd_step(args.threads, args.dtype)

    collections = []
    gc.callbacks.append(lambda phase, info: collections.append(info["generation"]) if phase == "stop" else None)
    for _ in range(3):
        step()
    load_before = os.getloadavg()
    rows = []
    for _ in range(args.calls):
        u0, n0 = resource.getrusage(resource.RUSAGE_SELF), len(collections)
        c0, t0 = time.process_time(), time.perf_counter()
        step()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        u1 = resource.getrusage(resource.RUSAGE_SELF)
        rows.append({"wall": wall, "cpu": cpu, "faults": u1.ru_minflt - u0.ru_minflt,
                     "involuntary": u1.ru_nivcsw - u0.ru_nivcsw, "voluntary": u1.ru_nvcsw - u0.ru_nvcsw,
                     "gc": collections[n0:]})
    med = statistics.median(r["wall"] for r in rows)
    typical = [r for r in rows if r["wall"] <= 1.1 * med]
    slow = [r for r in rows if r["wall"] > args.slow * med]
    print(f"load average before {' '.join(f'{v:.2f}' for v in load_before)}, after "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}; {args.threads} thread(s), {args.dtype}, {args.calls} calls")

    def line(name, r):
        gcs = ",".join(map(str, r["gc"])) if isinstance(r["gc"], list) else r["gc"]
        return (f"  {name:9s} wall {r['wall'] * 1e3:7.2f} ms  cpu {r['cpu'] * 1e3:7.2f} ms  page faults {r['faults']:6.0f}"
                f"  context switches {r['involuntary']:4.1f} involuntary, {r['voluntary']:5.1f} voluntary  gc {gcs or '-'}")

    mean = {key: statistics.mean(r[key] for r in typical) for key in ("wall", "cpu", "faults", "involuntary", "voluntary")}
    mean["gc"] = f"{sum(len(r['gc']) for r in typical)} in {len(typical)} calls"
    print(f"median wall {med * 1e3:.2f} ms; max / median {max(r['wall'] for r in rows) / med:.2f}; "
          f"{len(slow)} call(s) over {args.slow}x the median")
    print(line("typical", mean))
    for r in slow:
        print(line("slow", r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
