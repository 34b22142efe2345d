"""Every lane width (the SIMD ones, and ArrayLanes: the CUDA forward's token tiles) computes the
route math bit for bit like the scalar lane (what the portable CPU path and every CUDA thread use):
tests/cpp/lane_math_check.cpp, helper by helper, on random and edge inputs, plus the in-register
bf16/fp16 conversions of the SIMD lane types. And the AVX-512 top-k network chooses what the generic
top-k search chooses (tests/cpp/top_k_network_check.cpp)."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


NEEDS = {4: (), 8: ("avx2", "fma", "f16c"), 16: ("avx512f", "avx512dq", "avx512bw", "avx512vl")}


def _build_and_run(source: str, exe, lanes: int, defines=()) -> None:
    flags = _cpu_flags()
    if not all(f" {flag}" in flags for flag in NEEDS[lanes]):
        pytest.skip(f"this CPU lacks {NEEDS[lanes]}")
    # The project's floating-point contract: no implicit contraction (setup.py, csrc/common/hd.h).
    subprocess.run(
        ["g++", "-O2", "-std=c++20", "-ffp-contract=off", *defines, f"-I{ROOT}/csrc",
         f"{ROOT}/tests/cpp/{source}", "-o", str(exe)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.startswith("OK"), run.stdout + run.stderr


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
@pytest.mark.parametrize("lanes", [4, 8, 16])  # 4: ArrayLanes<4> (common/lanes_array.h)
def test_lane_widths_match_scalar_lane_bitwise(lanes, tmp_path):
    _build_and_run("lane_math_check.cpp", tmp_path / f"lane_math_{lanes}", lanes, [f"-DLANES={lanes}"])


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_avx512_top_k_network_chooses_what_the_search_chooses(tmp_path):
    _build_and_run("top_k_network_check.cpp", tmp_path / "top_k_network", 16)
