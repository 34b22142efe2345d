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
- ``cosine``: a Tutel-style cosine gate: ``h = Linear_{d->256}(x)``, ``logits = <h/|h|, e/|e|> *
  exp(min(t, log 100))`` with learnable expert embeddings ``e [E, 256]`` and temperature ``t``,
  then as ``linear``.
- ``read_x``: the memory-read floor: one reduction over ``x`` (the faster of ``x.sum()`` and
  ``x.amax()``); forward only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

import l2r_cuda
from l2r_cuda import reference

COSINE_DIM = 256
CONTENDERS = ["read_x", "linear", "linear_compiled", "cosine", "l2r_native", "l2r_ref", "l2r_ref_compiled"]
L2R_CONTENDERS = ("l2r_native", "l2r_ref", "l2r_ref_compiled")
COMPILED = ("linear_compiled", "l2r_ref_compiled")
# CUDA-graph capturable (no host synchronization): the reference's bincount sizes its output on the host.
GRAPHABLE = ("read_x", "linear", "linear_compiled", "cosine", "l2r_native")


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
    logits = (x @ w.t()).float()
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
    elif contender in ("linear", "linear_compiled"):
        ps = [rn(m.E, m.d) / math.sqrt(m.d)]
    elif contender == "cosine":
        ps = [rn(COSINE_DIM, m.d) / math.sqrt(m.d), 0.01 * rn(COSINE_DIM), 0.01 * rn(m.E, COSINE_DIM),
              torch.tensor(math.log(1 / 0.07))]
    else:
        ps = []
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
    elif contender == "linear_compiled":
        f = compiled(contender)
    elif contender == "cosine":
        f = cosine_gate
    else:
        raise ValueError(contender)
    return lambda x, *params: f(x, *params, top_k)


def make_step(contender: str, x: Tensor, params: Sequence[Tensor], top_k: int, mode: str, seed: int,
              mark_dynamic: bool = False) -> Tuple[Callable[[], object], List[Tensor]]:
    """A zero-argument callable running one forward ("fwd": inference, nothing requires grad) or
    forward+backward ("fwdbwd"), and the tensors it differentiates with respect to."""
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
    xs = x.detach().clone().requires_grad_(True)
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
    if contender in ("linear", "linear_compiled"):
        return params[0].shape[0]
    return params[2].shape[0]


def read_x_steps(x: Tensor) -> Dict[str, Callable[[], object]]:
    return {"x.sum()": lambda: x.sum(), "x.amax()": lambda: x.amax()}


# ----------------------------------------------------------------------------------------------
# Agreement checks


def _tol(dtype: torch.dtype) -> Tuple[float, float]:
    """(rtol, atol) on probabilities for a contender whose logits are computed in ``dtype``."""
    return (1e-4, 1e-6) if dtype in (torch.float32, torch.float64) else (3e-2, 2e-3)


def _compare_routing(w: Tensor, idx: Tensor, mp: Tensor, lse: Tensor, ref_probs: Tensor,
                     ref_lse: Tensor, rtol: float, atol: float, exact_indices: bool) -> Tuple[bool, str]:
    """Indices: equal to the reference top-k (``exact_indices``), or else a near-tie swap: the
    reference probabilities at the contender's indices equal its own top-k values within tolerance.
    Weights: equal to the reference probabilities at the contender's indices."""
    k = idx.shape[1]
    ref_probs = ref_probs.double()
    ref_top = torch.topk(ref_probs, k, dim=-1)
    at_idx = ref_probs.gather(-1, idx.long())
    E = ref_probs.shape[1]
    if bool(((idx < 0) | (idx >= E)).any()):
        return False, "index out of range"
    same = (idx.long() == ref_top.indices).all(-1)
    n_diff = int((~same).sum())
    if n_diff:
        ok_tie = torch.allclose(at_idx.sort(-1, descending=True).values, ref_top.values, rtol=rtol, atol=atol)
        if exact_indices or not ok_tie:
            return False, f"indices differ on {n_diff}/{idx.shape[0]} tokens (near-tie: {ok_tie})"
    err_w = (w.double() - at_idx).abs().max().item()
    if not torch.allclose(w.double(), at_idx, rtol=rtol, atol=atol):
        return False, f"weights differ (max abs err {err_w:.2e})"
    if not torch.allclose(mp.double(), ref_probs.mean(0), rtol=rtol, atol=atol):
        return False, "mean_probs differ"
    if not torch.allclose(lse.double(), ref_lse.double(), rtol=rtol, atol=max(atol, 1e-5) * 10):
        return False, "lse differ"
    note = f"ok (max|dw|={err_w:.1e}" + (f", {n_diff} near-tie swaps)" if n_diff else ")")
    return True, note


def check_contender(contender: str, x: Tensor, params: Sequence[Tensor], top_k: int,
                    with_grad: bool = True) -> Tuple[bool, str]:
    """Agreement of ``contender`` on ``x`` with its oracle.

    L2R contenders against ``l2r_cuda.reference.route`` (float32 math from the same inputs: indices
    must be equal, weights/lse/mean_probs close; for ``l2r_native`` also the gradients);
    linear/cosine gates against a float64 evaluation of their formula on the same rounded inputs.
    """
    f = forward_fn(contender, top_k)
    with torch.no_grad():
        w, idx, mp, lse = f(x, *params)
    if contender in L2R_CONTENDERS:
        proj, anchors, scale, nw = params
        logits = reference.route_logits(x, proj, anchors, scale, norm_weight=nw)
        probs = torch.softmax(logits, -1)
        ok, msg = _compare_routing(w, idx, mp, lse, probs, torch.logsumexp(logits, -1), 1e-4, 2e-6,
                                   exact_indices=True)
        if ok and with_grad and contender == "l2r_native":
            ok, gmsg = _check_grads(contender, x, params, top_k)
            msg = msg if ok else gmsg
        return ok, msg
    xd = x.double()
    if contender in ("linear", "linear_compiled"):
        logits = xd @ params[0].double().t()
    else:
        wp, bp, emb, t = (p.double() for p in params)
        h = F.normalize(xd @ wp.t() + bp, dim=-1)
        logits = (h @ F.normalize(emb, dim=-1).t()) * torch.clamp(t, max=math.log(100.0)).exp()
    rtol, atol = _tol(x.dtype)
    return _compare_routing(w, idx, mp, lse, torch.softmax(logits, -1), torch.logsumexp(logits, -1),
                            rtol, atol, exact_indices=False)


def _check_grads(contender: str, x: Tensor, params: Sequence[Tensor], top_k: int) -> Tuple[bool, str]:
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
    return True, "ok"


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
    elif contender in ("linear", "linear_compiled"):
        fl_f = 2 * E * d + 6 * E
        fl_b = 4 * E * d + 6 * E
        pb = E * d * s
        if contender == "linear_compiled":
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
        "linear_compiled": 3 * d * s + 8 * 4 * E,
        "cosine": 3 * d * s + 8 * 4 * COSINE_DIM + 12 * 4 * E,
    }[contender]
    return int(T * per * (2 if mode == "fwdbwd" else 1))
