"""The CUDA route kernels on the SIMT emulator (memory checker on), on the paths the basic emulated
tests (test_route_cuda_emulated.py) leave out: every rank instantiation in every x dtype on both
the 16-byte vector and the scalar x path, warps that loop over several tokens (the forward's and the
backward's block-count caps), several column chunks with a ragged last one, x rows that are 8- but
not 16-byte aligned, and top-k keys that mix NaN with numbers. Forward outputs and backward
gradients against the pure-PyTorch reference (+ autograd)."""
from __future__ import annotations

import math
import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.oracle import reference  # noqa: E402  (plain PyTorch: no built extension needed)
from tests.simt import harness as simt  # noqa: E402
from tests.simt.drivers import route as emu  # noqa: E402


@pytest.fixture(scope="module")
def lib():
    if not simt.have_compiler():
        pytest.skip("g++ missing")
    return emu.build()


def inputs(cfg, seed):
    g = torch.Generator().manual_seed(7000 + seed)
    T, d, r, E, H = cfg["T"], cfg["d"], cfg["r"], cfg["E"], cfg["H"]
    x = torch.randn(T, d, generator=g).to(cfg.get("dtype", torch.float32))
    return dict(
        x=x,
        proj=torch.randn(r, d, generator=g) / math.sqrt(d),
        anchors=torch.randn(E, H, r, generator=g),
        scale=torch.tensor(cfg.get("scale", 4.0)),
        norm_weight=1.0 + 0.3 * torch.randn(d, generator=g),
        expert_bias=0.05 * torch.randn(E, generator=g) if cfg.get("bias") else None,
    )


def reference_route(cfg, t, leaves):
    x, proj, anchors, scale, g = leaves
    return reference.route(x, proj, anchors, scale, top_k=cfg["k"], beta=cfg.get("beta", 1.0),
                           norm=cfg.get("norm", "rms"), norm_weight=g, tau=cfg.get("tau", 1.0),
                           score=cfg.get("score", "softmax"), normalize=cfg.get("normalize", False),
                           expert_bias=t["expert_bias"])


def check_route(lib, cfg, seed=0, t=None, x_view=None, backward=True):
    """Forward outputs and (when every selection agrees) backward gradients against the
    reference; returns the forward outputs."""
    t = t or inputs(cfg, seed)
    fwd = emu.forward(lib, cfg, t["x"], t["proj"], t["anchors"], t["scale"], t["norm_weight"], t["expert_bias"],
                      seed=seed, x_view=x_view)
    leaves = [t["x"].float().requires_grad_(True)] + [t[n].clone().requires_grad_(True)
                                                       for n in ("proj", "anchors", "scale", "norm_weight")]
    ref = reference_route(cfg, t, leaves)
    assert torch.equal(fwd["indices"], ref.indices), "top-k selection differs from the reference"
    torch.testing.assert_close(fwd["weights"], ref.weights.detach(), atol=1e-5, rtol=1e-5, equal_nan=True)
    assert torch.equal(fwd["tokens_per_expert"], ref.tokens_per_expert)
    torch.testing.assert_close(fwd["mean_probs"], ref.mean_probs.detach(), atol=1e-6, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(fwd["lse"], ref.lse.detach(), atol=1e-5, rtol=1e-5, equal_nan=True)
    if not backward:
        return fwd
    g = torch.Generator().manual_seed(8000 + seed)
    grads = (torch.randn(cfg["T"], cfg["k"], generator=g), torch.randn(cfg["E"], generator=g),
             torch.randn(cfg["T"], generator=g))
    loss = (ref.weights * grads[0]).sum() + (ref.mean_probs * grads[1]).sum() + (ref.lse * grads[2]).sum()
    expect = torch.autograd.grad(loss, leaves)
    got = emu.backward(lib, cfg, t["x"], t["proj"], t["anchors"], t["scale"], t["norm_weight"], fwd, grads, seed=seed)
    for name, a, b in zip(("x", "proj", "anchors", "scale", "norm_weight"), got, expect):
        tol = 1e-4 * max(1.0, float(b.abs().max()))
        if name == "x" and t["x"].dtype != torch.float32:
            tol = max(tol, 1e-2 * float(b.abs().max()))  # grad_x is rounded to x's dtype
        torch.testing.assert_close(a.float(), b, atol=tol, rtol=1e-4, msg=lambda m: f"grad_{name}: {m}")
    return fwd


DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
# Ranks of every kernel instantiation: 1, 2, 4, 8, 16, 32 (templated; 3 pads to 4) and 40 (generic).
RANKS = (1, 2, 3, 8, 16, 32, 40)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("r", RANKS)
def test_every_rank_and_dtype(lib, r, dtype):
    # d = 64 rows are 16-byte vectors; d = 36 rows are not (scalar x loads): both paths per rank.
    for d, seed in ((64, 0), (36, 1)):
        cfg = dict(T=9, d=d, r=r, E=6, H=2, k=2, beta=0.5, dtype=DTYPES[dtype], normalize=r % 2 == 0)
        check_route(lib, cfg, seed=seed)


def test_forward_warps_loop_over_tokens(lib):
    # More tokens than the forward's 1024 blocks x 4 warps: warps take a second token, so per-warp
    # sums (prob_sum, counts) carry over tokens.
    cfg = dict(T=4100, d=16, r=2, H=1, E=3, k=2, bias=True)
    check_route(lib, cfg, backward=False)


def test_backward_warps_loop_over_tokens_and_column_chunks(lib):
    # More tokens than the backward's 256 blocks x 4 warps (grad_scale and the anchor
    # accumulators carry over tokens), 18 column chunks of 62 tokens, the last one ragged, and
    # every anchor slot holding a token.
    cfg = dict(T=1100, d=40, r=4, H=2, E=5, k=2, beta=0.5, tau=0.7)
    check_route(lib, cfg)


def test_x_rows_8_but_not_16_byte_aligned(lib):
    # x starts 8 bytes into a 16-byte aligned buffer: the launcher must take the scalar path
    # (16-byte loads would fault on a GPU: the memory checker faults here too).
    cfg = dict(T=7, d=32, r=8, H=2, E=9, k=3)
    t = inputs(cfg, 0)
    buf = torch.empty(cfg["T"] * cfg["d"] + 2, dtype=torch.float32)
    assert buf.data_ptr() % 16 == 0
    view = buf[2:].view(cfg["T"], cfg["d"])
    view.copy_(t["x"])
    check_route(lib, cfg, t=t, x_view=view, backward=False)


@pytest.mark.parametrize("bias", [False, True])
def test_top_k_keys_mixing_nan_and_numbers(lib, bias):
    # Sigmoid scores are per expert: NaN anchors make some experts' keys NaN for every token while
    # the others stay numbers. NaN ranks below every number, so those experts come last.
    # k = 38 of 40 with 3 NaN experts: the 37 numbers first, then the lowest-index NaN expert.
    cfg = dict(T=6, d=64, r=4, H=1, E=40, k=38, score="sigmoid", bias=bias)
    t = inputs(cfg, 3)
    t["anchors"][[1, 5, 33]] = float("nan")
    fwd = check_route(lib, cfg, t=t, backward=False)
    assert not bool(torch.isin(fwd["indices"][:, :37], torch.tensor([1, 5, 33])).any())
    assert bool((fwd["indices"][:, 37] == 1).all())
