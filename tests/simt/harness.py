"""Build unchanged CUDA ``.cu`` sources with g++ against the SIMT CPU emulator
and load them with ctypes.  See README.md in this directory.

Typical use from a kernel test::

    from tests.simt import harness as simt        # or: import harness
    lib = simt.build(sources=[ROOT / "csrc/route/route_cuda.cu"],
                     include_dirs=[ROOT / "csrc"],
                     driver_source=DRIVER_CPP, name="route")
    simt.set_seed(lib, 3)
    lib.run_route(simt.ptr(x), simt.ptr(out), n)   # extern "C" function of the driver
    simt.check(lib)                                # raises SimtError on deadlock etc.
"""
from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Mapping, Sequence

HERE = Path(__file__).resolve().parent
INCLUDE_DIR = HERE / "include"
RUNTIME_DIR = HERE / "runtime"
# The emulator runtime linked into every library: scheduler, memory registry, checker front,
# initcheck, racecheck, counters, and the ThreadSanitizer ABI that sanitize=True kernels call.
RUNTIME_SOURCES = [RUNTIME_DIR / f for f in ("simt_core.cpp", "simt_memory.cpp", "simt_checker.cpp",
                                             "simt_init.cpp", "simt_race.cpp", "simt_counters.cpp",
                                             "simt_tsan.cpp")]

try:
    from .rewrite import kernel_base_name, launched_kernel_names, rewrite_source
except ImportError:  # imported as a top-level module
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    from rewrite import kernel_base_name, launched_kernel_names, rewrite_source  # noqa: E402

__all__ = [
    "SimtError", "BuildError", "have_compiler", "build", "set_seed", "set_order", "set_strict",
    "set_poison", "last_error", "clear_error", "check", "call", "ptr", "stats", "DEFAULT_SEEDS",
    "register", "unregister", "set_checks", "get_checks", "counters", "reset_counters",
    "launched_kernels", "kernel_instantiations", "SANITIZE_FLAGS",
]

DEFAULT_SEEDS = (0, 1, 2, 3, 4)
ORDERS = {"random": 0, "fifo": 1, "forward": 1, "lifo": 2, "reverse": 2}


class SimtError(RuntimeError):
    """A kernel launch failed in the emulator (deadlock, divergent barrier,
    trap/assert, bad launch configuration ...)."""


class BuildError(RuntimeError):
    pass


def compiler() -> str | None:
    return os.environ.get("SIMT_CXX") or shutil.which("g++")


def have_compiler() -> bool:
    return compiler() is not None


def default_build_dir() -> Path:
    d = os.environ.get("SIMT_BUILD_DIR")
    return Path(d) if d else HERE / ".build"


BASE_FLAGS = [
    "-std=c++20", "-fPIC", "-U_FORTIFY_SOURCE", "-fno-threadsafe-statics", "-fno-strict-aliasing",
    "-Wno-attributes", "-Wno-unused-variable", "-Wno-unused-but-set-variable",
]


