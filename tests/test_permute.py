"""l2r_cuda.permute / unpermute (docs/SPEC.md "Dispatch"): native CPU (and real CUDA when present) against
l2r_cuda.reference. One sample list drives correctness, gradients and opcheck."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

import l2r_cuda
from l2r_cuda import ops as ops_module
from l2r_cuda import reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@dataclass(frozen=True)
class Sample:
    T: int
    E: int
    k: int
    align: int = 1
    capacity: Optional[int] = None
    weighted: bool = False      # capacity ranks by router weight
    dtype: torch.dtype = torch.float32
    strided: bool = False       # x is a non-contiguous view
    d: int = 24
    index_dtype: torch.dtype = torch.int64
    seed: int = 0

    def __str__(self):
        cap = "none" if self.capacity is None else f"{self.capacity}{'w' if self.weighted else ''}"
        return (f"T{self.T}-E{self.E}-k{self.k}-a{self.align}-cap{cap}-{str(self.dtype)[6:]}"
                f"{'-strided' if self.strided else ''}-d{self.d}-{str(self.index_dtype)[6:]}")


def sample_inputs() -> list[Sample]:
    """Edge cases plus a seeded subset of T x E x k x align x capacity x dtype x stride."""
    out = [
        Sample(0, 1, 1), Sample(0, 7, 2, align=16, capacity=3, weighted=True),
        Sample(1, 1, 1), Sample(1, 256, 8, align=128, dtype=torch.bfloat16),
        Sample(33, 7, 2, capacity=0), Sample(33, 7, 2, capacity=0, weighted=True),
        Sample(33, 1, 1, capacity=5, weighted=True, strided=True),
        Sample(1000, 64, 8, align=16, capacity=100, weighted=True, dtype=torch.bfloat16),
        Sample(1000, 7, 2, capacity=250, dtype=torch.float16, index_dtype=torch.int32),
        Sample(33, 7, 2, d=7, dtype=torch.float16, strided=True),  # odd row size: no vector path
    ]
    rng = random.Random(1234)
    grid = [(T, E, k) for T, E, k in itertools.product([1, 33, 1000], [1, 7, 64, 256], [1, 2, 8])
            if k <= E]
    for i, (T, E, k) in enumerate(rng.sample(grid, 14)):
        cap = rng.choice([None, None, max(1, T * k // E // 2)])
        out.append(Sample(T, E, k, align=rng.choice([1, 16, 128]), capacity=cap,
                          weighted=cap is not None and rng.random() < 0.6,
                          dtype=DTYPES[i % 3], strided=i % 2 == 1,
                          index_dtype=torch.int32 if i % 4 == 3 else torch.int64, seed=i))
    return out


SAMPLES = sample_inputs()
IDS = [str(s) for s in SAMPLES]


def make_inputs(s: Sample, device="cpu"):
    """x [T, d] (a strided view when s.strided), indices [T, k] distinct per token and skewed
    towards low experts (so capacity drops), weights [T, k] float32 with ties."""
    g = torch.Generator().manual_seed(s.seed * 7919 + s.T * 31 + s.E)
    base = torch.randn(s.T, 2 * s.d if s.strided else s.d, generator=g).to(s.dtype)
    x = base[:, ::2] if s.strided else base
    skew = torch.linspace(2.0, 0.0, s.E)
    scores = torch.rand(s.T, s.E, generator=g) + skew
    indices = scores.argsort(dim=1, descending=True)[:, : s.k].to(s.index_dtype)
    weights = torch.randint(0, 5, (s.T, s.k), generator=g).float() / 4  # many ties
    return x.to(device), indices.to(device), weights.to(device)


def kwargs_of(s: Sample, weights):
    return dict(align=s.align, capacity=s.capacity, weights=weights if s.weighted else None)


# ---- forward -------------------------------------------------------------------------------------

@pytest.mark.parametrize("s", SAMPLES, ids=IDS)
@pytest.mark.parametrize("fixed_size", [False, True])
def test_permute_matches_reference(s, fixed_size):
    x, indices, weights = make_inputs(s)
    got = l2r_cuda.permute(x, indices, s.E, fixed_size=fixed_size, **kwargs_of(s, weights))
    want = reference.permute(x, indices, s.E, fixed_size=fixed_size, **kwargs_of(s, weights))
    assert isinstance(got, l2r_cuda.Permutation) and len(got) == 3
    permuted, offsets, row_map = got
    assert offsets.dtype == torch.int64 and row_map.dtype == torch.int64
    assert torch.equal(offsets, want[1])
    assert torch.equal(row_map, want[2])
    assert permuted.dtype == x.dtype and permuted.shape == want[0].shape
    assert torch.equal(permuted.view(torch.uint8 if s.dtype != torch.float32 else torch.int32),
                       want[0].view(torch.uint8 if s.dtype != torch.float32 else torch.int32))
    if fixed_size:
        assert permuted.shape[0] == s.T * s.k + s.E * (s.align - 1)
    # Invariants: groups aligned, stable by token inside an expert, capacity respected.
    sizes = offsets.diff()
    assert bool((sizes % s.align == 0).all())
    _, _, _, dropped = reference.permute_plan(indices, s.E, **kwargs_of(s, weights))
    assert torch.equal(l2r_cuda.dropped_counts(row_map, indices, s.E), dropped)
    if s.capacity is not None:
        kept = torch.bincount(indices.long()[row_map >= 0], minlength=s.E)
        assert bool((kept <= s.capacity).all())
    else:
        assert bool((row_map >= 0).all())
    flat = row_map.reshape(-1)
    e_of = indices.reshape(-1).long()
    for e in range(min(s.E, 8)):
        rows = flat[(e_of == e) & (flat >= 0)]
        assert bool((rows.diff() > 0).all())  # token order inside the group
        if rows.numel():
            assert int(rows.min()) >= int(offsets[e]) and int(rows.max()) < int(offsets[e + 1])


@pytest.mark.parametrize("s", SAMPLES, ids=IDS)
def test_unpermute_matches_reference(s):
    x, indices, weights = make_inputs(s)
    permuted, _, row_map = l2r_cuda.permute(x, indices, s.E, **kwargs_of(s, weights))
    y = permuted * 1.5 - 0.25
    got = l2r_cuda.unpermute(y, row_map, weights)
    want = reference.unpermute(y, row_map, weights)
    assert got.dtype == y.dtype and got.shape == (s.T, s.d)
    torch.testing.assert_close(got, want)


def test_capacity_priority_rules():
    # Expert 0 gets tokens 0..5; capacity 3.
    indices = torch.tensor([[0, 1]] * 6)
    x = torch.arange(6.0).unsqueeze(1).repeat(1, 4)
    w = torch.tensor([[0.1, 0.9], [0.5, 0.5], [0.5, 0.5], [float("nan"), 0.0], [0.9, 0.1],
                      [-0.0, 1.0]])
    # No weights: the highest token indices are dropped.
    _, _, rm = l2r_cuda.permute(x, indices, 2, capacity=3)
    assert rm[:, 0].tolist() == [0, 1, 2, -1, -1, -1]
    # Weights: lowest weight first (NaN ranks lowest); ties keep the lower token.
    p, off, rm = l2r_cuda.permute(x, indices, 2, capacity=3, weights=w)
    assert rm[:, 0].tolist() == [-1, 0, 1, -1, 2, -1]
    assert p[:3, 0].tolist() == [1.0, 2.0, 4.0]  # kept rows stay in token order
    assert l2r_cuda.dropped_counts(rm, indices, 2).tolist() == [3, 3]
    # Expert 1 keeps 1.0 (t5), 0.9 (t0) and the first 0.5 (t1).
    assert rm[:, 1].tolist() == [3, 4, -1, -1, -1, 5]
    # -0.0 == +0.0: a tie, so the lower token stays.
    _, _, rm = l2r_cuda.permute(x[:2], torch.tensor([[0], [0]]), 1, capacity=1,
                                weights=torch.tensor([[-0.0], [0.0]]))
    assert rm[:, 0].tolist() == [0, -1]


def test_one_hot_weights_reproduce_x_bitwise():
    s = Sample(1000, 64, 8, align=16, dtype=torch.bfloat16, strided=True, d=48)
    x, indices, _ = make_inputs(s)
    pick = torch.randint(0, s.k, (s.T,), generator=torch.Generator().manual_seed(3))
    onehot = torch.nn.functional.one_hot(pick, s.k).float()
    permuted, _, row_map = l2r_cuda.permute(x, indices, s.E, align=s.align, fixed_size=True)
    out = l2r_cuda.unpermute(permuted, row_map, onehot)
    assert torch.equal(out.view(torch.int16), x.contiguous().view(torch.int16))


def test_dropped_slots_add_exact_zero():
    indices = torch.tensor([[0, 1], [0, 1], [1, 0]])
    x = torch.randn(3, 8)
    permuted, offsets, row_map = l2r_cuda.permute(x, indices, 2, capacity=1, align=4)
    y = permuted.clone()
    y[row_map[row_map >= 0].max() + 1:] = float("nan")  # padding rows
    w = torch.ones(3, 2)
    w[row_map < 0] = float("nan")
    out = l2r_cuda.unpermute(y, row_map, w)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference.unpermute(y, row_map, w))
    assert torch.equal(out[2], torch.zeros(8))  # both slots of token 2 dropped


def test_results_do_not_depend_on_thread_count():
    s = Sample(1000, 64, 8, align=16, capacity=90, weighted=True, d=64)
    x, indices, weights = make_inputs(s)
    threads = torch.get_num_threads()

    def run():
        xx = x.clone().requires_grad_(True)
        ww = weights.clone().requires_grad_(True)
        p, off, rm = l2r_cuda.permute(xx, indices, s.E, **kwargs_of(s, weights))
        out = l2r_cuda.unpermute(p * 2, rm, ww)
        out.backward(torch.ones_like(out))
        return p, off, rm, out, xx.grad, ww.grad

    try:
        torch.set_num_threads(1)
        a = run()
        torch.set_num_threads(max(2, threads))
        b = run()
    finally:
        torch.set_num_threads(threads)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


# ---- pad to capacity, routing map, capacity --------------------------------------------------------

CAPACITY_SAMPLES = [s for s in SAMPLES if s.capacity is not None]


@pytest.mark.parametrize("s", CAPACITY_SAMPLES, ids=[str(s) for s in CAPACITY_SAMPLES])
def test_pad_to_capacity_is_the_capacity_permutation_with_fixed_groups(s):
    x, indices, weights = make_inputs(s)
    kwargs = kwargs_of(s, weights)
    padded, offsets, row_map = l2r_cuda.permute(x, indices, s.E, pad_to_capacity=True, **kwargs)
    group = -(-s.capacity // s.align) * s.align
    assert padded.shape == (s.E * group, s.d) and padded.dtype == x.dtype
    assert offsets.tolist() == [e * group for e in range(s.E + 1)]
    want = reference.permute(x, indices, s.E, pad_to_capacity=True, **kwargs)
    assert torch.equal(offsets, want[1]) and torch.equal(row_map, want[2])
    assert torch.equal(padded.float(), want[0].float())
    # Same kept slots, same order, each expert's rows moved from its compact offset to e * C.
    compact, compact_offsets, compact_map = l2r_cuda.permute(x, indices, s.E, **kwargs)
    assert torch.equal(row_map < 0, compact_map < 0)
    for e in range(s.E):
        kept = int((compact_map[indices.long() == e] >= 0).sum())
        start = int(compact_offsets[e])
        assert torch.equal(padded[e * group:e * group + kept], compact[start:start + kept])
        assert not padded[e * group + kept:(e + 1) * group].any()  # zero padding rows
    # The combine is the same as without padding.
    y = padded.float() * 1.5
    torch.testing.assert_close(l2r_cuda.unpermute(y, row_map, weights),
                               l2r_cuda.unpermute(compact.float() * 1.5, compact_map, weights))


def test_pad_to_capacity_gradients_and_errors():
    s = Sample(33, 7, 2, align=4, capacity=6, weighted=True, dtype=torch.float64, d=5)
    x, indices, weights = make_inputs(s)
    x = x.requires_grad_(True)
    torch.autograd.gradcheck(
        lambda xx: l2r_cuda.permute(xx, indices, s.E, pad_to_capacity=True, **kwargs_of(s, weights))[0], (x,))
    with pytest.raises(ValueError, match="pad_to_capacity=True needs a capacity"):
        l2r_cuda.permute(x, indices, s.E, pad_to_capacity=True)
    with pytest.raises(ValueError, match="pad_to_capacity=True needs a capacity"):
        reference.permute(x, indices, s.E, pad_to_capacity=True)


def _padded_moe_forward(x, w_experts, indices, weights, num_experts, capacity):
    permuted, offsets, row_map = l2r_cuda.permute(x, indices, num_experts, capacity=capacity,
                                                  weights=weights, pad_to_capacity=True)
    h = torch.bmm(permuted.view(num_experts, capacity, -1), w_experts).view(-1, x.shape[1])
    return l2r_cuda.unpermute(h, row_map, weights)


def test_pad_to_capacity_compiles_fullgraph():
    # Static [E, C, d] expert batches: no data-dependent shape anywhere.
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    T, d, E, k, C = 33, 8, 5, 2, 9
    x = torch.randn(T, d, generator=g, requires_grad=True)
    w_experts = torch.randn(E, d, d, generator=g, requires_grad=True)
    indices = torch.rand(T, E, generator=g).argsort(1)[:, :k]
    weights = torch.rand(T, k, generator=g, requires_grad=True)
    eager = _padded_moe_forward(x, w_experts, indices, weights, E, C)
    grads = torch.autograd.grad(eager.square().sum(), (x, w_experts, weights))
    compiled = torch.compile(_padded_moe_forward, fullgraph=True, backend="aot_eager")
    got = compiled(x, w_experts, indices, weights, E, C)
    torch.testing.assert_close(got, eager)
    for a, b in zip(torch.autograd.grad(got.square().sum(), (x, w_experts, weights)), grads):
        torch.testing.assert_close(a, b)


def test_routing_map():
    indices = torch.tensor([[2, 0], [1, 2], [2, 1]])
    dense = l2r_cuda.routing_map(indices, 4)
    assert dense.dtype == torch.bool and dense.shape == (3, 4)
    assert dense.tolist() == [[True, False, True, False], [False, True, True, False],
                              [False, True, True, False]]
    _, _, row_map = l2r_cuda.permute(torch.randn(3, 2), indices, 4, capacity=2)  # t2 loses expert 2
    assert l2r_cuda.routing_map(indices, 4, row_map).tolist() == [
        [True, False, True, False], [False, True, True, False], [False, True, False, False]]
    assert l2r_cuda.routing_map(indices[:0], 4).shape == (0, 4)


def test_expert_capacity_is_megatron_get_capacity():
    import math

    for tokens, experts, k, factor in [(4096, 64, 8, 1.0), (4096, 64, 8, 1.25), (33, 7, 2, 1.0),
                                       (10, 4, 1, 0.1), (0, 8, 2, 2.0), (100, 3, 2, 1.1)]:
        expected = math.ceil((tokens * k / experts) * factor)  # megatron get_capacity(T*k, E, cf)
        assert l2r_cuda.expert_capacity(tokens, experts, k, factor) == expected
    assert l2r_cuda.expert_capacity(4096, 64, 8, 1.0) == 512
    with pytest.raises(ValueError, match="capacity_factor"):
        l2r_cuda.expert_capacity(10, 4, 1, 0.0)


# ---- gradients -----------------------------------------------------------------------------------

@pytest.mark.parametrize("s", SAMPLES[::2], ids=IDS[::2])
def test_gradients_match_reference_autograd(s):
    x, indices, weights = make_inputs(s)
    g = torch.Generator().manual_seed(5)

    def run(mod):
        xx = x.detach().clone().requires_grad_(True)
        ww = weights.detach().clone().requires_grad_(True)
        permuted, _, row_map = mod.permute(xx, indices, s.E, fixed_size=True, **kwargs_of(s, weights))
        y = permuted * scale
        out = mod.unpermute(y, row_map, ww)
        out.backward(grad_out)
        return out, xx.grad, ww.grad

    scale = torch.rand(s.T * s.k + s.E * (s.align - 1), 1, generator=g).to(s.dtype) + 0.5
    grad_out = torch.randn(s.T, s.d, generator=g).to(s.dtype)
    got, want = run(l2r_cuda), run(reference)
    tol = {} if s.dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b, **tol)  # T = 0: None


def test_gradcheck_float64():
    s = Sample(33, 7, 2, align=16, capacity=8, weighted=True, dtype=torch.float64, d=5)
    x, indices, weights = make_inputs(s)
    permuted, _, row_map = l2r_cuda.permute(x, indices, s.E, **kwargs_of(s, weights))
    x = x.requires_grad_(True)
    torch.autograd.gradcheck(
        lambda xx: l2r_cuda.permute(xx, indices, s.E, **kwargs_of(s, weights))[0], (x,))
    y = permuted.clone().requires_grad_(True)
    w = weights.double().requires_grad_(True)
    torch.autograd.gradcheck(lambda yy, ww: l2r_cuda.unpermute(yy, row_map, ww), (y, w))


@pytest.mark.parametrize("s", SAMPLES, ids=IDS)
@pytest.mark.parametrize("mode", ["exact", "fixed_size", "pad_to_capacity"])
def test_every_row_mapped_only_where_the_plan_is_onto(s, mode):
    """permute() tells permute_rows that every row is some slot's (so the CUDA copy skips its
    scratch reset) only where the plan's row_map is onto [0, num_rows)."""
    if mode == "pad_to_capacity" and s.capacity is None:
        pytest.skip("pad_to_capacity needs a capacity")
    x, indices, weights = make_inputs(s)
    p = l2r_cuda.permute(x, indices, s.E, fixed_size=mode == "fixed_size",
                         pad_to_capacity=mode == "pad_to_capacity", **kwargs_of(s, weights))
    rows = p.row_map[p.row_map >= 0]
    onto = rows.numel() == p.permuted.shape[0] and torch.equal(rows.sort().values, torch.arange(rows.numel()))
    claimed = ops_module.plan_maps_every_row(s.align, mode == "fixed_size", mode == "pad_to_capacity")
    assert not claimed or onto
    if mode == "exact" and s.align == 1:
        assert claimed  # the common case does skip the reset


