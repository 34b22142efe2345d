"""The route ops on every backend (tests/backends.py: CPU per instruction set, the CUDA kernels in
the SIMT emulator, a real GPU) against l2r_cuda.reference, driven by the sample lists of
tests/route_samples.py: forward, gradients and opcheck per op."""

from __future__ import annotations

import math

import pytest
import torch

import l2r_cuda
from l2r_cuda import reference
from route_samples import RouteSample, logits_samples, make_sample, sample_inputs, select_samples

SAMPLES = sample_inputs()
LOGIT_SAMPLES = logits_samples()
SELECT_SAMPLES = select_samples()


def _on(sample: RouteSample, backend) -> RouteSample:
    return sample.to(backend.device)


def _skip_float64(backend, dtype):
    if dtype == torch.float64 and not backend.float64:
        pytest.skip(f"{backend.name} computes in float32 only")


def _group_kwargs(kw):
    return {k: kw[k] for k in ("num_groups", "topk_groups", "group_score") if k in kw}


def selection_keys(logits: torch.Tensor, kw: dict) -> torch.Tensor:
    """The reference's selection keys (probabilities + expert bias) in float32, -inf outside the
    kept groups."""
    probs = torch.softmax(logits, -1) if kw.get("score", "softmax") == "softmax" else torch.sigmoid(logits)
    if kw.get("expert_bias") is not None:
        probs = probs + kw["expert_bias"].to(probs.dtype)
    if kw.get("num_groups"):
        probs, _ = reference.group_limited_keys(probs, kw["num_groups"], kw["topk_groups"], kw.get("group_score", "top2_sum"))
    return probs


def tie_free(keys: torch.Tensor, kw: dict, margin=2e-6) -> torch.Tensor:
    """Tokens whose top-(k+1) keys are all separated by more than `margin` (with groups: among the
    kept groups' experts, see also group_tie_free): on those the selection is unambiguous, so
    indices must match the reference exactly."""
    k = kw["top_k"]
    top = torch.sort(keys, -1, descending=True).values[:, : min(k + 1, keys.shape[1])]
    clean = torch.ones(keys.shape[0], dtype=torch.bool)
    if top.shape[1] >= 2:
        gaps = top[:, :-1] - top[:, 1:]
        gaps = torch.where(torch.isinf(top[:, 1:]), torch.full_like(gaps, math.inf), gaps)
        clean = gaps.min(-1).values > margin
    return clean


