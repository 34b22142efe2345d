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
from pathlib import Path

import torch

import l2r_cuda

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_jit_cuda import ROUTE_CASES as JIT_ROUTE_CASES  # noqa: E402  (the NVRTC tests' launch paths)
from test_jit_cuda import route_inputs  # noqa: E402

ROUTE_CASES = JIT_ROUTE_CASES + [
    dict(T=300, d=4096, r=32, E=8, H=1, k=2, dtype=torch.bfloat16, g=True),   # tensor cores (Mixtral)
    dict(T=257, d=2048, r=32, E=64, H=4, k=8, dtype=torch.bfloat16),      # tensor cores, partial tile
    dict(T=1, d=2048, r=8, E=64, H=4, k=8, dtype=torch.bfloat16),         # decode
]


def route_case(case: dict) -> None:
    x, proj, anchors, scale, norm_weight, bias, padding = route_inputs(case)
    x, proj, anchors, scale = (t.requires_grad_() for t in (x, proj, anchors, scale))
    if norm_weight is not None:
        norm_weight.requires_grad_()
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
