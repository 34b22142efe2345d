"""The contract between a transformers MoE block and its gate, and :class:`L2RGate`, the gate that
honours it with an :class:`l2r_cuda.L2RRouter` (see :mod:`l2r_cuda.integrations.hf`).

What a gate does is read off the original gate (:func:`read_gate`): its geometry, whether it
renormalises the top-k weights, its score function, and every routing feature it has beyond a
plain linear score. Features the L2R router carries are mapped; any other one raises
:class:`UnsupportedGateFeature` naming it, so nothing is dropped silently.

Mapped routing policies (DeepSeek-V2/V3 and the gates written after V3's):

* ``num_group``/``n_group`` and ``topk_group`` -> ``num_groups``/``topk_groups`` (group-limited
  top-k; a single group is no limit), with ``group_score="max"`` for DeepSeek-V2's
  ``topk_method="group_limited_greedy"`` (a group scores its best expert) and ``"top2_sum"``
  otherwise (DeepSeek-V3: the sum of its two best);
* ``routed_scaling_factor`` -> ``routed_scaling_factor`` (multiplies the weights after the
  renormalisation);
* ``e_score_correction_bias`` -> the router's ``expert_bias`` (float32, selection only, counted in
  the group scores as V3 does); its presence marks a sigmoid gate unless ``scoring_func`` says;
* ``norm_topk_prob`` -> ``normalize``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ..routers import L2RRouter, RouteRecorder
from ..types import DEFAULTS

__all__ = ["GateContract", "L2RGate", "UnsupportedGateFeature", "read_gate", "original_routing", "GATE_ATTRIBUTES",
           "POLICY_OPTIONS"]

# Where a block keeps its gate: transformers' MoE blocks call it `gate`, GPT-OSS's MLP `router`.
GATE_ATTRIBUTES = ("gate", "router")


class UnsupportedGateFeature(ValueError):
    """The original gate has a routing feature the L2R drop-in cannot carry (the message names it)."""


@dataclass(frozen=True)
class GateContract:
    """What an original gate computes, in the terms of :class:`l2r_cuda.L2RRouter`.

    ``mode``: ``"top_k"`` (transformers >= 5: the gate returns ``(logits, weights, indices)``) or
    ``"logits"`` (transformers 4.x ``nn.Linear``: the block does softmax and top-k). ``normalize``:
    whether the gate renormalises its top-k weights (``None``: the gate does not say).
    ``expert_bias``: the selection-only bias to copy into the router (``None``: zero).
    ``num_groups``/``topk_groups``/``group_score``/``routed_scaling_factor``: the gate's routing
    policy, as :class:`l2r_cuda.L2RRouter` takes it (:attr:`policy`).
    """

    hidden_dim: int
    num_experts: int
    top_k: int
    mode: str
    score: str
    normalize: Optional[bool]
    expert_bias: Optional[Tensor] = None
    logit_bias: Optional[Tensor] = None  # a per-expert additive logit term (GPT-OSS), which L2R has no slot for
    num_groups: Optional[int] = DEFAULTS.num_groups
    topk_groups: Optional[int] = DEFAULTS.topk_groups
    group_score: str = DEFAULTS.group_score
    routed_scaling_factor: float = DEFAULTS.routed_scaling_factor

    @property
    def policy(self) -> Dict[str, Any]:
        """The routing policy as :class:`l2r_cuda.L2RRouter` keyword arguments (:data:`POLICY_OPTIONS`)."""
        return {name: getattr(self, name) for name in POLICY_OPTIONS}


# The router options read off each gate (the model's routing policy), never given to replace_routers.
POLICY_OPTIONS = ("num_groups", "topk_groups", "group_score", "routed_scaling_factor")


def _reject(gate: nn.Module, feature: str, why: str) -> None:
    raise UnsupportedGateFeature(f"{type(gate).__name__}.{feature}: {why}")


# Gates without a norm_topk_prob attribute whose forward renormalises the top-k weights (or not).
_RENORMALIZES = {"MixtralTopKRouter": True, "GptOssTopKRouter": True, "DeepseekV2TopkRouter": False}

# Parameters and buffers a gate may have, beyond which its routing would not be what L2R reproduces.
_LINEAR_SCORE_TENSORS = {"weight", "bias"}
_MAPPED_TENSORS = {"e_score_correction_bias"}


def read_gate(block: nn.Module, gate: nn.Module) -> GateContract:
    """The :class:`GateContract` of ``gate`` (the module at ``block.gate`` / ``block.router``).

    Raises :class:`UnsupportedGateFeature` for a routing feature the L2R router cannot carry, and
    ``ValueError`` when the gate follows neither transformers contract.
    """
    if isinstance(gate, nn.Linear):  # transformers 4.x: the block does softmax and top-k itself
        top_k = getattr(block, "top_k", None)
        if top_k is None:
            raise ValueError(f"{type(block).__name__}: a linear gate but no block.top_k")
        normalize = bool(getattr(block, "norm_topk_prob", True))
        bias = gate.bias.detach() if gate.bias is not None else None
        return GateContract(gate.in_features, gate.out_features, int(top_k), "logits", "softmax", normalize,
                            logit_bias=bias)
    try:
        num_experts, hidden_dim, top_k = int(gate.num_experts), int(gate.hidden_dim), int(gate.top_k)
    except AttributeError as err:
        raise ValueError(
            f"{type(block).__name__}.gate ({type(gate).__name__}) has neither the transformers>=5 TopKRouter "
            "attributes (top_k, num_experts, hidden_dim) nor is an nn.Linear"
        ) from err
    weight = getattr(gate, "weight", None)
    if weight is not None and tuple(weight.shape) != (num_experts, hidden_dim):
        raise ValueError(f"{type(gate).__name__}.weight has shape {tuple(weight.shape)}, expected "
                         f"({num_experts}, {hidden_dim})")
    for name, _ in list(gate.named_parameters(recurse=False)) + list(gate.named_buffers(recurse=False)):
        if name not in _LINEAR_SCORE_TENSORS | _MAPPED_TENSORS:
            _reject(gate, name, "a gate tensor the L2R drop-in has no counterpart for")
    if any(True for _ in gate.children()):
        _reject(gate, "children", "a gate with submodules is not a linear score the L2R drop-in can replace")

    policy = _read_policy(gate, num_experts, top_k)
    correction = getattr(gate, "e_score_correction_bias", None)
    score = getattr(gate, "scoring_func", None)
    if score is None:  # transformers' sigmoid gates are those with a score-correction bias (DeepSeek-V3 family)
        score = "sigmoid" if correction is not None else "softmax"
    if score not in ("softmax", "sigmoid"):
        _reject(gate, "scoring_func", f"scoring_func={score!r}: L2R scores with softmax or sigmoid")
    normalize = getattr(gate, "norm_topk_prob", _RENORMALIZES.get(type(gate).__name__))
    bias = getattr(gate, "bias", None)
    return GateContract(
        hidden_dim, num_experts, top_k, "top_k", score, None if normalize is None else bool(normalize),
        expert_bias=correction.detach() if correction is not None else None,
        logit_bias=bias.detach() if isinstance(bias, Tensor) else None, **policy,
    )


# DeepSeek-V2's topk_method values ("greedy": plain top-k; "group_limited_greedy": groups scored by
# their best expert) and the old remote-code DeepSeek-V3's ("noaux_tc": groups scored by the sum of
# their two best, with the correction bias). None: a gate without the attribute (transformers'
# DeepSeek-V3 and the gates written after it group whenever they have more than one group, by the
# top-2 sum).
_GROUP_SCORE = {None: "top2_sum", "noaux_tc": "top2_sum", "group_limited_greedy": "max", "greedy": None}


def _read_policy(gate: nn.Module, num_experts: int, top_k: int) -> Dict[str, Any]:
    """The gate's group-limited top-k and routed scaling factor as L2RRouter options."""
    method = getattr(gate, "topk_method", None)
    if method not in _GROUP_SCORE:
        _reject(gate, "topk_method", f"topk_method={method!r} is a selection rule the L2R drop-in does not know "
                f"(it carries {sorted(m for m in _GROUP_SCORE if m)})")
    policy: Dict[str, Any] = {}
    num_groups = getattr(gate, "num_group", getattr(gate, "n_group", None))
    if _GROUP_SCORE[method] is not None and num_groups is not None and int(num_groups) > 1:
        num_groups, topk_groups = int(num_groups), getattr(gate, "topk_group", None)
        if topk_groups is None:
            _reject(gate, "topk_group", f"num_group={num_groups} but no topk_group: how many groups to keep")
        topk_groups = int(topk_groups)
        if num_experts % num_groups or not 1 <= topk_groups <= num_groups:
            _reject(gate, "num_group", f"{num_experts} experts do not split into num_group={num_groups} equal "
                    f"groups with topk_group={topk_groups} of them kept")
        if top_k > topk_groups * (num_experts // num_groups):
            _reject(gate, "topk_group", f"top_k={top_k} exceeds the {topk_groups * (num_experts // num_groups)} "
                    f"experts of the topk_group={topk_groups} kept groups: the gate would pick masked experts, "
                    "which L2R's group-limited top-k never does")
        policy.update(num_groups=num_groups, topk_groups=topk_groups, group_score=_GROUP_SCORE[method])
    scaling = getattr(gate, "routed_scaling_factor", None)
    if scaling is not None:
        policy["routed_scaling_factor"] = float(scaling)
    return policy


class L2RGate(RouteRecorder):
    """A transformers MoE ``gate`` backed by :class:`l2r_cuda.L2RRouter`.

    ``mode="top_k"`` (transformers >= 5): ``forward(h [..., d]) -> (router_logits [T, E] | None,
    top_k_weights [T, k], top_k_index [T, k] int64)``. ``mode="logits"`` (transformers 4.x linear
    gate): ``forward(h) -> router_logits [T, E]``. The ``RouteOutput`` of the last call is kept in
    ``self.last_route`` (for :mod:`l2r_cuda.losses` and :mod:`l2r_cuda.metrics`).

    Exposes ``top_k``, ``num_experts``, ``hidden_dim`` and ``norm_topk_prob`` like the gates it
    replaces; the trainable parameters live in ``self.router``. ``original_gate`` is the gate this
    one replaced (frozen, outside the module tree: not saved, not moved by ``.to()``; ``None`` for
    a gate rebuilt from a checkpoint), the teacher of :func:`l2r_cuda.integrations.hf.distill_routers`.
    """

    def __init__(
        self,
        hidden_dim: int,
        num_experts: int,
        top_k: int,
        *,
        normalize: bool,
        mode: str = "top_k",
        weights_dtype: str = "hidden",
        return_logits: bool = True,
        device=None,
        dtype=None,
        **router_kwargs,
    ):
        super().__init__()
        if mode not in ("top_k", "logits"):
            raise ValueError(f"L2RGate: mode must be 'top_k' or 'logits', got {mode!r}")
        if weights_dtype not in ("hidden", "float32"):
            raise ValueError(f"L2RGate: weights_dtype must be 'hidden' or 'float32', got {weights_dtype!r}")
        self.hidden_dim, self.num_experts, self.top_k = hidden_dim, num_experts, top_k
        self.norm_topk_prob = normalize
        self.mode, self.weights_dtype, self.return_logits = mode, weights_dtype, return_logits
        self.router = L2RRouter(hidden_dim, num_experts, top_k, normalize=normalize, device=device, dtype=dtype,
                                **router_kwargs)
        self.__dict__["_original_gate"] = None
        self.original_score: Optional[str] = None
        # Set by l2r_cuda.integrations.hf while it distils or measures: replaces this forward.
        self.__dict__["_probe"] = None

    @property
    def original_gate(self) -> Optional[nn.Module]:
        return self.__dict__["_original_gate"]

    def keep_original(self, gate: nn.Module, score: str) -> None:
        """Hold ``gate`` (frozen) as :attr:`original_gate` without registering it as a submodule;
        ``score`` is its score function (``"softmax"`` or ``"sigmoid"``)."""
        gate.requires_grad_(False)
        self.__dict__["_original_gate"] = gate
        self.original_score = score

    def set_probe(self, probe: Optional[Callable[["L2RGate", Tensor], object]]) -> None:
        self.__dict__["_probe"] = probe

    def router_logits(self, hidden_states: Tensor) -> Tensor:
        """L2R logits ``l [T, E]`` float32 (docs/SPEC.md, before softmax/sigmoid), differentiable: the
        native ``route_logits``, the logits :meth:`route` selects from."""
        return self.router.logits(hidden_states)

    def route(self, tokens: Tensor):
        """What the gate returns for ``tokens [T, d]`` under L2R routing (the contract of ``mode``)."""
        if self.mode == "logits":
            logits = self.router_logits(tokens)
            # Keep last_route meaningful in this mode too (what the block's softmax/top-k will pick).
            with torch.no_grad():
                self.last_route = self.router(tokens)
            return logits.to(tokens.dtype)
        route = self.router(tokens)
        self.last_route = route
        logits = self.router_logits(tokens) if self.return_logits else None
        weights = route.weights.to(tokens.dtype) if self.weights_dtype == "hidden" else route.weights
        return logits, weights, route.indices

    def forward(self, hidden_states: Tensor):
        tokens = hidden_states.reshape(-1, self.hidden_dim)
        probe = self.__dict__["_probe"]
        if probe is not None:
            return probe(self, tokens)
        return self.route(tokens)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, norm_topk_prob={self.norm_topk_prob}, return_logits={self.return_logits}"


def original_routing(gate: L2RGate, tokens: Tensor) -> Tuple[object, Tensor, Tensor]:
    """Run ``gate.original_gate`` on ``tokens``: ``(what it returns, its logits [T, E] float32, its
    top-k indices [T, k])``. The original gate is moved to the tokens' device on first use."""
    original = gate.original_gate
    if original is None:
        raise ValueError("this L2R gate has no original gate (it was rebuilt from a checkpoint, or replaced "
                         "before l2r_cuda kept them): distillation and agreement need the gates replace_routers "
                         "replaced, in the same process")
    param = next(original.parameters())
    if param.device != tokens.device:
        original.to(tokens.device)
    out = original(tokens.to(param.dtype) if param.dtype != tokens.dtype else tokens)
    if gate.mode == "logits":
        logits = out.float()
        indices = torch.topk(logits, gate.top_k, dim=-1).indices
        return out.to(tokens.dtype), logits, indices
    logits, weights, indices = out
    if gate.weights_dtype == "hidden":
        out = (logits, weights.to(tokens.dtype), indices)
    return out, logits.float(), indices

