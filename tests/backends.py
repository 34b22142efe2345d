"""Every backend of the route ops behind one interface, for the `backend` fixture of the route tests.

A backend offers ``route``, ``route_logits`` and ``route_from_logits`` with the signatures of
``l2r_cuda.route`` etc., differentiable through autograd, plus what it supports:

* ``cpu-portable``, ``cpu-avx2``, ``cpu-avx512``: the native CPU op with the float kernels of that
  instruction set (``torch.ops.l2r_cuda.cpu_isa``), where this CPU has it;
* ``simt``: the CUDA kernels (csrc/route/cuda/route_cuda.cu, unchanged) in the SIMT CPU emulator,
  through ctypes; autograd through a ``torch.autograd.Function`` calling the emulated backward;
* ``cuda``: the native op on a real GPU (only where one exists), with the kernels nvcc built;
* ``nvrtc``: the same op and kernels compiled at run time by NVRTC (l2r_cuda.jit), on a real GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import pathlib
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "simt"))
import harness as simt  # noqa: E402

from oracle import load  # noqa: E402

_types = load("types")
RouteOutput = _types.RouteOutput
group_args = _types.group_args


@dataclass
class Backend:
    name: str
    device: str
    route: Callable
    route_logits: Callable
    route_from_logits: Callable
    opcheck: bool            # the torch op can go through torch.library.opcheck
    float64: bool            # accepts float64 inputs
    select: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


# ---- native (CPU instruction sets, CUDA) ---------------------------------------------------------

def _cpu_flags() -> str:
    try:
        return pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


CPU_ISAS = {"portable": (), "avx2": ("avx2", "fma", "f16c"),
            "avx512": ("avx512f", "avx512dq", "avx512bw", "avx512vl")}


def cpu_has(isa: str) -> bool:
    flags = _cpu_flags()
    return all(f" {flag}" in flags for flag in CPU_ISAS[isa])


def native_backend(name: str) -> Backend:
    import l2r_cuda

    if name == "cuda":
        return Backend("cuda", "cuda", l2r_cuda.route, l2r_cuda.ops.route_logits, l2r_cuda.ops.route_from_logits,
                       opcheck=True, float64=False)
    if name == "nvrtc":
        return Backend("nvrtc", "cuda", l2r_cuda.route, l2r_cuda.ops.route_logits, l2r_cuda.ops.route_from_logits,
                       opcheck=True, float64=False, select=l2r_cuda.jit.use_nvrtc)
    isa = name.split("-", 1)[1]

    @contextlib.contextmanager
    def select():
        before = torch.ops.l2r_cuda.cpu_isa()
        torch.ops.l2r_cuda.cpu_isa(isa)
        try:
            yield
        finally:
            torch.ops.l2r_cuda.cpu_isa(before)

    return Backend(name, "cpu", l2r_cuda.route, l2r_cuda.ops.route_logits, l2r_cuda.ops.route_from_logits,
                   opcheck=True, float64=True, select=select)


# ---- emulated CUDA ---------------------------------------------------------------------------------

XTYPES = {torch.float32: 0, torch.float16: 2, torch.bfloat16: 3}
MODES = {"route": 0, "logits": 1, "select": 2}
_P, _L, _I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
_LIB = None
# The route kernels' persistent counters (route_kernel_params.h kRouteCounterWords): zero between
# launches, as the CUDA glue keeps one buffer per stream; every launch must leave them zero.
COUNTER_WORDS = 128
_COUNTERS = torch.zeros(COUNTER_WORDS, dtype=torch.int32)


def simt_library():
    global _LIB
    if _LIB is None:
        lib = simt.build(sources=[ROOT / "csrc/route/cuda/route_cuda.cu"], include_dirs=[ROOT / "csrc"],
                         driver_source=ROOT / "tests/simt/drivers/route_driver.cpp", name="route_cuda")
        lib.drv_forward_workspace.argtypes = [_I, _P, _P, _P]
        lib.drv_forward_workspace.restype = _L
        lib.drv_backward_workspace.argtypes = [_I, _L, _L, _I, _I, _I, _I, _L]
        lib.drv_backward_workspace.restype = _L
        lib.drv_forward.argtypes = [_I] + [_P] * 3 + [_P, _I] + [_P] * 17
        lib.drv_forward.restype = _I
        lib.drv_backward.argtypes = [_I] + [_P] * 3 + [_I, _I] + [_P] * 4 + [_P, _I] + [_P] * 17
        lib.drv_backward.restype = _I
        _LIB = lib
    return _LIB


def _ptr(t: Optional[torch.Tensor], uninitialized: bool = False):
    """uninitialized: the CUDA glue (csrc/route/cuda/route_ops_cuda.cpp) allocates this buffer with
    at::empty, so the kernels must write before they read it (the emulator's initcheck)."""
    return None if t is None else simt.ptr(t, uninitialized=uninitialized)


@dataclass
class _Call:
    """One route call's sizes and options in the driver's layout."""
    mode: int
    sizes: torch.Tensor   # int64 [7]
    opts: torch.Tensor    # float64 [5]
    flags: torch.Tensor   # int32 [6]
    groups: int


def _call(mode, T, d, r, E, H, k, seq_len, *, beta=1.0, eps_norm=1e-6, eps=1e-6, tau=1.0, norm="rms",
          score="softmax", normalize=False, num_groups=None, topk_groups=None, group_score="top2_sum",
          routed_scaling_factor=1.0):
    g, kept, policy = group_args(num_groups, topk_groups, group_score)
    sizes = torch.tensor([T, d, r, E, H, k, seq_len or 0], dtype=torch.int64)
    opts = torch.tensor([beta, eps_norm, eps, tau, routed_scaling_factor], dtype=torch.float64)
    flags = torch.tensor([int(norm == "rms"), int(score == "sigmoid"), int(bool(normalize)), g, kept,
                          int(policy == "max")], dtype=torch.int32)
    groups = T // seq_len if seq_len else 1
    return _Call(MODES[mode], sizes, opts, flags, groups)


def _run(lib, fn, *args, seed=0):
    rc = simt.call(lib, fn, *args, seed=seed)
    assert rc == 0, f"{fn} failed with code {rc}"


def _forward(call: _Call, x, proj, anchors, scale, norm_weight, logits_in, bias, padding, seed=0,
             persistent_counters=True):
    """The forward launcher; persistent_counters=False passes no counters (the plan zeroes its own
    in the workspace first, as under CUDA graph capture)."""
    lib = simt_library()
    T, d, r, E, H, k, seq_len = call.sizes.tolist()
    f32 = dict(dtype=torch.float32)
    stats = (call.groups, E)
    out = dict(
        weights=torch.full((T, k), float("nan"), **f32), indices=torch.full((T, k), -7, dtype=torch.int64),
        tokens_per_expert=torch.full(stats, -7, dtype=torch.int64), mean_probs=torch.full(stats, float("nan"), **f32),
        lse=torch.full((T,), float("nan"), **f32), q=torch.full((T, r), float("nan"), **f32),
        rstd=torch.full((T,), float("nan"), **f32), logits=torch.full((T, E), float("nan"), **f32))
    ws_floats = lib.drv_forward_workspace(call.mode, _ptr(call.sizes), _ptr(call.opts), _ptr(call.flags))
    assert ws_floats >= 0
    ws = torch.full((max(1, ws_floats),), float("nan"), **f32)
    counters = simt.ptr(_COUNTERS, "counters") if persistent_counters else None
    # at::empty in the CUDA glue: weights, indices, lse, q, rstd, logits and the workspace (the
    # statistics are zeros there, the counters the executor's zeroed words)
    _run(lib, "drv_forward", call.mode, _ptr(call.sizes), _ptr(call.opts), _ptr(call.flags), _ptr(x),
         XTYPES[x.dtype] if x is not None else 0, _ptr(proj), _ptr(anchors), _ptr(norm_weight), _ptr(scale),
         _ptr(logits_in), _ptr(bias), _ptr(padding), _ptr(out["weights"], True), _ptr(out["indices"], True),
         _ptr(out["tokens_per_expert"]), _ptr(out["mean_probs"]), _ptr(out["lse"], True), _ptr(out["q"], True),
         _ptr(out["rstd"], True), _ptr(out["logits"], True), counters, _ptr(ws, True), seed=seed)
    assert not _COUNTERS.any(), f"the forward left its persistent counters at {_COUNTERS.nonzero().flatten().tolist()}"
    return out


def _mean_grad_per_token(grad_mean_probs, call: _Call, padding):
    """grad_mean_probs / (non-padding tokens of each group), as the CUDA adapter passes it."""
    T, E = int(call.sizes[0]), int(call.sizes[3])
    counted = torch.ones(T, dtype=torch.bool) if padding is None else ~padding
    counts = counted.reshape(call.groups, -1).sum(1).float()
    inv = torch.where(counts > 0, 1.0 / counts, torch.zeros_like(counts))
    return (grad_mean_probs.float().reshape(call.groups, E) * inv[:, None]).contiguous()


def _backward(call: _Call, grads, saved, need_grad_x=True, need_param_grads=True, seed=0):
    lib = simt_library()
    T, d, r, E, H, k, seq_len = call.sizes.tolist()
    gw, gm, gl, glogits = grads
    x, proj, anchors, scale, norm_weight, logits_in, padding, indices, q, rstd = saved
    f32 = dict(dtype=torch.float32)
    out = dict(
        grad_x=torch.full_like(x, float("nan")) if x is not None else None,
        grad_proj=torch.full((r, d), float("nan"), **f32), grad_anchors=torch.full((E, H, r), float("nan"), **f32),
        grad_scale=torch.full((1,), float("nan"), **f32), grad_norm_weight=torch.full((d,), float("nan"), **f32),
        grad_logits=torch.full((T, E), float("nan"), **f32))
    if call.mode != MODES["select"] and need_param_grads:
        for key in ("grad_proj", "grad_anchors", "grad_scale", "grad_norm_weight"):
            out[key].zero_()  # the launcher writes them; zero where it does not (e.g. no norm weight)
    bad = torch.zeros(1, dtype=torch.int32)
    ws = torch.full((max(1, lib.drv_backward_workspace(call.mode, T, d, r, E, H, k, seq_len)),), float("nan"), **f32)
    gm = None if gm is None else _mean_grad_per_token(gm, call, padding)
    # at::empty in the CUDA glue: dL/dx when it is asked for (zeros otherwise) and the workspace (the
    # parameter gradients, dL/dlogits and the bad-index flag are zeros there)
    _run(lib, "drv_backward", call.mode, _ptr(call.sizes), _ptr(call.opts), _ptr(call.flags), int(need_grad_x),
         int(need_param_grads), _ptr(gw), _ptr(gm), _ptr(gl), _ptr(glogits), _ptr(x),
         XTYPES[x.dtype] if x is not None else 0, _ptr(proj), _ptr(anchors), _ptr(norm_weight), _ptr(scale),
         _ptr(logits_in), _ptr(padding), _ptr(indices), _ptr(q), _ptr(rstd), _ptr(out["grad_x"], need_grad_x),
         _ptr(out["grad_proj"]), _ptr(out["grad_anchors"]), _ptr(out["grad_scale"]), _ptr(out["grad_norm_weight"]),
         _ptr(out["grad_logits"]), _ptr(bad), _ptr(ws, True), seed=seed)
    out["bad_index"] = int(bad.item())
    return out


def _f32(t):
    return None if t is None else t.detach().float().contiguous()


def _contiguous(t):
    return None if t is None else t.detach().contiguous()


def _used_norm_weight(norm_weight, call):
    # norm=None ignores norm_weight (its gradient is zero), as the native op does.
    return _f32(norm_weight) if norm_weight is not None and int(call.flags[0]) else None


def _norm_weight_grad(ctx, out):
    if not ctx.has_norm_weight:
        return None
    return out["grad_norm_weight"] if ctx.uses_norm_weight else torch.zeros_like(out["grad_norm_weight"])


class _SimtRoute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, proj, anchors, scale, norm_weight, call, bias, padding, seed):
        saved = (_contiguous(x), _f32(proj), _f32(anchors), _f32(scale.reshape(1)),
                 _used_norm_weight(norm_weight, call), None, padding)
        out = _forward(call, *saved[:5], None, _f32(bias), padding, seed=seed)
        ctx.call, ctx.seed, ctx.dtypes = call, seed, (proj.dtype, anchors.dtype, scale.dtype, scale.shape)
        ctx.has_norm_weight, ctx.uses_norm_weight = norm_weight is not None, saved[4] is not None
        ctx.simt_saved = saved + (out["indices"], out["q"], out["rstd"])
        ctx.mark_non_differentiable(out["indices"], out["tokens_per_expert"])
        stats_shape = tuple(out["mean_probs"].shape) if call.sizes[6] else (out["mean_probs"].shape[1],)
        return (out["weights"], out["indices"], out["tokens_per_expert"].reshape(stats_shape),
                out["mean_probs"].reshape(stats_shape), out["lse"])

    @staticmethod
    def backward(ctx, gw, _gi, _gt, gm, gl):
        out = _backward(ctx.call, (_f32(gw), _f32(gm), _f32(gl), None), ctx.simt_saved,
                        need_grad_x=ctx.needs_input_grad[0], need_param_grads=any(ctx.needs_input_grad[1:5]),
                        seed=ctx.seed)
        assert out["bad_index"] == 0
        pd, ad, sd, sshape = ctx.dtypes
        return (out["grad_x"], out["grad_proj"].to(pd), out["grad_anchors"].to(ad),
                out["grad_scale"].reshape(sshape).to(sd), _norm_weight_grad(ctx, out), None, None, None, None)


