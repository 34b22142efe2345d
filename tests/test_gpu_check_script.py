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
