"""l2r_cuda.moe: the MoE layer against a naive per-token loop, both routers, autograd, compile."""

import pytest
import torch
import torch.nn.functional as F

from l2r_cuda import LinearRouter, MoE, RouteOutput, SwiGLUExperts
from l2r_cuda.reference import route_from_logits
from l2r_cuda.routers import router_parameters

ROUTERS = ["l2r", "linear"]


def _naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Dense per-token reference: y[t] = sum_j w[t, j] * SwiGLU_{i[t, j]}(x[t])."""
    tokens = x.reshape(-1, moe.d_model)
    route = moe.router(tokens)
    ex = moe.experts
    rows = []
    for t in range(tokens.shape[0]):
        acc = torch.zeros(moe.d_model, dtype=torch.float32)
        for j in range(route.indices.shape[1]):
            e = int(route.indices[t, j])
            h = F.silu(tokens[t] @ ex.w_gate[e]) * (tokens[t] @ ex.w_up[e])
            acc = acc + route.weights[t, j] * (h @ ex.w_down[e]).float()
        rows.append(acc)
    return torch.stack(rows).to(x.dtype).reshape(x.shape)


def _moe(router, seed=0, **kwargs):
    torch.manual_seed(seed)
    return MoE(16, 24, 6, 2, router=router, **kwargs)


@pytest.mark.parametrize("router", ROUTERS)
def test_moe_matches_naive_loop_forward_and_backward(router):
    moe = _moe(router)
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y = moe(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    y_ref = _naive_moe(moe, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    upstream = torch.randn_like(y)
    params = [x] + list(moe.parameters())
    grads = torch.autograd.grad((y * upstream).sum(), params, allow_unused=True)
    grads_ref = torch.autograd.grad((y_ref * upstream).sum(), params, allow_unused=True)
    for name, g, g_ref in zip(["x"] + [n for n, _ in moe.named_parameters()], grads, grads_ref):
        assert g is not None, name
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("router", ROUTERS)
def test_moe_router_receives_gradient_through_weights_and_losses(router):
    from l2r_cuda import losses

    moe = _moe(router)
    x = torch.randn(32, 16)
    y = moe(x)
    r = moe.last_route
    assert isinstance(r, RouteOutput)
    loss = y.pow(2).mean() + losses.load_balancing_loss(r.tokens_per_expert, r.mean_probs) + losses.router_z_loss(r.lse)
    loss.backward()
    for p in router_parameters(moe):
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert sum(p.grad.abs().sum() for p in router_parameters(moe)) > 0


def test_routers_are_interchangeable():
    x = torch.randn(7, 16)
    outs = [_moe(r).router(x) for r in ROUTERS]
    for out in outs:
        assert isinstance(out, RouteOutput)
        assert out.weights.shape == (7, 2) and out.weights.dtype == torch.float32
        assert out.indices.shape == (7, 2) and out.indices.dtype == torch.int64
        assert out.tokens_per_expert.shape == (6,) and out.tokens_per_expert.dtype == torch.int64
        assert int(out.tokens_per_expert.sum()) == 14
        assert out.mean_probs.shape == (6,) and out.mean_probs.dtype == torch.float32
        assert out.lse.shape == (7,) and out.lse.dtype == torch.float32
    # Same router object plugged into a MoE built elsewhere.
    linear = LinearRouter(16, 6, 2)
    moe = MoE(16, 24, 6, 2, router=linear)
    assert moe.router is linear
    assert moe(x).shape == x.shape
    with pytest.raises(TypeError):
        MoE(16, 24, 6, 2, router=linear, rank=3)
    with pytest.raises(ValueError):
        MoE(16, 24, 6, 2, router="dense")
    with pytest.raises(ValueError):
        MoE(16, 24, 6, 7)


def test_l2r_router_kwargs_are_forwarded():
    moe = MoE(16, 24, 6, 2, router="l2r", rank=3, num_anchors=2, normalize=True)
    assert moe.router.proj.shape == (3, 16)
    assert moe.router.anchors.shape == (6, 2, 3)
    torch.testing.assert_close(moe.router(torch.randn(4, 16)).weights.sum(-1), torch.ones(4))


def test_linear_router_matches_formula():
    router = LinearRouter(8, 5, 2)
    x = torch.randn(10, 8)
    logits = x @ router.weight.detach().t()
    probs = torch.softmax(logits, -1)
    out = router(x)
    top = torch.topk(probs, 2, dim=-1)
    torch.testing.assert_close(out.weights.detach(), top.values)
    assert torch.equal(out.indices, top.indices)
    torch.testing.assert_close(out.mean_probs.detach(), probs.mean(0))
    torch.testing.assert_close(out.lse.detach(), torch.logsumexp(logits, -1))
    assert torch.equal(out.tokens_per_expert, torch.bincount(top.indices.reshape(-1), minlength=5))


def test_linear_router_expert_bias_is_selection_only():
    router = LinearRouter(8, 4, 1)
    x = torch.randn(20, 8)
    with torch.no_grad():
        router.expert_bias.copy_(torch.tensor([0.0, 0.0, 10.0, 0.0]))  # forces expert 2
    out = router(x)
    assert (out.indices == 2).all()
    probs = torch.softmax(x @ router.weight.detach().t(), -1)
    torch.testing.assert_close(out.weights.detach()[:, 0], probs[:, 2])  # weight is the unbiased prob
    sig = route_from_logits(x @ router.weight.detach().t(), 2, score="sigmoid", normalize=True)
    torch.testing.assert_close(sig.weights.sum(-1), torch.ones(20))


def test_moe_bf16_and_leading_dims():
    moe = _moe("l2r", dtype=torch.bfloat16)
    x = torch.randn(2, 3, 4, 16, dtype=torch.bfloat16)
    y = moe(x)
    assert y.shape == x.shape and y.dtype == torch.bfloat16
    assert moe.router.proj.dtype == torch.float32  # the router keeps fp32 parameters
    y_ref = _naive_moe(moe, x)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)


def test_moe_single_token_and_top_k_equals_num_experts():
    moe = MoE(16, 24, 4, 4, router="linear")
    x = torch.randn(1, 16)
    torch.testing.assert_close(moe(x), _naive_moe(moe, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("router", ROUTERS)
def test_moe_empty_input(router):
    moe = _moe(router)
    x = torch.zeros(2, 0, 16, requires_grad=True)
    y = moe(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert int(moe.last_route.tokens_per_expert.sum()) == 0


def test_experts_grouped_mm_path_matches_loop():
    # torch._grouped_mm is used only on CUDA bf16 sm90+; its forward also runs on CPU in fp32 here,
    # which checks the offsets plumbing of that branch.
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not available")
    torch.manual_seed(0)
    experts = SwiGLUExperts(4, 16, 32)
    x = torch.randn(11, 16)
    offsets = torch.tensor([0, 3, 3, 9, 11])
    loop = experts(x, offsets)
    experts.use_grouped_mm = True
    try:
        grouped = experts(x, offsets)
    except RuntimeError as err:  # no CPU kernel in this torch build
        pytest.skip(f"torch._grouped_mm has no CPU kernel here: {err}")
    torch.testing.assert_close(grouped, loop, rtol=1e-5, atol=1e-5)
    # Rows past offsets[-1] (fixed-size buffers) are zeros on both paths.
    short = torch.tensor([0, 3, 3, 9, 9])
    experts.use_grouped_mm = False
    loop_short = experts(x, short)
    assert loop_short[9:].abs().sum() == 0
    torch.testing.assert_close(loop_short[:9], loop[:9])


def test_experts_loop_matches_expert_forward():
    torch.manual_seed(0)
    experts = SwiGLUExperts(3, 8, 12)
    x = torch.randn(7, 8)
    offsets = torch.tensor([0, 2, 2, 7])
    out = experts(x, offsets)
    torch.testing.assert_close(out[:2], experts.expert_forward(x[:2], 0))
    torch.testing.assert_close(out[2:], experts.expert_forward(x[2:], 2))


def test_moe_training_reduces_loss():
    torch.manual_seed(0)
    moe = MoE(16, 32, 4, 2, router="l2r")
    x = torch.randn(64, 16)
    target = torch.tanh(x @ torch.randn(16, 16))
    opt = torch.optim.Adam(moe.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = F.mse_loss(moe(x), target)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first


@pytest.mark.parametrize("router", ROUTERS)
def test_moe_torch_compile_matches_eager(router):
    # Not fullgraph: the per-expert loop reads the expert offsets on the host (a graph break).
    torch._dynamo.reset()
    moe = _moe(router)
    x = torch.randn(10, 16, requires_grad=True)
    y_eager = moe(x)
    g_eager = torch.autograd.grad(y_eager.sum(), [x, moe.experts.w_up])
    compiled = torch.compile(moe, backend="aot_eager")
    y = compiled(x)
    torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-6)
    g = torch.autograd.grad(y.sum(), [x, moe.experts.w_up])
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert moe.last_route is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_moe_cuda_matches_cpu():
    moe = _moe("linear")
    x = torch.randn(20, 16)
    y_cpu = moe(x)
    moe_cuda = moe.to("cuda")
    y_cuda = moe_cuda(x.cuda())
    torch.testing.assert_close(y_cuda.cpu(), y_cpu, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("router", ROUTERS)
def test_deepcopy_and_pickle_after_training_forward(router):
    import copy
    import io

    moe = _moe(router)
    y = moe(torch.randn(7, moe.d_model))
    y.pow(2).mean().backward()
    assert moe.last_route is not None and moe.last_route.weights.grad_fn is not None
    clone = copy.deepcopy(moe)
    assert clone.last_route is None and moe.last_route is not None
    x = torch.randn(3, moe.d_model)
    torch.testing.assert_close(clone(x), moe(x))
    buffer = io.BytesIO()
    torch.save(moe, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(x), moe(x))


# ------------------------------------------------------------------ expert_bias stays float32 state

CASTS = {
    "to(bfloat16)": lambda m: m.to(torch.bfloat16),
    "to(dtype=float16)": lambda m: m.to(dtype=torch.float16),
    "half()": lambda m: m.half(),
    "bfloat16()": lambda m: m.bfloat16(),
    "double()": lambda m: m.double(),
    "to(cpu, bfloat16)": lambda m: m.to("cpu", torch.bfloat16),
}


@pytest.mark.parametrize("cast", list(CASTS), ids=list(CASTS))
def test_expert_bias_stays_float32_under_module_casts(cast):
    from l2r_cuda import losses

    model = torch.nn.Sequential(_moe("l2r"), _moe("linear"), LinearRouter(16, 6, 2))
    routers = [model[0].router, model[1].router, model[2]]
    fine = torch.arange(6, dtype=torch.float32) * 1e-4 + 1.0  # not representable in bf16/fp16
    for router in routers:
        with torch.no_grad():
            router.expert_bias.copy_(fine)
    CASTS[cast](model)
    dtype = model[0].experts.w_up.dtype
    assert dtype != torch.float32  # the cast did happen to everything else
    for router in routers:
        assert router.expert_bias.dtype == torch.float32
        assert torch.equal(router.expert_bias, fine)  # re-cast from the fp32 original: exact
        assert router.state_dict()["expert_bias"].dtype == torch.float32
        # The aux-loss-free update works after the cast (it raised TypeError on a cast bias).
        losses.update_expert_bias_(router.expert_bias, torch.tensor([5, 1, 1, 1, 1, 3]), rate=1e-3)
        assert router.expert_bias[0] < fine[0] and router.expert_bias[1] > fine[1]
    # The cast modules still route and run.
    y = model[1](torch.randn(5, 16, dtype=dtype))
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert int(model[1].last_route.tokens_per_expert.sum()) == 10


def test_expert_bias_state_dict_round_trip_through_low_precision_model():
    src = _moe("l2r")
    with torch.no_grad():
        src.router.expert_bias.copy_(torch.linspace(-1e-3, 1e-3, 6))
    dst = _moe("l2r", seed=1).bfloat16()
    dst.load_state_dict(src.bfloat16().state_dict())
    assert dst.router.expert_bias.dtype == torch.float32
    torch.testing.assert_close(dst.router.expert_bias, torch.linspace(-1e-3, 1e-3, 6), rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_expert_bias_stays_float32_when_moved_and_cast_to_cuda():
    moe = _moe("l2r").to("cuda", torch.bfloat16)
    assert moe.router.expert_bias.dtype == torch.float32 and moe.router.expert_bias.is_cuda
    moe.cpu()
    assert moe.router.expert_bias.dtype == torch.float32 and not moe.router.expert_bias.is_cuda
