"""Microbenchmarks of l2r_cuda (run ``python -m benchmarks.route --help``).

Run from a clone, the source tree's ``l2r_cuda`` comes first on ``sys.path``. When it has no built
extension (``l2r_cuda/_C*``) but an installed l2r_cuda does, the installed one is used; when neither
has one, the import stops with a message that says how to build it.
"""

import glob
import importlib.util
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _built(package_dir: str) -> bool:
    return bool(glob.glob(os.path.join(package_dir, "_C*.so")) + glob.glob(os.path.join(package_dir, "_C*.pyd")))


def _prefer_a_built_l2r_cuda() -> None:
    if "l2r_cuda" in sys.modules or not os.path.isdir(os.path.join(_ROOT, "l2r_cuda")):
        return
    if _built(os.path.join(_ROOT, "l2r_cuda")):
        return
    here = {os.path.abspath(p or os.curdir) for p in ("", os.curdir, _ROOT)}
    others = [p for p in sys.path if os.path.abspath(p or os.curdir) not in here]
    saved = sys.path[:]
    sys.path[:] = others
    try:  # also finds editable installs, whose finders sit on sys.meta_path
        spec = importlib.util.find_spec("l2r_cuda")
    finally:
        sys.path[:] = saved
    locations = (spec.submodule_search_locations or []) if spec is not None else []
    if any(_built(d) for d in locations):
        sys.path[:] = others  # the installed, built l2r_cuda; else l2r_cuda's import says what to do


_prefer_a_built_l2r_cuda()
