"""Build of l2r_cuda's native extension ``l2r_cuda._C`` (the source of truth; CMakeLists.txt mirrors it).

CUDA kernels are compiled when torch was built with CUDA and a CUDA toolkit is found; otherwise the
build is CPU-only (every op still works on CPU) and says so. Nothing here asks whether a GPU is
present: a machine without one builds the CUDA kernels just the same.

Environment:
  L2R_CUDA=0|1            force the CPU-only build / require the CUDA build
  CUDA_HOME               the toolkit to use (else /usr/local/cuda, else the one behind `nvcc`)
  TORCH_CUDA_ARCH_LIST    default "8.0;9.0+PTX"
  MAX_JOBS                parallel compile jobs (ninja)
  L2R_DEBUG=1             -O0 -g builds
  L2R_SANITIZE=1          AddressSanitizer + UBSan, -O1 (scripts/sanitize.sh; CPU-only)
"""

from __future__ import annotations

import glob
import os
import re
import runpy
import shutil
import subprocess
import sys
import tempfile

from setuptools import setup
from setuptools.command.build_py import build_py as _build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg: str) -> None:
    print(f"[l2r_cuda build] {msg}", file=sys.stderr, flush=True)


def _is_toolkit(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h")
    )


def _toolkit_behind_nvcc() -> str | None:
    """The toolkit the `nvcc` on PATH really runs: it may be a wrapper script outside the toolkit,
    so ask nvcc itself (its dry run prints TOP=<toolkit>/bin/..)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    candidate = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if _is_toolkit(candidate):
        return candidate
    try:
        dry = subprocess.run(
            [nvcc, "-dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"TOP=(\S+)", dry.stdout + dry.stderr)
    if m:
        top = os.path.normpath(m.group(1).strip('"'))
        if _is_toolkit(top):
            return top
    return None


def find_cuda_home() -> str | None:
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if _is_toolkit(candidate):
            return os.path.normpath(candidate)
    return _toolkit_behind_nvcc()


def decide_cuda() -> tuple[bool, str | None, str]:
    forced = os.environ.get("L2R_CUDA")
    if forced == "0":
        return False, None, "L2R_CUDA=0"
    import torch

    cuda_home = find_cuda_home()
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} was built without CUDA")
    if cuda_home is None:
        reasons.append("no CUDA toolkit found (CUDA_HOME, /usr/local/cuda, nvcc on PATH)")
    if reasons:
        if forced == "1":
            raise RuntimeError("L2R_CUDA=1 but the CUDA build is impossible: " + "; ".join(reasons))
        return False, None, "; ".join(reasons)
    return True, cuda_home, f"CUDA toolkit {cuda_home}, torch CUDA {torch.version.cuda}"


def sources(with_cuda: bool) -> list[str]:
    """Every .cpp, and the .cu kernels in a CUDA build. The CUDA ops' ATen glue (csrc/<op>/cuda/*.cpp)
    is in every build: it runs launch plans through whichever executor serves CUDA tensors, the
    nvcc kernels or l2r_cuda.jit's NVRTC build of the same .cu files."""
    cpp = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cu = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True)) if with_cuda else []
    return cpp + cu


# The device compiler flags shared with tests/test_cuda_compile.py and l2r_cuda.jit (NVRTC); read
# from the file itself, since neither torch nor l2r_cuda may be importable yet.
_FLAGS = runpy.run_path(os.path.join(ROOT, "l2r_cuda", "jit", "flags.py"))
DEVICE_FLAGS = list(_FLAGS["NVCC_ONLY"]) + list(_FLAGS["FP_CONTRACT"])


