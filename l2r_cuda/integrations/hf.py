"""Drop the L2R router into Hugging Face ``transformers`` MoE models, in place.

    from transformers import OlmoeForCausalLM
    from l2r_cuda.integrations import hf

    model = OlmoeForCausalLM(config)                  # or from_pretrained(...)
    replaced = hf.replace_routers(model, rank=2, num_anchors=4)
    out = model(input_ids, labels=labels, output_router_logits=True)
    out.loss.backward()                               # trains the L2R routers with the model

Supported blocks: ``OlmoeSparseMoeBlock``, ``Qwen3MoeSparseMoeBlock``, ``MixtralSparseMoeBlock``
(others with the same ``gate`` contract can be named with ``block_types``). Tested with
transformers 5.24.

How it plugs in. In transformers 5 each block owns ``self.gate``, a ``*TopKRouter`` whose
``forward(hidden_states [T, d])`` returns ``(router_logits [T, E], top_k_weights [T, k],
top_k_index [T, k])``; the block passes weights and indices to its ``experts`` and the model
records ``router_logits`` (a forward hook on the gate) for its Switch auxiliary loss. We replace
``block.gate`` with an :class:`L2RGate` that returns the same triple computed by an
:class:`l2r_cuda.L2RRouter`, so the block's forward, its experts (and their kernels) and the model's
loss code run unchanged:

* ``top_k_weights``: the L2R routing weights, renormalised over the top-k when the original gate
  did (``norm_topk_prob``; Mixtral always does), in the dtype the family returns (OLMoE and
  Qwen3-MoE: the hidden states' dtype; Mixtral: float32);
* ``top_k_index``: the L2R top-k (int64, SIPS scores plus the router's ``expert_bias``);
* ``router_logits``: L2R's per-expert logits ``l [T, E]`` (float32), whose softmax is the L2R
  routing distribution, so the model's own ``load_balancing_loss_func`` (``output_router_logits``)
  balances the L2R router. They cost one extra unfused routing-logit pass (``[T, E]`` memory, which
  that loss needs anyway); ``return_logits=False`` skips it and returns ``None`` there (then do not
  ask the model for ``output_router_logits``; use ``l2r_cuda.losses`` on :func:`last_routes`).

Older transformers (4.x) used a plain ``nn.Linear`` gate and did softmax/top-k in the block. Such a
gate is replaced by an :class:`L2RGate` in ``"logits"`` mode returning only ``l [T, E]`` (in the
hidden dtype): the block's softmax and top-k of ``l`` are then exactly L2R's routing for
``score="softmax"`` without expert bias. (Checked here only against a mock of that contract.)

Replace the routers before the first forward or before loading a state dict saved after
replacement; the new routers are freshly initialised (the linear gate's weights cannot be mapped
onto a rank-``r`` routing space and anchors).
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .. import reference
from ..routers import L2RRouter, RouteRecorder
from ..types import RouteOutput

__all__ = ["SUPPORTED_BLOCKS", "L2RGate", "replace_routers", "l2r_gates", "last_routes"]

# block class name -> dtype of the top-k weights the family's gate returns ("hidden" or "float32")
SUPPORTED_BLOCKS: Dict[str, str] = {
    "OlmoeSparseMoeBlock": "hidden",
    "Qwen3MoeSparseMoeBlock": "hidden",
    "MixtralSparseMoeBlock": "float32",
}


class L2RGate(RouteRecorder):
    """A transformers MoE ``gate`` backed by :class:`l2r_cuda.L2RRouter`.

    ``mode="top_k"`` (transformers >= 5): ``forward(h [..., d]) -> (router_logits [T, E] | None,
    top_k_weights [T, k], top_k_index [T, k] int64)``. ``mode="logits"`` (transformers 4.x linear
    gate): ``forward(h) -> router_logits [T, E]``. The ``RouteOutput`` of the last call is kept in
    ``self.last_route`` (for :mod:`l2r_cuda.losses` and :mod:`l2r_cuda.metrics`).

    Exposes ``top_k``, ``num_experts``, ``hidden_dim`` and ``norm_topk_prob`` like the gates it
    replaces; the trainable parameters live in ``self.router``.
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
        self.router = L2RRouter(hidden_dim, num_experts, top_k, normalize=normalize, device=device, **router_kwargs)

    def router_logits(self, hidden_states: Tensor) -> Tensor:
        """L2R logits ``l [T, E]`` float32 (SPEC.md, before softmax), differentiable."""
        r = self.router
        return reference.route_logits(
            hidden_states, r.proj, r.anchors, r.scale, beta=r.beta, norm=r.norm, norm_weight=r.norm_weight,
            eps_norm=r.eps_norm, eps=r.eps, tau=r.tau,
        )

    def forward(self, hidden_states: Tensor):
        tokens = hidden_states.reshape(-1, self.hidden_dim)
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

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, norm_topk_prob={self.norm_topk_prob}, return_logits={self.return_logits}"


def _install_output_capturing_hooks(model: nn.Module) -> None:
    # transformers 5 records router_logits with forward hooks it installs lazily, on the first forward
    # that asks for them, on modules of the original gate class. Install them now, on the original
    # gates, so that _move_hooks carries them over to the L2R gates.
    try:
        from transformers import PreTrainedModel
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:  # older transformers: outputs are returned, not hooked
        return
    # Only on the innermost pretrained models (the base model, whose forward does the capturing):
    # installing on a wrapper (e.g. *ForCausalLM) re-installs on its base model without checking
    # whether that one already has its hooks, which would record every gate twice.
    for module in model.modules():
        if not isinstance(module, PreTrainedModel) or not getattr(module, "_can_record_outputs", None):
            continue
        if any(isinstance(sub, PreTrainedModel) for sub in module.modules() if sub is not module):
            continue
        maybe_install_capturing_hooks(module)


