"""Per-layer routing diagnostics, for any router returning a ``RouteOutput``.

* ``router_entropy``: mean over tokens of the entropy of the full routing distribution ``p[t, :]``
  divided by ``log E`` (1 = uniform, 0 = one-hot).
* ``topk_mass``: mean over tokens of the summed probability of the k selected experts (the gate
  weights the expert outputs are mixed with; ``k/E`` = 0.25 for uniform routing).
* ``median_q``: median over tokens of the norm of the routing-space vector: ``|q| = |W x~|`` for L2R
  (the argument of its tanh confidence), ``|x W_g^T|`` (the logit vector) for linear.
* ``scale``: L2R's learned scale (NaN for linear); ``sigma``: the largest singular value of the
  router weight (L2R ``proj [r, d]``, linear ``weight [E, d]``).
* held out only: ``load_entropy`` (normalised entropy of the expert load, 1 = balanced),
  ``specialization`` (I(label; top-1 expert) / H(label), plug-in), ``mi_bits`` (the same
  unnormalised), ``clustering`` (variance of pairwise cosines in the routing space times its
  dimension: about 1 for isotropic directions, **higher = tokens more clustered** in few
  directions, lower = more evenly spread; ``metrics.angular_diversity``), ``stability`` (share of
  tokens keeping their top-k set under input noise of std ``STABILITY_NOISE``; the MoE input is a
  LayerNorm output, RMS ~1).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Dict, List

import torch
from torch import Tensor, nn

from l2r_cuda import L2RRouter, losses, metrics

from .arms import NUM_EXPERTS

STABILITY_NOISE = 0.1
TRACE_KEYS = ("router_entropy", "topk_mass", "median_q", "scale", "sigma")


@contextmanager
def _all_experts_selected(router: nn.Module):
    # the routers' forward reads top_k from their RouteConfig (router.top_k is only its mirror)
    top_k, config = router.top_k, router.config
    router.top_k, router.config = router.num_experts, config.replace(top_k=router.num_experts)
    try:
        yield
    finally:
        router.top_k, router.config = top_k, config


@torch.no_grad()
def full_probs(router: nn.Module, x: Tensor) -> Tensor:
    """The routing probabilities of every expert, ``[T, E]``: the router run with ``top_k = E``
    (its own forward, so exactly the probabilities its top-k picks from)."""
    with _all_experts_selected(router):
        out = router(x)
    return torch.zeros(out.indices.shape[0], router.num_experts).scatter_(1, out.indices, out.weights.float())


def router_weight(router: nn.Module) -> Tensor:
    return router.proj if isinstance(router, L2RRouter) else router.weight


@torch.no_grad()
def router_state(router: nn.Module, x: Tensor) -> Dict[str, float]:
    """The trace quantities of one router on its input ``x [T, d]``."""
    probs = full_probs(router, x)
    conf = metrics.router_confidence(probs, probs)
    topk_mass = float(probs.topk(router.top_k, dim=-1).values.sum(-1).mean())
    q_norm = torch.linalg.vector_norm(metrics.routing_space(router, x), dim=-1)
    scale = float(router.scale) if isinstance(router, L2RRouter) else math.nan
    return {"router_entropy": conf.entropy_normalized, "topk_mass": topk_mass, "median_q": float(q_norm.median()),
            "scale": scale, "sigma": float(losses.spectral_norm(router_weight(router)))}


@torch.no_grad()
def held_out(model: nn.Module, labels: Tensor, num_labels: int, *, keep_points: bool,
             max_points: int = 1500) -> Dict[str, object]:
    """Per-layer diagnostics from the MoE inputs recorded during the evaluation forward: every key
    holds a list over layers; ``load_fractions`` the per-layer expert load; ``points`` a sample of
    the last layer's 2-D routing space (``keep_points`` and rank 2 only)."""
    out: Dict[str, List] = {k: [] for k in ("load_entropy", "specialization", "mi_bits", "clustering", "stability",
                                            "load_fractions", *TRACE_KEYS)}
    result: Dict[str, object] = {}
    for layer, block in enumerate(model.blocks):
        x, router = block.moe_input, block.moe.router
        route = router(x)
        load = metrics.expert_load(route.tokens_per_expert)
        out["load_entropy"].append(load.entropy)
        out["load_fractions"].append([float(f) for f in load.fractions])
        spec = metrics.expert_specialization(route.indices, labels, NUM_EXPERTS, num_labels)
        out["specialization"].append(spec.normalized)
        out["mi_bits"].append(spec.mutual_information)
        q = metrics.routing_space(router, x)
        out["clustering"].append(metrics.angular_diversity(q, max_tokens=2048).cosine_variance_scaled)
        out["stability"].append(metrics.routing_stability(router, x, noise_std=STABILITY_NOISE, seed=0))
        for key, value in router_state(router, x).items():
            out[key].append(value)
        if keep_points and layer == len(model.blocks) - 1 and isinstance(router, L2RRouter) and router.rank == 2:
            pick = torch.randperm(q.shape[0], generator=torch.Generator().manual_seed(0))[:max_points]
            result["points"] = {"layer": layer, "q": q[pick].double().round(decimals=4).tolist(), "labels": labels[pick].tolist(),
                                "top1": route.indices[pick, 0].tolist(), "anchors": router.anchors.detach().tolist()}
    result.update(out)
    return result