# ---- opcheck, compile ----------------------------------------------------------------------------

@pytest.mark.parametrize("s", [s for s in SAMPLES if s.T in (1, 33)][:6],
                         ids=[str(s) for s in SAMPLES if s.T in (1, 33)][:6])
def test_opcheck(s):
    x, indices, weights = make_inputs(s)
    ops = torch.ops.l2r_cuda
    cap_w = weights if s.weighted else None
    torch.library.opcheck(ops.permute_plan.default, (indices, s.E, s.align, s.capacity, cap_w))
    row_map, offsets, _ = ops.permute_plan(indices, s.E, s.align, s.capacity, cap_w)
    n_rows = s.T * s.k + s.E * (s.align - 1)
    xg = x.detach().clone().requires_grad_(True)
    torch.library.opcheck(ops.permute_rows.default, (xg, row_map, n_rows))
    exact_rows = int(offsets[-1])
    torch.library.opcheck(ops.permute_rows.default, (xg, row_map, exact_rows, s.align == 1))
    permuted = ops.permute_rows(x, row_map, n_rows)
    torch.library.opcheck(ops.permute_rows_backward.default, (permuted, row_map))
    y = permuted.detach().clone().requires_grad_(True)
    w = weights.clone().requires_grad_(True)
    torch.library.opcheck(ops.unpermute.default, (y, row_map, w))
    grad_out = torch.randn(s.T, s.d).to(s.dtype)
    torch.library.opcheck(ops.unpermute_backward.default, (grad_out, permuted, row_map, weights))