def _sha(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()


# Kernel translation units of sanitize=True builds: g++ instruments every load and store with a
# call of ThreadSanitizer's ABI (__tsan_read4(addr), ...), which runtime/simt_tsan.cpp implements
# (libtsan is never linked). No function entry/exit hooks (not needed); no scalar replacement of
# aggregates, so that a 16-byte vector load stays one 16-byte access instead of four 4-byte ones;
# line tables (-g1) so that checker messages name source lines (addr2line).
SANITIZE_FLAGS = ["-fsanitize=thread", "--param=tsan-instrument-func-entry-exit=0", "-fno-tree-sra", "-g1"]


def _runtime_hash() -> str:
    files = sorted(INCLUDE_DIR.rglob("*.h")) + sorted(RUNTIME_DIR.glob("*.h")) + RUNTIME_SOURCES + [HERE / "rewrite.py"]
    return _sha(*[f.read_bytes() for f in files])


def _run(cmd: list[str], cwd: Path) -> None:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise BuildError(f"command failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout}\n{r.stderr}")


def _parse_deps(dfile: Path) -> list[str]:
    text = dfile.read_text().replace("\\\n", " ")
    deps = []
    for line in text.splitlines():
        if ":" not in line:
            continue
        _, rhs = line.split(":", 1)
        for tok in rhs.split():
            deps.append(tok)
    return deps


def _file_sha(p: str) -> str | None:
    try:
        return hashlib.sha256(Path(p).read_bytes()).hexdigest()
    except OSError:
        return None


def _runtime_objects(build_dir: Path, opt: str) -> list[Path]:
    """The runtime's object files (never instrumented), cached by the runtime's content hash."""
    key = _sha(_runtime_hash(), opt, " ".join(BASE_FLAGS), compiler() or "")[:16]
    objs = []
    for src in RUNTIME_SOURCES:
        obj = build_dir / f"{src.stem}-{key}.o"
        if not obj.exists():
            tmp = build_dir / f"{src.stem}-{key}.{os.getpid()}.o"
            _run([compiler(), *BASE_FLAGS, opt, f"-I{INCLUDE_DIR}", f"-I{RUNTIME_DIR}", "-c", str(src), "-o", str(tmp)],
                 build_dir)
            os.replace(tmp, obj)
        objs.append(obj)
    return objs


HEADER_EXTS = {".h", ".hh", ".hpp", ".hxx", ".cuh", ".inl", ".inc", ".cu", ".ipp"}
SKIP_DIRS = {"__pycache__", "build", "dist", "node_modules"}
MAX_SHADOW_FILES = 4000


def _make_shadow_tree(srcs, include_dirs, shadow: Path, deps: dict, exclude: Path):
    """Mirror the header files under the source and include directories into
    `shadow`, rewritten where they contain launches or __shared__, so that
    headers with kernels (extern __shared__, <<<>>>) work and relative
    includes keep resolving.  Returns (roots, shadow_of)."""
    cands = sorted({Path(d).resolve() for d in include_dirs} | {s.parent for s in srcs}, key=lambda p: len(p.parts))
    src_set = set(srcs)

    inc_set = {Path(d).resolve() for d in include_dirs}

    def collect(root_list, shallow_sources=False):
        files = []
        for i, r in enumerate(root_list):
            for dirpath, dirnames, filenames in os.walk(r):
                dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS
                               and Path(dirpath, d).resolve() != exclude]
                if shallow_sources and r not in inc_set:
                    dirnames[:] = []  # a source directory that is not an include dir: top level only
                for fn in filenames:
                    f = Path(dirpath) / fn
                    if f.suffix in HEADER_EXTS and f not in src_set:
                        files.append((i, r, f))
                        if len(files) > MAX_SHADOW_FILES:
                            return None
        return files

    # one common root keeps relative includes between sibling directories working
    roots: list[Path] = []
    files = None
    if cands:
        common = Path(os.path.commonpath([str(c) for c in cands]))
        if len(common.parts) > 2 and common != Path.home():
            roots = [common]
            files = collect(roots)
    if files is None:
        roots = []
        for c in cands:
            if not any(c == r or r in c.parents for r in roots):
                roots.append(c)
        files = collect(roots, shallow_sources=True)
        if files is None:
            raise BuildError(f"too many header files under {roots}; pass narrower include_dirs")

    def shadow_of(p: Path) -> Path | None:
        for i, r in enumerate(roots):
            if p == r or r in p.parents:
                return shadow / str(i) / p.relative_to(r)
        return None

    if shadow.exists():
        shutil.rmtree(shadow)
    for i, r, f in files:
        data = f.read_bytes()
        dst = shadow / str(i) / f.relative_to(r)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if b"<<<" in data or b"__shared__" in data:
            dst.write_text(rewrite_source(data.decode(errors="replace"), str(f)))
        else:
            dst.write_bytes(data)
        deps[str(f)] = hashlib.sha256(data).hexdigest()
    return roots, shadow_of


