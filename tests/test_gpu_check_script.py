"""scripts/gpu_check.sh without a GPU: it must stop at once, with status 3 and a message saying
why, before building or writing anything."""
from __future__ import annotations

import os
import pathlib
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def run(tmp_path, smi: str):
    env = dict(os.environ, NVIDIA_SMI=smi, L2R_GPU_CHECK_OUT=str(tmp_path / "out"))
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30)


def test_no_nvidia_smi_exits_at_once(tmp_path):
    r = run(tmp_path, str(tmp_path / "no-such-nvidia-smi"))
    assert r.returncode == 3
    assert "no NVIDIA GPU" in r.stderr and "not found" in r.stderr
    assert not (tmp_path / "out").exists()


def test_nvidia_smi_without_devices_exits_at_once(tmp_path):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'No devices were found'\nexit 6\n")
    smi.chmod(0o755)
    r = run(tmp_path, str(smi))
    assert r.returncode == 3
    assert "lists no device" in r.stderr
    assert not (tmp_path / "out").exists()


def test_timing_logic_dry_run_on_cpu(tmp_path):
    # benchmarks/gpu_check.py's steps on the CPU (--device cpu) over a one-shape model file: every
    # row measured or skipped with a reason, measured next to modelled, files written. The times
    # mean nothing here; this keeps the GPU session's script from failing on its logic.
    import json
    import sys

    model = {"results": [
        {"op": "route forward", "model": "olmoe", "T": 8, "r": 2, "H": 1, "min_bytes": 8 * 2048 * 2,
         "devices": {"H200": {"time_us": 10.0}, "H100": {"time_us": 12.0}}},
        {"op": "route backward", "model": "olmoe", "T": 8, "r": 2, "H": 1, "min_bytes": 2 * 8 * 2048 * 2,
         "devices": {"H200": {"time_us": 20.0}, "H100": {"time_us": 24.0}}},
        {"op": "permute", "model": "olmoe", "T": 8, "r": 0, "H": 0, "min_bytes": 9 * 8 * 2048 * 2,
         "devices": {"H200": {"time_us": 5.0}, "H100": {"time_us": 6.0}}},
    ], "acceptance": {  # the model's extrapolated permute shape (here a small one)
        "model": "deepseek-v3", "T": 4, "min_bytes": 9 * 4 * 7168 * 2,
        "devices": {"H200": {"time_us": 7.0}, "H100": {"time_us": 8.0}}}}
    (tmp_path / "model.json").write_text(json.dumps(model))
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--budget-s", "0",
                        "--min-run-time", "0.01", "--model", str(tmp_path / "model.json"), "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads((out / "timing.json").read_text())["rows"]
    ops = {(row["op"], row["contender"]) for row in rows}
    assert {("route forward", "l2r_native"), ("route forward", "linear"), ("route backward", "l2r_native"),
            ("permute", "native"), ("permute", "reference"), ("unpermute", "native")} <= ops
    for row in rows:
        assert "us" in row or "skipped" in row, row
    assert any(row["op"] == "permute" and row["model"] == "deepseek-v3" and row["T"] == 4 and row["model_us"] == 8.0
               for row in rows if row["contender"] == "native")  # cpu: the H100 figure
    native = [row for row in rows if row["contender"] in ("l2r_native", "native") and row["op"] != "unpermute"]
    assert all(row["model_us"] > 0 and row["gbs"] > 0 for row in native)
    assert "measured / model" in (out / "timing.md").read_text()


def test_profile_logic_dry_run_on_cpu(tmp_path):
    # benchmarks/gpu_profile.py's steps on the CPU (--device cpu, --quick): one route shape (both
    # modes, every contender) and one permute shape, each with a time and the model's figure where it
    # has one. The numbers mean nothing here (no kernels to profile on a CPU).
    import json
    import sys

    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu_profile", "--device", "cpu", "--quick",
                        "--calls-per-graph", "1", "--replays", "1", "--profiled-calls", "1", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads((out / "profile.json").read_text())["rows"]
    assert {(row["op"], row["contender"]) for row in rows} == {
        ("route forward", "l2r_native"), ("route forward", "linear"), ("route forward", "read_x"),
        ("route backward", "l2r_native"), ("route backward", "linear"), ("permute", "native"),
        ("unpermute", "native")}
    for row in rows:
        assert "error" not in row and row["us"] > 0 and "kernels" in row, row
    assert all(row["model_us"] for row in rows if row["contender"] in ("l2r_native", "native"))
    assert "graph µs" in (out / "profile.md").read_text()
