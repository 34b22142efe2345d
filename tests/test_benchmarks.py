"""Smoke test of the routing microbenchmark (benchmarks/bench_route.py): the tooling runs and writes
its table, CSV, plot and summary. Seconds, not a measurement."""

import csv
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

bench = pytest.importorskip("benchmarks.bench_route")


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


def test_smoke_writes_table_csv_png_and_summary(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    out = tmp_path / "results"
    rc = bench.main(["--smoke", "--out", str(out), "--no-progress", "--strict"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "| model | dtype | mode | T | contender |" in stdout
    for name in ("route.csv", "route.md", "route.png", "summary.md"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "route.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rows = _rows(out / "route.csv")
    contenders = {r["contender"] for r in rows}
    assert {"read_x", "linear", "cosine", "l2r_native", "l2r_ref"} <= contenders
    assert not any(c.endswith("_compiled") for c in contenders)  # --smoke does not compile
    for r in rows:
        assert r["status"] == "ok", r
        assert float(r["median_s"]) > 0 and int(r["T"]) == 16
        if r["contender"] != "read_x":
            assert r["check"] == "ok", r
            assert float(r["vs_read_x"]) > 0 and float(r["vs_linear"]) > 0
        assert float(r["bytes_per_token"]) > 0 and float(r["flops_per_token"]) > 0
    native_bwd = [r for r in rows if r["contender"] == "l2r_native" and r["mode"] == "fwdbwd"]
    assert native_bwd and float(native_bwd[0]["saved_extra_bytes_per_token"]) > 0

    summary = (out / "summary.md").read_text()
    assert "## Machine" in summary and "torch" in summary
    assert "ptxas" in summary  # present or reported absent


def test_saved_bytes_of_native_do_not_grow_with_experts_and_anchors():
    import torch

    from benchmarks import _contenders as C

    per_token = []
    for E, H in [(8, 1), (64, 4), (256, 8)]:
        m = C.ModelShape("t", "t", 64, E, 2)
        x = C.make_x(32, m.d, torch.float32, "cpu", seed=0)
        params = C.make_params("l2r_native", m, 4, H, torch.float32, "cpu", seed=1)
        step, inputs = C.make_step("l2r_native", x, params, m.k, "fwdbwd", seed=0)
        per_token.append(C.saved_bytes(step, inputs)[1])
    assert per_token[0] == per_token[1] == per_token[2]


def test_ptxas_section_reports_absent_or_includes_file(tmp_path):
    text = bench.ptxas_section(str(tmp_path))
    (tmp_path / "ptxas_sm_90.md").write_text("| kernel | regs |\n|---|---|\n| route_fwd | 64 |\n")
    assert "route_fwd | 64" in bench.ptxas_section(str(tmp_path))
    assert "ptxas" in text


def test_peak_bandwidth_table():
    from benchmarks import _timing

    assert _timing.peak_bandwidth("NVIDIA H200") == 4.8e12
    assert _timing.peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert _timing.peak_bandwidth("NVIDIA A100 80GB PCIe") == 2.0e12
    assert _timing.peak_bandwidth("Some GPU") is None