def simt_route(x, proj, anchors, scale, top_k=8, beta=1.0, norm="rms", norm_weight=None, eps_norm=1e-6, tau=1.0,
               score="softmax", normalize=False, expert_bias=None, eps=1e-6, *, num_groups=None, topk_groups=None,
               group_score="top2_sum", routed_scaling_factor=1.0, seq_len=None, padding_mask=None, seed=0):
    tokens = x.reshape(-1, x.shape[-1])
    T, d = tokens.shape
    if not isinstance(scale, torch.Tensor):
        scale = torch.tensor(float(scale))
    call = _call("route", T, d, proj.shape[0], anchors.shape[0], anchors.shape[1], top_k, seq_len, beta=beta,
                 eps_norm=eps_norm, eps=eps, tau=tau, norm=norm, score=score, normalize=normalize,
                 num_groups=num_groups, topk_groups=topk_groups, group_score=group_score,
                 routed_scaling_factor=routed_scaling_factor)
    padding = None if padding_mask is None else padding_mask.reshape(-1).contiguous()
    return RouteOutput(*_SimtRoute.apply(tokens, proj, anchors, scale, norm_weight, call, expert_bias, padding,
                                         seed))


class _SimtLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, proj, anchors, scale, norm_weight, call, seed):
        saved = (_contiguous(x), _f32(proj), _f32(anchors), _f32(scale.reshape(1)),
                 _used_norm_weight(norm_weight, call), None, None)
        out = _forward(call, *saved[:5], None, None, None, seed=seed)
        ctx.call, ctx.seed, ctx.dtypes = call, seed, (proj.dtype, anchors.dtype, scale.dtype, scale.shape)
        ctx.has_norm_weight, ctx.uses_norm_weight = norm_weight is not None, saved[4] is not None
        ctx.simt_saved = saved + (None, out["q"], out["rstd"])
        return out["logits"]

    @staticmethod
    def backward(ctx, grad_logits):
        out = _backward(ctx.call, (None, None, None, _f32(grad_logits)), ctx.simt_saved,
                        need_grad_x=ctx.needs_input_grad[0], need_param_grads=any(ctx.needs_input_grad[1:5]),
                        seed=ctx.seed)
        pd, ad, sd, sshape = ctx.dtypes
        return (out["grad_x"], out["grad_proj"].to(pd), out["grad_anchors"].to(ad),
                out["grad_scale"].reshape(sshape).to(sd), _norm_weight_grad(ctx, out), None, None)


