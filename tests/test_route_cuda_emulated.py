"""What only the emulator can show about the CUDA route kernels (csrc/route/cuda/route_cuda.cu,
unchanged, in tests/simt): the same results under several thread/block schedules, the launch
paths that depend on the device's shared memory (global-memory fallbacks, > 48 KiB opt-in), the
status codes of launches that cannot run, and that a bad backward index is reported without any
write out of bounds. The sample-driven forward/gradient/opcheck tests of every backend (simt
included) are in test_route.py. Needs g++ only: no GPU, no CUDA toolkit, no built extension."""

from __future__ import annotations

import math

import pytest
import torch

import backends
from oracle import reference

pytestmark = pytest.mark.skipif(backends.available("simt") is not None, reason="g++ missing")

SEEDS = (0, 1, 2, 3)


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


def options(cfg):
    return dict(top_k=cfg["k"], beta=cfg.get("beta", 1.0), norm=cfg.get("norm", "rms"), tau=cfg.get("tau", 1.0),
                score=cfg.get("score", "softmax"), normalize=cfg.get("normalize", False),
                **({"seq_len": cfg["seq_len"]} if "seq_len" in cfg else {}))


CONFIGS = {
    # proj (512 KiB), anchors (256 KiB) and the backward's anchor accumulators exceed shared
    # memory: every one is read from / accumulated in global memory instead.
    "global_fallback_r32_H32": dict(T=5, d=4096, r=32, H=32, E=64, k=4, beta=0.5, g=True),
    # proj (64 KiB) staged in more than the default 48 KiB of shared memory (opt-in attribute).
    "smem_over_48k_r16_d1024": dict(T=5, d=1024, r=16, H=2, E=8, k=2, g=True, score="sigmoid"),
    "generic_rank_r40_H2": dict(T=9, d=64, r=40, H=2, E=7, k=2, beta=0.5, g=True),
    "scalar_d30_f32": dict(T=33, d=30, r=2, H=4, E=40, k=40, beta=1.0, g=True, score="sigmoid"),
    "scalar_d36_bf16": dict(T=5, d=36, r=8, H=1, E=8, k=2, beta=0.5, normalize=True, dtype=torch.bfloat16, tau=2.0),
    "r2_H4_E7_bias_g": dict(T=33, d=64, r=2, H=4, E=7, k=2, beta=0.5, normalize=True, bias=True, g=True),
    # rank 32, bf16 x, >= 128 tokens: the projection on tensor cores (route_kernel_params.h kMma*).
    # 19 chunks of 16 tokens (the last one partial) in 3 blocks of 8 chunks; d = 512: 2 d splits
    # (the last block of each block of chunks adds them); rank 24 pads to 32 (zero rows).
    "tensor_cores_r24_bf16_split": dict(T=300, d=512, r=24, H=2, E=8, k=2, g=True, dtype=torch.bfloat16),
    # statistics groups of 100 tokens: 7 chunks per group, the 7th of 4 tokens (rows past a chunk's
    # end are zero in its m-tile)
    "tensor_cores_r32_bf16_seq_len": dict(T=300, d=512, r=32, H=1, E=8, k=2, seq_len=100, g=True,
                                          dtype=torch.bfloat16),
    # statistics groups of 256 tokens = 2 whole blocks of chunks each: a block's 8 chunks go into one
    # statistics partial (ForwardParams::partial_chunks), 2 groups of 2 partials; 2 d splits.
    "tensor_cores_r32_bf16_whole_blocks": dict(T=512, d=512, r=32, H=2, E=8, k=2, seq_len=256, g=True,
                                               dtype=torch.bfloat16),
    # d = 256: one split, the block's sums stay in shared memory; sigmoid scores and a bias.
    "tensor_cores_r32_bf16_d256": dict(T=150, d=256, r=32, H=1, E=16, k=4, bias=True, score="sigmoid",
                                       normalize=True, dtype=torch.bfloat16),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_launch_paths_match_reference_under_every_schedule(name):
    cfg = CONFIGS[name]
    for seed in SEEDS:
        x, proj, anchors, scale, g, bias = make_inputs(cfg, seed)
        leaves = [t.clone().requires_grad_() for t in (proj, anchors, scale)] + [
            g.clone().requires_grad_() if g is not None else None]
        xl = x.clone().requires_grad_()
        out = backends.simt_route(xl, *leaves[:3], norm_weight=leaves[3], expert_bias=bias, seed=seed, **options(cfg))
        xr = x.float().requires_grad_()
        ref_leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in leaves]
        ref = reference.route(xr, *ref_leaves[:3], norm_weight=ref_leaves[3], expert_bias=bias, **options(cfg))
        assert torch.equal(out.indices, ref.indices), f"seed {seed}"
        torch.testing.assert_close(out.weights, ref.weights.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.mean_probs, ref.mean_probs.detach(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out.lse, ref.lse.detach(), atol=1e-5, rtol=1e-5)
        gen = torch.Generator().manual_seed(2000 + seed)
        gw = torch.randn(out.weights.shape, generator=gen)
        gm = torch.randn(out.mean_probs.shape, generator=gen)
        params = [xl] + [p for p in leaves if p is not None]
        got = torch.autograd.grad((out.weights * gw).sum() + (out.mean_probs * gm).sum() + out.lse.sum(), params)
        want = torch.autograd.grad((ref.weights * gw).sum() + (ref.mean_probs * gm).sum() + ref.lse.sum(),
                                   [xr] + [p for p in ref_leaves if p is not None])
        for a, b in zip(got, want):
            tol = 1e-4 * max(1.0, float(b.abs().max()))
            if a.dtype != torch.float32:
                tol = max(tol, 1e-2 * float(b.abs().max()))  # grad_x is rounded to x's dtype
            torch.testing.assert_close(a.float(), b, atol=tol, rtol=1e-4)


def test_bitwise_deterministic_across_schedules():
    cfg = dict(CONFIGS["r2_H4_E7_bias_g"])
    x, proj, anchors, scale, g, bias = make_inputs(cfg, 0)
    runs = []
    for seed in (5, 6, 7):
        leaves = [t.clone().requires_grad_() for t in (x, proj, anchors, scale, g)]
        out = backends.simt_route(*leaves[:4], norm_weight=leaves[4], expert_bias=bias, seed=seed,
                                  num_groups=7, topk_groups=3, group_score="max", seq_len=11, **options(cfg))
        grads = torch.autograd.grad(out.weights.sum() + out.mean_probs.sum() + out.lse.sum(), leaves)
        runs.append([out.weights, out.indices, out.tokens_per_expert, out.mean_probs, out.lse, *grads])
    def bits(t):
        return t.reshape(-1).view(torch.uint8) if t.is_floating_point() else t

    for a, b, c in zip(*runs):
        assert torch.equal(bits(a), bits(b)) and torch.equal(bits(a), bits(c))


def test_too_many_experts_for_shared_memory_is_a_status():
    # 4 E floats of per-warp scratch times 4 warps cannot fit 227 KiB: the launcher refuses with
    # Status::kSharedMemoryTooSmall (driver code 1000 + 10 * 3) before launching anything.
    cfg = dict(T=2, d=64, r=2, H=1, E=20000, k=1)
    x, proj, anchors, scale, _, _ = make_inputs(cfg, 0)
    with pytest.raises(AssertionError, match="code 1030"):
        backends.simt_route(x, proj, anchors, scale, top_k=1)


def test_bad_backward_index_is_reported_and_nothing_written_out_of_bounds():
    cfg = dict(T=6, d=64, r=2, H=2, E=8, k=3)
    x, proj, anchors, scale, _, _ = make_inputs(cfg, 0)
    call = backends._call("route", 6, 64, 2, 8, 2, 3, None)
    fwd = backends._forward(call, x, proj, anchors, scale.reshape(1), None, None, None, None)
    for bad in (2 ** 40, 8, -1):
        indices = fwd["indices"].clone()
        indices[4, 2] = bad
        saved = (x, proj, anchors, scale.reshape(1), None, None, None, indices, fwd["q"], fwd["rstd"])
        out = backends._backward(call, (torch.ones(6, 3), None, None, None), saved)
        assert out["bad_index"] == 1


@pytest.mark.parametrize("dtype,T,r,expect_mma", [
    (torch.bfloat16, 128, 32, True),    # the first token count with one whole block of 8 chunks
    (torch.bfloat16, 127, 32, False),   # fewer tokens: the CUDA-core path (decode keeps its d split)
    (torch.float32, 150, 32, False),    # float32 and float16 x are not exact in bf16
    (torch.float16, 150, 32, False),
    (torch.bfloat16, 150, 16, False),   # ranks up to 16 pad to 16 or less: CUDA cores
])
def test_tensor_core_path_only_for_bf16_rank_32_and_whole_blocks_of_chunks(dtype, T, r, expect_mma):
    from tests.simt import harness as simt
    cfg = dict(T=T, d=64, r=r, H=1, E=8, k=2, dtype=dtype)
    x, proj, anchors, scale, _, _ = make_inputs(cfg, 0)
    lib = backends.simt_library()
    simt.set_checks(lib, counters=True)
    try:
        simt.counters(lib)
        out = backends.simt_route(x, proj, anchors, scale, top_k=2, seed=0)
        recs = simt.counters(lib)
    finally:
        simt.set_checks(lib, counters=False)
    assert (sum(rec["mma"] for rec in recs) > 0) == expect_mma
    ref = reference.route(x.float(), proj, anchors, scale, top_k=2)
    assert torch.equal(out.indices, ref.indices)