def _move_hooks(old: nn.Module, new: nn.Module) -> None:
    # Hooks are closures over what they record, not over the module: they work on the new gate.
    for attr in ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                 "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs"):
        if hasattr(old, attr) and hasattr(new, attr):
            getattr(new, attr).update(getattr(old, attr))


def _gate_geometry(block: nn.Module, gate: nn.Module) -> Tuple[int, int, int, bool, str]:
    """``(hidden_dim, num_experts, top_k, normalize, mode)`` of an original gate."""
    if isinstance(gate, nn.Linear):  # transformers 4.x: the block does softmax and top-k itself
        top_k = getattr(block, "top_k", None)
        if top_k is None:
            raise ValueError(f"{type(block).__name__}: a linear gate but no block.top_k")
        normalize = bool(getattr(block, "norm_topk_prob", True))
        return gate.in_features, gate.out_features, int(top_k), normalize, "logits"
    weight = getattr(gate, "weight", None)
    try:
        num_experts, hidden_dim = int(gate.num_experts), int(gate.hidden_dim)
        top_k = int(gate.top_k)
    except AttributeError as err:
        raise ValueError(
            f"{type(block).__name__}.gate ({type(gate).__name__}) has neither the transformers>=5 TopKRouter "
            "attributes (top_k, num_experts, hidden_dim) nor is an nn.Linear"
        ) from err
    if weight is not None and tuple(weight.shape) != (num_experts, hidden_dim):
        raise ValueError(f"{type(gate).__name__}.weight has shape {tuple(weight.shape)}, expected "
                         f"({num_experts}, {hidden_dim})")
    # Mixtral's router always renormalises the top-k weights and has no norm_topk_prob attribute.
    normalize = bool(getattr(gate, "norm_topk_prob", True))
    return hidden_dim, num_experts, top_k, normalize, "top_k"


def replace_routers(
    model: nn.Module,
    *,
    rank: int = 2,
    num_anchors: int = 4,
    beta: float = 1.0,
    score: str = "softmax",
    normalize: Optional[bool] = None,
    norm: Optional[str] = "rms",
    return_logits: bool = True,
    block_types: Union[None, Iterable[str], Dict[str, str]] = None,
    **router_kwargs,
) -> List[str]:
    """Replace the ``gate`` of every supported sparse-MoE block in ``model`` with an :class:`L2RGate`.

    ``rank``, ``num_anchors``, ``beta``, ``score``, ``norm`` and ``**router_kwargs`` configure each
    :class:`l2r_cuda.L2RRouter` (``norm="rms"``: the router applies its own RMSNorm, as in the L2R
    LM). ``normalize=None`` keeps what the model did (``config.norm_topk_prob``; always for Mixtral);
    ``True``/``False`` overrides. ``block_types``: class names of the blocks to convert (default
    :data:`SUPPORTED_BLOCKS`; a dict also gives each one's weights dtype, ``"hidden"`` or
    ``"float32"``). New routers are put on the device of the gate they replace, in float32.

    Returns the qualified names of the replaced gates; raises ``ValueError`` if there are none.
    """
    if block_types is None:
        targets = dict(SUPPORTED_BLOCKS)
    elif isinstance(block_types, dict):
        targets = dict(block_types)
    else:
        targets = {name: SUPPORTED_BLOCKS.get(name, "hidden") for name in block_types}
    _install_output_capturing_hooks(model)
    replaced = []
    for block_name, block in list(model.named_modules()):
        if type(block).__name__ not in targets or isinstance(getattr(block, "gate", None), L2RGate):
            continue
        old_gate = block.gate
        hidden_dim, num_experts, top_k, model_normalize, mode = _gate_geometry(block, old_gate)
        reference_param = next(old_gate.parameters(), None)
        device = reference_param.device if reference_param is not None else None
        new_gate = L2RGate(
            hidden_dim, num_experts, top_k,
            normalize=model_normalize if normalize is None else normalize,
            mode=mode, weights_dtype=targets[type(block).__name__], return_logits=return_logits,
            device=device, rank=rank, num_anchors=num_anchors, beta=beta, score=score, norm=norm, **router_kwargs,
        )
        new_gate.train(old_gate.training)
        _move_hooks(old_gate, new_gate)
        block.gate = new_gate
        replaced.append(f"{block_name}.gate" if block_name else "gate")
    if not replaced:
        raise ValueError(
            f"replace_routers(): no block of type {sorted(targets)} with a gate found in {type(model).__name__}"
        )
    return replaced


def l2r_gates(model: nn.Module) -> List[L2RGate]:
    """The :class:`L2RGate` modules of ``model``, in module order (= layer order)."""
    return [m for m in model.modules() if isinstance(m, L2RGate)]


def last_routes(model: nn.Module) -> List[RouteOutput]:
    """The ``RouteOutput`` of each L2R gate's last forward, in layer order (for ``l2r_cuda.losses``)::

        routes = hf.last_routes(model)
        aux = sum(losses.load_balancing_loss(r.tokens_per_expert, r.mean_probs) for r in routes)
    """
    return [g.last_route for g in l2r_gates(model) if g.last_route is not None]
