"""Drop the L2R router into Hugging Face ``transformers`` MoE models, in place.

    from transformers import OlmoeForCausalLM
    from l2r_cuda.integrations import hf

    model = OlmoeForCausalLM(config)                  # or from_pretrained(...)
    replaced = hf.replace_routers(model, rank=2, num_anchors=4)   # init="linear": upcycle the gates
    out = model(input_ids, labels=labels, output_router_logits=True)
    out.loss.backward()                               # trains the L2R routers with the model
    model.save_pretrained(path)                       # config.json records the L2R settings
    model = hf.from_pretrained(OlmoeForCausalLM, path)   # or an AutoModel* class

Supported blocks (:data:`SUPPORTED_BLOCKS`): OLMoE, Qwen3-MoE, Qwen2-MoE (its shared expert and
shared-expert gate stay as they are), Mixtral, GPT-OSS, DeepSeek-V3 and DeepSeek-V2 (their shared
experts stay; their routing policies are carried, see below); others with the same ``gate``
contract can be named with ``block_types``. Tested with transformers 5.24.

How it plugs in. In transformers 5 each block owns ``self.gate`` (GPT-OSS: ``self.router``), a
``*TopKRouter`` whose ``forward(hidden_states [T, d])`` returns ``(router_logits [T, E],
top_k_weights [T, k], top_k_index [T, k])``; the block passes weights and indices to its
``experts`` and the model records ``router_logits`` (a forward hook on the gate) for its Switch
auxiliary loss. We replace the gate with an :class:`L2RGate` that returns the same triple computed
by an :class:`l2r_cuda.L2RRouter`, so the block's forward, its experts (and their kernels) and the
model's loss code run unchanged:

* ``top_k_weights``: the L2R routing weights, renormalised over the top-k when the original gate
  did (``norm_topk_prob``; Mixtral and GPT-OSS always do: GPT-OSS's softmax over the top-k logits is
  exactly that), times the gate's ``routed_scaling_factor`` (DeepSeek), in the dtype the family
  returns (OLMoE, Qwen-MoE, GPT-OSS: the hidden states' dtype; Mixtral, DeepSeek: float32);
* ``top_k_index``: the L2R top-k (int64, scores plus the router's ``expert_bias``), limited to the
  best expert groups when the gate is (DeepSeek's ``n_group``/``topk_group``);
* ``router_logits``: L2R's per-expert logits ``l [T, E]`` (float32; the native ``route_logits``),
  whose softmax (sigmoid for a sigmoid gate) is the L2R routing distribution, so the model's own
  ``load_balancing_loss_func`` (``output_router_logits``) balances the L2R router. They cost one
  extra routing-logit pass (``[T, E]`` memory, which that loss needs anyway);
  ``return_logits=False`` skips it and returns ``None`` there (then do not ask the model for
  ``output_router_logits``; use ``l2r_cuda.losses`` on :func:`last_routes`).

Routing policies are read off each gate and carried by the router (:mod:`._hf_gate`): DeepSeek's
group-limited top-k (V3: groups ranked by the sum of their two best ``sigmoid + correction bias``;
V2 ``topk_method="group_limited_greedy"``: by their best softmax probability), its
``routed_scaling_factor``, ``norm_topk_prob`` and sigmoid scores; ``e_score_correction_bias``
becomes the router's selection-only, float32 ``expert_bias``. Nothing is dropped silently: a gate
feature the L2R router cannot carry (a gate tensor other than the linear score's
``weight``/``bias``, an unknown ``topk_method`` or ``scoring_func``, a group limit that would leave
fewer than ``top_k`` experts) raises :class:`UnsupportedGateFeature` naming it.

Older transformers (4.x) used a plain ``nn.Linear`` gate and did softmax/top-k in the block. Such a
gate is replaced by an :class:`L2RGate` in ``"logits"`` mode returning only ``l [T, E]`` (in the
hidden dtype): the block's softmax and top-k of ``l`` are then exactly L2R's routing for
``score="softmax"`` without expert bias. (Checked here only against a mock of that contract.)

Checkpoints. ``replace_routers`` records its settings and the replaced gates in
``model.config.l2r_router`` (plain JSON), so ``save_pretrained`` writes them to ``config.json``;
:func:`from_pretrained` rebuilds the model with those routers before transformers loads the weights
(its own key conversions, dtype and device handling included). Plain ``from_pretrained`` would
build the stock gates with random weights; to stop it, ``config.fusion_config`` also gets the entry
:data:`LOAD_GUARD`, which transformers (>= 5.2x, where fusions exist) rejects before building the model:
``ValueError: Unknown fusion type: l2r_router: load with l2r_cuda.integrations.hf.from_pretrained``.
``from_pretrained(path, fusion_config={})`` overrides it (stock gates, randomly initialised; the load
report lists the ``gate.router.*`` weights as UNEXPECTED and ``gate.weight`` as MISSING).
"""

