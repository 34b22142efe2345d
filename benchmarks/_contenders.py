"""The routers being timed, their agreement checks, and their analytic cost per token.

Every contender returns the same things for a batch of ``T`` tokens (what a training MoE layer
consumes): ``weights [T, k]`` float32, ``indices [T, k]`` int64, ``mean_probs [E]`` (Switch
load-balancing loss) and ``lse [T]`` (router z-loss). The backward pass of "fwd+bwd" is
``torch.autograd.grad`` of these three outputs against fixed random cotangents, with respect to
``x`` and every router parameter.

- ``l2r_native``: ``l2r_cuda.route`` (fused native kernel).
- ``l2r_ref`` / ``l2r_ref_compiled``: ``l2r_cuda.reference.route``, eager and ``torch.compile``.
- ``linear`` / ``linear_compiled``: ``logits = x @ W_g^T`` (in x's dtype, as in HF Mixtral/OLMoE),
  then float32 softmax, ``torch.topk``, gather.
- ``linear_fp32``: the float32 router many production models use (DeepSeek-V3, Qwen3-MoE): W_g kept
  in float32 and ``logits = x.float() @ W_g^T``; timed for 16-bit x only (for float32 x it is
  ``linear``).
- ``cosine``: a Tutel-style cosine gate: ``h = Linear_{d->256}(x)``, ``logits = <h/|h|, e/|e|> *
  exp(min(t, log 100))`` with learnable expert embeddings ``e [E, 256]`` and temperature ``t``,
  then as ``linear``.
- ``read_x``: the memory-read floor: one reduction over ``x`` (the faster of ``x.sum()`` and
  ``x.amax()``); forward only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

import l2r_cuda
from l2r_cuda import reference

COSINE_DIM = 256
CONTENDERS = ["read_x", "linear", "linear_fp32", "linear_compiled", "cosine", "l2r_native", "l2r_ref",
              "l2r_ref_compiled"]
LINEAR = ("linear", "linear_fp32", "linear_compiled")
L2R_CONTENDERS = ("l2r_native", "l2r_ref", "l2r_ref_compiled")
COMPILED = ("linear_compiled", "l2r_ref_compiled")
# CUDA-graph capturable (no host synchronization): the reference's bincount sizes its output on the host.
GRAPHABLE = ("read_x", "linear", "linear_fp32", "linear_compiled", "cosine", "l2r_native")


@dataclass(frozen=True)
class ModelShape:
    key: str
    name: str
    d: int
    E: int
    k: int


MODELS: Dict[str, ModelShape] = {
    m.key: m
    for m in [
        ModelShape("olmoe", "OLMoE-1B-7B", 2048, 64, 8),
        ModelShape("qwen3", "Qwen3-30B-A3B", 2048, 128, 8),
        ModelShape("mixtral", "Mixtral-8x7B", 4096, 8, 2),
        ModelShape("deepseek-v3", "DeepSeek-V3", 7168, 256, 8),
        ModelShape("llama4-scout", "Llama-4-Scout", 5120, 16, 1),
    ]
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------------
# Forward functions


def linear_gate(x: Tensor, w: Tensor, top_k: int):
    logits = (x @ w.t()).float()  # w in x's dtype (linear) or float32 with x.float() (linear_fp32)
    probs = torch.softmax(logits, dim=-1)
    weights, indices = torch.topk(probs, top_k, dim=-1)
    return weights, indices, probs.mean(0), torch.logsumexp(logits, dim=-1)


def cosine_gate(x: Tensor, w_proj: Tensor, b_proj: Tensor, emb: Tensor, temperature: Tensor, top_k: int):
    h = F.linear(x, w_proj, b_proj).float()
    h = F.normalize(h, dim=-1)
    e = F.normalize(emb.float(), dim=-1)
    logit_scale = torch.clamp(temperature.float(), max=math.log(100.0)).exp()
    logits = (h @ e.t()) * logit_scale
    probs = torch.softmax(logits, dim=-1)
    weights, indices = torch.topk(probs, top_k, dim=-1)
    return weights, indices, probs.mean(0), torch.logsumexp(logits, dim=-1)


def _l2r(fn):
    def call(x, proj, anchors, scale, norm_weight, top_k):
        out = fn(x, proj, anchors, scale, top_k=top_k, norm_weight=norm_weight)
        return out.weights, out.indices, out.mean_probs, out.lse

    return call


_COMPILED_CACHE: Dict[str, Callable] = {}


def compiled(name: str) -> Callable:
    """One ``torch.compile`` wrapper per contender for the whole run (dynamo caches per shape)."""
    if name not in _COMPILED_CACHE:
        # Every (shape, dtype, mode) is a new graph: lift dynamo's recompile limit so nothing falls
        # back to eager silently.
        for attr in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if hasattr(torch._dynamo.config, attr):
                setattr(torch._dynamo.config, attr, 100000)
        base = {"linear_compiled": linear_gate, "l2r_ref_compiled": _l2r(reference.route)}[name]
        _COMPILED_CACHE[name] = torch.compile(base)
    return _COMPILED_CACHE[name]


# ----------------------------------------------------------------------------------------------
# Inputs


def make_x(T: int, d: int, dtype: torch.dtype, device, seed: int) -> Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(T, d, generator=g).to(device=device, dtype=dtype)


def make_params(contender: str, m: ModelShape, r: int, H: int, dtype, device, seed: int) -> List[Tensor]:
    """Router parameters in the run's dtype (a model cast with ``.to(dtype)``), fixed seed."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rn(*shape):
        return torch.randn(*shape, generator=g)

    if contender in L2R_CONTENDERS:
        proj = rn(r, m.d) / math.sqrt(m.d)
        anchors = F.normalize(rn(m.E, H, r), dim=-1)
        scale = torch.tensor(5.0)
        norm_weight = 1.0 + 0.1 * rn(m.d)
        ps = [proj, anchors, scale, norm_weight]
    elif contender in LINEAR:
        ps = [rn(m.E, m.d) / math.sqrt(m.d)]
    elif contender == "cosine":
        ps = [rn(COSINE_DIM, m.d) / math.sqrt(m.d), 0.01 * rn(COSINE_DIM), 0.01 * rn(m.E, COSINE_DIM),
              torch.tensor(math.log(1 / 0.07))]
    else:
        ps = []
    if contender == "linear_fp32":  # the router weight stays float32 whatever the model's dtype
        return [p.to(device=device, dtype=torch.float32) for p in ps]
    return [p.to(device=device, dtype=dtype) for p in ps]


