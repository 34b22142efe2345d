"""The rank-32 projection on tensor cores (csrc/route/cuda/route_project_mma.cuh) in the SIMT emulator:
bf16 x against a float32 projection split into bf16 parts, checked against the float64 product. Three
parts keep float32 accuracy (the bound below is what a float32 FMA loop over d meets); fewer do not,
which is why the forward must use three. scripts/gpu_check.sh runs the same kernel on a GPU
(tests/gpu/project_mma_main.cu)."""
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
    from .test_mma import bf16_bits, bf16_values
except ImportError:
    sys.path.insert(0, str(HERE))
    import harness as simt  # type: ignore
    from test_mma import bf16_bits, bf16_values  # type: ignore

pytestmark = pytest.mark.skipif(not simt.have_compiler(), reason="g++ not available")
P = simt.ptr
I = ctypes.c_int
L = ctypes.c_int64


@pytest.fixture(scope="module")
def lib():
    lib = simt.build(sources=[HERE / "kernels" / "project_mma.cu"], include_dirs=[CSRC], name="project_mma")
    simt.clear_error(lib)
    simt.set_order(lib, "random")
    yield lib
    simt.clear_error(lib)


def project(lib, tokens, d, rank, mt, parts, warps, seed):
    rng = np.random.default_rng(seed)
    xb = bf16_bits(rng.standard_normal((tokens, d)).astype(np.float32))
    w = (rng.standard_normal((rank, d)) / np.sqrt(d)).astype(np.float32)
    q = np.full((tokens, rank), np.nan, np.float32)
    ss = np.full(tokens, np.nan, np.float32)
    rc = simt.call(lib, "project_mma_launch", P(xb), P(w), L(tokens), L(d), I(rank), P(q), P(ss), I(mt), I(parts),
                   I(warps), seed=seed)
    assert rc == 0
    x = bf16_values(xb)
    ref = x @ w.astype(np.float64).T
    mag = np.abs(x) @ np.abs(w.astype(np.float64)).T  # sum of |products|: the error scale of any summation
    return q, ss, ref, mag, (x * x).sum(1)


# float32 accumulation over d products: a few units of 2^-24 of the magnitude
BOUND = 2.0 ** -24 * 8


@pytest.mark.parametrize("tokens,d,rank,mt,warps", [
    (16, 64, 32, 1, 1),      # one m-tile, two k-blocks
    (37, 200, 32, 1, 2),     # partial m-tile and k-block (d % 32 = 8), two warps
    (70, 96, 20, 2, 2),      # rank below 32, two m-tiles per warp, tokens past the last warp's tiles
    (48, 4096, 32, 2, 1),    # Mixtral's d
])
def test_three_bf16_parts_keep_float32_accuracy(lib, tokens, d, rank, mt, warps):
    q, ss, ref, mag, ref_ss = project(lib, tokens, d, rank, mt, 3, warps, seed=tokens + d)
    err = np.abs(q - ref) / mag
    assert err.max() <= BOUND, err.max()
    # each lane adds 8 squares per k-block in sequence (then 4 lanes): Higham's gamma_n bound for n
    # positive terms added in float32
    np.testing.assert_allclose(ss, ref_ss, rtol=2.0 ** -24 * (8 * -(-d // 32) + 2))


@pytest.mark.parametrize("parts", [1, 2])
def test_fewer_parts_lose_float32_accuracy(lib, parts):
    q, _, ref, mag, _ = project(lib, 32, 512, 32, 1, parts, 1, seed=parts)
    assert (np.abs(q - ref) / mag).max() > BOUND


def test_counts_one_mma_per_kblock_step_ntile_and_part(lib):
    simt.set_checks(lib, counters=True)
    try:
        simt.counters(lib)
        project(lib, 32, 128, 32, 2, 3, 1, seed=5)
        recs = simt.counters(lib)
    finally:
        simt.set_checks(lib, counters=False)
    # 4 k-blocks x 2 k-steps x 4 n-tiles x 3 parts x 2 m-tiles, one warp
    assert [r["mma"] for r in recs] == [4 * 2 * 4 * 3 * 2]
