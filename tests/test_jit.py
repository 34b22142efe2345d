"""l2r_cuda.jit without a GPU: NVRTC compiles every kernel instantiation of the extension's .cu files
for sm_80 and sm_90 without a spill (``python -m l2r_cuda.jit --check``), the same kernels with the
same registers as the nvcc build (tests/test_cuda_compile.py's reports), the compile cache, the two
NVRTC bindings, the backend selection, and the executor's launches against a recording fake of
cupy's driver API. GPU runs are in test_jit_cuda.py."""

from __future__ import annotations

import ctypes
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

import l2r_cuda
from l2r_cuda import _library
from l2r_cuda.jit import backend, cache, compiler, nvrtc, sources
from l2r_cuda.jit.executor import CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, NvrtcExecutor
from l2r_cuda.jit.flags import FP_CONTRACT, NVCC_ONLY, NVCC_SHARED_POINTERS_AS_NVRTC, TORCH_HALF_DEFINES
from l2r_cuda.jit.ptxas import strip_internal_namespaces

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ARCHS = ("80", "90")

NO_NVRTC = nvrtc.binding() is None or sources.cuda_include_dir() is None or sources.csrc_dir() is None
needs_nvrtc = pytest.mark.skipif(NO_NVRTC, reason="no NVRTC binding (cuda-bindings/cupy) or CUDA headers")


def run_check(*args: str, env=None) -> subprocess.CompletedProcess:
    env = dict(os.environ if env is None else env, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "l2r_cuda.jit", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=1800)


@pytest.fixture(scope="module")
def nvrtc_records(tmp_path_factory):
    """The CLI's per-kernel records for sm_80 and sm_90 (compiled once; cached on disk after)."""
    if NO_NVRTC:
        pytest.skip("no NVRTC binding (cuda-bindings/cupy) or CUDA headers")
    out = tmp_path_factory.mktemp("jit") / "check.json"
    proc = run_check("--check", "--arch", "sm_80", "sm_90", "--json", str(out))
    assert proc.returncode == 0, f"python -m l2r_cuda.jit --check failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert re.search(r"\d+ kernels, \d+ \(kernel, arch\) compiles by NVRTC for sm_80 sm_90: 0 with register spills",
                     proc.stdout), proc.stdout[-2000:]
    return json.loads(out.read_text())


def test_kernel_sources_list_every_planned_instantiation():
    listed = sources.kernel_sources()
    assert sorted(s.path for s in listed.values()) == ["permute/cuda/permute_kernels.cu", "route/cuda/route_cuda.cu"]
    for s in listed.values():
        assert (sources.csrc_dir() / s.path).is_file()
        assert len(set(s.kernels)) == len(s.kernels), f"duplicate instantiations in {s.path}"
    route = next(s for s in listed.values() if s.path.startswith("route"))
    # 7 ranks x 3 x types x 2 modes + the select kernel, for forward and backward; 4 x 3 column
    # kernels; prepare (the forward's and the column kernel's last blocks finalize).
    assert len(route.kernels) == 2 * (7 * 3 * 2 + 1) + 4 * 3 + 1
    assert "l2r::route::route_forward_kernel<0, __nv_bfloat16, l2r::route::RouteMode::kLogits>" in route.kernels


