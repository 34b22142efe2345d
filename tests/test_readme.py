"""Every fenced code block of README.md does what it says: each ```python block runs as written (in
a fresh namespace, in a temporary working directory); each ```bash block names commands that exist
(scripts that are there, modules that import and accept the flags given, executables on PATH).

A python block directly preceded by ``<!-- skip-test: reason -->`` is skipped with that reason (for
what needs hardware this machine lacks); keep such marks rare and honest.
"""

import importlib.metadata
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SKIP = re.compile(r"<!--\s*skip-test:\s*(.+?)\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")
# Optional dependencies: a block that imports one skips when it is not installed (CI installs all).
OPTIONAL = ("transformers", "matplotlib", "sklearn", "tqdm")


def readme_blocks():
    """``(language, first line number, source, skip reason or None)`` of every fenced block."""
    lines = README.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start = i
        j = i + 1
        while not lines[j].startswith("```"):
            j += 1
        skip = SKIP.search(lines[start - 1]) if start > 0 else None
        blocks.append((m.group(1), start + 1, "\n".join(lines[start + 1:j]) + "\n", skip and skip.group(1)))
        i = j + 1
    return blocks


BLOCKS = readme_blocks()
PYTHON = [b for b in BLOCKS if b[0] == "python"]
BASH = [b for b in BLOCKS if b[0] == "bash"]


def test_readme_has_blocks_and_few_skips():
    assert len(PYTHON) >= 3 and len(BASH) >= 3
    assert sum(b[3] is not None for b in PYTHON) <= 1, "skip marks must stay rare"
    assert all(b[3] is None for b in BASH), "bash blocks are checked, not skipped"


@pytest.mark.parametrize("block", PYTHON, ids=[f"line{b[1]}" for b in PYTHON])
def test_python_block_runs(block, tmp_path, monkeypatch):
    _, line, source, skip = block
    if skip:
        pytest.skip(skip)
    for name in OPTIONAL:
        if re.search(rf"^\s*(import|from)\s+{name}\b|^\s*import .*\b{name}\b", source, re.M):
            pytest.importorskip(name)
    monkeypatch.chdir(tmp_path)
    exec(compile(source, f"README.md:{line}", "exec"), {"__name__": "__readme__"})


def _module_help(module: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, f"python -m {module} --help failed:\n{out.stderr}"
    return out.stdout


def _pip_installed() -> bool:
    """From pip's installed metadata, not importlib.util.find_spec("pip"): setuptools'
    _distutils_hack hooks find_spec for "pip" and puts the standard library's distutils back for the
    rest of the process, after which every import of setuptools fails with an AssertionError (the
    benchmark smoke test, run after this file in one pytest process, had every row in error)."""
    try:
        importlib.metadata.version("pip")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _check_command(words):
    cmd, args = words[0], words[1:]
    if cmd == "bash":
        assert (ROOT / args[0]).is_file(), f"bash {args[0]}: no such script"
    elif cmd in ("python", "python3"):
        if args[0] == "-m":
            module, flags = args[1], [a.split("=")[0] for a in args[2:] if a.startswith("--")]
            if module == "pip":
                assert _pip_installed()
                return
            assert importlib.util.find_spec(module.split(".")[0]) is not None, f"no module {module}"
            if module != "pytest":
                usage = _module_help(module)
                for flag in flags:
                    assert flag in usage, f"python -m {module}: no option {flag}"
        else:
            assert (ROOT / args[0]).is_file(), f"python {args[0]}: no such file"
    elif cmd == "pip":
        assert _pip_installed() and args[0] in ("install", "uninstall")
    elif cmd == "torchrun":
        assert importlib.util.find_spec("torch.distributed.run") is not None
    else:
        assert shutil.which(cmd) is not None, f"{cmd}: not on PATH"


@pytest.mark.parametrize("block", BASH, ids=[f"line{b[1]}" for b in BASH])
def test_bash_block_commands_exist(block):
    _, _, source, _ = block
    commands = [line.split(" #")[0].strip() for line in source.splitlines()]
    commands = [c for c in commands if c and not c.startswith("#")]
    assert commands
    for command in commands:
        _check_command(shlex.split(command))
