"""A complete Mixture-of-Experts layer around a router.

``MoE`` = router -> permute (tokens grouped by expert, optionally capped at an expert capacity) ->
SwiGLU experts -> unpermute (weighted sum of each token's k expert outputs) [+ shared experts]. The
router is :class:`l2r_cuda.L2RRouter` (``"l2r"``), :class:`l2r_cuda.LinearRouter` (``"linear"``) or
any module returning a :class:`l2r_cuda.RouteOutput`.

Expert parallelism: ``MoE(..., process_group=group)`` (or ``MoE.shard_(group)`` on a full layer)
keeps only this rank's experts and exchanges tokens with :mod:`l2r_cuda.distributed`.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from .distributed import combine, dispatch, expert_range
from .experts import SharedExperts, SwiGLUExperts
from .ops import dropped_counts, expert_capacity, permute, routing_map, unpermute
from .routers import L2RRouter, LinearRouter, RouteRecorder
from .types import DROP_POLICIES

__all__ = ["MoE"]


class MoE(RouteRecorder):
    """Sparse Mixture-of-Experts layer: ``y = sum_j w_j(x) * expert_{i_j(x)}(x)`` over the top-k experts.

    ``MoE(d_model, d_ff, num_experts, top_k, router="l2r")``:

    - ``router``: ``"l2r"`` builds :class:`l2r_cuda.L2RRouter` (keyword arguments such as ``rank``,
      ``num_anchors``, ``beta``, ``score``, ``normalize``, ``norm`` and the routing policies
      ``num_groups``, ``topk_groups``, ``group_score``, ``routed_scaling_factor`` go to it through
      ``**router_kwargs``), ``"linear"`` builds :class:`LinearRouter` (``score``, ``normalize``
      and the same policies), and an ``nn.Module`` instance returning a ``RouteOutput`` is used as
      given.
    - experts: :class:`SwiGLUExperts` (``use_grouped_mm`` as there).

    Policies (all off by default; see the README's "Routing policies"):

    - ``capacity_factor``: each expert takes at most ``C = ceil(T * k / E * capacity_factor)`` of
      the ``T*k`` routed slots of a forward (Megatron-Core's ``get_capacity``; ``T`` counts this
      rank's tokens, padding included). ``drop_policy="probs"`` drops the slots with the lowest
      router weights first (ties: the later token), ``"position"`` the latest tokens. A dropped
      slot adds nothing to its token's output (the weights of the kept slots are not renormalised).
      ``pad_to_capacity=True`` gives every expert exactly ``C`` rows (zero rows after its tokens):
      static expert batch shapes, Megatron-Core's drop-and-pad.
    - ``num_shared_experts``: that many always-on SwiGLU experts of width ``d_ff`` (one fused MLP of
      width ``shared_expert_d_ff``, default ``num_shared_experts * d_ff``) whose output is added to
      every token's routed output; ``shared_expert_gate=True`` scales it by a learned per-token
      ``sigmoid(x . w)`` (Qwen2-MoE). See :class:`l2r_cuda.experts.SharedExperts`.
    - ``jitter_eps``: in training mode, the router (only; the experts see ``x`` itself) gets
      ``x * u`` with ``u ~ Uniform(1 - eps, 1 + eps)`` drawn per element from torch's RNG (Switch
      Transformer's input jitter, Megatron-Core's ``moe_input_jitter_eps``).

    ``forward(x [..., d], padding_mask=None, seq_len=None) -> y`` with ``y.shape == x.shape`` and
    ``y.dtype == x.dtype`` (expert math in the expert weights' dtype; the weighted combine
    accumulates in float32). ``padding_mask`` (bool, ``x.shape[:-1]``, True = padding, Megatron-Core's
    convention) and ``seq_len`` go to the router: padding tokens are left out of the routing
    statistics (they are still routed and computed), and ``seq_len=S`` makes the statistics per
    sequence of ``S`` consecutive tokens (``[T/S, E]``, for
    :func:`l2r_cuda.losses.sequence_load_balancing_loss`; for ``x [B, S, d]`` pass
    ``seq_len=x.shape[1]``). What the last call did is kept for the losses and for monitoring:

    - ``last_route``: the router's ``RouteOutput`` (attached to the autograd graph);
    - ``last_dropped``: ``[E]`` int64, the slots each expert dropped for capacity (zeros without);
    - ``last_routing_map``: ``[T, E]`` bool, True where token ``t`` was dispatched to expert ``e``
      (capacity drops excluded), computed when read (``l2r_cuda.routing_map`` of the kept slots)::

        y = moe(x)
        r = moe.last_route
        loss = task_loss(y) + 1e-2 * losses.load_balancing_loss(r.tokens_per_expert, r.mean_probs) \\
                            + 1e-3 * losses.router_z_loss(r.lse)

    (Returning only ``y`` keeps the layer a drop-in for a dense FFN; the records are overwritten by
    each call, so read them before the next forward.)

    Works on CPU and CUDA, under autograd, and under ``torch.compile`` (the per-expert loop reads the
    offsets on the host, which is a graph break: compile without ``fullgraph=True`` on that path;
    the tests compile with ``backend="aot_eager"`` to keep CPU test time low).

    Expert parallelism: ``process_group`` (a ``torch.distributed`` group of ``W`` ranks, ``E`` a
    multiple of ``W``) makes this rank hold only experts ``[r*E/W, (r+1)*E/W)`` (``self.experts`` has
    ``E/W`` experts; the router and the shared experts are replicated). ``forward`` then sends each
    token slot to the rank owning its expert and back (:func:`l2r_cuda.distributed.dispatch` /
    :func:`~l2r_cuda.distributed.combine`; capacity is applied on each sending rank, from its own
    ``T``); every rank of the group must call ``forward`` (and ``backward``) together, even with no
    tokens. Built this way the router must be made identical across ranks by the caller (same seed
    or a loaded state) and the local experts are drawn from the local RNG (with one seed everywhere
    they start equal on all ranks: re-seed per rank and call ``moe.experts.reset_parameters()`` if
    that matters); ``MoE(...).shard_(group)`` instead slices a full layer, which gives exactly the
    single-process layer's function. Router and shared-expert gradients are per rank (sum/average
    them across data-parallel ranks as usual); the records cover this rank's tokens only.
    """

    _forward_records = ("last_route", "last_dropped", "_last_slots")

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        top_k: int,
        router: Union[str, nn.Module] = "l2r",
        *,
        capacity_factor: Optional[float] = None,
        drop_policy: str = "probs",
        pad_to_capacity: bool = False,
        num_shared_experts: int = 0,
        shared_expert_d_ff: Optional[int] = None,
        shared_expert_gate: bool = False,
        jitter_eps: Optional[float] = None,
        use_grouped_mm: Optional[bool] = None,
        process_group=None,
        device=None,
        dtype=None,
        **router_kwargs,
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"MoE: top_k must be in [1, num_experts={num_experts}], got {top_k}")
        _check_policies(capacity_factor, drop_policy, pad_to_capacity, num_shared_experts,
                        shared_expert_d_ff, shared_expert_gate, jitter_eps)
        self.d_model, self.d_ff, self.num_experts, self.top_k = d_model, d_ff, num_experts, top_k
        self.capacity_factor, self.drop_policy = capacity_factor, drop_policy
        self.pad_to_capacity, self.jitter_eps = pad_to_capacity, jitter_eps
        if isinstance(router, nn.Module):
            if router_kwargs:
                raise TypeError(f"MoE: router keyword arguments {sorted(router_kwargs)} given with a router instance")
            self.router = router
        elif router == "l2r":
            # The router stays float32 whatever the experts' dtype: it is tiny and its math is fp32.
            self.router = L2RRouter(d_model, num_experts, top_k, device=device, **router_kwargs)
        elif router == "linear":
            self.router = LinearRouter(d_model, num_experts, top_k, device=device, **router_kwargs)
        else:
            raise ValueError(f"MoE: router must be 'l2r', 'linear' or an nn.Module, got {router!r}")
        self.process_group = process_group
        local_experts, self.expert_start = num_experts, 0
        if process_group is not None:
            self.expert_start, end = expert_range(num_experts, process_group)
            local_experts = end - self.expert_start
        self.experts = SwiGLUExperts(local_experts, d_model, d_ff, use_grouped_mm=use_grouped_mm,
                                     device=device, dtype=dtype)
        self.shared_experts = None
        if num_shared_experts or shared_expert_d_ff:
            self.shared_experts = SharedExperts(d_model, shared_expert_d_ff or num_shared_experts * d_ff,
                                                gate=shared_expert_gate, device=device, dtype=dtype)

    @property
    def num_local_experts(self) -> int:
        """Experts held by this module (``num_experts``, or ``num_experts / W`` when sharded)."""
        return self.experts.num_experts

    @property
    def last_routing_map(self) -> Optional[Tensor]:
        """``[T, E]`` bool of the last forward: True where token ``t`` was dispatched to expert
        ``e`` (slots dropped for capacity are False); ``None`` before the first forward."""
        if self._last_slots is None:
            return None
        indices, row_map = self._last_slots
        return routing_map(indices, self.num_experts, row_map)

    def capacity(self, num_tokens: int) -> Optional[int]:
        """Rows each expert may take for a forward of ``num_tokens`` tokens (``None``: no limit)."""
        if self.capacity_factor is None:
            return None
        return expert_capacity(num_tokens, self.num_experts, self.top_k, self.capacity_factor)

    @torch.no_grad()
    def shard_(self, process_group) -> "MoE":
        """Turn this full layer into its expert-parallel part for this rank of ``process_group``, in
        place: keep experts ``[r*E/W, (r+1)*E/W)`` (slices of the stacked weights, copied, with the
        same ``requires_grad``), keep the router and the shared experts as they are, and set
        ``process_group``. Returns ``self``. Build the same full layer on every rank (same seed or
        state dict) and call this on each."""
        if self.process_group is not None:
            raise RuntimeError("MoE.shard_: the layer is already sharded")
        start, end = expert_range(self.num_experts, process_group)
        experts = self.experts
        for name in ("w_gate", "w_up", "w_down"):
            full = getattr(experts, name)
            setattr(experts, name, nn.Parameter(full.detach()[start:end].clone(), requires_grad=full.requires_grad))
        experts.num_experts = end - start
        self.process_group, self.expert_start = process_group, start
        return self

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None, seq_len: Optional[int] = None) -> Tensor:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"MoE: expected x [..., {self.d_model}], got shape {tuple(x.shape)}")
        if padding_mask is not None and tuple(padding_mask.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"MoE: padding_mask must have x's leading shape {tuple(x.shape[:-1])}, "
                             f"got {tuple(padding_mask.shape)}")
        tokens = x.reshape(-1, self.d_model)
        route = self._route(tokens, padding_mask, seq_len)
        capacity = self.capacity(tokens.shape[0])
        if self.process_group is None:
            out, row_map = self._routed_local(tokens, route, capacity)
        else:
            out, row_map = self._routed_expert_parallel(tokens, route, capacity)
        if self.shared_experts is not None:
            out = out + self.shared_experts(tokens)
        self.last_route = route
        self.last_dropped = (dropped_counts(row_map, route.indices, self.num_experts) if capacity is not None
                             else torch.zeros(self.num_experts, dtype=torch.int64, device=x.device))
        self._last_slots = (route.indices, row_map)
        return out.to(x.dtype).reshape(x.shape)

    def _route(self, tokens: Tensor, padding_mask: Optional[Tensor], seq_len: Optional[int]):
        router_input = tokens
        if self.training and self.jitter_eps:
            noise = torch.empty(tokens.shape, device=tokens.device).uniform_(1.0 - self.jitter_eps,
                                                                             1.0 + self.jitter_eps)
            router_input = (tokens.float() * noise).to(tokens.dtype)
        # Only what was given: a custom router module need not know these arguments.
        kwargs = {}
        if padding_mask is not None:
            kwargs["padding_mask"] = padding_mask.reshape(-1)
        if seq_len is not None:
            kwargs["seq_len"] = seq_len
        return self.router(router_input, **kwargs)

    def _routed_local(self, tokens: Tensor, route, capacity: Optional[int]):
        # fixed_size: at most T*k rows (or E*C with pad_to_capacity), a shape known without looking
        # at the routing, which keeps the permutation free of data-dependent shapes.
        dispatched = permute(tokens, route.indices, self.num_experts, fixed_size=True, capacity=capacity,
                             weights=route.weights if self.drop_policy == "probs" else None,
                             pad_to_capacity=self.pad_to_capacity)
        permuted, expert_offsets, row_map = dispatched[0], dispatched[1], dispatched[2]
        expert_out = self.experts(permuted, expert_offsets)
        return unpermute(expert_out, row_map, route.weights), row_map

    def _routed_expert_parallel(self, tokens: Tensor, route, capacity: Optional[int]):
        rows, offsets, handle = dispatch(tokens, route, self.process_group, num_experts=self.num_experts,
                                         capacity=capacity, drop_policy=self.drop_policy,
                                         pad_to_capacity=self.pad_to_capacity)
        return combine(self.experts(rows, offsets), handle), handle.row_map

    def extra_repr(self) -> str:
        text = f"d_model={self.d_model}, d_ff={self.d_ff}, num_experts={self.num_experts}, top_k={self.top_k}"
        if self.capacity_factor is not None:
            text += (f", capacity_factor={self.capacity_factor}, drop_policy={self.drop_policy!r}, "
                     f"pad_to_capacity={self.pad_to_capacity}")
        if self.jitter_eps:
            text += f", jitter_eps={self.jitter_eps}"
        if self.process_group is not None:
            text += f", local_experts=[{self.expert_start}, {self.expert_start + self.num_local_experts})"
        return text


def _check_policies(capacity_factor, drop_policy, pad_to_capacity, num_shared_experts, shared_expert_d_ff,
                    shared_expert_gate, jitter_eps) -> None:
    if capacity_factor is not None and not capacity_factor > 0:
        raise ValueError(f"MoE: capacity_factor must be > 0 or None, got {capacity_factor}")
    if drop_policy not in DROP_POLICIES:
        raise ValueError(f"MoE: drop_policy must be one of {DROP_POLICIES}, got {drop_policy!r}")
    if pad_to_capacity and capacity_factor is None:
        raise ValueError("MoE: pad_to_capacity=True needs a capacity_factor")
    if isinstance(num_shared_experts, bool) or not isinstance(num_shared_experts, int) or num_shared_experts < 0:
        raise ValueError(f"MoE: num_shared_experts must be an int >= 0, got {num_shared_experts!r}")
    if shared_expert_d_ff is not None and shared_expert_d_ff < 1:
        raise ValueError(f"MoE: shared_expert_d_ff must be >= 1 or None, got {shared_expert_d_ff}")
    if shared_expert_gate and not (num_shared_experts or shared_expert_d_ff):
        raise ValueError("MoE: shared_expert_gate=True needs shared experts (num_shared_experts >= 1)")
    if jitter_eps is not None and not 0.0 <= jitter_eps < 1.0:
        raise ValueError(f"MoE: jitter_eps must be in [0, 1) or None, got {jitter_eps}")
