"""l2r_cuda.integrations.hf on tiny randomly initialised OLMoE, Qwen3-MoE, Qwen2-MoE, Mixtral, GPT-OSS,
DeepSeek-V3 and DeepSeek-V2 built from configs (offline): replacement, routing policies,
checkpoints, upcycling and distillation."""

import copy
import json

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from l2r_cuda import losses  # noqa: E402
from l2r_cuda.integrations import hf  # noqa: E402
from l2r_cuda.routers import router_parameters  # noqa: E402

VOCAB = 64
COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)


def _olmoe():
    cfg = transformers.OlmoeConfig(intermediate_size=16, num_experts=4, num_experts_per_tok=2, **COMMON)
    return transformers.OlmoeForCausalLM(cfg)


def _qwen3_moe():
    cfg = transformers.Qwen3MoeConfig(
        moe_intermediate_size=16, intermediate_size=32, num_experts=4, num_experts_per_tok=2, head_dim=8,
        norm_topk_prob=True, **COMMON,
    )
    return transformers.Qwen3MoeForCausalLM(cfg)


def _mixtral():
    cfg = transformers.MixtralConfig(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, **COMMON)
    return transformers.MixtralForCausalLM(cfg)


def _qwen2_moe():
    cfg = transformers.Qwen2MoeConfig(
        moe_intermediate_size=16, intermediate_size=32, shared_expert_intermediate_size=24, num_experts=4,
        num_experts_per_tok=2, norm_topk_prob=False, **COMMON,
    )
    return transformers.Qwen2MoeForCausalLM(cfg)


def _gpt_oss():
    cfg = transformers.GptOssConfig(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                                    sliding_window=8, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                                    **COMMON)
    return transformers.GptOssForCausalLM(cfg)


# DeepSeek: 8 experts in 4 groups of 2, the best 2 groups kept; multi-head latent attention (as many
# key/value heads as query heads); every layer an MoE layer.
DEEPSEEK = dict(moe_intermediate_size=16, intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
                topk_group=2, n_shared_experts=1, first_k_dense_replace=0, q_lora_rank=16, kv_lora_rank=16,
                qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)


def _deepseek_v3(**overrides):
    cfg = transformers.DeepseekV3Config(**{**DEEPSEEK, "routed_scaling_factor": 2.5, **overrides},
                                        **{**COMMON, "num_key_value_heads": 4})
    return transformers.DeepseekV3ForCausalLM(cfg)


def _deepseek_v2(**overrides):
    # top-3: a group scored by its best expert can hold the 3rd best expert without being kept
    cfg = transformers.DeepseekV2Config(
        **{**DEEPSEEK, "topk_method": "group_limited_greedy", "routed_scaling_factor": 1.5, "num_experts_per_tok": 3,
           **overrides},
        **{**COMMON, "num_key_value_heads": 4})
    return transformers.DeepseekV2ForCausalLM(cfg)


FAMILIES = {"olmoe": _olmoe, "qwen3_moe": _qwen3_moe, "mixtral": _mixtral, "qwen2_moe": _qwen2_moe,
            "gpt_oss": _gpt_oss, "deepseek_v3": _deepseek_v3, "deepseek_v2": _deepseek_v2}
# What each family's gate does with the top-k weights (norm_topk_prob; Mixtral and GPT-OSS always renormalise,
# DeepSeek-V2 never) and how it scales them (routed_scaling_factor).
NORMALIZES = {"olmoe": False, "qwen3_moe": True, "mixtral": True, "qwen2_moe": False, "gpt_oss": True,
              "deepseek_v3": True, "deepseek_v2": False}
SCALING = {"deepseek_v3": 2.5, "deepseek_v2": 1.5}
NUM_EXPERTS = {"deepseek_v3": 8, "deepseek_v2": 8}
SIGMOID = {"deepseek_v3"}
FLOAT32_WEIGHTS = {"mixtral", "deepseek_v3", "deepseek_v2"}
SWITCH_LOSS = {"olmoe", "qwen3_moe", "mixtral", "qwen2_moe", "gpt_oss"}  # families whose model adds an aux loss
GATE = {family: "router" if family == "gpt_oss" else "gate" for family in FAMILIES}


