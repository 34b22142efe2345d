"""A complete Mixture-of-Experts layer around a router.

``MoE`` = router -> permute (tokens grouped by expert) -> SwiGLU experts -> unpermute (weighted sum
of each token's k expert outputs). The router is :class:`l2r_cuda.L2RRouter` (``"l2r"``),
:class:`l2r_cuda.LinearRouter` (``"linear"``) or any module returning a :class:`l2r_cuda.RouteOutput`.

Expert parallelism: ``MoE(..., process_group=group)`` (or ``MoE.shard_(group)`` on a full layer)
keeps only this rank's experts and exchanges tokens with :mod:`l2r_cuda.distributed`.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from .distributed import combine, dispatch, expert_range
from .experts import SwiGLUExperts
from .ops import permute, unpermute
from .routers import L2RRouter, LinearRouter, RouteRecorder

__all__ = ["MoE"]


class MoE(RouteRecorder):
    """Sparse Mixture-of-Experts layer: ``y = sum_j w_j(x) * expert_{i_j(x)}(x)`` over the top-k experts.

    ``MoE(d_model, d_ff, num_experts, top_k, router="l2r")``:

    - ``router``: ``"l2r"`` builds :class:`l2r_cuda.L2RRouter` (keyword arguments such as ``rank``,
      ``num_anchors``, ``beta``, ``score``, ``normalize``, ``norm`` go to it through
      ``**router_kwargs``), ``"linear"`` builds :class:`LinearRouter` (``score``, ``normalize``), and
      an ``nn.Module`` instance returning a ``RouteOutput`` is used as given.
    - experts: :class:`SwiGLUExperts` (``use_grouped_mm`` as there).

    ``forward(x [..., d]) -> y`` with ``y.shape == x.shape`` and ``y.dtype == x.dtype`` (expert math in
    the expert weights' dtype; the weighted combine accumulates in float32). The router's output of
    the last call is kept in ``self.last_route`` (a ``RouteOutput``, attached to the autograd graph)
    so the auxiliary losses can be added after the forward::

        y = moe(x)
        r = moe.last_route
        loss = task_loss(y) + 1e-2 * losses.load_balancing_loss(r.tokens_per_expert, r.mean_probs) \\
                            + 1e-3 * losses.router_z_loss(r.lse)

    (Returning only ``y`` keeps the layer a drop-in for a dense FFN; ``last_route`` is overwritten by
    each call, so read it before the next forward.)

    Works on CPU and CUDA, under autograd, and under ``torch.compile`` (the per-expert loop reads the
    offsets on the host, which is a graph break: compile without ``fullgraph=True`` on that path;
    the tests compile with ``backend="aot_eager"`` to keep CPU test time low).

    Expert parallelism: ``process_group`` (a ``torch.distributed`` group of ``W`` ranks, ``E`` a
    multiple of ``W``) makes this rank hold only experts ``[r*E/W, (r+1)*E/W)`` (``self.experts`` has
    ``E/W`` experts; the router is replicated, over all ``E``). ``forward`` then sends each token
    slot to the rank owning its expert and back (:func:`l2r_cuda.distributed.dispatch` /
    :func:`~l2r_cuda.distributed.combine`); every rank of the group must call ``forward`` (and
    ``backward``) together, even with no tokens. Built this way the router must be made identical
    across ranks by the caller (same seed or a loaded state) and the local experts are drawn from
    the local RNG (with one seed everywhere they start equal on all ranks: re-seed per rank and call
    ``moe.experts.reset_parameters()`` if that matters); ``MoE(...).shard_(group)`` instead slices a
    full layer, which gives exactly the single-process layer's function. Router gradients are per rank (sum/average them across
    data-parallel ranks as usual); ``last_route`` covers this rank's tokens only.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        top_k: int,
        router: Union[str, nn.Module] = "l2r",
        *,
        use_grouped_mm: Optional[bool] = None,
        process_group=None,
        device=None,
        dtype=None,
        **router_kwargs,
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"MoE: top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.d_model, self.d_ff, self.num_experts, self.top_k = d_model, d_ff, num_experts, top_k
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

    @property
    def num_local_experts(self) -> int:
        """Experts held by this module (``num_experts``, or ``num_experts / W`` when sharded)."""
        return self.experts.num_experts

    @torch.no_grad()
    def shard_(self, process_group) -> "MoE":
        """Turn this full layer into its expert-parallel part for this rank of ``process_group``, in
        place: keep experts ``[r*E/W, (r+1)*E/W)`` (slices of the stacked weights, copied, with the
        same ``requires_grad``), keep the router as is, and set ``process_group``. Returns ``self``.
        Build the same full layer on every rank (same seed or state dict) and call this on each."""
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

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"MoE: expected x [..., {self.d_model}], got shape {tuple(x.shape)}")
        tokens = x.reshape(-1, self.d_model)
        if self.process_group is not None:
            return self._forward_expert_parallel(x, tokens)
        route = self.router(tokens)
        # fixed_size with align=1 and no capacity is exactly T*k rows: a shape known without looking
        # at the routing, which keeps the permutation free of data-dependent shapes.
        dispatched = permute(tokens, route.indices, self.num_experts, fixed_size=True)
        permuted, expert_offsets, row_map = dispatched[0], dispatched[1], dispatched[2]
        expert_out = self.experts(permuted, expert_offsets)
        out = unpermute(expert_out, row_map, route.weights)
        self.last_route = route
        return out.to(x.dtype).reshape(x.shape)

    def _forward_expert_parallel(self, x: Tensor, tokens: Tensor) -> Tensor:
        route = self.router(tokens)
        rows, offsets, handle = dispatch(tokens, route, self.process_group, num_experts=self.num_experts)
        out = combine(self.experts(rows, offsets), handle)
        self.last_route = route
        return out.to(x.dtype).reshape(x.shape)

    def extra_repr(self) -> str:
        text = f"d_model={self.d_model}, d_ff={self.d_ff}, num_experts={self.num_experts}, top_k={self.top_k}"
        if self.process_group is not None:
            text += f", local_experts=[{self.expert_start}, {self.expert_start + self.num_local_experts})"
        return text
