"""l2r_cuda.metrics on constructed cases with known answers."""

import math

import pytest
import torch

from l2r_cuda import metrics, reference


def test_expert_load_balanced_and_collapsed():
    balanced = metrics.expert_load(torch.tensor([5, 5, 5, 5]))
    assert balanced.entropy == pytest.approx(1.0)
    assert balanced.max_over_mean == pytest.approx(1.0)
    assert balanced.counts.dtype == torch.int64
    torch.testing.assert_close(balanced.fractions, torch.full((4,), 0.25, dtype=torch.float64))
    collapsed = metrics.expert_load(torch.tensor([0, 12, 0, 0]))
    assert collapsed.entropy == pytest.approx(0.0)
    assert collapsed.max_over_mean == pytest.approx(4.0)


def test_expert_load_partial_and_degenerate():
    load = metrics.expert_load(torch.tensor([2, 2, 0, 0]))
    assert load.entropy == pytest.approx(math.log(2) / math.log(4))  # = 0.5
    assert load.max_over_mean == pytest.approx(2.0)
    assert metrics.expert_load(torch.tensor([7])).entropy == 1.0
    empty = metrics.expert_load(torch.zeros(3, dtype=torch.int64))
    assert math.isnan(empty.entropy) and math.isnan(empty.max_over_mean)


def test_router_confidence():
    weights = torch.tensor([[0.6, 0.3], [0.2, 0.5]])  # max per row: 0.6, 0.5 (order not assumed)
    conf = metrics.router_confidence(weights)
    assert conf.top1_weight == pytest.approx(0.55)
    assert conf.entropy is None
    uniform = torch.full((3, 4), 0.25)
    onehot = torch.eye(4)[:3]
    assert metrics.router_confidence(weights[:1].expand(3, 2), uniform).entropy_normalized == pytest.approx(1.0)
    assert metrics.router_confidence(weights[:1].expand(3, 2), uniform).entropy == pytest.approx(math.log(4))
    assert metrics.router_confidence(weights[:1].expand(3, 2), onehot).entropy == pytest.approx(0.0)
    # Sigmoid-style scores are renormalised into a distribution: all-equal scores = uniform.
    assert metrics.router_confidence(weights[:1], torch.full((1, 4), 0.9)).entropy_normalized == pytest.approx(1.0)


def test_angular_diversity_constructed():
    e1 = torch.tensor([1.0, 0.0])
    q = torch.stack([e1, 2 * e1, -e1, -3 * e1])  # cosines: +1 for 2 pairs, -1 for 4 pairs
    div = metrics.angular_diversity(q)
    assert div.cosine_mean == pytest.approx(-1 / 3)
    assert div.cosine_variance == pytest.approx(1 - 1 / 9)
    assert div.cosine_variance_scaled == pytest.approx(2 * (1 - 1 / 9))
    assert div.rank == 2
    # All the same direction: no spread. Zero vectors have no direction and are ignored.
    same = metrics.angular_diversity(torch.cat([torch.ones(5, 3), torch.zeros(2, 3)]))
    assert same.cosine_variance == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(metrics.angular_diversity(torch.ones(1, 3)).cosine_variance)


@pytest.mark.parametrize("rank", [2, 8, 32])
def test_angular_diversity_scaled_is_about_one_for_isotropic_tokens(rank):
    # Random directions in r dims: Var[cos] = 1/r, so the scaled value is ~1 for every r.
    q = torch.randn(1500, rank, generator=torch.Generator().manual_seed(rank))
    div = metrics.angular_diversity(q)
    assert div.cosine_variance == pytest.approx(1 / rank, rel=0.1)
    assert div.cosine_variance_scaled == pytest.approx(1.0, rel=0.1)


def test_angular_diversity_subsample_is_seeded():
    q = torch.randn(300, 4, generator=torch.Generator().manual_seed(0))
    a = metrics.angular_diversity(q, max_tokens=50, seed=3)
    b = metrics.angular_diversity(q, max_tokens=50, seed=3)
    assert a == b


