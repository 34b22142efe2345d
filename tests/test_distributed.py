"""l2r_cuda.distributed / MoE(process_group=...): expert parallelism over gloo on CPU, with the
layer's policies (capacity and drop policies, pad to capacity, shared experts).

Each spawned run (2 and 4 processes) goes through several scenarios in one process group; in each,
every rank builds the same full single-process MoE, runs it on all tokens as the reference, shards a
copy (``MoE.shard_``) and runs it on its own slice of the tokens. Output, grad wrt x, router grads
(summed over ranks) and each rank's expert grads must match the reference (slices). Mismatches are
collected, not raised, until the end of the run so that a failing rank does not leave the others
waiting in a collective.
"""

import copy
import os
import tempfile
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from l2r_cuda.distributed import combine, dispatch, expert_range
from l2r_cuda import MoE

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

D_MODEL, D_FF, NUM_EXPERTS, TOP_K = 16, 24, 8, 2


def _full_moe(seed, router="l2r", expert_bias=None, **moe_kwargs):
    torch.manual_seed(seed)
    moe = MoE(D_MODEL, D_FF, NUM_EXPERTS, TOP_K, router=router, **moe_kwargs)
    if moe.shared_experts is not None and moe.shared_experts.gate_weight is not None:
        with torch.no_grad():
            moe.shared_experts.gate_weight.normal_()
    if expert_bias is not None:
        with torch.no_grad():
            moe.router.expert_bias.copy_(expert_bias)
    return moe


def _close(errors, tag, actual, expected, rtol=1e-5, atol=1e-6):
    # torch.testing.assert_close's first call costs seconds of lazy imports in every process.
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        errors.append(f"{tag}: {actual.shape}/{actual.dtype} vs expected {expected.shape}/{expected.dtype}")
    elif not bool(((actual - expected).abs() <= atol + rtol * expected.abs()).all()):
        errors.append(f"{tag}: max abs diff {(actual - expected).abs().max().item():.3g}")


def _grad(param):
    return param.grad if param.grad is not None else torch.zeros_like(param)


def _replicated(moe):
    """Parameters every rank holds in full: the router and the shared experts."""
    for prefix in ("router", "shared_experts"):
        module = getattr(moe, prefix)
        if module is not None:
            for pname, param in module.named_parameters():
                yield f"{prefix}.{pname}", param


