"""CPU benchmark of l2r_cuda.permute / unpermute against l2r_cuda.reference and a plain
torch.sort + index_select implementation, as GB/s and % of the memory-copy limit (x.clone()
bandwidth of a buffer the size of the permuted tensor, measured in the same run).

    PYTHONPATH=. python benchmarks/bench_permute.py [--quick] [--T 8192 --d 2048 --k 8 --E 64]

Bytes counted are the minimum traffic: permute reads T*d and writes N*d elements; unpermute reads
N*d (the T*k selected rows) and writes T*d; copy reads and writes its buffer once. Like every op
here, x.clone() allocates its output, so on CPU the limit includes first-touch page faults of a
fresh buffer; the steady-state copy into a preallocated buffer (dst.copy_) is printed for context.
Each timing is the minimum over --reps runs (robust on a shared, loaded machine).
"""

from __future__ import annotations

import argparse
import time

import torch

import l2r_cuda
from l2r_cuda import reference


def sort_permute(x, indices, num_experts):
    """Plain PyTorch dispatch: stable sort of the flat expert ids, gather rows."""
    T, k = indices.shape
    flat = indices.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    permuted = x.index_select(0, order // k)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.bincount(flat, minlength=num_experts), 0)
    row_map = torch.empty_like(order)
    row_map[order] = torch.arange(order.numel())
    return permuted, offsets, row_map.view(T, k)


def sort_unpermute(y, row_map, weights):
    T, k = row_map.shape
    rows = y.index_select(0, row_map.reshape(-1)).view(T, k, -1).float()
    return (rows * weights.unsqueeze(-1)).sum(1).to(y.dtype)


def timeit(fn, reps, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shape, few repetitions")
    ap.add_argument("--T", type=int, default=8192)
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--E", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--no-reference", action="store_true", help="skip the (slow) reference")
    args = ap.parse_args()
    if args.quick:
        args.T, args.d, args.reps = 1024, 512, 3
    dtype = getattr(torch, args.dtype)
    T, d, k, E = args.T, args.d, args.k, args.E
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, d, generator=g).to(dtype)
    indices = torch.rand(T, E, generator=g).argsort(dim=1)[:, :k]
    weights = torch.rand(T, k, generator=g)
    es = x.element_size()
    n_rows = T * k

    big = torch.randn(n_rows, d, generator=g).to(dtype)
    t_copy = timeit(lambda: big.clone(), args.reps)
    copy_gbs = 2 * big.numel() * es / t_copy / 1e9
    dst = torch.empty_like(big)
    steady_gbs = 2 * big.numel() * es / timeit(lambda: dst.copy_(big), args.reps) / 1e9
    del dst

    perm_bytes = (T * d + n_rows * d) * es
    unperm_bytes = (n_rows * d + T * d) * es
    permuted, _, row_map = l2r_cuda.permute(x, indices, E)

    impls = [("l2r_cuda (native)", l2r_cuda.permute, l2r_cuda.unpermute),
             ("torch.sort + index_select", sort_permute, sort_unpermute)]
    if not args.no_reference:
        impls.append(("l2r_cuda.reference", reference.permute, reference.unpermute))
    rows = []
    for name, perm, unperm in impls:
        tp = timeit(lambda: perm(x, indices, E), args.reps)
        tu = timeit(lambda: unperm(permuted, row_map, weights), args.reps)
        rows.append((name, tp, perm_bytes / tp / 1e9, tu, unperm_bytes / tu / 1e9))
    # Measure the copy again after the runs (load on a shared machine drifts): keep the best.
    copy_gbs = max(copy_gbs, 2 * big.numel() * es / timeit(lambda: big.clone(), args.reps) / 1e9)

    print(f"\nCPU, {torch.get_num_threads()} threads, T={T} d={d} k={k} E={E} {args.dtype}; "
          f"x.clone() copy bandwidth {copy_gbs:.2f} GB/s (the 100% below); "
          f"steady-state copy_ into a preallocated buffer {steady_gbs:.2f} GB/s\n")
    print("| implementation | permute ms | permute GB/s | % copy | unpermute ms | unpermute GB/s "
          "| % copy |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, tp, gp, tu, gu in rows:
        print(f"| {name} | {tp * 1e3:.2f} | {gp:.2f} | {100 * gp / copy_gbs:.0f}% | {tu * 1e3:.2f} | "
              f"{gu:.2f} | {100 * gu / copy_gbs:.0f}% |")


if __name__ == "__main__":
    main()