def _build(family, seed=0, dtype=None):
    torch.manual_seed(seed)
    if dtype is None:
        model = FAMILIES[family]()
    else:  # the way transformers builds a low-precision model (its rotary buffers stay float32)
        stock = FAMILIES[family]()
        model = type(stock)._from_config(stock.config, dtype=dtype)
    model.train()
    return model


def _ids(seed=1):
    return torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_replace_routers_forward_backward_and_training(family):
    model = _build(family)
    names = hf.replace_routers(model, rank=2, num_anchors=2)
    assert names == [f"model.layers.{i}.mlp.{GATE[family]}" for i in range(2)]
    gates = hf.l2r_gates(model)
    assert len(gates) == 2 and all(g.norm_topk_prob == NORMALIZES[family] for g in gates)
    ids = _ids()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    history = []
    for _ in range(6):
        out = model(ids, labels=ids, output_router_logits=True)
        assert torch.isfinite(out.loss)
        # The model's own Switch loss is computed from the L2R logits.
        if family in SWITCH_LOSS:
            assert out.aux_loss is not None and torch.isfinite(out.aux_loss)
        assert len(out.router_logits) == 2 and out.router_logits[0].shape == (16, NUM_EXPERTS.get(family, 4))
        opt.zero_grad()
        out.loss.backward()
        for p in router_parameters(model):
            assert p.grad is not None and torch.isfinite(p.grad).all()
        opt.step()
        history.append(out.loss.item())
    assert history[-1] < history[0] - 0.5
    assert len(list(router_parameters(model))) == 2 * 4  # proj, anchors, scale, norm_weight per layer


@pytest.mark.parametrize("family", FAMILIES)
def test_gate_contract_matches_the_block(family):
    model = _build(family)
    hf.replace_routers(model)
    block = model.model.layers[0].mlp
    gate = getattr(block, GATE[family])
    h = torch.randn(2, 5, 32)
    logits, weights, indices = gate(h.reshape(-1, 32))
    route = gate.last_route
    assert indices.dtype == torch.int64 and torch.equal(indices, route.indices)
    assert weights.dtype == (torch.float32 if family in FLOAT32_WEIGHTS else h.dtype)
    torch.testing.assert_close(weights.float(), route.weights)
    if NORMALIZES[family]:
        torch.testing.assert_close(weights.float().sum(-1), torch.full((10,), SCALING.get(family, 1.0)))
    # softmax (sigmoid) of the returned logits is the L2R routing distribution.
    if family in SIGMOID:
        probs = torch.sigmoid(logits)
        torch.testing.assert_close((probs / probs.sum(-1, keepdim=True)).mean(0), route.mean_probs)
    else:
        torch.testing.assert_close(torch.softmax(logits, -1).mean(0), route.mean_probs)
    tokens = h.reshape(-1, 32)
    y = block(h)
    if family == "gpt_oss":  # the MLP returns (output, router scores); its experts have their own layout
        y, scores = y
        assert torch.equal(scores, weights)
        torch.testing.assert_close(y.reshape(-1, 32), block.experts(tokens, indices, weights))
        return
    if family == "qwen2_moe":  # the shared expert (and its sigmoid gate) is added unchanged
        y = y.reshape(-1, 32) - torch.sigmoid(block.shared_expert_gate(tokens)) * block.shared_expert(tokens)
    if family.startswith("deepseek"):  # so are DeepSeek's shared experts
        y = y.reshape(-1, 32) - block.shared_experts(tokens)
    # The block's output is the L2R-weighted sum of the chosen experts (computed by hand here).
    ex = block.experts
    manual = torch.zeros_like(tokens)
    for t in range(tokens.shape[0]):
        for j in range(indices.shape[1]):
            e = int(indices[t, j])
            gate_h, up_h = (tokens[t] @ ex.gate_up_proj[e].t()).chunk(2)
            manual[t] += weights[t, j] * ((ex.act_fn(gate_h) * up_h) @ ex.down_proj[e].t())
    torch.testing.assert_close(y.reshape(-1, 32), manual, rtol=1e-5, atol=1e-6)


