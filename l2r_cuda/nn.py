"""Modules: the L2R router."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .ops import route
from .reference import NORMS, SCORES, RouteOutput

__all__ = ["L2RRouter", "MoE", "LinearRouter", "SwiGLUExperts"]


class L2RRouter(nn.Module):
    """Drop-in MoE router: ``router(x [..., d]) -> RouteOutput`` (SPEC.md), on the fused native op.

    Parameters and their initialization:

    - ``proj [r, d]``: orthonormal rows. After RMSNorm a token has norm ~sqrt(d), so each routing
      coordinate starts ~N(0, 1) and ``|q| ~ sqrt(r)``: the tanh saturation starts in its
      informative range instead of flat at 0 or 1.
    - ``anchors [E, H, r]``: random directions of unit norm (tanh(1) ~ 0.76 of full confidence), so
      experts start spread over the routing sphere and equally confident.
    - ``scale`` (0-dim): ``init_scale`` (default 5). Logits lie in ``[-scale, scale]``, so this sets
      how peaked the first routing decisions are; it is learned.
    - ``norm_weight [d]``: ones (RMSNorm's affine weight), present when ``norm="rms"``.
    - buffer ``expert_bias [E]`` float32: selection-only bias for aux-loss-free balancing
      (see ``l2r_cuda.losses``), zero at start, never receives a gradient.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        rank: int = 2,
        num_anchors: int = 4,
        beta: float = 1.0,
        score: str = "softmax",
        normalize: bool = False,
        norm: Optional[str] = "rms",
        tau: float = 1.0,
        init_scale: float = 5.0,
        eps_norm: float = 1e-6,
        eps: float = 1e-6,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"L2RRouter: top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"L2RRouter: beta must be in [0, 1], got {beta}")
        if score not in SCORES:
            raise ValueError(f"L2RRouter: score must be 'softmax' or 'sigmoid', got {score!r}")
        if norm not in NORMS:
            raise ValueError(f"L2RRouter: norm must be 'rms' or None, got {norm!r}")
        if rank < 1 or num_anchors < 1 or d_model < 1:
            raise ValueError(f"L2RRouter: d_model, rank and num_anchors must be >= 1, got "
                             f"{d_model}, {rank}, {num_anchors}")
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.num_experts, self.top_k = d_model, num_experts, top_k
        self.rank, self.num_anchors = rank, num_anchors
        self.beta, self.score, self.normalize, self.norm = beta, score, normalize, norm
        self.tau, self.eps_norm, self.eps, self.init_scale = tau, eps_norm, eps, init_scale
        self.proj = nn.Parameter(torch.empty(rank, d_model, **factory))
        self.anchors = nn.Parameter(torch.empty(num_experts, num_anchors, rank, **factory))
        self.scale = nn.Parameter(torch.empty((), **factory))
        if norm == "rms":
            self.norm_weight = nn.Parameter(torch.empty(d_model, **factory))
        else:
            self.register_parameter("norm_weight", None)
        self.register_buffer("expert_bias", torch.zeros(num_experts, device=device, dtype=torch.float32))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.rank <= self.d_model:
            nn.init.orthogonal_(self.proj)
        else:  # more routing dims than features: orthonormal columns instead
            nn.init.normal_(self.proj, std=1.0 / math.sqrt(self.d_model))
        nn.init.normal_(self.anchors)
        self.anchors.div_(torch.linalg.vector_norm(self.anchors, dim=-1, keepdim=True).clamp_min(1e-6))
        self.scale.fill_(self.init_scale)
        if self.norm_weight is not None:
            self.norm_weight.fill_(1.0)
        self.expert_bias.zero_()

    def forward(self, x: Tensor) -> RouteOutput:
        return route(
            x, self.proj, self.anchors, self.scale, top_k=self.top_k, beta=self.beta,
            norm=self.norm, norm_weight=self.norm_weight, eps_norm=self.eps_norm, tau=self.tau,
            score=self.score, normalize=self.normalize, expert_bias=self.expert_bias, eps=self.eps,
        )

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"rank={self.rank}, num_anchors={self.num_anchors}, beta={self.beta}, "
                f"score={self.score!r}, normalize={self.normalize}, norm={self.norm!r}")


# The MoE layer lives in moe.py (it needs the router above); re-exported so l2r_cuda.nn is the one
# place for modules.
from .moe import LinearRouter, MoE, SwiGLUExperts  # noqa: E402
