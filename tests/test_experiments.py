"""experiments/: the statistics, the paired initialisation, the log-space-scale router, the corpus
split, the pre-registered contrasts, and a --quick run of both experiments (written to a tmp dir;
every reported number finite, the SR-MoE hinge active, RoMA and the z-loss arms traced)."""

import json
import math

import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
scipy_stats = pytest.importorskip("scipy.stats")

from l2r_cuda import L2RRouter  # noqa: E402
from experiments import arms, diagnostics, stats, training  # noqa: E402
from experiments.log_scale_router import LogScaleL2RRouter  # noqa: E402
from experiments.model import MoETransformer, build_paired  # noqa: E402


def test_paired_test_matches_scipy():
    a = [1.0, 2.0, 3.0, 4.0, 5.0]
    b = [0.0, 1.0, 2.0, 3.0, 3.0]
    d = stats.paired_test(a, b)
    # differences 1, 1, 1, 1, 2: mean 1.2, sd sqrt(0.2), t_{0.975, 4} = 2.7764
    half = 2.7764 * math.sqrt(0.2) / math.sqrt(5)
    assert d["mean"] == pytest.approx(1.2) and d["sd"] == pytest.approx(math.sqrt(0.2))
    assert d["lo"] == pytest.approx(1.2 - half, abs=1e-4) and d["hi"] == pytest.approx(1.2 + half, abs=1e-4)
    assert d["p"] == pytest.approx(scipy_stats.ttest_rel(a, b).pvalue, rel=1e-9)
    assert math.isnan(stats.paired_test([1.0], [0.0])["p"])


def test_holm():
    # sorted p: 0.01 (x4 = 0.04), 0.03 (x3 = 0.09), 0.04 (x2 = 0.08 -> monotone 0.09), 0.5 (x1)
    assert stats.holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert stats.holm([0.9, 0.02]) == pytest.approx([0.9, 0.04])
    assert stats.holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])  # capped at 1, monotone


@pytest.mark.parametrize("n", [3, 8, 10])
def test_minimum_detectable_effect(n):
    mde = stats.mde_paired(2.0, n)
    assert stats.power_paired(mde, 2.0, n) == pytest.approx(stats.POWER, abs=1e-6)
    assert stats.power_paired(0.0, 2.0, n) == pytest.approx(stats.ALPHA, abs=1e-6)
    assert stats.mde_paired(4.0, n) == pytest.approx(2 * mde, rel=1e-6)  # linear in sd
    assert stats.mde_paired(2.0, n, alpha=stats.ALPHA / 25) > mde
    # large-n limit: (z_{0.975} + z_{0.8}) sd / sqrt(n)
    assert stats.mde_paired(1.0, 400) == pytest.approx((1.95996 + 0.84162) / 20, rel=5e-3)


def test_log_scale_router_is_the_package_router_with_exp_scale():
    torch.manual_seed(0)
    router = LogScaleL2RRouter(16, 8, 2, rank=2, num_anchors=3, init_scale=5.0)
    names = dict(router.named_parameters())
    assert "scale" not in names and "parametrizations.scale.original" in names
    assert float(router.log_scale.detach()) == pytest.approx(math.log(5.0))
    with torch.no_grad():
        router.log_scale.fill_(math.log(2.5))
    plain = L2RRouter(16, 8, 2, rank=2, num_anchors=3)
    with torch.no_grad():
        plain.proj.copy_(router.proj)
        plain.anchors.copy_(router.anchors)
        plain.scale.fill_(2.5)
    x = torch.randn(33, 16)
    out, ref = router(x), plain(x)
    assert torch.equal(out.indices, ref.indices)
    torch.testing.assert_close(out.weights, ref.weights)
    out.weights.sum().backward()
    ref.weights.sum().backward()
    # d/ds f(exp(s)) = f'(scale) * scale
    torch.testing.assert_close(router.log_scale.grad, plain.scale.grad * 2.5)