def launched_names(rewritten: str) -> set[str]:
    return launched_kernel_names(rewritten)


def _kernel_names_in_headers(shadow: Path) -> set[str]:
    names: set[str] = set()
    if shadow.exists():
        for f in shadow.rglob("*"):
            if f.is_file() and f.suffix in HEADER_EXTS:
                text = f.read_text(errors="replace")
                if "::simt::launcher(" in text:
                    names |= launched_kernel_names(text)
    return names


def build(
    sources: Sequence[str | os.PathLike] = (),
    include_dirs: Iterable[str | os.PathLike] = (),
    driver_source: str | os.PathLike | None = None,
    defines: Mapping[str, object] | None = None,
    name: str = "simt",
    opt: str = "-O1",
    extra_flags: Sequence[str] = (),
    cuda_arch: int | None = 900,
    build_dir: str | os.PathLike | None = None,
    force: bool = False,
    sanitize: bool | None = None,
) -> ctypes.CDLL:
    """Compile CUDA sources (+ an optional C++ driver) into a shared library
    running on the SIMT emulator and load it with ctypes.

    sources:       .cu/.cpp files, compiled unchanged after the launch/extern
                   __shared__ rewrite (rewrite.py).
    include_dirs:  extra -I directories (the fake CUDA headers always come first;
                   each source's own directory is searched for "..." includes).
    driver_source: C++ code (a string) or a path to a file with extern "C"
                   functions that a test calls through ctypes; it is compiled
                   like the sources, so it may use cudaStream_t, launch kernels
                   with <<<>>>, call host launchers declared in headers, etc.
    defines:       {"NAME": value or None} -> -DNAME=value / -DNAME.
    cuda_arch:     value of __CUDA_ARCH__ (None: leave it undefined).
    sanitize:      compile the sources and the driver with SANITIZE_FLAGS, so that every load
                   and store of kernel code reaches the memory checker (memcheck, initcheck,
                   racecheck, counters; see README.md). None (default): on, unless the environment sets
                   SIMT_SANITIZE=0. Kernels built this way may touch only registered memory
                   (simt.call registers its simt.ptr arguments).
    The result is cached by content hash (sources, headers they include,
    flags) under build_dir (default tests/simt/.build or $SIMT_BUILD_DIR).
    """
    cxx = compiler()
    if cxx is None:
        raise BuildError("g++ not found (set SIMT_CXX)")
    bdir = Path(build_dir) if build_dir else default_build_dir()
    bdir.mkdir(parents=True, exist_ok=True)

    srcs = [Path(s).resolve() for s in sources]
    driver_text = None
    if driver_source is not None:
        ds = str(driver_source)
        if "\n" not in ds and os.path.isfile(ds):
            srcs.append(Path(ds).resolve())
        else:
            driver_text = ds
    flags = list(BASE_FLAGS) + [opt]
    flags += [f"-I{INCLUDE_DIR}"]
    for s in srcs:
        flags.append(f"-iquote{s.parent}")
    flags += [f"-I{Path(d).resolve()}" for d in include_dirs]
    n0 = len(flags)
    if cuda_arch is None:
        flags.append("-DSIMT_NO_CUDA_ARCH")
    else:
        flags.append(f"-D__CUDA_ARCH__={int(cuda_arch)}")
    for k, v in (defines or {}).items():
        flags.append(f"-D{k}" if v is None else f"-D{k}={v}")
    flags += list(extra_flags)
    if sanitize is None:
        sanitize = os.environ.get("SIMT_SANITIZE", "1") not in ("", "0")
    if sanitize:
        flags += SANITIZE_FLAGS
    n_tail = len(flags) - n0

    texts = []
    for s in srcs:
        texts.append((s, rewrite_source(s.read_text(), str(s))))
    if driver_text is not None:
        texts.append((None, rewrite_source(driver_text, f"<driver:{name}>")))
    key = _sha(_runtime_hash(), cxx, " ".join(flags), *[str(p) + "\0" + t for p, t in texts])[:20]
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
    out_dir = bdir / f"{safe}-{key}"
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path = out_dir / "deps.json"

    with open(out_dir / ".lock", "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        fresh = False
        lib_path = None
        if meta_path.exists() and not force:
            try:
                meta = json.loads(meta_path.read_text())
                lib_path = out_dir / meta["lib"]
                fresh = lib_path.exists() and all(_file_sha(p) == h for p, h in meta["deps"].items())
            except (ValueError, KeyError, TypeError):
                fresh = False
        if not fresh:
            runtime = _runtime_objects(bdir, opt)
            all_deps: dict[str, str | None] = {}
            roots, shadow_of = _make_shadow_tree(srcs, include_dirs, out_dir / "shadow", all_deps,
                                                 bdir.resolve())
            cflags = list(BASE_FLAGS) + [opt, f"-I{INCLUDE_DIR}"]
            for d in include_dirs:
                d = Path(d).resolve()
                sd = shadow_of(d)
                if sd is not None:
                    cflags.append(f"-I{sd}")
                cflags.append(f"-I{d}")
            for src in srcs:
                cflags.append(f"-iquote{src.parent}")
            cflags += flags[len(flags) - n_tail:]
            objs = []
            for idx, (orig, text) in enumerate(texts):
                stem = f"tu{idx}_{orig.stem if orig else 'driver'}"
                if orig is not None:
                    cpp = shadow_of(orig)
                    cpp.parent.mkdir(parents=True, exist_ok=True)
                else:
                    cpp = out_dir / f"{stem}.cpp"
                cpp.write_text(text)
                obj = out_dir / f"{stem}.o"
                dfile = out_dir / f"{stem}.d"
                _run([cxx, *cflags, "-include", "cuda_runtime.h", "-MMD", "-MF", str(dfile), "-x", "c++", "-c",
                      str(cpp), "-o", str(obj)], out_dir)
                objs.append(str(obj))
                for dep in _parse_deps(dfile):
                    p = Path(dep)
                    if not p.is_absolute():
                        p = (out_dir / p).resolve()
                    if out_dir in p.parents:
                        continue
                    all_deps[str(p)] = _file_sha(str(p))
                if orig is not None:
                    all_deps[str(orig)] = _file_sha(str(orig))
            # the library name includes the dependency hash: a rebuilt library
            # gets a new path, so dlopen() cannot hand back a stale one
            dkey = _sha(*[f"{p}={h}" for p, h in sorted(all_deps.items())])[:12]
            lib_path = out_dir / f"lib{safe}-{dkey}.so"
            tmp = out_dir / f"lib{safe}.{os.getpid()}.tmp.so"
            _run([cxx, "-shared", "-fPIC", "-Wl,-Bsymbolic-functions", *objs, *map(str, runtime), "-o", str(tmp)],
                 out_dir)
            os.replace(tmp, lib_path)
            kernels = sorted(set().union(*(launched_names(t) for _, t in texts)) |
                             _kernel_names_in_headers(out_dir / "shadow"))
            meta_path.write_text(json.dumps({"lib": lib_path.name, "deps": all_deps, "sources": [str(s) for s in srcs],
                                             "sanitize": bool(sanitize), "kernels": kernels}, indent=0))
    lib = _load(lib_path)
    meta = json.loads(meta_path.read_text())
    lib._simt_meta = meta
    return lib


_LIBS: dict[str, ctypes.CDLL] = {}


def _load(path: Path) -> ctypes.CDLL:
    # A rebuilt library has a new path (content hash), so caching by path is safe.
    key = str(path)
    if key in _LIBS:
        return _LIBS[key]
    lib = ctypes.CDLL(key)
    lib.simt_set_seed.argtypes = [ctypes.c_ulonglong]
    lib.simt_set_seed.restype = None
    lib.simt_get_seed.restype = ctypes.c_ulonglong
    lib.simt_set_order.argtypes = [ctypes.c_int]
    lib.simt_set_strict.argtypes = [ctypes.c_int]
    lib.simt_set_poison.argtypes = [ctypes.c_int]
    lib.simt_set_allow_divergent_barrier.argtypes = [ctypes.c_int]
    lib.simt_last_error.restype = ctypes.c_char_p
    lib.simt_last_error_code.restype = ctypes.c_int
    lib.simt_clear_error.restype = None
    lib.simt_stat.argtypes = [ctypes.c_int]
    lib.simt_stat.restype = ctypes.c_ulonglong
    lib.simt_register_buffer.argtypes = [ctypes.c_void_p, ctypes.c_ulonglong, ctypes.c_char_p, ctypes.c_int,
                                         ctypes.c_int]
    lib.simt_register_buffer.restype = ctypes.c_ulonglong
    lib.simt_unregister_buffer.argtypes = [ctypes.c_void_p]
    lib.simt_unregister_buffer.restype = None
    lib.simt_set_checks.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.simt_set_checks.restype = None
    lib.simt_get_checks.restype = ctypes.c_int
    lib.simt_counters_json.restype = ctypes.c_char_p
    lib.simt_counters_reset.restype = None
    lib.simt_launched_kernels.restype = ctypes.c_char_p
    _LIBS[key] = lib
    return lib


def set_seed(lib: ctypes.CDLL, seed: int) -> None:
    """Seed the fiber/block order (also restarts the per-launch seed sequence)."""
    lib.simt_set_seed(int(seed) & 0xFFFFFFFFFFFFFFFF)


def set_order(lib: ctypes.CDLL, order: str) -> None:
    """'random' (default), 'fifo' (thread order) or 'lifo' (reverse order)."""
    lib.simt_set_order(ORDERS[order])


def set_strict(lib: ctypes.CDLL, on: bool) -> None:
    """Strict (default): a warp mask naming lanes that do not exist is an error."""
    lib.simt_set_strict(int(bool(on)))


def set_poison(lib: ctypes.CDLL, on: bool) -> None:
    """Poison (default on): dynamic shared memory is filled with 0xff before each
    block, and shuffles reading a lane outside the mask return all-ones bits."""
    lib.simt_set_poison(int(bool(on)))


def last_error(lib: ctypes.CDLL) -> str | None:
    msg = lib.simt_last_error()
    return msg.decode(errors="replace") if msg else None


def clear_error(lib: ctypes.CDLL) -> None:
    lib.simt_clear_error()


_PC_RE = re.compile(r"pc (lib[\w.-]+\.so)\+0x([0-9a-f]+)")


def symbolize(lib: ctypes.CDLL, msg: str) -> str:
    """Append function and source line (addr2line) to every "pc libX.so+0x..." in a checker
    message; unchanged where addr2line is missing."""
    a2l = shutil.which("addr2line")
    path = getattr(lib, "_name", None)
    if not a2l or not path:
        return msg

    def one(m: re.Match) -> str:
        if Path(path).name != m.group(1):
            return m.group(0)
        r = subprocess.run([a2l, "-f", "-C", "-e", path, "0x" + m.group(2)], capture_output=True, text=True)
        lines = r.stdout.split("\n")
        if r.returncode != 0 or len(lines) < 2:
            return m.group(0)
        func = re.sub(r"\(anonymous namespace\)::", "", lines[0].strip())
        where_ = lines[1].strip()
        return f"{m.group(0)} [{func} at {where_}]" if "??" not in where_ else f"{m.group(0)} [{func}]"

    return _PC_RE.sub(one, msg)


def check(lib: ctypes.CDLL, clear: bool = True) -> None:
    """Raise SimtError if a launch failed since the last clear (the error is
    sticky like a CUDA launch failure, so later launches are skipped)."""
    msg = last_error(lib)
    if msg:
        if clear:
            clear_error(lib)
        raise SimtError(symbolize(lib, msg))


class Ptr(ctypes.c_void_p):
    """simt.ptr(t): a c_void_p that also remembers the allocation it points into (the tensor's
    storage / the array's memory) and a name, so that call() can register it with the memory
    checker."""
    simt_lo: int = 0
    simt_nbytes: int = 0
    simt_name: str | None = None
    simt_racecheck: bool = True
    simt_uninitialized: bool = False


def ptr(t, name: str | None = None, racecheck: bool = True, uninitialized: bool = False) -> Ptr:
    """A ctypes pointer to a CPU torch tensor / numpy array's data. call() registers the memory
    behind it (the whole storage of a view) as a buffer the kernels may touch, named `name` (or
    after the argument position). racecheck=False exempts the buffer from racecheck (for a known,
    documented benign race; say why at the call). uninitialized=True stands in for memory whose
    content is undefined on a GPU (an at::empty the real launcher gets): initcheck reports a kernel
    load of any byte of it no kernel store, memset or memcpy wrote during the call; its content
    stays what the test put there (garbage that would show if a read went unreported)."""
    if hasattr(t, "data_ptr"):
        p = Ptr(t.data_ptr())
        try:
            st = t.untyped_storage()
            p.simt_lo, p.simt_nbytes = st.data_ptr(), st.nbytes()
        except (AttributeError, RuntimeError):
            p.simt_lo, p.simt_nbytes = t.data_ptr(), t.numel() * t.element_size()
        desc = f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}"
    elif hasattr(t, "ctypes"):
        p = Ptr(t.ctypes.data)
        base = t
        while getattr(base, "base", None) is not None and hasattr(base.base, "ctypes"):
            base = base.base
        p.simt_lo, p.simt_nbytes = base.ctypes.data, base.nbytes
        desc = f"{t.dtype}{list(t.shape)}"
    else:
        raise TypeError(f"cannot take a pointer of {type(t)!r}")
    p.simt_name = f"{name} ({desc})" if name else desc
    p.simt_racecheck = racecheck
    p.simt_uninitialized = uninitialized
    return p


