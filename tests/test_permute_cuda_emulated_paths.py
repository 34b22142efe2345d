"""The CUDA permute kernels on the SIMT emulator (memory checker on), on the paths the basic
emulated tests (test_permute_cuda_emulated.py) leave out: every row-copy width (16-, 8-, 4- and
2-byte vectors), gathers from row-strided y (vector and scalar loads), float64, slots whose row
lies past y, the backward in every dtype and on both load widths with a full warp of columns, and
NaN and tied router weights under a capacity, chunk ranks above 1024 experts. Against l2r_cuda.reference."""
from __future__ import annotations

import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.oracle import reference  # noqa: E402  (plain PyTorch: no built extension needed)
from tests.simt import harness as simt  # noqa: E402
from tests.simt.drivers import permute as emu  # noqa: E402


@pytest.fixture(scope="module")
def lib():
    if not simt.have_compiler():
        pytest.skip("g++ missing")
    return emu.build()


def routing(T, E, k, seed=0):
    g = torch.Generator().manual_seed(100 + seed)
    indices = torch.rand(T, E, generator=g).argsort(dim=1)[:, :k]
    weights = torch.rand(T, k, generator=g) + 0.25
    return indices, weights


def padded_rows(y: torch.Tensor, pad: int) -> torch.Tensor:
    """y's values as a view whose rows are d + pad elements apart (storage 16-byte aligned)."""
    buf = torch.full((y.shape[0], y.shape[1] + pad), float("nan")).to(y.dtype)
    buf[:, : y.shape[1]] = y
    return buf[:, : y.shape[1]]


def assert_plan_is_the_reference(lib, indices, E, **kw):
    """The emulated plan (row map, offsets, dropped counts) equals the reference's, flag clear."""
    want_rm, want_off, _, want_dropped = reference.permute_plan(indices, E, **kw)
    row_map, offsets, dropped, flag = emu.plan(lib, indices, E, **kw)
    assert flag == 0
    assert torch.equal(row_map, want_rm)
    assert torch.equal(offsets, want_off)
    assert torch.equal(dropped, want_dropped)


# dtype, d -> row bytes 16 / 8 / 4 / 2 multiples, hence uint4 / uint2 / u32 / u16 copies
@pytest.mark.parametrize("dtype,d", [(torch.bfloat16, 8), (torch.bfloat16, 4), (torch.bfloat16, 2),
                                     (torch.bfloat16, 3), (torch.float32, 2), (torch.float64, 3)])
def test_every_row_copy_width(lib, dtype, d):
    T, E, k = 40, 6, 2
    indices, _ = routing(T, E, k)
    x = torch.randn(T, d).to(dtype)
    for align in (1, 4):  # padding rows zeroed too
        want, _, want_rm = reference.permute(x, indices, E, align=align)
        row_map, offsets, _, flag = emu.plan(lib, indices, E, align=align)
        assert flag == 0 and torch.equal(row_map, want_rm)
        got = emu.permute_rows(lib, x, row_map, want.shape[0])
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pad", [0, 1, 16])  # pad 16: vector loads on strided rows; pad 1: scalar
def test_gather_from_strided_y(lib, dtype, pad):
    T, E, k, d = 24, 5, 3, 32
    indices, weights = routing(T, E, k, seed=1)
    y0, _, row_map = reference.permute(torch.randn(T, d).to(dtype), indices, E, align=2)
    y = (y0.to(torch.float64) * 1.5 - 0.25).to(dtype)
    yv = padded_rows(y, pad) if pad else y
    want = reference.unpermute(y, row_map, weights)
    tol = {} if dtype in (torch.float32, torch.float64) else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(emu.gather(lib, yv, row_map, weights), want, **tol)
    torch.testing.assert_close(emu.gather(lib, yv, row_map, None),
                               reference.unpermute(y, row_map, torch.ones_like(weights)), **tol)


def test_gather_skips_rows_past_y(lib):
    # launch_gather_reduce skips slots whose row lies outside [0, y_rows): y holds only the first
    # rows of the plan.
    T, E, k, d = 30, 4, 2, 16
    indices, weights = routing(T, E, k, seed=2)
    y_full, _, row_map = reference.permute(torch.randn(T, d), indices, E)
    y = y_full[:40].clone()
    kept = torch.where(row_map < 40, row_map, torch.full_like(row_map, -1))
    torch.testing.assert_close(emu.gather(lib, y, row_map, weights), reference.unpermute(y, kept, weights))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [40, 35])  # 40: 16-byte rows for every dtype; 35: scalar rows for every dtype
def test_unpermute_backward_every_dtype(lib, dtype, d):
    T, E, k = 20, 6, 3
    indices, weights = routing(T, E, k, seed=3)
    y0, _, row_map = reference.permute(torch.randn(T, d).to(dtype), indices, E, align=4, fixed_size=True)
    y = y0.detach().clone().requires_grad_(True)
    w = weights.to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_(True)
    g = torch.randn(T, d, generator=torch.Generator().manual_seed(4)).to(dtype)
    reference.unpermute(y, row_map, w).backward(g)
    grad_y, grad_w = emu.unpermute_backward(lib, g, y0, row_map, w.detach())
    tol = {} if dtype in (torch.float32, torch.float64) else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(grad_y, y.grad, **tol)
    torch.testing.assert_close(grad_w, w.grad, **tol)


def test_nan_router_weights_rank_last_under_capacity(lib):
    T, E, k, cap = 60, 4, 2, 9
    indices, weights = routing(T, E, k, seed=5)
    weights[::3, 0] = float("nan")
    weights[1::7, 1] = float("nan")
    kw = dict(align=1, capacity=cap, weights=weights)
    assert_plan_is_the_reference(lib, indices, E, **kw)


@pytest.mark.parametrize("values,cap", [((0.5,), 100), ((0.25, 0.5, 1.0), 170), ((0.5, -0.0, 0.0), 233)])
def test_tied_router_weights_under_capacity(lib, values, cap):
    # Many equal weights: the capacity-th largest key is told from its neighbours by the token
    # bits only, so the radix select runs down to its last digit (more rows per expert than the
    # select block has threads; -0 and +0 tie).
    T, E, k = 700, 2, 1
    indices, _ = routing(T, E, k, seed=7)
    g = torch.Generator().manual_seed(3)
    weights = torch.tensor(values)[torch.randint(len(values), (T, k), generator=g)]
    kw = dict(align=1, capacity=cap, weights=weights)
    assert_plan_is_the_reference(lib, indices, E, **kw)


def test_many_experts_rank_by_scanning_the_chunk(lib):
    # E above kTableExperts (1024): chunk ranks come from the scan over the chunk's rows, not the
    # per-warp table. Few distinct experts, so every chunk (the last row of each included) has rows
    # of one expert far apart.
    T, E, k = 300, 1500, 2
    g = torch.Generator().manual_seed(11)
    pool = torch.tensor(list(range(12)) + list(range(E - 12, E)))
    indices = torch.stack([pool[torch.randperm(len(pool), generator=g)[:k]] for _ in range(T)])
    for kw in (dict(align=8), dict(align=1, capacity=20)):
        assert_plan_is_the_reference(lib, indices, E, **kw)
