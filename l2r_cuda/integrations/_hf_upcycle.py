"""Upcycling a trained linear gate into an L2R router: the linear initialisation, the top-k
agreement with the original gate, and distillation of the routers on the model's own hidden states
(see :mod:`l2r_cuda.integrations.hf`).

Linear initialisation (``replace_routers(..., init="linear")``), for a gate ``z = W_g h`` with
``W_g = U S V^T``:

* ``proj = V_r^T``: the top-``r`` right-singular vectors (orthonormal rows, as L2R's own init), so
  ``q`` holds the token's coordinates in the subspace the gate reads most. The router's RMSNorm in
  front (``norm_weight = 1``) only rescales each token by a positive factor, which changes neither
  the cosine in SIPS nor which experts win.
* every anchor of expert ``e`` points along row ``e`` of ``U_r S_r`` (its rank-``r`` gate vector),
  with the norm whose confidence ``phi(|a|)`` is proportional to that row's length (the longest
  row gets ``|a| = 1``, L2R's default), so ``phi(|a_e|) <q, a_e> / |a_e|`` is proportional to the
  rank-``r`` gate logit and the router's top-k is the rank-``r`` gate's top-k. The ``H`` anchors
  of an expert start on that direction with a 1% jitter (identical anchors would get identical
  gradients forever); their log-sum-exp adds about ``tau log H`` to every logit, which softmax
  ignores.
* ``scale``: least squares between the L2R logits and the rank-``r`` gate logits (centred per
  token for softmax, which is shift-invariant) over tokens of unit RMS isotropic in the
  ``r``-subspace (the gate's input is an RMSNorm output). Real hidden states are not isotropic:
  :func:`distill_routers` fits the rest on them. For a sigmoid gate (DeepSeek-V3) the logits are
  not centred: the L2R logits (with the ``tau log H`` offset) are fitted to the gate's values, on
  which its group scores, correction bias and weights depend. The gate's routing policy (group
  limit, scaling factor, correction bias as ``expert_bias``) is carried by the router whatever
  the initialisation (:mod:`._hf_gate`).

Nothing silently dropped: a logit bias (GPT-OSS) has no counterpart in L2R's logits, so the
linear initialisation refuses it (``init="random"`` plus distillation still can learn to mimic it).
"""

from __future__ import annotations

import itertools
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tqdm.auto import tqdm  # a dependency of transformers, which this integration needs anyway

from ..ops import route_logits
from ._hf_gate import GateContract, L2RGate, UnsupportedGateFeature, original_routing

__all__ = ["init_from_linear", "routing_agreement", "distill_routers", "DistillReport"]

ANCHOR_JITTER = 1e-2
FIT_SAMPLES = 4096

Batch = Union[Tensor, Mapping[str, Tensor]]


def _phi_inverse(phi: Tensor, beta: float) -> Tensor:
    """Norm ``n`` with ``(1 - beta) + beta tanh(n) = phi``, for phi inside phi's range."""
    floor = 1.0 - beta
    return torch.atanh(((phi - floor) / beta).clamp(1e-6, 1.0 - 1e-6))


