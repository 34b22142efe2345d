"""Python side of permute_driver.cpp: builds the CUDA permute kernels
(csrc/permute/cuda/permute_kernels.cu) for the SIMT emulator and runs their launchers on CPU tensors.
Shared by tests/test_permute_cuda_emulated.py and the GPU cost model (benchmarks/gpu_model.py).

Every buffer the CUDA glue (csrc/permute/cuda/permute_cuda.cpp) allocates with at::empty, outputs
and scratch, is registered as uninitialized (the emulator's initcheck: the kernels must write before
they read it), and still holds garbage here (NaN, -7, valid-looking slot numbers), so that a read
initcheck missed would show in the results too."""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from .. import harness as simt

ROOT = Path(__file__).resolve().parents[3]
DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
L = ctypes.c_long


def build(sanitize: bool | None = None, root: Path = ROOT) -> ctypes.CDLL:
    lib = simt.build(sources=[root / "csrc/permute/cuda/permute_kernels.cu"], include_dirs=[root / "csrc"],
                     driver_source=root / "tests/simt/drivers/permute_driver.cpp", name="permute",
                     sanitize=sanitize)
    lib.drv_plan_ws.restype = L
    lib.drv_plan_control_words.restype = L
    return lib


def plan(lib, indices, E, align=1, capacity=None, weights=None, seed=0):
    """launch_permute_plan -> (row_map [T, k], offsets [E + 1], dropped [E], error flag). Checks
    that the plan leaves its tickets at zero (they wrap back), as the next call needs them."""
    T, k = indices.shape
    n = T * k
    weighted = capacity is not None and weights is not None
    ws = torch.empty(max(1, lib.drv_plan_ws(L(n), L(E), ctypes.c_int(int(weighted)))), dtype=torch.uint8)
    row_map = torch.full((T, k), -7, dtype=torch.int64)
    offsets = torch.full((E + 1,), -7, dtype=torch.int64)
    dropped = torch.full((E,), -7, dtype=torch.int64)
    control = torch.zeros(lib.drv_plan_control_words(L(n)), dtype=torch.int32)  # error flag, tickets
    w = weights.float().contiguous() if weighted else None
    idx = indices.contiguous()
    rc = simt.call(lib, "drv_plan", simt.ptr(idx, "indices"), ctypes.c_int(int(idx.dtype == torch.int64)),
                   L(T), L(k), L(E), L(align), L(-1 if capacity is None else capacity),
                   simt.ptr(w, "weights") if w is not None else None,
                   simt.ptr(row_map, "row_map", uninitialized=True), simt.ptr(offsets, "offsets", uninitialized=True),
                   simt.ptr(dropped, "dropped", uninitialized=True), simt.ptr(ws, "workspace", uninitialized=True),
                   simt.ptr(control, "control"), seed=seed)
    assert rc == 0
    assert int(control[1:].abs().sum()) == 0, f"tickets not back at zero: {control[1:].tolist()}"
    return row_map, offsets, dropped, int(control[0])


def permute_rows(lib, x, row_map, num_rows, seed=0, pad=8, every_row_mapped=False):
    """launch_permute_rows: out [num_rows, d] in x's dtype (rows NaN-filled first). A
    non-contiguous x is passed as rows of a padded buffer (`pad` extra elements per row).
    every_row_mapped: the caller's promise that lets the plan skip its scratch reset."""
    d = x.shape[1]
    if x.stride(1) != 1 and x.shape[0] > 0:  # the launcher takes a row stride: pad the rows instead
        buf = torch.zeros(x.shape[0], d + pad, dtype=x.dtype)
        buf[:, :d] = x
        x = buf[:, :d]
    out = torch.full((num_rows, d), float("nan")).to(x.dtype)
    # The launcher gets the scratch as at::empty leaves it: hand it the worst garbage, slot numbers
    # that look valid, so a plan that lost its reset and a copy that trusted them would show.
    n = row_map.numel()
    src = (torch.arange(max(1, num_rows), dtype=torch.int64) * 7919 + 13) % max(1, n)
    es = x.element_size()
    rc = simt.call(lib, "drv_rows", simt.ptr(x, "x"), L(x.stride(0) * es), L(d * es),
                   simt.ptr(row_map, "row_map"), L(row_map.shape[0]), L(row_map.shape[1]), L(num_rows),
                   simt.ptr(src, "src_scratch", uninitialized=True), simt.ptr(out, "out", uninitialized=True),
                   ctypes.c_int(int(every_row_mapped)), seed=seed)
    assert rc == 0
    return out


def gather(lib, y, row_map, w, seed=0):
    """launch_gather_reduce: out [T, d] = sum_j w[t, j] y[row_map[t, j]] (w None: 1). y may be a
    row-strided view."""
    T, k = row_map.shape
    out = torch.full((T, y.shape[1]), float("nan")).to(y.dtype)
    wa = None if w is None else w.to(torch.float64 if y.dtype == torch.float64 else torch.float32).contiguous()
    rc = simt.call(lib, "drv_gather", ctypes.c_int(DTYPE_CODE[y.dtype]), simt.ptr(y, "y"),
                   L(y.stride(0)), L(y.shape[0]), simt.ptr(row_map, "row_map"),
                   simt.ptr(wa, "w") if wa is not None else None, L(T), L(k), L(y.shape[1]),
                   simt.ptr(out, "out", uninitialized=True), seed=seed)
    assert rc == 0
    return out


def unpermute_backward(lib, g, y, row_map, w, seed=1):
    """launch_unpermute_backward -> (grad_y [N, d], grad_w [T, k] in the accumulation type)."""
    T, k = row_map.shape
    N, d = y.shape
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    grad_y = torch.full((N, d), float("nan")).to(y.dtype)
    grad_w = torch.full((T, k), float("nan"), dtype=acc)
    src = (torch.arange(max(1, N), dtype=torch.int64) * 7919 + 13) % max(1, T * k)  # valid-looking garbage
    rc = simt.call(lib, "drv_unpermute_bwd", ctypes.c_int(DTYPE_CODE[y.dtype]), simt.ptr(g, "grad_out"),
                   simt.ptr(y, "y"), L(y.stride(0)), L(N), simt.ptr(row_map, "row_map"),
                   simt.ptr(w.to(acc).contiguous(), "w"), L(T), L(k), L(d),
                   simt.ptr(src, "src_scratch", uninitialized=True), simt.ptr(grad_y, "grad_y", uninitialized=True),
                   simt.ptr(grad_w, "grad_w", uninitialized=True), seed=seed)
    assert rc == 0
    return grad_y, grad_w
