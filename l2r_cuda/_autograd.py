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
