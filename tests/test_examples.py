"""l2r_cuda.examples: the paired-seed machinery, the statistics, and a --quick smoke run of both
experiments (writes to a tmp dir; checks the files exist and every reported number is finite)."""

import json
import math

import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from l2r_cuda.examples import _common  # noqa: E402


def test_t_quantile_and_paired_interval():
    assert _common.t_quantile_975(4) == pytest.approx(2.776, abs=1e-3)
    assert _common._T975[4] == pytest.approx(2.776, abs=1e-3)
    d = _common.paired_difference([1.0, 2.0, 3.0, 4.0, 5.0], [0.0, 1.0, 2.0, 3.0, 3.0])
    # differences 1, 1, 1, 1, 2: mean 1.2, sd sqrt(0.2)
    half = 2.7764 * math.sqrt(0.2) / math.sqrt(5)
    assert d["mean"] == pytest.approx(1.2)
    assert d["lo"] == pytest.approx(1.2 - half, abs=1e-3) and d["hi"] == pytest.approx(1.2 + half, abs=1e-3)
    assert _common.verdict(d, higher_is_better=True) == "wins"
    assert _common.verdict(d, higher_is_better=False) == "loses"
    assert _common.verdict({"lo": -1.0, "hi": 1.0}, True) == "ties"
    assert _common.verdict(_common.paired_difference([1.0], [0.0]), True) == "n/a"


class _TinyTask:
    def build_model(self, cfg):
        return _common.MoETransformer(cfg, d_in=4, vocab=None, seq_len=5, d_model=16, layers=2, heads=2,
                                      d_ff=8, causal=False, d_out=3)


def test_paired_init_shares_everything_but_the_router():
    task = _TinyTask()
    lin = _common.build_paired(task, _common.BASELINE, seed=3)
    l2r = _common.build_paired(task, _common.l2r(8, 4), seed=3)
    l2r_again = _common.build_paired(task, _common.l2r(8, 4), seed=3)
    other_seed = _common.build_paired(task, _common.l2r(8, 4), seed=4)
    a, b = lin.state_dict(), l2r.state_dict()
    shared = [k for k in a if ".router." not in k]
    assert shared and all(torch.equal(a[k], b[k]) for k in shared)
    assert all(torch.equal(v, l2r_again.state_dict()[k]) for k, v in b.items())
    assert not torch.equal(b["blocks.0.moe.experts.w_up"], other_seed.state_dict()["blocks.0.moe.experts.w_up"])


def _check_outputs(out_dir, metric):
    for name in ("table.md", "summary.md", "results.json", "results.csv", "metrics.png", "expert_load.png",
                 "routing_space.png"):
        assert (out_dir / name).stat().st_size > 0, name
    data = json.loads((out_dir / "results.json").read_text())
    assert len(data["runs"]) == 4  # 2 configs x 2 seeds
    for run in data["runs"]:
        for key in (metric, "load_entropy", "specialization", "angular_diversity", "stability", "train_loss"):
            assert math.isfinite(run[key]), (run["config"], key, run[key])
    for cfg, entry in data["aggregate"].items():
        if cfg != "linear":
            diff = entry[metric]["diff"]
            assert all(math.isfinite(diff[k]) for k in ("mean", "lo", "hi"))
    summary = (out_dir / "summary.md").read_text()
    assert "L2R wins in" in summary and "Quick" in summary


def test_digits_quick(tmp_path):
    pytest.importorskip("sklearn")
    from l2r_cuda.examples import digits

    digits.main(["--quick", "--out", str(tmp_path)])
    _check_outputs(tmp_path, "test_acc")


def test_pydoc_lm_quick(tmp_path):
    pytest.importorskip("pydoc_data.topics")
    from l2r_cuda.examples import pydoc_lm

    pydoc_lm.main(["--quick", "--out", str(tmp_path)])
    _check_outputs(tmp_path, "val_bpb")
