"""Quick agreement check of the native CPU route against l2r_cuda.reference (a script, not a
pytest module): indices equal on tie-free random inputs, weights / lse / mean_probs within 1e-5,
gradients within 1e-4 relative, and gradients bitwise equal with 1 and 2 threads.

    PYTHONPATH=. python tests/perf_check_route.py [--full]
"""

import itertools
import random
import sys

import torch

import l2r_cuda
from l2r_cuda import reference


def make(T, d, r, E, H, dtype, norm_weight, bias, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g, dtype=torch.float64).to(dtype)
    proj = torch.randn(r, d, generator=g, dtype=torch.float64) / d ** 0.5
    anchors = torch.randn(E, H, r, generator=g, dtype=torch.float64)
    scale = torch.tensor(3.0 + torch.rand((), generator=g, dtype=torch.float64).item() * 5)
    nw = (1 + 0.3 * torch.randn(d, generator=g, dtype=torch.float64)) if norm_weight else None
    eb = (0.05 * torch.randn(E, generator=g, dtype=torch.float64)) if bias else None
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    cast = lambda t: None if t is None else t.to(pdt)
    return x, cast(proj), cast(anchors), cast(scale), cast(nw), cast(eb)


def run(fn, inputs, kw, grads=True):
    x, proj, anchors, scale, nw, eb = [None if t is None else t.clone() for t in inputs]
    leaves = [t.requires_grad_() for t in (x, proj, anchors, scale, nw) if t is not None]
    out = fn(x, proj, anchors, scale, norm_weight=nw, expert_bias=eb, **kw)
    if not grads or x.shape[0] == 0:
        return out, None
    g = torch.Generator().manual_seed(1)
    gw = torch.randn(out.weights.shape, generator=g, dtype=out.weights.dtype)
    gm = torch.randn(out.mean_probs.shape, generator=g, dtype=out.mean_probs.dtype)
    gl = torch.randn(out.lse.shape, generator=g, dtype=out.lse.dtype)
    loss = (out.weights * gw).sum() + (out.mean_probs * gm).sum() + 0.1 * (out.lse * gl).sum()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return out, [torch.zeros_like(l) if g is None else g for l, g in zip(leaves, grads)]


def close(a, b, rel):
    a, b = a.double(), b.double()
    return bool(((a - b).abs() <= rel * (b.abs().max() + 1e-12)).all())


def check(cfg):
    T, d, r, E, H, k, beta, score, normalize, bias, norm, nwt, dtype, seed = cfg
    inputs = make(T, d, r, E, H, dtype, nwt, bias, seed)
    kw = dict(top_k=k, beta=beta, norm=norm, score=score, normalize=normalize)
    torch.set_num_threads(1)
    out, grads = run(l2r_cuda.route, inputs, kw)
    ref, ref_grads = run(reference.route, inputs, kw)
    problems = []
    # r = 1 with beta = 0: every score is +-scale (a 1-D cosine is a sign), so probabilities tie
    # exactly and the true gradient is zero (what both sides return is rounding noise): only the
    # thread-count checks below apply.
    degenerate = r == 1 and beta == 0.0
    if degenerate:
        pass
    elif not torch.equal(out.indices, ref.indices):
        problems.append(f"indices differ in {(out.indices != ref.indices).any(1).sum().item()} tokens")
    for name in () if degenerate else ("weights", "mean_probs", "lse"):
        a, b = getattr(out, name), getattr(ref, name)
        if a.shape != b.shape or (a.double() - b.double()).abs().max().item() > 1e-5 if a.numel() else False:
            problems.append(f"{name} max abs diff {(a.double() - b.double()).abs().max().item():.3g}")
    if not degenerate and not torch.equal(out.tokens_per_expert, ref.tokens_per_expert):
        problems.append("tokens_per_expert differ")
    if grads is not None:
        names = ["x", "proj", "anchors", "scale", "norm_weight"]
        for n, a, b in zip(names, grads, ref_grads) if not degenerate else ():
            # a gradient of x in bf16/fp16 may round to the neighbouring value: one ulp of its dtype
            tol = {torch.bfloat16: 8e-3, torch.float16: 1e-3}.get(a.dtype, 1e-4)
            if not close(a, b, tol):
                problems.append(f"grad {n} rel diff {((a.double() - b.double()).abs().max() / (b.double().abs().max() + 1e-12)).item():.3g}")
        torch.set_num_threads(2)
        out2, grads2 = run(l2r_cuda.route, inputs, kw)
        torch.set_num_threads(1)
        for name in ("weights", "indices", "lse", "mean_probs"):
            if not torch.equal(getattr(out, name), getattr(out2, name)):
                problems.append(f"{name} differs between 1 and 2 threads")
        for n, a, b in zip(["x", "proj", "anchors", "scale", "norm_weight"], grads, grads2):
            if not torch.equal(a, b):
                problems.append(f"grad {n} differs between 1 and 2 threads")
    return problems