def _moe_forward(x, proj, anchors, scale, w_experts, num_experts, top_k, align):
    out = l2r_cuda.route(x, proj, anchors, scale, top_k=top_k)
    permuted, offsets, row_map = l2r_cuda.permute(x, out.indices, num_experts, align=align,
                                                  fixed_size=True)
    rows = torch.arange(permuted.shape[0], device=x.device)
    expert_of_row = torch.searchsorted(offsets[1:], rows, right=True).clamp_max(num_experts - 1)
    h = torch.bmm(permuted.unsqueeze(1), w_experts[expert_of_row]).squeeze(1)
    return l2r_cuda.unpermute(h, row_map, out.weights)


def test_torch_compile_fullgraph_route_permute_unpermute():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    T, d, E, k, r, H = 33, 16, 7, 2, 2, 2
    x = torch.randn(T, d, generator=g, requires_grad=True)
    proj = torch.randn(r, d, generator=g, requires_grad=True)
    anchors = torch.randn(E, H, r, generator=g, requires_grad=True)
    scale = torch.tensor(2.0, requires_grad=True)
    w_experts = (torch.randn(E, d, d, generator=g) / d ** 0.5).requires_grad_(True)
    args = (x, proj, anchors, scale, w_experts)
    eager = _moe_forward(*args, E, k, 16)
    eager.square().sum().backward()
    grads_eager = [a.grad.clone() for a in args]
    for a in args:
        a.grad = None
    compiled = torch.compile(_moe_forward, fullgraph=True, backend="aot_eager")
    got = compiled(*args, E, k, 16)
    got.square().sum().backward()
    torch.testing.assert_close(got, eager)
    for a, ge in zip(args, grads_eager):
        torch.testing.assert_close(a.grad, ge)


