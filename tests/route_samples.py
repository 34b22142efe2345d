"""The one list of route() sample inputs that drives correctness, gradient and opcheck tests (native
CPU here; the CUDA and emulated-CUDA tests reuse it)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Optional

import torch

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class RouteSample:
    name: str
    x: torch.Tensor
    proj: torch.Tensor
    anchors: torch.Tensor
    scale: torch.Tensor
    kwargs: dict = field(default_factory=dict)

    def args(self):
        return (self.x, self.proj, self.anchors, self.scale)

    def with_grad(self) -> "RouteSample":
        """Copy whose float inputs require grad (x keeps its dtype)."""
        def leaf(t: Optional[torch.Tensor]):
            return None if t is None else t.detach().clone().requires_grad_(True)

        kw = dict(self.kwargs)
        kw["norm_weight"] = leaf(kw.get("norm_weight"))
        return RouteSample(self.name, leaf(self.x), leaf(self.proj), leaf(self.anchors),
                           leaf(self.scale), kw)

    def to(self, device) -> "RouteSample":
        kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.kwargs.items()}
        return RouteSample(self.name, self.x.to(device), self.proj.to(device),
                           self.anchors.to(device), self.scale.to(device), kw)


def make_sample(T, d, r, E, H, k, *, beta=1.0, score="softmax", normalize=False, bias=False,
                norm="rms", norm_weight=False, dtype=torch.float32, scale=4.0, seed=0,
                tau=1.0) -> RouteSample:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, d, generator=g) * 2.0).to(dtype)
    proj = torch.randn(r, d, generator=g) / d ** 0.5
    anchors = torch.randn(E, H, r, generator=g)
    kwargs = dict(top_k=k, beta=beta, score=score, normalize=normalize, norm=norm, tau=tau)
    if norm_weight:
        kwargs["norm_weight"] = 0.5 + torch.rand(d, generator=g)
    if bias:
        kwargs["expert_bias"] = 0.05 * torch.randn(E, generator=g)
    name = (f"T{T}-d{d}-r{r}-E{E}-H{H}-k{k}-b{beta}-{score}{'-norm' if normalize else ''}"
            f"{'-bias' if bias else ''}-{norm}{'-g' if norm_weight else ''}-{str(dtype)[6:]}")
    return RouteSample(name, x, proj, anchors, torch.tensor(scale), kwargs)


def sample_inputs() -> list[RouteSample]:
    """Covers r in {1,2,8,32}, H in {1,4}, E in {1,8,64,160}, k in {1,2,8} (k <= E), beta in
    {0,0.5,1}, both scores, normalize on/off, expert bias and norm weight on/off, fp32/bf16/fp16,
    T in {0,1,7,300}: every value of every axis appears, varied together (not the full product)."""
    samples = []
    ranks, anchors, experts, ks = (1, 2, 8, 32), (1, 4), (1, 8, 64, 160), (1, 2, 8)
    betas, scores, tokens = (0.0, 0.5, 1.0), ("softmax", "sigmoid"), (1, 7, 300)
    for i, (r, H, E) in enumerate(itertools.product(ranks, anchors, experts)):
        k = min(ks[i % 3], E)
        samples.append(make_sample(
            tokens[i % 3], 48 if i % 2 else 64, r, E, H, k,
            beta=betas[i % 3], score=scores[(i // 3) % 2], normalize=bool(i % 4 >= 2),
            bias=bool(i % 5 in (1, 3)), norm_weight=bool(i % 3 == 1),
            norm=None if i % 7 == 6 else "rms", dtype=DTYPES[i % 3], seed=i,
            tau=0.5 if i % 8 == 5 else 1.0,
        ))
    samples.append(make_sample(0, 32, 2, 8, 4, 2, seed=100))  # T = 0
    samples.append(make_sample(0, 32, 2, 8, 1, 8, score="sigmoid", norm_weight=True, seed=101))
    samples.append(make_sample(5, 16, 3, 6, 2, 6, normalize=True, seed=102))  # k = E
    return samples


def small_samples() -> list[RouteSample]:
    """A cheap subset for the slower checks (opcheck, gradcheck)."""
    return [s for s in sample_inputs() if s.x.shape[0] <= 7]