def forward_fn(contender: str, top_k: int) -> Callable:
    """``f(x, *params) -> (weights, indices, mean_probs, lse)``."""
    if contender == "l2r_native":
        f = _l2r(l2r_cuda.route)
    elif contender == "l2r_ref":
        f = _l2r(reference.route)
    elif contender == "l2r_ref_compiled":
        f = compiled(contender)
    elif contender == "linear":
        f = linear_gate
    elif contender == "linear_fp32":
        def f(x, w, top_k):
            return linear_gate(x.float(), w, top_k)
    elif contender == "linear_compiled":
        f = compiled(contender)
    elif contender == "cosine":
        f = cosine_gate
    else:
        raise ValueError(contender)
    return lambda x, *params: f(x, *params, top_k)


def make_step(contender: str, x: Tensor, params: Sequence[Tensor], top_k: int, mode: str, seed: int,
              mark_dynamic: bool = False, x_leaf: Optional[Tensor] = None) -> Tuple[Callable[[], object], List[Tensor]]:
    """A zero-argument callable running one forward ("fwd": inference, nothing requires grad) or
    forward+backward ("fwdbwd"), and the tensors it differentiates with respect to. ``x_leaf``: a
    requires-grad copy of ``x`` to differentiate with respect to (contenders timed together share
    one), else one is made."""
    if contender == "read_x":
        raise ValueError("read_x has its own step (read_x_steps)")
    f = forward_fn(contender, top_k)
    if mode == "fwd":
        xs, ps = x, list(params)
        if mark_dynamic and contender in COMPILED and x.shape[0] > 1:
            torch._dynamo.maybe_mark_dynamic(xs, 0)

        def step():
            return f(xs, *ps)

        return step, []
    xs = x_leaf if x_leaf is not None else x.detach().clone().requires_grad_(True)
    if mark_dynamic and contender in COMPILED and x.shape[0] > 1:
        torch._dynamo.maybe_mark_dynamic(xs, 0)
    ps = [p.detach().clone().requires_grad_(True) for p in params]
    inputs = [xs] + ps
    T = x.shape[0]
    E = _num_experts(contender, params)
    g = torch.Generator(device="cpu").manual_seed(seed + 17)
    gw = torch.randn(T, top_k, generator=g).to(x.device)
    gm = torch.randn(E, generator=g).to(x.device)
    gl = torch.randn(T, generator=g).to(x.device)

    def step():
        w, _, mp, lse = f(xs, *ps)
        return torch.autograd.grad([w, mp, lse], inputs, [gw, gm, gl])

    return step, inputs


