"""Differentiating through a gradient (create_graph=True): permutation supports every order (it is
linear in each input), route() refuses with a clear error instead of returning a wrong answer."""

from __future__ import annotations

import pytest
import torch

import l2r_cuda
from route_samples import make_sample


def _routing(T=6, E=5, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    return indices


def test_permute_gradgradcheck():
    indices = _routing()
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)

    def fn(x):
        return l2r_cuda.permute(x, indices, 5, align=2, fixed_size=True).permuted

    assert torch.autograd.gradgradcheck(fn, (x,))


def test_unpermute_gradgradcheck():
    indices = _routing()
    _, _, row_map = l2r_cuda.permute(torch.zeros(6, 1), indices, 5, align=2)
    n = int(row_map.max()) + 2  # one padding row past the last used row
    y = torch.randn(n, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(6, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda y, w: l2r_cuda.unpermute(y, row_map, w), (y, w))


def test_unpermute_gradient_penalty_matches_finite_differences():
    # A gradient-penalty loss: |d out / d y|^2 depends on w; its gradient w.r.t. w needs the
    # second-order terms.
    indices = _routing(seed=1)
    _, _, row_map = l2r_cuda.permute(torch.zeros(6, 1), indices, 5)
    y = torch.randn(int(row_map.max()) + 1, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(6, 2, dtype=torch.float64, requires_grad=True)

    def penalty(w):
        out = l2r_cuda.unpermute(y, row_map, w)
        (g,) = torch.autograd.grad(out.pow(2).sum(), y, create_graph=True)
        return g.pow(2).sum()

    (analytic,) = torch.autograd.grad(penalty(w), w)
    numeric = torch.zeros_like(w)
    for i in range(w.numel()):
        step = torch.zeros_like(w).view(-1)
        step[i] = 1e-6
        step = step.view_as(w)
        numeric.view(-1)[i] = (penalty(w + step) - penalty(w - step)) / 2e-6
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-6)


def test_route_double_backward_raises_clearly():
    s = make_sample(5, 16, 2, 6, 2, 2, dtype=torch.float64).with_grad()
    out = l2r_cuda.route(*s.args(), **s.kwargs)
    (g,) = torch.autograd.grad(out.weights.sum(), s.x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.pow(2).sum().backward()


def test_route_first_order_is_unaffected_by_create_graph_setting():
    s = make_sample(5, 16, 2, 6, 2, 2, dtype=torch.float64).with_grad()
    out = l2r_cuda.route(*s.args(), **s.kwargs)
    (g1,) = torch.autograd.grad(out.weights.sum(), s.x, create_graph=True)
    out = l2r_cuda.route(*s.args(), **s.kwargs)
    (g2,) = torch.autograd.grad(out.weights.sum(), s.x)
    torch.testing.assert_close(g1.detach(), g2)