@needs_nvrtc
def test_check_compiles_every_kernel_for_both_archs_without_spills(nvrtc_records):
    expected = {name for s in sources.kernel_sources().values() for name in s.kernels}
    for arch in (80, 90):
        got = {r["kernel"] for r in nvrtc_records if r["arch"] == arch}
        assert got == expected, f"sm_{arch}: missing {sorted(expected - got)[:3]}, extra {sorted(got - expected)[:3]}"
        assert all(r["registers"] > 0 for r in nvrtc_records if r["arch"] == arch)
    spilled = [r for r in nvrtc_records if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, spilled[:3]


def _nvcc_reports():
    import test_cuda_compile as tcc  # its nvcc reports (same cache, compiled once per source hash)

    if tcc.NVCC is None:
        pytest.skip("nvcc not found")
    return tcc.run_ptxas_all(tcc.source_hash())


def write_register_table(arch: str, rows: list[tuple[str, int, int]]) -> pathlib.Path:
    path = RESULTS / f"nvrtc_registers_sm{arch}.md"
    lines = [f"# Registers per kernel, sm_{arch}: nvcc vs NVRTC", "",
             f"nvcc: tests/test_cuda_compile.py (`ptxas_sm{arch}.md`); NVRTC: `python -m l2r_cuda.jit --check "
             f"--arch sm_{arch}`, both with the flags of l2r_cuda/jit/flags.py. Written by tests/test_jit.py.",
             "nvcc compiles with NVRTC's 64-bit shared-memory addressing (flags.py: NVCC_SHARED_POINTERS_AS_NVRTC),",
             "so every kernel must match.",
             "", "| kernel | nvcc | NVRTC | difference |", "|---|---:|---:|---:|"]
    for kernel, a, b in sorted(rows):
        lines.append(f"| `{kernel}` | {a} | {b} | {b - a:+d} |")
    path.write_text("\n".join(lines) + "\n")
    return path


@needs_nvrtc
@pytest.mark.parametrize("arch", ARCHS)
def test_nvrtc_registers_match_nvcc(nvrtc_records, arch):
    nvcc = {strip_internal_namespaces(r["name"]): r for r in _nvcc_reports()[arch]}
    ours = {strip_internal_namespaces(r["name"]): r for r in nvrtc_records if r["arch"] == int(arch)}
    assert set(ours) == set(nvcc), (f"sm_{arch}: kernels only NVRTC compiled: {sorted(set(ours) - set(nvcc))[:3]}; "
                                    f"only nvcc: {sorted(set(nvcc) - set(ours))[:3]}")
    rows = [(ours[name]["kernel"], nvcc[name]["registers"], ours[name]["registers"]) for name in ours]
    write_register_table(arch, rows)
    differ = [(kernel, a, b) for kernel, a, b in rows if a != b]
    assert not differ, (f"sm_{arch}: NVRTC and nvcc registers differ for {len(differ)} of {len(rows)} kernels "
                        f"(does this nvcc take {' '.join(NVCC_SHARED_POINTERS_AS_NVRTC)}?): {differ[:5]}")


@needs_nvrtc
def test_nvcc_addresses_shared_memory_as_nvrtc_does():
    """Why the nvcc build takes NVCC_SHARED_POINTERS_AS_NVRTC: NVRTC addresses shared memory with
    64-bit registers, nvcc by default with 32-bit ones (different PTX, so different registers), and
    with that flag nvcc does as NVRTC does (checked where nvcc exists)."""
    src = ("extern __shared__ float smem[];\n__global__ void k(const float* x, float* y, long n) {\n"
           "  for (long i = threadIdx.x; i < n; i += blockDim.x) smem[i] = x[i];\n  __syncthreads();\n"
           "  y[threadIdx.x] = smem[n - 1 - threadIdx.x];\n}\n")
    options = ["--gpu-architecture=sm_90", "-Xptxas=-v"]
    compiled = nvrtc.compile_program(src, "shared.cu", ["k"], options)
    assert compiled.cubin

    def shared_store(ptx: str) -> str:
        return next(line for line in ptx.splitlines() if "st.shared" in line)

    if nvrtc.binding() == "cuda-bindings":
        from cuda.bindings import nvrtc as nv

        _, prog = nv.nvrtcCreateProgram(src.encode(), b"shared.cu", 0, [], [])
        assert nv.nvrtcCompileProgram(prog, 1, [b"--gpu-architecture=compute_90"])[0] == nv.nvrtcResult.NVRTC_SUCCESS
        _, size = nv.nvrtcGetPTXSize(prog)
        ptx = b" " * size
        nv.nvrtcGetPTX(prog, ptx)
        nv.nvrtcDestroyProgram(prog)
        store = shared_store(ptx.decode())
        assert re.search(r"\[%rd\d+\]", store), store  # NVRTC: a 64-bit shared address
    import test_cuda_compile as tcc

    if tcc.NVCC is None:
        return
    tmp = ROOT / "build" / "jit_shared_probe"
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "shared.cu").write_text(src)
    for flags, register in (([], "%r"), (list(NVCC_SHARED_POINTERS_AS_NVRTC), "%rd")):
        out = tmp / f"nvcc{len(flags)}.ptx"
        subprocess.run([tcc.NVCC, "-arch=sm_90", "-ptx", str(tmp / "shared.cu"), "-o", str(out), *flags], check=True)
        store = shared_store(out.read_text())
        address = re.search(r"\[(%[a-z]+)\d+\]", store)  # the register class of the address
        assert address is not None and address.group(1) == register, (flags, store)