def register(lib: ctypes.CDLL, t, name: str | None = None, nbytes: int | None = None,
             racecheck: bool = True, uninitialized: bool = False) -> int:
    """Register memory the kernels may touch: a tensor/array (its storage), a Ptr, or an integer
    address with nbytes. Registrations are refcounted (a second registration of the same range
    keeps the first one's initcheck state; one that has content marks the bytes it covers
    written); undo with unregister(). uninitialized: see ptr()."""
    if isinstance(t, int):
        lo, n, nm = t, int(nbytes or 0), name or "buffer"
    else:
        p = t if isinstance(t, Ptr) else ptr(t, name, racecheck, uninitialized)
        lo, n, nm = p.simt_lo, p.simt_nbytes, name or p.simt_name or "buffer"
        racecheck = racecheck and p.simt_racecheck
        uninitialized = uninitialized or p.simt_uninitialized
    lib.simt_register_buffer(ctypes.c_void_p(lo), n, nm.encode(), int(racecheck), int(uninitialized))
    return lo


def unregister(lib: ctypes.CDLL, lo: int) -> None:
    lib.simt_unregister_buffer(ctypes.c_void_p(lo))


def call(lib: ctypes.CDLL, fn: str, *args, seed: int | None = None):
    """Call an extern "C" function of the library, then check(). Every simt.ptr() argument is
    registered with the memory checker for the duration of the call."""
    if seed is not None:
        set_seed(lib, seed)
    clear_error(lib)
    registered = []
    for i, a in enumerate(args):
        if isinstance(a, Ptr) and a.simt_nbytes > 0:
            registered.append(register(lib, a.simt_lo, f"{fn} arg {i}: {a.simt_name}", a.simt_nbytes,
                                       a.simt_racecheck, a.simt_uninitialized))
    try:
        res = getattr(lib, fn)(*args)
    finally:
        for lo in registered:
            unregister(lib, lo)
    check(lib)
    return res


