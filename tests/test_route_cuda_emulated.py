"""The CUDA route kernels (csrc/route/route_cuda.cu), unchanged, on the SIMT CPU emulator
(tests/simt): forward and backward against the pure-PyTorch reference (+ autograd), under
several thread/block orders. Needs g++ only: no GPU, no CUDA toolkit, no built extension."""

from __future__ import annotations

import ctypes
import math
import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "simt"))
import harness as simt  # noqa: E402

from oracle import reference  # noqa: E402  (plain PyTorch: these tests need no built extension)

XTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
SEEDS = (0, 1, 2, 3)

P = ctypes.c_void_p
L = ctypes.c_long
I = ctypes.c_int
F = ctypes.c_float


@pytest.fixture(scope="module")
def lib():
    if not simt.have_compiler():
        pytest.skip("g++ missing")
    lib = simt.build(
        sources=[ROOT / "csrc/route/route_cuda.cu"],
        include_dirs=[ROOT / "csrc"],
        driver_source=ROOT / "tests/simt/drivers/route_driver.cpp",
        name="route_cuda",
    )
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


def _ptr(t):
    return None if t is None else simt.ptr(t)


def make_inputs(cfg, seed):
    g = torch.Generator().manual_seed(1000 + seed)
    T, d, r, E, H = cfg["T"], cfg["d"], cfg["r"], cfg["E"], cfg["H"]
    x = torch.randn(T, d, generator=g).to(cfg.get("dtype", torch.float32))
    proj = torch.randn(r, d, generator=g) / math.sqrt(d)
    anchors = torch.randn(E, H, r, generator=g)
    scale = torch.tensor(cfg.get("scale", 4.0))
    norm_weight = 1.0 + 0.3 * torch.randn(d, generator=g) if cfg.get("g") else None
    expert_bias = 0.05 * torch.randn(E, generator=g) if cfg.get("bias") else None
    return x, proj, anchors, scale, norm_weight, expert_bias


def run_forward(lib, cfg, x, proj, anchors, scale, norm_weight, expert_bias, seed):
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
    rc = simt.call(
        lib, "drv_forward", _ptr(x), XTYPES[x.dtype], _ptr(proj), _ptr(anchors), _ptr(norm_weight),
        _ptr(expert_bias), _ptr(scale), T, d, r, E, H, k, cfg.get("beta", 1.0), 1e-6, 1e-6,
        cfg.get("tau", 1.0), int(cfg.get("norm", "rms") == "rms"), int(cfg.get("score") == "sigmoid"),
        int(cfg.get("normalize", False)), _ptr(out["weights"]), _ptr(out["indices"]),
        _ptr(out["tokens_per_expert"]), _ptr(out["mean_probs"]), _ptr(out["lse"]), _ptr(out["q"]),
        _ptr(out["rstd"]), _ptr(ws), seed=seed,
    )
    assert rc == 0, f"forward launch failed with cudaError {rc}"
    return out


def run_backward(lib, cfg, x, proj, anchors, scale, norm_weight, fwd, grads, seed):
    T, d, r, E, H, k = cfg["T"], cfg["d"], cfg["r"], cfg["E"], cfg["H"], cfg["k"]
    gw, gm, gl = grads
    grad_x = torch.full_like(x, float("nan"))
    grad_proj = torch.full((r, d), float("nan"))
    grad_anchors = torch.full((E, H, r), float("nan"))
    grad_scale = torch.full((1,), float("nan"))
    grad_g = torch.full((d,), float("nan"))
    ws = torch.full((lib.drv_backward_workspace(T, d, r, E, H, k),), float("nan"))
    rc = simt.call(
        lib, "drv_backward", _ptr(gw), _ptr(gm), _ptr(gl), _ptr(x), XTYPES[x.dtype], _ptr(proj),
        _ptr(anchors), _ptr(norm_weight), _ptr(scale), _ptr(fwd["indices"]), _ptr(fwd["q"]),
        _ptr(fwd["rstd"]), T, d, r, E, H, k, cfg.get("beta", 1.0), 1e-6, cfg.get("tau", 1.0),
        int(cfg.get("norm", "rms") == "rms"), int(cfg.get("score") == "sigmoid"),
        int(cfg.get("normalize", False)), _ptr(grad_x), _ptr(grad_proj), _ptr(grad_anchors),
        _ptr(grad_scale), _ptr(grad_g), _ptr(ws), seed=seed,
    )
    assert rc == 0, f"backward launch failed with cudaError {rc}"
    return grad_x, grad_proj, grad_anchors, grad_scale.reshape(()), grad_g


def ref_route(cfg, x, proj, anchors, scale, norm_weight, expert_bias):
    return reference.route(
        x, proj, anchors, scale, top_k=cfg["k"], beta=cfg.get("beta", 1.0), norm=cfg.get("norm", "rms"),
        norm_weight=norm_weight, tau=cfg.get("tau", 1.0), score=cfg.get("score", "softmax"),
        normalize=cfg.get("normalize", False), expert_bias=expert_bias,
    )


