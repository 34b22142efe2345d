"""route_backward's grad_x storage on CPU: recycled blocks (csrc/route/cpu/route_cpu_buffers.h: a
freed block is handed out again with its pages in place, no page faults or huge-page clears per
call; a block whose tensor is alive never is), and non-temporal stores when it is too large to stay
cached (>= 16 MiB): the same bits as plain stores."""

import pytest
import torch

import l2r_cuda
from route_samples import make_sample


def _grad_x(s):
    x = s.x.detach().clone().requires_grad_(True)
    out = l2r_cuda.route(x, s.proj, s.anchors, s.scale, **s.kwargs)
    (grad_x,) = torch.autograd.grad(out.weights.sum() + out.lse.sum(), [x])
    return grad_x


def test_grad_x_storage_is_recycled_once_freed_and_never_while_alive():
    # grad_x of 600 x 2048 float32 (4.7 MiB) comes from the recycled blocks
    # (csrc/route/cpu/route_cpu_buffers.h): a freed one is handed out again, a live one never.
    s = make_sample(600, 2048, 4, 16, 2, 4, norm_weight=True)
    first = _grad_x(s)
    kept = first.clone()
    _, _, reused, fresh = torch.ops.l2r_cuda.recycled_buffer_stats()
    second = _grad_x(s)  # `first` is alive: a block of its own
    assert second.data_ptr() != first.data_ptr()
    assert torch.equal(first, kept) and torch.equal(second, kept)
    ptr = second.data_ptr()
    del second
    third = _grad_x(s)
    assert third.data_ptr() == ptr and torch.equal(third, kept)
    stats = torch.ops.l2r_cuda.recycled_buffer_stats()
    assert stats[2] >= reused + 1
    del first, third
    assert torch.ops.l2r_cuda.release_recycled_buffers() > 0
    assert torch.ops.l2r_cuda.recycled_buffer_stats()[:2] == [0, 0]


@pytest.mark.parametrize("dtype, tokens", [(torch.float32, 2048), (torch.bfloat16, 4096)])
def test_large_grad_x_written_past_the_caches_has_the_same_bits(dtype, tokens):
    # 16 MiB of grad_x: non-temporal stores. Per-token gradients (weights and lse only) do not depend
    # on the batch, so the first rows must equal those of a small batch, written with plain stores.
    big = make_sample(tokens, 2048, 8, 16, 2, 4, norm_weight=True, dtype=dtype)
    small = make_sample(tokens, 2048, 8, 16, 2, 4, norm_weight=True, dtype=dtype)
    small.x = small.x[:40]

    def grads(s):
        x = s.x.detach().clone().requires_grad_(True)
        out = l2r_cuda.route(x, s.proj, s.anchors, s.scale, **s.kwargs)
        return torch.autograd.grad(out.weights.pow(2).sum() + out.lse.sum(), [x])[0]

    assert torch.equal(grads(big)[:40], grads(small))


def test_unwanted_grad_x_is_zeros_from_a_recycled_block():
    # x needs no gradient (output_mask [False, True]): the op still returns grad_x, zeros, and takes
    # it from the recycled blocks (no page faults per call), so a block freed with data in it must be
    # cleared first.
    s = make_sample(600, 2048, 4, 16, 2, 4)
    dirty = _grad_x(s)
    assert torch.count_nonzero(dirty) > 0
    ptr = dirty.data_ptr()
    del dirty  # its block waits for reuse, its data still in it
    reused = torch.ops.l2r_cuda.recycled_buffer_stats()[2]
    k = s.kwargs["top_k"]
    w, idx, _, _, _, q, rstd = torch.ops.l2r_cuda.route_forward(
        s.x, s.proj, s.anchors, s.scale, None, None, None, k, 1.0, "rms", 1e-6, 1e-6, 1.0, "softmax", False, 1, 1,
        "top2_sum", 1.0, 0)
    grads = torch.ops.l2r_cuda.route_backward(
        torch.ones_like(w), None, None, s.x, s.proj, s.anchors, s.scale, None, None, idx, q, rstd, 1.0, "rms", 1e-6,
        1.0, "softmax", False, 1.0, 0, [False, True])
    grad_x = grads[0]
    assert grad_x.shape == s.x.shape and torch.count_nonzero(grad_x) == 0
    assert grad_x.data_ptr() == ptr and torch.ops.l2r_cuda.recycled_buffer_stats()[2] == reused + 1
    assert torch.count_nonzero(grads[1]) > 0  # the parameter gradients are still computed