def set_checks(lib: ctypes.CDLL, memcheck: bool | None = None, racecheck: bool | None = None,
               counters: bool | None = None, any_collective_orders: bool | None = None,
               initcheck: bool | None = None) -> None:
    """Switch the memory checks of sanitize=True kernels (None: unchanged). Defaults: memcheck,
    initcheck and racecheck on, counters off, only __syncwarp orders memory inside a warp (also
    SIMT_MEMCHECK / SIMT_INITCHECK / SIMT_RACECHECK / SIMT_COUNTERS / SIMT_RACE_ANY_COLLECTIVE)."""
    conv = lambda v: -1 if v is None else int(bool(v))  # noqa: E731
    lib.simt_set_checks(conv(memcheck), conv(racecheck), conv(counters), conv(any_collective_orders),
                        conv(initcheck))


def get_checks(lib: ctypes.CDLL) -> dict:
    v = lib.simt_get_checks()
    return {"memcheck": bool(v & 1), "racecheck": bool(v & 2), "counters": bool(v & 4),
            "any_collective_orders": bool(v & 8), "initcheck": bool(v & 16)}


def counters(lib: ctypes.CDLL, reset: bool = True) -> list[dict]:
    """Per-launch counter records since the last reset (see runtime/simt_counters.cpp and
    benchmarks/gpu_model.py): requests, sectors, wavefronts, first-touch DRAM bytes, ..."""
    data = json.loads(lib.simt_counters_json().decode())
    if reset:
        lib.simt_counters_reset()
    return data


