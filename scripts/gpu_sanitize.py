"""A short workload of every CUDA kernel family of l2r_cuda, for NVIDIA's compute-sanitizer
(scripts/gpu_check.sh runs it under memcheck, racecheck and initcheck, checking only l2r's
kernels). The SIMT emulator (tests/simt) runs the same kernels, but it cannot see what only a GPU
does: out-of-bounds accesses outside the tensors it was given, shared-memory hazards between warps
that run truly in parallel, reads of workspace nothing wrote. The shapes are small (the tools slow
kernels down 10-100x) but reach each launch path: every template rank (1, 2, 8, 16, 32 and a
generic one), bf16 / fp16 / fp32 rows, RMSNorm's gain, expert bias, group-limited top-k,
per-sequence statistics with padding, the > 48 KiB shared-memory and global-memory fallbacks, the
rank-32 tensor-core forward and backward, and permute / unpermute forward and backward with and
without capacity.

    python scripts/gpu_sanitize.py          # prints one line per case, exit 0
"""
from __future__ import annotations

import sys

import torch

import l2r_cuda

ROUTE_CASES = [
    dict(T=37, d=64, r=1, E=8, H=1, k=2),
    dict(T=64, d=128, r=4, E=16, H=2, k=4, dtype=torch.bfloat16, g=True, bias=True),
    dict(T=65, d=96, r=16, E=64, H=1, k=8, dtype=torch.float16, score="sigmoid", normalize=True),
    dict(T=33, d=64, r=40, E=33, H=2, k=3),                               # generic rank
    dict(T=9, d=1024, r=16, E=8, H=2, k=2, g=True),                       # > 48 KiB shared memory
    dict(T=5, d=4096, r=32, E=64, H=32, k=4, g=True),                     # global-memory fallbacks
    dict(T=64, d=90, r=2, E=64, H=1, k=6, num_groups=8, topk_groups=4),   # scalar loads, group-limited
    dict(T=64, d=64, r=8, E=32, H=4, k=4, seq_len=16, padding=True),      # per-sequence statistics
    dict(T=300, d=4096, r=32, E=8, H=1, k=2, dtype=torch.bfloat16, g=True),   # tensor cores (Mixtral)
    dict(T=257, d=2048, r=32, E=64, H=4, k=8, dtype=torch.bfloat16),      # tensor cores, partial tile
    dict(T=1, d=2048, r=8, E=64, H=4, k=8, dtype=torch.bfloat16),         # decode
]


def route_case(case: dict) -> None:
    g = torch.Generator().manual_seed(0)
    T, d, r, E, H = case["T"], case["d"], case["r"], case["E"], case["H"]
    x = torch.randn(T, d, generator=g).to(case.get("dtype", torch.float32)).cuda().requires_grad_()
    proj = (torch.randn(r, d, generator=g) / d ** 0.5).cuda().requires_grad_()
    anchors = torch.randn(E, H, r, generator=g).cuda().requires_grad_()
    scale = torch.tensor(4.0).cuda().requires_grad_()
    norm_weight = (1 + 0.2 * torch.randn(d, generator=g)).cuda().requires_grad_() if case.get("g") else None
    bias = (0.02 * torch.randn(E, generator=g)).cuda() if case.get("bias") else None
    padding = (torch.rand(T, generator=g) < 0.2).cuda() if case.get("padding") else None
    kw = {k: case[k] for k in ("score", "normalize", "num_groups", "topk_groups", "seq_len") if k in case}
    out = l2r_cuda.route(x, proj, anchors, scale, top_k=case["k"], norm_weight=norm_weight, expert_bias=bias,
                         padding_mask=padding, **kw)
    loss = (out.weights * torch.randn_like(out.weights)).sum() + out.lse.sum() + out.mean_probs.square().sum()
    loss.backward()
    l2r_cuda.ops.route_logits(x.detach(), proj.detach(), anchors.detach(), scale.detach(),
                              norm_weight=None if norm_weight is None else norm_weight.detach())
    torch.cuda.synchronize()


def permute_case(dtype: torch.dtype, capacity, align: int) -> None:
    g = torch.Generator().manual_seed(1)
    T, d, E, k = 97, 136, 16, 4
    x = torch.randn(T, d, generator=g).to(dtype).cuda().requires_grad_()
    indices = torch.rand(T, E, generator=g).topk(k, dim=1).indices.cuda()
    weights = torch.rand(T, k, generator=g).cuda().requires_grad_()
    perm = l2r_cuda.permute(x, indices, E, align=align, capacity=capacity, weights=weights.detach())
    y = perm[0] * 2
    out = l2r_cuda.unpermute(y, perm[2], weights)
    out.float().sum().backward()
    torch.cuda.synchronize()


def main() -> int:
    if not torch.cuda.is_available() or not l2r_cuda.cuda_built():
        print("gpu_sanitize: needs a GPU and a CUDA build of l2r_cuda", file=sys.stderr)
        return 3
    for case in ROUTE_CASES:
        route_case(case)
        print(f"route {case}: ok", flush=True)
    for dtype in (torch.float32, torch.bfloat16):
        for capacity, align in ((None, 1), (20, 8)):
            permute_case(dtype, capacity, align)
            print(f"permute {dtype} capacity={capacity} align={align}: ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