def test_log_scale_router_reset_and_even_anchors():
    router = LogScaleL2RRouter(16, 8, 2, rank=2, num_anchors=2, init_scale=3.0, even_anchors=True)
    with torch.no_grad():
        router.log_scale.fill_(0.0)
    torch.manual_seed(1)
    router.reset_parameters()
    assert float(router.scale.detach()) == pytest.approx(3.0)
    a = router.anchors.detach().reshape(-1, 2)
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(16))
    angles = torch.sort(torch.atan2(a[:, 1], a[:, 0]) % (2 * math.pi)).values
    torch.testing.assert_close(torch.diff(angles), torch.full((15,), 2 * math.pi / 16))
    # expert e's two anchors are opposite (spread around the circle), not neighbours
    torch.testing.assert_close(router.anchors[:, 0].detach(), -router.anchors[:, 1].detach(), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="rank 2"):
        LogScaleL2RRouter(16, 8, 2, rank=4, even_anchors=True)


def test_full_probs_are_the_routers_distribution():
    torch.manual_seed(0)
    x = torch.randn(40, 16)
    for router in (arms.Arm("a").make_router(16), arms.Arm("b", router="linear").make_router(16)):
        probs = diagnostics.full_probs(router, x)
        torch.testing.assert_close(probs.sum(-1), torch.ones(40))
        out = router(x)
        torch.testing.assert_close(probs.gather(1, out.indices), out.weights.detach())
        assert router.top_k == arms.TOP_K  # restored


def _tiny(arm):
    return MoETransformer(arm, d_in=4, vocab=None, seq_len=5, d_model=16, layers=2, heads=2, d_ff=8, causal=False,
                          d_out=3)


def test_paired_init_shares_everything_but_the_router():
    lin = build_paired(_tiny, arms.Arm(arms.LINEAR, router="linear"), seed=3)
    l2r = build_paired(_tiny, arms.Arm("x", rank=8, num_anchors=4), seed=3)
    again = build_paired(_tiny, arms.Arm("x", rank=8, num_anchors=4), seed=3)
    other = build_paired(_tiny, arms.Arm("x", rank=8, num_anchors=4), seed=4)
    a, b = lin.state_dict(), l2r.state_dict()
    shared = [k for k in a if ".router." not in k]
    assert shared and all(torch.equal(a[k], b[k]) for k in shared)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in b.items())
    assert not torch.equal(b["blocks.0.moe.experts.w_up"], other.state_dict()["blocks.0.moe.experts.w_up"])


def test_routing_vectors_per_sample():
    model = build_paired(_tiny, arms.Arm("x"), seed=0)
    model.features(torch.randn(6, 5, 4))
    vec = training.routing_vectors(model, 6)
    assert vec.shape == (6, 2 * arms.NUM_EXPERTS) and vec.requires_grad
    mass = vec.view(6, 2, arms.NUM_EXPERTS).sum(-1)  # mean over tokens of the top-k mass, per layer
    assert bool(((mass > 0) & (mass <= 1 + 1e-6)).all())


def test_contrasts_name_existing_arms():
    names = {a.name for a in arms.full_arms(5.0)}
    rows = arms.contrasts()
    assert rows[0] == (arms.PRIMARY, arms.LINEAR)
    assert len(set(rows)) == len(rows)
    assert all(a in names and c in names and a != c for a, c in rows + arms.z_loss_contrasts())
    assert {a.name for a in arms.quick_arms(5.0)} <= names


def _agg(values_by_arm):
    return {name: {"n": len(v), "seeds": list(range(len(v))), "m": {"values": v}} for name, v in values_by_arm.items()}


