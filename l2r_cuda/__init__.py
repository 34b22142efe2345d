"""l2r_cuda: L2R routing (low-rank routing space, saturated inner-product scoring, multi-anchor
experts) for Mixture-of-Experts layers, with native CPU and CUDA kernels for PyTorch.

    out = l2r_cuda.route(x, proj, anchors, scale, top_k=8)
    permuted, expert_offsets, row_map = l2r_cuda.permute(x, out.indices, num_experts)
    y = l2r_cuda.unpermute(expert_out, row_map, out.weights)

Layers: ``types`` (data types, option defaults) < ``ops`` (native functional API) < ``routers``,
``experts`` < ``moe``. ``l2r_cuda.reference`` holds the same functions in plain PyTorch: it is the
tests' oracle, and no production module imports it.
"""

import logging as _logging
import warnings as _warnings

import torch as _torch

from . import _library  # noqa: F401  (loads the native ops first)
from . import _autograd, _meta  # noqa: F401  (register autograd and fake kernels)
from . import losses, metrics, reference
from ._library import cuda_backend, cuda_built
from .experts import SwiGLUExperts
from .moe import MoE
from .ops import dropped_counts, expert_capacity, permute, route, routing_map, unpermute
from .routers import L2RRouter, LinearRouter
from .types import DEFAULTS, Permutation, RouteConfig, RouteOutput

__version__ = "0.1.0"

__all__ = ["RouteOutput", "RouteConfig", "DEFAULTS", "route", "Permutation", "permute", "unpermute",
           "dropped_counts", "routing_map", "expert_capacity", "L2RRouter", "MoE", "LinearRouter", "SwiGLUExperts", "losses",
           "metrics", "reference", "cuda_built", "cuda_backend", "__version__"]

if not cuda_built():
    # No nvcc kernels: on a GPU machine the same kernels compiled by NVRTC serve CUDA tensors when
    # cupy is there (l2r_cuda.jit; imported only where a GPU could use it).
    _nvrtc = False
    if _torch.cuda.is_available():
        from .jit import backend as _jit_backend

        _nvrtc = _jit_backend.install_if_possible()
    if not _nvrtc:
        _msg = ("l2r_cuda: CPU-only build (no CUDA kernels compiled); every op runs on CPU, CUDA tensors "
                "raise. Install cupy for NVRTC-compiled kernels (l2r_cuda.jit.status() says what is "
                "missing), or rebuild with a CUDA toolkit.")
        if _torch.version.cuda is not None:
            _warnings.warn(_msg, stacklevel=2)
        else:
            _logging.getLogger(__name__).info(_msg)
