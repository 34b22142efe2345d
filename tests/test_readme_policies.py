"""The code blocks of the README's "Routing policies" section run as written."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _section_blocks(title: str) -> list:
    text = README.read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    section = text[start:end if end >= 0 else len(text)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


BLOCKS = _section_blocks("Routing policies")


def test_the_section_has_code():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_routing_policies_block_runs(index):
    exec(compile(BLOCKS[index], f"README.md:routing-policies[{index}]", "exec"), {"__name__": "__readme__"})