from __future__ import annotations

import copy
import json
from typing import Any, Dict, Iterable, List, Optional, Union

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.models.auto.auto_factory import _BaseAutoModelClass, _get_model_class

from ..types import RouteOutput
from ._hf_gate import GATE_ATTRIBUTES, POLICY_OPTIONS, GateContract, L2RGate, UnsupportedGateFeature, read_gate
from ._hf_upcycle import DistillReport, distill_routers, init_from_linear, routing_agreement

try:
    from transformers.utils.output_capturing import maybe_install_capturing_hooks
except ImportError:  # transformers 4.x: outputs are returned, not hooked
    maybe_install_capturing_hooks = None

__all__ = ["SUPPORTED_BLOCKS", "L2RGate", "UnsupportedGateFeature", "replace_routers", "from_pretrained",
           "l2r_gates", "last_routes", "distill_routers", "routing_agreement", "DistillReport", "CONFIG_KEY",
           "LOAD_GUARD"]

# block class name -> dtype of the top-k weights the family's gate returns ("hidden" or "float32")
SUPPORTED_BLOCKS: Dict[str, str] = {
    "OlmoeSparseMoeBlock": "hidden",
    "Qwen3MoeSparseMoeBlock": "hidden",
    "Qwen2MoeSparseMoeBlock": "hidden",
    "MixtralSparseMoeBlock": "float32",
    "GptOssMLP": "hidden",
    "DeepseekV3MoE": "float32",
    "DeepseekV2Moe": "float32",
}

CONFIG_KEY = "l2r_router"  # the model-config entry replace_routers records and from_pretrained reads
_CONFIG_FORMAT = 1
# transformers' from_pretrained applies config.fusion_config before it builds the model and rejects a
# fusion it does not know, naming it: this entry makes a plain from_pretrained of an L2R checkpoint
# stop with this sentence instead of building stock gates with random weights.
LOAD_GUARD = "l2r_router: load with l2r_cuda.integrations.hf.from_pretrained"
_INITS = ("random", "linear")


def _install_output_capturing_hooks(model: nn.Module) -> None:
    # transformers 5 records router_logits with forward hooks it installs lazily, on the first forward
    # that asks for them, on modules of the original gate class. Install them now, on the original
    # gates, so that _move_hooks carries them over to the L2R gates.
    if maybe_install_capturing_hooks is None:
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


_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")


def _move_hooks(old: nn.Module, new: nn.Module) -> None:
    # Hooks are closures over what they record, not over the module: they work on the new gate. The
    # old gate (kept for distillation) must not record as well when it is run inside the new one.
    for attr in _HOOK_DICTS:
        if hasattr(old, attr) and hasattr(new, attr):
            getattr(new, attr).update(getattr(old, attr))
            getattr(old, attr).clear()


def _gate_of(block: nn.Module):
    for attr in GATE_ATTRIBUTES:
        gate = getattr(block, attr, None)
        if isinstance(gate, nn.Module):
            return attr, gate
    return None, None


