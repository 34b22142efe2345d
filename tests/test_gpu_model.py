"""The GPU cost model (python -m benchmarks.gpu_model --smoke): it runs the emulated kernels with
counters, and its report keeps the invariants the model promises: no op reads less from DRAM
than its minimum traffic, the forward's bank conflicts at H·r ≡ 0 (mod 32) are reported (none
since the anchors are staged transposed), every estimate is a positive time, and the report says
it is a model."""
from __future__ import annotations

import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import gpu_model  # noqa: E402
from tests.simt import harness as simt  # noqa: E402

pytestmark = pytest.mark.skipif(not simt.have_compiler(), reason="g++ not available")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_model")
    assert gpu_model.main(["--smoke", "--json", "--out", str(out)]) == 0
    return json.loads((out / "gpu_model.json").read_text()), (out / "gpu_model.md").read_text()


def test_every_op_and_shape_is_modelled(report):
    data, _ = report
    ops = {(r["op"], r["T"], r["r"], r["H"]) for r in data["results"]}
    for T in (1, 64):
        for r, H in ((8, 4), (2, 1)):
            assert ("route forward", T, r, H) in ops and ("route backward", T, r, H) in ops
        assert ("permute", T, 0, 0) in ops and ("unpermute", T, 0, 0) in ops


def test_dram_bytes_never_below_the_minimum(report):
    data, _ = report
    for r in data["results"]:
        assert r["dram_bytes"] >= r["min_bytes"] > 0, (r["op"], r["shape"])
        for dev in ("H200", "H100"):
            est = r["devices"][dev]
            assert est["time_us"] > 0 and 0 < est["pct_roofline"] <= 100, (r["op"], r["shape"], dev)
            # the ceiling is the model's own lower bound on the op's time: no estimate may beat it
            assert est["ceiling_us"] >= r["launches"] * 2.0, (r["op"], r["shape"], dev)
            assert est["time_us"] >= est["ceiling_us"] * (1 - 1e-9), (r["op"], r["shape"], dev, est)


def test_forward_bank_conflicts_at_h_times_r_multiple_of_32(report):
    # The anchors are staged transposed, [rp][H][E]: lane e reads consecutive words whatever H·r.
    # (The layout before, [E][H][rp], put every lane of a warp on one bank at H·r ≡ 0 (mod 32):
    # 32-way conflicts, which this model reported; test_sanitizer.py checks that it detects them.)
    data, md = report
    worst = {}
    for r in data["results"]:
        if r["op"] == "route forward" and r["T"] == 64:
            worst[(r["r"], r["H"])] = max((c["degree"] for k in r["kernels"] for c in k["conflicts"]), default=1.0)
    assert worst[(8, 4)] < 2.0
    assert "route forward, olmoe T=64 r=8 H=4 (H·r = 32, 0 mod 32): " in md


def test_report_says_it_is_a_model(report):
    _, md = report
    assert md.startswith("# GPU cost model of the CUDA kernels (a model, not a measurement)")
    assert "## Assumptions" in md and "4.8 TB/s" in md and "3.35 TB/s" in md


def test_ceiling_is_launch_gaps_plus_the_slower_of_dram_and_fp32():
    from benchmarks import _gpu_cost as cost
    h200 = cost.DEVICES["H200"]
    # DRAM-bound: 48 MB at 4.8 TB/s is 10 us, 1 MFLOP is nothing; two launches add 4 us
    assert cost.ceiling_us(h200, 2, 48e6, 1e6) == pytest.approx(14.0)
    # FP32-bound: Mixtral's forward at T=1024 (d=4096, r=32): 277.3 MFLOP on 132 SMs x 256 FLOP/clk at
    # 1.755 GHz is 4.68 us against 1.75 us of x, so one launch cannot pass 26 % of the roofline
    ceil = cost.ceiling_us(h200, 1, 8.389e6, 277.3e6)
    assert ceil == pytest.approx(2.0 + 277.3e6 / (132 * 256 * 1.755e9) * 1e6)
    assert 100 * (8.389e6 / 4.8e12 * 1e6) / ceil == pytest.approx(26.2, abs=0.1)


def test_tensor_term_counts_mma_sync_at_half_the_dense_peak():
    # one emulator record of a kernel that only issues mma.sync: 132 blocks (one per SM), 1e6
    # instructions of 4096 FLOP at 2048 FLOP/clk per SM; every memory counter zero
    from benchmarks import _gpu_cost as cost
    h200 = cost.DEVICES["H200"]
    empty = {"requests": 0, "bytes": 0, "sectors": 0, "ideal_sectors": 0, "wavefronts": 0, "ideal_wavefronts": 0}
    rec = {"kernel": "mma_only_kernel", "grid": [132, 1, 1], "block": [128, 1, 1], "dyn_smem": 0, "static_smem": 0,
           "dram_read": 0, "dram_write": 0, "max_warp_load_misses": 0, "max_warp_load_hits": 0, "collectives": 0,
           "mma": 1_000_000, **{k: dict(empty) for k in ("global_load", "global_store", "global_atomic",
                                                       "shared_load", "shared_store", "shared_atomic")}}
    est = cost.estimate(h200, rec, {})
    expected_us = 1e6 * 4096 / (132 * 2048 * 1.755e9) * 1e6
    assert est.bound == "tensor"
    assert est.terms_us["tensor"] == pytest.approx(expected_us)
    assert est.time_us == pytest.approx(h200.launch_gap_us + expected_us)
    # the same kernel on 66 blocks: half the SMs do the work
    assert cost.estimate(h200, {**rec, "grid": [66, 1, 1]}, {}).terms_us["tensor"] == pytest.approx(2 * expected_us)
    # no mma counted (records written before the counter existed): no tensor time
    assert cost.estimate(h200, {k: v for k, v in rec.items() if k != "mma"}, {}).terms_us["tensor"] == 0.0
