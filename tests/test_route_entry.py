"""route()'s unboxed entry (csrc/route/route_python_entry.cpp): the same op as torch.ops, through
the dispatcher's typed handle. It must give bitwise the results and gradients of the torch.ops path,
keep every dispatch-level feature (autograd, dispatch modes) and hand everything it does not take
(tensor subclasses, torch-function modes, calls the checked path converts or rejects) to that path."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import l2r_cuda
from l2r_cuda import _C, ops
from l2r_cuda.types import RouteOutput

from route_samples import sample_inputs


def _options(kw: dict) -> tuple:
    return ops.checked_options(kw["top_k"], kw.get("beta", 1.0), kw.get("norm", "rms"), kw.get("eps_norm", 1e-6),
                               kw.get("tau", 1.0), kw.get("score", "softmax"), kw.get("normalize", False),
                               kw.get("eps", 1e-6), kw.get("num_groups"), kw.get("topk_groups"),
                               kw.get("group_score", "top2_sum"), kw.get("routed_scaling_factor", 1.0))


def _entry(s, options=None, **override):
    kw = s.kwargs
    args = dict(x=s.x, proj=s.proj, anchors=s.anchors, scale=s.scale, norm_weight=kw.get("norm_weight"),
                expert_bias=kw.get("expert_bias"), padding_mask=kw.get("padding_mask"),
                options=_options(kw) if options is None else options, seq_len=kw.get("seq_len"))
    args.update(override)
    return _C.route_forward_entry(*args.values(), RouteOutput)


def _checked(s):
    """The torch.ops path of route_with_options."""
    kw = s.kwargs
    return ops._route_checked(s.x, s.proj, s.anchors, s.scale, kw.get("norm_weight"), kw.get("expert_bias"),
                              _options(kw), seq_len=kw.get("seq_len"), padding_mask=kw.get("padding_mask"))


def _assert_identical(a, b):
    assert len(a) == len(b) == 5
    for u, v in zip(a, b):
        assert u.dtype == v.dtype and u.shape == v.shape
        assert torch.equal(u, v) or (u.isnan() == v.isnan()).all() and torch.equal(u.nan_to_num(), v.nan_to_num())


@pytest.mark.parametrize("sample", sample_inputs(), ids=lambda s: s.name)
def test_entry_takes_the_call_and_matches_torch_ops(sample):
    out = _entry(sample)
    assert type(out) is RouteOutput
    _assert_identical(out, _checked(sample))


@pytest.mark.parametrize("sample", sample_inputs()[:4], ids=lambda s: s.name)
def test_entry_gradients_match_torch_ops(sample):
    s1, s2 = sample.with_grad(), sample.with_grad()
    a = _entry(s1)
    assert a is not NotImplemented and a[0].grad_fn is not None
    b = _checked(s2)
    g = torch.Generator().manual_seed(3)
    loss_w = torch.randn(a[0].shape, generator=g)
    loss_l = torch.randn(a[4].shape, generator=g)
    (a[0] * loss_w).sum().add_((a[4] * loss_l).sum()).backward()
    (b[0] * loss_w).sum().add_((b[4] * loss_l).sum()).backward()
    for u, v in ((s1.x, s2.x), (s1.proj, s2.proj), (s1.anchors, s2.anchors), (s1.scale, s2.scale)):
        assert torch.equal(u.grad, v.grad)


def test_entry_without_grad_builds_no_graph():
    s = sample_inputs()[0].with_grad()
    with torch.no_grad():
        out = _entry(s)
    assert all(t.grad_fn is None and not t.requires_grad for t in out)


def test_entry_flattens_leading_dims():
    s = sample_inputs()[0]
    x3 = s.x.reshape(2, -1, s.x.shape[-1]) if s.x.shape[0] % 2 == 0 else s.x.unsqueeze(0)
    _assert_identical(_entry(s, x=x3), _entry(s))


class _Subclass(torch.Tensor):
    pass


def test_entry_declines_what_the_checked_path_handles():
    s = sample_inputs()[0]
    T = s.x.shape[0]
    declined = [
        dict(x=s.x.numpy()),  # a foreign array: converted by the checked path
        dict(scale=5.0),  # a Python float: made a tensor first
        dict(x=s.x.as_subclass(_Subclass)),  # __torch_function__ may differ
        dict(proj=s.proj.to("meta")),  # two devices: the checked path names them
        dict(padding_mask=torch.zeros(T, dtype=torch.int64)),  # wrong dtype: reported by name
        dict(padding_mask=torch.zeros(T + 1, dtype=torch.bool)),  # wrong size
        dict(seq_len=0),  # seq_len < 1
        dict(x=torch.tensor(1.0)),  # no token dimension
        dict(options=_options(s.kwargs)[:-1]),  # not route_forward's option tuple
    ]
    for override in declined:
        assert _entry(s, **override) is NotImplemented, override


def test_route_with_a_subclass_or_mode_still_sees_torch_function():
    s = sample_inputs()[0]
    seen = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    with Record():
        out = l2r_cuda.route(s.x, s.proj, s.anchors, s.scale, **s.kwargs)
    assert any("route_forward" in name for name in seen), seen
    _assert_identical(out, _checked(s))


def test_dispatch_modes_see_the_op():
    s = sample_inputs()[0]
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record():
        out = l2r_cuda.route(s.x, s.proj, s.anchors, s.scale, **s.kwargs)
    assert "l2r_cuda.route_forward.default" in seen, seen
    _assert_identical(out, _checked(s))


def test_entry_errors_are_the_ops_errors():
    """A call the entry takes but the op rejects raises what torch.ops raises (same type, same text)."""
    s = sample_inputs()[0]
    bad = _options(dict(s.kwargs, top_k=s.anchors.shape[0] + 1))
    with pytest.raises(Exception) as via_entry:
        _entry(s, options=bad)
    with pytest.raises(Exception) as via_ops:
        ops._route_checked(s.x, s.proj, s.anchors, s.scale, s.kwargs.get("norm_weight"), None, bad)
    assert type(via_entry.value) is type(via_ops.value)
    assert str(via_entry.value).splitlines()[0] == str(via_ops.value).splitlines()[0]