def _num_experts(contender: str, params: Sequence[Tensor]) -> int:
    if contender in L2R_CONTENDERS:
        return params[1].shape[0]
    if contender in LINEAR:
        return params[0].shape[0]
    return params[2].shape[0]


def read_x_steps(x: Tensor) -> Dict[str, Callable[[], object]]:
    return {"x.sum()": lambda: x.sum(), "x.amax()": lambda: x.amax()}


# ----------------------------------------------------------------------------------------------
# Agreement checks


def _tol(dtype: torch.dtype) -> Tuple[float, float]:
    """(rtol, atol) on probabilities for a contender whose logits are computed in ``dtype``."""
    return (1e-4, 1e-6) if dtype in (torch.float32, torch.float64) else (3e-2, 2e-3)


def compare_selection(w: Tensor, idx: Tensor, ref_probs: Tensor, rtol: float, atol: float) -> Tuple[bool, str, int]:
    """A top-k selection (indices ``idx [T, k]``, weights ``w``) against reference probabilities
    ``[T, E]``, tie-aware: equal (within tolerance) values may come in either order and either may
    be chosen at the cut, so sets and values are compared, not positions.

    - indices in range and distinct within a token;
    - the reference values at the chosen experts, sorted, equal the reference's top-k values;
    - where the reference's k-th and (k+1)-th values are farther apart than the tolerance, the
      chosen set is the reference's set;
    - the experts come best first (reference values non-increasing within the tolerance);
    - the weights equal the reference probabilities at the chosen experts.

    Returns (ok, message, tokens whose indices differ from torch.topk's only by such ties)."""
    T, k = idx.shape
    E = ref_probs.shape[1]
    ref = ref_probs.double()
    idx = idx.long()
    if bool(((idx < 0) | (idx >= E)).any()):
        return False, "index out of range", 0
    if k > 1 and bool((idx.sort(-1).values.diff(dim=-1) == 0).any()):
        return False, "an expert chosen twice for one token", 0
    at_idx = ref.gather(-1, idx)
    ranked = ref.sort(-1, descending=True).values
    top = ranked[:, :k]
    tol = atol + rtol * top.abs()
    if not bool(((at_idx.sort(-1, descending=True).values - top).abs() <= tol).all()):
        return False, "chosen values are not the top-k values", 0
    if k < E:
        clear = (ranked[:, k - 1] - ranked[:, k]) > atol + rtol * ranked[:, k - 1].abs()
        ref_set = torch.topk(ref, k, dim=-1).indices.sort(-1).values
        wrong = clear & (idx.sort(-1).values != ref_set).any(-1)
        if bool(wrong.any()):
            return False, f"chosen set differs from the reference on {int(wrong.sum())}/{T} tokens without a tie", 0
    if k > 1 and bool((at_idx[:, 1:] - at_idx[:, :-1] > atol + rtol * at_idx[:, :-1].abs()).any()):
        return False, "experts not listed best first", 0
    err_w = (w.double() - at_idx).abs().max().item() if T else 0.0
    if not torch.allclose(w.double(), at_idx, rtol=rtol, atol=atol):
        return False, f"weights differ (max abs err {err_w:.2e})", 0
    ties = int((idx != torch.topk(ref, k, dim=-1).indices).any(-1).sum())
    return True, f"max|dw|={err_w:.1e}", ties