def test_router_logits_recorded_when_model_ran_before_replacement():
    model = _build("olmoe")
    ids = _ids()
    model(ids, output_router_logits=True)  # installs the capture hooks on the original gates
    hf.replace_routers(model)
    out = model(ids, labels=ids, output_router_logits=True)
    gates = hf.l2r_gates(model)
    assert len(out.router_logits) == 2
    # The recorded logits are the L2R ones (their softmax averages to the L2R mean_probs).
    torch.testing.assert_close(torch.softmax(out.router_logits[0], -1).mean(0), gates[0].last_route.mean_probs)


def test_own_losses_from_last_routes_and_no_logits_mode():
    model = _build("qwen3_moe")
    hf.replace_routers(model, return_logits=False)
    ids = _ids()
    out = model(ids, labels=ids)
    routes = hf.last_routes(model)
    assert len(routes) == 2
    aux = sum(losses.load_balancing_loss(r.tokens_per_expert, r.mean_probs) for r in routes)
    z = sum(losses.router_z_loss(r.lse) for r in routes)
    (out.loss + 0.01 * aux + 1e-3 * z).backward()
    assert all(p.grad is not None for p in router_parameters(model))
    assert hf.l2r_gates(model)[0](torch.randn(3, 32))[0] is None


def test_replace_routers_options_and_errors():
    model = _build("olmoe")
    hf.replace_routers(model, normalize=True, rank=3, num_anchors=1, score="sigmoid")
    gate = hf.l2r_gates(model)[0]
    assert gate.router.proj.shape == (3, 32) and gate.router.anchors.shape == (4, 1, 3)
    _, weights, _ = gate(torch.randn(4, 32))
    torch.testing.assert_close(weights.sum(-1), torch.ones(4))
    with pytest.raises(ValueError):  # nothing left to replace
        hf.replace_routers(model)
    with pytest.raises(ValueError):
        hf.replace_routers(nn.Sequential(nn.Linear(4, 4)))


class _LegacyBlock(nn.Module):
    """The transformers 4.x contract: a linear gate, softmax and top-k in the block."""

    def __init__(self, hidden, num_experts, top_k):
        super().__init__()
        self.top_k = top_k
        self.norm_topk_prob = False
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(num_experts))

    def forward(self, h):
        router_logits = self.gate(h)
        probs = torch.softmax(router_logits, dim=1, dtype=torch.float)
        weights, selected = torch.topk(probs, self.top_k, dim=-1)
        out = torch.zeros_like(h)
        for t in range(h.shape[0]):
            for j in range(self.top_k):
                out[t] += weights[t, j] * self.experts[int(selected[t, j])](h[t])
        return out, router_logits, selected, weights


def test_legacy_linear_gate_mode_reproduces_l2r_routing():
    torch.manual_seed(0)
    block = _LegacyBlock(16, 5, 2)
    hf.replace_routers(block, block_types=["_LegacyBlock"])
    assert block.gate.mode == "logits"
    h = torch.randn(12, 16)
    _, logits, selected, weights = block(h)
    route = block.gate.last_route
    assert torch.equal(selected, route.indices)
    torch.testing.assert_close(weights, route.weights)


# ---------------------------------------------------------------- checkpoints


