"""The AVX2 exp/log of the CPU route kernel give the same bits as the scalar exp_poly/log_poly
helpers of route_math.cuh (the ones device code can call), over ~7 million float bit patterns."""

import os
import shutil
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags and " f16c" in flags


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
@pytest.mark.skipif(not _has_avx2(), reason="needs an AVX2+FMA CPU")
def test_avx2_exp_log_match_scalar_helpers_bitwise(tmp_path):
    include = os.path.join(os.path.dirname(torch.__file__), "include")
    exe = tmp_path / "poly_check"
    subprocess.run(
        ["g++", "-O2", "-std=c++20", f"-I{ROOT}/csrc", f"-I{include}",
         f"-I{include}/torch/csrc/api/include", f"{ROOT}/tests/cpp/poly_exp_log_check.cpp",
         "-o", str(exe)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