def nvcc_accepts(cuda_home: str, flags: list[str]) -> bool:
    """Whether this toolkit's nvcc compiles a trivial kernel with `flags` (for undocumented ones)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cu")
        with open(src, "w") as f:
            f.write("__global__ void probe(float* p) { p[threadIdx.x] = 1.0f; }\n")
        cmd = [os.path.join(cuda_home, "bin", "nvcc"), "-ptx", src, "-o", os.path.join(tmp, "probe.ptx"), *flags]
        try:
            return subprocess.run(cmd, capture_output=True, timeout=120).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False


def kernel_source_files() -> list[str]:
    """What l2r_cuda.jit compiles at run time: the .cu kernels and every header under csrc/."""
    return sorted(p for ext in ("cu", "cuh", "h") for p in glob.glob(os.path.join("csrc", "**", f"*.{ext}"), recursive=True))


class build_py(_build_py):
    """Ships the kernel sources inside the package (l2r_cuda/csrc/...), so that l2r_cuda.jit can
    compile them with NVRTC where the installed build has no CUDA kernels."""

    def run(self):
        super().run()
        for src in kernel_source_files():
            dst = os.path.join(self.build_lib, "l2r_cuda", src)
            self.mkpath(os.path.dirname(dst))
            self.copy_file(src, dst)


def extensions():
    with_cuda, cuda_home, why = decide_cuda()
    if with_cuda:
        # torch guesses CUDA_HOME from `nvcc` on PATH when it is imported; point it at the real
        # toolkit before (environment) and after (module attribute) that import.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    from torch.utils import cpp_extension

    debug = os.environ.get("L2R_DEBUG") == "1"
    sanitize = os.environ.get("L2R_SANITIZE") == "1"
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    # -ffp-contract=off / --fmad=false (DEVICE_FLAGS): no a*b+c is fused behind our back, so the
    # route math rounds the same operations the same way on every backend (csrc/common/hd.h).
    cxx += ["-fvisibility=hidden", "-Wall", "-Wno-unknown-pragmas", "-ffp-contract=off"]
    # at::parallel_for is a header template: without OpenMP in this extension it runs serially.
    # torch's own libgomp (same soname) is the one loaded at run time.
    link = []
    if sys.platform != "win32":
        cxx += ["-fopenmp"]
        link += ["-fopenmp"]
    if sanitize:
        if with_cuda:
            raise RuntimeError("L2R_SANITIZE=1 builds the CPU extension only: set L2R_CUDA=0 as well")
        flags = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]
        cxx = [f for f in cxx if f != "-O3"] + ["-O1"] + flags
        link += flags
    srcs = sources(with_cuda)
    if with_cuda:
        cpp_extension.CUDA_HOME = cuda_home
        _log(f"building with CUDA ({why}); archs {os.environ['TORCH_CUDA_ARCH_LIST']}")
        nvcc = ["-O0", "-g", "-G"] if debug else ["-O3", "-lineinfo"]
        nvcc += DEVICE_FLAGS + ["-DL2R_WITH_CUDA"]
        # route_cuda.cu's kernel instantiations compile in csrc/route/cuda/apart/*.cu, in parallel
        nvcc += ["-DL2R_ROUTE_CUDA_APART"]
        # NVRTC's 64-bit shared-memory addressing, so l2r_cuda.jit's kernels match these (flags.py)
        shared_pointers = list(_FLAGS["NVCC_SHARED_POINTERS_AS_NVRTC"])
        if nvcc_accepts(cuda_home, shared_pointers):
            nvcc += shared_pointers
        else:
            _log(f"warning: this nvcc rejects {' '.join(shared_pointers)}; building with its default 32-bit "
                 "shared-memory addresses (l2r_cuda.jit's NVRTC kernels may then differ in registers)")
        ext = cpp_extension.CUDAExtension(
            "l2r_cuda._C", srcs,
            extra_compile_args={"cxx": cxx + ["-DL2R_WITH_CUDA"], "nvcc": nvcc},
            include_dirs=[os.path.join(ROOT, "csrc")], extra_link_args=link,
        )
    else:
        _log(f"CPU-only build ({why}): every op runs on CPU; CUDA tensors are not supported")
        ext = cpp_extension.CppExtension(
            "l2r_cuda._C", srcs, extra_compile_args={"cxx": cxx},
            include_dirs=[os.path.join(ROOT, "csrc")], extra_link_args=link,
        )
    return [ext], cpp_extension.BuildExtension.with_options(use_ninja=True)


ext_modules, build_ext = extensions()
setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext, "build_py": build_py})
