"""Native route() on CPU against l2r_cuda.reference, driven by tests/route_samples.py."""

from __future__ import annotations

import math

import pytest
import torch

import l2r_cuda
from l2r_cuda import reference
from route_samples import RouteSample, make_sample, sample_inputs, small_samples

SAMPLES = sample_inputs()
IDS = [s.name for s in SAMPLES]


def selection_keys(sample) -> torch.Tensor:
    """The reference's selection keys (probabilities + expert bias), float64-free fp32."""
    kw = sample.kwargs
    logits = reference.route_logits(
        sample.x, sample.proj, sample.anchors, sample.scale, beta=kw["beta"], norm=kw["norm"],
        norm_weight=kw.get("norm_weight"), tau=kw["tau"],
    ).detach()
    probs = torch.softmax(logits, -1) if kw["score"] == "softmax" else torch.sigmoid(logits)
    if kw.get("expert_bias") is not None:
        probs = probs + kw["expert_bias"]
    return probs


def tie_free_tokens(sample, margin=2e-6) -> torch.Tensor:
    """Tokens whose top-(k+1) keys are all separated by more than `margin`: on those the selected
    set and its order are unambiguous, so indices must match the reference exactly."""
    keys = selection_keys(sample)
    k = sample.kwargs["top_k"]
    top = torch.sort(keys, -1, descending=True).values[:, : min(k + 1, keys.shape[1])]
    if top.shape[1] < 2:
        return torch.ones(keys.shape[0], dtype=torch.bool)
    return (top[:, :-1] - top[:, 1:]).min(-1).values > margin


@pytest.mark.parametrize("sample", SAMPLES, ids=IDS)
def test_forward_matches_reference(sample):
    out = l2r_cuda.route(*sample.args(), **sample.kwargs)
    ref = reference.route(*sample.args(), **sample.kwargs)
    T, k = sample.x.shape[0], sample.kwargs["top_k"]
    E = sample.anchors.shape[0]
    assert out.weights.shape == (T, k) and out.weights.dtype == torch.float32
    assert out.indices.shape == (T, k) and out.indices.dtype == torch.int64
    assert out.tokens_per_expert.shape == (E,) and out.tokens_per_expert.dtype == torch.int64
    assert out.mean_probs.shape == (E,) and out.lse.shape == (T,)
    clean = tie_free_tokens(sample)
    assert clean.float().mean() >= 0.5 if T else True, "sample has too many near-ties to be useful"
    assert torch.equal(out.indices[clean], ref.indices[clean])
    # Near-tie tokens: whatever was picked must carry (within fp32 noise) the reference's keys.
    keys = selection_keys(sample)
    torch.testing.assert_close(keys.gather(1, out.indices), keys.gather(1, ref.indices),
                               atol=2e-6, rtol=0)
    torch.testing.assert_close(out.weights[clean], ref.weights[clean], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.lse, ref.lse, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out.mean_probs, ref.mean_probs, atol=1e-6, rtol=1e-5)
    assert torch.equal(out.tokens_per_expert,
                       torch.bincount(out.indices.reshape(-1), minlength=E))


def _grad_tolerance(our: torch.Tensor, ref32: torch.Tensor, dtype: torch.dtype) -> float:
    """fp32 math everywhere, so an fp32 gradient matches the fp32 reference to rounding noise; a
    low-precision gradient is one rounding of the fp32 one, so it may be off by twice the error of
    PyTorch's own cast of the reference gradient to that dtype. The absolute floor covers
    gradients that are zero in exact arithmetic (e.g. r = 1 with beta = 0)."""
    scale = ref32.abs().max().item()
    tol = 2e-4 * scale + 1e-5
    if dtype != torch.float32:
        tol += 2 * (ref32.to(dtype).float() - ref32).abs().max().item()
    return tol


def _outputs_loss(out, seed):
    g = torch.Generator().manual_seed(seed)
    gw = torch.randn(out.weights.shape, generator=g)
    gm = torch.randn(out.mean_probs.shape, generator=g)
    gl = torch.randn(out.lse.shape, generator=g)
    return (out.weights * gw).sum() + (out.mean_probs * gm).sum() + (out.lse * gl).sum()


