"""``python -m benchmarks.dram_penalty``: what streaming ``x`` from DRAM adds per token, for
``l2r_cuda.route`` and for two plain PyTorch ops on the same machine, in the same run.

Why: the CPU acceptance targets compare the route forward with reading ``x`` once (``x.sum()``). On a
machine whose cores wait for DRAM even under a compute-bound kernel, no prefetching scheme of ours
closes that gap, and the figure to look at is how much a token costs with ``x`` cached against
streamed. This tool measures exactly that, per token, for
- ``route``: ``l2r_cuda.route`` forward (no grad), r x H anchors;
- ``gemm``: ``x @ W^T`` with ``W`` ``[E, d]`` (PyTorch's GEMM: compute-bound when cached);
- ``sum``: ``x.sum()`` (memory-bound: the read-x floor).
``--cached-tokens`` rows fit in the caches (x is re-read from L2/L3 call after call), ``--dram-tokens``
rows do not (each call streams x from memory). The ops are timed interleaved, block by block, round
after round, so a slow spell hits each alike; median and IQR of the per-block ns/token, with the load
average and the CPU model printed next to them (benchmarks/_timing.py).
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict, List, Optional

import torch

from benchmarks._timing import BlockTimer, _cpu_model, describe_load, machine_load, time_interleaved


def measure(tokens: int, d: int, experts: int, rank: int, anchors: int, top_k: int, dtype: torch.dtype,
            threads: int, rounds: int, block_s: float, seed: int = 0) -> Dict[str, tuple]:
    """ns/token (median, IQR over ``rounds`` interleaved blocks) of route / gemm / sum at ``tokens``
    rows."""
    import l2r_cuda

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d, generator=g).to(dtype)
    proj = torch.randn(rank, d, generator=g) / d ** 0.5
    anchor_t = torch.randn(experts, anchors, rank, generator=g)
    w_gate = torch.randn(experts, d, generator=g).to(dtype)
    ops: Dict[str, Callable[[], object]] = {
        "route": lambda: l2r_cuda.route(x, proj, anchor_t, 1.0, top_k=top_k),
        "gemm": lambda: torch.mm(x, w_gate.t()),
        "sum": lambda: x.sum(),
    }
    cpu = torch.device("cpu")
    with torch.no_grad():
        timers = {name: BlockTimer(fn, cpu, threads=threads, block_time=block_s) for name, fn in ops.items()}
        m = time_interleaved(timers, min_run_time=0.0, min_repeats=rounds, max_repeats=rounds)
    per_token = 1e9 / tokens
    return {name: (m[name].median * per_token, m[name].iqr * per_token) for name in ops}


def report(results: Dict[tuple, Dict[str, tuple]], cached: int, dram: int, threads_list: List[int]) -> List[str]:
    lines = ["| threads | op | cached ns/token (IQR) | DRAM ns/token (IQR) | DRAM - cached | DRAM / cached |",
             "|---|---|---|---|---|---|"]
    for th in threads_list:
        c, m = results[(th, cached)], results[(th, dram)]
        for name in c:
            (cm, ci), (mm, mi) = c[name], m[name]
            lines.append(f"| {th} | {name} | {cm:.0f} ({ci:.0f}) | {mm:.0f} ({mi:.0f}) | {mm - cm:+.0f} | "
                         f"{mm / cm:.2f} |")
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=2048)
    p.add_argument("--E", type=int, default=64)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--anchors", type=int, default=4)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--cached-tokens", type=int, default=240, help="rows that stay cached (default 240: 1.9 MB of fp32 x)")
    p.add_argument("--dram-tokens", type=int, default=8192,
                   help="rows streamed from DRAM (default 8192: 64 MB of fp32 x; give more rows than the last-level "
                        "cache holds: the Intel Xeon VM's 480 MiB L3 keeps 64 MB, so use 131072 there)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--block-s", type=float, default=0.02, help="seconds per timed block")
    args = p.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]

    start = machine_load()
    print(f"# dram_penalty: {_cpu_model()}; d={args.d} E={args.E} k={args.k} r={args.rank} H={args.anchors} "
          f"{args.dtype}; cached T={args.cached_tokens}, DRAM T={args.dram_tokens}; {args.rounds} rounds")
    print(f"# start: {describe_load(start)}")
    results = {}
    for th in args.threads:
        for tokens in (args.cached_tokens, args.dram_tokens):
            results[(th, tokens)] = measure(tokens, args.d, args.E, args.rank, args.anchors, args.k, dtype, th,
                                            args.rounds, args.block_s)
    print("\n".join(report(results, args.cached_tokens, args.dram_tokens, args.threads)))
    print(f"# end: {describe_load(machine_load())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
