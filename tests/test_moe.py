"""l2r_cuda.moe: the MoE layer against a naive per-token loop, both routers, autograd, compile."""

import math

import pytest
import torch
import torch.nn.functional as F

import l2r_cuda
from l2r_cuda import LinearRouter, MoE, RouteOutput, SwiGLUExperts, reference
from l2r_cuda.reference import route_from_logits
from l2r_cuda.routers import router_parameters

ROUTERS = ["l2r", "linear"]


def _naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Dense per-token reference: y[t] = sum_j w[t, j] * SwiGLU_{i[t, j]}(x[t])."""
    return _naive_moe_with_route(moe, x, moe.router(x.reshape(-1, moe.d_model)))


def _naive_moe_with_route(moe: MoE, x: torch.Tensor, route) -> torch.Tensor:
    tokens = x.reshape(-1, moe.d_model)
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


# ---------------------------------------------------------------------- capacity and drop policies


def _naive_capacity_moe(moe: MoE, x: torch.Tensor, route, capacity: int, drop_policy: str):
    """Per-expert plain-Python token dropping, then the per-token sum over the kept slots.

    "probs": an expert keeps its ``capacity`` slots of largest router weight (ties: lower token);
    "position": its ``capacity`` lowest tokens. Returns (y, dropped [E], kept [T, E] bool)."""
    tokens = x.reshape(-1, moe.d_model)
    T, k = route.indices.shape
    kept = torch.zeros(T, moe.num_experts, dtype=torch.bool)
    for e in range(moe.num_experts):
        slots = [(t, j) for t in range(T) for j in range(k) if int(route.indices[t, j]) == e]
        if drop_policy == "probs":
            slots.sort(key=lambda s: (-float(route.weights.detach()[s]), s[0]))
        for t, _ in slots[:capacity]:
            kept[t, e] = True
    rows = []
    for t in range(T):
        acc = torch.zeros(moe.d_model)
        for j in range(k):
            e = int(route.indices[t, j])
            if kept[t, e]:
                acc = acc + route.weights[t, j] * moe.experts.expert_forward(tokens[t:t + 1], e)[0].float()
        rows.append(acc)
    dropped = torch.bincount(route.indices.reshape(-1), minlength=moe.num_experts) - kept.sum(0)
    return torch.stack(rows).to(x.dtype).reshape(x.shape), dropped, kept


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("drop_policy", ["probs", "position"])
@pytest.mark.parametrize("pad_to_capacity", [False, True])
def test_capacity_drops_like_megatron(router, drop_policy, pad_to_capacity):
    moe = _moe(router, capacity_factor=0.7, drop_policy=drop_policy, pad_to_capacity=pad_to_capacity)
    x = torch.randn(2, 13, 16, generator=torch.Generator().manual_seed(2), requires_grad=True)
    capacity = moe.capacity(26)
    assert capacity == math.ceil(26 * 2 / 6 * 0.7) == 7
    seen = []
    handle = moe.experts.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    y = moe(x)
    handle.remove()
    route = moe.last_route
    y_ref, dropped, kept = _naive_capacity_moe(moe, x, route, capacity, drop_policy)
    assert int(dropped.sum()) > 0  # the case does drop
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(moe.last_dropped, dropped)
    assert torch.equal(moe.last_routing_map, kept)
    if pad_to_capacity:
        assert seen == [6 * capacity]  # every expert gets exactly C rows
    upstream = torch.randn_like(y)
    params = [x] + list(moe.parameters())
    grads = torch.autograd.grad((y * upstream).sum(), params, retain_graph=True)
    grads_ref = torch.autograd.grad((y_ref * upstream).sum(), params, allow_unused=True)
    for (name, _), g, g_ref in zip([("x", None)] + list(moe.named_parameters()), grads, grads_ref):
        torch.testing.assert_close(g, torch.zeros_like(g) if g_ref is None else g_ref, rtol=1e-4, atol=1e-6,
                                   msg=name)


def test_capacity_policies_differ_and_large_factor_drops_nothing():
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(3))
    by_probs = _moe("linear", capacity_factor=0.5, drop_policy="probs")
    by_position = _moe("linear", capacity_factor=0.5, drop_policy="position")
    by_probs(x), by_position(x)
    assert torch.equal(by_probs.last_dropped, by_position.last_dropped)  # same counts per expert...
    assert not torch.equal(by_probs.last_routing_map, by_position.last_routing_map)  # ...other slots
    # "position" keeps each expert's earliest tokens.
    kept = by_position.last_routing_map
    selected = l2r_cuda.routing_map(by_position.last_route.indices, 6)
    for e in range(6):
        tokens = selected[:, e].nonzero().flatten()
        assert torch.equal(kept[:, e].nonzero().flatten(), tokens[:by_position.capacity(40)])
    roomy = _moe("linear", capacity_factor=3.0)
    plain = _moe("linear")
    torch.testing.assert_close(roomy(x), plain(x))
    assert int(roomy.last_dropped.sum()) == 0
    assert torch.equal(plain.last_dropped, torch.zeros(6, dtype=torch.int64))
    assert torch.equal(plain.last_routing_map, l2r_cuda.routing_map(plain.last_route.indices, 6))


def test_capacity_follows_the_token_count_of_each_forward():
    moe = _moe("linear", capacity_factor=1.0)
    assert [moe.capacity(t) for t in (0, 1, 30, 31)] == [0, 1, 10, 11]
    y = moe(torch.randn(0, 16))
    assert y.shape == (0, 16) and moe.last_routing_map.shape == (0, 6)
    assert _moe("linear").capacity(30) is None


# --------------------------------------------------------------------------------- shared experts


@pytest.mark.parametrize("gate", [False, True])
def test_shared_experts_are_added_to_every_token(gate):
    moe = _moe("l2r", num_shared_experts=2, shared_expert_gate=gate)
    shared = moe.shared_experts
    assert shared.d_ff == 2 * 24 and shared.mlp.w_up.shape == (1, 16, 48)
    if gate:
        with torch.no_grad():
            shared.gate_weight.normal_()
    x = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(4), requires_grad=True)
    y = moe(x)
    tokens = x.reshape(-1, 16)
    w = shared.mlp
    # Two SwiGLU experts of width 24 = one of width 48: sum the halves explicitly.
    halves = [slice(0, 24), slice(24, 48)]
    expected_shared = sum((F.silu(tokens @ w.w_gate[0][:, h]) * (tokens @ w.w_up[0][:, h])) @ w.w_down[0][h]
                          for h in halves)
    if gate:
        expected_shared = expected_shared * torch.sigmoid(tokens @ shared.gate_weight)[:, None]
    y_ref = _naive_moe(moe, x) + expected_shared.reshape(x.shape)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    params = [x] + list(moe.parameters())
    grads = torch.autograd.grad(y.square().sum(), params)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), params)
    for (name, _), g, g_ref in zip([("x", None)] + list(moe.named_parameters()), grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5, msg=name)
    assert shared.gate_weight is None or shared.gate_weight.shape == (16,)


def test_shared_expert_width_and_dtype():
    moe = _moe("linear", shared_expert_d_ff=40, shared_expert_gate=True, dtype=torch.bfloat16)
    assert moe.shared_experts.d_ff == 40 and moe.shared_experts.mlp.w_down.dtype == torch.bfloat16
    assert torch.equal(moe.shared_experts.gate_weight, torch.zeros(16, dtype=torch.bfloat16))  # gate 0.5
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    y = moe(x)
    half = 0.5 * moe.shared_experts.mlp.expert_forward(x, 0)
    torch.testing.assert_close(y.float(), (_naive_moe(moe, x).float() + half.float()), rtol=2e-2, atol=2e-2)
    assert _moe("linear").shared_experts is None


# ------------------------------------------------------------------------------------------ jitter


class _RecordingRouter(torch.nn.Module):
    """Wraps a router and records what it was called with."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, x, **kwargs):
        self.calls.append((x.detach().clone(), kwargs))
        return self.inner(x)


