"""Pure-PyTorch L2R routing: the oracle of every test and the baseline of every benchmark.

Everything here follows ``docs/SPEC.md`` line by line, runs on any device, is differentiable through
plain autograd and does its math in float32 whatever the input dtype. It is public API: when the
native op and this module disagree, this module states what the answer should be.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .types import DEFAULTS, NORMS, SCORES, RouteOutput

__all__ = ["RouteOutput", "route", "route_logits", "route_from_logits", "select_top_k", "group_limited_keys",
           "permute", "unpermute"]

def acc_dtype(x: Tensor) -> torch.dtype:
    """Math dtype: float32 for every input dtype, float64 kept for float64 (gradcheck)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _saturation(n: Tensor, beta: float) -> Tensor:
    # phi(n) = (1 - beta) + beta * tanh(n): a bounded confidence from a vector's norm.
    return (1.0 - beta) + beta * torch.tanh(n)


def route_logits(
    x: Tensor,
    proj: Tensor,
    anchors: Tensor,
    scale: Tensor,
    *,
    beta: float = DEFAULTS.beta,
    norm: Optional[str] = DEFAULTS.norm,
    norm_weight: Optional[Tensor] = None,
    eps_norm: float = DEFAULTS.eps_norm,
    eps: float = DEFAULTS.eps,
    tau: float = DEFAULTS.tau,
) -> Tensor:
    """Per-expert logits ``l [T, E]`` (float32) of docs/SPEC.md's forward, before softmax/sigmoid."""
    d = x.shape[-1]
    acc = acc_dtype(x)
    xf = x.reshape(-1, d).to(acc)
    if norm == "rms":
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps_norm)
        if norm_weight is not None:
            xf = xf * norm_weight.to(acc)
    q = xf @ proj.to(acc).t()  # [T, r]
    a = anchors.to(acc)  # [E, H, r]
    q_norm = torch.linalg.vector_norm(q, dim=-1)  # [T]
    a_norm = torch.linalg.vector_norm(a, dim=-1)  # [E, H]
    q_coef = _saturation(q_norm, beta) / q_norm.clamp_min(eps)
    a_coef = _saturation(a_norm, beta) / a_norm.clamp_min(eps)
    s = torch.einsum("tr,ehr->teh", q, a)
    s = scale.to(acc) * q_coef[:, None, None] * a_coef[None] * s  # [T, E, H]
    if anchors.shape[1] == 1:
        return s[..., 0]
    return tau * torch.logsumexp(s / tau, dim=-1)


def select_top_k(keys: Tensor, top_k: int) -> Tensor:
    """Indices of the ``top_k`` largest ``keys`` per row, descending.

    Ties go to the lower expert index; NaN ranks below every number (also below -inf), NaNs among
    themselves by index. Always ``top_k`` distinct indices in ``[0, E)``.
    """
    nan = torch.isnan(keys)
    order = torch.sort(keys.masked_fill(nan, -math.inf), dim=-1, descending=True, stable=True).indices
    # A second stable sort moves NaNs behind every number and keeps everything else in place.
    order = order.gather(-1, torch.sort(nan.gather(-1, order).to(torch.uint8), dim=-1, stable=True).indices)
    return order[:, :top_k]


def group_limited_keys(keys: Tensor, num_groups: int, topk_groups: int, group_score: str) -> Tensor:
    """Group-limited top-k (DeepSeek-V2/V3): ``keys [T, E]`` with every expert outside the
    ``topk_groups`` best of ``num_groups`` equal contiguous groups set to ``-inf`` and marked
    excluded. A group's score is the sum of its two best keys (``"top2_sum"``) or its best
    (``"max"``), "best" in :func:`select_top_k`'s order; groups rank the same way (ties to the lower
    group). Returns ``(keys, excluded [T, E] bool)``."""
    T, E = keys.shape
    per = E // num_groups
    grouped = keys.reshape(T, num_groups, per)
    best = grouped.gather(-1, select_top_k(grouped.reshape(T * num_groups, per), min(2, per)).reshape(T, num_groups, -1))
    scores = best[..., 0] if group_score == "max" else best[..., 0] + best[..., 1]
    kept = select_top_k(scores, topk_groups)
    group_kept = torch.zeros(T, num_groups, dtype=torch.bool, device=keys.device).scatter_(1, kept, True)
    excluded = ~group_kept.repeat_interleave(per, dim=1)
    return keys.masked_fill(excluded, -math.inf), excluded


