"""The NVRTC-compiled kernels (l2r_cuda.jit) on a real GPU: bit for bit equal to the nvcc-compiled
kernels of a CUDA build, through autograd, CUDA-graph capture and torch.compile; and a CPU-only
build (L2R_CUDA=0) serving CUDA tensors with them. Marked cuda: skipped without a GPU or cupy
(scripts/gpu_check.sh runs `pytest -m cuda`). On an H200 (2026-12-04) all of it passed; the
graph-capture-and-compile test only in the second run, after a fix to the device check under
torch.compile."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

import l2r_cuda
from l2r_cuda.jit import use_nvrtc
from l2r_cuda.jit.executor import cupy

ROOT = pathlib.Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(cupy is None, reason="cupy not installed (pip install l2r_cuda[cupy])"),
]
needs_nvcc_build = pytest.mark.skipif(not l2r_cuda.cuda_built(), reason="needs the nvcc kernels to compare with")

ROUTE_CASES = [
    dict(T=37, d=64, r=1, E=8, H=1, k=2),
    dict(T=64, d=128, r=4, E=16, H=2, k=4, dtype=torch.bfloat16, g=True, bias=True),
    dict(T=65, d=96, r=16, E=64, H=1, k=8, dtype=torch.float16, score="sigmoid", normalize=True),
    dict(T=33, d=64, r=40, E=33, H=2, k=3),                               # generic rank
    dict(T=9, d=1024, r=16, E=8, H=2, k=2, g=True),                       # > 48 KiB shared memory
    dict(T=5, d=4096, r=32, E=64, H=32, k=4, g=True),                     # global-memory fallbacks
    dict(T=64, d=90, r=2, E=64, H=1, k=6, num_groups=8, topk_groups=4),   # scalar loads, group-limited
    dict(T=64, d=64, r=8, E=32, H=4, k=4, seq_len=16, padding=True),      # per-sequence statistics
]


def route_inputs(case, seed=0):
    g = torch.Generator().manual_seed(seed)
    T, d, r, E, H = case["T"], case["d"], case["r"], case["E"], case["H"]
    x = torch.randn(T, d, generator=g).to(case.get("dtype", torch.float32)).cuda()
    proj = (torch.randn(r, d, generator=g) / d ** 0.5).cuda()
    anchors = torch.randn(E, H, r, generator=g).cuda()
    scale = torch.tensor(4.0).cuda()
    norm_weight = (1 + 0.2 * torch.randn(d, generator=g)).cuda() if case.get("g") else None
    bias = (0.02 * torch.randn(E, generator=g)).cuda() if case.get("bias") else None
    padding = (torch.rand(T, generator=g) < 0.2).cuda() if case.get("padding") else None
    return x, proj, anchors, scale, norm_weight, bias, padding


def run_route(case):
    """Every output and every gradient of one route call (forward, backward, logits, selection)."""
    x, proj, anchors, scale, norm_weight, bias, padding = route_inputs(case)
    leaves = [t.requires_grad_() for t in (x, proj, anchors, scale) + ((norm_weight,) if norm_weight is not None else ())]
    kw = {k: case[k] for k in ("score", "normalize", "num_groups", "topk_groups", "seq_len") if k in case}
    out = l2r_cuda.route(x, proj, anchors, scale, top_k=case["k"], norm_weight=norm_weight, expert_bias=bias,
                         padding_mask=padding, **kw)
    loss = (out.weights * torch.linspace(0.5, 1.5, out.weights.numel(), device="cuda").view_as(out.weights)).sum()
    loss = loss + out.mean_probs.square().sum() + 1e-3 * out.lse.square().sum()
    grads = torch.autograd.grad(loss, leaves)
    logits = l2r_cuda.ops.route_logits(x, proj, anchors, scale, norm_weight=norm_weight)
    (glogits,) = torch.autograd.grad(logits.sin().sum(), [x])
    sel_in = logits.detach().requires_grad_()
    sel = l2r_cuda.ops.route_from_logits(sel_in, case["k"], expert_bias=bias, **kw)
    (gsel,) = torch.autograd.grad(sel.weights.sum() + sel.mean_probs.sum(), [sel_in])
    return [*out, *grads, logits, glogits, *sel, gsel]


def run_permute(seed, dtype, capacity, align):
    g = torch.Generator().manual_seed(seed)
    T, k, E, d = 300, 4, 16, 72
    x = torch.randn(T, d, generator=g).to(dtype).cuda().requires_grad_()
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).cuda()
    w = torch.rand(T, k, generator=g).cuda().requires_grad_()
    p = l2r_cuda.permute(x, idx, E, align=align, capacity=capacity, weights=w if capacity else None)
    y = l2r_cuda.unpermute(p.permuted * 3, p.row_map, w)
    gx, gw = torch.autograd.grad(y.float().square().sum(), [x, w])
    return [*p, y, gx, gw, l2r_cuda.dropped_counts(p.row_map, idx, E)]


_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_BITS[t.element_size()]) if t.is_floating_point() else t


def assert_bitwise(want, got):
    assert len(want) == len(got)
    for i, (a, b) in enumerate(zip(want, got)):
        assert a.dtype == b.dtype and a.shape == b.shape, i
        assert torch.equal(bits(a), bits(b)), f"output {i} differs between the nvcc and NVRTC kernels"


@needs_nvcc_build
@pytest.mark.parametrize("case", ROUTE_CASES, ids=lambda c: f"r{c['r']}-E{c['E']}-d{c['d']}")
def test_route_nvrtc_equals_nvcc_bitwise(case):
    want = run_route(case)
    with use_nvrtc():
        assert l2r_cuda.cuda_backend() == "nvrtc"
        got = run_route(case)
    assert l2r_cuda.cuda_backend() == "nvcc"
    assert_bitwise(want, got)


@needs_nvcc_build
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("capacity,align", [(None, 1), (40, 8)])
def test_permute_nvrtc_equals_nvcc_bitwise(dtype, capacity, align):
    want = run_permute(1, dtype, capacity, align)
    with use_nvrtc():
        got = run_permute(1, dtype, capacity, align)
    assert_bitwise(want, got)


@needs_nvcc_build
def test_nvrtc_kernels_capture_in_cuda_graphs_and_compile():
    case = ROUTE_CASES[1]
    x, proj, anchors, scale, norm_weight, bias, _ = route_inputs(case)
    with use_nvrtc():
        eager = l2r_cuda.route(x, proj, anchors, scale, top_k=4, norm_weight=norm_weight, expert_bias=bias)
        compiled = torch.compile(lambda *a: l2r_cuda.route(*a, top_k=4, norm_weight=norm_weight, expert_bias=bias),
                                 fullgraph=True)
        assert_bitwise(list(eager), list(compiled(x, proj, anchors, scale)))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            l2r_cuda.route(x, proj, anchors, scale, top_k=4, norm_weight=norm_weight, expert_bias=bias)  # warm up
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = l2r_cuda.route(x, proj, anchors, scale, top_k=4, norm_weight=norm_weight, expert_bias=bias)
        graph.replay()
        torch.cuda.synchronize()
        assert_bitwise(list(eager), list(captured))


@pytest.mark.slow
def test_cpu_only_build_serves_cuda_tensors_with_nvrtc(tmp_path):
    """A CPU-only build (L2R_CUDA=0) with cupy on a GPU machine: cuda_backend() == "nvrtc", and route
    on CUDA tensors gives the CPU op's routing."""
    build = tmp_path / "build"
    env = dict(os.environ, L2R_CUDA="0", MAX_JOBS=str(os.cpu_count() or 2))
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib", str(build / "lib"),
                           "--build-temp", str(build / "tmp")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    package = tmp_path / "pkg" / "l2r_cuda"
    shutil.copytree(ROOT / "l2r_cuda", package, ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    shutil.copytree(ROOT / "csrc", package / "csrc")  # where a wheel ships the kernel sources
    for so in (build / "lib" / "l2r_cuda").glob("_C*.so"):
        shutil.copy(so, package / so.name)
    script = (
        "import torch, l2r_cuda\n"
        "assert not l2r_cuda.cuda_built()\n"
        "assert l2r_cuda.cuda_backend() == 'nvrtc', l2r_cuda.jit.status()\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x, proj, anchors = torch.randn(64, 128, generator=g), torch.randn(4, 128, generator=g) / 11, torch.randn(16, 2, 4, generator=g)\n"
        "cpu = l2r_cuda.route(x, proj, anchors, 4.0, top_k=4)\n"
        "gpu = l2r_cuda.route(x.cuda(), proj.cuda(), anchors.cuda(), 4.0, top_k=4)\n"
        "assert torch.equal(cpu.indices, gpu.indices.cpu())\n"
        "torch.testing.assert_close(cpu.weights, gpu.weights.cpu(), rtol=1e-5, atol=1e-6)\n"
        "print('nvrtc ok')\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(tmp_path / "pkg")))
    assert proc.returncode == 0 and "nvrtc ok" in proc.stdout, proc.stdout + proc.stderr
