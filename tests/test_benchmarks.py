"""The routing microbenchmark's tooling (benchmarks/bench_route.py, _timing.py, _contenders.py): it
runs and writes its table, CSV, plot and summary; records the machine's load and refuses a busy
machine under --strict; interleaves contenders; compares selections tie-aware; runs without
matplotlib; says how to build when the source tree has no extension. Seconds, and never a timing
assertion."""

import builtins
import csv
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

bench = pytest.importorskip("benchmarks.bench_route")


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


IDLE = {"others": 0.0, "load_average": (0.05, 0.05, 0.05)}
BUSY = {"others": 0.9, "load_average": (4.0, 4.0, 4.0)}


@pytest.fixture
def idle_machine(monkeypatch):
    """The load probe reports an idle machine (the tests themselves run on a shared one)."""
    from benchmarks import _timing

    monkeypatch.setattr(_timing, "machine_load", lambda window=0.5: dict(IDLE))


def test_smoke_writes_table_csv_png_and_summary(tmp_path, capsys, idle_machine):
    pytest.importorskip("matplotlib")
    out = tmp_path / "results"
    rc = bench.main(["--smoke", "--out", str(out), "--no-progress", "--strict"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "| model | dtype | mode | T | contender |" in stdout
    assert "## Acceptance (issue 14)" in stdout
    for name in ("route.csv", "route.md", "route.png", "summary.md"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "route.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rows = _rows(out / "route.csv")
    contenders = {r["contender"] for r in rows}
    assert {"read_x", "linear", "cosine", "l2r_native", "l2r_ref"} <= contenders
    assert not any(c.endswith("_compiled") for c in contenders)  # --smoke does not compile
    assert "linear_fp32" not in contenders  # the same as linear in fp32
    for r in rows:
        assert r["status"] == "ok", r
        assert float(r["median_s"]) > 0 and int(r["T"]) == 16
        assert r["load_others"] != "" and r["load1"] != "" and int(r["threads"]) == 1
        if r["contender"] != "read_x":
            assert r["check"] == "ok", r
            assert float(r["vs_read_x"]) > 0 and float(r["vs_linear"]) > 0
        assert float(r["bytes_per_token"]) > 0 and float(r["flops_per_token"]) > 0
    native_bwd = [r for r in rows if r["contender"] == "l2r_native" and r["mode"] == "fwdbwd"]
    assert native_bwd and float(native_bwd[0]["saved_extra_bytes_per_token"]) > 0
    assert len(native_bwd[0]["single_calls_ms"].split()) == 15 and float(native_bwd[0]["max_over_median_15"]) >= 1
    native_fwd = [r for r in rows if r["contender"] == "l2r_native" and r["mode"] == "fwd"]
    assert native_fwd[0]["lane_width_check"].startswith("ok"), native_fwd[0]["lane_width_check"]

    summary = (out / "summary.md").read_text()
    assert "## Machine" in summary and "torch" in summary and "load_at_start" in summary
    # the lane width the CPU kernels ran with: figures from AVX2 and AVX-512 runs differ
    assert re.search(r"- l2r_cuda_cpu_isa: (portable|avx2|avx512)\n", summary), summary
    assert "| target | measured | status | load |" in summary
    assert "ptxas" in summary  # present or reported absent


def test_strict_refuses_a_busy_machine(tmp_path, monkeypatch, capsys):
    from benchmarks import _timing

    monkeypatch.setattr(_timing, "machine_load", lambda window=0.5: dict(BUSY))
    out = tmp_path / "results"
    assert bench.main(["--smoke", "--out", str(out), "--no-progress", "--strict"]) == 3
    assert "busy" in capsys.readouterr().err and not (out / "route.csv").exists()
    # Without --strict it times anyway, and says so in the summary.
    assert bench.main(["--smoke", "--out", str(out), "--no-progress", "--no-plot"]) == 0
    assert "the machine was busy" in (out / "summary.md").read_text()


def test_strict_fails_when_a_contender_raises(tmp_path, monkeypatch, capsys, idle_machine):
    real_make_step = bench.C.make_step

    def failing_make_step(contender, *args, **kwargs):
        if contender == "cosine":
            raise RuntimeError("cosine broke")
        return real_make_step(contender, *args, **kwargs)

    monkeypatch.setattr(bench.C, "make_step", failing_make_step)
    out = tmp_path / "results"
    argv = ["--smoke", "--out", str(out), "--no-progress", "--no-plot", "--contenders", "read_x", "cosine", "l2r_native"]
    assert bench.main(argv + ["--strict"]) == 1
    assert "raised errors" in capsys.readouterr().err
    summary = (out / "summary.md").read_text()
    assert "RuntimeError: cosine broke" in summary
    # Without --strict the run still writes its files and exits 0: the errors are in summary.md.
    assert bench.main(argv) == 0


def test_runs_without_matplotlib(tmp_path, monkeypatch, capsys, idle_machine):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    out = tmp_path / "results"
    assert bench.main(["--smoke", "--out", str(out), "--no-progress", "--contenders", "read_x", "l2r_native"]) == 0
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert (out / "summary.md").is_file() and not (out / "route.png").exists()


def test_contenders_are_timed_interleaved():
    from benchmarks import _timing

    log = []

    class Fake:
        number, timer_name, extra = 1, "fake", {}

        def __init__(self, name):
            self.name = name

        def block(self):
            log.append(self.name)
            return 1e-3

    meas = _timing.time_interleaved({n: Fake(n) for n in "abc"}, min_run_time=0.0, min_repeats=3)
    assert all(len(m.times) == 3 for m in meas.values())
    assert log[:3] == ["a", "b", "c"] and log[3:6] == ["b", "c", "a"]  # rounds, rotated


def test_selection_comparison_is_tie_aware():
    from benchmarks import _contenders as C

    probs = torch.tensor([[0.4, 0.2, 0.2, 0.1, 0.1], [0.5, 0.3, 0.1, 0.06, 0.04]], dtype=torch.float64)
    w = lambda idx: probs.gather(-1, torch.tensor(idx))  # noqa: E731
    ok, _, ties = C.compare_selection(w([[0, 2], [0, 1]]), torch.tensor([[0, 2], [0, 1]]), probs, 1e-6, 1e-9)
    assert ok and ties == 1  # expert 2 instead of its tie 1: fine
    ok, _, _ = C.compare_selection(w([[0, 2, 1], [0, 1, 2]]), torch.tensor([[0, 2, 1], [0, 1, 2]]), probs, 1e-6, 1e-9)
    assert ok  # tied experts in either order
    for idx, why in (([[0, 1], [0, 2]], "set"), ([[0, 0], [0, 1]], "twice"), ([[1, 0], [0, 1]], "best first"),
                     ([[0, 1], [0, 9]], "range")):
        idx_t = torch.tensor(idx)
        ok, msg, _ = C.compare_selection(w(idx_t.clamp_max(4).tolist()), idx_t, probs, 1e-6, 1e-9)
        assert not ok, (why, msg)
    ok, msg, _ = C.compare_selection(w([[0, 1], [0, 1]]) + 1e-3, torch.tensor([[0, 1], [0, 1]]), probs, 1e-6, 1e-9)
    assert not ok and "weights" in msg


def test_an_unbuilt_source_tree_says_how_to_build(tmp_path):
    tree = tmp_path / "clone"
    shutil.copytree(os.path.join(ROOT, "l2r_cuda"), tree / "l2r_cuda",
                    ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    code = ("import sys; sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
            "import l2r_cuda")
    run = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "native extension l2r_cuda._C is not built in" in run.stderr and "build_ext --inplace" in run.stderr


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


def test_compare_builds_times_two_trees_interleaved(capsys):
    from benchmarks import compare_builds

    rc = compare_builds.main(["--baseline", ROOT, "--candidate", ROOT, "--d", "64", "--E", "8", "--k", "2",
                              "--T", "16", "--r", "2", "--H", "2", "--rounds", "2", "--calls", "1", "--threads", "1"])
    out = capsys.readouterr().out
    assert rc == 0 and "load at start" in out and "load at end" in out
    rows = [line for line in out.splitlines() if line.startswith("| fp32") or line.startswith("| bf16")]
    assert len(rows) == 4
    assert all("indices equal 100.00%" in r and "max|dw| 0.0e+00" in r for r in rows)  # the same build


def test_dram_penalty_reports_every_op_per_thread_count(capsys):
    from benchmarks import dram_penalty

    rc = dram_penalty.main(["--d", "64", "--E", "8", "--k", "2", "--rank", "2", "--anchors", "2",
                            "--cached-tokens", "4", "--dram-tokens", "32", "--threads", "1", "2",
                            "--rounds", "4", "--block-s", "0.001"])
    out = capsys.readouterr().out
    assert rc == 0 and "# start: load average" in out and "# end: load average" in out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if re.match(r"\| [12] \|", line)]
    assert sorted((r[0].strip(), r[1].strip()) for r in rows) == sorted(
        (t, op) for t in ("1", "2") for op in ("route", "gemm", "sum"))
    for r in rows:  # cached and DRAM ns/token are positive numbers, their ratio is the last column
        cached, dram = (float(c.split()[0]) for c in r[2:4])
        assert cached > 0 and dram > 0 and float(r[5]) == pytest.approx(dram / cached, rel=0.02, abs=0.01)


def test_compare_x_prefetch_runs_both_settings():
    # benchmarks/compare_x_prefetch.py: alternating processes with L2R_CPU_X_PREFETCH=1 and 0, the
    # same routing from both (its exit status says so), a median per setting.
    r = subprocess.run([sys.executable, "-m", "benchmarks.compare_x_prefetch", "--rounds", "1", "--threads", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"prefetch +median [0-9.]+ ms", r.stdout) and re.search(r"no prefetch +median", r.stdout)
    assert "indices identical across settings: True" in r.stdout and "load average before" in r.stdout


def test_compare_chunk_claiming_runs_both_splits():
    # benchmarks/compare_chunk_claiming.py: claimed chunks and fixed ranges (L2R_CPU_FIXED_CHUNKS=1),
    # with and without a neighbour process; the gradients must be identical (its exit status).
    r = subprocess.run([sys.executable, "-m", "benchmarks.compare_chunk_claiming", "--rounds", "1", "--threads", "2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(re.findall(r"(claimed|fixed) +median +[0-9.]+ ms", r.stdout)) == 4
    assert "gradients identical in every process: True" in r.stdout
