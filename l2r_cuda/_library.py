"""Loads the native extension and answers what it was built with."""

from typing import Optional

import torch

try:
    from . import _C  # noqa: F401  (registers the l2r_cuda ops with the dispatcher)
except ImportError as _exc:  # Python would call it "most likely a circular import": it is not one
    import os as _os

    _here = _os.path.dirname(_os.path.abspath(__file__))
    raise ImportError(
        f"l2r_cuda: the native extension l2r_cuda._C is not built in {_here}. Build it there "
        "(`pip install -e .`, or `python setup.py build_ext --inplace` in the repository), or, if "
        "l2r_cuda is installed elsewhere, run from a directory that is not the repository root so "
        "that the source tree does not shadow the installed package.") from _exc


def library_op(name: str):
    """The OpOverloadPacket ``torch.ops.l2r_cuda.<name>``."""
    return getattr(torch.ops.l2r_cuda, name)


def cuda_built() -> bool:
    """True when this build compiled the CUDA kernels (decided when it was built, not by a GPU probe)."""
    return bool(torch.ops.l2r_cuda.cuda_built())


def cuda_backend() -> Optional[str]:
    """Which kernels serve CUDA tensors: ``"nvcc"`` (compiled into this build), ``"nvrtc"``
    (l2r_cuda.jit: the same sources compiled at run time, for builds without CUDA kernels), or
    ``None`` (CUDA tensors raise; ``l2r_cuda.jit.status()`` says why)."""
    return _C.plan_executor_name()


def has_kernel(op: str, device_type: str) -> bool:
    """Whether ``l2r_cuda::<op>`` has a kernel for tensors of ``device_type`` ('cpu', 'cuda')."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"l2r_cuda::{op}", key)


class OpArgs:
    """The arguments of a call of ``l2r_cuda::<op>`` by their schema names (the schema in
    csrc/registration.cpp is the one list of them: fake kernels and autograd read names, never
    positions)."""

    __slots__ = ("_values",)
    _names_cache: dict = {}

    def __init__(self, op: str, args):
        names = OpArgs._names_cache.get(op)
        if names is None:
            schema = getattr(torch.ops.l2r_cuda, op).default._schema
            names = {a.name: i for i, a in enumerate(schema.arguments)}
            OpArgs._names_cache[op] = names
        object.__setattr__(self, "_values", (names, tuple(args)))

    def __getattr__(self, name):
        names, values = object.__getattribute__(self, "_values")
        return values[names[name]]
