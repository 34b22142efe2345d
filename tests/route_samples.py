"""The sample lists of the route ops that drive correctness, gradient and opcheck tests on every
backend (tests/backends.py): route_forward (sample_inputs), route_logits (logits_samples) and
route_select (select_samples)."""

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

    def scoring_kwargs(self) -> dict:
        """The options route_logits takes."""
        return {k: self.kwargs[k] for k in ("beta", "norm", "tau") if k in self.kwargs} | (
            {"norm_weight": self.kwargs["norm_weight"]} if self.kwargs.get("norm_weight") is not None else {})


def make_sample(T, d, r, E, H, k, *, beta=1.0, score="softmax", normalize=False, bias=False,
                norm="rms", norm_weight=False, dtype=torch.float32, scale=4.0, seed=0,
                tau=1.0, groups=None, group_score="top2_sum", scaling=1.0, seq_len=None,
                padding=False) -> RouteSample:
    """groups = (num_groups, topk_groups); padding: every third token (and all of one sequence
    when there are several) is padding."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, d, generator=g) * 2.0).to(dtype)
    proj = torch.randn(r, d, generator=g) / d ** 0.5
    anchors = torch.randn(E, H, r, generator=g)
    kwargs = dict(top_k=k, beta=beta, score=score, normalize=normalize, norm=norm, tau=tau)
    if norm_weight:
        kwargs["norm_weight"] = 0.5 + torch.rand(d, generator=g)
    if bias:
        kwargs["expert_bias"] = 0.05 * torch.randn(E, generator=g)
    if groups is not None:
        kwargs.update(num_groups=groups[0], topk_groups=groups[1], group_score=group_score)
    if scaling != 1.0:
        kwargs["routed_scaling_factor"] = scaling
    if seq_len is not None:
        kwargs["seq_len"] = seq_len
    if padding:
        mask = torch.arange(T) % 3 == 2
        if seq_len is not None and T >= 2 * seq_len:
            mask[:seq_len] = True  # a sequence without any counted token
        kwargs["padding_mask"] = mask
    name = (f"T{T}-d{d}-r{r}-E{E}-H{H}-k{k}-b{beta}-{score}{'-norm' if normalize else ''}"
            f"{'-bias' if bias else ''}-{norm}{'-g' if norm_weight else ''}-{str(dtype)[6:]}"
            f"{f'-G{groups[0]}of{groups[1]}{group_score}' if groups else ''}"
            f"{f'-s{scaling}' if scaling != 1.0 else ''}{f'-seq{seq_len}' if seq_len else ''}"
            f"{'-pad' if padding else ''}")
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
    # d past the CPU projections' d-blocks (512 floats forward, 256 backward) with a tail that is
    # not a whole lane vector, and r = 10: two row chunks of the register tiles.
    samples.append(make_sample(13, 4133, 10, 16, 2, 4, norm_weight=True, seed=103))
    samples.extend(policy_samples())
    return samples


def policy_samples() -> list[RouteSample]:
    """Production routing policies: group-limited top-k (DeepSeek-V3 top2_sum, V2 max), routed
    scaling factor, per-sequence statistics, padding masks; with and without each other."""
    return [
        make_sample(40, 32, 2, 16, 1, 4, score="sigmoid", bias=True, normalize=True, groups=(4, 2),
                    scaling=2.5, seed=200),  # DeepSeek-V3
        make_sample(40, 32, 8, 16, 2, 3, groups=(8, 3), group_score="max", seed=201),  # DeepSeek-V2
        make_sample(33, 48, 4, 64, 1, 8, groups=(8, 4), bias=True, dtype=torch.bfloat16, seed=202),
        make_sample(7, 32, 2, 12, 4, 2, groups=(6, 6), seed=203),  # every group kept
        make_sample(30, 32, 2, 8, 4, 2, seq_len=10, seed=204),
        make_sample(30, 32, 2, 8, 1, 3, seq_len=6, padding=True, score="sigmoid", seed=205),
        make_sample(31, 32, 4, 10, 2, 2, padding=True, normalize=True, scaling=0.5, seed=206),
        make_sample(24, 16, 2, 8, 2, 2, seq_len=8, padding=True, groups=(2, 1), dtype=torch.float16,
                    seed=207),
    ]


def logits_samples() -> list[RouteSample]:
    """route_logits: the scoring options (rank, anchors, beta, tau, norm, norm weight, dtype)."""
    return [s for i, s in enumerate(sample_inputs()[:24]) if i % 2 == 0] + [
        make_sample(0, 32, 2, 8, 4, 2, seed=300)]


def select_samples() -> list[tuple[str, torch.Tensor, dict]]:
    """route_from_logits (the linear router's routing): logits [T, E] with the selection options."""
    out = []
    for s in [*sample_inputs()[1::3], *policy_samples()]:
        g = torch.Generator().manual_seed(400 + len(out))
        T, E = s.x.shape[0], s.anchors.shape[0]
        logits = (2.0 * torch.randn(T, E, generator=g)).to(s.x.dtype)
        kw = {k: v for k, v in s.kwargs.items() if k not in ("beta", "norm", "tau", "norm_weight")}
        out.append((f"logits-T{T}-E{E}-" + s.name.split("-", 6)[-1], logits, kw))
    return out


def small_samples() -> list[RouteSample]:
    """A cheap subset for the slower checks (opcheck, gradcheck)."""
    return [s for s in sample_inputs() if s.x.shape[0] <= 7]