# ---- errors --------------------------------------------------------------------------------------

def test_clear_errors():
    x = torch.randn(4, 8)
    idx = torch.tensor([[0, 1]] * 4)
    with pytest.raises(RuntimeError, match=r"indices\[2, 1\] = 9 is out of range \[0, num_experts\) = \[0, 3\)"):
        l2r_cuda.permute(x, torch.tensor([[0, 1], [1, 2], [0, 9], [1, 0]]), 3)
    with pytest.raises(RuntimeError, match=r"-1 is out of range"):
        l2r_cuda.permute(x, torch.tensor([[0, 1], [1, 2], [0, 1], [-1, 0]]), 3)
    with pytest.raises(RuntimeError, match="align must be >= 1, got 0"):
        l2r_cuda.permute(x, idx, 3, align=0)
    with pytest.raises(RuntimeError, match="capacity must be >= 0 or None, got -2"):
        l2r_cuda.permute(x, idx, 3, capacity=-2)
    with pytest.raises(RuntimeError, match=r"indices must be \[T, k\]"):
        l2r_cuda.permute(x, idx[:, 0], 3)
    with pytest.raises(RuntimeError, match=r"row_map is \[T, k\] = \[3, 2\] but x has T = 4"):
        l2r_cuda.permute(x, idx[:3], 3)
    with pytest.raises(RuntimeError, match="x must be float32, float64, bfloat16 or float16, got Long"):
        l2r_cuda.permute(torch.ones(4, 8, dtype=torch.long), idx, 3)
    with pytest.raises(RuntimeError, match="indices must be int64 or int32, got Float"):
        l2r_cuda.permute(x, idx.float(), 3)
    with pytest.raises(RuntimeError, match="num_experts must be >= 1, got 0"):
        l2r_cuda.permute(x, idx, 0)
    with pytest.raises(RuntimeError, match=r"weights must be \[T, k\]"):
        l2r_cuda.permute(x, idx, 3, capacity=1, weights=torch.ones(4, 3))
    with pytest.raises(ValueError, match=r"x must be a \[T, d\] tensor"):
        l2r_cuda.permute(x[0], idx, 3)
    p, _, rm = l2r_cuda.permute(x, idx, 3)
    with pytest.raises(RuntimeError, match=r"weights must be \[T, k\] = \[4, 2\] like row_map"):
        l2r_cuda.unpermute(p, rm, torch.ones(4, 3))
    with pytest.raises(RuntimeError, match=r"out of range for y with 2 rows"):
        l2r_cuda.unpermute(p[:2], rm, torch.ones(4, 2))
    with pytest.raises(RuntimeError, match="row_map must be int64, got Int"):
        l2r_cuda.unpermute(p, rm.int(), torch.ones(4, 2))


