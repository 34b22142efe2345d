"""Arrays of other libraries in and out of the native functional API, without copies: cupy arrays
(and any other ``__dlpack__`` array, numpy's included) go into :func:`l2r_cuda.route`,
:func:`l2r_cuda.permute` etc. through DLPack, and the results come back as arrays of the same
library. DLPack's stream handshake orders the work: torch waits for the producer's current stream
on the way in, the consumer's stream waits for torch's on the way out.

Autograd stays a torch matter: the results of a call with foreign arrays are plain arrays, detached
from any graph (torch parameters passed with them are read, not trained). To train, call the ops with
torch tensors (``torch.from_dlpack(cupy_array)`` is zero-copy too) and convert the loss's inputs,
not the ops' outputs.
"""

from __future__ import annotations

import functools
import itertools
import sys
from typing import Any, Callable

import torch
from torch import Tensor

__all__ = ["is_foreign_array", "dlpack_io"]


def is_foreign_array(x: Any) -> bool:
    """A DLPack-exporting array that is not a torch tensor (cupy.ndarray, numpy.ndarray, ...)."""
    return not isinstance(x, Tensor) and hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__")


def _from_dlpack_of(array: Any) -> Callable:
    """``from_dlpack`` of the library ``array`` comes from (cupy.from_dlpack, numpy.from_dlpack)."""
    library = sys.modules.get(type(array).__module__.split(".")[0])
    convert = getattr(library, "from_dlpack", None)
    if convert is None:
        raise TypeError(f"l2r_cuda: cannot return results as {type(array).__module__}.{type(array).__name__}: "
                        f"the module {type(array).__module__.split('.')[0]!r} has no from_dlpack")
    return convert


def _to_library(value: Any, convert: Callable) -> Any:
    if isinstance(value, Tensor):
        return convert(value.detach())
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # RouteOutput, Permutation
        return type(value)(*(_to_library(v, convert) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_to_library(v, convert) for v in value)
    return value


# Types that are never foreign arrays.
_PLAIN_TYPES = frozenset({Tensor, torch.nn.Parameter, int, float, bool, str, type(None)})


def dlpack_io(fn: Callable) -> Callable:
    """Wraps an op of the functional API: foreign arrays among its arguments become tensors
    (zero-copy, ``torch.from_dlpack``); when there was one, the tensors of the result go back to
    the library of the first of them (zero-copy). Calls with tensors only are unchanged."""

    @functools.wraps(fn)
    def with_dlpack(*args, **kwargs):
        # Arguments of the common types are settled by their type alone: this check runs on every
        # call, and a one-token route() costs only a few microseconds in all.
        first = None
        for a in itertools.chain(args, kwargs.values()) if kwargs else args:
            if type(a) not in _PLAIN_TYPES and is_foreign_array(a):
                first = a
                break
        if first is None:
            return fn(*args, **kwargs)
        args = tuple(torch.from_dlpack(a) if is_foreign_array(a) else a for a in args)
        kwargs = {k: torch.from_dlpack(v) if is_foreign_array(v) else v for k, v in kwargs.items()}
        return _to_library(fn(*args, **kwargs), _from_dlpack_of(first))

    return with_dlpack