def test_flags_are_the_extension_builds():
    from torch.utils import cpp_extension

    assert set(TORCH_HALF_DEFINES) <= set(cpp_extension.COMMON_NVCC_FLAGS)
    assert set(NVCC_ONLY) <= set(cpp_extension.COMMON_NVCC_FLAGS)
    options = compiler.nvrtc_options(90, pathlib.Path("/c"), "/i")
    for flag in (*FP_CONTRACT, *TORCH_HALF_DEFINES, "--gpu-architecture=sm_90", "-std=c++20"):
        assert flag in options
    setup_py = (ROOT / "setup.py").read_text()
    assert 'list(_FLAGS["NVCC_ONLY"]) + list(_FLAGS["FP_CONTRACT"])' in setup_py
    assert '_FLAGS["NVCC_SHARED_POINTERS_AS_NVRTC"]' in setup_py


@needs_nvrtc
def test_compile_errors_carry_nvrtc_log():
    with pytest.raises(nvrtc.CompileError, match=r"bad\.cu\(2\): error"):
        nvrtc.compile_program("__global__ void k() {\n  undeclared_thing();\n}\n", "bad.cu", ["k"],
                              ["--gpu-architecture=sm_80"])


@pytest.mark.skipif(nvrtc._bindings is None or nvrtc._cupy is None or sources.cuda_include_dir() is None,
                    reason="needs both cuda-bindings and cupy")
def test_both_bindings_compile_the_same_cubin(monkeypatch, tmp_path):
    monkeypatch.setenv("L2R_CUDA_JIT_CACHE", str(tmp_path))
    permute = next(s for s in sources.kernel_sources().values() if s.path.startswith("permute"))
    names = ["l2r::permute::finalize_kernel", "l2r::permute::gather_reduce_kernel<__half, 8>"]
    a = compiler.compile_kernels(permute, names, "sm_90", use_cache=False, prefer="cuda-bindings")
    b = compiler.compile_kernels(permute, names, "sm_90", use_cache=False, prefer="cupy")
    # (cupy's getCUBIN leaves out a trailing NUL byte that nvrtcGetCUBIN's buffer has)
    assert a.cubin.rstrip(b"\0") == b.cubin.rstrip(b"\0") and a.lowered == b.lowered


@needs_nvrtc
def test_cache_keys_on_arch_and_reuses_cubins(monkeypatch, tmp_path):
    monkeypatch.setenv("L2R_CUDA_JIT_CACHE", str(tmp_path))
    permute = next(s for s in sources.kernel_sources().values() if s.path.startswith("permute"))
    names = ["l2r::permute::group_kernel"]
    first = compiler.compile_kernels(permute, names, "sm_80")
    assert len(list(tmp_path.glob("*.cubin"))) == 1

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled although the cache has the CUBIN")

    monkeypatch.setattr(nvrtc, "compile_program", no_compile)
    again = compiler.compile_kernels(permute, names, 80)
    assert again == first
    with pytest.raises(AssertionError, match="compiled although"):
        compiler.compile_kernels(permute, names, "sm_90")  # another architecture is another key
    meta = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert meta["arch"] == "sm_80" and meta["kernels"] == names and meta["nvrtc"] == list(nvrtc.version())


def test_arch_spellings():
    assert compiler.arch_of("sm_90") == compiler.arch_of("90") == compiler.arch_of(90) == compiler.arch_of((9, 0)) == 90
    with pytest.raises(ValueError, match="not a GPU architecture"):
        compiler.arch_of("hopper")