@torch.no_grad()
def init_from_linear(gate: L2RGate, weight: Tensor, contract: GateContract) -> None:
    """Initialise ``gate.router`` from the linear gate weight ``W_g [E, d]`` (module docstring)."""
    if contract.logit_bias is not None and bool(contract.logit_bias.ne(0).any()):
        raise UnsupportedGateFeature(
            "bias: the gate adds a learned per-expert bias to its logits, which L2R's logits have no term for; "
            "init='linear' would drop it. Use init='random' and distill_routers (its target includes the bias)")
    router = gate.router
    rank, d, num_experts = router.rank, router.d_model, router.num_experts
    if rank > d:
        raise ValueError(f"init='linear': rank {rank} exceeds the hidden size {d}")
    w = weight.detach().to(torch.float64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    k = min(rank, s.numel())
    basis, coords = vh[:k], u[:, :k] * s[:k]  # [k, d], [E, k]: W_g ~ coords @ basis
    if rank > k:  # more routing dims than the gate's rank: orthonormal complement, zero anchor coordinates
        rand = torch.randn(d, rank - k, dtype=w.dtype, device=w.device)
        q, _ = torch.linalg.qr(torch.cat([basis.t(), rand], dim=1))
        basis = torch.cat([basis, q[:, k:rank].t()])
        coords = torch.cat([coords, coords.new_zeros(num_experts, rank - k)], dim=1)

    lengths = torch.linalg.vector_norm(coords, dim=-1)  # [E]
    directions = coords / lengths.clamp_min(1e-30)[:, None]
    empty = lengths == 0
    if bool(empty.any()):  # an all-zero gate row: any direction, smallest confidence
        rand = torch.randn(int(empty.sum()), rank, dtype=w.dtype, device=w.device)
        directions[empty] = rand / torch.linalg.vector_norm(rand, dim=-1, keepdim=True)
    beta = router.beta
    if beta > 0:
        phi_max = (1.0 - beta) + beta * math.tanh(1.0)
        norms = _phi_inverse(phi_max * lengths / lengths.max().clamp_min(1e-30), beta)
    else:  # pure cosine: no per-expert confidence to set
        norms = torch.ones_like(lengths)
    anchor = directions * norms[:, None]  # [E, r]
    anchors = anchor[:, None, :].expand(num_experts, router.num_anchors, rank).clone()
    if router.num_anchors > 1:
        anchors += ANCHOR_JITTER * norms[:, None, None] * torch.randn_like(anchors)

    scale = _fit_scale(coords, anchors[:, :1], router, contract.score)
    router.proj.copy_(basis.to(router.proj.dtype))
    router.anchors.copy_(anchors.to(router.anchors.dtype))
    router.scale.fill_(scale)
    if router.norm_weight is not None:
        router.norm_weight.fill_(1.0)


def _fit_scale(coords: Tensor, anchors: Tensor, router, score: str) -> float:
    """Least-squares ``scale`` of the L2R logits against the rank-r gate logits ``coords @ q``."""
    rank = coords.shape[1]
    gen = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(FIT_SAMPLES, rank, generator=gen, dtype=torch.float64).to(coords.device)
    target = q @ coords.t()  # [N, E]
    unit = route_logits(q.float(), torch.eye(rank, device=q.device), anchors.float(),
                        torch.ones((), device=q.device), beta=router.beta, norm=None, norm_weight=None,
                        eps_norm=router.eps_norm, eps=router.eps, tau=router.tau).double()
    offset = router.tau * math.log(router.num_anchors)  # the log-sum-exp of H equal anchors
    if score == "softmax":
        unit = unit - unit.mean(-1, keepdim=True)
        target = target - target.mean(-1, keepdim=True)
    else:
        target = target - offset
    denom = float(unit.pow(2).sum())
    return float((unit * target).sum()) / denom if denom > 0 else router.init_scale


def _run(model: nn.Module, batch: Batch):
    return model(**batch) if isinstance(batch, Mapping) else model(batch)


@contextmanager
def _probing(gates: Sequence[L2RGate], probe):
    for gate in gates:
        gate.set_probe(probe)
    try:
        yield
    finally:
        for gate in gates:
            gate.set_probe(None)


def _gates_with_originals(model: nn.Module) -> List[L2RGate]:
    gates = [m for m in model.modules() if isinstance(m, L2RGate)]
    if not gates:
        raise ValueError(f"{type(model).__name__} has no L2R gate: call replace_routers first")
    missing = [g for g in gates if g.original_gate is None]
    if missing:
        raise ValueError(f"{len(missing)} of {len(gates)} L2R gates have no original gate (rebuilt from a "
                         "checkpoint?): agreement and distillation compare against the gates replace_routers "
                         "replaced, in the same process")
    return gates


@torch.no_grad()
def routing_agreement(model: nn.Module, batches: Iterable[Batch]) -> float:
    """Top-k agreement of the L2R routers with the gates they replaced, as the model runs with L2R
    routing: over every gate and token of ``batches`` (input-id tensors or dicts of model inputs),
    the fraction of the original top-k experts that the L2R router also picks (1 = same sets)."""
    gates = _gates_with_originals(model)
    hits, total = torch.zeros((), dtype=torch.int64), 0

    def probe(gate: L2RGate, tokens: Tensor):
        nonlocal hits, total
        out = gate.route(tokens)
        _, _, original = original_routing(gate, tokens)
        ours = gate.last_route.indices
        hits = hits + (ours[:, :, None] == original[:, None, :].to(ours.device)).any(-1).sum().cpu()
        total += ours.numel()
        return out

    was_training = model.training
    model.eval()
    try:
        with _probing(gates, probe):
            for batch in batches:
                _run(model, batch)
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("routing_agreement: no tokens in batches")
    return int(hits) / total


def _routing_kl(original_logits: Tensor, logits: Tensor, score: str) -> Tensor:
    """Mean over tokens of KL(original routing distribution || L2R routing distribution)."""
    if score == "softmax":
        return F.kl_div(F.log_softmax(logits, -1), F.log_softmax(original_logits, -1), log_target=True,
                        reduction="batchmean")
    # sigmoid scores: each expert is an independent Bernoulli(p_e)
    p = torch.sigmoid(original_logits)
    kl = p * (F.logsigmoid(original_logits) - F.logsigmoid(logits)) + \
        (1 - p) * (F.logsigmoid(-original_logits) - F.logsigmoid(-logits))
    return kl.sum(-1).mean()


@dataclass
class DistillReport:
    """What :func:`distill_routers` did: top-k agreement with the original gates (see
    :func:`routing_agreement`) before and after, and the mean-over-gates routing KL of every step."""

    agreement_before: float
    agreement_after: float
    kl: List[float] = field(default_factory=list)

    def __str__(self) -> str:
        kl = f", KL {self.kl[0]:.4f} -> {self.kl[-1]:.4f}" if self.kl else ""
        return f"top-k agreement {self.agreement_before:.4f} -> {self.agreement_after:.4f}{kl}"


def distill_routers(
    model: nn.Module,
    batches: Sequence[Batch],
    steps: int,
    lr: float = 1e-2,
    *,
    eval_batches: Optional[Sequence[Batch]] = None,
    progress: bool = True,
) -> DistillReport:
    """Train only the L2R routers of ``model`` to route like the gates they replaced.

    Each step runs the model on the next of ``batches`` (cycled; input-id tensors or dicts of model
    inputs) with the **original** gates routing, so every layer sees the model's own hidden states;
    each L2R router computes its logits on its gate's input, and the loss is the mean over gates of
    KL(original routing distribution || L2R routing distribution) (softmax: over experts; sigmoid:
    per expert). Adam with ``lr`` on the router parameters only; everything else stays frozen (no
    gradient is even computed for it). Top-k agreement with the original gates
    (:func:`routing_agreement`) is measured on ``eval_batches`` (default ``batches``) before and
    after. Returns a :class:`DistillReport`; ``progress`` shows a progress bar with the KL.
    """
    if steps < 0:
        raise ValueError(f"distill_routers: steps must be >= 0, got {steps}")
    batches = list(batches)
    if not batches:
        raise ValueError("distill_routers: batches is empty")
    eval_batches = batches if eval_batches is None else list(eval_batches)
    gates = _gates_with_originals(model)
    for gate in gates:
        if gate.router.score != gate.original_score:
            raise ValueError(f"distill_routers: an L2R router scores with {gate.router.score!r} but the gate it "
                             f"replaced with {gate.original_score!r}; their distributions are not comparable")
    params = [p for g in gates for p in g.router.parameters()]
    optimizer = torch.optim.Adam(params, lr=lr)
    report = DistillReport(routing_agreement(model, eval_batches), float("nan"))
    terms: List[Tensor] = []

    def probe(gate: L2RGate, tokens: Tensor):
        out, original_logits, _ = original_routing(gate, tokens)
        with torch.enable_grad():
            logits = gate.router_logits(tokens.detach())
            terms.append(_routing_kl(original_logits.to(logits.device), logits, gate.original_score))
        return out

    was_training = model.training
    model.eval()
    bar = tqdm(total=steps, desc="distilling L2R routers", disable=not progress)
    try:
        with _probing(gates, probe):
            for batch in itertools.islice(itertools.cycle(batches), steps):
                terms.clear()
                with torch.no_grad():
                    _run(model, batch)
                loss = torch.stack(terms).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                report.kl.append(loss.item())
                bar.update(1)
                bar.set_postfix(kl=f"{report.kl[-1]:.4f}")
    finally:
        bar.close()
        optimizer.zero_grad(set_to_none=True)
        model.train(was_training)
    report.agreement_after = routing_agreement(model, eval_batches)
    return report