def test_routing_space_matches_spec_q():
    from l2r_cuda import L2RRouter

    router = L2RRouter(8, 4, 2, rank=3)
    with torch.no_grad():
        router.norm_weight.uniform_(0.5, 1.5)
    x = torch.randn(5, 8)
    xn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * router.norm_weight
    torch.testing.assert_close(metrics.routing_space(router, x), (xn @ router.proj.t()).detach())
    from l2r_cuda import LinearRouter

    linear = LinearRouter(8, 4, 2)
    torch.testing.assert_close(metrics.routing_space(linear, x), linear.logits(x).detach())


def test_expert_specialization_known_answers():
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    # Expert determined by the label: I = H(label) = log2(4) = 2 bits.
    determined = metrics.expert_specialization(labels[:, None], labels, num_experts=4)
    assert determined.mutual_information == pytest.approx(2.0)
    assert determined.label_entropy == pytest.approx(2.0)
    assert determined.normalized == pytest.approx(1.0)
    # Every label spread evenly over two experts: independent, I = 0.
    experts = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])[:, None]
    independent = metrics.expert_specialization(experts, labels, num_experts=2)
    assert independent.mutual_information == pytest.approx(0.0, abs=1e-12)
    # Experts pair up labels {0,1} -> 0, {2,3} -> 1: I = 1 bit of the 2.
    paired = metrics.expert_specialization((labels // 2)[:, None], labels, num_experts=2)
    assert paired.mutual_information == pytest.approx(1.0)
    assert paired.normalized == pytest.approx(0.5)


def test_expert_specialization_top1_vs_all_top_k():
    labels = torch.tensor([0, 0, 1, 1])
    # Top-1 follows the label; the second slot is always expert 2 (shared).
    indices = torch.tensor([[0, 2], [0, 2], [1, 2], [1, 2]])
    assert metrics.expert_specialization(indices, labels, 3).mutual_information == pytest.approx(1.0)
    # All slots, 1/k each: P(l, e) = 1/4 on (0,0), (1,1), and 1/4 on (0,2), (1,2).
    # I = sum P log2 P/(P(l)P(e)): 2 * 1/4 * log2((1/4)/(1/2*1/4)) + 2 * 1/4 * log2((1/4)/(1/2*1/2)) = 0.5
    all_k = metrics.expert_specialization(indices, labels, 3, use_all_top_k=True)
    assert all_k.mutual_information == pytest.approx(0.5)


def test_routing_stability():
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    proj = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
    anchors = torch.randn(6, 2, 2, generator=torch.Generator().manual_seed(2))

    def router(inp):
        return reference.route(inp, proj, anchors, torch.tensor(5.0), top_k=2)

    assert metrics.routing_stability(router, x, noise_std=0.0) == 1.0
    # Order inside the top-k does not count: a router that swaps its slots under noise is stable.
    calls = []

    def swapping(inp):
        calls.append(1)
        idx = torch.tensor([[0, 1]]).expand(inp.shape[0], 2)
        return idx if len(calls) == 1 else idx.flip(-1)

    assert metrics.routing_stability(swapping, x, noise_std=1.0) == 1.0
    small = metrics.routing_stability(router, x, noise_std=1e-3, seed=5)
    large = metrics.routing_stability(router, x, noise_std=10.0, seed=5)
    assert small > large
    assert 0.0 <= large < 0.9
    assert metrics.routing_stability(router, x, noise_std=0.5, seed=7) == metrics.routing_stability(
        router, x, noise_std=0.5, seed=7
    )


def test_routing_stability_with_sign_router_known_fraction():
    # Expert = sign of the first feature; tokens with |x0| far above the noise never flip.
    x = torch.zeros(10, 2)
    x[:5, 0] = 100.0
    x[5:, 0] = -100.0

    def sign_router(inp):
        return (inp[:, :1] > 0).long()

    assert metrics.routing_stability(sign_router, x, noise_std=1e-2) == 1.0
    x[0, 0] = 0.0  # sits on the boundary: flips with probability 1/2 under noise; seeded
    value = metrics.routing_stability(sign_router, x, noise_std=1e-2, seed=0)
    assert value in (0.9, 1.0)
