"""Autograd of the native ops: each backward is an op of its own (see csrc/registration.cpp).

Second order: permutation is linear, so the backward ops of ``permute_rows`` and ``unpermute`` have
autograd formulas of their own (made of the same ops) and any order of differentiation works. The
route backward has none: differentiating through it (``create_graph=True``, e.g. a gradient
penalty) raises a clear error instead of returning a silently wrong answer.
"""

import torch

from ._library import OpArgs


def _route_setup_context(ctx, inputs, output):
    a = OpArgs("route_forward", inputs)
    _, indices, _, _, _, q, rstd = output
    ctx.save_for_backward(a.x, a.proj, a.anchors, a.scale, a.norm_weight, a.padding_mask, indices, q, rstd)
    ctx.options = (a.beta, a.norm, a.eps, a.tau, a.score, a.normalize, a.routed_scaling_factor, a.seq_len)
    ctx.mark_non_differentiable(output[1], output[2], output[5], output[6])


def _scoring_grads(ctx, grads, norm_weight):
    """The differentiable inputs' gradients (x, proj, anchors, scale, norm_weight) as autograd wants
    them: None where not needed or where norm_weight is None."""
    grad_x, grad_proj, grad_anchors, grad_scale, grad_norm_weight = grads
    if norm_weight is None:
        grad_norm_weight = None
    elif grad_norm_weight.numel() == 0 and norm_weight.numel() != 0:
        grad_norm_weight = torch.zeros_like(norm_weight)  # norm=None: the weight is unused
    needs = ctx.needs_input_grad
    return tuple(g if needs[i] else None
                 for i, g in enumerate((grad_x, grad_proj, grad_anchors, grad_scale, grad_norm_weight)))


def _output_mask(ctx):
    """[grad_x, parameter grads] wanted: the kernels skip what is not (inputs 0 and 1-4)."""
    needs = ctx.needs_input_grad
    return [bool(needs[0]), bool(any(needs[1:5]))]


def _route_backward(ctx, grad_weights, _gi, _gt, grad_mean_probs, grad_lse, _gq, _gr):
    x, proj, anchors, scale, norm_weight, padding_mask, indices, q, rstd = ctx.saved_tensors
    beta, norm, eps, tau, score, normalize, scaling, seq_len = ctx.options
    grads = torch.ops.l2r_cuda.route_backward(
        grad_weights, grad_mean_probs, grad_lse, x, proj, anchors, scale, norm_weight, padding_mask,
        indices, q, rstd, beta, norm, eps, tau, score, normalize, scaling, seq_len, _output_mask(ctx),
    )
    return _scoring_grads(ctx, grads, norm_weight) + (None,) * 15


torch.library.register_autograd(
    "l2r_cuda::route_forward", _route_backward, setup_context=_route_setup_context
)


def _route_logits_setup_context(ctx, inputs, output):
    a = OpArgs("route_logits", inputs)
    _, q, rstd = output
    ctx.save_for_backward(a.x, a.proj, a.anchors, a.scale, a.norm_weight, q, rstd)
    ctx.options = (a.beta, a.norm, a.eps, a.tau)
    ctx.mark_non_differentiable(q, rstd)


def _route_logits_backward(ctx, grad_logits, _gq, _gr):
    x, proj, anchors, scale, norm_weight, q, rstd = ctx.saved_tensors
    beta, norm, eps, tau = ctx.options
    if grad_logits is None:
        grad_logits = torch.zeros(q.shape[0], anchors.shape[0], dtype=q.dtype, device=q.device)
    grads = torch.ops.l2r_cuda.route_logits_backward(
        grad_logits, x, proj, anchors, scale, norm_weight, q, rstd, beta, norm, eps, tau, _output_mask(ctx))
    return _scoring_grads(ctx, grads, norm_weight) + (None,) * 5


torch.library.register_autograd(
    "l2r_cuda::route_logits", _route_logits_backward, setup_context=_route_logits_setup_context
)


def _route_select_setup_context(ctx, inputs, output):
    a = OpArgs("route_select", inputs)
    _, indices, _, _, _ = output
    ctx.save_for_backward(a.logits, a.padding_mask, indices)
    ctx.options = (a.score, a.normalize, a.routed_scaling_factor, a.seq_len)
    ctx.mark_non_differentiable(output[1], output[2])


