"""Shared fixtures: `backend` runs a test once per route backend (tests/backends.py)."""

from __future__ import annotations

import pytest

import backends


@pytest.fixture(params=[pytest.param(name, marks=[pytest.mark.cuda] if name in backends.GPU_BACKENDS else [])
                        for name in backends.BACKEND_NAMES])
def backend(request):
    why = backends.available(request.param)
    if why is not None:
        pytest.skip(why)
    b = backends.make(request.param)
    with b.select():
        yield b
