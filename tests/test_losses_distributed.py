"""losses.global_load_balancing_loss over gloo with 2 processes, against a float64 single-process
computation on the whole global batch (Megatron-Core's Switch formula written out here).

Every rank holds the same linear router ``W`` (a float64 leaf) and its own tokens (different token
counts, padding, one rank possibly empty). The loss must equal the single-process loss of the
concatenated batch on every rank, and the rank gradients of ``W``, averaged as data-parallel
training averages them, must equal the single-process gradient. Mismatches are collected, not
raised, so that a failing rank does not leave the other waiting in a collective.
"""

import os
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from l2r_cuda import losses

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

D, E, K = 6, 8, 2


def _scores(x, weight, score):
    logits = x @ weight.t()
    probs = torch.softmax(logits, -1) if score == "softmax" else torch.sigmoid(logits)
    indices = torch.topk(probs.detach(), K, dim=-1).indices
    balancing = probs if score == "softmax" else probs / probs.sum(-1, keepdim=True)
    return balancing, indices


def _statistics(x, padding, weight, score):
    """This rank's router statistics as route(..., padding_mask=padding) defines them."""
    balancing, indices = _scores(x, weight, score)
    real = ~padding
    routed = torch.zeros(x.shape[0], E, dtype=torch.int64).scatter(1, indices, 1)
    counts = routed[real].sum(0)
    mean_probs = balancing[real].sum(0) / max(int(real.sum()), 1)
    return counts, mean_probs


def _single_process_loss(x, padding, weight, score):
    """Megatron-Core's switch_load_balancing_loss_func on the whole batch, padding removed."""
    balancing, indices = _scores(x, weight, score)
    real = (~padding).unsqueeze(-1)
    routing_map = torch.zeros(x.shape[0], E, dtype=torch.bool).scatter(1, indices, True) & real
    total_tokens = routing_map.sum() / K
    return torch.sum((balancing * real).sum(0) * routing_map.sum(0)) * E / (K * total_tokens ** 2)


def _case(errors, name, tokens_per_rank, score, pad_fraction, seed):
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(seed)
    weight_init = torch.randn(E, D, generator=g, dtype=torch.float64)
    x_all = torch.randn(sum(tokens_per_rank), D, generator=g, dtype=torch.float64)
    padding_all = torch.rand(sum(tokens_per_rank), generator=g) < pad_fraction
    lo = sum(tokens_per_rank[:rank])
    hi = lo + tokens_per_rank[rank]

    weight = weight_init.clone().requires_grad_()
    counts, mean_probs = _statistics(x_all[lo:hi], padding_all[lo:hi], weight, score)
    loss = losses.global_load_balancing_loss(counts, mean_probs, dist.group.WORLD)
    loss.backward()
    grad = weight.grad.clone()
    dist.all_reduce(grad, op=dist.ReduceOp.AVG)  # what data-parallel training does

    weight_ref = weight_init.clone().requires_grad_()
    expected = _single_process_loss(x_all, padding_all, weight_ref, score)
    expected.backward()

    tag = f"[{name} rank {rank}/{world}]"
    if loss.dtype != torch.float64 or not torch.allclose(loss, expected, rtol=1e-12, atol=0):
        errors.append(f"{tag} loss {loss.item()!r} vs single-process {expected.item()!r}")
    if not torch.allclose(grad, weight_ref.grad, rtol=1e-9, atol=1e-14):
        errors.append(f"{tag} averaged grad differs by {(grad - weight_ref.grad).abs().max().item():.3g}")
    # With tokens on every rank, a rank's own micro-batch loss differs from the global one (the
    # test can tell them apart).
    if all(tokens_per_rank) and torch.allclose(losses.load_balancing_loss(counts, mean_probs), expected):
        errors.append(f"{tag} local loss equals the global loss: the case does not test anything")


def _worker(rank, world, store_path):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    errors = []
    try:
        _case(errors, "softmax, uneven", [9, 23], "softmax", 0.0, seed=0)
        _case(errors, "sigmoid, padded", [17, 12], "sigmoid", 0.3, seed=1)
        _case(errors, "softmax, padded, rank 1 empty", [20, 0], "softmax", 0.2, seed=2)
        # float32 statistics give a float32 loss with the same value.
        counts = torch.tensor([3, 1, 0, 4]) * (rank + 1)
        mean_probs = torch.tensor([0.4, 0.1, 0.2, 0.3]) if rank == 0 else torch.tensor([0.1, 0.2, 0.3, 0.4])
        loss = losses.global_load_balancing_loss(counts, mean_probs)
        # global: counts [9, 3, 0, 12] / 24; P = (8 * P0 + 16 * P1) / 24
        P = (8 * torch.tensor([0.4, 0.1, 0.2, 0.3]) + 16 * torch.tensor([0.1, 0.2, 0.3, 0.4])) / 24
        expected = 4 * torch.sum(torch.tensor([9.0, 3, 0, 12]) / 24 * P)
        if loss.dtype != torch.float32 or abs(loss.item() - expected.item()) > 1e-6:
            errors.append(f"[rank {rank}] float32 loss {loss.item()} vs {expected.item()}")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if errors:
        raise AssertionError("\n".join(errors))


def test_global_load_balancing_loss_is_the_single_process_loss_of_the_global_batch():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "store")), nprocs=2, join=True)
