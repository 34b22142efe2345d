"""Autograd of the native ops: each backward is an op of its own (see csrc/registration.cpp)."""

import torch


def _route_setup_context(ctx, inputs, output):
    (x, proj, anchors, scale, norm_weight, expert_bias, top_k, beta, norm, eps_norm, eps, tau,
     score, normalize) = inputs
    _, indices, _, _, _, q, rstd = output
    ctx.save_for_backward(x, proj, anchors, scale, norm_weight, indices, q, rstd)
    ctx.options = (beta, norm, eps, tau, score, normalize)
    ctx.mark_non_differentiable(output[1], output[2], output[5], output[6])


def _route_backward(ctx, grad_weights, _gi, _gt, grad_mean_probs, grad_lse, _gq, _gr):
    x, proj, anchors, scale, norm_weight, indices, q, rstd = ctx.saved_tensors
    beta, norm, eps, tau, score, normalize = ctx.options
    grad_x, grad_proj, grad_anchors, grad_scale, grad_norm_weight = (
        torch.ops.l2r_cuda.route_backward(
            grad_weights, grad_mean_probs, grad_lse, x, proj, anchors, scale, norm_weight,
            indices, q, rstd, beta, norm, eps, tau, score, normalize,
        )
    )
    if norm_weight is None:
        grad_norm_weight = None
    elif grad_norm_weight.numel() == 0 and norm_weight.numel() != 0:
        grad_norm_weight = torch.zeros_like(norm_weight)  # norm=None: the weight is unused
    return (grad_x, grad_proj, grad_anchors, grad_scale, grad_norm_weight,
            None, None, None, None, None, None, None, None, None)


torch.library.register_autograd(
    "l2r_cuda::route_forward", _route_backward, setup_context=_route_setup_context
)


# ---- permute (csrc/permute) ----------------------------------------------------------------------

def _permute_rows_setup_context(ctx, inputs, output):
    _, row_map, _ = inputs
    ctx.save_for_backward(row_map)


def _permute_rows_backward(ctx, grad_permuted):
    (row_map,) = ctx.saved_tensors
    return torch.ops.l2r_cuda.permute_rows_backward(grad_permuted, row_map), None, None


torch.library.register_autograd(
    "l2r_cuda::permute_rows", _permute_rows_backward, setup_context=_permute_rows_setup_context
)


def _unpermute_setup_context(ctx, inputs, output):
    y, row_map, weights = inputs
    ctx.save_for_backward(y, row_map, weights)


def _unpermute_backward(ctx, grad_out):
    y, row_map, weights = ctx.saved_tensors
    grad_y, grad_weights = torch.ops.l2r_cuda.unpermute_backward(grad_out, y, row_map, weights)
    return (grad_y if ctx.needs_input_grad[0] else None, None,
            grad_weights if ctx.needs_input_grad[2] else None)


torch.library.register_autograd(
    "l2r_cuda::unpermute", _unpermute_backward, setup_context=_unpermute_setup_context
)
