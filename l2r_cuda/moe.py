"""A complete Mixture-of-Experts layer around the L2R router, and a linear baseline router.

``MoE`` = router -> permute (tokens grouped by expert) -> SwiGLU experts -> unpermute (weighted sum
of each token's k expert outputs). The router is either :class:`l2r_cuda.L2RRouter` (``"l2r"``) or
:class:`LinearRouter` (``"linear"``, the usual ``softmax(x W_g^T)``); both return a
:class:`l2r_cuda.reference.RouteOutput`, so everything downstream (the layer, the auxiliary losses
of :mod:`l2r_cuda.losses`, the metrics of :mod:`l2r_cuda.metrics`) is router-agnostic.

Expert parallelism: ``MoE(..., process_group=group)`` (or ``MoE.shard_(group)`` on a full layer)
keeps only this rank's experts and exchanges tokens with :mod:`l2r_cuda.distributed`.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .reference import SCORES, RouteOutput, route_from_logits

__all__ = ["LinearRouter", "SwiGLUExperts", "MoE", "route_from_logits", "router_parameters"]


def _dispatch_ops():
    """``(permute, unpermute)`` of the package, looked up at call time (moe.py is imported by the
    package's __init__, before those names exist)."""
    import l2r_cuda

    return l2r_cuda.permute, l2r_cuda.unpermute


class LinearRouter(nn.Module):
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
        score: str = "softmax",
        normalize: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"LinearRouter: top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if score not in SCORES:
            raise ValueError(f"LinearRouter: score must be 'softmax' or 'sigmoid', got {score!r}")
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

    def forward(self, x: Tensor) -> RouteOutput:
        return route_from_logits(
            self.logits(x), self.top_k, score=self.score, normalize=self.normalize, expert_bias=self.expert_bias
        )

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"score={self.score!r}, normalize={self.normalize}")


def _grouped_mm_supported(x: Tensor, weight: Tensor) -> bool:
    # torch._grouped_mm's fast kernels: CUDA, bf16, Hopper (sm90) or newer, 16-byte aligned rows
    # (feature sizes multiple of 8 in bf16). Anything else takes the per-expert loop (the CPU
    # kernel exists in recent torch but its backward is not reliable).
    return (
        hasattr(torch, "_grouped_mm")
        and x.is_cuda
        and weight.shape[-1] % 8 == 0
        and weight.shape[-2] % 8 == 0
        and x.dtype == torch.bfloat16
        and weight.dtype == torch.bfloat16
        and torch.cuda.get_device_capability(x.device)[0] >= 9
    )


