"""Expert parallelism over ``torch.distributed``: send tokens to the ranks that own their experts and
bring the expert outputs back.

Layout: with ``E`` experts and a group of ``W`` ranks, rank ``r`` owns the contiguous block of
experts ``[r*E/W, (r+1)*E/W)`` (``E`` must be a multiple of ``W``). The router is replicated: every
rank routes its own tokens over all ``E`` experts.

::

    route = router(x)                                        # x [T, d], this rank's tokens
    rows, offsets, handle = dispatch(x, route, group)        # rows grouped by *local* expert
    y = local_experts(rows, offsets)                         # grouped GEMM over E/W experts
    out = combine(y, handle)                                 # [T, d] on the token's own rank

``dispatch``:

1. ``l2r_cuda.permute`` puts this rank's ``T*k`` (token, slot) rows in global expert order, which
   is also destination-rank order because experts are laid out contiguously per rank;
2. the per-expert counts are exchanged with one ``all_to_all_single`` on an int64 tensor, so every
   rank learns how many rows it receives from each source rank for each of its local experts;
3. the rows are exchanged with ``all_to_all_single`` (uneven splits). They arrive grouped by source
   rank, then local expert, then token order on the source;
4. they are regrouped by local expert, stable by (source rank, original order), with ``offsets
   [E/W + 1]`` (int64) for the grouped GEMM. The regrouping is a permutation kept in the handle.

``combine`` undoes step 4, runs the reverse ``all_to_all_single`` and ``l2r_cuda.unpermute`` (the
weighted sum of each token's ``k`` expert outputs, float32 accumulation).

Both are differentiable with respect to ``x``, the router weights and the expert outputs: the
backward of the row exchange in ``dispatch`` is the exchange of ``combine`` and vice versa. As with
every collective inside autograd, **every rank of the group must run the forward and the backward**
(the same number of dispatch/combine calls in the same order, and ``x.requires_grad`` the same on all
ranks), including ranks with no tokens (``T = 0``) and ranks whose experts receive nothing. To make
that hold whatever requires grad on each rank, both exchanges are recorded in the autograd graph
whenever grad mode is on (an empty leaf requiring grad rides along as an extra input), and
``combine``'s input is tied to ``dispatch``'s output, so a ``.backward()`` through the output on
every rank runs the same exchanges everywhere (grad mode must agree across ranks; with
``torch.autograd.grad(..., inputs=...)`` ask for the same inputs everywhere and include ``x`` or
the expert weights of every rank).

Everything is deterministic: the exchanges and regroupings only copy rows, and the sum over a
token's ``k`` outputs is done by ``unpermute`` on the token's own rank. Sizes and offsets are int64.
One host synchronisation per ``dispatch`` (the split sizes ``all_to_all_single`` needs as Python
ints); ``combine`` has none.

Capacity: ``dispatch(..., capacity=C)`` keeps at most ``C`` rows per expert *on each sending rank*
(as Megatron-Core drops in the router, before the exchange), dropping the lowest router weights
(``drop_policy="probs"``) or the highest token indices (``"position"``); dropped slots add nothing in
``combine`` (``handle.row_map < 0``, :func:`l2r_cuda.dropped_counts`). ``pad_to_capacity=True``
sends exactly ``C`` rows per expert (kept rows, then zero rows): every rank sends ``E*C`` rows,
and a local expert receives the ``C``-row blocks of every source rank. ``align`` padding is not
supported here.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .ops import permute, unpermute
from .types import DROP_POLICIES

__all__ = ["dispatch", "combine", "DispatchHandle", "Dispatched", "expert_range"]


class DispatchHandle(NamedTuple):
    """What :func:`combine` needs to undo a :func:`dispatch` (and what the backward reuses).

    - ``row_map [T, k]`` int64: row of each (token, slot) in the local ``permute`` output;
    - ``weights [T, k]``: the router weights combine multiplies by (differentiable);
    - ``send_splits``: rows this rank sent to each rank (``W`` ints, sum ``T*k``);
    - ``recv_splits``: rows this rank received from each rank (``W`` ints, sum ``N``);
    - ``recv_counts [W, E/W]`` int64: rows received from source rank ``s`` for local expert ``e``;
    - ``order [N]`` int64: expert-grouped row ``p`` is received row ``order[p]``;
    - ``position [N]`` int64: received row ``i`` is expert-grouped row ``position[i]`` (inverse);
    - ``group``: the process group (``None``: the default group);
    - ``rows``: the dispatched rows (:func:`combine` ties its input to them for autograd).
    """

    row_map: Tensor
    weights: Tensor
    send_splits: List[int]
    recv_splits: List[int]
    recv_counts: Tensor
    order: Tensor
    position: Tensor
    group: Optional[dist.ProcessGroup]
    rows: Tensor


class Dispatched(NamedTuple):
    """Output of :func:`dispatch`: ``rows [N, d]`` grouped by local expert, ``expert_offsets
    [E/W + 1]`` int64 (rows ``offsets[e]:offsets[e+1]`` go to local expert ``e``), ``handle``."""

    rows: Tensor
    expert_offsets: Tensor
    handle: DispatchHandle


def expert_range(num_experts: int, group: Optional[dist.ProcessGroup] = None) -> Tuple[int, int]:
    """``(start, end)``: the global expert indices owned by this rank of ``group``."""
    world = dist.get_world_size(group)
    if num_experts % world != 0:
        raise ValueError(f"expert parallelism: num_experts={num_experts} is not a multiple of the group "
                         f"size {world}")
    per_rank = num_experts // world
    start = dist.get_rank(group) * per_rank
    return start, start + per_rank


def _exchange(x: Tensor, output_splits: List[int], input_splits: List[int], group) -> Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x, output_splits, input_splits, group=group)
    return out


def _anchor(like: Tensor) -> Optional[Tensor]:
    """An empty leaf that requires grad (under grad mode): passed to the exchanges and ties below so
    that they are recorded in the autograd graph on *every* rank, whatever requires grad locally.
    Otherwise a rank whose experts received no rows (its expert output does not depend on anything)
    or whose ``x`` does not require grad would skip an exchange in backward that the other ranks
    run, and they would wait for it forever."""
    return torch.empty(0, device=like.device, requires_grad=True) if torch.is_grad_enabled() else None


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits; backward is the same exchange with splits swapped."""

    @staticmethod
    def forward(ctx, x: Tensor, output_splits: List[int], input_splits: List[int], group,
                anchor: Optional[Tensor] = None) -> Tensor:
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        return _exchange(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad_x = _AllToAll.apply(grad, ctx.input_splits, ctx.output_splits, ctx.group, _anchor(grad))
        return grad_x, None, None, None, None


class _Tie(torch.autograd.Function):
    """Returns ``y`` unchanged, and makes it depend (with zero gradient) on ``rows``: the backward of
    ``combine``'s exchange then always leads to the backward of ``dispatch``'s exchange, even when
    the experts' output ignores the dispatched rows (no rows at all on this rank)."""

    @staticmethod
    def forward(ctx, y: Tensor, rows: Tensor) -> Tensor:
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _Reorder(torch.autograd.Function):
    """``x[index]`` for a permutation ``index``; backward gathers with the inverse permutation
    (a copy, no scatter-add)."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(index, inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: Tensor):
        index, inverse = ctx.saved_tensors
        return _Reorder.apply(grad, inverse, index), None, None


def _group_by_local_expert(recv_counts: Tensor, num_rows: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Received rows come as (source rank, local expert, source order). Returns ``(order, position,
    offsets)``: the stable regrouping by local expert and its inverse, and the local offsets."""
    world, n_local = recv_counts.shape
    device = recv_counts.device
    per_expert = recv_counts.sum(0)                                     # [E_local]
    offsets = torch.zeros(n_local + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.cumsum(per_expert, 0)
    # Block (s, e) starts at src_start[s, e] in the received layout and at dst_start[s, e] in the
    # grouped layout (after the expert's rows from ranks < s).
    flat = recv_counts.reshape(-1)
    src_start = (torch.cumsum(flat, 0) - flat).view(world, n_local)
    dst_start = offsets[:-1].unsqueeze(0) + torch.cumsum(recv_counts, 0) - recv_counts
    shift = (dst_start - src_start).reshape(-1)
    position = torch.arange(num_rows, dtype=torch.int64, device=device) + torch.repeat_interleave(
        shift, flat, output_size=num_rows)
    order = torch.empty_like(position)
    order[position] = torch.arange(num_rows, dtype=torch.int64, device=device)
    return order, position, offsets


def dispatch(
    x: Tensor,
    routing,
    group: Optional[dist.ProcessGroup] = None,
    *,
    num_experts: Optional[int] = None,
    capacity: Optional[int] = None,
    drop_policy: str = "probs",
    pad_to_capacity: bool = False,
) -> Dispatched:
    """Send each of this rank's (token, slot) rows to the rank owning its expert.

    ``x [T, d]``; ``routing``: a ``RouteOutput`` (or anything with ``weights [T, k]`` and
    ``indices [T, k]`` global expert indices); ``group``: process group (``None``: default group);
    ``num_experts``: total ``E`` (default ``routing.tokens_per_expert.numel()``). ``capacity``,
    ``drop_policy`` (``"probs"``: drop the lowest ``routing.weights``; ``"position"``: the highest
    token indices) and ``pad_to_capacity``: see the module docstring; all ranks must pass the same
    ``drop_policy`` and ``pad_to_capacity``.

    Returns ``Dispatched(rows [N, d], expert_offsets [E/W + 1] int64, handle)``: the rows every rank
    sent to this one, grouped by local expert ``0..E/W-1``, stable by (source rank, token order on
    the source), ready for a grouped GEMM; pass the expert outputs and ``handle`` to :func:`combine`.
    """
    weights, indices = routing.weights, routing.indices
    if num_experts is None:
        tokens_per_expert = getattr(routing, "tokens_per_expert", None)
        if tokens_per_expert is None:
            raise ValueError("dispatch: num_experts is required when routing has no tokens_per_expert")
        num_experts = tokens_per_expert.numel()
    if x.dim() != 2 or indices.dim() != 2 or indices.shape[0] != x.shape[0] or weights.shape != indices.shape:
        raise ValueError(f"dispatch: expected x [T, d], indices and weights [T, k]; got x {tuple(x.shape)}, "
                         f"indices {tuple(indices.shape)}, weights {tuple(weights.shape)}")
    if drop_policy not in DROP_POLICIES:
        raise ValueError(f"dispatch: drop_policy must be one of {DROP_POLICIES}, got {drop_policy!r}")
    world = dist.get_world_size(group)
    start, end = expert_range(num_experts, group)
    n_local = end - start

    permuted = permute(x, indices, num_experts, capacity=capacity, pad_to_capacity=pad_to_capacity,
                       weights=weights if drop_policy == "probs" else None)
    rows, offsets, row_map = permuted[0], permuted[1], permuted[2]
    send_counts = (offsets[1:] - offsets[:-1]).to(torch.int64).view(world, n_local).contiguous()
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    # The one host sync: split sizes must be Python ints.
    send_splits, recv_splits = torch.stack([send_counts.sum(1), recv_counts.sum(1)]).tolist()
    num_sent, num_recv = sum(send_splits), sum(recv_splits)
    if rows.shape[0] != num_sent:  # a permute that pads past offsets[-1]: send only the real rows
        rows = rows.narrow(0, 0, num_sent)

    received = _AllToAll.apply(rows, recv_splits, send_splits, group, _anchor(x))
    order, position, local_offsets = _group_by_local_expert(recv_counts, num_recv)
    grouped = _Reorder.apply(received, order, position)
    handle = DispatchHandle(row_map, weights, send_splits, recv_splits, recv_counts, order, position, group,
                            grouped)
    return Dispatched(grouped, local_offsets, handle)


def combine(y: Tensor, handle: DispatchHandle) -> Tensor:
    """Return expert outputs to the tokens' ranks and sum them: ``out [T, d]`` with
    ``out[t] = sum_j weights[t, j] * y_{expert indices[t, j]}(x[t])``.

    ``y [N, d]``: the expert outputs in :func:`dispatch`'s ``rows`` order (rows past ``N`` are
    ignored). Output dtype is ``y``'s (``unpermute`` accumulates in float32).
    """
    num_recv = sum(handle.recv_splits)
    if y.shape[0] < num_recv:
        raise ValueError(f"combine: expected at least {num_recv} rows from dispatch, got {y.shape[0]}")
    if y.shape[0] != num_recv:
        y = y.narrow(0, 0, num_recv)
    if handle.rows.requires_grad:
        y = _Tie.apply(y, handle.rows)
    received_order = _Reorder.apply(y, handle.position, handle.order)
    back = _AllToAll.apply(received_order, handle.send_splits, handle.recv_splits, handle.group, _anchor(y))
    return unpermute(back, handle.row_map, handle.weights)
