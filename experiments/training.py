"""One training run of one arm at one seed: the task loss plus the arm's router regularisers, with a
per-layer trace of the routers during training and the held-out evaluation at the end.

Regularisers (coefficients in :class:`TrainConfig`; per MoE layer, summed over layers):

* Switch load balancing, every arm: ``lb_coef · E Σ_e f_e P_e`` with ``P_e`` the mean routing
  probability renormalised to sum to one (a no-op for the softmax scores used here; it keeps the
  loss at 1 for uniform routing should sigmoid scores be used).
* router z-loss, ``+z`` arms only: ``z_coef · mean_t lse_t²``.
* SR-MoE, ``+SR-MoE`` arms: ``sn_coef · max(0, σ_max(W) − c)² + sr_coef · (−stable rank(W))`` on the
  router weight (L2R ``proj``, linear ``weight``), with the threshold ``c = sn_frac · σ_max(W_0)``
  set per layer from the initial weight, so the hinge is active from the first step on both routers
  (a fixed ``c = 2`` never was: σ_max stayed ≤ 1.1).
* RoMA, ``+RoMA`` arms: ``roma_loss`` of the per-sample routing vectors (the top-k weights averaged
  over the sample's tokens, layers concatenated) toward the ``roma_k`` nearest *successful*
  samples of the batch in a task embedding fixed by the task (digits: the raw pixels; LM: the
  window's byte histogram), median-heuristic bandwidth. Its gradient reaches the router parameters
  only (RoMA trains routers alone); it is applied during the whole run, not as a post-training
  phase.

The trace (``log_points`` evenly spaced steps, first and last included) holds, per layer, the
:data:`experiments.diagnostics.TRACE_KEYS` on that step's training batch, and the mean of every loss
term over the steps since the previous log point (the z-loss value is logged for every arm, whether
or not it is trained on).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Dict, List

import torch
from torch import Tensor, nn

from l2r_cuda import losses
from l2r_cuda.routers import router_parameters

from . import diagnostics
from .arms import NUM_EXPERTS, Arm
from .model import build_paired

LOSS_TERMS = ("task", "lb", "z", "sn_penalty", "sr_penalty", "roma")


@dataclass
class TrainConfig:
    steps: int
    batch_size: int
    lr: float = 3e-3
    warmup_frac: float = 0.05
    min_lr_frac: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    lb_coef: float = 1e-2
    z_coef: float = 1e-3
    sn_coef: float = 1e-1
    sn_frac: float = 0.75
    sr_coef: float = 1e-3
    roma_weight: float = 1.0
    roma_k: int = 3
    log_points: int = 10


def _lr_lambda(hp: TrainConfig):
    warmup = max(1, int(hp.warmup_frac * hp.steps))

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, hp.steps - warmup)
        return hp.min_lr_frac + (1 - hp.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return fn


def log_steps(hp: TrainConfig) -> List[int]:
    points = max(2, hp.log_points)
    return sorted({round(i * (hp.steps - 1) / (points - 1)) for i in range(points)})


def router_terms(model: nn.Module, arm: Arm, hp: TrainConfig, sn_max: List[float]) -> Dict[str, Tensor]:
    """The per-step router loss terms, summed over layers (unweighted)."""
    terms = {name: torch.zeros(()) for name in ("lb", "z", "sn_penalty", "sr_penalty")}
    for block, threshold in zip(model.blocks, sn_max):
        route = block.moe.last_route
        probs = route.mean_probs / route.mean_probs.sum().clamp_min(1e-12)
        terms["lb"] = terms["lb"] + losses.load_balancing_loss(route.tokens_per_expert, probs)
        terms["z"] = terms["z"] + losses.router_z_loss(route.lse)
        if arm.srmoe:
            weight = diagnostics.router_weight(block.moe.router)
            terms["sn_penalty"] = terms["sn_penalty"] + losses.spectral_norm_penalty(weight, threshold)
            terms["sr_penalty"] = terms["sr_penalty"] + losses.stable_rank_penalty(weight)
    return terms


def routing_vectors(model: nn.Module, batch_size: int) -> Tensor:
    """``[B, L·E]``: per sample, the top-k routing weights averaged over its tokens, layers concatenated."""
    per_layer = []
    for block in model.blocks:
        route = block.moe.last_route
        dense = losses.dense_routing_weights(route.weights, route.indices, NUM_EXPERTS)
        per_layer.append(dense.view(batch_size, -1, NUM_EXPERTS).mean(1))
    return torch.cat(per_layer, dim=1)


def train_one(task, arm: Arm, seed: int, hp: TrainConfig, *, keep_points: bool = False) -> dict:
    """Train ``arm`` at ``seed``; return the held-out metrics, the routing diagnostics and the trace."""
    start = time.time()
    model = build_paired(task.build_model, arm, seed)
    sn_max = [hp.sn_frac * float(losses.spectral_norm(diagnostics.router_weight(r).detach())) for r in model.routers()]
    routers = list(router_parameters(model))
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(hp))
    data_gen = torch.Generator().manual_seed(seed)
    at = set(log_steps(hp))
    trace: Dict[str, list] = {"step": [], **{t: [] for t in LOSS_TERMS},
                              **{k: [] for k in diagnostics.TRACE_KEYS}}
    sums = {t: 0.0 for t in LOSS_TERMS}
    since = 0
    model.train()
    for step in range(hp.steps):
        model.set_record(step in at)
        batch = task.sample_batch(data_gen, hp.batch_size)
        task_loss, success = task.loss(model, batch)
        terms = router_terms(model, arm, hp, sn_max)
        loss = task_loss + hp.lb_coef * terms["lb"]
        if arm.z_loss:
            loss = loss + hp.z_coef * terms["z"]
        if arm.srmoe:
            loss = loss + hp.sn_coef * terms["sn_penalty"] + hp.sr_coef * terms["sr_penalty"]
        optimizer.zero_grad(set_to_none=True)
        roma = torch.zeros(())
        if arm.roma:
            roma = losses.roma_loss(routing_vectors(model, hp.batch_size), task.sample_embedding(batch), success,
                                    k=hp.roma_k, sigma=None, weight=hp.roma_weight)
            roma_grads = torch.autograd.grad(roma, routers, retain_graph=True, allow_unused=True)
        loss.backward()
        if arm.roma:
            for param, grad in zip(routers, roma_grads):
                if grad is not None:
                    param.grad = grad if param.grad is None else param.grad + grad
        if hp.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), hp.grad_clip)
        optimizer.step()
        schedule.step()
        for name, value in (("task", task_loss), ("roma", roma), *terms.items()):
            sums[name] += float(value.detach())
        since += 1
        if step in at:
            trace["step"].append(step)
            for name in LOSS_TERMS:
                trace[name].append(sums[name] / since)
                sums[name] = 0.0
            since = 0
            states = [diagnostics.router_state(block.moe.router, block.moe_input) for block in model.blocks]
            for key in diagnostics.TRACE_KEYS:
                trace[key].append([s[key] for s in states])
            model.set_record(False)
    train_time = time.time() - start
    model.eval()
    model.set_record(True)
    with torch.no_grad():
        scores, labels = task.evaluate(model)
        held = diagnostics.held_out(model, labels, task.num_labels, keep_points=keep_points)
    model.set_record(False)
    return {"arm": arm.name, "seed": seed, **scores, **held, "sn_max": sn_max, "trace": trace,
            "train_loss": trace["task"][-1], "train_time_s": train_time}
