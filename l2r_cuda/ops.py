"""The native functional API: ``route``, ``permute``, ``unpermute``, and the bookkeeping around
them (``dropped_counts``, ``routing_map``, ``expert_capacity``).

Thin typed entry points over ``torch.ops.l2r_cuda.*`` (schemas in csrc/registration.cpp, autograd
in _autograd.py, fake kernels in _meta.py). The native ops check every argument (the messages name
it and the value); what is checked here is only what the dispatcher would report less clearly.

Permutation design:

* ``permute`` is two ops: ``permute_plan`` (integer bookkeeping, no gradient: ``row_map``,
  ``expert_offsets``, dropped counts) and ``permute_rows`` (the row copy, differentiable in ``x``).
  The output row count is an argument of ``permute_rows``: with ``fixed_size=True`` it is
  ``T*k + E*(align-1)``, known from shapes alone (no host sync: CUDA graphs and
  ``torch.compile(fullgraph=True)`` work); otherwise it is the exact padded total
  ``expert_offsets[-1]``, read back to the host (one sync on CUDA, a graph break under compile).
* ``permute`` returns a :class:`Permutation` NamedTuple of exactly three fields, so 3-way unpacking
  keeps working and torch.compile sees a plain tuple of tensors. Dropped slots under ``capacity``
  are marked ``row_map < 0``; :func:`dropped_counts` turns that into per-expert counts (pure tensor
  ops, no sync, traceable).
* Arrays of other libraries: every function here takes cupy (any ``__dlpack__``) arrays without
  copies and then returns arrays of that library (interop.py; no autograd through them).
* Gradients: permute's backward is the unweighted gather-sum ``grad_x[t] = sum_j
  grad_permuted[row_map[t, j]]``; unpermute's backward gives ``grad_y`` (one writer per row) and
  ``grad_weights``. All are token-major gather-reduces without floating-point atomics, so results
  are bitwise deterministic. ``row_map``/``expert_offsets`` are not differentiable; ``capacity``
  selection with ``weights`` uses the weights' values only.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from ._library import _C, cuda_built, has_kernel
from .interop import dlpack_io
from .types import DEFAULTS, NORMS, SCORES, Permutation, RouteOutput, group_args

__all__ = ["route", "route_logits", "route_from_logits", "clear_prepared_cache", "permute", "unpermute",
           "dropped_counts", "routing_map", "expert_capacity"]


# Bound once: the decode path asks on every call (two attribute lookups less per call).
_is_compiling = torch.compiler.is_compiling


def _check_device(device: torch.device, op: str, name: str) -> None:
    # Only for a clearer message than the dispatcher's: a CUDA tensor in a CPU-only build. Not while
    # torch.compile traces: Dynamo cannot put the dispatcher query (a bool from torch._C) in a graph,
    # so fullgraph=True failed on every CUDA input (the dispatcher still refuses a missing kernel).
    if device.type == "cuda" and not _is_compiling() and not has_kernel(op, "cuda"):
        raise RuntimeError(
            f"l2r_cuda.{op}: {name} is on {device} but this build of l2r_cuda has no CUDA kernel "
            f"for it (cuda_built() = {cuda_built()}): install cupy for NVRTC-compiled kernels "
            "(l2r_cuda.jit.status() says what else is missing), rebuild with a CUDA toolkit (see "
            "README), or use l2r_cuda.reference"
        )


def _int_arg(v, name: str, fn: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"l2r_cuda.{fn}: {name} must be an int, got {v!r}")
    return v


def _padding_arg(padding_mask: Optional[Tensor], tokens: int, op: str) -> Optional[Tensor]:
    if padding_mask is None:
        return None
    if not isinstance(padding_mask, Tensor) or padding_mask.dtype != torch.bool:
        raise TypeError(f"l2r_cuda.{op}: padding_mask must be a bool tensor (True: padding), got "
                        f"{getattr(padding_mask, 'dtype', type(padding_mask).__name__)}")
    if padding_mask.numel() != tokens:
        raise ValueError(f"l2r_cuda.{op}: padding_mask must have one entry per token ({tokens}), got "
                         f"shape {tuple(padding_mask.shape)}")
    return padding_mask.reshape(-1)


def _seq_len_arg(seq_len: Optional[int], op: str) -> int:
    if seq_len is None:
        return 0
    seq_len = _int_arg(seq_len, "seq_len", op)
    if seq_len < 1:
        raise ValueError(f"l2r_cuda.{op}: seq_len must be >= 1 or None, got {seq_len}")
    return seq_len


def _check_same_device(device: torch.device, op: str, **tensors: Optional[Tensor]) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"l2r_cuda.{op}: {name} is on {t.device} but x is on {device}; "
                             "all inputs must be on one device")


# Python-float scales as the 0-dim tensors the ops take, one per (value, device): no tensor (and on
# CUDA no host-to-device copy) per call, and a tensor whose version the CPU kernels' prepared
# parameters can key on. Made outside inference mode, so that it has a version counter.
_SCALE_TENSORS: Dict[Tuple[float, torch.device], Tensor] = {}
_MAX_SCALE_TENSORS = 64


def _scale_tensor(scale, device: torch.device) -> Tensor:
    value = float(scale)
    if _is_compiling():
        return torch.tensor(value, device=device)
    key = (value, device)
    t = _SCALE_TENSORS.get(key)
    if t is None:
        if len(_SCALE_TENSORS) >= _MAX_SCALE_TENSORS:
            _SCALE_TENSORS.clear()
        with torch.inference_mode(False):
            t = torch.tensor(value, device=device)
        _SCALE_TENSORS[key] = t
    return t


def _call_op(op, args: tuple, differentiable: tuple):
    """``op(*args)``. When no gradient can flow (grad mode off, or no differentiable input requires
    grad) the call goes straight to the backend kernel: the autograd kernel that
    torch.library.register_autograd installs is Python and would only redispatch, at a cost that
    dominates a one-token call. Under torch.compile the op is called as is."""
    if not _is_compiling() and not (
            torch.is_grad_enabled() and torch._C._any_requires_grad(*(t for t in differentiable if t is not None))):
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)
    return op(*args)


def route(
    x: Tensor,
    proj: Tensor,
    anchors: Tensor,
    scale: Union[Tensor, float],
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
    """Fused L2R router (docs/SPEC.md): RMSNorm -> low-rank projection -> SIPS against every
    anchor -> log-sum-exp over each expert's anchors -> softmax/sigmoid -> top-k (selection on
    ``probs + expert_bias``, optionally group-limited) -> weights.

    ``x`` is ``[..., d]`` (leading dims flattened to T) in float32/bfloat16/float16 (float64 for
    gradcheck); math is float32 whatever the input dtype. Returns a :class:`RouteOutput` whose
    ``weights`` ``[T, k]`` (float32), ``mean_probs`` and ``lse`` ``[T]`` are differentiable with
    respect to ``x, proj, anchors, scale, norm_weight``. ``expert_bias`` only steers selection.

    Policies: ``num_groups``/``topk_groups``/``group_score`` limit top-k to the best groups of
    experts (DeepSeek-V3: ``"top2_sum"``, V2: ``"max"``); ``routed_scaling_factor`` multiplies the
    weights (after ``normalize``). Statistics: ``tokens_per_expert`` and ``mean_probs`` are ``[E]``,
    or ``[T / seq_len, E]`` per sequence with ``seq_len``; tokens where ``padding_mask`` (bool, like
    x's leading dims) is True are left out of them. ``mean_probs`` averages p for softmax and
    p / sum(p) for sigmoid scores (what the load-balancing losses need).

    The CPU kernels keep the parameters prepared per parameter version (see
    :func:`clear_prepared_cache`), so a decode call (one token) does only the token's work.
    """
    options = checked_options(top_k, beta, norm, eps_norm, tau, score, normalize, eps, num_groups, topk_groups,
                              group_score, routed_scaling_factor)
    return route_with_options(x, proj, anchors, scale, norm_weight, expert_bias, options, seq_len=seq_len,
                              padding_mask=padding_mask)


def checked_options(top_k: int = DEFAULTS.top_k, beta: float = DEFAULTS.beta, norm: Optional[str] = DEFAULTS.norm,
                    eps_norm: float = DEFAULTS.eps_norm, tau: float = DEFAULTS.tau, score: str = DEFAULTS.score,
                    normalize: bool = DEFAULTS.normalize, eps: float = DEFAULTS.eps,
                    num_groups: Optional[int] = DEFAULTS.num_groups, topk_groups: Optional[int] = DEFAULTS.topk_groups,
                    group_score: str = DEFAULTS.group_score,
                    routed_scaling_factor: float = DEFAULTS.routed_scaling_factor) -> tuple:
    """:func:`route`'s options after the checks that need no tensor, as the ``route_forward`` op
    takes them (``top_k`` to ``routed_scaling_factor`` in schema order): what
    :func:`route_with_options` takes. A router computes them once, not per call."""
    top_k = _int_arg(top_k, "top_k", "route")
    if score not in SCORES:
        raise ValueError(f"l2r_cuda.route: score must be 'softmax' or 'sigmoid', got {score!r}")
    if norm not in NORMS:
        raise ValueError(f"l2r_cuda.route: norm must be 'rms' or None, got {norm!r}")
    groups, kept_groups, group_score = group_args(num_groups, topk_groups, group_score)
    return (top_k, float(beta), norm, float(eps_norm), float(eps), float(tau), score, bool(normalize), groups,
            kept_groups, group_score, float(routed_scaling_factor))


def route_with_options(x: Tensor, proj: Tensor, anchors: Tensor, scale: Union[Tensor, float],
                       norm_weight: Optional[Tensor], expert_bias: Optional[Tensor], options: tuple, *,
                       seq_len: Optional[int] = None, padding_mask: Optional[Tensor] = None) -> RouteOutput:
    """:func:`route` with its options from :func:`checked_options`."""
    if type(scale) is float and isinstance(x, Tensor):
        scale = _scale_tensor(scale, x.device)
    if not _is_compiling():
        # The op through the dispatcher's typed handle, without boxing its 20 arguments: a decode
        # call's cost is mostly this layer's. It takes only calls that need no conversion (foreign
        # arrays included) or message from the checked path (csrc/route/route_python_entry.cpp).
        out = _C.route_forward_entry(x, proj, anchors, scale, norm_weight, expert_bias, padding_mask, options,
                                     seq_len, RouteOutput)
        if out is not NotImplemented:
            return out
    return _route_checked(x, proj, anchors, scale, norm_weight, expert_bias, options, seq_len=seq_len,
                          padding_mask=padding_mask)


@dlpack_io
def _route_checked(x: Tensor, proj: Tensor, anchors: Tensor, scale: Union[Tensor, float],
                   norm_weight: Optional[Tensor], expert_bias: Optional[Tensor], options: tuple, *,
                   seq_len: Optional[int] = None, padding_mask: Optional[Tensor] = None) -> RouteOutput:
    """:func:`route_with_options` through ``torch.ops`` with every check (and foreign arrays)."""
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise ValueError(f"l2r_cuda.route: x must be a tensor [..., d], got {type(x).__name__} "
                         f"with shape {tuple(getattr(x, 'shape', ()))}")
    device = x.device
    if not isinstance(scale, Tensor):
        scale = _scale_tensor(scale, device)
    _check_same_device(device, "route", proj=proj, anchors=anchors, scale=scale, norm_weight=norm_weight,
                       expert_bias=expert_bias, padding_mask=padding_mask)
    _check_device(device, "route_forward", "x")
    tokens = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    args = ((tokens, proj, anchors, scale, norm_weight, expert_bias,
             _padding_arg(padding_mask, tokens.shape[0], "route")) + options + (_seq_len_arg(seq_len, "route"),))
    out = _call_op(torch.ops.l2r_cuda.route_forward, args, (tokens, proj, anchors, scale, norm_weight))
    return RouteOutput(out[0], out[1], out[2], out[3], out[4])


@dlpack_io
def route_logits(
    x: Tensor,
    proj: Tensor,
    anchors: Tensor,
    scale: Union[Tensor, float],
    *,
    beta: float = DEFAULTS.beta,
    norm: Optional[str] = DEFAULTS.norm,
    norm_weight: Optional[Tensor] = None,
    eps_norm: float = DEFAULTS.eps_norm,
    eps: float = DEFAULTS.eps,
    tau: float = DEFAULTS.tau,
) -> Tensor:
    """The L2R logits ``l [T, E]`` (float32; float64 for float64 x) of :func:`route`, before
    softmax/sigmoid: what a model's own aux loss over ``router_logits`` needs. Differentiable with
    respect to ``x, proj, anchors, scale, norm_weight``."""
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise ValueError(f"l2r_cuda.route_logits: x must be a tensor [..., d], got {type(x).__name__}")
    if norm not in NORMS:
        raise ValueError(f"l2r_cuda.route_logits: norm must be 'rms' or None, got {norm!r}")
    if not isinstance(scale, Tensor):
        scale = _scale_tensor(scale, x.device)
    tokens = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    args = (tokens, proj, anchors, scale, norm_weight, float(beta), norm, float(eps_norm), float(eps), float(tau))
    _check_device(x.device, "route_logits", "x")
    logits, _, _ = _call_op(torch.ops.l2r_cuda.route_logits, args, (tokens, proj, anchors, scale, norm_weight))
    return logits


@dlpack_io
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
    """The routing steps of :func:`route` after the logits, for any router (the linear router's
    ``x W^T``): probabilities, statistics, (group-limited) top-k and weights from ``logits [T, E]``,
    natively and with the same selection order and options as :func:`route`. Differentiable with
    respect to ``logits``."""
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        raise ValueError(f"l2r_cuda.route_from_logits: logits must be [T, E], got shape "
                         f"{tuple(getattr(logits, 'shape', ()))}")
    top_k = _int_arg(top_k, "top_k", "route_from_logits")
    if score not in SCORES:
        raise ValueError(f"l2r_cuda.route_from_logits: score must be 'softmax' or 'sigmoid', got {score!r}")
    groups, kept_groups, group_score = group_args(num_groups, topk_groups, group_score)
    args = (logits, expert_bias, _padding_arg(padding_mask, logits.shape[0], "route_from_logits"), top_k,
            score, bool(normalize), groups, kept_groups, group_score, float(routed_scaling_factor),
            _seq_len_arg(seq_len, "route_from_logits"))
    _check_device(logits.device, "route_select", "logits")
    out = _call_op(torch.ops.l2r_cuda.route_select, args, (logits,))
    return RouteOutput(out[0], out[1], out[2], out[3], out[4])


def clear_prepared_cache() -> None:
    """Forget the router parameters the CPU kernels prepared (projection with the RMSNorm weight
    folded in, normalised anchors; float32 math). They are kept per parameter version and prepared
    again whenever a parameter changes through PyTorch (an optimizer step, ``load_state_dict``, any
    in-place op); call this only after writing parameter memory in a way PyTorch's version counter
    does not see: through ``param.data``, another tensor over the same memory, or a NumPy/DLPack
    view (or set ``L2R_PREPARED_CACHE=0`` before the first call to turn the cache off)."""
    torch.ops.l2r_cuda.clear_prepared_cache()


@dlpack_io
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
) -> Permutation:
    """Group the ``T*k`` (token, slot) rows of ``x`` by expert, stable by token index.

    ``x`` ``[T, d]`` (any floating dtype, any row stride); ``indices`` ``[T, k]`` int32/int64 in
    ``[0, num_experts)``. ``align`` pads every expert's group with zero rows to a multiple of
    ``align`` (grouped-GEMM tiles); ``expert_offsets`` include the padding. ``capacity`` keeps at
    most that many rows per expert: the largest ``weights`` when given (ties: lower token first;
    NaN ranks last), else the lowest token indices; dropped slots get ``row_map = -1`` (see
    :func:`dropped_counts`). ``fixed_size=True`` returns ``N = T*k + E*(align-1)`` rows (an upper
    bound; rows past ``expert_offsets[-1]`` are zero) without a host sync; otherwise ``N =
    expert_offsets[-1]``. ``pad_to_capacity=True`` (needs ``capacity``) gives every expert exactly
    ``C = capacity`` rows rounded up to ``align`` (its kept rows, then zero rows): ``N = E*C``,
    ``expert_offsets = [0, C, 2C, ...]``, shapes known from the arguments alone (no host sync), the
    layout of Megatron-Core's drop-and-pad. Differentiable in ``x``.
    """
    num_experts = _int_arg(num_experts, "num_experts", "permute")
    align = _int_arg(align, "align", "permute")
    if capacity is not None:
        capacity = _int_arg(capacity, "capacity", "permute")
    if pad_to_capacity and capacity is None:
        raise ValueError("l2r_cuda.permute: pad_to_capacity=True needs a capacity")
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"l2r_cuda.permute: x must be a [T, d] tensor, got shape "
                         f"{tuple(getattr(x, 'shape', ()))}")
    _check_device(x.device, "permute_plan", "x")
    if weights is not None:
        weights = weights.detach()
    if capacity is None:
        weights = None  # only capacity selection reads them
    row_map, offsets, _ = torch.ops.l2r_cuda.permute_plan(indices, num_experts, align, capacity,
                                                          weights)
    if pad_to_capacity:
        row_map, offsets, num_rows = _pad_groups_to_capacity(row_map, offsets, indices, capacity, align)
    elif fixed_size:
        num_rows = indices.shape[0] * indices.shape[1] + num_experts * (align - 1)
    else:
        num_rows = int(offsets[-1])
    permuted = torch.ops.l2r_cuda.permute_rows(
        x, row_map, num_rows, plan_maps_every_row(align, fixed_size, pad_to_capacity))
    return Permutation(permuted, offsets, row_map)


def plan_maps_every_row(align: int, fixed_size: bool, pad_to_capacity: bool) -> bool:
    """Whether :func:`permute`'s rows are all some kept slot's: without align padding, a fixed size
    or capacity padding, the plan maps its kept slots onto rows ``[0, expert_offsets[-1])`` exactly.
    ``permute_rows`` is told so, and its CUDA row copy then skips resetting its scratch for rows no
    slot maps to (one launch fewer); results do not depend on it."""
    return align == 1 and not fixed_size and not pad_to_capacity


def _pad_groups_to_capacity(row_map: Tensor, offsets: Tensor, indices: Tensor, capacity: int,
                            align: int):
    """Move expert ``e``'s group from ``offsets[e]`` to ``e * C`` (``C`` = capacity rounded up to
    ``align``; every group holds at most ``capacity`` kept rows, so it fits). Pure index
    arithmetic on the plan: no sync, traceable."""
    group_rows = -(-capacity // align) * align
    num_experts = offsets.shape[0] - 1
    padded_offsets = torch.arange(num_experts + 1, device=offsets.device, dtype=offsets.dtype) * group_rows
    shift = padded_offsets[:-1] - offsets[:-1]  # [E]
    moved = row_map + shift[indices.long()]
    return torch.where(row_map >= 0, moved, row_map), padded_offsets, num_experts * group_rows


@dlpack_io
def unpermute(y: Tensor, row_map: Tensor, weights: Tensor) -> Tensor:
    """``out[t] = sum_j weights[t, j] * y[row_map[t, j]]`` ``[T, d]`` in ``y``'s dtype (accumulated
    in float32, float64 for float64 ``y``). Slots with ``row_map < 0`` add exactly zero.
    Differentiable in ``y`` and ``weights``."""
    _check_device(y.device, "unpermute", "y")
    return torch.ops.l2r_cuda.unpermute(y, row_map, weights)


@dlpack_io
def dropped_counts(row_map: Tensor, indices: Tensor, num_experts: int) -> Tensor:
    """Slots dropped by ``capacity`` per expert, ``[E]`` int64 (no host sync, traceable)."""
    dropped = (row_map.reshape(-1) < 0).long()
    return torch.zeros(num_experts, dtype=torch.int64, device=row_map.device).scatter_add_(
        0, indices.reshape(-1).long(), dropped)


@dlpack_io
def routing_map(indices: Tensor, num_experts: int, row_map: Optional[Tensor] = None) -> Tensor:
    """The ``[T, E]`` boolean routing map of ``indices [T, k]``: ``True`` where token ``t`` selected
    expert ``e`` (the mask form Megatron-Core and TransformerEngine's mask-based permutation take).
    With ``row_map`` (from :func:`permute`), slots dropped by ``capacity`` are ``False``. No host
    sync, traceable."""
    num_experts = _int_arg(num_experts, "num_experts", "routing_map")
    selected = torch.ones(indices.shape, dtype=torch.bool, device=indices.device)
    if row_map is not None:
        selected = row_map >= 0
    dense = torch.zeros(indices.shape[0], num_experts, dtype=torch.bool, device=indices.device)
    return dense.scatter(1, indices.long(), selected)


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Rows each expert may take: ``ceil(T * k / E * capacity_factor)`` (Megatron-Core's
    ``get_capacity`` of the ``T*k`` routed slots; 1.0 = exactly the balanced share)."""
    if not capacity_factor > 0:
        raise ValueError(f"l2r_cuda.expert_capacity: capacity_factor must be > 0, got {capacity_factor}")
    return math.ceil((num_tokens * top_k / num_experts) * capacity_factor)