def _route_select_backward(ctx, grad_weights, _gi, _gt, grad_mean_probs, grad_lse):
    logits, padding_mask, indices = ctx.saved_tensors
    score, normalize, scaling, seq_len = ctx.options
    grad_logits = torch.ops.l2r_cuda.route_select_backward(
        grad_weights, grad_mean_probs, grad_lse, logits, padding_mask, indices, score, normalize,
        scaling, seq_len)
    return (grad_logits.to(logits.dtype),) + (None,) * 10


torch.library.register_autograd(
    "l2r_cuda::route_select", _route_select_backward, setup_context=_route_select_setup_context
)


def _no_double_backward_setup_context(ctx, inputs, output):
    pass


def _route_double_backward(ctx, *grads):
    raise RuntimeError(
        "l2r_cuda.route: double backward (differentiating a gradient of route(), e.g. a gradient "
        "penalty with create_graph=True) is not supported; compute such terms with "
        "l2r_cuda.reference.route, which is plain PyTorch")


for _op in ("route_backward", "route_logits_backward", "route_select_backward"):
    torch.library.register_autograd(
        f"l2r_cuda::{_op}", _route_double_backward, setup_context=_no_double_backward_setup_context)


# ---- permute (csrc/permute) ----------------------------------------------------------------------

def _permute_rows_setup_context(ctx, inputs, output):
    _, row_map, *_ = inputs  # x, row_map, num_rows[, every_row_mapped]
    ctx.save_for_backward(row_map)


def _permute_rows_backward(ctx, grad_permuted):
    (row_map,) = ctx.saved_tensors
    return torch.ops.l2r_cuda.permute_rows_backward(grad_permuted, row_map), None, None, None


torch.library.register_autograd(
    "l2r_cuda::permute_rows", _permute_rows_backward, setup_context=_permute_rows_setup_context
)


def _permute_rows_backward_setup_context(ctx, inputs, output):
    grad_permuted, row_map = inputs
    ctx.num_rows = grad_permuted.shape[0]
    ctx.save_for_backward(row_map)


def _permute_rows_backward_backward(ctx, grad_grad_x):
    # permute_rows_backward is the (linear) gather-sum; its adjoint is the scatter permute_rows.
    (row_map,) = ctx.saved_tensors
    return torch.ops.l2r_cuda.permute_rows(grad_grad_x, row_map, ctx.num_rows), None


torch.library.register_autograd(
    "l2r_cuda::permute_rows_backward", _permute_rows_backward_backward,
    setup_context=_permute_rows_backward_setup_context,
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


def _unpermute_backward_setup_context(ctx, inputs, output):
    grad_out, y, row_map, weights = inputs
    ctx.save_for_backward(grad_out, y, row_map, weights)


def _unpermute_backward_backward(ctx, gg_y, gg_w):
    # grad_y[row_map[t, j]] = w[t, j] * grad_out[t] and grad_w[t, j] = <y[row_map[t, j]], grad_out[t]>
    # are bilinear; each adjoint is again an unpermute or an unpermute backward.
    grad_out, y, row_map, weights = ctx.saved_tensors
    needs = ctx.needs_input_grad
    unpermute, unpermute_backward = torch.ops.l2r_cuda.unpermute, torch.ops.l2r_cuda.unpermute_backward
    d_grad_out = d_y = d_weights = None
    if needs[0]:
        d_grad_out = torch.zeros_like(grad_out)
        if gg_y is not None:
            d_grad_out = d_grad_out + unpermute(gg_y, row_map, weights)
        if gg_w is not None:
            d_grad_out = d_grad_out + unpermute(y, row_map, gg_w)
    if needs[1]:
        d_y = (unpermute_backward(grad_out, y, row_map, gg_w)[0] if gg_w is not None
               else torch.zeros_like(y))
    if needs[3]:
        d_weights = (unpermute_backward(grad_out, gg_y, row_map, weights)[1] if gg_y is not None
                     else torch.zeros_like(weights))
    return d_grad_out, d_y, None, d_weights


torch.library.register_autograd(
    "l2r_cuda::unpermute_backward", _unpermute_backward_backward,
    setup_context=_unpermute_backward_setup_context,
)