def reset_counters(lib: ctypes.CDLL) -> None:
    lib.simt_counters_reset()


def _symbols(lib: ctypes.CDLL) -> dict[int, str]:
    """Function symbols of the library (offset -> demangled name), from nm."""
    cached = getattr(lib, "_simt_symbols", None)
    if cached is not None:
        return cached
    nm = shutil.which("nm")
    if nm is None:
        raise BuildError("nm (binutils) not found")
    out = subprocess.run([nm, "-C", "--defined-only", lib._name], capture_output=True, text=True, check=True).stdout
    syms = {}
    for line in out.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[1] in "tTwW":
            syms.setdefault(int(parts[0], 16), parts[2])
    lib._simt_symbols = syms
    return syms


def _pretty(sym: str) -> str:
    return re.sub(r"\(anonymous namespace\)::", "", sym)


def kernel_instantiations(lib: ctypes.CDLL) -> set[str]:
    """Every kernel instantiation the launchers of this library can dispatch to: the functions in
    its symbol table whose name is one of the kernels launched in its sources (a template kernel is
    instantiated exactly where a launch site names it)."""
    kernels = set(lib._simt_meta.get("kernels", []))
    return {_pretty(sym) for sym in _symbols(lib).values()
            if "[clone" not in sym and kernel_base_name(sym) in kernels}


def launched_kernels(lib: ctypes.CDLL) -> dict[str, int]:
    """Kernel instantiations launched since the library was loaded -> launch count."""
    syms = _symbols(lib)
    out: dict[str, int] = {}
    for line in lib.simt_launched_kernels().decode().splitlines():
        off, count, expr = line.split("\t", 2)
        name = _pretty(syms.get(int(off), f"{expr} @0x{int(off):x}"))
        out[name] = out.get(name, 0) + int(count)
    return out


def stats(lib: ctypes.CDLL) -> dict:
    names = ["launches", "blocks", "barriers", "warp_collectives", "switches"]
    return {n: int(lib.simt_stat(i)) for i, n in enumerate(names)}
