"""The CUDA route op on a real GPU: against the CPU op and the reference, opcheck, determinism and
CUDA-graph capture. Skipped without a GPU or without the CUDA build (the emulated tests in
test_route_cuda_emulated.py run the same kernels on the CPU)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch

import l2r_cuda
from l2r_cuda import reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not l2r_cuda.cuda_built(), reason="l2r_cuda was built without CUDA kernels"),
]

DEV = "cuda"


def make(T=257, d=256, r=2, E=64, H=4, dtype=torch.float32, g=True, bias=True, seed=0, device=DEV):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=gen).to(dtype)
    proj = torch.randn(r, d, generator=gen) / d ** 0.5
    anchors = torch.randn(E, H, r, generator=gen)
    scale = torch.tensor(4.0)
    norm_weight = 1 + 0.2 * torch.randn(d, generator=gen) if g else None
    expert_bias = 0.02 * torch.randn(E, generator=gen) if bias else None
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(x), to(proj), to(anchors), to(scale), to(norm_weight), to(expert_bias)


def forward_args(x, proj, anchors, scale, norm_weight, expert_bias, k, **kw):
    return (x, proj, anchors, scale, norm_weight, expert_bias, kw.get("padding_mask"), k, kw.get("beta", 1.0),
            kw.get("norm", "rms"), 1e-6, 1e-6, kw.get("tau", 1.0), kw.get("score", "softmax"),
            kw.get("normalize", False), kw.get("num_groups", 1), kw.get("topk_groups", 1),
            kw.get("group_score", "top2_sum"), kw.get("routed_scaling_factor", 1.0), kw.get("seq_len", 0))


def backward_args(grads, inputs, out, **kw):
    """route_backward's arguments from the output grads, the forward's inputs (x, proj, anchors,
    scale, norm_weight) and outputs."""
    return (*grads, *inputs[:5], kw.get("padding_mask"), out[1], out[5], out[6], kw.get("beta", 1.0),
            kw.get("norm", "rms"), 1e-6, kw.get("tau", 1.0), kw.get("score", "softmax"), kw.get("normalize", False),
            kw.get("routed_scaling_factor", 1.0), kw.get("seq_len", 0), [True, True])


CASES = [
    dict(r=2, H=1, E=64, k=8, num_groups=8, topk_groups=4, routed_scaling_factor=2.5, score="sigmoid",
         normalize=True),
    dict(r=8, H=4, E=64, k=6, seq_len=257, group_score="max", num_groups=4, topk_groups=2),
    dict(r=1, H=1, E=8, k=1),
    dict(r=2, H=4, E=64, k=8, normalize=True),
    dict(r=3, H=1, E=40, k=2, score="sigmoid", beta=0.5),
    dict(r=8, H=2, E=7, k=7, beta=0.0, dtype=torch.bfloat16),
    dict(r=16, H=1, E=128, k=4, dtype=torch.float16, tau=0.5),
    dict(r=32, H=4, E=64, k=2, norm=None),
    # rank 32, bf16 x, >= 128 tokens: the projection on tensor cores (one d split; then four, with
    # statistics groups of 100 tokens: partial chunks)
    dict(r=32, H=2, E=8, k=2, dtype=torch.bfloat16),
    dict(r=32, H=1, E=8, k=2, T=300, d=1024, seq_len=100, dtype=torch.bfloat16),
    # statistics groups of 512 tokens = 4 whole blocks of 8 chunks: one statistics partial per block
    dict(r=32, H=1, E=8, k=2, T=1024, d=512, seq_len=512, dtype=torch.bfloat16),
    dict(r=40, H=1, E=33, k=3),
    dict(r=2, H=1, E=64, k=6, d=90),  # rows not 16-byte aligned: scalar loads
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_forward_backward_matches_cpu_op(case):
    case = dict(case)
    k = case.pop("k")
    dtype = case.pop("dtype", torch.float32)
    d = case.pop("d", 256)
    opts = {n: case.pop(n) for n in ("beta", "norm", "tau", "score", "normalize", "num_groups", "topk_groups",
                                     "group_score", "routed_scaling_factor", "seq_len") if n in case}
    cpu_in = make(d=d, dtype=dtype, device="cpu", **case)
    gpu_in = [None if t is None else t.to(DEV) for t in cpu_in]
    out_cpu = torch.ops.l2r_cuda.route_forward(*forward_args(*cpu_in, k, **opts))
    out_gpu = torch.ops.l2r_cuda.route_forward(*forward_args(*gpu_in, k, **opts))
    names = ["weights", "indices", "tokens_per_expert", "mean_probs", "lse", "q", "rstd"]
    for name, a, b in zip(names, out_gpu, out_cpu):
        if a.dtype == torch.int64:
            assert torch.equal(a.cpu(), b), name
        else:
            torch.testing.assert_close(a.cpu(), b, atol=2e-5, rtol=1e-5, msg=name)

    grads = (torch.randn_like(out_cpu[0]), torch.randn_like(out_cpu[3]), torch.randn_like(out_cpu[4]))
    g_cpu = torch.ops.l2r_cuda.route_backward(*backward_args(grads, cpu_in, out_cpu, **opts))
    g_gpu = torch.ops.l2r_cuda.route_backward(
        *backward_args(tuple(t.to(DEV) for t in grads), gpu_in, out_gpu, **opts))
    for name, a, b in zip(["x", "proj", "anchors", "scale", "norm_weight"], g_gpu, g_cpu):
        tol = 1e-4 * max(1.0, float(b.abs().max())) if b.numel() else 1e-4
        if name == "x" and dtype != torch.float32:
            tol = max(tol, 1e-2 * float(b.float().abs().max()))
        torch.testing.assert_close(a.cpu().float(), b.float(), atol=tol, rtol=1e-4, msg=name)


def test_autograd_matches_reference():
    x, proj, anchors, scale, g, bias = make(T=100, r=2, E=16, H=2)
    leaves = [t.clone().requires_grad_(True) for t in (x, proj, anchors, scale, g)]
    ref_leaves = [t.clone().requires_grad_(True) for t in (x, proj, anchors, scale, g)]
    out = l2r_cuda.route(*leaves[:4], top_k=4, norm_weight=leaves[4], expert_bias=bias)
    ref = reference.route(*ref_leaves[:4], top_k=4, norm_weight=ref_leaves[4], expert_bias=bias)
    assert torch.equal(out.indices, ref.indices)
    loss = lambda o: (o.weights.square().sum() + o.mean_probs.square().sum() + o.lse.square().sum())  # noqa: E731
    loss(out).backward()
    loss(ref).backward()
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4)


def test_opcheck():
    x, proj, anchors, scale, g, bias = make(T=33, d=64, r=2, E=8, H=2)
    args = forward_args(x, proj, anchors, scale, g, bias, 2)
    torch.library.opcheck(torch.ops.l2r_cuda.route_forward.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    out = torch.ops.l2r_cuda.route_forward(*args)
    bw = backward_args((torch.randn_like(out[0]), None, torch.randn_like(out[4])), (x, proj, anchors, scale, g), out)
    torch.library.opcheck(torch.ops.l2r_cuda.route_backward.default, bw,
                          test_utils=("test_schema", "test_faketensor"))


def test_bitwise_deterministic():
    inp = make(T=4099, d=512, r=4, E=64, H=2)
    runs = []
    for _ in range(2):
        out = torch.ops.l2r_cuda.route_forward(*forward_args(*inp, 8))
        grads = torch.ops.l2r_cuda.route_backward(*backward_args(
            (torch.ones_like(out[0]), torch.ones_like(out[3]), torch.ones_like(out[4])), inp, out))
        runs.append(list(out) + list(grads))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("T", [1, 3, 4099])  # T=1, 3: d split over blocks (one ticket word per chunk)
def test_forward_counters_per_stream(T):
    """Eager forwards use ticket counters the executor keeps zero per stream (no memset step): calls
    on concurrent streams, each its own counters, give the default stream's results bit for bit."""
    inp = make(T=T, d=2048, r=8, E=64, H=4)
    args = forward_args(*inp, 8)
    expected = torch.ops.l2r_cuda.route_forward(*args)
    streams = [torch.cuda.Stream() for _ in range(3)]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    outs = []
    for _ in range(4):  # interleaved: every stream has several forwards in flight at once
        for s in streams:
            with torch.cuda.stream(s):
                outs.append(torch.ops.l2r_cuda.route_forward(*args))
    torch.cuda.synchronize()
    for out in outs:
        for a, b in zip(out, expected):
            assert torch.equal(a, b)