def _perturb_routers(model, seed=5):
    """Give every router parameter and expert_bias values no initialisation produces."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in hf.l2r_gates(model):
            for t in list(gate.router.parameters()) + [gate.router.expert_bias]:
                t.add_(0.1 * torch.randn(t.shape, generator=gen).to(t.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_then_hf_from_pretrained_is_bit_exact(family, dtype, tmp_path):
    model = _build(family, dtype=dtype)
    hf.replace_routers(model, rank=3, num_anchors=2, tau=0.5)
    _perturb_routers(model)
    model.eval()
    ids = _ids()
    with torch.no_grad():
        expected = model(ids, output_router_logits=True)
    model.save_pretrained(tmp_path)

    saved_config = json.loads((tmp_path / "config.json").read_text())
    assert saved_config["fusion_config"] == {hf.LOAD_GUARD: True}
    saved = saved_config[hf.CONFIG_KEY]
    assert saved["format"] == 1 and len(saved["replacements"]) == 1
    recorded = saved["replacements"][0]
    assert recorded["gates"] == [f"layers.{i}.mlp.{GATE[family]}" for i in range(2)]
    assert recorded["options"]["rank"] == 3 and recorded["options"]["num_anchors"] == 2
    assert recorded["options"]["tau"] == 0.5

    for model_class in (type(model), transformers.AutoModelForCausalLM):
        loaded, info = hf.from_pretrained(model_class, tmp_path, output_loading_info=True)
        assert type(loaded) is type(model)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        assert loaded.dtype == dtype
        routers = [g.router for g in hf.l2r_gates(loaded)]
        assert all(t.dtype == torch.float32 for r in routers for t in (r.proj, r.expert_bias))
        assert all(g.original_gate is None for g in hf.l2r_gates(loaded))
        with torch.no_grad():
            out = loaded(ids, output_router_logits=True)
        assert torch.equal(out.logits, expected.logits)
        assert all(torch.equal(a, b) for a, b in zip(out.router_logits, expected.router_logits))
        assert getattr(loaded.config, hf.CONFIG_KEY) == saved
        assert loaded.config.fusion_config == {hf.LOAD_GUARD: True}  # saved again, still guarded


def test_checkpoint_loads_into_the_base_model_and_saves_again(tmp_path):
    model = _build("olmoe")
    hf.replace_routers(model, rank=2, num_anchors=3)
    _perturb_routers(model)
    model.eval()
    model.save_pretrained(tmp_path / "lm")
    base = hf.from_pretrained(transformers.AutoModel, tmp_path / "lm")
    assert type(base) is transformers.OlmoeModel
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(base(ids).last_hidden_state, model.model(ids).last_hidden_state)
    # Saved again from the bare model, it loads back into the causal LM with the same routers.
    base.save_pretrained(tmp_path / "base")
    again = hf.from_pretrained(transformers.OlmoeForCausalLM, tmp_path / "base")
    for a, b in zip(hf.l2r_gates(again), hf.l2r_gates(model)):
        assert all(torch.equal(x, y) for x, y in zip(a.router.state_dict().values(), b.router.state_dict().values()))
    with pytest.raises(ValueError, match="nothing|no block"):  # every gate is already L2R
        hf.replace_routers(again)


def test_plain_from_pretrained_refuses_an_l2r_checkpoint_and_hf_from_pretrained_needs_one(tmp_path):
    model = _build("qwen3_moe")
    model.save_pretrained(tmp_path / "stock")
    with pytest.raises(ValueError, match="l2r_router"):
        hf.from_pretrained(transformers.Qwen3MoeForCausalLM, tmp_path / "stock")
    hf.replace_routers(model)
    model.save_pretrained(tmp_path / "l2r")
    for model_class in (transformers.Qwen3MoeForCausalLM, transformers.AutoModelForCausalLM):
        with pytest.raises(ValueError, match="load with l2r_cuda.integrations.hf.from_pretrained"):
            model_class.from_pretrained(tmp_path / "l2r")
    # Overridden, transformers loads stock gates and its load report lists the L2R weights as unexpected
    # and the stock gate weights as missing (newly initialised).
    plain, info = transformers.Qwen3MoeForCausalLM.from_pretrained(tmp_path / "l2r", fusion_config={},
                                                                   output_loading_info=True)
    assert "model.layers.0.mlp.gate.router.proj" in info["unexpected_keys"]
    assert "model.layers.0.mlp.gate.weight" in info["missing_keys"]
    assert not hf.l2r_gates(plain)


def test_recorded_settings_must_be_json(tmp_path):
    model = _build("olmoe")
    with pytest.raises(TypeError, match="JSON"):
        hf.replace_routers(model, tau=torch.tensor(1.0))
    with pytest.raises(TypeError, match="dtype"):
        hf.replace_routers(model, dtype=torch.bfloat16)


# ---------------------------------------------------------------- families and unsupported features


def _tokens(n=64, d=32, seed=3):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _stock_gate_on_logits(gate):
    """A copy of the stock gate ``gate`` that takes logits ``[T, E]`` as its hidden states (identity
    weight), so transformers' own selection code routes given logits."""
    oracle = copy.deepcopy(gate)
    oracle.hidden_dim = oracle.num_experts
    oracle.weight = nn.Parameter(torch.eye(oracle.num_experts))
    return oracle