@pytest.mark.parametrize("sample", SAMPLES, ids=IDS)
def test_gradients_match_reference(sample):
    # Gradients are only comparable where both select the same experts: keep the tie-free tokens.
    clean = tie_free_tokens(sample)
    sample = RouteSample(sample.name, sample.x[clean], sample.proj, sample.anchors, sample.scale,
                         sample.kwargs)
    s = sample.with_grad()
    kw = s.kwargs
    out = l2r_cuda.route(*s.args(), **kw)
    params = [s.x, s.proj, s.anchors, s.scale] + ([kw["norm_weight"]] if kw.get("norm_weight") is not None else [])
    if s.x.shape[0] == 0:
        grads = torch.autograd.grad(_outputs_loss(out, 0), params, allow_unused=True)
        for g in grads:
            assert g is None or not g.any()
        return
    grads = torch.autograd.grad(_outputs_loss(out, 0), params)
    # The reference in fp32 end to end (x upcast as its own leaf) gives the fp32 gradients.
    params32 = [p.detach().float().requires_grad_() for p in params]
    kw32 = dict(kw, norm_weight=params32[4] if len(params32) > 4 else None)
    ref = reference.route(*params32[:4], **kw32)
    ref_grads = torch.autograd.grad(_outputs_loss(ref, 0), params32, allow_unused=True)
    for name, g, rg, p in zip(["x", "proj", "anchors", "scale", "norm_weight"], grads, ref_grads, params):
        assert g.dtype == p.dtype and g.shape == p.shape, name
        rg = torch.zeros_like(p, dtype=torch.float32) if rg is None else rg  # unused norm_weight
        tol = _grad_tolerance(g, rg, p.dtype)
        err = (g.float() - rg).abs().max().item()
        assert err <= tol, f"grad of {name}: max error {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("sample", small_samples(), ids=[s.name for s in small_samples()])
def test_opcheck(sample):
    s = sample.with_grad()
    kw = s.kwargs
    args = (s.x, s.proj, s.anchors, s.scale, kw.get("norm_weight"), kw.get("expert_bias"),
            kw["top_k"], kw["beta"], kw["norm"], 1e-6, 1e-6, kw["tau"], kw["score"], kw["normalize"])
    torch.library.opcheck(torch.ops.l2r_cuda.route_forward.default, args)


GRADCHECK_CASES = [
    dict(T=4, d=6, r=2, E=5, H=3, k=2, beta=1.0, score="softmax", normalize=False, norm_weight=True),
    dict(T=3, d=5, r=3, E=4, H=1, k=3, beta=0.5, score="sigmoid", normalize=True, norm_weight=False),
    dict(T=5, d=4, r=1, E=3, H=2, k=1, beta=0.0, score="softmax", normalize=True, norm_weight=True),
    dict(T=3, d=7, r=2, E=6, H=2, k=2, beta=1.0, score="sigmoid", normalize=False, norm=None,
         norm_weight=False),
]