def group_tie_free(logits: torch.Tensor, kw: dict, margin=2e-6) -> torch.Tensor:
    """With groups: tokens whose group scores around the kept/dropped cut differ by > margin."""
    if not kw.get("num_groups") or kw["topk_groups"] >= kw["num_groups"]:
        return torch.ones(logits.shape[0], dtype=torch.bool)
    keys = selection_keys(logits, {k: v for k, v in kw.items() if k not in ("num_groups", "topk_groups")})
    T, E = keys.shape
    G, g = kw["num_groups"], kw["topk_groups"]
    best = torch.sort(keys.reshape(T, G, E // G), -1, descending=True).values
    scores = best[..., 0] if kw.get("group_score") == "max" else best[..., 0] + best[..., 1]
    ranked = torch.sort(scores, -1, descending=True).values
    return (ranked[:, g - 1] - ranked[:, g]) > margin


def reference_logits(sample: RouteSample) -> torch.Tensor:
    kw = sample.kwargs
    return reference.route_logits(sample.x.cpu(), sample.proj.cpu(), sample.anchors.cpu(), sample.scale.cpu(),
                                  beta=kw["beta"], norm=kw["norm"],
                                  norm_weight=None if kw.get("norm_weight") is None else kw["norm_weight"].cpu(),
                                  tau=kw["tau"]).detach().float()


def _cpu_kw(kw):
    return {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def check_routing(out, ref, logits, kw, *, weights_tol=1e-5):
    """Indices exact on unambiguous tokens, near-ties carry the reference's keys, and the rest."""
    T, k = logits.shape[0], kw["top_k"]
    keys = selection_keys(logits, kw)
    clean = tie_free(keys, kw) & group_tie_free(logits, kw)
    assert clean.float().mean() >= 0.5 if T else True, "sample has too many near-ties to be useful"
    indices = out.indices.cpu()
    assert indices.shape == (T, k) and indices.dtype == torch.int64
    assert torch.equal(indices[clean], ref.indices[clean])
    torch.testing.assert_close(keys.gather(1, indices), keys.gather(1, ref.indices), atol=2e-6, rtol=0)
    torch.testing.assert_close(out.weights.cpu()[clean], ref.weights.detach()[clean], atol=weights_tol,
                               rtol=weights_tol)
    torch.testing.assert_close(out.lse.cpu(), ref.lse.detach(), atol=2e-5, rtol=1e-5)
    assert out.mean_probs.shape == ref.mean_probs.shape and out.tokens_per_expert.shape == ref.tokens_per_expert.shape
    if bool(clean.all()):
        assert torch.equal(out.tokens_per_expert.cpu(), ref.tokens_per_expert)
    torch.testing.assert_close(out.mean_probs.cpu().float(), ref.mean_probs.detach().float(), atol=1e-6, rtol=1e-5)
    return clean


# ---------------------------------------------------------------------------------------------
# route(): forward, gradients, opcheck on every backend
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sample", SAMPLES, ids=[s.name for s in SAMPLES])
def test_route_forward_matches_reference(backend, sample):
    _skip_float64(backend, sample.x.dtype)
    s = _on(sample, backend)
    out = backend.route(*s.args(), **s.kwargs)
    ref = reference.route(*sample.args(), **sample.kwargs)
    assert out.weights.dtype == (torch.float64 if sample.x.dtype == torch.float64 else torch.float32)
    check_routing(out, ref, reference_logits(sample), sample.kwargs)


def _outputs_loss(out, seed):
    g = torch.Generator().manual_seed(seed)
    gw = torch.randn(out.weights.shape, generator=g).to(out.weights)
    gm = torch.randn(out.mean_probs.shape, generator=g).to(out.mean_probs)
    gl = torch.randn(out.lse.shape, generator=g).to(out.lse)
    return (out.weights * gw).sum() + (out.mean_probs * gm).sum() + (out.lse * gl).sum()


def _grad_tolerance(ref32: torch.Tensor, dtype: torch.dtype) -> float:
    """fp32 math everywhere, so an fp32 gradient matches the fp32 reference to rounding noise; a
    low-precision gradient is one rounding of the fp32 one, so it may be off by twice the error of
    PyTorch's own cast of the reference gradient to that dtype. The absolute floor covers
    gradients that are zero in exact arithmetic (e.g. r = 1 with beta = 0)."""
    scale = ref32.abs().max().item() if ref32.numel() else 0.0
    tol = 2e-4 * scale + 1e-5
    if dtype not in (torch.float32, torch.float64):
        tol += 2 * (ref32.to(dtype).float() - ref32).abs().max().item()
    return tol


def _compare_grads(grads, ref_grads, params, names):
    for name, g, rg, p in zip(names, grads, ref_grads, params):
        assert g is not None and g.dtype == p.dtype and g.shape == p.shape, name
        # the reference runs on the CPU (p may be a CUDA tensor)
        rg = torch.zeros(p.shape, dtype=torch.float32) if rg is None else rg.float()
        tol = _grad_tolerance(rg, p.dtype)
        err = (g.cpu().float() - rg).abs().max().item() if g.numel() else 0.0
        assert err <= tol, f"grad of {name}: max error {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("sample", SAMPLES, ids=[s.name for s in SAMPLES])
def test_route_gradients_match_reference(backend, sample):
    _skip_float64(backend, sample.x.dtype)
    logits = reference_logits(sample)
    kw = sample.kwargs
    clean = tie_free(selection_keys(logits, kw), kw) & group_tie_free(logits, kw)
    if not bool(clean.all()):
        # Gradients are only comparable where both select the same experts. Statistics per
        # sequence or over a padding mask need the whole batch: such samples are tie-free.
        assert "seq_len" not in kw and "padding_mask" not in kw, "policy sample with near-ties"
        sample = RouteSample(sample.name, sample.x[clean], sample.proj, sample.anchors, sample.scale, kw)
    s = _on(sample, backend).with_grad()
    names = ["x", "proj", "anchors", "scale", "norm_weight"]
    params = [s.x, s.proj, s.anchors, s.scale] + ([s.kwargs["norm_weight"]] if s.kwargs.get("norm_weight") is not None else [])
    out = backend.route(*s.args(), **s.kwargs)
    if s.x.shape[0] == 0:
        grads = torch.autograd.grad(_outputs_loss(out, 0), params, allow_unused=True)
        for g in grads:
            assert g is None or not g.any()
        return
    grads = torch.autograd.grad(_outputs_loss(out, 0), params)
    # The reference in fp32 end to end (x upcast as its own leaf) gives the fp32 gradients.
    math_dtype = torch.float64 if sample.x.dtype == torch.float64 else torch.float32
    params_ref = [p.detach().cpu().to(math_dtype).requires_grad_() for p in params]
    kw_ref = dict(_cpu_kw(sample.kwargs), norm_weight=params_ref[4] if len(params_ref) > 4 else None)
    ref = reference.route(*params_ref[:4], **kw_ref)
    ref_grads = torch.autograd.grad(_outputs_loss(ref, 0), params_ref, allow_unused=True)
    _compare_grads(grads, ref_grads, params, names)


def _small(samples):
    return [s for s in samples if s.x.shape[0] <= 7]


@pytest.mark.parametrize("sample", _small(SAMPLES), ids=[s.name for s in _small(SAMPLES)])
def test_route_opcheck(backend, sample):
    if not backend.opcheck:
        pytest.skip(f"{backend.name} is not a torch op")
    s = _on(sample, backend).with_grad()
    kw = s.kwargs
    groups = l2r_cuda.types.group_args(kw.get("num_groups"), kw.get("topk_groups"), kw.get("group_score", "top2_sum"))
    args = (s.x, s.proj, s.anchors, s.scale, kw.get("norm_weight"), kw.get("expert_bias"), kw.get("padding_mask"),
            kw["top_k"], kw["beta"], kw["norm"], 1e-6, 1e-6, kw["tau"], kw["score"], kw["normalize"], *groups,
            kw.get("routed_scaling_factor", 1.0), kw.get("seq_len") or 0)
    torch.library.opcheck(torch.ops.l2r_cuda.route_forward.default, args)


# ---------------------------------------------------------------------------------------------
# route_logits()
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sample", LOGIT_SAMPLES, ids=[s.name for s in LOGIT_SAMPLES])
def test_route_logits_matches_reference(backend, sample):
    _skip_float64(backend, sample.x.dtype)
    s = _on(sample, backend).with_grad()
    kw = s.scoring_kwargs()
    params = [s.x, s.proj, s.anchors, s.scale] + ([kw["norm_weight"]] if "norm_weight" in kw else [])
    logits = backend.route_logits(*s.args(), **kw)
    ref_params = [p.detach().cpu().float().requires_grad_() for p in params]
    ref_kw = dict(_cpu_kw(kw), norm_weight=ref_params[4] if len(ref_params) > 4 else None)
    ref = reference.route_logits(*ref_params[:4], **ref_kw)
    assert logits.shape == ref.shape and logits.dtype == torch.float32
    torch.testing.assert_close(logits.cpu(), ref.detach(), atol=2e-5, rtol=1e-5)
    if logits.shape[0] == 0:
        return
    g = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad((logits * g.to(logits)).sum(), params)
    ref_grads = torch.autograd.grad((ref * g).sum(), ref_params, allow_unused=True)
    _compare_grads(grads, ref_grads, params, ["x", "proj", "anchors", "scale", "norm_weight"])


@pytest.mark.parametrize("sample", _small(LOGIT_SAMPLES), ids=[s.name for s in _small(LOGIT_SAMPLES)])
def test_route_logits_opcheck(backend, sample):
    if not backend.opcheck:
        pytest.skip(f"{backend.name} is not a torch op")
    s = _on(sample, backend).with_grad()
    kw = s.kwargs
    args = (s.x, s.proj, s.anchors, s.scale, kw.get("norm_weight"), kw["beta"], kw["norm"], 1e-6, 1e-6, kw["tau"])
    torch.library.opcheck(torch.ops.l2r_cuda.route_logits.default, args)


# ---------------------------------------------------------------------------------------------
# route_from_logits() (route_select): the linear router's routing
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, logits, kw", SELECT_SAMPLES, ids=[s[0] for s in SELECT_SAMPLES])
def test_route_from_logits_matches_reference(backend, name, logits, kw):
    dev = backend.device
    x = logits.to(dev).detach().requires_grad_()
    dkw = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    top_k = dkw.pop("top_k")
    out = backend.route_from_logits(x, top_k, **dkw)
    ref_x = logits.detach().float().requires_grad_()
    ref = reference.route_from_logits(ref_x, top_k, **_cpu_kw(dkw))
    clean = check_routing(out, ref, logits.float(), kw)
    if logits.shape[0] == 0 or not bool(clean.all()):
        return
    grads = torch.autograd.grad(_outputs_loss(out, 1), [x])
    ref_grads = torch.autograd.grad(_outputs_loss(ref, 1), [ref_x])
    _compare_grads(grads, ref_grads, [x], ["logits"])


@pytest.mark.parametrize("name, logits, kw", [s for s in SELECT_SAMPLES if s[1].shape[0] <= 7],
                         ids=[s[0] for s in SELECT_SAMPLES if s[1].shape[0] <= 7])
def test_route_select_opcheck(backend, name, logits, kw):
    if not backend.opcheck:
        pytest.skip(f"{backend.name} is not a torch op")
    x = logits.to(backend.device).detach().requires_grad_()
    groups = l2r_cuda.types.group_args(kw.get("num_groups"), kw.get("topk_groups"), kw.get("group_score", "top2_sum"))
    bias = kw.get("expert_bias")
    args = (x, None if bias is None else bias.to(x.device), None, kw["top_k"], kw["score"], kw["normalize"], *groups,
            kw.get("routed_scaling_factor", 1.0), kw.get("seq_len") or 0)
    torch.library.opcheck(torch.ops.l2r_cuda.route_select.default, args)


# ---------------------------------------------------------------------------------------------
# float64 gradcheck of the native ops (the CPU backends compute float64 in float64)
# ---------------------------------------------------------------------------------------------

GRADCHECK_CASES = [
    dict(T=4, d=6, r=2, E=5, H=3, k=2, beta=1.0, score="softmax", normalize=False, norm_weight=True),
    dict(T=3, d=5, r=3, E=4, H=1, k=3, beta=0.5, score="sigmoid", normalize=True, norm_weight=False),
    dict(T=5, d=4, r=1, E=3, H=2, k=1, beta=0.0, score="softmax", normalize=True, norm_weight=True),
    dict(T=3, d=7, r=2, E=6, H=2, k=2, beta=1.0, score="sigmoid", normalize=False, norm=None,
         norm_weight=False),
    dict(T=6, d=5, r=2, E=8, H=2, k=3, beta=1.0, score="sigmoid", normalize=True, norm_weight=True,
         num_groups=4, topk_groups=2, routed_scaling_factor=2.5, seq_len=3,
         padding_mask=torch.tensor([False, True, False, False, False, True])),
]


@pytest.mark.parametrize("case", GRADCHECK_CASES)
def test_gradcheck_float64(backend, case):
    _skip_float64(backend, torch.float64)
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
        out = backend.route(x, proj, anchors, scale, top_k=k, norm=norm, norm_weight=rest[0] if rest else None, **case)
        return out.weights, out.mean_probs, out.lse

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)

    def logits_fn(x, proj, anchors, scale, *rest):
        return backend.route_logits(x, proj, anchors, scale, norm=norm, norm_weight=rest[0] if rest else None,
                                    beta=case.get("beta", 1.0))

    assert torch.autograd.gradcheck(logits_fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)
    select_kw = {n: case[n] for n in ("score", "normalize", "num_groups", "topk_groups", "routed_scaling_factor",
                                      "seq_len", "padding_mask") if n in case}
    logits = (2 * torch.randn(T, E, generator=g, dtype=torch.float64)).requires_grad_()

    def select_fn(logits):
        out = backend.route_from_logits(logits, k, **select_kw)
        return out.weights, out.mean_probs, out.lse

    assert torch.autograd.gradcheck(select_fn, (logits,), eps=1e-6, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Selection order, non-finite values, hardening: on every backend
# ---------------------------------------------------------------------------------------------

def test_ties_go_to_lower_index(backend):
    # Experts 2, 3 and 5 share one anchor, so their scores are bitwise equal for every token.
    s = make_sample(40, 16, 2, 6, 1, 3)
    anchors = s.anchors.clone()
    anchors[3] = anchors[5] = anchors[2]
    dev = backend.device
    out = backend.route(s.x.to(dev), s.proj.to(dev), anchors.to(dev), s.scale.to(dev), top_k=3)
    ref = reference.route(s.x, s.proj, anchors, s.scale, top_k=3)
    assert torch.equal(out.indices.cpu(), ref.indices)
    saw_partial = False
    for row in out.indices.tolist():
        tied = [i for i in row if i in (2, 3, 5)]
        assert tied == [2, 3, 5][: len(tied)]  # in index order, lowest indices kept
        saw_partial |= 0 < len(tied) < 3
    assert saw_partial  # the case where the tie decides who is in
    same = anchors[:1].expand(6, 1, 2).contiguous()
    out = backend.route(s.x.to(dev), s.proj.to(dev), same.to(dev), s.scale.to(dev), top_k=3)
    assert torch.equal(out.indices.cpu(), torch.tensor([[0, 1, 2]]).expand(40, 3))


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_non_finite_tokens_keep_indices_valid(backend, score):
    s = make_sample(6, 16, 2, 10, 2, 4)
    x = s.x.clone()
    x[0, 3] = float("nan")
    x[1] = float("inf")
    x[2, 0] = -float("inf")
    x[3] = 0.0
    x[4] = 1e30
    anchors = s.anchors.clone()
    anchors[7, 0, 0] = float("nan")  # one poisoned expert
    dev = backend.device
    out = backend.route(x.to(dev), s.proj.to(dev), anchors.to(dev), s.scale.to(dev), top_k=4, score=score)
    indices = out.indices.cpu()
    assert ((indices >= 0) & (indices < 10)).all()
    for row in indices:
        assert len(set(row.tolist())) == 4
    assert torch.isnan(out.weights[0]).all()  # a NaN token's weights stay NaN for the caller
    ref = reference.route(x, s.proj, anchors, s.scale, top_k=4, score=score)
    assert torch.equal(indices, ref.indices)
    assert torch.equal(out.tokens_per_expert.cpu(), torch.bincount(indices.reshape(-1), minlength=10))


def test_nan_ranks_below_every_number(backend):
    # Expert 1 is NaN for every token (NaN anchor); it must never beat a real score.
    s = make_sample(20, 16, 2, 4, 1, 3, score="sigmoid")
    anchors = s.anchors.clone()
    anchors[1, 0, 0] = float("nan")
    dev = backend.device
    args = (s.x.to(dev), s.proj.to(dev), anchors.to(dev), s.scale.to(dev))
    out = backend.route(*args, top_k=3, score="sigmoid")
    assert (out.indices.cpu() != 1).all()
    out4 = backend.route(*args, top_k=4, score="sigmoid")
    assert (out4.indices.cpu()[:, 3] == 1).all()


def test_excluded_groups_are_never_selected(backend):
    # Group 0 (experts 0-3) always has the largest single key but the smallest top-2 sum: V3's
    # group score drops it, so none of its experts may be chosen, whatever their keys; V2's "max"
    # keeps it.
    T, E = 12, 12
    logits = torch.full((T, E), -4.0)
    logits[:, 0] = 3.5                    # group 0: the largest key, the rest tiny
    logits[:, 4:6] = 3.0                  # group 1: two large keys
    logits[:, 8:10] = 2.9                 # group 2: two large keys
    dev = backend.device
    v3 = backend.route_from_logits(logits.to(dev), 3, num_groups=3, topk_groups=2, group_score="top2_sum")
    assert (v3.indices.cpu() >= 4).all()
    v2 = backend.route_from_logits(logits.to(dev), 3, num_groups=3, topk_groups=2, group_score="max")
    assert (v2.indices.cpu()[:, 0] == 0).all()
    ref = reference.route_from_logits(logits, 3, num_groups=3, topk_groups=2)
    assert torch.equal(v3.indices.cpu(), ref.indices)


def test_huge_scores_stay_finite(backend):
    """|scale / tau * cos| around 2^31 with H > 1: every backend keeps the reference's finite
    answer (no fused a*b - m rounding past the max, csrc/common/hd.h)."""
    s = make_sample(16, 32, 3, 8, 2, 3)
    dev = backend.device
    for scale, tau in ((3e9, 1.0), (4.0, 1e-9)):
        out = backend.route(s.x.to(dev), s.proj.to(dev), s.anchors.to(dev), torch.tensor(scale).to(dev), top_k=3,
                            tau=tau)
        ref = reference.route(s.x, s.proj, s.anchors, torch.tensor(scale), top_k=3, tau=tau)
        assert torch.isfinite(ref.weights).all()
        assert torch.isfinite(out.weights.cpu()).all(), f"scale={scale}, tau={tau}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_x_near_its_maximum_gives_the_reference_answer(backend, dtype):
    """mean(x^2) overflows float32 for x near bf16's maximum: rstd = 0, the normalized row is 0 and
    routing is uniform, as in the reference (not inf * 0 = NaN)."""
    s = make_sample(16, 64, 2, 8, 2, 3)
    big = torch.finfo(dtype).max
    x = torch.where(torch.arange(16)[:, None] % 2 == 0, torch.full((16, 64), big), -torch.full((16, 64), big))
    x = (x * torch.sign(s.x.float() + 0.01)).to(dtype)
    dev = backend.device
    out = backend.route(x.to(dev), s.proj.to(dev), s.anchors.to(dev), s.scale.to(dev), top_k=3)
    ref = reference.route(x, s.proj, s.anchors, s.scale, top_k=3)
    assert not torch.isnan(ref.weights).any()
    torch.testing.assert_close(out.weights.cpu(), ref.weights, atol=1e-6, rtol=1e-5)
    assert torch.equal(out.indices.cpu(), ref.indices)


@pytest.mark.parametrize("magnitude", [1e-2, 1e18])
def test_gradients_of_rows_far_from_unit_scale_match_the_reference(backend, magnitude):
    """RMSNorm makes routing scale-invariant, and its gradients scale as rstd (grad_x) or not at all
    (proj, norm weight). With x at 1e18 (mean(x^2) ~ 1e36, still finite in float32; rstd ~ 1e-18)
    or 1e-2 (rstd ~ 50; much smaller and eps_norm takes over), each gradient is compared to the
    reference relative to its own size: the absolute floor of _grad_tolerance would pass any
    grad_x at 1e-18."""
    s = make_sample(16, 64, 4, 8, 2, 3, norm_weight=True)
    s = RouteSample(s.name, s.x * magnitude, s.proj, s.anchors, s.scale, s.kwargs)
    x = s.x[tie_free(selection_keys(reference_logits(s), s.kwargs), s.kwargs)]
    assert x.shape[0] >= 8
    dev = backend.device
    leaves = [t.detach().clone().to(dev).requires_grad_() for t in (x, s.proj, s.anchors, s.scale, s.kwargs["norm_weight"])]
    out = backend.route(*leaves[:4], top_k=3, norm_weight=leaves[4])
    grads = torch.autograd.grad(_outputs_loss(out, 0), leaves)
    refs = [t.detach().cpu().double().requires_grad_() for t in leaves]
    ref = reference.route(*refs[:4], top_k=3, norm_weight=refs[4])
    assert torch.equal(out.indices.cpu(), ref.indices)
    ref_grads = torch.autograd.grad(_outputs_loss(ref, 0), refs)
    for name, g, rg in zip(["x", "proj", "anchors", "scale", "norm_weight"], grads, ref_grads):
        scale = rg.abs().max().item()
        err = (g.cpu().double() - rg).abs().max().item()
        assert scale > 0 and math.isfinite(err) and err <= 2e-4 * scale, f"grad of {name}: error {err:.3g}, size {scale:.3g}"


# ---------------------------------------------------------------------------------------------
# route_backward: indices and gradient shapes are checked (native op, CPU)
# ---------------------------------------------------------------------------------------------

def _backward_args(s, idx, q, rstd, **overrides):
    kw = dict(norm_weight=None, padding_mask=None, beta=1.0, norm="rms", eps=1e-6, tau=1.0, score="softmax",
              normalize=False, scaling=1.0, seq_len=0, output_mask=[True, True])
    kw.update(overrides)
    return (s.x, s.proj, s.anchors, s.scale, kw["norm_weight"], kw["padding_mask"], idx, q, rstd, kw["beta"],
            kw["norm"], kw["eps"], kw["tau"], kw["score"], kw["normalize"], kw["scaling"], kw["seq_len"],
            kw["output_mask"])


def _forward_op(s, k):
    return torch.ops.l2r_cuda.route_forward(s.x, s.proj, s.anchors, s.scale, None, None, None, k, 1.0, "rms",
                                            1e-6, 1e-6, 1.0, "softmax", False, 1, 1, "top2_sum", 1.0, 0)


@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512"])
@pytest.mark.parametrize("bad", [2 ** 40, 8, -1])
def test_backward_rejects_out_of_range_indices(isa, bad):
    import backends

    if not backends.cpu_has(isa):
        pytest.skip(f"this CPU lacks {isa}")
    with backends.native_backend(f"cpu-{isa}").select():
        s = make_sample(16, 32, 4, 8, 2, 3)
        w, idx, _, _, _, q, rstd = _forward_op(s, 3)
        idx = idx.clone()
        idx[5, 1] = bad
        with pytest.raises(RuntimeError, match=rf"indices must be in \[0, E\) = \[0, 8\), got indices\[5, 1\] = {bad}"):
            torch.ops.l2r_cuda.route_backward(torch.ones(16, 3), None, None, *_backward_args(s, idx, q, rstd))
        with pytest.raises(RuntimeError, match=r"indices has a value outside|indices must be in"):
            torch.ops.l2r_cuda.route_select_backward(torch.ones(16, 3), None, None, torch.randn(16, 8), None, idx,
                                                     "softmax", False, 1.0, 0)


def test_backward_rejects_float_indices_and_checks_gradient_shapes():
    s = make_sample(5, 8, 2, 4, 2, 2)
    w, idx, _, _, _, q, rstd = _forward_op(s, 2)
    with pytest.raises(RuntimeError, match="indices must be int64 or int32, got Float"):
        torch.ops.l2r_cuda.route_backward(torch.ones(5, 2), None, None, *_backward_args(s, idx.float(), q, rstd))
    with pytest.raises(RuntimeError, match=r"grad_weights must be \[T, k\] = \[5, 2\], got \[5, 3\]"):
        torch.ops.l2r_cuda.route_backward(torch.ones(5, 3), None, None, *_backward_args(s, idx, q, rstd))
    # Same element count, wrong shape: rejected too.
    with pytest.raises(RuntimeError, match=r"grad_weights must be \[T, k\] = \[5, 2\], got \[2, 5\]"):
        torch.ops.l2r_cuda.route_backward(torch.ones(2, 5), None, None, *_backward_args(s, idx, q, rstd))
    with pytest.raises(RuntimeError, match=r"grad_mean_probs must be \[E\] = \[4\], got \[3\]"):
        torch.ops.l2r_cuda.route_backward(None, torch.ones(3), None, *_backward_args(s, idx, q, rstd))
    with pytest.raises(RuntimeError, match=r"grad_lse must be \[T\] = \[5\], got \[6\]"):
        torch.ops.l2r_cuda.route_backward(None, None, torch.ones(6), *_backward_args(s, idx, q, rstd))


def test_backward_skips_what_is_not_needed():
    """output_mask: without grad_x wanted, grad_x is not computed (zeros); without parameter grads,
    those are zeros; what is computed equals the full backward's bits."""
    s = make_sample(40, 32, 4, 8, 2, 3, norm_weight=True)
    w, idx, _, _, _, q, rstd = torch.ops.l2r_cuda.route_forward(
        s.x, s.proj, s.anchors, s.scale, s.kwargs["norm_weight"], None, None, 3, 1.0, "rms", 1e-6, 1e-6, 1.0,
        "softmax", False, 1, 1, "top2_sum", 1.0, 0)
    gw = torch.randn(40, 3)
    full = torch.ops.l2r_cuda.route_backward(gw, None, None, *_backward_args(s, idx, q, rstd, norm_weight=s.kwargs["norm_weight"]))
    only_x = torch.ops.l2r_cuda.route_backward(gw, None, None, *_backward_args(
        s, idx, q, rstd, norm_weight=s.kwargs["norm_weight"], output_mask=[True, False]))
    only_params = torch.ops.l2r_cuda.route_backward(gw, None, None, *_backward_args(
        s, idx, q, rstd, norm_weight=s.kwargs["norm_weight"], output_mask=[False, True]))
    assert torch.equal(only_x[0], full[0])
    assert all(not t.any() for t in only_x[1:])
    assert not only_params[0].any()
    for a, b in zip(only_params[1:], full[1:]):
        assert torch.equal(a, b)


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
    (lambda a: a, {"num_groups": 3, "topk_groups": 1}, Exception, r"num_groups = 3 must divide the number of experts E = 4"),
    (lambda a: a, {"num_groups": 2, "topk_groups": 3}, Exception, r"topk_groups must be in \[1, num_groups\] = \[1, 2\], got 3"),
    (lambda a: a, {"num_groups": 2, "topk_groups": 1, "top_k": 3}, Exception,
     r"top_k = 3 exceeds the experts of the kept groups, topk_groups \* E / num_groups = 2"),
    (lambda a: a, {"num_groups": 2}, ValueError, r"num_groups=2 needs topk_groups"),
    (lambda a: a, {"topk_groups": 2}, ValueError, r"topk_groups=2 needs num_groups"),
    (lambda a: a, {"num_groups": 4, "topk_groups": 2}, Exception, r"group_score='top2_sum' needs at least 2 experts per group"),
    (lambda a: a, {"group_score": "mean"}, ValueError, r"group_score must be 'top2_sum' or 'max', got 'mean'"),
    (lambda a: a, {"seq_len": 2}, Exception, r"seq_len = 2 must divide the number of tokens T = 3"),
    (lambda a: a, {"padding_mask": torch.zeros(3)}, TypeError, r"padding_mask must be a bool tensor"),
    (lambda a: a, {"padding_mask": torch.zeros(4, dtype=torch.bool)}, ValueError, r"padding_mask must have one entry per token \(3\)"),
    (lambda a: a, {"routed_scaling_factor": float("nan")}, Exception, r"routed_scaling_factor must be finite, got nan"),
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
# Layout, empty input, determinism, compile (native CPU op)
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
    mask = torch.arange(12).view(3, 4) % 2 == 0
    out = l2r_cuda.route(s.x.view(3, 4, 16), *s.args()[1:], **s.kwargs, padding_mask=mask, seq_len=4)
    assert out.mean_probs.shape == (3, 8)


def test_empty_tokens(backend):
    s = _on(make_sample(0, 16, 2, 8, 4, 3, norm_weight=True), backend).with_grad()
    out = backend.route(*s.args(), **s.kwargs)
    assert out.weights.shape == (0, 3) and out.indices.shape == (0, 3) and out.lse.shape == (0,)
    assert torch.equal(out.tokens_per_expert.cpu(), torch.zeros(8, dtype=torch.int64))
    assert torch.equal(out.mean_probs.cpu(), torch.zeros(8))
    out.mean_probs.sum().backward()
    assert s.proj.grad is None or not s.proj.grad.any()


def test_batch_independence(backend):
    s = _on(make_sample(50, 32, 4, 16, 4, 4, norm_weight=True, bias=True), backend)
    full = backend.route(*s.args(), **s.kwargs)
    for t in (0, 17, 49):
        one = backend.route(s.x[t:t + 1], *s.args()[1:], **s.kwargs)
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


def test_deterministic_across_runs_and_threads(backend):
    if backend.device != "cpu" or backend.name == "simt":
        pytest.skip("thread counts are a CPU matter")
    sample = make_sample(3000, 64, 8, 32, 4, 4, norm_weight=True, bias=True, seq_len=1000)
    first = _grads_with_threads(sample, 1)
    again = _grads_with_threads(sample, 1)
    two = _grads_with_threads(sample, 2)
    for a, b, c in zip(first, again, two):
        assert torch.equal(a, b)
        assert torch.equal(a, c)


@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512"])
@pytest.mark.parametrize("d, rank, norm_weight", [(70, 4, True), (64, 12, True), (37, 3, False)])
def test_backward_reads_only_memory_it_wrote(isa, d, rank, norm_weight):
    """The CPU backward leaves its per-chunk sums uninitialised and writes each value before it reads
    it (the first group of a chunk writes grad_proj's vector part; the rest is zeroed). With PyTorch
    filling uninitialised memory with NaN (deterministic mode), no gradient may change: several
    chunks, tail columns (d not a multiple of the lane width) and rank > 8 (two row blocks)."""
    import backends

    if not backends.cpu_has(isa):
        pytest.skip(f"this CPU lacks {isa}")
    sample = make_sample(700, d, rank, 16, 2, 4, norm_weight=norm_weight, bias=True)
    params = lambda s: [s.x, s.proj, s.anchors, s.scale] + ([s.kwargs["norm_weight"]] if norm_weight else [])

    def grads():
        s = sample.with_grad()
        out = l2r_cuda.route(*s.args(), **s.kwargs)
        return torch.autograd.grad(_outputs_loss(out, 5), params(s))

    before = (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory)
    with backends.native_backend(f"cpu-{isa}").select():
        try:
            plain = grads()
            torch.use_deterministic_algorithms(True)
            torch.utils.deterministic.fill_uninitialized_memory = True
            filled = grads()
        finally:
            torch.use_deterministic_algorithms(before[0])
            torch.utils.deterministic.fill_uninitialized_memory = before[1]
    for a, b in zip(plain, filled):
        assert torch.isfinite(a).all()
        assert torch.equal(a, b)


def test_cpu_isa_switch():
    before = torch.ops.l2r_cuda.cpu_isa()
    try:
        assert torch.ops.l2r_cuda.cpu_isa("portable") == "portable"
        assert torch.ops.l2r_cuda.cpu_isa("auto") in ("portable", "avx2", "avx512")
        with pytest.raises(RuntimeError, match="isa must be 'portable', 'avx2', 'avx512' or 'auto', got 'sse'"):
            torch.ops.l2r_cuda.cpu_isa("sse")
    finally:
        torch.ops.l2r_cuda.cpu_isa(before)


_PREFETCH_SCRIPT = """
import sys, torch, l2r_cuda
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
# 2100 x 2048 float32 rows: 16.4 MiB, over the kernel's 16 MiB threshold for prefetching x
x = torch.randn(2100, 2048, generator=g)
proj, anchors = torch.randn(8, 2048, generator=g) / 45, torch.randn(64, 4, 8, generator=g)
out = l2r_cuda.route(x, proj, anchors, 4.0, top_k=8)
logits = l2r_cuda.ops.route_logits(x, proj, anchors, 4.0)
torch.save([out.weights, out.indices, out.mean_probs, out.lse, out.tokens_per_expert, logits], sys.argv[1])
"""


def test_forward_prefetch_of_x_changes_no_result(tmp_path):
    # The forward prefetches the next rows of x only on AMD processors (faster there, slower on
    # Intel); L2R_CPU_X_PREFETCH forces either path, so both run whatever CPU runs the tests.
    import os
    import subprocess
    import sys

    results = []
    for flag in ("1", "0"):
        path = tmp_path / f"out{flag}.pt"
        env = dict(os.environ, L2R_CPU_X_PREFETCH=flag)
        r = subprocess.run([sys.executable, "-c", _PREFETCH_SCRIPT, str(path)], env=env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        results.append(torch.load(path))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    env = dict(os.environ, L2R_CPU_X_PREFETCH="yes")
    r = subprocess.run([sys.executable, "-c", _PREFETCH_SCRIPT, str(tmp_path / "bad.pt")], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "L2R_CPU_X_PREFETCH must be 0 or 1, got 'yes'" in r.stderr


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


def test_compile_fullgraph_with_policies():
    s = make_sample(24, 32, 2, 16, 2, 4, norm_weight=True, bias=True).with_grad()
    mask = torch.arange(24) % 5 == 0
    kw = dict(s.kwargs, num_groups=4, topk_groups=2, routed_scaling_factor=2.0, seq_len=8, padding_mask=mask)

    def fn(x, proj, anchors, scale):
        out = l2r_cuda.route(x, proj, anchors, scale, **kw)
        logits = l2r_cuda.ops.route_logits(x, proj, anchors, scale, norm_weight=kw["norm_weight"])
        linear = l2r_cuda.ops.route_from_logits(logits, 4, num_groups=4, topk_groups=2, seq_len=8, padding_mask=mask)
        return out.weights, out.mean_probs, linear.weights, linear.mean_probs

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = compiled(*s.args())
    want = fn(*s.args())
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    sum(t.sum() for t in got).backward()
    assert s.x.grad is not None and s.anchors.grad is not None


def test_compile_fullgraph_traces_the_cuda_device_check():
    # The device check of every op runs for CUDA inputs only; torch.compile(fullgraph=True) on a GPU
    # failed there (Dynamo cannot trace the dispatcher query it made). Traced here with a CUDA device
    # object and CPU tensors, so that no GPU is needed.
    from l2r_cuda.ops import _check_device

    def fn(x):
        _check_device(torch.device("cuda"), "route_forward", "x")
        return x + 1

    x = torch.ones(3)
    assert torch.equal(torch.compile(fn, fullgraph=True, backend="eager")(x), x + 1)


def test_compile_fullgraph_inductor():
    torch.manual_seed(1)
    router = l2r_cuda.L2RRouter(16, 4, 2, rank=2, num_anchors=2)
    x = torch.randn(6, 16)
    out = torch.compile(router, fullgraph=True)(x)
    ref = router(x)
    assert torch.equal(out.indices, ref.indices)
    torch.testing.assert_close(out.weights, ref.weights)


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
