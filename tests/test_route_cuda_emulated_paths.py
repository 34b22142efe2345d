"""The CUDA route kernels on the SIMT emulator (tests/backends.py's simt backend, memory checker on),
on the paths the sample-driven route tests leave out: every rank instantiation in every x dtype on
both the 16-byte vector and the scalar x path, for route and route_logits; warps that loop over
several tokens (the forward's token chunks, the backward's one wave of blocks); backward anchor
accumulators in global memory; several column chunks with a ragged last one, chunks of several
staged tiles, the column groups' sums striped over threads; x rows that are 8- but not 16-byte aligned; top-k keys that mix
NaN with numbers. Forward outputs and gradients against the pure-PyTorch reference (+ autograd)."""
from __future__ import annotations

import math

import pytest
import torch

import backends
from oracle import reference

simt = backends.simt  # tests/simt/harness.py

pytestmark = pytest.mark.skipif(backends.available("simt") is not None, reason="g++ missing")


def inputs(cfg, seed):
    g = torch.Generator().manual_seed(7000 + seed)
    T, d, r, E, H = cfg["T"], cfg["d"], cfg["r"], cfg["E"], cfg["H"]
    return dict(
        x=torch.randn(T, d, generator=g).to(cfg.get("dtype", torch.float32)),
        proj=torch.randn(r, d, generator=g) / math.sqrt(d),
        anchors=torch.randn(E, H, r, generator=g),
        scale=torch.tensor(cfg.get("scale", 4.0)),
        norm_weight=1.0 + 0.3 * torch.randn(d, generator=g),
        expert_bias=0.05 * torch.randn(E, generator=g) if cfg.get("bias") else None,
    )


def options(cfg):
    return dict(beta=cfg.get("beta", 1.0), norm=cfg.get("norm", "rms"), tau=cfg.get("tau", 1.0))


def route_options(cfg):
    return dict(top_k=cfg["k"], score=cfg.get("score", "softmax"), normalize=cfg.get("normalize", False),
                **options(cfg))


def close_grads(got, want, x_dtype):
    for name, a, b in zip(("x", "proj", "anchors", "scale", "norm_weight"), got, want):
        tol = 1e-4 * max(1.0, float(b.abs().max()))
        if name == "x" and x_dtype != torch.float32:
            tol = max(tol, 1e-2 * float(b.abs().max()))  # grad_x is rounded to x's dtype
        torch.testing.assert_close(a.float(), b, atol=tol, rtol=1e-4, msg=lambda m: f"grad_{name}: {m}")


def leaves_of(t, x=None):
    x = t["x"] if x is None else x
    return [x.detach().requires_grad_()] + [t[n].clone().requires_grad_()
                                            for n in ("proj", "anchors", "scale", "norm_weight")]


def check_route(cfg, t, seed=0, x=None, backward=True):
    """route() on the emulator against the reference: outputs, and gradients of every input."""
    ours = leaves_of(t, x)
    out = backends.simt_route(*ours[:4], norm_weight=ours[4], expert_bias=t["expert_bias"], seed=seed,
                              **route_options(cfg))
    refs = [t["x"].float().requires_grad_()] + [p.detach().clone().requires_grad_() for p in ours[1:]]
    ref = reference.route(*refs[:4], norm_weight=refs[4], expert_bias=t["expert_bias"], **route_options(cfg))
    assert torch.equal(out.indices, ref.indices), "top-k selection differs from the reference"
    torch.testing.assert_close(out.weights, ref.weights, atol=1e-5, rtol=1e-5, equal_nan=True)
    assert torch.equal(out.tokens_per_expert, ref.tokens_per_expert)
    torch.testing.assert_close(out.mean_probs, ref.mean_probs, atol=1e-6, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(out.lse, ref.lse, atol=1e-5, rtol=1e-5, equal_nan=True)
    if backward:
        g = torch.Generator().manual_seed(8000 + seed)
        gw, gm, gl = (torch.randn(out.weights.shape, generator=g), torch.randn(out.mean_probs.shape, generator=g),
                      torch.randn(out.lse.shape, generator=g))
        got = torch.autograd.grad((out.weights * gw).sum() + (out.mean_probs * gm).sum() + (out.lse * gl).sum(), ours)
        want = torch.autograd.grad((ref.weights * gw).sum() + (ref.mean_probs * gm).sum() + (ref.lse * gl).sum(), refs)
        close_grads(got, want, t["x"].dtype)
    return out


def check_logits(cfg, t, seed=0):
    """route_logits() on the emulator against the reference, with gradients."""
    ours = leaves_of(t)
    logits = backends.simt_route_logits(*ours[:4], norm_weight=ours[4], seed=seed, **options(cfg))
    refs = [t["x"].float().requires_grad_()] + [p.detach().clone().requires_grad_() for p in ours[1:]]
    want_logits = reference.route_logits(*refs[:4], norm_weight=refs[4], **options(cfg))
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=1e-5)
    gl = torch.randn(logits.shape, generator=torch.Generator().manual_seed(9000 + seed))
    close_grads(torch.autograd.grad((logits * gl).sum(), ours), torch.autograd.grad((want_logits * gl).sum(), refs),
                t["x"].dtype)


DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
# Ranks of every kernel instantiation: 1, 2, 4, 8, 16, 32 (templated; 3 pads to 4) and 40 (generic).
RANKS = (1, 2, 3, 8, 16, 32, 40)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("r", RANKS)
def test_every_rank_and_dtype(r, dtype):
    # d = 64 rows are 16-byte vectors; d = 36 rows are not (scalar x loads): both paths per rank.
    for d, seed in ((64, 0), (36, 1)):
        cfg = dict(T=9, d=d, r=r, E=6, H=2, k=2, beta=0.5, dtype=DTYPES[dtype], normalize=r % 2 == 0)
        t = inputs(cfg, seed)
        check_route(cfg, t, seed=seed)
        check_logits(cfg, t, seed=seed)


def test_forward_warps_loop_over_tokens():
    # 4100 tokens: 129 blocks of 8 warps, a tile of 4 tokens per warp (the per-warp sums prob_sum and
    # counts carry over a tile's tokens), ragged last chunk; the statistics finalized by the block
    # that takes the last ticket.
    cfg = dict(T=4100, d=16, r=2, H=1, E=3, k=2, bias=True)
    check_route(cfg, inputs(cfg, 0), backward=False)


def test_forward_blocks_loop_over_chunks():
    # E = 512 on the emulated device (132 SMs, 227 KiB of shared memory per block): the warps' logit
    # scratch leaves 5 warps per block and 2 blocks per SM, so 5400 tokens make 270 chunks of 20
    # tokens for 264 blocks: blocks loop over chunks (the next chunk reuses the per-warp scratch) and
    # the statistics add partials of several chunks of one block.
    cfg = dict(T=5400, d=16, r=2, H=1, E=512, k=2)
    check_route(cfg, inputs(cfg, 0), backward=False)


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_forward_decode_splits_columns_over_blocks(dtype):
    # 3 tokens, d = 1024: one chunk whose columns are split over 4 blocks (256 each); each writes raw
    # projection sums, the block that takes the chunk's last ticket adds them in split order and
    # routes the chunk (route), or writes the logits (route_logits: tickets without statistics).
    cfg = dict(T=3, d=1024, r=8, E=6, H=2, k=2, dtype=DTYPES[dtype])
    t = inputs(cfg, 3)
    check_route(cfg, t, backward=False)
    check_logits(cfg, t)


def test_forward_d_split_stays_in_one_wave():
    # 64 chunks of 64 tokens (16 warps x 4 tokens at r = 8, one resident block per SM by registers),
    # d = 768 (three 256-column units): splitting each chunk 3 ways to fill the 132 SMs would make
    # 192 blocks, a second, partial wave; the plan splits 2 ways (512 columns, then a ragged 256),
    # 128 blocks in one wave. Outputs through the ragged split against the reference.
    cfg = dict(T=4096, d=768, r=8, E=4, H=1, k=2, dtype=torch.bfloat16)
    lib = backends.simt_library()
    simt.set_checks(lib, counters=True)
    try:
        simt.reset_counters(lib)
        check_route(cfg, inputs(cfg, 5), backward=False)
        launches = simt.counters(lib)
    finally:
        simt.set_checks(lib, counters=False)
    grids = [tuple(r["grid"]) for r in launches if "route_forward_kernel" in r["name"]]
    assert grids == [(128, 1, 1)], launches


@pytest.mark.parametrize("T", [3, 300])
def test_forward_zeroes_its_own_counters_without_a_buffer(T, monkeypatch):
    # No persistent counter buffer (as under CUDA graph capture): the plan zeroes ticket words of the
    # workspace first (the workspace starts as NaN here). Same results, bit for bit, as with one.
    cfg = dict(T=T, d=1024, r=4, E=6, H=2, k=2)
    t = inputs(cfg, 4)
    with_buffer = check_route(cfg, t, backward=False)
    forward = backends._forward
    monkeypatch.setattr(backends, "_forward",
                        lambda *a, **kw: forward(*a, **dict(kw, persistent_counters=False)))
    without = check_route(cfg, t, backward=False)
    for name in ("weights", "indices", "tokens_per_expert", "mean_probs", "lse"):
        assert torch.equal(getattr(without, name), getattr(with_buffer, name)), name


