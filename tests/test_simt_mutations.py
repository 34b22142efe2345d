"""The mutation suite (tests/simt/mutate.py): its catalogue still matches the kernel sources
(every anchor occurs as often as it says: it fails here, loudly, when a source changes under it),
it covers the bug classes the emulated tests used to miss, and the fixed CI sample is killed."""
from __future__ import annotations

import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.simt import harness as simt  # noqa: E402
from tests.simt import mutate  # noqa: E402
from tests.simt.mutations import CATALOGUE, CI_SAMPLE, by_id  # noqa: E402


def test_every_anchor_matches_the_sources():
    assert mutate.check_anchors(CATALOGUE) == []


def test_catalogue_covers_the_bug_classes():
    table = by_id()
    assert len(table) >= 40
    classes = {m.klass for m in CATALOGUE}
    assert {"barrier", "syncwarp", "shuffle", "tail", "stride", "lost-update", "state", "dispatch", "alignment",
            "nan-order"} <= classes
    assert all(m.why for m in CATALOGUE)
    assert set(CI_SAMPLE) <= set(table) and not any(table[i].equivalent for i in CI_SAMPLE)


def test_a_broken_anchor_is_reported(tmp_path):
    m = CATALOGUE[0]
    (tmp_path / m.file).parent.mkdir(parents=True)
    (tmp_path / m.file).write_text("// the source changed\n")
    problems = mutate.check_anchors([m], root=tmp_path)
    assert len(problems) == 1 and "anchor found 0 times" in problems[0]


@pytest.mark.slow
@pytest.mark.skipif(not simt.have_compiler(), reason="g++ not available")
def test_ci_sample_is_killed(capsys):
    assert mutate.main(["--sample", "ci"]) == 0, capsys.readouterr().out