def _normalize_for(gate: nn.Module, contract: GateContract, normalize: Optional[bool]) -> bool:
    """Whether the new router renormalises its top-k weights: as asked, else as the gate did."""
    if normalize is None:
        normalize = contract.normalize
    if normalize is None:
        raise UnsupportedGateFeature(
            f"{type(gate).__name__}.norm_topk_prob: the gate does not say whether it renormalises its top-k "
            "weights; pass replace_routers(..., normalize=True or False)")
    return normalize


def _install(block: nn.Module, attr: str, options: Dict[str, Any], weights_dtype: str, *,
             init: Optional[str]) -> L2RGate:
    """Replace ``block.<attr>`` with an L2RGate built from ``options`` (the recorded settings).
    ``init=None``: parameters to be loaded (no original kept, no upcycling)."""
    old_gate = getattr(block, attr)
    contract: GateContract = read_gate(block, old_gate)
    options = dict(options)
    normalize = _normalize_for(old_gate, contract, options.pop("normalize"))
    score = options.pop("score")
    gate_param = next(old_gate.parameters(), None)
    new_gate = L2RGate(
        contract.hidden_dim, contract.num_experts, contract.top_k,
        normalize=normalize,
        score=contract.score if score is None else score,
        mode=contract.mode, weights_dtype=weights_dtype, dtype=torch.float32,
        device=gate_param.device if gate_param is not None else None, **contract.policy, **options,
    )
    if contract.expert_bias is not None:
        new_gate.router.expert_bias.copy_(contract.expert_bias)
    if init == "linear":
        init_from_linear(new_gate, old_gate.weight, contract)
    if init is not None:
        new_gate.keep_original(old_gate, contract.score)
    new_gate.train(old_gate.training)
    _move_hooks(old_gate, new_gate)
    setattr(block, attr, new_gate)
    return new_gate


def _record(model: nn.Module, options: Dict[str, Any], block_types: Dict[str, str], gates: List[L2RGate]) -> None:
    """Append this replacement to ``model.config.l2r_router`` (gate names relative to the base
    model, so a ``*ForCausalLM`` checkpoint loads into the bare model and back)."""
    if not isinstance(model, PreTrainedModel):
        return  # a bare module has no config to save
    base = model.base_model
    names = {id(module): name for name, module in base.named_modules()}
    missing = [g for g in gates if id(g) not in names]
    if missing:
        raise ValueError(f"replace_routers: {len(missing)} replaced gates lie outside {type(model).__name__}'s "
                         "base model, so a checkpoint could not name them")
    replacement = {"options": options, "block_types": block_types, "gates": [names[id(g)] for g in gates]}
    try:
        json.dumps(replacement)
    except TypeError as err:
        raise TypeError(f"replace_routers: the settings must be JSON-serialisable to be saved in "
                        f"config.{CONFIG_KEY}: {err}") from err
    entry = copy.deepcopy(getattr(model.config, CONFIG_KEY, None)) or {"format": _CONFIG_FORMAT, "replacements": []}
    entry["replacements"].append(replacement)
    setattr(model.config, CONFIG_KEY, entry)
    _guard_plain_loading(model.config)


def _guard_plain_loading(config) -> None:
    config.fusion_config = {**(getattr(config, "fusion_config", None) or {}), LOAD_GUARD: True}


def replace_routers(
    model: nn.Module,
    *,
    rank: int = 2,
    num_anchors: int = 4,
    beta: float = 1.0,
    score: Optional[str] = None,
    normalize: Optional[bool] = None,
    norm: Optional[str] = "rms",
    return_logits: bool = True,
    init: str = "random",
    block_types: Union[None, Iterable[str], Dict[str, str]] = None,
    **router_kwargs,
) -> List[str]:
    """Replace the gate of every supported sparse-MoE block in ``model`` with an :class:`L2RGate`.

    ``rank``, ``num_anchors``, ``beta``, ``norm`` and ``**router_kwargs`` (``tau``, ``init_scale``,
    ``eps_norm``, ``eps``) configure each :class:`l2r_cuda.L2RRouter` (``norm="rms"``: the router
    applies its own RMSNorm, as in the L2R LM). ``score=None`` and ``normalize=None`` keep what the
    model did (softmax, or sigmoid for a gate with a score-correction bias; ``norm_topk_prob``,
    always for Mixtral and GPT-OSS); a value overrides. The routing policy (group-limited top-k,
    routed scaling factor) is the model's, read off each gate: it is not an option.
    ``init="random"``: L2R's own initialisation; ``"linear"``: upcycle each router from the gate
    it replaces (truncated SVD, see :mod:`l2r_cuda.integrations._hf_upcycle`). ``block_types``:
    class names of the blocks to convert (default :data:`SUPPORTED_BLOCKS`; a dict also gives each
    one's weights dtype, ``"hidden"`` or ``"float32"``). New routers are float32, on the device of the gate they
    replace; each replaced gate is kept (frozen, unsaved) as ``original_gate`` for
    :func:`distill_routers` and :func:`routing_agreement`.

    When ``model`` is a ``PreTrainedModel`` the settings are recorded in ``model.config.l2r_router``
    for :func:`from_pretrained`. Returns the qualified names of the replaced gates; raises
    ``ValueError`` if there are none and :class:`UnsupportedGateFeature` for a gate feature the L2R
    router cannot carry (before anything is replaced).
    """
    if init not in _INITS:
        raise ValueError(f"replace_routers: init must be one of {_INITS}, got {init!r}")
    for name in ("device", "dtype"):
        if name in router_kwargs:
            raise TypeError(f"replace_routers: {name} is not an option: routers are created in float32 on the "
                            "replaced gate's device; move or cast the model afterwards")
    for name in POLICY_OPTIONS:
        if name in router_kwargs:
            raise TypeError(f"replace_routers: {name} is not an option: each router takes the routing policy of "
                            "the gate it replaces (DeepSeek's n_group, topk_group, routed_scaling_factor)")
    if block_types is None:
        targets = dict(SUPPORTED_BLOCKS)
    elif isinstance(block_types, dict):
        targets = dict(block_types)
    else:
        targets = {name: SUPPORTED_BLOCKS.get(name, "hidden") for name in block_types}
    options = dict(rank=rank, num_anchors=num_anchors, beta=beta, score=score, normalize=normalize, norm=norm,
                   return_logits=return_logits, **router_kwargs)
    found = []
    for block_name, block in model.named_modules():
        if type(block).__name__ not in targets:
            continue
        attr, gate = _gate_of(block)
        if gate is None or isinstance(gate, L2RGate):
            continue
        # every unsupported feature raises here, before anything is replaced
        _normalize_for(gate, read_gate(block, gate), normalize)
        found.append((block_name, block, attr))
    if not found:
        raise ValueError(
            f"replace_routers(): no block of type {sorted(targets)} with a gate found in {type(model).__name__}"
        )
    _install_output_capturing_hooks(model)
    gates = [_install(block, attr, options, targets[type(block).__name__], init=init) for _, block, attr in found]
    _record(model, options, {type(b).__name__: targets[type(b).__name__] for _, b, _ in found}, gates)
    return [f"{name}.{attr}" if name else attr for name, _, attr in found]


def _rebuild_recorded_routers(model: PreTrainedModel) -> None:
    """Install the L2R gates ``model.config.l2r_router`` records (parameters to be loaded)."""
    entry = getattr(model.config, CONFIG_KEY, None)
    if not entry:
        raise ValueError(f"{type(model).__name__}: the config has no {CONFIG_KEY!r} entry, so the checkpoint was "
                         f"saved without L2R routers; load it with {type(model).__name__}.from_pretrained")
    if entry.get("format") != _CONFIG_FORMAT:
        raise ValueError(f"config.{CONFIG_KEY} has format {entry.get('format')!r}; this l2r_cuda reads format "
                         f"{_CONFIG_FORMAT}")
    _install_output_capturing_hooks(model)
    base = model.base_model
    for replacement in entry["replacements"]:
        for name in replacement["gates"]:
            block_name, _, attr = name.rpartition(".")
            try:
                block = base.get_submodule(block_name)
                getattr(block, attr)
            except AttributeError as err:
                raise ValueError(f"config.{CONFIG_KEY} names the gate {name!r}, which {type(model).__name__} "
                                 "does not have") from err
            weights_dtype = replacement["block_types"][type(block).__name__]
            _install(block, attr, replacement["options"], weights_dtype, init=None)
    _guard_plain_loading(model.config)  # from_pretrained loaded without it; saving again keeps it


