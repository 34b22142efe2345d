"""Fake (meta) kernels: output shapes and dtypes of every native op, for torch.compile and opcheck."""

import torch

from ._library import OpArgs


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _statistics_shape(tokens, experts, seq_len):
    return (tokens // seq_len, experts) if seq_len > 0 else (experts,)


@torch.library.register_fake("l2r_cuda::route_forward")
def _route_forward_fake(*args):
    a = OpArgs("route_forward", args)
    T, E, r = a.x.shape[0], a.anchors.shape[0], a.proj.shape[0]
    acc = _acc_dtype(a.x)
    stats = _statistics_shape(T, E, a.seq_len)
    return (
        a.x.new_empty((T, a.top_k), dtype=acc),
        a.x.new_empty((T, a.top_k), dtype=torch.int64),
        a.x.new_empty(stats, dtype=torch.int64),
        a.x.new_empty(stats, dtype=acc),
        a.x.new_empty((T,), dtype=acc),
        a.x.new_empty((T, r), dtype=acc),
        a.x.new_empty((T,), dtype=acc),
    )


def _scoring_grads_fake(a):
    has_norm_weight = a.norm == "rms" and a.norm_weight is not None
    return (
        torch.empty_like(a.x, memory_format=torch.contiguous_format),
        torch.empty_like(a.proj, memory_format=torch.contiguous_format),
        torch.empty_like(a.anchors, memory_format=torch.contiguous_format),
        torch.empty_like(a.scale, memory_format=torch.contiguous_format),
        torch.empty_like(a.norm_weight, memory_format=torch.contiguous_format)
        if has_norm_weight else a.x.new_empty((0,), dtype=_acc_dtype(a.x)),
    )


@torch.library.register_fake("l2r_cuda::route_backward")
def _route_backward_fake(*args):
    return _scoring_grads_fake(OpArgs("route_backward", args))


@torch.library.register_fake("l2r_cuda::route_logits")
def _route_logits_fake(*args):
    a = OpArgs("route_logits", args)
    T, E, r = a.x.shape[0], a.anchors.shape[0], a.proj.shape[0]
    acc = _acc_dtype(a.x)
    return (a.x.new_empty((T, E), dtype=acc), a.x.new_empty((T, r), dtype=acc),
            a.x.new_empty((T,), dtype=acc))


@torch.library.register_fake("l2r_cuda::route_logits_backward")
def _route_logits_backward_fake(*args):
    return _scoring_grads_fake(OpArgs("route_logits_backward", args))


@torch.library.register_fake("l2r_cuda::route_select")
def _route_select_fake(*args):
    a = OpArgs("route_select", args)
    T, E = a.logits.shape
    acc = _acc_dtype(a.logits)
    stats = _statistics_shape(T, E, a.seq_len)
    return (
        a.logits.new_empty((T, a.top_k), dtype=acc),
        a.logits.new_empty((T, a.top_k), dtype=torch.int64),
        a.logits.new_empty(stats, dtype=torch.int64),
        a.logits.new_empty(stats, dtype=acc),
        a.logits.new_empty((T,), dtype=acc),
    )


@torch.library.register_fake("l2r_cuda::route_select_backward")
def _route_select_backward_fake(*args):
    a = OpArgs("route_select_backward", args)
    return a.logits.new_empty(a.logits.shape, dtype=_acc_dtype(a.logits))


# ---- permute (csrc/permute) ----------------------------------------------------------------------

@torch.library.register_fake("l2r_cuda::permute_plan")
def _permute_plan_fake(indices, num_experts, align, capacity, weights):
    return (
        indices.new_empty(indices.shape, dtype=torch.int64),
        indices.new_empty((num_experts + 1,), dtype=torch.int64),
        indices.new_empty((num_experts,), dtype=torch.int64),
    )


@torch.library.register_fake("l2r_cuda::permute_rows")
def _permute_rows_fake(x, row_map, num_rows, every_row_mapped=False):
    return x.new_empty((num_rows, x.shape[1]))


@torch.library.register_fake("l2r_cuda::permute_rows_backward")
def _permute_rows_backward_fake(grad_permuted, row_map):
    return grad_permuted.new_empty((row_map.shape[0], grad_permuted.shape[1]))


@torch.library.register_fake("l2r_cuda::unpermute")
def _unpermute_fake(y, row_map, weights):
    return y.new_empty((row_map.shape[0], y.shape[1]))


@torch.library.register_fake("l2r_cuda::unpermute_backward")
def _unpermute_backward_fake(grad_out, y, row_map, weights):
    return y.new_empty(y.shape), weights.new_empty(weights.shape)
