"""The data types of l2r_cuda's public API, and the routing options with their defaults (held once).

Nothing here computes: :mod:`l2r_cuda.ops` (native ops), :mod:`l2r_cuda.routers` (modules) and
:mod:`l2r_cuda.reference` (the pure-PyTorch oracle) all take their defaults and checks from here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

from torch import Tensor

__all__ = ["SCORES", "NORMS", "GROUP_SCORES", "DROP_POLICIES", "RouteOutput", "Permutation", "RouteConfig",
           "DEFAULTS"]

SCORES = ("softmax", "sigmoid")
NORMS = ("rms", None)
GROUP_SCORES = ("top2_sum", "max")
DROP_POLICIES = ("probs", "position")  # capacity drops the lowest router weights / the latest tokens


class RouteOutput(NamedTuple):
    """What ``route()`` returns (native op and reference alike).

    weights           [T, k] float32 (float64 for float64 x), differentiable
    indices           [T, k] int64, experts in descending order of selection key
    tokens_per_expert [E]    int64, how many tokens picked each expert
    mean_probs        [E]    float32, mean over tokens of the routing probability (Switch loss)
    lse               [T]    float32, logsumexp over experts of the logits (router z-loss)
    """

    weights: Tensor
    indices: Tensor
    tokens_per_expert: Tensor
    mean_probs: Tensor
    lse: Tensor


class Permutation(NamedTuple):
    """What ``permute()`` returns."""

    permuted: Tensor        # [N, d], x's dtype; rows grouped by expert, zero padding rows
    expert_offsets: Tensor  # [E+1] int64; expert e owns rows [offsets[e], offsets[e+1])
    row_map: Tensor         # [T, k] int64; row of (token t, slot j) in permuted, -1 if dropped


@dataclass(frozen=True)
class RouteConfig:
    """Every option of L2R routing after the tensors (docs/SPEC.md), with its default and its check.

    ``route()``, ``reference.route()`` and :class:`l2r_cuda.L2RRouter` take these as keyword
    arguments with exactly these defaults; construction validates them (``ValueError`` naming the
    option and the value).
    """

    top_k: int = 8
    beta: float = 1.0
    norm: Optional[str] = "rms"
    eps_norm: float = 1e-6
    tau: float = 1.0
    score: str = "softmax"
    normalize: bool = False
    eps: float = 1e-6
    # Group-limited top-k (DeepSeek-V2/V3): experts in num_groups equal contiguous groups, top-k
    # over the topk_groups best groups only. None: no group limit.
    num_groups: Optional[int] = None
    topk_groups: Optional[int] = None
    group_score: str = "top2_sum"
    routed_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise TypeError(f"l2r_cuda.route: top_k must be an int, got {self.top_k!r}")
        if self.top_k < 1:
            raise ValueError(f"l2r_cuda.route: top_k must be >= 1, got {self.top_k}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"l2r_cuda.route: beta must be in [0, 1], got {self.beta}")
        if self.norm not in NORMS:
            raise ValueError(f"l2r_cuda.route: norm must be 'rms' or None, got {self.norm!r}")
        if self.score not in SCORES:
            raise ValueError(f"l2r_cuda.route: score must be 'softmax' or 'sigmoid', got {self.score!r}")
        if not self.eps_norm >= 0.0:
            raise ValueError(f"l2r_cuda.route: eps_norm must be >= 0, got {self.eps_norm}")
        for name in ("tau", "eps"):
            if not getattr(self, name) > 0.0:
                raise ValueError(f"l2r_cuda.route: {name} must be > 0, got {getattr(self, name)}")
        group_args(self.num_groups, self.topk_groups, self.group_score)
        if not math.isfinite(self.routed_scaling_factor):
            raise ValueError(f"l2r_cuda.route: routed_scaling_factor must be finite, got "
                             f"{self.routed_scaling_factor}")

    def replace(self, **changes) -> "RouteConfig":
        return dataclasses.replace(self, **changes)

    def selection_kwargs(self) -> dict:
        """The options of the routing after the logits, as ``route``/``route_from_logits`` take
        them (shared by every router)."""
        return dict(score=self.score, normalize=self.normalize, num_groups=self.num_groups,
                    topk_groups=self.topk_groups, group_score=self.group_score,
                    routed_scaling_factor=self.routed_scaling_factor)


def group_args(num_groups: Optional[int], topk_groups: Optional[int], group_score: str):
    """``(num_groups, topk_groups, group_score)`` as the native ops take them (``(1, 1, ...)``: no
    group limit), after the checks that need no tensor."""
    if group_score not in GROUP_SCORES:
        raise ValueError(f"l2r_cuda.route: group_score must be 'top2_sum' or 'max', got {group_score!r}")
    if num_groups is None:
        if topk_groups is not None:
            raise ValueError(f"l2r_cuda.route: topk_groups={topk_groups} needs num_groups")
        return 1, 1, group_score
    if topk_groups is None:
        raise ValueError(f"l2r_cuda.route: num_groups={num_groups} needs topk_groups (how many groups "
                         "to keep)")
    for name, v in (("num_groups", num_groups), ("topk_groups", topk_groups)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"l2r_cuda.route: {name} must be an int >= 1, got {v!r}")
    return num_groups, topk_groups, group_score


DEFAULTS = RouteConfig()