def simt_route_logits(x, proj, anchors, scale, *, beta=1.0, norm="rms", norm_weight=None, eps_norm=1e-6, eps=1e-6,
                      tau=1.0, seed=0):
    tokens = x.reshape(-1, x.shape[-1])
    if not isinstance(scale, torch.Tensor):
        scale = torch.tensor(float(scale))
    call = _call("logits", tokens.shape[0], tokens.shape[1], proj.shape[0], anchors.shape[0], anchors.shape[1], 1,
                 None, beta=beta, eps_norm=eps_norm, eps=eps, tau=tau, norm=norm)
    return _SimtLogits.apply(tokens, proj, anchors, scale, norm_weight, call, seed)


class _SimtSelect(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, call, bias, padding, seed):
        saved_logits = _f32(logits)
        out = _forward(call, None, None, None, None, None, saved_logits, _f32(bias), padding, seed=seed)
        ctx.call, ctx.seed, ctx.dtype = call, seed, logits.dtype
        ctx.simt_saved = (None, None, None, None, None, saved_logits, padding, out["indices"], None, None)
        ctx.mark_non_differentiable(out["indices"], out["tokens_per_expert"])
        stats_shape = tuple(out["mean_probs"].shape) if call.sizes[6] else (out["mean_probs"].shape[1],)
        return (out["weights"], out["indices"], out["tokens_per_expert"].reshape(stats_shape),
                out["mean_probs"].reshape(stats_shape), out["lse"])

    @staticmethod
    def backward(ctx, gw, _gi, _gt, gm, gl):
        out = _backward(ctx.call, (_f32(gw), _f32(gm), _f32(gl), None), ctx.simt_saved, seed=ctx.seed)
        assert out["bad_index"] == 0
        return out["grad_logits"].to(ctx.dtype), None, None, None, None