def route(
    x: Tensor,
    proj: Tensor,
    anchors: Tensor,
    scale: Tensor,
    top_k: int = DEFAULTS.top_k,
    beta: float = DEFAULTS.beta,
    norm: Optional[str] = DEFAULTS.norm,
    norm_weight: Optional[Tensor] = None,
    eps_norm: float = DEFAULTS.eps_norm,
    tau: float = DEFAULTS.tau,
    score: str = DEFAULTS.score,
    normalize: bool = DEFAULTS.normalize,
    expert_bias: Optional[Tensor] = None,
    eps: float = DEFAULTS.eps,
    *,
    num_groups: Optional[int] = DEFAULTS.num_groups,
    topk_groups: Optional[int] = DEFAULTS.topk_groups,
    group_score: str = DEFAULTS.group_score,
    routed_scaling_factor: float = DEFAULTS.routed_scaling_factor,
    seq_len: Optional[int] = None,
    padding_mask: Optional[Tensor] = None,
) -> RouteOutput:
    """docs/SPEC.md's L2R router, unfused. Same signature and outputs as ``l2r_cuda.route``."""
    if score not in SCORES:
        raise ValueError(f"route(): score must be 'softmax' or 'sigmoid', got {score!r}")
    if norm not in NORMS:
        raise ValueError(f"route(): norm must be 'rms' or None, got {norm!r}")
    logits = route_logits(
        x, proj, anchors, scale, beta=beta, norm=norm, norm_weight=norm_weight,
        eps_norm=eps_norm, eps=eps, tau=tau,
    )
    return route_from_logits(
        logits, top_k, score=score, normalize=normalize, expert_bias=expert_bias,
        num_groups=num_groups, topk_groups=topk_groups, group_score=group_score,
        routed_scaling_factor=routed_scaling_factor, seq_len=seq_len, padding_mask=padding_mask,
    )


def route_from_logits(
    logits: Tensor,
    top_k: int,
    *,
    score: str = DEFAULTS.score,
    normalize: bool = DEFAULTS.normalize,
    expert_bias: Optional[Tensor] = None,
    num_groups: Optional[int] = DEFAULTS.num_groups,
    topk_groups: Optional[int] = DEFAULTS.topk_groups,
    group_score: str = DEFAULTS.group_score,
    routed_scaling_factor: float = DEFAULTS.routed_scaling_factor,
    seq_len: Optional[int] = None,
    padding_mask: Optional[Tensor] = None,
) -> RouteOutput:
    """docs/SPEC.md's routing steps after the logits ``l [T, E]``, for any router (L2R or linear).

    ``p = softmax(l)`` or ``sigmoid(l)``; ``indices`` = top-k of ``p + expert_bias`` (bias for
    selection only; ties to the lower expert index, NaN last), over the kept groups only with
    ``num_groups`` (:func:`group_limited_keys`); ``weights = p[indices]`` (renormalised to sum 1 if
    ``normalize``) times ``routed_scaling_factor``; ``lse = logsumexp_e l``. Statistics over the
    tokens that are not padding (``padding_mask`` True), per sequence of ``seq_len`` tokens when
    given (``[T / seq_len, E]``): ``tokens_per_expert`` counts selections, ``mean_probs`` averages
    the balancing probability ``p`` (softmax) or ``p / sum_e p`` (sigmoid); 0 without tokens.
    Math in float32 (float64 logits stay float64).
    """
    if score not in SCORES:
        raise ValueError(f"score must be 'softmax' or 'sigmoid', got {score!r}")
    logits = logits.to(acc_dtype(logits))
    T, num_experts = logits.shape
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.softmax(logits, dim=-1) if score == "softmax" else torch.sigmoid(logits)
    keys = probs.detach()
    if expert_bias is not None:
        keys = keys + expert_bias.detach().to(keys.dtype)
    if num_groups is not None and topk_groups is not None and num_groups > 1:
        masked, excluded = group_limited_keys(keys, num_groups, topk_groups, group_score)
        # Excluded experts rank below everything (also NaN keys of kept experts).
        order = select_top_k(masked, num_experts)
        order = order.gather(-1, torch.sort(excluded.gather(-1, order).to(torch.uint8), dim=-1, stable=True).indices)
        indices = order[:, :top_k]
    else:
        indices = select_top_k(keys, top_k)
    weights = probs.gather(-1, indices)
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True)
    weights = weights * routed_scaling_factor
    balance = probs if score == "softmax" else probs / probs.sum(-1, keepdim=True)
    groups = 1 if not seq_len else T // seq_len
    counted = torch.ones(T, dtype=torch.bool, device=logits.device) if padding_mask is None \
        else ~padding_mask.reshape(-1).to(torch.bool)
    selected = torch.zeros(T, num_experts, dtype=torch.int64, device=logits.device).scatter_(1, indices, 1)
    selected = selected * counted[:, None]
    tokens_per_expert = selected.reshape(groups, -1, num_experts).sum(1)
    count = counted.reshape(groups, -1).sum(1).to(balance.dtype)
    sums = (balance * counted[:, None].to(balance.dtype)).reshape(groups, -1, num_experts).sum(1)
    mean_probs = torch.where(count[:, None] > 0, sums / count.clamp_min(1)[:, None], sums * 0)
    if not seq_len:
        tokens_per_expert, mean_probs = tokens_per_expert[0], mean_probs[0]
    return RouteOutput(weights, indices, tokens_per_expert.to(torch.int64), mean_probs, lse)