def test_compare_primary_unadjusted_and_holm_over_the_rest_or_over_all():
    from experiments import report

    agg = _agg({"base": [0.0, 0.0, 0.0, 0.0], "a": [1.0, 1.1, 0.9, 1.2], "b": [0.1, -0.2, 0.3, 0.05],
                "c": [2.0, 2.5, 1.5, 2.2]})
    contrasts = [("a", "base"), ("b", "base"), ("c", "base")]
    raw = [stats.paired_test(agg[a]["m"]["values"], agg[c]["m"]["values"])["p"] for a, c in contrasts]
    rows = report.compare(None, agg, contrasts, key="m", higher_is_better=True)
    assert [r["primary"] for r in rows] == [True, False, False]
    assert rows[0]["p_holm"] == raw[0] and rows[0]["alpha"] == stats.ALPHA
    assert [r["p_holm"] for r in rows[1:]] == pytest.approx(stats.holm(raw[1:]))
    family = report.compare(None, agg, contrasts, key="m", higher_is_better=True, first_is_primary=False)
    assert not any(r["primary"] for r in family)
    assert [r["p_holm"] for r in family] == pytest.approx(stats.holm(raw))
    assert family[0]["p_holm"] > raw[0] and all(r["alpha"] == stats.ALPHA / 3 for r in family)


def test_corpus_split_is_by_document():
    pytest.importorskip("pydoc_data.topics")
    from experiments import corpora

    docs = corpora.prose_documents()
    train, val, n_train, n_val = corpora._split(docs)
    assert n_train + n_val == len(docs) and n_val > 0 and n_train > 0
    assert len(train) + len(val) == sum(len(t) for _, t in docs)
    code = [name for name, _ in corpora.code_documents()]
    assert code and not any(name.startswith(("pydoc_data/", "test/", "idlelib/")) for name in code)
    unicode_docs = corpora.unicode_documents()
    assert unicode_docs[0][1].startswith(b"0020; ;SPACE;Zs;")


def _check_outputs(out_dir, metric):
    for name in ("table.md", "summary.md", "results.json", "results.csv", "runs.jsonl", "metrics.png", "contrasts.png",
                 "traces.png", "expert_load.png", "routing_space.png"):
        assert (out_dir / name).stat().st_size > 0, name
    data = json.loads((out_dir / "results.json").read_text())
    runs = [json.loads(line) for line in (out_dir / "runs.jsonl").read_text().splitlines()]
    quick = {a.name for a in arms.quick_arms(5.0)}
    assert {r["arm"] for r in runs} == quick and len(runs) == 2 * len(quick)
    for run in runs:
        for key in (metric, "train_loss"):
            assert math.isfinite(run[key]), (run["arm"], key, run[key])
        for key in ("load_entropy", "specialization", "clustering", "stability", "median_q", "topk_mass"):
            assert all(math.isfinite(v) for v in run[key]), (run["arm"], key)
        trace = run["trace"]
        assert len(trace["step"]) == 3 and all(math.isfinite(v) for v in trace["lb"])
        if run["arm"].endswith("+SR-MoE"):
            assert all(v > 0 for v in trace["sn_penalty"]), trace["sn_penalty"]
        else:
            assert all(v == 0 for v in trace["sn_penalty"])
        assert all((v > 0) == run["arm"].endswith("+RoMA") for v in trace["roma"])
    primary = data["contrasts"][0]
    assert primary["primary"] and (primary["arm"], primary["comparator"]) == (arms.PRIMARY, arms.LINEAR)
    assert all(math.isfinite(primary[k]) for k in ("mean", "lo", "hi", "p", "mde"))
    assert all(0 <= r["p_holm"] <= 1 for r in data["contrasts"])
    summary = (out_dir / "summary.md").read_text()
    assert "Primary comparison" in summary and "Quick" in summary and "z-loss control" in summary


def test_digits_quick(tmp_path):
    pytest.importorskip("sklearn")
    from experiments import digits

    digits.main(["--quick", "--out", str(tmp_path)])
    _check_outputs(tmp_path, "test_acc")


def test_multidomain_lm_quick(tmp_path):
    pytest.importorskip("pydoc_data.topics")
    from experiments import multidomain_lm

    multidomain_lm.main(["--quick", "--out", str(tmp_path)])
    _check_outputs(tmp_path, "val_bpb")
    run = json.loads((tmp_path / "runs.jsonl").read_text().splitlines()[0])
    assert all(math.isfinite(run[f"bpb_{d}"]) for d in ("prose", "code", "unicode"))