@pytest.mark.parametrize("family", ["deepseek_v3", "deepseek_v2"])
def test_deepseek_group_limited_routing_is_the_gates_own(family):
    """The L2R router selects and weighs exactly as the replaced DeepSeek gate does on the same logits:
    group-limited top-k (V3: top-2-sum of sigmoid + correction bias; V2: best softmax probability),
    renormalisation and routed scaling factor."""
    model = _build(family)
    block = model.model.layers[0].mlp
    stock = block.gate
    if family == "deepseek_v3":  # a correction bias that changes which experts and groups win
        stock.e_score_correction_bias.copy_(0.2 * torch.randn(8, generator=torch.Generator().manual_seed(4)))
    oracle = _stock_gate_on_logits(stock)
    hf.replace_routers(model, rank=4, num_anchors=2)
    gate = block.gate
    r = gate.router
    assert r.config.num_groups == 4 and r.config.topk_groups == 2 and r.config.routed_scaling_factor == SCALING[family]
    assert r.config.group_score == ("top2_sum" if family == "deepseek_v3" else "max")
    assert r.config.score == ("sigmoid" if family == "deepseek_v3" else "softmax")
    if family == "deepseek_v3":
        assert r.expert_bias.dtype == torch.float32 and torch.equal(r.expert_bias, stock.e_score_correction_bias)

    tokens = _tokens()
    logits, weights, indices = gate(tokens)
    assert torch.equal(logits, gate.router_logits(tokens))  # the native logits route() selected from
    _, expected_weights, expected = oracle(logits)

    # Tie-free tokens (float64 margins far above float32 error) for an exact index comparison.
    l64 = logits.double()
    probs = torch.sigmoid(l64) if family == "deepseek_v3" else torch.softmax(l64, -1)
    keys = (probs + r.expert_bias.double()).view(-1, 4, 2)
    group_scores = keys.sum(-1) if family == "deepseek_v3" else keys.max(-1).values
    sorted_groups = group_scores.sort(-1, descending=True).values
    assert (sorted_groups[:, 1] - sorted_groups[:, 2]).min() > 1e-5
    assert (probs.sort(-1).values.diff(dim=-1)).min() > 1e-6

    order, expected_order = indices.sort(-1), expected.sort(-1)
    assert torch.equal(order.values, expected_order.values)
    torch.testing.assert_close(weights.gather(1, order.indices), expected_weights.gather(1, expected_order.indices))
    # The group limit binds: every token's experts lie in its 2 kept groups, and ignoring the groups
    # would have picked other experts for some tokens.
    kept = group_scores.topk(2, -1).indices
    assert ((indices // 2)[:, :, None] == kept[:, None, :]).any(-1).all()
    ungrouped = (probs + r.expert_bias.double()).topk(gate.top_k, -1).indices.sort(-1).values
    assert (ungrouped != order.values).any(-1).sum() >= 4


def test_deepseek_v3_forward_backward_generate_and_bf16_with_l2r_routers():
    model = _build("deepseek_v3")
    names = hf.replace_routers(model, rank=2, num_anchors=2)
    assert names == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    ids = _ids()
    out = model(ids, labels=ids, output_router_logits=True)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in router_parameters(model))
    for route in hf.last_routes(model):  # at most topk_group=2 of the 4 groups per token
        assert all(len(set((row // 2).tolist())) <= 2 for row in route.indices)
        torch.testing.assert_close(route.weights.sum(-1), torch.full((16,), 2.5))
    model.eval()
    generated = model.generate(ids[:, :4], max_new_tokens=5, do_sample=False)
    assert generated.shape == (2, 9) and torch.equal(generated[:, :4], ids[:, :4])
    # greedy decoding with the KV cache picks what a full forward picks
    with torch.no_grad():
        full = model(generated[:, :-1]).logits[:, 3:].argmax(-1)
    assert torch.equal(full, generated[:, 4:])
    # bf16, built so or cast after the replacement: the expert bias (the correction bias) stays float32
    # state that update_expert_bias_ accepts
    low = _build("deepseek_v3", dtype=torch.bfloat16)
    hf.replace_routers(low)
    assert all(g.router.expert_bias.dtype == torch.float32 for g in hf.l2r_gates(low))
    assert low(ids).logits.dtype == torch.bfloat16
    model.to(torch.bfloat16)
    assert model(ids).logits.dtype == torch.bfloat16
    for gate, route in zip(hf.l2r_gates(model), hf.last_routes(model)):
        assert gate.router.expert_bias.dtype == torch.float32
        losses.update_expert_bias_(gate.router.expert_bias, route.tokens_per_expert, rate=1e-3)


def test_deepseek_gate_features_the_drop_in_cannot_carry_raise_naming_them():
    # a group limit leaving fewer experts than top_k (1 group of 2 experts, top-4)
    model = _deepseek_v3(topk_group=1, num_experts_per_tok=4)
    with pytest.raises(hf.UnsupportedGateFeature, match="DeepseekV3TopkRouter.topk_group"):
        hf.replace_routers(model)
    assert not hf.l2r_gates(model)  # nothing was replaced
    for attr, value, feature in (("topk_method", "sinkhorn", "topk_method"), ("scoring_func", "tanh", "scoring_func"),
                                 ("topk_group", None, "topk_group"), ("num_group", 3, "num_group")):
        model = _deepseek_v3()
        setattr(model.model.layers[1].mlp.gate, attr, value)
        with pytest.raises(hf.UnsupportedGateFeature, match=f"DeepseekV3TopkRouter.{feature}"):
            hf.replace_routers(model)
        assert not hf.l2r_gates(model)
    with pytest.raises(TypeError, match="num_groups is not an option"):
        hf.replace_routers(_deepseek_v3(), num_groups=2, topk_groups=1)


def test_deepseek_single_group_and_greedy_gates_route_without_a_group_limit():
    v3 = _deepseek_v3(n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False)
    bias = torch.linspace(-0.5, 0.5, 8)
    for layer in v3.model.layers:
        layer.mlp.gate.e_score_correction_bias.copy_(bias)
    hf.replace_routers(v3)
    for gate in hf.l2r_gates(v3):
        c = gate.router.config
        assert (c.num_groups, c.routed_scaling_factor, c.normalize, c.score) == (None, 1.0, False, "sigmoid")
        assert gate.original_score == "sigmoid" and torch.equal(gate.router.expert_bias, bias)
    # DeepSeek-V2's greedy gate ignores its n_group and never renormalises
    v2 = _deepseek_v2(topk_method="greedy")
    hf.replace_routers(v2)
    for gate in hf.l2r_gates(v2):
        c = gate.router.config
        assert (c.num_groups, c.routed_scaling_factor, c.normalize, c.score) == (None, 1.5, False, "softmax")
    ids = _ids()
    v2(ids, labels=ids).loss.backward()


class _GateWithExtra(nn.Module):
    def __init__(self):
        super().__init__()
        self.top_k, self.num_experts, self.hidden_dim = 2, 4, 8
        self.weight = nn.Parameter(torch.randn(4, 8))
        self.temperature = nn.Parameter(torch.ones(()))


class _BlockWithExtra(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = _GateWithExtra()


def test_unknown_gate_tensor_raises_naming_it():
    with pytest.raises(hf.UnsupportedGateFeature, match="_GateWithExtra.temperature"):
        hf.replace_routers(_BlockWithExtra(), block_types=["_BlockWithExtra"])


def test_gpt_oss_logit_bias_refuses_linear_init():
    model = _build("gpt_oss")
    with pytest.raises(hf.UnsupportedGateFeature, match="bias"):
        hf.replace_routers(model, init="linear")
    assert not hf.l2r_gates(model)


# ---------------------------------------------------------------- upcycling


def _olmoe8():
    torch.manual_seed(0)
    cfg = transformers.OlmoeConfig(intermediate_size=16, num_experts=8, num_experts_per_tok=2, **COMMON)
    model = transformers.OlmoeForCausalLM(cfg).eval()
    with torch.no_grad():  # a trained gate is far from uniform: give it O(1) logits
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.5)
    return model


def _batches(n=3):
    return [torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(100 + i)) for i in range(n)]


@pytest.mark.parametrize("rank", [8, 12], ids=["rank=E", "rank>E"])
def test_linear_init_reproduces_the_gate_top_k_at_full_rank(rank):
    model = _olmoe8()
    block = model.model.layers[0].mlp
    original = block.gate
    hf.replace_routers(model, rank=rank, num_anchors=1, init="linear")
    proj = block.gate.router.proj
    torch.testing.assert_close(proj @ proj.t(), torch.eye(rank), atol=1e-5, rtol=0)  # orthonormal rows
    tokens = torch.randn(64, 32)
    _, _, expected = original(tokens)
    _, _, indices = block.gate(tokens)
    # tie-free: the rank-8 (= full) gate's top-2 margins are far above the float32 error
    logits = tokens @ original.weight.t()
    top3 = logits.topk(3, -1).values
    assert (top3[:, 1] - top3[:, 2]).min() > 1e-3 and (top3[:, 0] - top3[:, 1]).min() > 1e-4
    assert torch.equal(indices, expected)
    # The L2R logits track the gate's logits (softmax is shift-invariant: compare centred).
    l2r = block.gate.router_logits(tokens)
    centred = lambda t: t - t.mean(-1, keepdim=True)  # noqa: E731
    corr = torch.corrcoef(torch.stack([centred(l2r).flatten(), centred(logits).flatten()]))[0, 1]
    assert corr > 0.9


@pytest.mark.parametrize("rank,num_anchors,beta", [(2, 1, 1.0), (2, 4, 1.0), (4, 2, 1.0), (2, 2, 0.5), (4, 1, 0.0)])
def test_linear_init_starts_closer_to_the_original_routing_than_random_init(rank, num_anchors, beta):
    batches = _batches()
    agreement = {}
    for init in ("random", "linear"):
        model = _olmoe8()
        torch.manual_seed(1)
        hf.replace_routers(model, rank=rank, num_anchors=num_anchors, beta=beta, init=init)
        agreement[init] = hf.routing_agreement(model, batches)
    assert agreement["linear"] > agreement["random"], agreement


def _deepseek_trained(family):
    """A DeepSeek model whose gates look trained: O(1) logits and (V3) a non-zero correction bias."""
    model = _build(family).eval()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in model.model.layers:
            gate = layer.mlp.gate
            gate.weight.copy_(0.5 * torch.randn(gate.weight.shape, generator=gen))
            if family == "deepseek_v3":
                gate.e_score_correction_bias.copy_(0.1 * torch.randn(8, generator=gen))
    return model


@pytest.mark.parametrize("rank,num_anchors", [(2, 1), (4, 2), (8, 1)])
@pytest.mark.parametrize("family", ["deepseek_v3", "deepseek_v2"])
def test_linear_init_of_group_limited_gates_starts_closer_than_random_init(family, rank, num_anchors):
    batches = _batches()
    agreement = {}
    for init in ("random", "linear"):
        model = _deepseek_trained(family)
        torch.manual_seed(1)
        hf.replace_routers(model, rank=rank, num_anchors=num_anchors, init=init)
        agreement[init] = hf.routing_agreement(model, batches)
    assert agreement["linear"] > agreement["random"], agreement


def test_distill_routers_on_sigmoid_group_limited_gates():
    model = _deepseek_trained("deepseek_v3")
    torch.manual_seed(1)
    hf.replace_routers(model, rank=2, num_anchors=2, init="random")
    report = hf.distill_routers(model, _batches(), steps=30, lr=3e-2, progress=False)
    assert report.kl[-1] < 0.5 * report.kl[0]
    assert report.agreement_after > report.agreement_before


def test_distill_routers_trains_only_the_routers_towards_the_original_routing():
    model = _olmoe8()
    torch.manual_seed(1)
    hf.replace_routers(model, rank=2, num_anchors=2, init="random")
    frozen = {k: v.clone() for k, v in model.state_dict().items() if ".router." not in k}
    routers = {k: v.clone() for k, v in model.state_dict().items() if ".router." in k}
    batches = _batches()
    report = hf.distill_routers(model, batches, steps=30, lr=3e-2, progress=False)
    assert len(report.kl) == 30 and report.kl[-1] < 0.5 * report.kl[0]
    assert report.agreement_after > report.agreement_before
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())
    assert any(not torch.equal(state[k], v) for k, v in routers.items())
    assert all(p.grad is None for p in model.parameters())
    assert report.agreement_after == hf.routing_agreement(model, batches)
    assert report.agreement_before == hf.routing_agreement(_routers_like(model, routers), batches)
    assert "top-k agreement" in str(report)


def _routers_like(model, router_state):
    """``model`` with its router parameters set back to ``router_state`` (in place)."""
    state = model.state_dict()
    with torch.no_grad():
        for k, v in router_state.items():
            state[k].copy_(v)
    return model


def test_agreement_and_distillation_need_the_original_gates(tmp_path):
    model = _build("olmoe")
    hf.replace_routers(model)
    model.save_pretrained(tmp_path)
    loaded = hf.from_pretrained(transformers.OlmoeForCausalLM, tmp_path)
    with pytest.raises(ValueError, match="original gate"):
        hf.routing_agreement(loaded, _batches(1))
    with pytest.raises(ValueError, match="original gate"):
        hf.distill_routers(loaded, _batches(1), steps=1)
    with pytest.raises(ValueError, match="scores with"):
        other = _build("olmoe")
        hf.replace_routers(other, score="sigmoid")
        hf.distill_routers(other, _batches(1), steps=1)


def test_upcycle_example_quick(tmp_path):
    pytest.importorskip("pydoc_data")
    from experiments import upcycle_olmoe

    result = upcycle_olmoe.main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "summary.md").stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text())["runs"] == result["runs"]
    assert {(r["rank"], r["init"]) for r in result["runs"]} == {(2, "linear"), (2, "random")}


class _PlainTopKGate(nn.Module):
    """A transformers>=5-style gate that does not say whether it renormalises its top-k weights."""

    def __init__(self):
        super().__init__()
        self.top_k, self.num_experts, self.hidden_dim = 2, 4, 8
        self.weight = nn.Parameter(torch.randn(4, 8))


class _PlainBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = _PlainTopKGate()


def test_unknown_renormalisation_must_be_given():
    block = _PlainBlock()
    with pytest.raises(hf.UnsupportedGateFeature, match="norm_topk_prob"):
        hf.replace_routers(block, block_types=["_PlainBlock"])
    assert not hf.l2r_gates(block)
    hf.replace_routers(block, block_types=["_PlainBlock"], normalize=False)
    assert block.gate.norm_topk_prob is False