def test_cuda_graph_capture():
    x, proj, anchors, scale, g, bias = make(T=64, d=128, r=2, E=16, H=2)
    args = forward_args(x, proj, anchors, scale, g, bias, 2)
    eager = torch.ops.l2r_cuda.route_forward(*args)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.ops.l2r_cuda.route_forward(*args)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch.ops.l2r_cuda.route_forward(*args)
        bw = torch.ops.l2r_cuda.route_backward(*backward_args(
            (torch.ones_like(captured[0]), None, None), (x, proj, anchors, scale, g), captured))
    x.mul_(0.5)  # new data in the same buffers, then replay
    scale.fill_(2.0)
    graph.replay()
    torch.cuda.synchronize()
    fresh = torch.ops.l2r_cuda.route_forward(*args)
    for a, b in zip(captured, fresh):
        assert torch.equal(a, b)
    assert not torch.equal(captured[0], eager[0])
    fresh_bw = torch.ops.l2r_cuda.route_backward(*backward_args(
        (torch.ones_like(fresh[0]), None, None), (x, proj, anchors, scale, g), fresh))
    for a, b in zip(bw, fresh_bw):
        assert torch.equal(a, b)


def test_route_logits_and_select_match_cpu():
    x, proj, anchors, scale, g, bias = make(T=130, r=4, E=32, H=2, dtype=torch.bfloat16)
    cpu = [None if t is None else t.cpu() for t in (x, proj, anchors, scale, g, bias)]
    lg = l2r_cuda.ops.route_logits(x, proj, anchors, scale, norm_weight=g)
    lc = l2r_cuda.ops.route_logits(*cpu[:4], norm_weight=cpu[4])
    torch.testing.assert_close(lg.cpu(), lc, atol=2e-5, rtol=1e-5)
    sg = l2r_cuda.ops.route_from_logits(lg, 4, expert_bias=bias, num_groups=8, topk_groups=3)
    sc = l2r_cuda.ops.route_from_logits(lc, 4, expert_bias=cpu[5], num_groups=8, topk_groups=3)
    assert torch.equal(sg.indices.cpu(), sc.indices)
    torch.testing.assert_close(sg.weights.cpu(), sc.weights, atol=1e-5, rtol=1e-5)