def _compare_routing(w: Tensor, idx: Tensor, mp: Tensor, lse: Tensor, ref_probs: Tensor,
                     ref_lse: Tensor, rtol: float, atol: float) -> Tuple[bool, str]:
    """:func:`compare_selection`, then mean_probs and lse against the reference."""
    ok, msg, ties = compare_selection(w, idx, ref_probs, rtol, atol)
    if not ok:
        return False, msg
    if not torch.allclose(mp.double(), ref_probs.double().mean(0), rtol=rtol, atol=atol):
        return False, "mean_probs differ"
    if not torch.allclose(lse.double(), ref_lse.double(), rtol=rtol, atol=max(atol, 1e-5) * 10):
        return False, "lse differ"
    return True, f"ok ({msg}" + (f", {ties} tokens ordered differently within ties)" if ties else ")")


def check_contender(contender: str, x: Tensor, params: Sequence[Tensor], top_k: int,
                    with_grad: bool = True) -> Tuple[bool, str]:
    """Agreement of ``contender`` on ``x`` with its oracle.

    L2R contenders against ``l2r_cuda.reference.route`` (float32 math from the same inputs: the
    selection as :func:`compare_selection` says, weights/lse/mean_probs close; for ``l2r_native``
    also the gradients); linear/cosine gates against a float64 evaluation of their formula on the
    same rounded inputs.
    """
    f = forward_fn(contender, top_k)
    with torch.no_grad():
        w, idx, mp, lse = f(x, *params)
    if contender in L2R_CONTENDERS:
        proj, anchors, scale, nw = params
        logits = reference.route_logits(x, proj, anchors, scale, norm_weight=nw)
        probs = torch.softmax(logits, -1)
        ok, msg = _compare_routing(w, idx, mp, lse, probs, torch.logsumexp(logits, -1), 1e-4, 2e-6)
        if ok and with_grad and contender == "l2r_native":
            ok, gmsg = _check_grads(contender, x, params, top_k)
            msg = f"{msg}; grads {gmsg}" if ok else gmsg
        return ok, msg
    xd = x.double()
    if contender in LINEAR:
        logits = xd @ params[0].double().t()
    else:
        wp, bp, emb, t = (p.double() for p in params)
        h = F.normalize(xd @ wp.t() + bp, dim=-1)
        logits = (h @ F.normalize(emb, dim=-1).t()) * torch.clamp(t, max=math.log(100.0)).exp()
    rtol, atol = _tol(torch.float32 if contender == "linear_fp32" else x.dtype)
    return _compare_routing(w, idx, mp, lse, torch.softmax(logits, -1), torch.logsumexp(logits, -1), rtol, atol)


def _check_grads(contender: str, x: Tensor, params: Sequence[Tensor], top_k: int) -> Tuple[bool, str]:
    """Gradients of ``contender`` against the reference's, on the tokens where both chose the same
    experts in the same order (a near-tie resolved the other way changes that token's gradient:
    the forward check has already accepted it)."""
    f, ref = forward_fn(contender, top_k), forward_fn("l2r_ref", top_k)
    with torch.no_grad():
        same = (f(x, *params)[1] == ref(x, *params)[1]).all(-1)
    x = x[same]
    step, inputs = make_step(contender, x, params, top_k, "fwdbwd", seed=0)
    got = step()
    ref_step, _ = make_step("l2r_ref", x, params, top_k, "fwdbwd", seed=0)
    want = ref_step()
    tol = 1e-3 if x.dtype == torch.float32 else 3e-2
    names = ["x", "proj", "anchors", "scale", "norm_weight"]
    for n, a, b in zip(names, got, want):
        err = (a.double() - b.double()).abs().max().item() / max(b.double().abs().max().item(), 1e-12)
        if not err <= tol:
            return False, f"grad {n} differs (rel err {err:.1e})"
    skipped = int((~same).sum())
    return True, "ok" + (f" (gradients on {x.shape[0]} tokens: {skipped} chose differently within a tie)" if skipped else "")


