"""Shared fixtures and session hooks.

`backend` runs a test once per route backend (tests/backends.py). The SIMT coverage test
(tests/test_simt_coverage.py, marker `simt_coverage`) compares the kernel instantiations the
emulated tests launched with those the launchers can reach, so it runs after every other test and
needs to know which emulated tests this session selected."""

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


def pytest_configure(config):
    config.addinivalue_line("markers", "simt_coverage: runs last; inspects the launches of the emulated tests")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    # Before -k / -m deselection: how many tests each file has.
    config._simt_collected = {}
    for item in items:
        name = item.path.name
        config._simt_collected[name] = config._simt_collected.get(name, 0) + 1
    late = [i for i in items if i.get_closest_marker("simt_coverage")]
    items[:] = [i for i in items if not i.get_closest_marker("simt_coverage")] + late


def pytest_collection_finish(session):
    # After deselection: how many tests of each file will run.
    session.config._simt_selected = {}
    for item in session.items:
        name = item.path.name
        session.config._simt_selected[name] = session.config._simt_selected.get(name, 0) + 1
