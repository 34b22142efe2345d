"""l2r_cuda.integrations.hf on tiny randomly initialised OLMoE, Qwen3-MoE and Mixtral (offline)."""

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


FAMILIES = {"olmoe": _olmoe, "qwen3_moe": _qwen3_moe, "mixtral": _mixtral}
# What each family's gate does with the top-k weights (norm_topk_prob; Mixtral always renormalises).
NORMALIZES = {"olmoe": False, "qwen3_moe": True, "mixtral": True}


def _build(family, seed=0):
    torch.manual_seed(seed)
    model = FAMILIES[family]()
    model.train()
    return model


def _ids(seed=1):
    return torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_replace_routers_forward_backward_and_training(family):
    model = _build(family)
    names = hf.replace_routers(model, rank=2, num_anchors=2)
    assert names == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    gates = hf.l2r_gates(model)
    assert len(gates) == 2 and all(g.norm_topk_prob == NORMALIZES[family] for g in gates)
    ids = _ids()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    history = []
    for _ in range(6):
        out = model(ids, labels=ids, output_router_logits=True)
        assert torch.isfinite(out.loss)
        # The model's own Switch loss is computed from the L2R logits.
        assert out.aux_loss is not None and torch.isfinite(out.aux_loss)
        assert len(out.router_logits) == 2 and out.router_logits[0].shape == (16, 4)
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
    gate = block.gate
    h = torch.randn(2, 5, 32)
    logits, weights, indices = gate(h.reshape(-1, 32))
    route = gate.last_route
    assert indices.dtype == torch.int64 and torch.equal(indices, route.indices)
    assert weights.dtype == (torch.float32 if family == "mixtral" else h.dtype)
    torch.testing.assert_close(weights.float(), route.weights)
    if NORMALIZES[family]:
        torch.testing.assert_close(weights.float().sum(-1), torch.ones(10))
    # softmax of the returned logits is the L2R routing distribution.
    torch.testing.assert_close(torch.softmax(logits, -1).mean(0), route.mean_probs)
    # The block's output is the L2R-weighted sum of the chosen experts (computed by hand here).
    y = block(h)
    ex = block.experts
    tokens = h.reshape(-1, 32)
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
