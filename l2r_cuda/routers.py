"""Router modules: :class:`L2RRouter` (the fused native op) and :class:`LinearRouter` (the usual
``softmax(x W_g^T)`` baseline). Both map ``x [..., d]`` to a :class:`l2r_cuda.RouteOutput` with the
same fields, dtypes and selection rule, so everything downstream (the MoE layer, the losses, the
metrics) is router-agnostic.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from .ops import checked_options, route_from_logits, route_logits, route_with_options
from .types import DEFAULTS, SCORES, RouteConfig, RouteOutput

__all__ = ["L2RRouter", "LinearRouter", "Fp32ExpertBias", "RouteRecorder", "router_parameters"]


class RouteRecorder(nn.Module):
    """A module that keeps the :class:`RouteOutput` of its last forward in ``self.last_route``
    (attached to the autograd graph, for the auxiliary losses).

    ``copy.deepcopy`` and pickling copy the module without it (the copy's ``last_route`` is
    ``None``); a subclass lists further per-forward records in ``_forward_records``.
    """

    last_route: Optional[RouteOutput]
    _forward_records = ("last_route",)

    def __init__(self):
        super().__init__()
        for name in self._forward_records:
            setattr(self, name, None)

    def __getstate__(self):
        # What deepcopy and pickle see: graph tensors cannot be copied, and a copy has not run a forward.
        state = dict(super().__getstate__())
        for name in self._forward_records:
            state[name] = None
        return state


class Fp32ExpertBias(nn.Module):
    """Keeps the ``expert_bias`` buffer float32 whatever ``.to(dtype)``, ``.half()``,
    ``.bfloat16()``, ``.double()`` or a parent's ``model.to(dtype)`` does to the module (all of them
    go through ``_apply``); device moves still apply.

    The bias is optimiser-free state updated by small steps (``losses.update_expert_bias_``,
    typically 1e-3): in bfloat16 most steps would round away, and the update rejects a non-fp32
    bias. The values are re-cast from the float32 original, so a round trip through a low
    precision loses nothing.
    """

    expert_bias: Tensor

    def _apply(self, fn, recurse=True):
        bias = self._buffers.get("expert_bias")
        super()._apply(fn, recurse)
        moved = self._buffers.get("expert_bias")
        if bias is not None and moved is not None and moved.dtype != torch.float32:
            self._buffers["expert_bias"] = bias.to(device=moved.device, dtype=torch.float32)
        return self


def _policy_repr(config: RouteConfig) -> str:
    text = ""
    if config.num_groups is not None:
        text += f", num_groups={config.num_groups}, topk_groups={config.topk_groups}, group_score={config.group_score!r}"
    if config.routed_scaling_factor != 1.0:
        text += f", routed_scaling_factor={config.routed_scaling_factor}"
    return text


_L2R_TENSORS = ("proj", "anchors", "scale", "norm_weight", "expert_bias")


def _tensor_attributes(module: nn.Module, names) -> tuple:
    """``tuple(getattr(module, n) for n in names)`` for parameters and buffers, without
    nn.Module.__getattr__'s failed-lookup path (a sizable share of a one-token call) where the
    tensor is a plain registered parameter or buffer; anything else (a parametrization's property,
    an attribute set by hand) goes through getattr."""
    params, buffers, own = module._parameters, module._buffers, module.__dict__
    out = []
    for name in names:
        if name in params and name not in own:
            out.append(params[name])
        elif name in buffers and name not in own:
            out.append(buffers[name])
        else:
            out.append(getattr(module, name))
    return tuple(out)


class L2RRouter(Fp32ExpertBias):
    """Drop-in MoE router: ``router(x [..., d]) -> RouteOutput`` (docs/SPEC.md), on the fused native op.

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
      (see ``l2r_cuda.losses``), zero at start, never receives a gradient, and stays float32
      whatever dtype the module is cast to (:class:`Fp32ExpertBias`).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        rank: int = 2,
        num_anchors: int = 4,
        beta: float = DEFAULTS.beta,
        score: str = DEFAULTS.score,
        normalize: bool = DEFAULTS.normalize,
        norm: Optional[str] = DEFAULTS.norm,
        tau: float = DEFAULTS.tau,
        init_scale: float = 5.0,
        eps_norm: float = DEFAULTS.eps_norm,
        eps: float = DEFAULTS.eps,
        num_groups: Optional[int] = DEFAULTS.num_groups,
        topk_groups: Optional[int] = DEFAULTS.topk_groups,
        group_score: str = DEFAULTS.group_score,
        routed_scaling_factor: float = DEFAULTS.routed_scaling_factor,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"L2RRouter: top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if rank < 1 or num_anchors < 1 or d_model < 1:
            raise ValueError(f"L2RRouter: d_model, rank and num_anchors must be >= 1, got "
                             f"{d_model}, {rank}, {num_anchors}")
        # Every routing option, checked once with the messages route() would give.
        self.config = RouteConfig(top_k=top_k, beta=beta, norm=norm, eps_norm=eps_norm, tau=tau, score=score,
                                  normalize=normalize, eps=eps, num_groups=num_groups, topk_groups=topk_groups,
                                  group_score=group_score, routed_scaling_factor=routed_scaling_factor)
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

    def forward(self, x: Tensor, *, seq_len: Optional[int] = None,
                padding_mask: Optional[Tensor] = None) -> RouteOutput:
        """Routes ``x [..., d]``; ``seq_len``/``padding_mask`` shape the statistics (see
        :func:`l2r_cuda.route`)."""
        proj, anchors, scale, norm_weight, expert_bias = _tensor_attributes(self, _L2R_TENSORS)
        return route_with_options(x, proj, anchors, scale, norm_weight, expert_bias, self._op_options(),
                                  seq_len=seq_len, padding_mask=padding_mask)

    def _op_options(self) -> tuple:
        # route()'s options as the op takes them, worked out once per config (a decode step is a
        # few microseconds: keyword plumbing would be a sizable share of it).
        c = self.config
        cached = self.__dict__.get("_op_options_cache")
        if cached is None or cached[0] is not c:
            cached = (c, checked_options(c.top_k, c.beta, c.norm, c.eps_norm, c.tau, c.score, c.normalize, c.eps,
                                         c.num_groups, c.topk_groups, c.group_score, c.routed_scaling_factor))
            self.__dict__["_op_options_cache"] = cached
        return cached[1]

    def logits(self, x: Tensor) -> Tensor:
        """The L2R logits ``[T, E]`` (float32) of ``x`` before softmax/sigmoid, differentiable."""
        c = self.config
        return route_logits(x, self.proj, self.anchors, self.scale, beta=c.beta, norm=c.norm,
                            norm_weight=self.norm_weight, eps_norm=c.eps_norm, eps=c.eps, tau=c.tau)

    def extra_repr(self) -> str:
        text = (f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"rank={self.rank}, num_anchors={self.num_anchors}, beta={self.beta}, "
                f"score={self.score!r}, normalize={self.normalize}, norm={self.norm!r}")
        return text + _policy_repr(self.config)