def test_input_jitter_is_multiplicative_uniform_on_the_router_input_in_training_only():
    eps = 0.05
    recorder = _RecordingRouter(LinearRouter(16, 6, 2))
    moe = MoE(16, 24, 6, 2, router=recorder, jitter_eps=eps)
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(5)) + 3.0  # no zeros
    torch.manual_seed(0)
    y = moe(x)
    ratio = recorder.calls[-1][0] / x
    assert float(ratio.min()) >= 1 - eps - 1e-6 and float(ratio.max()) <= 1 + eps + 1e-6
    assert float(ratio.std()) > eps / 4  # spread over the interval (uniform std = eps/sqrt(3))
    assert float(ratio.min()) < 1 - eps / 2 and float(ratio.max()) > 1 + eps / 2
    # The experts see x itself: the output is the naive layer on x with the jittered routing.
    torch.testing.assert_close(y, _naive_moe_with_route(moe, x, moe.last_route), rtol=1e-5, atol=1e-6)
    # Reproducible from torch's RNG.
    torch.manual_seed(0)
    moe(x)
    assert torch.equal(recorder.calls[-1][0], recorder.calls[-2][0])
    # Evaluation: no jitter.
    moe.eval()
    moe(x)
    assert torch.equal(recorder.calls[-1][0], x)
    assert "jitter_eps=0.05" in repr(moe)


