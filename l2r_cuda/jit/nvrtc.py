"""NVRTC, the CUDA runtime compiler, through whichever Python binding is installed: NVIDIA's
``cuda-bindings`` (a dependency of torch's CUDA 13 wheels) or cupy's own (``cupy_backends``). Both
load the ``libnvrtc`` of the CUDA wheels; neither needs a GPU or a driver to compile.

:func:`compile_program` turns CUDA C++ into a CUBIN for one architecture, instantiating the kernels
named by C++ name expressions and returning their lowered (mangled) names and the compile log.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

try:
    from cuda.bindings import nvrtc as _bindings
except ImportError:  # no cuda-bindings (torch < 2.9, or a CPU-only torch)
    _bindings = None

try:
    from cupy_backends.cuda.libs import nvrtc as _cupy
except ImportError:  # no cupy
    _cupy = None

__all__ = ["CompileError", "Compiled", "binding", "version", "compile_program"]


class CompileError(RuntimeError):
    """NVRTC rejected a program; the message holds its log."""


@dataclass(frozen=True)
class Compiled:
    cubin: bytes
    lowered: dict[str, str]  # name expression -> lowered (mangled) kernel name
    log: str                 # NVRTC's log (with -Xptxas=-v: ptxas's resource report)


def binding() -> Optional[str]:
    """'cuda-bindings', 'cupy', or None when no NVRTC binding is installed."""
    if _bindings is not None:
        return "cuda-bindings"
    if _cupy is not None:
        return "cupy"
    return None


def _check(result, what: str):
    err, *values = result
    if err != _bindings.nvrtcResult.NVRTC_SUCCESS:
        raise CompileError(f"{what}: {err.name}")
    return values


def version() -> tuple[int, int]:
    """NVRTC's (major, minor)."""
    if _bindings is not None:
        major, minor = _check(_bindings.nvrtcVersion(), "nvrtcVersion")
        return int(major), int(minor)
    if _cupy is not None:
        major, minor = _cupy.getVersion()
        return int(major), int(minor)
    raise CompileError("no NVRTC binding: install cuda-bindings or cupy (pip install l2r_cuda[cupy])")


def _compile_bindings(source: str, name: str, expressions: Sequence[str], options: Sequence[str]) -> Compiled:
    nv = _bindings
    (prog,) = _check(nv.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], []), "nvrtcCreateProgram")
    try:
        for e in expressions:
            _check(nv.nvrtcAddNameExpression(prog, e.encode()), f"nvrtcAddNameExpression({e})")
        opts = [o.encode() for o in options]
        (err,) = nv.nvrtcCompileProgram(prog, len(opts), opts)
        (size,) = _check(nv.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
        log_buffer = b" " * size
        _check(nv.nvrtcGetProgramLog(prog, log_buffer), "nvrtcGetProgramLog")
        log = log_buffer.rstrip(b"\0 ").decode(errors="replace")
        if err != nv.nvrtcResult.NVRTC_SUCCESS:
            raise CompileError(f"NVRTC could not compile {name} ({err.name}):\n{log}")
        (size,) = _check(nv.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
        cubin = b" " * size
        _check(nv.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        lowered = {}
        for e in expressions:
            (low,) = _check(nv.nvrtcGetLoweredName(prog, e.encode()), f"nvrtcGetLoweredName({e})")
            lowered[e] = low.decode() if isinstance(low, bytes) else str(low)
        return Compiled(bytes(cubin), lowered, log)
    finally:
        nv.nvrtcDestroyProgram(prog)


def _compile_cupy(source: str, name: str, expressions: Sequence[str], options: Sequence[str]) -> Compiled:
    nv = _cupy
    prog = nv.createProgram(source, name, (), ())
    try:
        for e in expressions:
            nv.addNameExpression(prog, e)
        try:
            nv.compileProgram(prog, list(options))
        except nv.NVRTCError as exc:
            raise CompileError(f"NVRTC could not compile {name} ({exc}):\n{nv.getProgramLog(prog)}") from None
        log = nv.getProgramLog(prog).rstrip("\0 ")
        return Compiled(nv.getCUBIN(prog), {e: nv.getLoweredName(prog, e) for e in expressions}, log)
    finally:
        nv.destroyProgram(prog)


def compile_program(source: str, name: str, expressions: Sequence[str], options: Sequence[str],
                    prefer: Optional[str] = None) -> Compiled:
    """Compiles ``source`` (program ``name``: quoted includes resolve next to it) with NVRTC
    ``options`` (one architecture: ``--gpu-architecture=sm_XX`` gives a CUBIN), instantiating the
    kernels of ``expressions``. ``prefer``: 'cuda-bindings' or 'cupy' (default: :func:`binding`).
    Raises :class:`CompileError` with the log when NVRTC rejects the program."""
    which = prefer or binding()
    if which == "cuda-bindings" and _bindings is not None:
        return _compile_bindings(source, name, expressions, options)
    if which == "cupy" and _cupy is not None:
        return _compile_cupy(source, name, expressions, options)
    raise CompileError(f"NVRTC binding {which!r} is not installed (install cuda-bindings, or cupy: "
                       "pip install l2r_cuda[cupy])")