@pytest.mark.parametrize("align, experts", [(2 ** 63 - 1, 3), (2 ** 62, 2), (2 ** 61 + 1, 4)])
def test_offset_overflow_raises_instead_of_wrapping(align, experts):
    x = torch.randn(4, 8)
    idx = torch.tensor([[0, 1]] * 4)
    with pytest.raises(RuntimeError, match=rf"align = {align} with num_experts = {experts} and T \* k = 8 overflows"):
        l2r_cuda.permute(x, idx, experts, align=align)
    with pytest.raises(RuntimeError, match="overflows int64 row offsets"):
        torch.ops.l2r_cuda.permute_plan(idx, experts, align, None, None)


# ---- large (64-bit offsets) ----------------------------------------------------------------------

@pytest.mark.slow
def test_large_roundtrip_past_2_31_elements():
    """T*k*d > 2^31 elements (bf16, ~4.6 GB permuted): permute -> unpermute with one-hot weights
    returns x bit for bit, and the last rows land where the reference plan says."""
    T, k, d, E = 40000, 8, 7168, 64
    assert T * k * d > 2 ** 31
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, d, generator=g).to(torch.bfloat16)
    indices = torch.rand(T, E, generator=g).argsort(dim=1)[:, :k]
    permuted, offsets, row_map = l2r_cuda.permute(x, indices, E)
    assert permuted.shape == (T * k, d)
    want_row_map, want_offsets, _, _ = reference.permute_plan(indices, E)
    assert torch.equal(row_map, want_row_map) and torch.equal(offsets, want_offsets)
    for t, j in [(T - 1, k - 1), (T - 1, 0), (0, 0), (T // 2, 3)]:
        assert torch.equal(permuted[row_map[t, j]], x[t])
    pick = torch.randint(0, k, (T,), generator=g)
    onehot = torch.zeros(T, k).scatter_(1, pick.unsqueeze(1), 1.0)
    out = l2r_cuda.unpermute(permuted, row_map, onehot)
    del permuted
    assert torch.equal(out.view(torch.int16), x.view(torch.int16))


# ---- real GPU ------------------------------------------------------------------------------------


@pytest.mark.parametrize("s", SAMPLES, ids=IDS)
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_reference(s):
    x, indices, weights = make_inputs(s, "cuda")
    for fixed in (False, True):
        got = l2r_cuda.permute(x, indices, s.E, fixed_size=fixed, **kwargs_of(s, weights))
        want = reference.permute(x, indices, s.E, fixed_size=fixed, **kwargs_of(s, weights))
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    if s.capacity is not None:  # the padded layout is index arithmetic on the CUDA plan
        got = l2r_cuda.permute(x, indices, s.E, pad_to_capacity=True, **kwargs_of(s, weights))
        want = reference.permute(x, indices, s.E, pad_to_capacity=True, **kwargs_of(s, weights))
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    xx = x.detach().clone().requires_grad_(True)
    ww = weights.clone().requires_grad_(True)
    permuted, _, row_map = l2r_cuda.permute(xx, indices, s.E, fixed_size=True, **kwargs_of(s, weights))
    out = l2r_cuda.unpermute(permuted * 2, row_map, ww)
    out.backward(torch.ones_like(out))
    xr = x.detach().clone().requires_grad_(True)
    wr = weights.clone().requires_grad_(True)
    pr, _, rmr = reference.permute(xr, indices, s.E, fixed_size=True, **kwargs_of(s, weights))
    outr = reference.unpermute(pr * 2, rmr, wr)
    outr.backward(torch.ones_like(outr))
    tol = {} if s.dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out, outr, **tol)
    for got_leaf, ref_leaf in ((xx, xr), (ww, wr)):
        # With no rows (T = 0) the reference's graph never reaches the leaf (grad None); the op's
        # backward gives the empty gradient. Both say "no gradient".
        want = ref_leaf.grad if ref_leaf.grad is not None or ref_leaf.numel() else torch.zeros_like(ref_leaf)
        torch.testing.assert_close(got_leaf.grad, want, **tol)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_opcheck_and_bad_index():
    s = Sample(33, 7, 2, align=16, capacity=8, weighted=True)
    x, indices, weights = make_inputs(s, "cuda")
    torch.library.opcheck(torch.ops.l2r_cuda.permute_plan.default, (indices, s.E, 16, 8, weights))
    row_map, _, _ = torch.ops.l2r_cuda.permute_plan(indices, s.E, 16, 8, weights)
    torch.library.opcheck(torch.ops.l2r_cuda.unpermute.default,
                          (torch.randn(400, s.d, device="cuda", requires_grad=True), row_map,
                           weights.requires_grad_(True)))
