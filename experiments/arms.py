"""The experimental arms (router + auxiliary-loss treatment) and the pre-registered comparisons.

Every arm trains the same model with the same budget and data order; an arm only chooses the router
and which router regularisers are on. Defaults of the *fair* training, for every arm:

* router z-loss **off** (it penalises ``lse^2``; L2R's logits are bounded and its multi-anchor
  log-sum-exp adds ``log H``, so ``lse >= log(E·H)`` and the only way to lower it is to flatten
  routing); the ``+z`` arms turn it on (the control);
* Switch load-balancing loss on softmax scores (probabilities summing to one per token, so the loss is
  1 at uniform routing for every router);
* L2R: ``scale = exp(s)`` learned in log space (:mod:`experiments.log_scale_router`), init chosen per
  task by a pilot sweep on separate seeds (see the task module and ``PREREGISTRATION.md``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

from torch import nn

from l2r_cuda import LinearRouter

from .log_scale_router import LogScaleL2RRouter

NUM_EXPERTS = 8
TOP_K = 2


@dataclass(frozen=True)
class Arm:
    name: str
    router: str = "l2r"  # "l2r" or "linear"
    rank: int = 2
    num_anchors: int = 1
    beta: float = 1.0
    init_scale: float = 5.0
    even_anchors: bool = False
    z_loss: bool = False  # router z-loss on (the control)
    srmoe: bool = False  # SR-MoE spectral-norm (active threshold) + stable-rank penalties on the router weight
    roma: bool = False  # RoMA routing-manifold alignment, router parameters only

    def make_router(self, d_model: int) -> nn.Module:
        if self.router == "linear":
            return LinearRouter(d_model, NUM_EXPERTS, TOP_K)
        return LogScaleL2RRouter(d_model, NUM_EXPERTS, TOP_K, rank=self.rank, num_anchors=self.num_anchors,
                                 beta=self.beta, init_scale=self.init_scale, even_anchors=self.even_anchors)


LINEAR = "linear"
PRIMARY = "l2r r=2 H=1"


def l2r_name(rank: int = 2, anchors: int = 1, *, beta: float = 1.0, even: bool = False, init_scale=None) -> str:
    name = f"l2r r={rank} H={anchors}"
    if beta != 1.0:
        name += f" beta={beta:g}"
    if even:
        name += " even"
    if init_scale is not None:
        name += f" s0={init_scale:g}"
    return name


def full_arms(init_scale: float) -> List[Arm]:
    """The grid: linear; the primary L2R (r=2, H=1, beta=1); the paper's ablations; evenly spaced
    anchors; SR-MoE and RoMA on both routers; the z-loss control on both (and on r=2 H=4)."""
    l2r = lambda name, **kw: Arm(name, init_scale=init_scale, **kw)  # noqa: E731
    return [
        Arm(LINEAR, router="linear"),
        l2r(PRIMARY),
        l2r(l2r_name(beta=0.0), beta=0.0),
        l2r(l2r_name(anchors=4), num_anchors=4),
        l2r(l2r_name(anchors=16), num_anchors=16),
        l2r(l2r_name(rank=4), rank=4),
        l2r(l2r_name(rank=8), rank=8),
        l2r(l2r_name(rank=32), rank=32),
        l2r(l2r_name(even=True), even_anchors=True),
        Arm(f"{LINEAR} +SR-MoE", router="linear", srmoe=True),
        l2r(f"{PRIMARY} +SR-MoE", srmoe=True),
        Arm(f"{LINEAR} +RoMA", router="linear", roma=True),
        l2r(f"{PRIMARY} +RoMA", roma=True),
        Arm(f"{LINEAR} +z", router="linear", z_loss=True),
        l2r(f"{PRIMARY} +z", z_loss=True),
        l2r(f"{l2r_name(anchors=4)} +z", num_anchors=4, z_loss=True),
    ]


def quick_arms(init_scale: float) -> List[Arm]:
    """Smoke test: every code path (both routers, SR-MoE, RoMA, z-loss) once."""
    wanted = {LINEAR, PRIMARY, f"{PRIMARY} +SR-MoE", f"{LINEAR} +RoMA", f"{PRIMARY} +z"}
    return [a for a in full_arms(init_scale) if a.name in wanted]


SCALE_SWEEP = (1.5, 5.0, 15.0)


def scale_sweep_arms() -> List[Arm]:
    """The pilot: the primary L2R router at each scale init of ``SCALE_SWEEP`` (plus linear for reference)."""
    return [Arm(LINEAR, router="linear")] + [Arm(l2r_name(init_scale=s), init_scale=s) for s in SCALE_SWEEP]


def contrasts() -> List[Tuple[str, str]]:
    """The pre-registered comparisons ``(arm, comparator)`` on the task metric, primary first; Holm's
    correction runs over all the others (the secondary family)."""
    h4 = l2r_name(anchors=4)
    ablations = [l2r_name(beta=0.0), h4, l2r_name(anchors=16), l2r_name(rank=4), l2r_name(rank=8),
                 l2r_name(rank=32), l2r_name(even=True)]
    out = [(PRIMARY, LINEAR)]
    out += [(arm, LINEAR) for arm in ablations]  # every L2R variant against linear gating
    out += [(f"{PRIMARY} {t}", f"{LINEAR} {t}") for t in ("+SR-MoE", "+RoMA", "+z")]  # L2R vs linear, same treatment
    out += [(f"{h4} +z", f"{LINEAR} +z")]
    out += [(f"{LINEAR} {t}", LINEAR) for t in ("+SR-MoE", "+RoMA", "+z")]  # what each treatment does
    out += [(f"{PRIMARY} {t}", PRIMARY) for t in ("+SR-MoE", "+RoMA", "+z")]
    out += [(f"{h4} +z", h4)]
    out += [(arm, PRIMARY) for arm in ablations]  # the paper's ablations, within L2R
    return out


def z_loss_contrasts() -> List[Tuple[str, str]]:
    """The z-loss control on routing-space norms (median |q|; |logits| for linear): arm with z vs without."""
    h4 = l2r_name(anchors=4)
    return [(f"{PRIMARY} +z", PRIMARY), (f"{h4} +z", h4), (f"{LINEAR} +z", LINEAR)]