def test_backward_warps_loop_over_tokens_and_column_chunks():
    # More tokens than one wave of the backward's blocks (132 SMs x 2 blocks x 4 warps at r = 16:
    # grad_scale and the anchor accumulators carry over tokens), 18 column chunks of 62 tokens, the
    # last one ragged, and every block's anchor slot holding tokens.
    cfg = dict(T=1100, d=40, r=16, H=2, E=5, k=2, beta=0.5, tau=0.7)
    check_route(cfg, inputs(cfg, 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_token_tiles_and_pairs(dtype):
    # r = 8: 132 SMs x 2 blocks x 4 warps = 1056 warps take tiles of 4 tokens (t, t + 1056, ...),
    # their anchor gradients in pairs. 4300 tokens: every warp a full tile (two pairs), the first 76 a
    # second tile of one token (a ragged tile, a pair of one); d = 40: 16-byte x vectors of 4 floats
    # or 8 bf16 (both grad_x tile passes).
    cfg = dict(T=4300, d=40, r=8, H=2, E=5, k=2, beta=0.5, tau=0.7, dtype=dtype)
    check_route(cfg, inputs(cfg, 6))


def test_backward_column_chunks_span_several_staged_tiles():
    # x rows of 34 floats (not 16-byte vectors: the scalar column path, 2 column groups, the second
    # of 2 columns) and r = 64 (8 rank chunks of the generic column kernel): 16 column blocks per
    # chunk leave 16 chunks in one wave of 264 blocks, so 4800 tokens make chunks of 300, staged as
    # a tile of 256 tokens and a ragged one of 44; the last block of each column group adds the 16
    # chunks of every rank row.
    cfg = dict(T=4800, d=34, r=64, H=1, E=5, k=2)
    check_route(cfg, inputs(cfg, 4))


def test_backward_column_group_sum_striped_over_threads():
    # r = 1, d = 24 (one column group of 6 float4 units): the last block's 256 threads add the 11
    # chunks in 42 stripes of 6 units (4 threads left out), then the stripes in order.
    cfg = dict(T=700, d=24, r=1, H=3, E=6, k=2)
    check_route(cfg, inputs(cfg, 5))


def test_backward_projection_kept_in_shared_memory_at_two_blocks_per_sm():
    # r = 8, d = 1024, E * H = 256: accumulators, anchors and the 32 KiB projection exceed the
    # shared-memory share of 4 blocks per SM but fit that of 2 (the plan then takes 2); bf16 x rows
    # (the column kernel's 16-byte path: 256 columns per block, 4 column groups).
    cfg = dict(T=9, d=1024, r=8, H=4, E=64, k=8, dtype=torch.bfloat16)
    check_route(cfg, inputs(cfg, 2))


@pytest.mark.parametrize("x_aligned", [True, False])
def test_backward_projection_read_from_global_memory(x_aligned):
    # r = 32, d = 1024: the 128 KiB projection exceeds the shared memory of 2 blocks per SM, so the
    # token kernel reads proj from global memory and multiplies it by the norm weight on the fly
    # (16-byte granules; scalar loads when x rows are not 16-byte vectors).
    cfg = dict(T=5, d=1024, r=32, H=1, E=8, k=2)
    t = inputs(cfg, 3)
    x = None
    if not x_aligned:
        buf = torch.empty(cfg["T"] * cfg["d"] + 2, dtype=torch.float32)
        x = buf[2:].view(cfg["T"], cfg["d"])
        x.copy_(t["x"])
        assert x.data_ptr() % 16 == 8
    check_route(cfg, t, x=x)


def test_backward_anchor_accumulators_in_global_memory():
    # E * H * r = 8192 accumulators per warp (4 x 32 KiB) leave the backward's shared-memory budget
    # at r = 8: the warps accumulate in their own global slots (one slot per warp, not per block).
    cfg = dict(T=37, d=24, r=8, H=2, E=512, k=4)
    check_route(cfg, inputs(cfg, 1))


def test_x_rows_8_but_not_16_byte_aligned():
    # x starts 8 bytes into a 16-byte aligned buffer: the launchers must take the scalar path
    # (16-byte loads would fault on a GPU; the memory checker faults here too).
    cfg = dict(T=7, d=32, r=8, H=2, E=9, k=3)
    t = inputs(cfg, 0)
    buf = torch.empty(cfg["T"] * cfg["d"] + 2, dtype=torch.float32)
    assert buf.data_ptr() % 16 == 0
    view = buf[2:].view(cfg["T"], cfg["d"])
    view.copy_(t["x"])
    assert view.data_ptr() % 16 == 8
    check_route(cfg, t, x=view)


@pytest.mark.parametrize("bias", [False, True])
def test_top_k_keys_mixing_nan_and_numbers(bias):
    # Sigmoid scores are per expert: NaN anchors make some experts' keys NaN for every token while
    # the others stay numbers. NaN ranks below every number, so those experts come last: with
    # k = 38 of 40 and 3 NaN experts, the 37 numbers first, then the lowest-index NaN expert.
    cfg = dict(T=6, d=64, r=4, H=1, E=40, k=38, score="sigmoid", bias=bias)
    t = inputs(cfg, 3)
    t["anchors"][[1, 5, 33]] = float("nan")
    out = check_route(cfg, t, backward=False)
    assert not bool(torch.isin(out.indices[:, :37], torch.tensor([1, 5, 33])).any())
    assert bool((out.indices[:, 37] == 1).all())


def check_grads_of(cfg, t, wanted):
    """route() on the emulator with only the inputs named in `wanted` needing gradients: those
    gradients against the reference's, to test_route.py's tolerance (a bf16 dL/dx: twice the error
    of PyTorch's own rounding of the float32 one)."""
    names = ("x", "proj", "anchors", "scale", "norm_weight")
    ours = [t[n].detach().clone().requires_grad_(n in wanted) for n in names]
    refs = [t["x"].float()] + [t[n].detach().clone() for n in names[1:]]
    refs = [r.requires_grad_(o.requires_grad) for r, o in zip(refs, ours)]
    out = backends.simt_route(*ours[:4], norm_weight=ours[4], **route_options(cfg))
    ref = reference.route(*refs[:4], norm_weight=refs[4], **route_options(cfg))
    g = torch.Generator().manual_seed(8011)
    gw, gm = torch.randn(out.weights.shape, generator=g), torch.randn(out.mean_probs.shape, generator=g)
    leaves = [(n, o, r) for n, o, r in zip(names, ours, refs) if o.requires_grad]
    got = torch.autograd.grad((out.weights * gw).sum() + (out.mean_probs * gm).sum(), [o for _, o, _ in leaves])
    want = torch.autograd.grad((ref.weights * gw).sum() + (ref.mean_probs * gm).sum(), [r for _, _, r in leaves])
    for (name, o, _), a, b in zip(leaves, got, want):
        tol = 2e-4 * float(b.abs().max()) + 1e-5
        if o.dtype != torch.float32:  # one rounding of the float32 gradient: twice PyTorch's own cast error
            tol += 2 * float((b.to(o.dtype).float() - b).abs().max())
        torch.testing.assert_close(a.float(), b, atol=tol, rtol=0, msg=lambda m: f"grad_{name}: {m}")


@pytest.mark.parametrize("norm,weight", [("rms", True), ("rms", False), (None, False)])
def test_backward_column_tensor_core_pass(norm, weight):
    # Rank 20 (padded to 32) with bf16 x: the column kernel's tensor-core pass (route_column_mma.cuh)
    # computes dL/dx and the projection's partials. d = 264: three column groups of 128, the last one
    # of 8 columns (warp 0 half past d, warps 1-7 wholly); 5000 tokens make 64 chunks of 79, each
    # staged as a pass of 64 tokens and a ragged one of 15 (a partly empty m-tile).
    cfg = dict(T=5000, d=264, r=20, H=2, E=5, k=2, beta=0.5, tau=0.7, norm=norm, dtype=torch.bfloat16)
    t = inputs(cfg, 10)
    if norm is None:  # no norm weight to differentiate
        check_grads_of(cfg, t, ("x", "proj", "anchors", "scale"))
        return
    if not weight:
        t["norm_weight"] = torch.ones_like(t["norm_weight"])
    check_route(cfg, t)


@pytest.mark.parametrize("wanted", [("x",), ("proj", "anchors", "scale", "norm_weight")])
def test_backward_column_tensor_core_pass_alone(wanted):
    # The tensor-core pass with one of its two products: dL/dx only (a frozen router: no partials,
    # no tickets, no anchor blocks) or the parameter gradients only (x needs no gradient). A small
    # projection (|q| about 0.5): where tanh(|q|) is near 1, SIPS leaves the scores a function of q's
    # direction only, <grad_q, q> = 0, and RMSNorm's mean_dot term of dL/dx would go untested.
    cfg = dict(T=300, d=40, r=32, H=1, E=8, k=2, dtype=torch.bfloat16)
    t = inputs(cfg, 11)
    t["proj"] = 0.1 * t["proj"]
    check_grads_of(cfg, t, wanted)