def _check_permute_args(x: Optional[Tensor], indices: Tensor, num_experts: int, align: int = 1,
                        capacity: Optional[int] = None) -> None:
    if x is not None and x.dim() != 2:
        raise ValueError(f"permute(): x must be [T, d], got shape {tuple(x.shape)}")
    if indices.dim() != 2 or (x is not None and indices.shape[0] != x.shape[0]):
        raise ValueError(
            f"permute(): indices must be [T, k] with T = {x.shape[0] if x is not None else 'T'}, "
            f"got shape {tuple(indices.shape)}"
        )
    if num_experts < 1:
        raise ValueError(f"permute(): num_experts must be >= 1, got {num_experts}")
    if align < 1:
        raise ValueError(f"permute(): align must be >= 1, got {align}")
    if capacity is not None and capacity < 0:
        raise ValueError(f"permute(): capacity must be >= 0 or None, got {capacity}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= num_experts):
        raise ValueError(f"permute(): indices must be in [0, {num_experts}), got values in "
                         f"[{int(indices.min())}, {int(indices.max())}]")


def permute_plan(
    indices: Tensor,
    num_experts: int,
    *,
    align: int = 1,
    capacity: Optional[int] = None,
    weights: Optional[Tensor] = None,
    fixed_size: bool = False,
    pad_to_capacity: bool = False,
):
    """Where each (token, slot) goes: ``(row_map [T, k] int64, expert_offsets [E+1] int64, num_rows,
    dropped [E] int64)``.

    Rows are grouped by expert, stable by token index inside an expert. ``capacity`` keeps at most
    that many rows per expert: with ``weights``, the largest weights are kept (ties: lower token
    first; -0 == +0; a NaN weight ranks below every number), otherwise the lowest token indices.
    Kept rows stay in token order. Each expert's group is padded with zero rows to a multiple of
    ``align``; dropped slots get ``row_map = -1``. ``fixed_size`` sizes the output for the worst case
    (``T*k + E*(align-1)`` rows) so that its shape is known without looking at the routing.
    ``pad_to_capacity`` (needs ``capacity``) gives every expert a group of exactly ``C`` rows,
    ``C`` = capacity rounded up to ``align``: expert ``e`` owns rows ``[e*C, (e+1)*C)``.
    """
    _check_permute_args(None, indices, num_experts, align, capacity)
    if pad_to_capacity and capacity is None:
        raise ValueError("permute(): pad_to_capacity=True needs a capacity")
    T, k = indices.shape
    dev = indices.device
    E = num_experts
    flat = indices.reshape(-1).long()
    counts = torch.bincount(flat, minlength=E)
    # Keep-priority order inside each expert: stable sort by expert of a token-major order (which is
    # the flat order itself, or the flat order re-sorted by weight descending).
    prio = torch.arange(T * k, device=dev)
    if weights is not None and weights.shape != indices.shape:
        raise ValueError(f"permute(): weights must be [T, k] = {tuple(indices.shape)}, got "
                         f"{tuple(weights.shape)}")
    if capacity is not None and weights is not None:
        w = weights.detach().reshape(-1).float()
        w = torch.where(w == 0, torch.zeros_like(w), w)  # -0 == +0
        prio = torch.sort(-w, stable=True).indices  # descending weight, NaN last, ties by flat row
    prio = prio[torch.sort(flat[prio], stable=True).indices]
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(flat)
    rank[prio] = torch.arange(T * k, device=dev) - starts[flat[prio]]
    keep = rank < capacity if capacity is not None else torch.ones_like(flat, dtype=torch.bool)
    kept_counts = torch.bincount(flat[keep], minlength=E)
    offsets = torch.zeros(E + 1, dtype=torch.int64, device=dev)
    if pad_to_capacity:
        offsets[1:] = (-(-capacity // align) * align) * torch.arange(1, E + 1, device=dev)
    else:
        offsets[1:] = torch.cumsum((kept_counts + align - 1) // align * align, 0)
    # Kept rows in (expert, token) order; position inside the expert's group.
    order = torch.sort(flat, stable=True).indices
    order = order[keep[order]]
    expert = flat[order]
    pos = torch.arange(order.numel(), device=dev) - (torch.cumsum(kept_counts, 0) - kept_counts)[expert]
    row_map = torch.full((T * k,), -1, dtype=torch.int64, device=dev)
    row_map[order] = offsets[expert] + pos
    num_rows = T * k + E * (align - 1) if fixed_size and not pad_to_capacity else int(offsets[-1])
    return row_map.view(T, k), offsets, num_rows, counts - kept_counts


def permute(
    x: Tensor,
    indices: Tensor,
    num_experts: int,
    *,
    align: int = 1,
    capacity: Optional[int] = None,
    weights: Optional[Tensor] = None,
    fixed_size: bool = False,
    pad_to_capacity: bool = False,
):
    """``(permuted [N, d], expert_offsets [E+1] int64, row_map [T, k] int64)`` (see
    :func:`permute_plan`): row ``row_map[t, j]`` of ``permuted`` is ``x[t]``; padding rows and rows
    past ``expert_offsets[-1]`` are zero; dropped slots have ``row_map = -1``. Differentiable in x.
    """
    _check_permute_args(x, indices, num_experts, align, capacity)
    row_map, offsets, num_rows, _ = permute_plan(
        indices, num_experts, align=align, capacity=capacity, weights=weights, fixed_size=fixed_size,
        pad_to_capacity=pad_to_capacity,
    )
    flat_rows = row_map.reshape(-1)
    kept = flat_rows >= 0
    token = torch.arange(x.shape[0], device=x.device).repeat_interleave(indices.shape[1])
    out = x.new_zeros(num_rows, x.shape[1])
    out = out.index_put((flat_rows[kept],), x[token[kept]])
    return out, offsets, row_map


def unpermute(y: Tensor, row_map: Tensor, weights: Tensor) -> Tensor:
    """``out[t] = sum_j weights[t, j] * y[row_map[t, j]]``; dropped slots (``row_map < 0``) add
    exactly zero (also when the row they would read, or their weight, is NaN).

    Accumulates in float32 (float64 for float64 ``y``), returns ``y``'s dtype. Differentiable in
    ``y`` and ``weights``.
    """
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    kept = (row_map >= 0).unsqueeze(-1)
    if y.shape[0] == 0:  # every slot dropped
        y = y.new_zeros(1, y.shape[1])
    rows = y[row_map.clamp_min(0)].to(acc)  # [T, k, d]
    terms = torch.where(kept, weights.to(acc).unsqueeze(-1) * rows, torch.zeros((), dtype=acc, device=y.device))
    return terms.sum(1).to(y.dtype)
