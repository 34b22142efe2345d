"""Arrays of other libraries through the functional API (l2r_cuda/interop.py): numpy arrays and a
stand-in array library exercise the DLPack dispatch on CPU; cupy arrays on a GPU (marked cuda)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import l2r_cuda
from l2r_cuda import interop

try:
    import cupy
except ImportError:
    cupy = None


class FakeArray:
    """A minimal array library of this module: holds a numpy array, speaks DLPack, and is what
    this module's from_dlpack returns (the way cupy.ndarray and cupy.from_dlpack pair up)."""

    def __init__(self, data: np.ndarray):
        self.data = data

    def __dlpack__(self, *args, **kwargs):
        return self.data.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return self.data.__dlpack_device__()


def from_dlpack(tensor):  # this module's library function, found through FakeArray's module
    return FakeArray(np.from_dlpack(tensor))


def route_inputs(seed=0, T=12, d=16, r=4, E=6, H=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, d, generator=g), torch.randn(r, d, generator=g) / 4, torch.randn(E, H, r, generator=g),
            torch.tensor(4.0))


def test_numpy_in_numpy_out_route_matches_torch():
    x, proj, anchors, scale = route_inputs()
    want = l2r_cuda.route(x, proj, anchors, scale, top_k=2)
    got = l2r_cuda.route(x.numpy(), proj.numpy(), anchors.numpy(), scale, top_k=2)
    assert type(got) is l2r_cuda.RouteOutput
    for g, w in zip(got, want):
        assert isinstance(g, np.ndarray)
        np.testing.assert_array_equal(g, w.numpy())


def test_foreign_x_with_torch_parameters_returns_foreign_and_detached():
    x, proj, anchors, scale = route_inputs(1)
    proj.requires_grad_()
    got = l2r_cuda.route(FakeArray(x.numpy()), proj, anchors, scale, top_k=3)
    want = l2r_cuda.route(x, proj, anchors, scale, top_k=3)
    assert all(isinstance(v, FakeArray) for v in got)
    np.testing.assert_array_equal(got.weights.data, want.weights.detach().numpy())


def test_route_logits_and_from_logits():
    x, proj, anchors, scale = route_inputs(2)
    logits = l2r_cuda.ops.route_logits(x.numpy(), proj.numpy(), anchors.numpy(), scale)
    assert isinstance(logits, np.ndarray)
    np.testing.assert_array_equal(logits, l2r_cuda.ops.route_logits(x, proj, anchors, scale).numpy())
    out = l2r_cuda.ops.route_from_logits(logits, 2)
    want = l2r_cuda.ops.route_from_logits(torch.from_numpy(logits), 2)
    np.testing.assert_array_equal(out.indices, want.indices.numpy())


def test_permute_unpermute_dropped_counts():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 8, generator=g)
    idx = torch.stack([torch.randperm(5, generator=g)[:2] for _ in range(10)])
    w = torch.rand(10, 2, generator=g)
    p = l2r_cuda.permute(x.numpy(), idx.numpy(), 5, capacity=3, weights=w.numpy())
    want = l2r_cuda.permute(x, idx, 5, capacity=3, weights=w)
    assert type(p) is l2r_cuda.Permutation and all(isinstance(v, np.ndarray) for v in p)
    for a, b in zip(p, want):
        np.testing.assert_array_equal(a, b.numpy())
    y = l2r_cuda.unpermute(p.permuted * 2, p.row_map, w.numpy())
    np.testing.assert_array_equal(y, l2r_cuda.unpermute(want.permuted * 2, want.row_map, w).numpy())
    dropped = l2r_cuda.dropped_counts(p.row_map, idx.numpy(), 5)
    np.testing.assert_array_equal(dropped, l2r_cuda.dropped_counts(want.row_map, idx, 5).numpy())


def test_arrays_go_in_and_out_without_copies():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    same = interop.dlpack_io(lambda t: t)(a)
    assert np.shares_memory(same, a)


def test_tensor_calls_are_untouched():
    calls = []

    def op(*args, **kwargs):
        calls.append((args, kwargs))
        return args[0]

    t = torch.ones(2)
    assert interop.dlpack_io(op)(t, 3, flag=None) is t
    assert calls == [((t, 3), {"flag": None})]
    assert not interop.is_foreign_array(t) and not interop.is_foreign_array(3.0)
    assert interop.is_foreign_array(np.ones(2)) and interop.is_foreign_array(FakeArray(np.ones(2)))


def test_library_without_from_dlpack_is_named():
    class Orphan(FakeArray):
        pass

    Orphan.__module__ = "json"  # a real module without from_dlpack
    assert "json" in sys.modules
    with pytest.raises(TypeError, match="'json' has no from_dlpack"):
        interop.dlpack_io(lambda t: t)(Orphan(np.ones(3, dtype=np.float32)))


@pytest.mark.cuda
@pytest.mark.skipif(cupy is None, reason="cupy not installed")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cupy_in_cupy_out_on_gpu():
    if l2r_cuda.cuda_backend() is None:
        pytest.skip(l2r_cuda.jit.status())
    x, proj, anchors, scale = (t.cuda() for t in route_inputs(4))
    want = l2r_cuda.route(x, proj, anchors, scale, top_k=2)
    got = l2r_cuda.route(cupy.asarray(x.cpu().numpy()), proj, anchors, scale, top_k=2)
    assert all(isinstance(v, cupy.ndarray) for v in got)
    for g, w in zip(got, want):
        assert torch.equal(torch.from_dlpack(g), w)
    p = l2r_cuda.permute(cupy.asarray(x.cpu().numpy()), got.indices, 6)
    assert isinstance(p.permuted, cupy.ndarray)
    y = l2r_cuda.unpermute(p.permuted, p.row_map, got.weights)
    assert isinstance(y, cupy.ndarray) and y.shape == (12, 16)