def _compare(errors, name, group, tokens_per_rank, router="l2r", expert_bias=None, seed=0, x_grad=True,
             **moe_kwargs):
    """One scenario: the sharded MoE on this rank's tokens vs the full MoE on all tokens (with a
    capacity, on each rank's tokens separately: capacity is applied per sending rank)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    tag = f"[{name} rank {rank}/{world}]"
    full = _full_moe(seed, router, expert_bias, **moe_kwargs)
    sharded = copy.deepcopy(full).shard_(group)
    gen = torch.Generator().manual_seed(seed + 1)
    total = sum(tokens_per_rank)
    x_all = torch.randn(total, D_MODEL, generator=gen)
    upstream = torch.randn(total, D_MODEL, generator=gen)
    lo = sum(tokens_per_rank[:rank])
    hi = lo + tokens_per_rank[rank]

    x_ref = x_all.clone().requires_grad_()
    if full.capacity_factor is None:
        y_ref = full(x_ref)
    else:
        starts = [sum(tokens_per_rank[:r]) for r in range(world + 1)]
        y_ref = torch.cat([full(x_ref[starts[r]:starts[r + 1]]) for r in range(world)])
        full(x_ref[lo:hi])  # this rank's records
        dropped_ref = full.last_dropped
    (y_ref * upstream).sum().backward()

    x = x_all[lo:hi].clone().requires_grad_(x_grad)
    y = sharded(x)
    (y * upstream[lo:hi]).sum().backward()
    # Router and shared experts replicated: their gradient over all tokens is the sum of the
    # ranks' gradients.
    replicated_grads = {}
    for pname, param in _replicated(sharded):
        g = _grad(param).clone()
        dist.all_reduce(g, group=group)
        replicated_grads[pname] = g

    _close(errors, f"{tag} output", y, y_ref[lo:hi])
    if x_grad:
        _close(errors, f"{tag} grad x", x.grad, x_ref.grad[lo:hi])
    for pname, param in _replicated(full):
        _close(errors, f"{tag} grad {pname}", replicated_grads[pname], _grad(param), atol=1e-5)
    if full.capacity_factor is not None:
        if not torch.equal(sharded.last_dropped, dropped_ref):
            errors.append(f"{tag} last_dropped {sharded.last_dropped.tolist()} vs {dropped_ref.tolist()}")
        total_dropped = sharded.last_dropped.sum()
        dist.all_reduce(total_dropped, group=group)
        if int(total_dropped) == 0:
            errors.append(f"{tag} nothing was dropped: the scenario does not test capacity")
    start, end = expert_range(NUM_EXPERTS, group)
    assert sharded.num_local_experts == end - start == NUM_EXPERTS // world
    for pname, param in full.experts.named_parameters():
        local = getattr(sharded.experts, pname)
        _close(errors, f"{tag} expert {pname}", local.detach(), param.detach()[start:end], rtol=0, atol=0)
        _close(errors, f"{tag} grad expert {pname}", _grad(local), _grad(param)[start:end])
    return y.detach()


def _scenarios(group):
    """All scenarios on one expert-parallel group; returns the mismatches found on this rank."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    errors = []
    n_local = NUM_EXPERTS // world
    uneven = [3 + 2 * r for r in range(world)]

    # Balanced-ish random routing, uneven token counts per rank, both routers.
    y1 = _compare(errors, "l2r", group, uneven)
    _compare(errors, "linear", group, uneven, router="linear", seed=3)

    # Deterministic: a second identical run gives the same bits.
    y2 = _compare(errors, "l2r again", group, uneven)
    if not torch.equal(y1, y2):
        errors.append(f"[rank {rank}] two identical runs differ")

    # Imbalanced: every token's top-k lands on rank 0's experts; the other ranks receive nothing.
    bias = torch.zeros(NUM_EXPERTS)
    bias[:n_local] = 10.0
    _compare(errors, "all to rank 0", group, uneven, expert_bias=bias)
    # ... and all on the last rank's experts, with rank 0 holding no tokens at all.
    bias = torch.zeros(NUM_EXPERTS)
    bias[-n_local:] = 10.0
    _compare(errors, "all to last rank, rank 0 empty", group, [0] + uneven[1:], expert_bias=bias, seed=5)

    # T = 0 on one rank (the last), random routing elsewhere.
    _compare(errors, "last rank T=0", group, uneven[:-1] + [0], seed=7)
    # x requires grad on rank 0 only: the exchanges still run in every rank's backward.
    _compare(errors, "x grad on rank 0 only", group, uneven, seed=13, x_grad=rank == 0)
    # No tokens anywhere: still a valid (empty) exchange, forward and backward.
    _compare(errors, "no tokens", group, [0] * world, seed=9)

    # Capacity (dropped on each sending rank, from its own token count), both drop policies, with
    # and without pad-to-capacity; shared experts (replicated) with a gate.
    _compare(errors, "capacity probs", group, uneven, seed=15, capacity_factor=0.6)
    _compare(errors, "capacity position, padded", group, uneven, router="linear", seed=16,
             capacity_factor=0.6, drop_policy="position", pad_to_capacity=True)
    _compare(errors, "capacity padded, rank 0 empty", group, [0] + uneven[1:], seed=17,
             capacity_factor=0.8, pad_to_capacity=True)
    _compare(errors, "shared experts", group, uneven, seed=18, num_shared_experts=2, shared_expert_gate=True)

    # dispatch alone: rows grouped by local expert, stable by (source rank, token order).
    gen = torch.Generator().manual_seed(11)
    counts = [2 + r for r in range(world)]
    x_all = torch.randn(sum(counts), D_MODEL, generator=gen)
    lo = sum(counts[:rank])
    x = x_all[lo:lo + counts[rank]]
    route = _full_moe(0).router(x)
    all_indices = [None] * world
    dist.all_gather_object(all_indices, route.indices, group=group)  # gloo's all_gather: equal shapes
    # group=None (the default group) where that is the group under test
    rows, offsets, handle = dispatch(x, route, None if group is dist.group.WORLD else group)
    start, end = expert_range(NUM_EXPERTS, group)
    expected_rows, expected_offsets = [], [0]
    for e in range(start, end):
        for t, token_experts in enumerate(torch.cat(all_indices)):
            expected_rows += [x_all[t]] * int((token_experts == e).sum())
        expected_offsets.append(len(expected_rows))
    expected = torch.stack(expected_rows) if expected_rows else x_all.new_zeros(0, D_MODEL)
    if offsets.dtype != torch.int64 or offsets.tolist() != expected_offsets or not torch.equal(rows, expected):
        errors.append(f"[dispatch rank {rank}] rows/offsets not grouped by (local expert, source rank, token)")
    # combine of the identity expert: sum_j w_j x
    _close(errors, f"[combine rank {rank}] identity", combine(rows, handle),
           (route.weights.unsqueeze(-1) * x.unsqueeze(1)).sum(1))

    # E must split evenly over the ranks (checked before any collective).
    try:
        MoE(D_MODEL, D_FF, 4 * world + 1, TOP_K, process_group=group)
        errors.append(f"[rank {rank}] num_experts not a multiple of the world size was accepted")
    except ValueError:
        pass
    return errors


def _worker(rank, world, store_path):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        errors = _scenarios(dist.group.WORLD)
        if world == 4:  # also two 2-rank expert-parallel groups side by side (group rank != rank)
            subgroup, _ = dist.new_subgroups(2)
            errors += _scenarios(subgroup)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if errors:
        raise AssertionError("\n".join(errors))


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_moe_matches_single_process(world):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "store")), nprocs=world, join=True)


def test_single_rank_group_and_validation():
    """World size 1 in-process: sharding is a no-op on the function; bad layouts are rejected."""
    if dist.is_initialized():
        pytest.skip("a default process group is already initialized")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1)
        try:
            errors = []
            _compare(errors, "world 1", dist.group.WORLD, [6])
            assert not errors, "\n".join(errors)
            full = _full_moe(0)
            assert "process_group" not in repr(full) and full.num_local_experts == NUM_EXPERTS
            sharded = copy.deepcopy(full).shard_(dist.group.WORLD)
            assert "local_experts=[0, 8)" in repr(sharded)
            with pytest.raises(RuntimeError):
                sharded.shard_(dist.group.WORLD)
            built = MoE(D_MODEL, D_FF, 5, TOP_K, process_group=dist.group.WORLD)
            assert built.num_local_experts == 5
            with pytest.raises(ValueError):
                dispatch(torch.randn(3, D_MODEL), SimpleNamespace(weights=torch.ones(3, 2),
                                                                  indices=torch.zeros(3, 2, dtype=torch.int64)))
        finally:
            dist.destroy_process_group()