# ------------------------------------------------------------- padding mask / seq_len passthrough


def test_padding_mask_and_seq_len_go_to_the_router():
    recorder = _RecordingRouter(LinearRouter(16, 6, 2))
    moe = MoE(16, 24, 6, 2, router=recorder)
    x = torch.randn(3, 5, 16)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[1, 3:] = True
    moe(x)
    assert recorder.calls[-1][1] == {}  # nothing given: nothing passed (custom routers need not know them)
    moe(x, padding_mask=padding, seq_len=5)
    kwargs = recorder.calls[-1][1]
    assert kwargs["seq_len"] == 5 and torch.equal(kwargs["padding_mask"], padding.reshape(-1))
    with pytest.raises(ValueError, match="padding_mask"):
        moe(x, padding_mask=padding[:, :4])


def test_moe_policy_errors():
    for kwargs, match in [
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(capacity_factor=1.0, drop_policy="random"), "drop_policy"),
        (dict(pad_to_capacity=True), "pad_to_capacity"),
        (dict(num_shared_experts=-1), "num_shared_experts"),
        (dict(shared_expert_gate=True), "shared_expert_gate"),
        (dict(shared_expert_d_ff=0), "shared_expert_d_ff"),
        (dict(jitter_eps=1.0), "jitter_eps"),
    ]:
        with pytest.raises(ValueError, match=match):
            _moe("linear", **kwargs)
    text = repr(_moe("linear", capacity_factor=1.25, drop_policy="position", pad_to_capacity=True))
    assert "capacity_factor=1.25, drop_policy='position', pad_to_capacity=True" in text


def test_deepcopy_forgets_all_forward_records():
    import copy

    moe = _moe("linear", capacity_factor=0.5)
    moe(torch.randn(9, 16))
    assert moe.last_dropped is not None and moe.last_routing_map is not None
    clone = copy.deepcopy(moe)
    assert clone.last_route is None and clone.last_dropped is None and clone.last_routing_map is None