def lane_width_check(x: Tensor, params: Sequence[Tensor], top_k: int, threads: Sequence[int]) -> Tuple[bool, str]:
    """``l2r_native`` with every CPU instruction set this machine has and each thread count: bitwise
    the same results across thread counts for one instruction set (deterministic), and every set
    within the agreement check's tolerance of the reference (the lane widths sum the projection in
    different orders, so they agree to rounding, not bitwise)."""
    isa_op = torch.ops.l2r_cuda.cpu_isa
    before = isa_op()
    threads_before = torch.get_num_threads()
    results, notes = {}, []
    try:
        for isa in ("portable", "avx2", "avx512"):
            try:
                isa_op(isa)
            except RuntimeError:
                continue  # this CPU lacks it
            runs = []
            for n in threads:
                torch.set_num_threads(n)
                with torch.no_grad():
                    out = l2r_cuda.route(x, *params[:3], top_k=top_k, norm_weight=params[3])
                runs.append(out)
            for other in runs[1:]:
                if not all(torch.equal(a, b) for a, b in zip(runs[0], other)):
                    return False, f"{isa}: results differ between {threads[0]} and other thread counts"
            results[isa] = runs[0]
    finally:
        isa_op(before)
        torch.set_num_threads(threads_before)
    proj, anchors, scale, nw = params
    logits = reference.route_logits(x, proj, anchors, scale, norm_weight=nw)
    probs = torch.softmax(logits, -1)
    base = results.get("portable")
    for isa, out in results.items():
        ok, msg = _compare_routing(out.weights, out.indices, out.mean_probs, out.lse, probs,
                                   torch.logsumexp(logits, -1), 1e-4, 2e-6)
        if not ok:
            return False, f"{isa}: {msg}"
        if base is not None and isa != "portable":
            notes.append(f"{isa} vs portable max|dw| {(out.weights - base.weights).abs().max().item():.1e}")
    return True, (f"{', '.join(results)} at threads {list(threads)}: bitwise equal across threads; "
                  + "; ".join(notes))


# ----------------------------------------------------------------------------------------------
# Saved activations