def check_special():
    """NaN / Inf / zero / huge tokens and a zero anchor: indices valid and distinct, NaN weights
    where the reference has them, finite results equal to the reference's."""
    problems = []
    for dtype, H, score, norm in itertools.product([torch.float32, torch.bfloat16], [1, 4],
                                                   ["softmax", "sigmoid"], ["rms", None]):
        x, proj, anchors, scale, _, _ = make(12, 40, 3, 10, H, dtype, False, False, 5)
        x = x.clone()
        x[0] = 0
        x[1, 3] = float("nan")
        x[2, 5] = float("inf")
        x[3, :] = float("inf")
        x[4] *= 1e30 if dtype == torch.float32 else 1e20
        x[5, 0] = -float("inf")
        anchors = anchors.clone()
        anchors[2, 0] = 0
        anchors[7] = anchors[4]  # exact ties: the lower index first
        anchors[9] = anchors[4]
        kw = dict(top_k=4, norm=norm, score=score)
        out = l2r_cuda.route(x, proj, anchors, scale, **kw)
        ref = reference.route(x, proj, anchors, scale, **kw)
        idx = out.indices
        if not ((idx >= 0) & (idx < 10)).all() or any(len(set(row.tolist())) != 4 for row in idx):
            problems.append(f"{dtype} H={H} {score} {norm}: invalid indices {idx.tolist()}")
        fin_rows = ref.weights.isfinite().all(1) & out.weights.isfinite().all(1)
        if not torch.equal(out.indices[fin_rows], ref.indices[fin_rows]):
            problems.append(f"{dtype} H={H} {score} {norm}: indices differ (ties)")
        if not torch.equal(out.weights.isnan(), ref.weights.isnan()):
            problems.append(f"{dtype} H={H} {score} {norm}: NaN weights differ from the reference")
        fin = ref.weights.isfinite().all(1) & out.weights.isfinite().all(1)
        if not torch.allclose(out.weights[fin], ref.weights[fin], atol=1e-5, rtol=0):
            problems.append(f"{dtype} H={H} {score} {norm}: finite weights differ")
    return problems


def main():
    full = "--full" in sys.argv
    axes = dict(
        T=[0, 1, 7, 300], r=[1, 2, 3, 8, 32], E=[1, 8, 64, 160], H=[1, 4], k=[1, 2, 8],
        beta=[0.0, 0.5, 1.0], score=["softmax", "sigmoid"], normalize=[False, True],
        bias=[False, True], norm=["rms", None], nwt=[False, True],
        dtype=[torch.float32, torch.bfloat16, torch.float16, torch.float64],
    )
    rng = random.Random(0)
    cfgs = []
    n = 10 ** 9 if full else 160
    combos = list(itertools.product(*axes.values())) if full else None
    for i in range(min(n, len(combos)) if full else n):
        c = combos[i] if full else tuple(
            vals[i % len(vals)] if j % 2 == 0 else rng.choice(vals) for j, vals in enumerate(axes.values()))
        T, r, E, H, k, beta, score, normalize, bias, norm, nwt, dtype = c
        if k > E:
            k = E
        d = rng.choice([24, 64, 131])
        cfgs.append((T, d, r, E, H, k, beta, score, normalize, bias, norm, nwt, dtype, i))
    bad = 0
    for cfg in cfgs:
        problems = check(cfg)
        if problems:
            bad += 1
            print("FAIL", cfg, "; ".join(problems))
    print(f"{len(cfgs) - bad}/{len(cfgs)} configurations agree")
    special = check_special()
    for p in special:
        print("FAIL special:", p)
    bad += len(special)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
