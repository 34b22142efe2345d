"""The CPU kernels keep the router parameters prepared per parameter version
(csrc/route/cpu/route_cpu_prepare.*, csrc/route/param_version.h), so that a decode call does only the
token's work: a repeated call reuses the preparation, every change PyTorch can see (in-place ops,
optimizer steps, load_state_dict, a new tensor) is seen, and writes it cannot see are handled by
clear_prepared_cache. Also the one-token call path of ops.route: Python-float scales, the call
below the autograd kernel when no gradient can flow."""

import pytest
import torch

import l2r_cuda
from l2r_cuda import ops
from route_samples import make_sample


def _stats():
    """(cached entries, hits, misses) since the library was loaded."""
    return tuple(torch.ops.l2r_cuda.prepared_cache_stats())


def _route(s, **kw):
    return l2r_cuda.route(*s.args(), **{**s.kwargs, **kw})


def _fresh(s, **kw):
    """The same call on clones of every parameter: a preparation of its own."""
    args = [t.clone() for t in s.args()]
    kwargs = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in {**s.kwargs, **kw}.items()}
    return l2r_cuda.route(*args, **kwargs)


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_a_repeated_call_reuses_the_preparation():
    s = make_sample(1, 64, 4, 16, 2, 4, norm_weight=True, bias=True)
    first = _route(s)
    _, hits, misses = _stats()
    again = _route(s)
    _, hits2, misses2 = _stats()
    assert (hits2 - hits, misses2 - misses) == (1, 0)
    assert _same(first, again)


@pytest.mark.parametrize("which", ["proj", "anchors", "scale", "norm_weight"])
def test_an_in_place_change_is_seen(which):
    s = make_sample(5, 64, 4, 16, 2, 4, norm_weight=True)
    tensors = {"proj": s.proj, "anchors": s.anchors, "scale": s.scale, "norm_weight": s.kwargs["norm_weight"]}
    before = _route(s)
    with torch.no_grad():
        tensors[which].mul_(-1.5)
    after = _route(s)
    assert _same(after, _fresh(s))
    assert not torch.equal(after.weights, before.weights)  # the change mattered


def test_an_optimizer_step_and_load_state_dict_are_seen():
    torch.manual_seed(0)
    router = l2r_cuda.L2RRouter(32, 8, 2, rank=4, num_anchors=2)
    x = torch.randn(7, 32)
    with torch.no_grad():
        before = router(x)
    out = router(x)
    (out.weights.sum() + out.lse.sum()).backward()
    torch.optim.SGD(router.parameters(), lr=0.5).step()
    with torch.no_grad():
        stepped = router(x)
        copy = l2r_cuda.L2RRouter(32, 8, 2, rank=4, num_anchors=2)
        copy.load_state_dict(router.state_dict())
        assert _same(stepped, copy(x))
        assert not torch.equal(stepped.weights, before.weights)
        other = l2r_cuda.L2RRouter(32, 8, 2, rank=4, num_anchors=2)
        router.load_state_dict(other.state_dict())
        assert _same(router(x), other(x))


def test_a_write_through_data_is_seen_after_clear_prepared_cache():
    s = make_sample(5, 64, 4, 16, 2, 4)
    _route(s)
    s.proj.data.mul_(-2.0)  # bypasses the version counter
    l2r_cuda.ops.clear_prepared_cache()
    assert _stats()[0] == 0
    assert _same(_route(s), _fresh(s))


def test_inference_tensors_are_prepared_on_every_call():
    with torch.inference_mode():
        s = make_sample(3, 64, 4, 16, 2, 4)
        first = _route(s)
        _, _, misses = _stats()
        s.proj.mul_(3.0)  # inference tensors have no version counter: never cached
        second = _route(s)
        assert _stats()[2] == misses + 1
    assert _same(second, _fresh(s))
    assert not torch.equal(first.weights, second.weights)


def test_float64_is_prepared_on_every_call():
    # gradcheck perturbs float64 inputs through `.data`: float64 preparations are never cached.
    s = make_sample(3, 16, 2, 4, 2, 2, dtype=torch.float64)
    _route(s)
    _, hits, misses = _stats()
    _route(s)
    assert _stats()[1:] == (hits, misses + 1)


def test_a_python_float_scale_is_one_tensor_per_value_and_device():
    a = ops._scale_tensor(5.0, torch.device("cpu"))
    with torch.inference_mode():
        b = ops._scale_tensor(5.0, torch.device("cpu"))
    assert a is b and not a.is_inference() and a.item() == 5.0
    assert ops._scale_tensor(4.0, torch.device("cpu")) is not a
    s = make_sample(4, 32, 2, 8, 2, 2)
    assert _same(l2r_cuda.route(s.x, s.proj, s.anchors, 4.0, **s.kwargs),
                 l2r_cuda.route(s.x, s.proj, s.anchors, torch.tensor(4.0), **s.kwargs))
    _, hits, misses = _stats()
    l2r_cuda.route(s.x, s.proj, s.anchors, 4.0, **s.kwargs)
    assert _stats()[1:] == (hits + 1, misses)  # the float's one tensor keys the preparation too


def test_no_grad_calls_skip_autograd_with_the_same_results():
    s = make_sample(6, 32, 2, 8, 2, 3, norm_weight=True, bias=True).with_grad()
    with_grad = _route(s)
    assert with_grad.weights.requires_grad
    with torch.no_grad():
        without = _route(s)
    assert not without.weights.requires_grad and without.weights.grad_fn is None
    assert _same(with_grad, without)
    plain = make_sample(6, 32, 2, 8, 2, 3, norm_weight=True, bias=True)  # nothing requires grad
    out = _route(plain)
    assert not out.weights.requires_grad
    assert _same(out, without)