def test_strip_internal_namespaces():
    nvcc = "_ZN3l2r5route46_GLOBAL__N__2d506143_13_route_cuda_cu_40de9d8520route_prepare_kernelENS0_13PrepareParamsE"
    ours = "_ZN3l2r5route51_GLOBAL__N__00000000_13_route_cuda_cu_d6c15158_312820route_prepare_kernelENS0_13PrepareParamsE"
    assert strip_internal_namespaces(nvcc) == strip_internal_namespaces(ours) == \
        "_ZN3l2r5route20route_prepare_kernelENS0_13PrepareParamsE"


# ---- backend selection ---------------------------------------------------------------------------

def test_backend_of_this_build():
    if l2r_cuda.cuda_built():
        assert l2r_cuda.cuda_backend() == "nvcc"
        assert l2r_cuda.jit.status().startswith("nvcc:")
    if not torch.cuda.is_available():
        reasons = backend.unavailable_reasons()
        assert any("no CUDA device" in r or "without CUDA" in r for r in reasons), reasons
        assert not backend.install_if_possible()


def test_installed_executor_serves_cuda_tensors_and_is_removed():
    class Recorder:
        def limits(self, device):
            return 0, 0, 0

        def run(self, source, steps, device, stream):
            raise AssertionError("no CUDA tensor ran")

    before = l2r_cuda.cuda_backend()
    with backend.use_nvrtc(Recorder()):
        assert l2r_cuda.cuda_backend() == "nvrtc"
        assert _library.has_kernel("route_forward", "cuda") and _library.has_kernel("unpermute", "cuda")
        assert l2r_cuda.jit.status().startswith("nvrtc:")
    assert l2r_cuda.cuda_backend() == before
    with pytest.raises(TypeError, match="has no limits"):
        _library._C.set_plan_executor(object())