def test_moe_with_policies_compiles():
    torch._dynamo.reset()
    moe = _moe("linear", capacity_factor=0.8, pad_to_capacity=True, num_shared_experts=1,
               shared_expert_gate=True)
    x = torch.randn(12, 16, requires_grad=True)
    y_eager = moe(x)
    dropped_eager = moe.last_dropped.clone()
    g_eager = torch.autograd.grad(y_eager.sum(), [x, moe.shared_experts.gate_weight])
    compiled = torch.compile(moe, backend="aot_eager")
    y = compiled(x)
    torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-6)
    assert torch.equal(moe.last_dropped, dropped_eager)
    for a, b in zip(torch.autograd.grad(y.sum(), [x, moe.shared_experts.gate_weight]), g_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("router", ROUTERS)
def test_moe_policies_cuda_match_cpu(router):
    moe = _moe(router, capacity_factor=0.7, drop_policy="probs", pad_to_capacity=True, num_shared_experts=1,
               shared_expert_gate=True)
    x = torch.randn(30, 16, generator=torch.Generator().manual_seed(14))
    y_cpu = moe(x)
    dropped_cpu, map_cpu = moe.last_dropped, moe.last_routing_map
    moe.to("cuda")
    y_cuda = moe(x.cuda())
    torch.testing.assert_close(y_cuda.cpu(), y_cpu, rtol=1e-4, atol=1e-5)
    assert torch.equal(moe.last_dropped.cpu(), dropped_cpu)
    assert torch.equal(moe.last_routing_map.cpu(), map_cpu)


# ----------------------------------------- route-level policies through the routers and the layer


def _float64_probs(moe: MoE, tokens: torch.Tensor) -> torch.Tensor:
    """The router's probabilities recomputed in float64 from its parameters (tie-free oracle)."""
    router = moe.router
    x64 = tokens.detach().double()
    if isinstance(router, LinearRouter):
        logits = x64 @ router.weight.detach().double().t()
    else:
        norm_weight = None if router.norm_weight is None else router.norm_weight.detach().double()
        logits = reference.route_logits(x64, router.proj.detach().double(), router.anchors.detach().double(),
                                        router.scale.detach().double(), beta=router.beta, norm=router.norm,
                                        norm_weight=norm_weight, eps_norm=router.eps_norm, eps=router.eps,
                                        tau=router.tau)
    return torch.softmax(logits, -1) if router.score == "softmax" else torch.sigmoid(logits)


def _grouped_top_k(keys: torch.Tensor, top_k: int, num_groups: int, topk_groups: int, group_score: str):
    """DeepSeek's group-limited selection, written out: score each group of E/G contiguous experts
    (max, or sum of its two largest keys), keep the best topk_groups groups, top-k inside them."""
    T, E = keys.shape
    grouped = keys.view(T, num_groups, E // num_groups)
    scores = grouped.max(-1).values if group_score == "max" else grouped.topk(2, -1).values.sum(-1)
    kept = torch.zeros(T, num_groups, dtype=torch.bool).scatter(1, scores.topk(topk_groups, -1).indices, True)
    masked = keys.masked_fill(~kept.repeat_interleave(E // num_groups, 1), float("-inf"))
    return masked.topk(top_k, -1).indices


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("groups", [(3, 1, "max"), (3, 2, "top2_sum")], ids=["max-g1", "top2_sum-g2"])
def test_group_limited_top_k_and_scaling_pass_through_the_layer(router, groups):
    num_groups, topk_groups, group_score = groups
    moe = _moe(router, num_groups=num_groups, topk_groups=topk_groups, group_score=group_score,
               routed_scaling_factor=2.5)
    config = moe.router.config
    assert (config.num_groups, config.topk_groups, config.group_score,
            config.routed_scaling_factor) == (num_groups, topk_groups, group_score, 2.5)
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(11))
    y = moe(x)
    route = moe.last_route
    probs = _float64_probs(moe, x)
    expected = _grouped_top_k(probs, 2, num_groups, topk_groups, group_score)
    plain = probs.topk(2, -1).indices
    assert not torch.equal(expected, plain)  # the group limit changes some selections
    assert torch.equal(route.indices, expected)
    torch.testing.assert_close(route.weights.double(), 2.5 * probs.gather(1, expected), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y, _naive_moe_with_route(moe, x, route), rtol=1e-5, atol=1e-6)
    with pytest.raises((ValueError, RuntimeError), match="num_groups"):
        _moe(router, num_groups=4, topk_groups=1)(x)  # 6 experts do not split into 4 groups


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_layer_padding_and_sequence_statistics_feed_the_sequence_loss(router, score):
    from l2r_cuda import losses

    B, S, E, k = 3, 9, 6, 2
    moe = _moe(router, score=score)
    g = torch.Generator().manual_seed(12)
    x = torch.randn(B, S, 16, generator=g)
    padding = torch.rand(B, S, generator=g) < 0.3
    padding[1] = True  # one sequence is all padding
    padding[0, 0] = False
    y = moe(x, padding_mask=padding, seq_len=S)
    torch.testing.assert_close(y, moe(x))  # padding only changes the statistics
    moe(x, padding_mask=padding, seq_len=S)
    route = moe.last_route
    assert route.tokens_per_expert.shape == route.mean_probs.shape == (B, E)
    probs = _float64_probs(moe, x.reshape(-1, 16))
    balancing = probs if score == "softmax" else probs / probs.sum(-1, keepdim=True)
    real = ~padding.reshape(B, S)
    selected = torch.zeros(B * S, E, dtype=torch.int64).scatter(1, route.indices, 1).view(B, S, E)
    counts = (selected * real[..., None]).sum(1)
    mean_probs = (balancing.view(B, S, E) * real[..., None]).sum(1) / real.sum(1).clamp_min(1)[:, None]
    assert torch.equal(route.tokens_per_expert, counts)
    torch.testing.assert_close(route.mean_probs.double(), mean_probs, rtol=1e-5, atol=1e-6)
    loss = losses.sequence_load_balancing_loss(route.tokens_per_expert, route.mean_probs)
    f = counts.double() * E / (k * real.sum(1).clamp_min(1)[:, None])
    expected = (f * mean_probs).sum(1)[real.any(1)].mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    for p in router_parameters(moe):
        assert p.grad is not None and torch.isfinite(p.grad).all()


@pytest.mark.parametrize("router", ROUTERS)
def test_sigmoid_load_balancing_loss_starts_near_one(router):
    from l2r_cuda import losses

    moe = _moe(router, score="sigmoid")
    moe(torch.randn(512, 16, generator=torch.Generator().manual_seed(13)))
    route = moe.last_route
    torch.testing.assert_close(route.mean_probs.sum(), torch.tensor(1.0), rtol=1e-5, atol=1e-5)
    assert 0.9 < losses.load_balancing_loss(route.tokens_per_expert, route.mean_probs).item() < 1.5
