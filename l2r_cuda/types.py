"""The data types of l2r_cuda's public API, and the routing options with their defaults (held once).

Nothing here computes: :mod:`l2r_cuda.ops` (native ops), :mod:`l2r_cuda.routers` (modules) and
:mod:`l2r_cuda.reference` (the pure-PyTorch oracle) all take their defaults and checks from here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple, Optional

from torch import Tensor

__all__ = ["SCORES", "NORMS", "RouteOutput", "Permutation", "RouteConfig", "DEFAULTS"]

SCORES = ("softmax", "sigmoid")
NORMS = ("rms", None)


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

    def replace(self, **changes) -> "RouteConfig":
        return dataclasses.replace(self, **changes)


DEFAULTS = RouteConfig()
