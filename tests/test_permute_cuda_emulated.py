"""The unchanged CUDA permute kernels (csrc/permute/cuda/permute_kernels.cu) on the SIMT CPU emulator
(tests/simt), against l2r_cuda.reference: offsets and rows exact, reductions within tolerance, every
result the same under several thread/block schedules. Small T only (the emulator is slow)."""

from __future__ import annotations

import ctypes
import pathlib
import sys

import pytest
import torch

from l2r_cuda import reference

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "simt"))
import harness as simt  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from test_permute import SAMPLES, Sample, kwargs_of, make_inputs  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}

DRIVER = r'''
#include "permute/cuda/permute_launch.h"
using namespace l2r::permute;
extern "C" long drv_plan_ws(long n, long experts, int weighted) {
  return (long)plan_workspace_bytes(n, experts, weighted != 0);
}
extern "C" int drv_plan(const void* idx, int is64, long T, long k, long E, long align, long cap,
                        const float* w, long* row_map, long* offsets, long* dropped, void* ws,
                        int* flag) {
  return (int)launch_permute_plan(idx, is64 != 0, T, k, E, align, cap, w, (int64_t*)row_map,
                                  (int64_t*)offsets, (int64_t*)dropped, ws, flag, nullptr);
}
extern "C" int drv_rows(const void* x, long stride_bytes, long row_bytes, const long* row_map,
                        long T, long k, long num_rows, long* src, void* out) {
  return (int)launch_permute_rows(x, stride_bytes, row_bytes, (const int64_t*)row_map, T, k,
                                  num_rows, (int64_t*)src, out, nullptr);
}
extern "C" int drv_gather(int dtype, const void* y, long stride, long rows, const long* row_map,
                          const void* w, long T, long k, long d, void* out) {
  return (int)launch_gather_reduce((DType)dtype, y, stride, rows, (const int64_t*)row_map, w, T, k,
                                   d, out, nullptr);
}
extern "C" int drv_unpermute_bwd(int dtype, const void* g, const void* y, long stride, long rows,
                                 const long* row_map, const void* w, long T, long k, long d,
                                 long* src, void* grad_y, void* grad_w) {
  return (int)launch_unpermute_backward((DType)dtype, g, y, stride, rows, (const int64_t*)row_map,
                                        w, T, k, d, (int64_t*)src, grad_y, grad_w, nullptr);
}
'''

L = ctypes.c_long


@pytest.fixture(scope="module")
def lib():
    if not simt.have_compiler():
        pytest.skip("g++ missing")
    return simt.build(sources=[ROOT / "csrc/permute/cuda/permute_kernels.cu"], include_dirs=[ROOT / "csrc"],
                      driver_source=DRIVER, name="permute")


def plan(lib, indices, E, align=1, capacity=None, weights=None, seed=0):
    T, k = indices.shape
    n = T * k
    weighted = capacity is not None and weights is not None
    ws = torch.empty(max(1, lib.drv_plan_ws(L(n), L(E), ctypes.c_int(int(weighted)))),
                     dtype=torch.uint8)
    row_map = torch.full((T, k), -7, dtype=torch.int64)
    offsets = torch.full((E + 1,), -7, dtype=torch.int64)
    dropped = torch.full((E,), -7, dtype=torch.int64)
    flag = torch.zeros(1, dtype=torch.int32)
    w = weights.float().contiguous() if weighted else None
    idx = indices.contiguous()
    rc = simt.call(lib, "drv_plan", simt.ptr(idx), ctypes.c_int(int(idx.dtype == torch.int64)),
                   L(T), L(k), L(E), L(align), L(-1 if capacity is None else capacity),
                   simt.ptr(w) if w is not None else None, simt.ptr(row_map), simt.ptr(offsets),
                   simt.ptr(dropped), simt.ptr(ws),
                   # every thread that meets a bad index stores 1 to the flag with a plain write:
                   # the same value, benign in practice, but a race by the memory model (an atomic
                   # store would be exact), so racecheck is off for this one word
                   simt.ptr(flag, "error_flag", racecheck=False), seed=seed)
    assert rc == 0
    return row_map, offsets, dropped, int(flag)


def permute_rows(lib, x, row_map, num_rows, seed=0):
    d = x.shape[1]
    if x.stride(1) != 1 and x.shape[0] > 0:  # the launcher takes a row stride: pad the rows instead
        buf = torch.zeros(x.shape[0], d + 8, dtype=x.dtype)
        buf[:, :d] = x
        x = buf[:, :d]
    out = torch.full((num_rows, d), float("nan")).to(x.dtype)
    src = torch.empty(max(1, num_rows), dtype=torch.int64)
    es = x.element_size()
    rc = simt.call(lib, "drv_rows", simt.ptr(x), L(x.stride(0) * es), L(d * es),
                   simt.ptr(row_map), L(row_map.shape[0]), L(row_map.shape[1]), L(num_rows),
                   simt.ptr(src), simt.ptr(out), seed=seed)
    assert rc == 0
    return out


def gather(lib, y, row_map, w, seed=0):
    T, k = row_map.shape
    out = torch.full((T, y.shape[1]), float("nan")).to(y.dtype)
    wa = None if w is None else w.to(torch.float64 if y.dtype == torch.float64 else torch.float32).contiguous()
    rc = simt.call(lib, "drv_gather", ctypes.c_int(DTYPE_CODE[y.dtype]), simt.ptr(y),
                   L(y.stride(0)), L(y.shape[0]), simt.ptr(row_map),
                   simt.ptr(wa) if wa is not None else None, L(T), L(k), L(y.shape[1]),
                   simt.ptr(out), seed=seed)
    assert rc == 0
    return out


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
    y = (want.float() * 1.5 - 0.25).to(s.dtype)
    torch.testing.assert_close(gather(lib, y, row_map, weights, seed=seed),
                               reference.unpermute(y, row_map, weights))
    # permute's backward = unweighted gather-sum
    torch.testing.assert_close(gather(lib, y, row_map, None, seed=seed),
                               reference.unpermute(y, row_map, torch.ones_like(weights)))


@pytest.mark.parametrize("s", EMU_SAMPLES[::2], ids=EMU_IDS[::2])
def test_emulated_unpermute_backward(lib, s):
    x, indices, weights = make_inputs(s)
    kw = kwargs_of(s, weights)
    y0, _, row_map = reference.permute(x, indices, s.E, fixed_size=True, **kw)
    y = y0.detach().clone().requires_grad_(True)
    w = weights.clone().requires_grad_(True)
    g = torch.randn(s.T, s.d, generator=torch.Generator().manual_seed(2)).to(s.dtype)
    reference.unpermute(y, row_map, w).backward(g)
    N, d = y.shape
    grad_y = torch.full((N, d), float("nan")).to(s.dtype)
    grad_w = torch.full((s.T, s.k), float("nan"))
    src = torch.empty(max(1, N), dtype=torch.int64)
    rc = simt.call(lib, "drv_unpermute_bwd", ctypes.c_int(DTYPE_CODE[s.dtype]), simt.ptr(g),
                   simt.ptr(y0), L(d), L(N), simt.ptr(row_map), simt.ptr(weights.contiguous()),
                   L(s.T), L(s.k), L(d), simt.ptr(src), simt.ptr(grad_y), simt.ptr(grad_w), seed=1)
    assert rc == 0
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
