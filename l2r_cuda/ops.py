"""Typed entry points of the native ops (``torch.ops.l2r_cuda.*``)."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from ._library import cuda_built, has_kernel
from .reference import NORMS, SCORES, RouteOutput

__all__ = ["route"]


def _check_device(x: Tensor, op: str) -> None:
    # Only for a clearer message than the dispatcher's: a CUDA tensor in a CPU-only build.
    if x.device.type == "cuda" and not has_kernel(op, "cuda"):
        raise RuntimeError(
            f"l2r_cuda.{op}: x is on {x.device} but this build of l2r_cuda has no CUDA kernel for it "
            f"(cuda_built() = {cuda_built()}); rebuild with a CUDA toolkit (see README) or use "
            "l2r_cuda.reference"
        )


def route(
    x: Tensor,
    proj: Tensor,
    anchors: Tensor,
    scale: Union[Tensor, float],
    top_k: int = 8,
    beta: float = 1.0,
    norm: Optional[str] = "rms",
    norm_weight: Optional[Tensor] = None,
    eps_norm: float = 1e-6,
    tau: float = 1.0,
    score: str = "softmax",
    normalize: bool = False,
    expert_bias: Optional[Tensor] = None,
    eps: float = 1e-6,
) -> RouteOutput:
    """Fused L2R router (SPEC.md): RMSNorm -> low-rank projection -> SIPS against every anchor ->
    log-sum-exp over each expert's anchors -> softmax/sigmoid -> top-k (selection on
    ``probs + expert_bias``) -> weights.

    ``x`` is ``[..., d]`` (leading dims flattened to T) in float32/bfloat16/float16 (float64 for
    gradcheck); math is float32 whatever the input dtype. Returns a :class:`RouteOutput` whose
    ``weights`` ``[T, k]`` (float32), ``mean_probs`` ``[E]`` and ``lse`` ``[T]`` are differentiable
    with respect to ``x, proj, anchors, scale, norm_weight``. ``expert_bias`` only steers selection.
    """
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise ValueError(f"l2r_cuda.route: x must be a tensor [..., d], got {type(x).__name__} "
                         f"with shape {tuple(getattr(x, 'shape', ()))}")
    if score not in SCORES:
        raise ValueError(f"l2r_cuda.route: score must be 'softmax' or 'sigmoid', got {score!r}")
    if norm not in NORMS:
        raise ValueError(f"l2r_cuda.route: norm must be 'rms' or None, got {norm!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"l2r_cuda.route: top_k must be an int, got {top_k!r}")
    if not isinstance(scale, Tensor):
        scale = torch.tensor(float(scale), device=x.device)
    for name, t in (("proj", proj), ("anchors", anchors), ("scale", scale),
                    ("norm_weight", norm_weight), ("expert_bias", expert_bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"l2r_cuda.route: {name} is on {t.device} but x is on {x.device}; "
                             "all inputs must be on one device")
    _check_device(x, "route_forward")
    weights, indices, tokens_per_expert, mean_probs, lse, _, _ = torch.ops.l2r_cuda.route_forward(
        x.reshape(-1, x.shape[-1]), proj, anchors, scale, norm_weight, expert_bias, top_k,
        float(beta), norm, float(eps_norm), float(eps), float(tau), score, bool(normalize),
    )
    return RouteOutput(weights, indices, tokens_per_expert, mean_probs, lse)