def saved_bytes(step: Callable[[], object], exclude: Sequence[Tensor]) -> Tuple[int, int]:
    """Bytes of the tensors autograd saves for backward during one ``step()`` (forward+backward):
    ``(all, extra)`` where ``extra`` leaves out the storages of ``exclude`` (the inputs and
    parameters, which exist anyway). Storages are counted once however often they are saved."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen: Dict[int, int] = {}

    def pack(t: Tensor):
        try:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        except Exception:
            seen[id(t)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    total = sum(seen.values())
    extra = sum(v for k, v in seen.items() if k not in excluded)
    return total, extra


# ----------------------------------------------------------------------------------------------
# Analytic cost model (machine-independent)


def analytic_cost(contender: str, m: ModelShape, r: int, H: int, s: int, mode: str) -> Dict[str, float]:
    """Estimated DRAM bytes and FLOPs per token, plus parameter bytes per call.

    ``s`` = bytes per element of ``x`` (and of the parameters). exp/tanh/rsqrt count as one FLOP.
    Fused kernels (``l2r_native``; ``*_compiled`` as the lower bound inductor can reach) move what
    they must: read ``x``, write the outputs (weights 4k + indices 8k + lse 4 B) and what the
    backward keeps (native: q 4r + rstd 4 B). Eager contenders also write and read back every
    materialized intermediate (float32): that is the estimate for them.
    Backward: re-read x (and saved tensors), write grad_x (d*s), plus intermediates for eager.
    """
    d, E, k = m.d, m.E, m.k
    out = 12 * k + 4
    EH = E * H
    if contender == "read_x":
        if mode != "fwd":
            return {}
        return {"bytes": d * s, "flops": d, "param_bytes": 0}
    if contender in L2R_CONTENDERS:
        fl_f = 4 * d + 2 * r * d + 4 * r + 2 * EH * r + 8 * EH + 6 * E
        fl_b = 6 * d + 4 * r * d + 4 * r + 6 * EH * r + 16 * EH + 8 * E
        pb = (r * d + EH * r + d + 1) * s
        fused_f = d * s + out + 4 * r + 4
        fused_b = 2 * d * s + 4 * r + 4 + 8 * k + 4 * k + 4
        if contender == "l2r_native":
            b_f, b_b = fused_f, fused_b
        elif contender == "l2r_ref_compiled":
            # matmul outputs and the [E] probabilities for the sort cannot fuse away
            b_f = fused_f + 8 * r + 4 * 8 * E
            b_b = fused_b + 8 * r + 8 * EH + 4 * 8 * E
        else:
            cast = (d * s + 4 * d) if s != 4 else 0
            inter_d = 3 * 8 * d  # pow, normalized, * g (fp32, written + read)
            inter_eh = (5 if H > 1 else 3) * 8 * EH  # einsum, coef products, /tau, exp
            inter_e = 10 * 8 * E  # logits, lse, softmax, keys, nan mask, 2 sorts (+ int64 idx)
            b_f = d * s + cast + inter_d + 8 * r + inter_eh + inter_e + out
            b_b = 2 * d * s + cast + 2 * inter_d + 2 * inter_eh + 2 * inter_e + 16 * r + 12 * k
    elif contender in LINEAR:
        fl_f = 2 * E * d + 6 * E
        fl_b = 4 * E * d + 6 * E
        pb = E * d * (4 if contender == "linear_fp32" else s)
        if contender == "linear_fp32":  # x.float() is written and read back when x is 16-bit
            cast = 8 * d if s != 4 else 0
            b_f = d * s + cast + 4 * 8 * E + out
            b_b = 2 * d * s + cast + 6 * 8 * E + 12 * k
        elif contender == "linear_compiled":
            b_f = d * s + 2 * E * s + out
            b_b = 2 * d * s + 3 * E * 4 + 12 * k
        else:
            b_f = d * s + 2 * E * s + (8 * E if s != 4 else 0) + 4 * 8 * E + out
            b_b = 2 * d * s + 6 * 8 * E + 12 * k
    elif contender == "cosine":
        D = COSINE_DIM
        fl_f = 2 * D * d + 4 * D + 2 * D * E + 8 * E
        fl_b = 4 * D * d + 8 * D + 4 * D * E + 8 * E
        pb = (D * d + D + E * D + 1) * s
        b_f = d * s + 2 * D * s + 3 * 8 * D + 5 * 8 * E + out
        b_b = 2 * d * s + 4 * 8 * D + 6 * 8 * E + 12 * k
    else:
        raise ValueError(contender)
    if mode == "fwd":
        return {"bytes": b_f, "flops": fl_f, "param_bytes": pb}
    return {"bytes": b_f + b_b, "flops": fl_f + fl_b, "param_bytes": 3 * pb}


def peak_memory_estimate(contender: str, m: ModelShape, H: int, s: int, T: int, mode: str) -> int:
    """Rough upper bound of the bytes a call allocates, to skip cases that cannot fit."""
    d, E = m.d, m.E
    per = {
        "read_x": d * s,
        "l2r_native": 3 * d * s + 256,
        "l2r_ref": 6 * 4 * d + 8 * 4 * E * H + 16 * 4 * E,
        "l2r_ref_compiled": 4 * 4 * d + 4 * 4 * E * H + 8 * 4 * E,
        "linear": 3 * d * s + 12 * 4 * E,
        "linear_fp32": 3 * d * s + 8 * d + 12 * 4 * E,
        "linear_compiled": 3 * d * s + 8 * 4 * E,
        "cosine": 3 * d * s + 8 * 4 * COSINE_DIM + 12 * 4 * E,
    }[contender]
    return int(T * per * (2 if mode == "fwdbwd" else 1))