def test_cpu_only_build_reports_why_without_cupy(tmp_path):
    """`import l2r_cuda` where cupy cannot be imported: no NVRTC stand-in, and the reason names cupy."""
    script = ("import sys; sys.modules['cupy'] = None\n"
              "import l2r_cuda, l2r_cuda.jit\n"
              "print(l2r_cuda.jit.unavailable_reasons())\n"
              "print(l2r_cuda.cuda_backend())\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "cupy is not installed" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == ("nvcc" if l2r_cuda.cuda_built() else "None")


# ---- the executor, against a recording fake of cupy's driver and runtime -------------------------

class FakeDriver:
    def __init__(self):
        self.calls = []
        self.context = 0

    def ctxGetCurrent(self):
        return self.context

    def moduleLoadData(self, cubin):
        self.calls.append(("load", cubin))
        return 100 + len([c for c in self.calls if c[0] == "load"])

    def moduleGetFunction(self, module, name):
        self.calls.append(("function", module, name))
        return module * 10

    def funcSetAttribute(self, function, attribute, value):
        self.calls.append(("attribute", function, attribute, value))

    def launchKernel(self, f, gx, gy, gz, bx, by, bz, smem, stream, params, extra):
        # cuLaunchKernel reads the one parameter through params[0]: copy the bytes now, as it does.
        pointer = ctypes.cast(params, ctypes.POINTER(ctypes.c_void_p))[0]
        self.calls.append(("launch", f, (gx, gy, gz), (bx, by, bz), smem, stream, ctypes.string_at(pointer, 16), extra))


class FakeRuntime:
    def __init__(self):
        self.calls = []
        self.capturing = set()  # streams being captured into a CUDA graph

    def streamIsCapturing(self, stream):
        return stream in self.capturing

    def malloc(self, size):
        self.calls.append(("malloc", size))
        return 0x100000 * len([c for c in self.calls if c[0] == "malloc"])

    def memsetAsync(self, ptr, value, size, stream):
        self.calls.append(("memset", ptr, value, size, stream))

    def setDevice(self, device):
        self.calls.append(("device", device))


def test_executor_launches_plan_steps_through_the_driver():
    compiled = []

    def fake_compile(source, kernels, arch):
        compiled.append((source.path, tuple(kernels), arch))
        return nvrtc.Compiled(b"CUBIN-" + kernels[0].encode(), {kernels[0]: "_Z" + kernels[0]}, "")

    driver, runtime = FakeDriver(), FakeRuntime()
    src = sources.KernelSource(0, "route/cuda/route_cuda.cu", ("a", "b"))
    ex = NvrtcExecutor(driver=driver, runtime=runtime, compile=fake_compile, sources={0: src},
                       capability=lambda device: (9, 0))
    params = bytes(range(16)) + b"\0" * 48
    steps = [(1, 0x1000, 0xFF, 64), (0, "a", (3, 2, 1), (128, 1, 1), 64 * 1024, params),
             (0, "a", (1, 1, 1), (256, 1, 1), 0, params[::-1])]
    ex.run(0, steps, 0, 0xBEEF)
    assert runtime.calls == [("device", 0), ("memset", 0x1000, 0xFF, 64, 0xBEEF)]
    assert compiled == [("route/cuda/route_cuda.cu", ("a",), (9, 0))]  # once per kernel and device
    kinds = [c[0] for c in driver.calls]
    assert kinds == ["load", "function", "attribute", "launch", "launch"]
    assert driver.calls[0] == ("load", b"CUBIN-a") and driver.calls[1] == ("function", 101, "_Za")
    assert driver.calls[2] == ("attribute", 1010, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, 64 * 1024)
    assert driver.calls[3] == ("launch", 1010, (3, 2, 1), (128, 1, 1), 64 * 1024, 0xBEEF, params[:16], 0)
    assert driver.calls[4][4:7] == (0, 0xBEEF, params[::-1][:16])
    driver.context = 1
    ex.run(0, [(0, "b", (1, 1, 1), (32, 1, 1), 0, params)], 1, 7)
    assert ("device", 1) not in runtime.calls  # a current context: no device switch
    assert compiled[-1] == ("route/cuda/route_cuda.cu", ("b",), (9, 0))


def test_executor_keeps_zero_words_per_stream_except_while_capturing():
    driver, runtime = FakeDriver(), FakeRuntime()
    ex = NvrtcExecutor(driver=driver, runtime=runtime, compile=None, sources={}, capability=lambda device: (9, 0))
    words = NvrtcExecutor.ZERO_WORDS_PER_STREAM
    first = ex.stream_zero_words(0, 0xA, 128)
    assert first != 0 and runtime.calls == [("device", 0), ("malloc", 4 * words), ("memset", first, 0, 4 * words, 0xA)]
    assert ex.stream_zero_words(0, 0xA, words) == first  # kept: no second allocation or memset
    assert len(runtime.calls) == 3
    other = ex.stream_zero_words(0, 0xB, 128)  # another stream: its own words
    assert other not in (0, first) and runtime.calls[-1] == ("memset", other, 0, 4 * words, 0xB)
    assert ex.stream_zero_words(1, 0xA, 128) not in (0, first, other)  # another device: its own too
    runtime.capturing.add(0xC)
    calls = len(runtime.calls)
    assert ex.stream_zero_words(0, 0xC, 128) == 0 and len(runtime.calls) == calls  # a graph zeroes its own
    runtime.capturing.add(0xA)
    assert ex.stream_zero_words(0, 0xA, 128) == 0  # even a stream that has words, while it captures
    assert ex.stream_zero_words(0, 0xB, words + 1) == 0 and ex.stream_zero_words(0, 0xB, 0) == 0


def test_executor_needs_cupy():
    if l2r_cuda.jit.executor.cupy is not None:
        pytest.skip("cupy is installed")
    with pytest.raises(RuntimeError, match="cupy"):
        NvrtcExecutor()


# ---- packaging -------------------------------------------------------------------------------------

def test_wheel_ships_the_kernel_sources(tmp_path):
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, env=dict(os.environ, L2R_CUDA="0"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shipped = tmp_path / "l2r_cuda" / "csrc"
    for s in sources.kernel_sources().values():
        assert (shipped / s.path).is_file()
    assert (shipped / "common" / "launch_plan.h").is_file()
    assert (shipped / "route" / "math" / "all.h").is_file()