def check_indices(cfg, ours, ref_out, x, proj, anchors, scale, norm_weight, expert_bias):
    """Exact on tie-free inputs; where the kernel and the reference pick differently, the keys must
    be equal to rounding (a near-tie that fp32 summation order decides)."""
    if torch.equal(ours, ref_out.indices):
        return
    logits = reference.route_logits(
        x, proj, anchors, scale, beta=cfg.get("beta", 1.0), norm=cfg.get("norm", "rms"),
        norm_weight=norm_weight, tau=cfg.get("tau", 1.0),
    )
    probs = torch.softmax(logits, -1) if cfg.get("score", "softmax") == "softmax" else torch.sigmoid(logits)
    keys = probs if expert_bias is None else probs + expert_bias
    torch.testing.assert_close(keys.gather(1, ours), keys.gather(1, ref_out.indices), atol=2e-6, rtol=0)


CONFIGS = {
    # r, H, E, k, beta, score, normalize, bias, norm weight, dtype, T; d = 64 takes the vector path.
    "r1_E1": dict(T=5, d=64, r=1, H=1, E=1, k=1, beta=1.0),
    "r2_H4_E7_bias_g": dict(T=33, d=64, r=2, H=4, E=7, k=2, beta=0.5, normalize=True, bias=True, g=True),
    "r3_E8_sigmoid_bf16": dict(T=5, d=64, r=3, H=1, E=8, k=8, beta=0.0, score="sigmoid", bias=True,
                               dtype=torch.bfloat16),
    "r8_H4_E40_f16": dict(T=33, d=64, r=8, H=4, E=40, k=2, beta=1.0, score="sigmoid", normalize=True,
                          g=True, dtype=torch.float16),
    "r32_E64": dict(T=33, d=64, r=32, H=1, E=64, k=2, beta=0.5, g=True, tau=0.7),
    "r2_E64_kE_nonorm": dict(T=5, d=64, r=2, H=1, E=64, k=64, normalize=True, bias=True, norm=None),
    "r40_generic_H2": dict(T=5, d=64, r=40, H=2, E=7, k=2, beta=0.5, g=True),
    "r1_H4_E1_T1": dict(T=1, d=64, r=1, H=4, E=1, k=1, g=True, tau=0.5),
    "r4_E7_kE_sigmoid_norm_f16": dict(T=33, d=64, r=4, H=1, E=7, k=7, beta=0.0, score="sigmoid",
                                      normalize=True, dtype=torch.float16),
    "r2_H4_E64_bf16": dict(T=33, d=128, r=2, H=4, E=64, k=8, bias=True, g=True, dtype=torch.bfloat16),
    "r16_E40_nonorm_g_unused": dict(T=5, d=64, r=16, H=1, E=40, k=4, norm=None, g=True),
    # proj (512 KiB), anchors (256 KiB) and the backward's anchor accumulators exceed shared
    # memory: every one is read from / accumulated in global memory instead.
    "global_fallback_r32_H32": dict(T=5, d=4096, r=32, H=32, E=64, k=4, beta=0.5, g=True),
    # proj (64 KiB) staged in more than the default 48 KiB of shared memory (opt-in attribute).
    "smem_over_48k_r16_d1024": dict(T=5, d=1024, r=16, H=2, E=8, k=2, g=True, score="sigmoid"),
    "scalar_d30_f32": dict(T=33, d=30, r=2, H=4, E=40, k=40, beta=1.0, g=True, score="sigmoid"),
    "scalar_d36_bf16": dict(T=5, d=36, r=8, H=1, E=8, k=2, beta=0.5, normalize=True,
                            dtype=torch.bfloat16, tau=2.0),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_backward_matches_reference(lib, name):
    cfg = CONFIGS[name]
    backward_checked = 0
    for seed in SEEDS:
        x, proj, anchors, scale, norm_weight, expert_bias = make_inputs(cfg, seed)
        fwd = run_forward(lib, cfg, x, proj, anchors, scale, norm_weight, expert_bias, seed)

        leaves = [t.clone().requires_grad_(True) if t is not None and t.dtype == torch.float32 else None
                  for t in (x, proj, anchors, scale, norm_weight)]
        xl = x.float().requires_grad_(True) if x.dtype != torch.float32 else leaves[0]
        ref = ref_route(cfg, xl, leaves[1], leaves[2], leaves[3], leaves[4], expert_bias)

        check_indices(cfg, fwd["indices"], ref, x, proj, anchors, scale, norm_weight, expert_bias)
        same_rows = (fwd["indices"] == ref.indices).all(1)
        torch.testing.assert_close(fwd["weights"][same_rows], ref.weights.detach()[same_rows],
                                   atol=1e-5, rtol=1e-5)
        assert torch.equal(fwd["tokens_per_expert"],
                           torch.bincount(fwd["indices"].reshape(-1), minlength=cfg["E"]))
        torch.testing.assert_close(fwd["mean_probs"], ref.mean_probs.detach(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(fwd["lse"], ref.lse.detach(), atol=1e-5, rtol=1e-5)

        # Backward against autograd through the reference (same selection: rows where the
        # indices agree, which is every row on tie-free inputs).
        g = torch.Generator().manual_seed(2000 + seed)
        gw = torch.randn(cfg["T"], cfg["k"], generator=g)
        gm = torch.randn(cfg["E"], generator=g) if seed != 1 else None
        gl = torch.randn(cfg["T"], generator=g) if seed != 2 else None
        if not bool(same_rows.all()):
            continue
        loss = (ref.weights * gw).sum()
        if gm is not None:
            loss = loss + (ref.mean_probs * gm).sum()
        if gl is not None:
            loss = loss + (ref.lse * gl).sum()
        uses_g = norm_weight is not None and cfg.get("norm", "rms") == "rms"  # norm=None ignores it
        params = [xl, leaves[1], leaves[2], leaves[3]] + ([leaves[4]] if uses_g else [])
        expect = torch.autograd.grad(loss, params, allow_unused=True)
        got = run_backward(lib, cfg, x, proj, anchors, scale, norm_weight, fwd, (gw, gm, gl), seed)
        backward_checked += 1
        names = ["x", "proj", "anchors", "scale", "norm_weight"]
        for nm, a, b in zip(names, got, expect):
            if b is None:
                b = torch.zeros_like(a.float())
            a = a.float()
            tol = 1e-4 * max(1.0, float(b.abs().max()))
            if x.dtype != torch.float32 and nm == "x":
                tol = max(tol, 1e-2 * float(b.abs().max()))  # grad_x is rounded to x's dtype
            torch.testing.assert_close(a, b, atol=tol, rtol=1e-4, msg=lambda m: f"{name} seed {seed} grad_{nm}: {m}")
    assert backward_checked >= len(SEEDS) - 1, "near-ties left the backward unchecked"


def test_ties_pick_lower_index_first(lib):
    cfg = dict(T=5, d=64, r=2, H=2, E=40, k=5)
    x, proj, _, scale, _, _ = make_inputs(cfg, 0)
    anchors = torch.ones(cfg["E"], cfg["H"], cfg["r"])  # identical experts: every key ties
    fwd = run_forward(lib, cfg, x, proj, anchors, scale, None, None, seed=3)
    assert torch.equal(fwd["indices"], torch.arange(5).expand(5, 5))
    torch.testing.assert_close(fwd["weights"], torch.full((5, 5), 1 / 40))


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_nan_inf_tokens_give_valid_indices(lib, score):
    cfg = dict(T=6, d=64, r=4, H=1, E=40, k=8, score=score, bias=True)
    x, proj, anchors, scale, _, bias = make_inputs(cfg, 1)
    x[0, 3] = float("nan")
    x[1, 5] = float("inf")
    x[2] = float("-inf")
    x[3] = 0.0
    x[4, :] = 1e30
    fwd = run_forward(lib, cfg, x, proj, anchors, scale, None, bias, seed=4)
    idx = fwd["indices"]
    assert bool(((idx >= 0) & (idx < cfg["E"])).all())
    for row in idx:
        assert len(set(row.tolist())) == cfg["k"]
    assert torch.isnan(fwd["weights"][0]).all()
    assert int(fwd["tokens_per_expert"].sum()) == cfg["T"] * cfg["k"]


def test_bitwise_deterministic_across_orders(lib):
    cfg = CONFIGS["r2_H4_E7_bias_g"]
    x, proj, anchors, scale, g, bias = make_inputs(cfg, 0)
    runs = []
    for seed in (5, 6):
        fwd = run_forward(lib, cfg, x, proj, anchors, scale, g, bias, seed)
        grads = run_backward(lib, cfg, x, proj, anchors, scale, g, fwd,
                             (torch.ones(cfg["T"], cfg["k"]), torch.ones(cfg["E"]), torch.ones(cfg["T"])), seed)
        runs.append(list(fwd.values()) + list(grads))
    for a, b in zip(*runs):
        assert torch.equal(a.reshape(-1).view(torch.uint8) if a.is_floating_point() else a,
                           b.reshape(-1).view(torch.uint8) if b.is_floating_point() else b)


def test_too_many_experts_for_shared_memory_is_an_error(lib):
    # 3 E floats of per-warp scratch times 4 warps cannot fit 227 KiB: the launcher refuses
    # (cudaErrorInvalidValue = 1) before launching anything.
    cfg = dict(T=2, d=64, r=2, H=1, E=20000, k=1)
    x, proj, anchors, scale, _, _ = make_inputs(cfg, 0)
    with pytest.raises(AssertionError, match="cudaError 1"):
        run_forward(lib, cfg, x, proj, anchors, scale, None, None, seed=0)