_L2R_CLASSES: Dict[type, type] = {}


def _with_recorded_routers(model_class: type) -> type:
    """A subclass of ``model_class`` (same name and module, so transformers' key conversions and
    output recorders apply) whose ``__init__`` installs the recorded L2R gates."""
    if model_class not in _L2R_CLASSES:
        def __init__(self, config, *args, **kwargs):
            model_class.__init__(self, config, *args, **kwargs)
            _rebuild_recorded_routers(self)

        _L2R_CLASSES[model_class] = type(model_class.__name__, (model_class,), {
            "__init__": __init__, "__module__": model_class.__module__, "__qualname__": model_class.__qualname__,
        })
    return _L2R_CLASSES[model_class]


_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token",
               "trust_remote_code")


def _concrete_class(model_class: type, config: PretrainedConfig) -> type:
    if isinstance(model_class, type) and issubclass(model_class, PreTrainedModel):
        return model_class
    if isinstance(model_class, type) and issubclass(model_class, _BaseAutoModelClass):
        try:
            return _get_model_class(config, model_class._model_mapping)
        except KeyError as err:
            raise ValueError(f"{model_class.__name__} has no model class for {type(config).__name__}") from err
    raise TypeError(f"from_pretrained: model_class must be a PreTrainedModel subclass or an AutoModel* class, got "
                    f"{model_class!r}")


def from_pretrained(model_class: type, pretrained_model_name_or_path, *model_args, **kwargs):
    """Load a checkpoint saved after :func:`replace_routers`: ``model_class`` (any
    ``PreTrainedModel`` class, or an ``AutoModel*`` class) is built with the L2R gates that
    ``config.json``'s ``l2r_router`` entry records, then transformers' ``from_pretrained`` loads
    every weight into it (``*model_args`` and ``**kwargs`` are its own: ``dtype``, ``device_map``,
    ...). The L2R routers load in float32 whatever ``dtype`` is (as DeepSeek-V3's gate does).
    Returns what ``model_class.from_pretrained`` returns; the model is an instance of the plain
    model class. Raises ``ValueError`` for a checkpoint saved without L2R routers.
    """
    config = kwargs.get("config")
    if not isinstance(config, PretrainedConfig):
        config = AutoConfig.from_pretrained(config or pretrained_model_name_or_path,
                                            **{k: kwargs[k] for k in _HUB_KWARGS if k in kwargs})
    concrete = _concrete_class(model_class, config)
    # Every fusion but our load guard (which transformers would reject) still applies.
    fusions = kwargs.get("fusion_config", getattr(config, "fusion_config", None)) or {}
    kwargs["fusion_config"] = {name: value for name, value in fusions.items() if name != LOAD_GUARD}
    loaded = _with_recorded_routers(concrete).from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    model.__class__ = concrete
    return loaded


def l2r_gates(model: nn.Module) -> List[L2RGate]:
    """The :class:`L2RGate` modules of ``model``, in module order (= layer order)."""
    return [m for m in model.modules() if isinstance(m, L2RGate)]


def last_routes(model: nn.Module) -> List[RouteOutput]:
    """The ``RouteOutput`` of each L2R gate's last forward, in layer order (for ``l2r_cuda.losses``)::

        routes = hf.last_routes(model)
        aux = sum(losses.load_balancing_loss(r.tokens_per_expert, r.mean_probs) for r in routes)
    """
    return [g.last_route for g in l2r_gates(model) if g.last_route is not None]
