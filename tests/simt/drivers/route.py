"""Python side of route_driver.cpp: builds the CUDA route kernels (csrc/route/route_cuda.cu) for
the SIMT emulator and runs their launchers on CPU tensors. Shared by the emulated route tests that
need it and by the GPU cost model (benchmarks/gpu_model.py)."""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from .. import harness as simt

ROOT = Path(__file__).resolve().parents[3]
XTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

P = ctypes.c_void_p
L = ctypes.c_long
I = ctypes.c_int
F = ctypes.c_float


def build(sanitize: bool | None = None, root: Path = ROOT) -> ctypes.CDLL:
    lib = simt.build(sources=[root / "csrc/route/route_cuda.cu"], include_dirs=[root / "csrc"],
                     driver_source=root / "tests/simt/drivers/route_driver.cpp", name="route_cuda",
                     sanitize=sanitize)
    lib.drv_forward_workspace.argtypes = [L, L, I, I, I, I]
    lib.drv_forward_workspace.restype = L
    lib.drv_backward_workspace.argtypes = [L, L, I, I, I, I]
    lib.drv_backward_workspace.restype = L
    lib.drv_forward.argtypes = [P, I, P, P, P, P, P, L, L, I, I, I, I, F, F, F, F, I, I, I,
                                P, P, P, P, P, P, P, P]
    lib.drv_forward.restype = I
    lib.drv_backward.argtypes = [P, P, P, P, I, P, P, P, P, P, P, P, L, L, I, I, I, I, F, F, F,
                                 I, I, I, P, P, P, P, P, P]
    lib.drv_backward.restype = I
    return lib


def _ptr(t, name):
    return None if t is None else simt.ptr(t, name)


def forward(lib, cfg: dict, x, proj, anchors, scale, norm_weight=None, expert_bias=None, seed: int = 0,
            x_view=None) -> dict:
    """launch_route_forward on the emulator; cfg: T, d, r, E, H, k and the options (beta, tau,
    norm, score, normalize). Outputs are pre-filled with NaN / -7 so that unwritten entries show.
    x_view: a strided view to pass instead of x (same values)."""
    T, d, r, E, H, k = cfg["T"], cfg["d"], cfg["r"], cfg["E"], cfg["H"], cfg["k"]
    out = dict(
        weights=torch.full((T, k), float("nan")),
        indices=torch.full((T, k), -7, dtype=torch.int64),
        tokens_per_expert=torch.full((E,), -7, dtype=torch.int64),
        mean_probs=torch.full((E,), float("nan")),
        lse=torch.full((T,), float("nan")),
        q=torch.full((T, r), float("nan")),
        rstd=torch.full((T,), float("nan")),
    )
    ws = torch.full((lib.drv_forward_workspace(T, d, r, E, H, k),), float("nan"))
    xin = x if x_view is None else x_view
    rc = simt.call(
        lib, "drv_forward", _ptr(xin, "x"), XTYPES[x.dtype], _ptr(proj, "proj"), _ptr(anchors, "anchors"),
        _ptr(norm_weight, "norm_weight"), _ptr(expert_bias, "expert_bias"), _ptr(scale, "scale"), T, d, r, E, H, k,
        cfg.get("beta", 1.0), 1e-6, 1e-6, cfg.get("tau", 1.0), int(cfg.get("norm", "rms") == "rms"),
        int(cfg.get("score") == "sigmoid"), int(cfg.get("normalize", False)),
        *[_ptr(out[n], n) for n in ("weights", "indices", "tokens_per_expert", "mean_probs", "lse", "q", "rstd")],
        _ptr(ws, "workspace"), seed=seed,
    )
    assert rc == 0, f"forward launch failed with cudaError {rc}"
    return out


def backward(lib, cfg: dict, x, proj, anchors, scale, norm_weight, fwd: dict, grads, seed: int = 0) -> tuple:
    """launch_route_backward; grads = (grad_weights, grad_mean_probs, grad_lse), each may be None.
    Returns (grad_x, grad_proj, grad_anchors, grad_scale, grad_norm_weight)."""
    T, d, r, E, H, k = cfg["T"], cfg["d"], cfg["r"], cfg["E"], cfg["H"], cfg["k"]
    gw, gm, gl = grads
    grad_x = torch.full_like(x, float("nan"))
    grad_proj = torch.full((r, d), float("nan"))
    grad_anchors = torch.full((E, H, r), float("nan"))
    grad_scale = torch.full((1,), float("nan"))
    grad_g = torch.full((d,), float("nan"))
    ws = torch.full((lib.drv_backward_workspace(T, d, r, E, H, k),), float("nan"))
    rc = simt.call(
        lib, "drv_backward", _ptr(gw, "grad_weights"), _ptr(gm, "grad_mean_probs"), _ptr(gl, "grad_lse"),
        _ptr(x, "x"), XTYPES[x.dtype], _ptr(proj, "proj"), _ptr(anchors, "anchors"), _ptr(norm_weight, "norm_weight"),
        _ptr(scale, "scale"), _ptr(fwd["indices"], "indices"), _ptr(fwd["q"], "q"), _ptr(fwd["rstd"], "rstd"),
        T, d, r, E, H, k, cfg.get("beta", 1.0), 1e-6, cfg.get("tau", 1.0), int(cfg.get("norm", "rms") == "rms"),
        int(cfg.get("score") == "sigmoid"), int(cfg.get("normalize", False)), _ptr(grad_x, "grad_x"),
        _ptr(grad_proj, "grad_proj"), _ptr(grad_anchors, "grad_anchors"), _ptr(grad_scale, "grad_scale"),
        _ptr(grad_g, "grad_norm_weight"), _ptr(ws, "workspace"), seed=seed,
    )
    assert rc == 0, f"backward launch failed with cudaError {rc}"
    return grad_x, grad_proj, grad_anchors, grad_scale.reshape(()), grad_g
