"""The emulator's tensor-core instruction (mma.sync m16n8k16 bf16 -> f32, tests/simt/include/simt/simt.h)
through csrc/common/mma_sync.cuh, on the fragment-check kernel that scripts/gpu_check.sh also runs on a
GPU (tests/gpu/mma_fragments_main.cu): the same kernel and the same expected D on both."""
from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
CSRC = HERE.parent.parent / "csrc"
try:
    from . import harness as simt
except ImportError:
    sys.path.insert(0, str(HERE))
    import harness as simt  # type: ignore

pytestmark = pytest.mark.skipif(not simt.have_compiler(), reason="g++ not available")
P = simt.ptr
I = ctypes.c_int


@pytest.fixture(scope="module")
def lib():
    lib = simt.build(sources=[HERE / "kernels" / "mma_fragments.cu"], include_dirs=[CSRC], name="mma_fragments")
    simt.clear_error(lib)
    simt.set_order(lib, "random")
    yield lib
    simt.clear_error(lib)


def bf16_bits(v: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns, round to nearest even."""
    u = np.ascontiguousarray(v, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_values(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def run(lib, integers: bool, steps: int, warps: int, seed: int, defect: int = 0):
    rng = np.random.default_rng(seed)
    K = 16 * steps
    draw = (lambda *s: rng.integers(-8, 9, size=s).astype(np.float32)) if integers else \
        (lambda *s: rng.standard_normal(s).astype(np.float32))
    A, Bt, C = bf16_bits(draw(16, K)), bf16_bits(draw(8, K)), draw(16, 8)
    D = np.full((warps, 16, 8), np.nan, np.float32)
    simt.call(lib, "mma_fragments_launch", P(A), P(Bt), P(C), P(D), I(steps), I(32 * warps), I(defect), seed=seed)
    products = bf16_values(A)[:, None, :] * bf16_values(Bt)[None, :, :]  # [16, 8, K]
    ref = C.astype(np.float64) + products.sum(-1)
    mag = np.abs(C).astype(np.float64) + np.abs(products).sum(-1)
    return D, ref, mag


@pytest.mark.parametrize("steps,warps", [(1, 1), (4, 2), (3, 3)])
def test_integer_operands_give_d_exactly(lib, steps, warps):
    # integer values: every partial sum is exact in float, so any summation order gives the same D
    D, ref, _ = run(lib, True, steps, warps, seed=steps * 10 + warps)
    for w in range(warps):
        np.testing.assert_array_equal(D[w], ref.astype(np.float32))


@pytest.mark.parametrize("steps,warps", [(1, 1), (8, 4)])
def test_random_operands_match_double_precision(lib, steps, warps):
    D, ref, mag = run(lib, False, steps, warps, seed=100 + steps)
    for w in range(warps):
        assert np.all(np.abs(D[w] - ref) <= 1e-5 * mag)
        np.testing.assert_array_equal(D[w], D[0])


@pytest.mark.parametrize("defect", [1, 2])
def test_a_fragment_loaded_the_wrong_way_gives_a_wrong_d(lib, defect):
    D, ref, _ = run(lib, True, 2, 1, seed=7, defect=defect)
    assert not np.array_equal(D[0], ref.astype(np.float32))


def test_counters_record_one_mma_per_warp_and_step(lib):
    simt.set_checks(lib, counters=True)
    try:
        simt.counters(lib)
        run(lib, True, 3, 2, seed=3)
        recs = simt.counters(lib)
    finally:
        simt.set_checks(lib, counters=False)
    assert [r["mma"] for r in recs] == [3 * 2]
    assert recs[0]["collectives"] == 0  # the tensor pipe, not the shuffle (MIO) one


@pytest.mark.parametrize("strict", [True, False])
def test_a_partial_warp_cannot_issue_mma(lib, strict):
    # strict: the full mask names lanes that do not exist; otherwise the mask shrinks to the warp's
    # 16 threads, and mma.sync itself refuses to run on fewer than 32
    A, Bt = np.zeros((16, 16), np.uint16), np.zeros((8, 16), np.uint16)
    C, D = np.zeros((16, 8), np.float32), np.zeros((1, 16, 8), np.float32)
    simt.set_strict(lib, strict)
    try:
        with pytest.raises(simt.SimtError, match="names lanes that do not exist" if strict else "needs all 32"):
            simt.call(lib, "mma_fragments_launch", P(A), P(Bt), P(C), P(D), I(1), I(16), I(0))
    finally:
        simt.set_strict(lib, True)