class LinearRouter(Fp32ExpertBias):
    """The standard MoE router ``p = softmax(x W_g^T)`` (or sigmoid), with L2RRouter's interface.

    ``router(x [..., d]) -> RouteOutput`` with the same fields, dtypes and selection rule as
    :class:`l2r_cuda.L2RRouter` (fp32 math, ``expert_bias`` buffer used for selection only), so the
    two are interchangeable in :class:`MoE` and in the losses. ``weight [E, d]`` starts as
    ``N(0, 1/d)``, so initial logits are O(1) for unit-RMS inputs. No input norm: the usual linear
    router sees the (already normalised) hidden state directly.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        score: str = DEFAULTS.score,
        normalize: bool = DEFAULTS.normalize,
        num_groups: Optional[int] = DEFAULTS.num_groups,
        topk_groups: Optional[int] = DEFAULTS.topk_groups,
        group_score: str = DEFAULTS.group_score,
        routed_scaling_factor: float = DEFAULTS.routed_scaling_factor,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"LinearRouter: top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if score not in SCORES:
            raise ValueError(f"LinearRouter: score must be 'softmax' or 'sigmoid', got {score!r}")
        self.config = RouteConfig(top_k=top_k, score=score, normalize=normalize, num_groups=num_groups,
                                  topk_groups=topk_groups, group_score=group_score,
                                  routed_scaling_factor=routed_scaling_factor)
        self._selection = self.config.selection_kwargs()
        self.d_model, self.num_experts, self.top_k = d_model, num_experts, top_k
        self.score, self.normalize = score, normalize
        self.weight = nn.Parameter(torch.empty(num_experts, d_model, device=device, dtype=dtype))
        self.register_buffer("expert_bias", torch.zeros(num_experts, device=device, dtype=torch.float32))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(self.d_model))
        self.expert_bias.zero_()

    def logits(self, x: Tensor) -> Tensor:
        """Router logits ``[T, E]`` float32 (leading dims of ``x`` flattened)."""
        return x.reshape(-1, self.d_model).float() @ self.weight.float().t()

    def forward(self, x: Tensor, *, seq_len: Optional[int] = None,
                padding_mask: Optional[Tensor] = None) -> RouteOutput:
        return route_from_logits(self.logits(x), self.config.top_k, expert_bias=self.expert_bias, seq_len=seq_len,
                                 padding_mask=padding_mask, **self._selection)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"score={self.score!r}, normalize={self.normalize}") + _policy_repr(self.config)


def router_parameters(module: nn.Module) -> Iterator[nn.Parameter]:
    """The parameters of every router inside ``module`` (L2RRouter, LinearRouter, and the routers of
    :mod:`l2r_cuda.integrations.hf` gates), e.g. for an optimizer that trains only the routers (RoMA)
    or for a separate learning rate."""
    seen = set()
    for sub in module.modules():
        if isinstance(sub, (L2RRouter, LinearRouter)):
            for param in sub.parameters():
                if id(param) not in seen:
                    seen.add(id(param))
                    yield param