@pytest.mark.parametrize("case", GRADCHECK_CASES)
def test_gradcheck_float64(case):
    case = dict(case)
    T, d, r, E, H, k = (case.pop(n) for n in ("T", "d", "r", "E", "H", "k"))
    norm = case.pop("norm", "rms")
    use_g = case.pop("norm_weight")
    g = torch.Generator().manual_seed(7)
    x = torch.randn(T, d, generator=g, dtype=torch.float64, requires_grad=True)
    proj = torch.randn(r, d, generator=g, dtype=torch.float64, requires_grad=True)
    anchors = torch.randn(E, H, r, generator=g, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    nw = (0.5 + torch.rand(d, generator=g, dtype=torch.float64)).requires_grad_() if use_g else None
    inputs = (x, proj, anchors, scale) + ((nw,) if use_g else ())

    def fn(x, proj, anchors, scale, *rest):
        out = l2r_cuda.route(x, proj, anchors, scale, top_k=k, norm=norm,
                             norm_weight=rest[0] if rest else None, **case)
        return out.weights, out.mean_probs, out.lse

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_compile_fullgraph_router():
    torch.manual_seed(0)
    router = l2r_cuda.L2RRouter(32, 8, 2, rank=2, num_anchors=4)
    x = torch.randn(2, 5, 32, requires_grad=True)
    compiled = torch.compile(router, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    eager = router(x)
    assert torch.equal(out.indices, eager.indices)
    torch.testing.assert_close(out.weights, eager.weights)
    (out.weights.sum() + out.lse.sum()).backward()
    assert x.grad is not None and router.proj.grad is not None and router.anchors.grad is not None


def test_compile_fullgraph_inductor():
    torch.manual_seed(1)
    router = l2r_cuda.L2RRouter(16, 4, 2, rank=2, num_anchors=2)
    x = torch.randn(6, 16)
    out = torch.compile(router, fullgraph=True)(x)
    ref = router(x)
    assert torch.equal(out.indices, ref.indices)
    torch.testing.assert_close(out.weights, ref.weights)


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument and the value received.
# ---------------------------------------------------------------------------------------------

def _good():
    return make_sample(3, 8, 2, 4, 2, 2).args()


@pytest.mark.parametrize("mutate, kwargs, exc, match", [
    (lambda a: (a[0][0, 0],) + a[1:], {}, ValueError, r"x must be a tensor \[\.\.\., d\], got Tensor with shape \(\)"),
    (lambda a: (a[0][:, :5],) + a[1:], {}, Exception, r"proj is \[r, d\] = \[2, 8\] but x has d = 5"),
    (lambda a: a[:2] + (torch.randn(4, 2, 3),) + a[3:], {}, Exception, r"rank r = 2"),
    (lambda a: a, {"top_k": 0}, Exception, r"top_k must be in \[1, E\] = \[1, 4\], got 0"),
    (lambda a: a, {"top_k": 5}, Exception, r"top_k must be in \[1, E\] = \[1, 4\], got 5"),
    (lambda a: a, {"beta": 1.5}, Exception, r"beta must be in \[0, 1\], got 1.5"),
    (lambda a: a, {"beta": -0.1}, Exception, r"beta must be in \[0, 1\], got -0.1"),
    (lambda a: a, {"score": "relu"}, ValueError, r"score must be 'softmax' or 'sigmoid', got 'relu'"),
    (lambda a: a, {"norm": "layer"}, ValueError, r"norm must be 'rms' or None, got 'layer'"),
    (lambda a: (a[0].to(torch.int32),) + a[1:], {}, Exception, r"x must be float32.*got Int"),
    (lambda a: (a[0].to(torch.complex64),) + a[1:], {}, Exception, r"x must be float32.*got ComplexFloat"),
    (lambda a: (a[0], a[1].to("meta")) + a[2:], {}, ValueError, r"proj is on meta but x is on cpu"),
    (lambda a: a[:3] + (torch.ones(2),), {}, Exception, r"scale must hold one value, got shape \[2\]"),
    (lambda a: a, {"norm_weight": torch.ones(7)}, Exception, r"norm_weight must be \[d\] = \[8\], got shape \[7\]"),
    (lambda a: a, {"expert_bias": torch.ones(3)}, Exception, r"expert_bias must be \[E\] = \[4\], got shape \[3\]"),
    (lambda a: a, {"tau": 0.0}, Exception, r"tau must be > 0, got 0"),
])
def test_bad_input_errors(mutate, kwargs, exc, match):
    kw = {"top_k": 2, **kwargs}
    with pytest.raises(exc, match=match):
        l2r_cuda.route(*mutate(_good()), **kw)


def test_bad_top_k_type():
    with pytest.raises(TypeError, match="top_k must be an int, got 2.0"):
        l2r_cuda.route(*_good(), top_k=2.0)


def test_router_rejects_bad_config():
    with pytest.raises(ValueError, match=r"top_k must be in \[1, num_experts=4\], got 5"):
        l2r_cuda.L2RRouter(8, 4, 5)
    with pytest.raises(ValueError, match="beta must be in"):
        l2r_cuda.L2RRouter(8, 4, 2, beta=2.0)


# ---------------------------------------------------------------------------------------------
# Layout, empty input, non-finite values, determinism.
# ---------------------------------------------------------------------------------------------

def test_non_contiguous_inputs():
    s = make_sample(9, 24, 4, 6, 2, 2, norm_weight=True, bias=True)
    x_t = s.x.t().contiguous().t()  # same values, column-major
    proj_t = s.proj.t().contiguous().t()
    anchors_nc = s.anchors.transpose(0, 1).contiguous().transpose(0, 1)
    x_strided = torch.zeros(9, 48)[:, ::2]
    x_strided.copy_(s.x)
    for x in (x_t, x_strided):
        assert not x.is_contiguous()
        out = l2r_cuda.route(x, proj_t, anchors_nc, s.scale, **s.kwargs)
        ref = l2r_cuda.route(*s.args(), **s.kwargs)
        assert torch.equal(out.indices, ref.indices)
        assert torch.equal(out.weights, ref.weights)


def test_leading_dims_flatten():
    s = make_sample(12, 16, 2, 8, 2, 2)
    out = l2r_cuda.route(s.x.view(3, 4, 16), *s.args()[1:], **s.kwargs)
    ref = l2r_cuda.route(*s.args(), **s.kwargs)
    assert out.weights.shape == (12, 2)
    assert torch.equal(out.weights, ref.weights)


def test_empty_tokens():
    s = make_sample(0, 16, 2, 8, 4, 3, norm_weight=True).with_grad()
    out = l2r_cuda.route(*s.args(), **s.kwargs)
    assert out.weights.shape == (0, 3) and out.indices.shape == (0, 3) and out.lse.shape == (0,)
    assert torch.equal(out.tokens_per_expert, torch.zeros(8, dtype=torch.int64))
    assert torch.equal(out.mean_probs, torch.zeros(8))
    out.mean_probs.sum().backward()
    assert torch.equal(s.proj.grad, torch.zeros_like(s.proj))


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_non_finite_tokens_keep_indices_valid(score):
    s = make_sample(6, 16, 2, 10, 2, 4)
    x = s.x.clone()
    x[0, 3] = float("nan")
    x[1] = float("inf")
    x[2, 0] = -float("inf")
    x[3] = 0.0
    x[4] = 1e30
    anchors = s.anchors.clone()
    anchors[7, 0, 0] = float("nan")  # one poisoned expert
    out = l2r_cuda.route(x, s.proj, anchors, s.scale, top_k=4, score=score)
    assert ((out.indices >= 0) & (out.indices < 10)).all()
    for row in out.indices:
        assert len(set(row.tolist())) == 4
    assert torch.isnan(out.weights[0]).all()  # a NaN token's weights stay NaN for the caller
    ref = reference.route(x, s.proj, anchors, s.scale, top_k=4, score=score)
    assert torch.equal(out.indices, ref.indices)
    assert torch.equal(out.tokens_per_expert, torch.bincount(out.indices.reshape(-1), minlength=10))


def test_nan_ranks_below_every_number():
    # Expert 1 is NaN for every token (NaN anchor); it must never beat a real score.
    s = make_sample(20, 16, 2, 4, 1, 3, score="sigmoid")
    anchors = s.anchors.clone()
    anchors[1, 0, 0] = float("nan")
    out = l2r_cuda.route(s.x, s.proj, anchors, s.scale, top_k=3, score="sigmoid")
    assert (out.indices != 1).all()
    out4 = l2r_cuda.route(s.x, s.proj, anchors, s.scale, top_k=4, score="sigmoid")
    assert (out4.indices[:, 3] == 1).all()


def test_ties_go_to_lower_index():
    # Experts 2, 3 and 5 share one anchor, so their scores are bitwise equal for every token.
    s = make_sample(40, 16, 2, 6, 1, 3)
    anchors = s.anchors.clone()
    anchors[3] = anchors[5] = anchors[2]
    out = l2r_cuda.route(s.x, s.proj, anchors, s.scale, top_k=3)
    ref = reference.route(s.x, s.proj, anchors, s.scale, top_k=3)
    assert torch.equal(out.indices, ref.indices)
    saw_partial = False
    for row in out.indices.tolist():
        tied = [i for i in row if i in (2, 3, 5)]
        assert tied == [2, 3, 5][: len(tied)]  # in index order, lowest indices kept
        saw_partial |= 0 < len(tied) < 3
    assert saw_partial  # the case where the tie decides who is in
    # All experts identical: every token takes 0, 1, 2.
    same = anchors[:1].expand(6, 1, 2).contiguous()
    out = l2r_cuda.route(s.x, s.proj, same, s.scale, top_k=3)
    assert torch.equal(out.indices, torch.tensor([[0, 1, 2]]).expand(40, 3))


def test_batch_independence():
    s = make_sample(50, 32, 4, 16, 4, 4, norm_weight=True, bias=True)
    full = l2r_cuda.route(*s.args(), **s.kwargs)
    for t in (0, 17, 49):
        one = l2r_cuda.route(s.x[t:t + 1], *s.args()[1:], **s.kwargs)
        assert torch.equal(one.weights[0], full.weights[t])
        assert torch.equal(one.indices[0], full.indices[t])
        assert torch.equal(one.lse[0], full.lse[t])


def _grads_with_threads(sample, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        s = sample.with_grad()
        out = l2r_cuda.route(*s.args(), **s.kwargs)
        params = [s.x, s.proj, s.anchors, s.scale, s.kwargs["norm_weight"]]
        grads = torch.autograd.grad(_outputs_loss(out, 3), params)
        return [out.weights, out.mean_probs, out.lse] + list(grads)
    finally:
        torch.set_num_threads(before)


def test_deterministic_across_runs_and_threads():
    sample = make_sample(3000, 64, 8, 32, 4, 4, norm_weight=True, bias=True)
    first = _grads_with_threads(sample, 1)
    again = _grads_with_threads(sample, 1)
    two = _grads_with_threads(sample, 2)
    for a, b, c in zip(first, again, two):
        assert torch.equal(a, b)
        assert torch.equal(a, c)


def test_router_module_matches_functional():
    torch.manual_seed(0)
    router = l2r_cuda.L2RRouter(32, 8, 2, rank=2, num_anchors=4)
    x = torch.randn(10, 32)
    out = router(x)
    ref = reference.route(x, router.proj, router.anchors, router.scale, top_k=2,
                          norm_weight=router.norm_weight, expert_bias=router.expert_bias)
    assert torch.equal(out.indices, ref.indices)
    torch.testing.assert_close(out.weights, ref.weights)
    assert router.expert_bias.dtype == torch.float32 and not router.expert_bias.requires_grad
    assert math.isclose(router.scale.item(), router.init_scale)
    # orthonormal rows at init
    torch.testing.assert_close(router.proj @ router.proj.t(), torch.eye(2), atol=1e-5, rtol=0)


def test_expert_bias_steers_selection_only():
    s = make_sample(16, 16, 2, 8, 2, 2)
    bias = torch.zeros(8)
    bias[6] = 10.0
    out = l2r_cuda.route(*s.args(), top_k=2, expert_bias=bias)
    plain = l2r_cuda.route(*s.args(), top_k=2)
    assert (out.indices[:, 0] == 6).all()
    torch.testing.assert_close(out.mean_probs, plain.mean_probs)  # probabilities unchanged


def test_backward_op_checks_gradient_shapes():
    s = make_sample(5, 8, 2, 4, 2, 2)
    w, idx, _, _, _, q, rstd = torch.ops.l2r_cuda.route_forward(
        s.x, s.proj, s.anchors, s.scale, None, None, 2, 1.0, "rms", 1e-6, 1e-6, 1.0, "softmax", False)
    args = (s.x, s.proj, s.anchors, s.scale, None, idx, q, rstd, 1.0, "rms", 1e-6, 1.0, "softmax", False)
    with pytest.raises(RuntimeError, match=r"grad_weights must be \[T, k\] = \[5, 2\], got \[5, 3\]"):
        torch.ops.l2r_cuda.route_backward(torch.ones(5, 3), None, None, *args)
    with pytest.raises(RuntimeError, match=r"grad_mean_probs must be \[E\] = \[4\], got \[3\]"):
        torch.ops.l2r_cuda.route_backward(None, torch.ones(3), None, *args)
    with pytest.raises(RuntimeError, match=r"grad_lse must be \[T\] = \[5\], got \[6\]"):
        torch.ops.l2r_cuda.route_backward(None, None, torch.ones(6), *args)


def test_portable_cpu_path_matches_reference():
    """The portable CPU kernel (what non-AVX2 CPUs run) is built on the route_math.cuh helpers the
    CUDA kernels share: run the forward and gradient comparisons again on it."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, L2R_CPU_PORTABLE="1")
    here = os.path.dirname(os.path.abspath(__file__))
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", os.path.join(here, "test_route.py"),
         "-k", "forward_matches_reference or gradients_match_reference or non_finite or ties or deterministic"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout
