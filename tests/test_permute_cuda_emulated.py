"""The unchanged CUDA permute kernels (csrc/permute/cuda/permute_kernels.cu) on the SIMT CPU emulator
(tests/simt), against l2r_cuda.reference: offsets and rows exact, reductions within tolerance, every
result the same under several thread/block schedules. Small T only (the emulator is slow)."""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch

from l2r_cuda import reference
from l2r_cuda.ops import plan_maps_every_row

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from tests.simt import harness as simt  # noqa: E402
from tests.simt.drivers import permute as emu  # noqa: E402
from tests.simt.drivers.permute import gather, permute_rows, plan  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from test_permute import SAMPLES, Sample, kwargs_of, make_inputs  # noqa: E402


@pytest.fixture(scope="module")
def lib():
    if not simt.have_compiler():
        pytest.skip("g++ missing")
    return emu.build()


EMU_SAMPLES = [s for s in SAMPLES if s.T <= 33] + [
    Sample(300, 7, 2, align=16, capacity=50, weighted=True, dtype=torch.bfloat16, d=16),
    Sample(300, 64, 8, align=128, capacity=20, dtype=torch.float16, strided=True, d=8,
           index_dtype=torch.int32),
    Sample(40, 3000, 2, align=16, d=8),  # E > scan block: several experts per scan thread
    Sample(1100, 64, 8, capacity=150, weighted=True, d=8),  # > 32 chunks: several scan steps
]
EMU_IDS = [str(s) for s in EMU_SAMPLES]


@pytest.mark.parametrize("s", EMU_SAMPLES, ids=EMU_IDS)
@pytest.mark.parametrize("seed", simt.DEFAULT_SEEDS[:2])
def test_emulated_permute_matches_reference(lib, s, seed):
    x, indices, weights = make_inputs(s)
    kw = kwargs_of(s, weights)
    row_map, offsets, dropped, flag = plan(lib, indices, s.E, seed=seed, **kw)
    want_rm, want_off, num_rows, want_dropped = reference.permute_plan(indices, s.E, **kw)
    assert flag == 0
    assert torch.equal(row_map, want_rm)
    assert torch.equal(offsets, want_off)
    assert torch.equal(dropped, want_dropped)
    for fixed in (False, True):
        want = reference.permute(x, indices, s.E, fixed_size=fixed, **kw)[0]
        got = permute_rows(lib, x, row_map, want.shape[0], seed=seed)
        assert torch.equal(got, want)
        if plan_maps_every_row(s.align, fixed, False):  # as permute() calls it: no scratch reset
            got = permute_rows(lib, x, row_map, want.shape[0], seed=seed, every_row_mapped=True)
            assert torch.equal(got, want)
    y = (want.float() * 1.5 - 0.25).to(s.dtype)
    torch.testing.assert_close(gather(lib, y, row_map, weights, seed=seed),
                               reference.unpermute(y, row_map, weights))
    # permute's backward = unweighted gather-sum
    torch.testing.assert_close(gather(lib, y, row_map, None, seed=seed),
                               reference.unpermute(y, row_map, torch.ones_like(weights)))


def padded_permute(lib):
    """x, the emulated plan's row_map and row count, and the reference rows, for align-8 groups:
    rows no slot maps to (padding) exist."""
    s = Sample(20, 5, 2, align=8, d=8)
    x, indices, _ = make_inputs(s)
    row_map, offsets, _, _ = plan(lib, indices, s.E, align=s.align)
    num_rows = int(offsets[-1])
    assert num_rows > s.T * s.k  # padding rows exist
    return x, row_map, num_rows, reference.permute(x, indices, s.E, align=s.align)[0]


def test_emulated_rows_without_reset_read_unwritten_scratch_where_rows_are_padding(lib):
    """every_row_mapped is a promise: where rows are align padding, skipping the reset makes the
    copy read scratch nothing wrote (what initcheck reported on the H200), while the same call
    without the promise is clean. So the reset is what keeps padded permutes clean."""
    x, row_map, num_rows, want = padded_permute(lib)
    assert torch.equal(permute_rows(lib, x, row_map, num_rows), want)
    with pytest.raises(simt.SimtError, match="initcheck"):
        permute_rows(lib, x, row_map, num_rows, every_row_mapped=True)


def test_emulated_rows_right_even_on_a_false_promise(lib):
    """Results never depend on every_row_mapped: with the promise false (padding rows) and the
    unwritten reads let through (initcheck off), the copy's check against row_map still zeroes the
    padding rows, though the driver's scratch holds valid-looking slot numbers there."""
    x, row_map, num_rows, want = padded_permute(lib)
    simt.set_checks(lib, initcheck=False)
    try:
        got = permute_rows(lib, x, row_map, num_rows, every_row_mapped=True)
    finally:
        simt.set_checks(lib, initcheck=True)
    assert torch.equal(got, want)


@pytest.mark.parametrize("s", EMU_SAMPLES[::2], ids=EMU_IDS[::2])
def test_emulated_unpermute_backward(lib, s):
    x, indices, weights = make_inputs(s)
    kw = kwargs_of(s, weights)
    y0, _, row_map = reference.permute(x, indices, s.E, fixed_size=True, **kw)
    y = y0.detach().clone().requires_grad_(True)
    w = weights.clone().requires_grad_(True)
    g = torch.randn(s.T, s.d, generator=torch.Generator().manual_seed(2)).to(s.dtype)
    reference.unpermute(y, row_map, w).backward(g)
    grad_y, grad_w = emu.unpermute_backward(lib, g, y0, row_map, weights)
    tol = {} if s.dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    zero_if_none = lambda g, like: torch.zeros_like(like) if g is None else g  # noqa: E731 (T = 0)
    torch.testing.assert_close(grad_y, zero_if_none(y.grad, grad_y), **tol)
    torch.testing.assert_close(grad_w, zero_if_none(w.grad, grad_w), **tol)


def test_emulated_bad_index_sets_flag_and_drops(lib):
    indices = torch.tensor([[0, 1], [5, 0], [1, -1]])
    row_map, offsets, _, flag = plan(lib, indices, 3)
    assert flag == 1
    assert row_map[1, 0] == -1 and row_map[2, 1] == -1
    assert int(offsets[-1]) == 4
