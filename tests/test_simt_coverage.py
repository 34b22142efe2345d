"""Coverage by construction: every CUDA kernel instantiation the launchers can dispatch to ran in
the emulated tests of this session. Reachable: the functions in the emulator build's symbol table
(nm) named like a kernel a launch site names (a template kernel is instantiated exactly where a
launch names it); exercised: the instantiations the emulator's launch path saw (by function
address). Runs last (marker simt_coverage, tests/conftest.py) and only when every emulated test of
the kernel's files was selected."""
from __future__ import annotations

import pathlib
import sys

import pytest

import backends  # noqa: E402  (tests/: the simt route backend)

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.simt import harness as simt  # noqa: E402
from tests.simt.drivers import permute as permute_emu  # noqa: E402

pytestmark = [pytest.mark.simt_coverage,
              pytest.mark.skipif(not simt.have_compiler(), reason="g++ not available")]

SUITES = {
    "route": (backends.simt_library, ["test_route.py", "test_route_cuda_emulated.py",
                                      "test_route_cuda_emulated_paths.py"]),
    "permute": (permute_emu.build, ["test_permute_cuda_emulated.py", "test_permute_cuda_emulated_paths.py"]),
}


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_every_reachable_kernel_instantiation_ran(request, suite):
    build, files = SUITES[suite]
    collected = getattr(request.config, "_simt_collected", {})
    selected = getattr(request.config, "_simt_selected", {})
    partial = [f for f in files if not collected.get(f) or selected.get(f) != collected.get(f)]
    if partial:
        pytest.skip(f"needs every test of {', '.join(partial)} in the same session")
    lib = build()
    reachable = simt.kernel_instantiations(lib)
    ran = set(simt.launched_kernels(lib))
    assert reachable, "no kernel instantiation found in the emulator build's symbols"
    assert ran <= reachable, f"launched kernels outside the reachable set: {sorted(ran - reachable)}"
    missing = sorted(reachable - ran)
    assert not missing, f"{len(missing)} of {len(reachable)} reachable {suite} kernel instantiations never ran:\n  " + \
        "\n  ".join(missing)
