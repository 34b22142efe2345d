"""Routing diagnostics: load balance, confidence, routing-space geometry, specialization, stability.

All functions are side-effect free, run without autograd, accept tensors on any device and return
Python floats (plus the count tensor of :func:`expert_load`), so they can go straight to a logger.
They take the fields of a :class:`l2r_cuda.RouteOutput`, so they apply to any router.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from . import _library  # noqa: F401  (the native route_logits op gives routing_space its q)
from .types import RouteOutput

__all__ = [
    "ExpertLoad",
    "expert_load",
    "RouterConfidence",
    "router_confidence",
    "AngularDiversity",
    "angular_diversity",
    "routing_space",
    "ExpertSpecialization",
    "expert_specialization",
    "routing_stability",
]


def _entropy(p: Tensor, dim: int = -1) -> Tensor:
    # -sum p log p with 0 log 0 = 0, in nats.
    return -torch.where(p > 0, p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny)), torch.zeros_like(p)).sum(dim)


@dataclass
class ExpertLoad:
    """Expert load statistics (see :func:`expert_load`)."""

    counts: Tensor  # [E] int64, token assignments per expert
    fractions: Tensor  # [E] float64, counts / sum(counts)
    entropy: float  # H(fractions) / log(E), in [0, 1]; 1 = perfectly balanced
    max_over_mean: float  # max_e counts / mean_e counts; 1 = perfectly balanced, E = all on one expert


@torch.no_grad()
def expert_load(tokens_per_expert: Tensor) -> ExpertLoad:
    """Load statistics from ``RouteOutput.tokens_per_expert`` ``[E]``.

    ``entropy`` is the normalised entropy :math:`-\\sum_e f_e \\log f_e / \\log E` of the load
    fractions :math:`f_e` (1.0 when ``E = 1``); ``max_over_mean`` is the peak-to-average load ratio.
    With no assignments at all both are NaN (no load to describe).
    """
    counts = tokens_per_expert.detach().to(torch.int64).cpu()
    num_experts = counts.numel()
    total = int(counts.sum())
    if total == 0:
        return ExpertLoad(counts, torch.zeros(num_experts, dtype=torch.float64), math.nan, math.nan)
    fractions = counts.double() / total
    entropy = 1.0 if num_experts == 1 else float(_entropy(fractions)) / math.log(num_experts)
    max_over_mean = float(counts.max()) / (total / num_experts)
    return ExpertLoad(counts, fractions, entropy, max_over_mean)


@dataclass
class RouterConfidence:
    """Router confidence statistics (see :func:`router_confidence`)."""

    top1_weight: float  # mean over tokens of the largest routing weight
    entropy: Optional[float] = None  # mean per-token entropy of the routing distribution, nats
    entropy_normalized: Optional[float] = None  # the same divided by log(E), in [0, 1]


@torch.no_grad()
def router_confidence(weights: Tensor, probs: Optional[Tensor] = None) -> RouterConfidence:
    """Mean top-1 routing weight and, when ``probs [T, E]`` is given, the mean routing entropy.

    ``top1_weight`` = mean over tokens of ``max_j weights[t, j]`` (``RouteOutput.weights [T, k]``;
    with ``normalize=True`` routing this is the top expert's share of the token). The entropy is
    that of ``probs[t] / sum_e probs[t, e]`` (the renormalisation is a no-op for softmax scores and
    turns sigmoid scores into a distribution), averaged over tokens; ``entropy_normalized`` divides
    by ``log E`` so that 1 means uniform routing and 0 one-hot. ``T = 0`` gives NaN.
    """
    w = weights.detach().double()
    top1 = float(w.max(dim=-1).values.mean()) if w.numel() else math.nan
    if probs is None:
        return RouterConfidence(top1)
    p = probs.detach().double()
    p = p / p.sum(-1, keepdim=True)
    entropy = float(_entropy(p).mean()) if p.shape[0] else math.nan
    num_experts = p.shape[-1]
    normalized = 0.0 if num_experts == 1 else entropy / math.log(num_experts)
    return RouterConfidence(top1, entropy, normalized)


@dataclass
class AngularDiversity:
    """Spread of pairwise cosine similarities in the routing space (see :func:`angular_diversity`)."""

    cosine_mean: float  # mean over token pairs of cos(q_i, q_j)
    cosine_variance: float  # variance over token pairs of cos(q_i, q_j)
    cosine_variance_scaled: float  # cosine_variance * r: ~1 for isotropic directions in any dimension
    rank: int  # r, the routing dimension


@torch.no_grad()
def routing_space(router: torch.nn.Module, x: Tensor) -> Tensor:
    """Tokens projected into a router's routing space: ``q = W x~`` ``[T, r]`` float32.

    For :class:`l2r_cuda.L2RRouter` this is docs/SPEC.md's ``q`` (RMSNorm with ``norm_weight``, then
    ``proj``); for a linear router (a ``weight [E, d]`` attribute) it is its logit vector ``[T, E]``.
    """
    if hasattr(router, "proj"):
        # The native op's own q (RMSNorm with norm_weight, then proj): no second copy of the formula.
        xs = x.detach().reshape(-1, router.proj.shape[-1])
        norm = getattr(router, "norm", "rms")
        _, q, _ = torch.ops.l2r_cuda.route_logits(
            xs, router.proj.detach(), router.anchors.detach(), router.scale.detach(),
            None if router.norm_weight is None else router.norm_weight.detach(), float(router.beta), norm,
            float(getattr(router, "eps_norm", 1e-6)), float(getattr(router, "eps", 1e-6)), float(router.tau))
        return q.float()
    if hasattr(router, "weight"):
        weight = router.weight.detach().float()
        return x.detach().reshape(-1, weight.shape[-1]).float() @ weight.t()
    raise TypeError(f"routing_space(): {type(router).__name__} has neither 'proj' nor 'weight'")


@torch.no_grad()
def angular_diversity(q: Tensor, *, max_tokens: int = 4096, seed: int = 0) -> AngularDiversity:
    """Variance of the pairwise cosine similarity of routed tokens ``q [T, r]`` (all pairs ``i < j``).

    L2R's argument for a very low-rank routing space: in ``r`` dimensions the cosine of two random
    directions has variance ``1/r``, so high-dimensional routing spaces concentrate all cosines near
    0 and the scores stop discriminating. Because the raw variance mostly reflects ``r``, the value
    times ``r`` is reported too: about 1 for isotropic directions whatever ``r``, below 1 when the
    tokens are more uniformly spread than random, above 1 when they cluster into few directions.

    Zero vectors are dropped (no direction). More than ``max_tokens`` tokens: a random subset of
    that size (seeded, so repeated calls agree), since all pairs cost ``T^2``. Fewer than 2 tokens
    give NaN.
    """
    q = q.detach().reshape(-1, q.shape[-1]).double()
    rank = q.shape[-1]
    norms = torch.linalg.vector_norm(q, dim=-1)
    q = q[norms > 0] / norms[norms > 0, None]
    if q.shape[0] > max_tokens:
        generator = torch.Generator().manual_seed(seed)
        q = q[torch.randperm(q.shape[0], generator=generator)[:max_tokens].to(q.device)]
    n = q.shape[0]
    if n < 2:
        return AngularDiversity(math.nan, math.nan, math.nan, rank)
    cos = q @ q.t()
    rows, cols = torch.triu_indices(n, n, offset=1, device=q.device)
    pairs = cos[rows, cols]
    variance = float(pairs.var(unbiased=False))
    return AngularDiversity(float(pairs.mean()), variance, variance * rank, rank)


@dataclass
class ExpertSpecialization:
    """Label/expert dependence (see :func:`expert_specialization`)."""

    mutual_information: float  # I(label; expert) in bits
    label_entropy: float  # H(label) in bits
    normalized: float  # I / H(label), in [0, 1]: share of the label's uncertainty the expert explains


@torch.no_grad()
def expert_specialization(
    indices: Tensor,
    labels: Tensor,
    num_experts: int,
    num_labels: Optional[int] = None,
    *,
    use_all_top_k: bool = False,
) -> ExpertSpecialization:
    """Mutual information, in bits, between a token's label and the expert it is routed to.

    ``indices [T, k]`` (``RouteOutput.indices``), ``labels [T]`` non-negative integers (class, task,
    language, ...). The joint distribution ``P(label, expert)`` is the empirical one over:

    * ``use_all_top_k=False`` (default): the top-1 assignment ``indices[:, 0]`` (the first-selected
      expert), one sample per token;
    * ``use_all_top_k=True``: all ``T*k`` (token, slot) assignments, each token weighing ``1/k`` per
      slot, so every token counts once in total.

    :math:`I = \\sum_{l,e} P(l,e) \\log_2 \\frac{P(l,e)}{P(l)P(e)}`; 0 when routing ignores the label,
    ``H(label)`` when the expert determines the label. ``normalized = I / H(label)`` (0 if
    ``H(label) = 0``). Plug-in estimate: biased upward for few tokens per (label, expert) cell.
    """
    idx = indices.detach().long().cpu()
    lab = labels.detach().long().reshape(-1).cpu()
    if idx.dim() != 2 or idx.shape[0] != lab.shape[0]:
        raise ValueError(f"expert_specialization(): indices must be [T, k] and labels [T], got "
                         f"{tuple(indices.shape)} and {tuple(labels.shape)}")
    if num_labels is None:
        num_labels = int(lab.max()) + 1 if lab.numel() else 1
    if not use_all_top_k:
        idx = idx[:, :1]
    cells = (lab[:, None] * num_experts + idx).reshape(-1)
    joint = torch.bincount(cells, minlength=num_labels * num_experts).double().reshape(num_labels, num_experts)
    total = joint.sum()
    if total == 0:
        return ExpertSpecialization(math.nan, math.nan, math.nan)
    joint = joint / total  # k slots per token with equal weight == each slot weighs 1/k
    p_label = joint.sum(1)
    p_expert = joint.sum(0)
    ratio = joint / (p_label[:, None] * p_expert[None, :]).clamp_min(torch.finfo(torch.float64).tiny)
    mi = float(torch.where(joint > 0, joint * torch.log2(ratio.clamp_min(1e-300)), torch.zeros_like(joint)).sum())
    mi = max(mi, 0.0)  # round-off can give -1e-17 for independent variables
    label_entropy = float(_entropy(p_label)) / math.log(2)
    normalized = mi / label_entropy if label_entropy > 0 else 0.0
    return ExpertSpecialization(mi, label_entropy, normalized)


def _top_k_sets(result: Union[RouteOutput, Tensor]) -> Tensor:
    # A Tensor has an unrelated .indices() (sparse tensors): test for the tensor case first.
    indices = result if isinstance(result, Tensor) else result.indices
    return torch.sort(indices.detach().reshape(indices.shape[0], -1), dim=-1).values


@torch.no_grad()
def routing_stability(
    router: Callable[[Tensor], Union[RouteOutput, Tensor]],
    x: Tensor,
    noise_std: float = 1e-2,
    seed: int = 0,
) -> float:
    """Fraction of tokens whose top-k expert *set* is unchanged when ``x`` gets Gaussian noise.

    ``router(x)`` returns a ``RouteOutput`` (or an ``indices [T, k]`` tensor). Compares the sets (order
    within the top-k ignored) of ``router(x)`` and ``router(x + noise_std * n)``, ``n ~ N(0, I)``
    (absolute standard deviation, in the units of ``x``). The noise is drawn on the CPU from a
    generator seeded with ``seed`` and then moved to ``x``'s device, so a given seed perturbs
    identically on every device. A Lipschitz-bounded router should score close to 1 for small noise.
    """
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(device=x.device, dtype=x.dtype)
    clean = _top_k_sets(router(x))
    noisy = _top_k_sets(router(x + noise_std * noise))
    if clean.shape[0] == 0:
        return math.nan
    return float((clean == noisy).all(dim=-1).double().mean())
