"""``l2r_cuda.reference`` (the pure-PyTorch oracle) without the built extension: the emulated-CUDA
tests must run where ``l2r_cuda._C`` was never built. The package's modules are loaded under an
alias package whose ``__init__`` is not run, so ``reference``'s relative imports (``.types``)
resolve and nothing native is loaded."""

from __future__ import annotations

import importlib
import importlib.util
import pathlib
import sys

_PACKAGE_DIR = pathlib.Path(__file__).resolve().parents[1] / "l2r_cuda"
_ALIAS = "l2r_oracle"


def _alias_package():
    if _ALIAS not in sys.modules:
        spec = importlib.util.spec_from_loader(_ALIAS, loader=None, is_package=True)
        package = importlib.util.module_from_spec(spec)
        package.__path__ = [str(_PACKAGE_DIR)]
        sys.modules[_ALIAS] = package
    return sys.modules[_ALIAS]


def load(module: str):
    """``l2r_cuda.<module>`` loaded from source without running ``l2r_cuda/__init__.py``."""
    _alias_package()
    return importlib.import_module(f"{_ALIAS}.{module}")


reference = load("reference")