def test_bad_backward_index_raises_asynchronously():
    # The check is a device-side assert (no host sync on the hot path): it leaves the CUDA context
    # unusable, like PyTorch's own index asserts, so it runs in a process of its own. In-process it
    # failed every later CUDA test of that process (first GPU run).
    script = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from test_route_cuda import backward_args, forward_args, make
x, proj, anchors, scale, g, bias = make(T=16, E=8)
out = torch.ops.l2r_cuda.route_forward(*forward_args(x, proj, anchors, scale, g, bias, 2))
idx = out[1].clone()
idx[3, 1] = 8
bad = list(out)
bad[1] = idx
try:
    torch.ops.l2r_cuda.route_backward(*backward_args((torch.ones_like(out[0]), None, None),
                                                     (x, proj, anchors, scale, g), bad))
    torch.cuda.synchronize()
except RuntimeError as exc:
    print("raised:", exc)
"""
    here = pathlib.Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(here.parent), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", script, str(here)], capture_output=True, text=True, timeout=300,
                          cwd=here.parent, env=env)
    assert "raised:" in proc.stdout and "device-side assert" in proc.stdout, proc.stdout + proc.stderr[-3000:]


def test_compile_fullgraph_forward_and_backward():
    x, proj, anchors, scale, g, bias = make(T=64, dtype=torch.bfloat16)
    leaves = [t.requires_grad_() for t in (x, proj, anchors, scale)]

    def fn(x, proj, anchors, scale):
        out = l2r_cuda.route(x, proj, anchors, scale, top_k=4, norm_weight=g, expert_bias=bias)
        return out.weights, out.indices, out.lse

    got = torch.compile(fn, fullgraph=True)(*leaves)
    want = fn(*leaves)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0])
    grads = torch.autograd.grad(got[0].sum() + got[2].sum(), leaves)
    want_grads = torch.autograd.grad(want[0].sum() + want[2].sum(), leaves)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b)


def test_float64_raises_clearly():
    x, proj, anchors, scale, g, bias = make(T=4, d=64)
    with pytest.raises(RuntimeError, match="float64"):
        l2r_cuda.route(x.double(), proj, anchors, scale, top_k=2)


def test_empty_batch():
    x, proj, anchors, scale, g, bias = make(T=0, d=64, E=8)
    out = l2r_cuda.route(x, proj, anchors, scale, top_k=2, norm_weight=g, expert_bias=bias)
    assert out.weights.shape == (0, 2) and out.tokens_per_expert.sum() == 0
    assert torch.equal(out.mean_probs, torch.zeros(8, device=DEV))
