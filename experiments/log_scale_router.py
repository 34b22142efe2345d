"""The experiments' L2R router: :class:`l2r_cuda.L2RRouter` with its scale learned in log space and,
optionally, evenly spaced anchors at r = 2.

Why log space: the package's ``scale`` is a plain parameter. Adam moves a parameter by roughly the
learning rate per step whatever its size, so a scale that starts at 5 moves by at most ~lr·steps
(about 1 over a run here): it barely leaves its init, and the init decides how peaked routing is.
With ``scale = exp(s)`` the same steps are relative changes, so the scale can travel by factors.
Done with ``torch.nn.utils.parametrize``: ``router.scale`` is still the (computed) scale and the
module's forward is the package's, unchanged; the learned tensor is
``router.parametrizations.scale.original`` (the log of the scale).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from l2r_cuda import L2RRouter


class _Exp(nn.Module):
    def forward(self, log_scale: Tensor) -> Tensor:
        return log_scale.exp()

    def right_inverse(self, scale: Tensor) -> Tensor:
        return scale.log()


class LogScaleL2RRouter(L2RRouter):
    """``L2RRouter`` whose ``scale`` is ``exp`` of a learned parameter (init ``log(init_scale)``).

    ``even_anchors=True`` (only for ``rank == 2``): the ``E·H`` anchors start on the unit circle at
    evenly spaced angles, expert ``e``'s anchor ``h`` at ``2π (e + h·E) / (E·H)`` (so each expert's
    anchors are spread around the circle), instead of at random directions.
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int, *, even_anchors: bool = False, **kwargs):
        if even_anchors and kwargs.get("rank", 2) != 2:
            raise ValueError(f"LogScaleL2RRouter: even_anchors needs rank 2, got {kwargs.get('rank')}")
        self.even_anchors = even_anchors  # a plain attribute: read by reset_parameters() inside super().__init__
        super().__init__(d_model, num_experts, top_k, **kwargs)
        parametrize.register_parametrization(self, "scale", _Exp())  # original = log(init_scale)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        super().reset_parameters()  # proj, anchors, norm weight, expert bias; its scale fill hits a temporary
        if parametrize.is_parametrized(self, "scale"):
            self.scale = torch.tensor(float(self.init_scale))  # through right_inverse: original = log(init)
        if self.even_anchors:
            experts, anchors = self.num_experts, self.num_anchors
            slot = torch.arange(experts)[:, None] + experts * torch.arange(anchors)[None, :]  # [E, H]
            angle = 2 * math.pi * slot.double() / (experts * anchors)
            self.anchors.copy_(torch.stack([angle.cos(), angle.sin()], dim=-1).to(self.anchors))

    @property
    def log_scale(self) -> Tensor:
        return self.parametrizations.scale.original