def simt_route_from_logits(logits, top_k, *, score="softmax", normalize=False, expert_bias=None, num_groups=None,
                           topk_groups=None, group_score="top2_sum", routed_scaling_factor=1.0, seq_len=None,
                           padding_mask=None, seed=0):
    T, E = logits.shape
    call = _call("select", T, 1, 1, E, 1, top_k, seq_len, score=score, normalize=normalize, num_groups=num_groups,
                 topk_groups=topk_groups, group_score=group_score, routed_scaling_factor=routed_scaling_factor)
    padding = None if padding_mask is None else padding_mask.reshape(-1).contiguous()
    return RouteOutput(*_SimtSelect.apply(logits, call, expert_bias, padding, seed))


def simt_backend() -> Backend:
    return Backend("simt", "cpu", simt_route, simt_route_logits, simt_route_from_logits, opcheck=False,
                   float64=False)


# ---- the list the fixture walks ----------------------------------------------------------------------

BACKEND_NAMES = ["cpu-portable", "cpu-avx2", "cpu-avx512", "simt", "cuda", "nvrtc"]
GPU_BACKENDS = ("cuda", "nvrtc")


def available(name: str) -> Optional[str]:
    """None when `name` can run here, else why not."""
    if name.startswith("cpu-"):
        return None if cpu_has(name.split("-", 1)[1]) else f"this CPU lacks {name}"
    if name == "simt":
        return None if simt.have_compiler() else "g++ missing"
    if name == "cuda":
        import l2r_cuda

        if not torch.cuda.is_available():
            return "needs a CUDA device"
        if not l2r_cuda.cuda_built():
            return "CPU-only build"
        return None
    if name == "nvrtc":
        if not torch.cuda.is_available():
            return "needs a CUDA device"
        import l2r_cuda.jit

        reasons = l2r_cuda.jit.unavailable_reasons()
        return "; ".join(reasons) if reasons else None
    raise ValueError(name)


def make(name: str) -> Backend:
    return simt_backend() if name == "simt" else native_backend(name)