class SwiGLUExperts(nn.Module):
    """``E`` SwiGLU feed-forward experts with their weights stacked, ready for a grouped GEMM.

    Expert ``e`` computes ``down_e( silu(x @ w_gate[e]) * (x @ w_up[e]) )``:

    - ``w_gate [E, d, f]``, ``w_up [E, d, f]``, ``w_down [E, f, d]`` stored input-major (``x @ W``),
      which is the ``[G, K, N]`` layout ``torch._grouped_mm`` takes.
    - ``forward(x [N, d], expert_offsets [E+1])``: rows ``offsets[e]:offsets[e+1]`` go to expert ``e``
      (the output of ``l2r_cuda.permute``); rows past ``offsets[-1]`` come out as zeros.
    - ``use_grouped_mm``: ``None`` (default) uses ``torch._grouped_mm`` when it is fast (CUDA, bf16,
      sm90+) and otherwise a per-expert loop over the offsets; ``True``/``False`` force one path.

    Init: uniform(+-1/sqrt(fan_in)) per matrix, like ``nn.Linear``.
    """

    def __init__(self, num_experts: int, d_model: int, d_ff: int, *, use_grouped_mm: Optional[bool] = None,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.use_grouped_mm = use_grouped_mm
        self.w_gate = nn.Parameter(torch.empty(num_experts, d_model, d_ff, **factory))
        self.w_up = nn.Parameter(torch.empty(num_experts, d_model, d_ff, **factory))
        self.w_down = nn.Parameter(torch.empty(num_experts, d_ff, d_model, **factory))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for weight, fan_in in ((self.w_gate, self.d_model), (self.w_up, self.d_model), (self.w_down, self.d_ff)):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(weight, -bound, bound)

    def expert_forward(self, x: Tensor, expert: int) -> Tensor:
        """Expert ``expert`` alone on rows ``x [n, d]`` (the per-token definition the tests use)."""
        x = x.to(self.w_gate.dtype)
        return (F.silu(x @ self.w_gate[expert]) * (x @ self.w_up[expert])) @ self.w_down[expert]

    def forward(self, x: Tensor, expert_offsets: Tensor) -> Tensor:
        use_grouped = self.use_grouped_mm
        if use_grouped is None:
            use_grouped = _grouped_mm_supported(x, self.w_gate)
        if use_grouped:
            return self._forward_grouped(x, expert_offsets)
        return self._forward_loop(x, expert_offsets)

    def _forward_grouped(self, x: Tensor, expert_offsets: Tensor) -> Tensor:
        # offs are the int32 end rows of each group; rows after the last group are not computed.
        ends = expert_offsets[1:].to(torch.int32)
        x = x.to(self.w_gate.dtype)
        hidden = F.silu(torch._grouped_mm(x, self.w_gate, offs=ends)) * torch._grouped_mm(x, self.w_up, offs=ends)
        out = torch._grouped_mm(hidden, self.w_down, offs=ends)
        tail = torch.arange(x.shape[0], device=x.device) >= expert_offsets[-1]
        return out.masked_fill(tail[:, None], 0.0)

    def _forward_loop(self, x: Tensor, expert_offsets: Tensor) -> Tensor:
        # One host sync for the E+1 offsets, then one dense SwiGLU per non-empty expert slice. The
        # slices are disjoint and cover rows [0, offsets[-1]), so concatenation rebuilds the order.
        bounds = expert_offsets.tolist()
        pieces = []
        for expert in range(self.num_experts):
            start, end = bounds[expert], bounds[expert + 1]
            if end > start:
                pieces.append(self.expert_forward(x[start:end], expert))
        tail = x.shape[0] - bounds[-1]
        if tail > 0:
            pieces.append(x.new_zeros(tail, self.d_model, dtype=self.w_down.dtype))
        if not pieces:
            return x.new_zeros(x.shape[0], self.d_model, dtype=self.w_down.dtype)
        return torch.cat(pieces, dim=0)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}"


class MoE(nn.Module):
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
            from .nn import L2RRouter  # nn.py re-exports this module: import at call time

            # The router stays float32 whatever the experts' dtype: it is tiny and its math is fp32.
            self.router = L2RRouter(d_model, num_experts, top_k, device=device, **router_kwargs)
        elif router == "linear":
            self.router = LinearRouter(d_model, num_experts, top_k, device=device, **router_kwargs)
        else:
            raise ValueError(f"MoE: router must be 'l2r', 'linear' or an nn.Module, got {router!r}")
        self.process_group = process_group
        local_experts, self.expert_start = num_experts, 0
        if process_group is not None:
            from .distributed import expert_range

            self.expert_start, end = expert_range(num_experts, process_group)
            local_experts = end - self.expert_start
        self.experts = SwiGLUExperts(local_experts, d_model, d_ff, use_grouped_mm=use_grouped_mm,
                                     device=device, dtype=dtype)
        self.last_route: Optional[RouteOutput] = None

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
        from .distributed import expert_range

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
        permute, unpermute = _dispatch_ops()
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
        from .distributed import combine, dispatch

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


def router_parameters(module: nn.Module) -> Iterator[nn.Parameter]:
    """The parameters of every router inside ``module`` (L2RRouter, LinearRouter, and the routers of
    :mod:`l2r_cuda.integrations.hf` gates), e.g. for an optimizer that trains only the routers (RoMA)
    or for a separate learning rate."""
    from .nn import L2RRouter

    seen = set()
    for sub in module.modules():
        if isinstance(sub, (L2RRouter, LinearRouter)):
            for param in sub.parameters():
                if id(param) not in seen:
                    seen.add(id(param))
                    yield param
