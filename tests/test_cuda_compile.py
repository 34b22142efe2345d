"""Compile proof of the CUDA kernels without a GPU: every csrc/**/*.cu builds standalone with nvcc
for sm_80 and sm_90 (-Xptxas -v) with the extension build's device flags (l2r_cuda/jit/flags.py), no
kernel spills registers, and the per-kernel resource usage is written to
benchmarks/results/ptxas_<arch>.md. Skipped when nvcc is missing. Reports are cached by a hash of
the sources and the compiler, so reruns without changes are instant. (test_jit.py compares these
reports with NVRTC's.)"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / "build" / "ptxas_cache"
ARCHS = ("80", "90")


def load_jit_file(name: str):
    """l2r_cuda/jit/<name>.py alone (standard library only), without importing the built extension."""
    spec = importlib.util.spec_from_file_location(f"_l2r_jit_{name}", ROOT / "l2r_cuda" / "jit" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


_flags = load_jit_file("flags")
parse_ptxas = load_jit_file("ptxas").parse_ptxas
# The device flags of setup.py's release build (torch adds the half defines and the C++ standard).
FLAGS = [_flags.CXX_STANDARD, "-O3", *_flags.NVCC_ONLY, *_flags.NVCC_SHARED_POINTERS_AS_NVRTC, "-DL2R_WITH_CUDA",
         *_flags.FP_CONTRACT, *_flags.TORCH_HALF_DEFINES, "-Xptxas", "-v"]


def find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (pathlib.Path(home) / "bin" / "nvcc").is_file():
            return str(pathlib.Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


NVCC = find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found")


def cu_sources() -> list[pathlib.Path]:
    return sorted(CSRC.rglob("*.cu"))


def source_hash() -> str:
    h = hashlib.sha256()
    h.update(subprocess.run([NVCC, "--version"], capture_output=True, text=True).stdout.encode())
    h.update(" ".join(FLAGS).encode())
    for f in sorted(p for p in CSRC.rglob("*") if p.suffix in {".cu", ".cuh", ".h"}):
        h.update(str(f.relative_to(ROOT)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:20]


def demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout
    pretty = [re.sub(r"\(anonymous namespace\)::|l2r::route::", "", s) for s in out.splitlines()]
    return dict(zip(names, pretty)) if len(pretty) == len(names) else {n: n for n in names}


def compile_report(arch: str, key: str) -> list[dict]:
    cached = CACHE / f"{key}-sm{arch}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    return []


def run_ptxas_all(key: str) -> dict[str, list[dict]]:
    """Compiles every .cu for every arch (the archs in parallel), caching the parsed reports."""
    CACHE.mkdir(parents=True, exist_ok=True)
    reports = {arch: compile_report(arch, key) for arch in ARCHS}
    todo = [arch for arch in ARCHS if not (CACHE / f"{key}-sm{arch}.json").exists()]
    procs = []
    for arch in todo:
        for src in cu_sources():
            out = CACHE / f"{src.stem}-sm{arch}.cubin"
            cmd = [NVCC, *FLAGS, f"-arch=sm_{arch}", "-cubin", f"-I{CSRC}", str(src), "-o", str(out)]
            procs.append((arch, src, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    texts: dict[str, str] = {arch: "" for arch in todo}
    for arch, src, proc in procs:
        out, _ = proc.communicate(timeout=1800)  # both archs of route_cuda.cu at once: 12 min on a slow 2-core VM
        assert proc.returncode == 0, f"nvcc failed for {src.relative_to(ROOT)} on sm_{arch}:\n{out}"
        warnings = [l for l in out.splitlines() if "warning" in l.lower()]
        assert not warnings, f"nvcc warnings for {src.relative_to(ROOT)} on sm_{arch}:\n" + "\n".join(warnings)
        texts[arch] += out + "\n"
    for arch in todo:
        recs = parse_ptxas(texts[arch])
        names = demangle([r["name"] for r in recs])
        for r in recs:
            r["kernel"] = names[r["name"]]
        (CACHE / f"{key}-sm{arch}.json").write_text(json.dumps(recs, indent=1))
        reports[arch] = recs
    return reports


def write_table(arch: str, recs: list[dict]) -> pathlib.Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"ptxas_sm{arch}.md"
    lines = [
        f"# ptxas resource usage, sm_{arch}",
        "",
        f"`nvcc {' '.join(FLAGS)} -arch=sm_{arch}` on every `csrc/**/*.cu` (tests/test_cuda_compile.py).",
        "Shared memory here is static only; the route kernels size their dynamic shared memory at launch",
        "(per-warp scratch, then anchors and the projection when they fit).",
        "",
        "| kernel | registers | static smem (B) | stack (B) | spill stores (B) | spill loads (B) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(recs, key=lambda r: r["kernel"]):
        short = re.sub(r"^void ", "", re.sub(r"\([^()]*\)$", "", r["kernel"]))  # no parameter list
        lines.append(f"| `{short}` | {r['registers']} | {r.get('smem', 0)} | {r.get('stack', 0)} | "
                     f"{r.get('spill_stores', 0)} | {r.get('spill_loads', 0)} |")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def reports():
    if not cu_sources():
        pytest.skip("no .cu sources")
    return run_ptxas_all(source_hash())


@pytest.mark.parametrize("arch", ARCHS)
def test_kernels_compile_without_spills(reports, arch):
    recs = reports[arch]
    assert recs, f"no kernels in the ptxas report for sm_{arch}"
    path = write_table(arch, recs)
    assert path.exists()
    spilling = [f"{r['kernel']}: {r.get('spill_stores', 0)} B stores, {r.get('spill_loads', 0)} B loads"
                for r in recs if r.get("spill_stores", 0) or r.get("spill_loads", 0)]
    assert not spilling, f"register spills on sm_{arch}:\n" + "\n".join(spilling)
    kinds = {re.sub(r"<.*", "", r["kernel"].split("(")[0]).split()[-1] for r in recs}
    for expected in ("route_forward_kernel", "route_backward_token_kernel"):
        assert expected in kinds, f"{expected} missing from the sm_{arch} report: {sorted(kinds)}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("program", ["mma_fragments_main", "project_mma_main"])
def test_tensor_core_checks_compile_to_mma(program, arch, tmp_path):
    # tests/gpu/*_main.cu are what scripts/gpu_check.sh runs on a GPU to hold the emulator's mma.sync
    # (tests/simt/test_mma.py, test_project_mma.py) against the hardware: they must build with the
    # release flags, issue the bf16 m16n8k16 instruction itself, and not spill.
    src = ROOT / "tests" / "gpu" / f"{program}.cu"
    ptx = subprocess.run([NVCC, *FLAGS, f"-arch=sm_{arch}", "-ptx", f"-I{CSRC}", str(src), "-o", "-"],
                         capture_output=True, text=True, timeout=600)
    assert ptx.returncode == 0, ptx.stderr
    assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in ptx.stdout
    cubin = subprocess.run([NVCC, *FLAGS, f"-arch=sm_{arch}", "-cubin", f"-I{CSRC}", str(src), "-o",
                            str(tmp_path / "mma.cubin")], capture_output=True, text=True, timeout=600)
    assert cubin.returncode == 0, cubin.stdout + cubin.stderr
    out = cubin.stdout + cubin.stderr
    assert not [l for l in out.splitlines() if "warning" in l.lower()], out
    recs = parse_ptxas(out)
    assert recs and all(not r.get("spill_stores") and not r.get("spill_loads") for r in recs), out
