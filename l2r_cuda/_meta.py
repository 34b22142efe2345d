"""Fake (meta) kernels: output shapes and dtypes of every native op, for torch.compile and opcheck."""

import torch



def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.register_fake("l2r_cuda::route_forward")
def _route_forward_fake(x, proj, anchors, scale, norm_weight, expert_bias, top_k, beta, norm,
                        eps_norm, eps, tau, score, normalize):
    T, E, r = x.shape[0], anchors.shape[0], proj.shape[0]
    acc = _acc_dtype(x)
    return (
        x.new_empty((T, top_k), dtype=acc),
        x.new_empty((T, top_k), dtype=torch.int64),
        x.new_empty((E,), dtype=torch.int64),
        x.new_empty((E,), dtype=acc),
        x.new_empty((T,), dtype=acc),
        x.new_empty((T, r), dtype=acc),
        x.new_empty((T,), dtype=acc),
    )


@torch.library.register_fake("l2r_cuda::route_backward")
def _route_backward_fake(grad_weights, grad_mean_probs, grad_lse, x, proj, anchors, scale,
                         norm_weight, indices, q, rstd, beta, norm, eps, tau, score, normalize):
    has_norm_weight = norm == "rms" and norm_weight is not None
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(proj, memory_format=torch.contiguous_format),
        torch.empty_like(anchors, memory_format=torch.contiguous_format),
        torch.empty_like(scale, memory_format=torch.contiguous_format),
        torch.empty_like(norm_weight, memory_format=torch.contiguous_format)
        if has_norm_weight else x.new_empty((0,), dtype=_acc_dtype(x)),
    )




# ---- permute (csrc/permute) ----------------------------------------------------------------------

@torch.library.register_fake("l2r_cuda::permute_plan")
def _permute_plan_fake(indices, num_experts, align, capacity, weights):
    return (
        indices.new_empty(indices.shape, dtype=torch.int64),
        indices.new_empty((num_experts + 1,), dtype=torch.int64),
        indices.new_empty((num_experts,), dtype=torch.int64),
    )


@torch.library.register_fake("l2r_cuda::permute_rows")
def _permute_rows_fake(x, row_map, num_rows):
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
