"""Mutation testing of the CUDA kernels on the SIMT emulator: applies each mutation of the
catalogue (tests/simt/mutations.py) to a copy of the sources, one at a time, runs the emulated
kernel tests of the mutated file on it, and reports which mutants the tests kill.

    python -m tests.simt.mutate                  # the full catalogue
    python -m tests.simt.mutate --sample ci      # the fixed CI sample (CI runs it, within 5 minutes)
    python -m tests.simt.mutate --only ID [ID ...]
    python -m tests.simt.mutate --list           # the catalogue
    python -m tests.simt.mutate --check-anchors  # only check that every anchor still matches
    python -m tests.simt.mutate --without-path-tests --no-sanitize   # what the basic tests alone kill

A mutant is killed when a test fails on it (wrong result, memcheck/racecheck report, deadlock,
hang past the timeout). Equivalent mutants (listed with their reason) are not run and not counted.
Exit status: 0 when every counted mutant is killed (or the kill rate reaches --min-kill-rate),
1 when not, 2 when the catalogue is broken (an anchor that no longer matches, a mutant that does
not build, tests failing on the unmutated sources).

The copy lives in tests/simt/.mutants/work (same path every run, so the emulator's build cache in
tests/simt/.mutants/build keeps the unmutated libraries between mutants).
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.simt.mutations import CATALOGUE, CI_SAMPLE, TESTS, Mutation, by_id  # noqa: E402
else:
    from .mutations import CATALOGUE, CI_SAMPLE, TESTS, Mutation, by_id

ROOT = Path(__file__).resolve().parents[2]
MUTANTS = ROOT / "tests" / "simt" / ".mutants"
COPY = ["csrc", "l2r_cuda", "tests", "pyproject.toml"]
IGNORE = shutil.ignore_patterns(".build", ".mutants", "__pycache__", "*.so", "*.pyc", ".pytest_cache")


class CatalogueError(RuntimeError):
    pass


@dataclass
class Outcome:
    id: str
    status: str  # killed | survived | equivalent | stillborn
    detail: str = ""
    seconds: float = 0.0


def check_anchors(muts: list[Mutation], root: Path = ROOT) -> list[str]:
    """Every anchor must occur exactly `count` times in its (unmutated) file."""
    problems = []
    for m in muts:
        path = root / m.file
        if not path.exists():
            problems.append(f"{m.id}: {m.file} does not exist")
            continue
        text = path.read_text()
        for find, _ in m.edits:
            n = text.count(find)
            if n != m.count:
                first = find.strip().splitlines()[0][:80]
                problems.append(f"{m.id}: anchor found {n} times in {m.file} (expected {m.count}): {first!r}")
    return problems


def apply(m: Mutation, text: str) -> str:
    for find, replace in m.edits:
        if text.count(find) != m.count:
            raise CatalogueError(f"{m.id}: anchor no longer matches {m.file}")
        text = text.replace(find, replace)
    return text


def prepare_workspace() -> Path:
    work = MUTANTS / "work"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, work / name, ignore=IGNORE)
        elif src.exists():
            shutil.copy2(src, work / name)
    return work


def run_tests(work: Path, suite: list[list[str]], timeout: float, sanitize: bool = True) -> tuple[int, str, float]:
    """Runs the pytest invocations of `suite` in order, stopping at the first that fails."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(work) + os.pathsep + env.get("PYTHONPATH", "")
    env["SIMT_BUILD_DIR"] = str(MUTANTS / "build")
    env["SIMT_SANITIZE"] = "1" if sanitize else "0"  # the kernel tests' default: memory checker on
    t0 = time.time()
    for args in suite:
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--no-header", *args]
        left = timeout - (time.time() - t0)
        try:
            r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=max(left, 1))
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            return -1, out + f"\nTIMEOUT after {timeout:.0f} s", time.time() - t0
        if r.returncode != 0:
            return r.returncode, r.stdout + r.stderr, time.time() - t0
    return 0, "", time.time() - t0


def first_failure(output: str) -> str:
    """The first failing test and what failed in it (a checker report or an assertion)."""
    crash = re.search(r"Fatal Python error: (\w[\w ]*)", output)
    if crash:
        return f"crash ({crash.group(1).strip()})"
    m = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.M)
    if not m:
        return output.strip().splitlines()[-1] if output.strip() else "?"
    test = m.group(1).split("/")[-1]
    section = output
    sm = re.search(r"^_{3,} .*? _{3,}$(.*?)(?=^_{3,} |^=+ short test summary)", output, re.M | re.S)
    if sm:
        section = sm.group(1)
    reason = "failed"
    for tag in ("SIMT memcheck", "SIMT racecheck", "SIMT deadlock", "SIMT error", "Mismatched elements",
                "not close", "AssertionError", "Error"):
        if tag in section:
            reason = tag
            break
    return f"{test} ({reason})"


def run(muts: list[Mutation], timeout: float, log=print, path_tests: bool = True,
        sanitize: bool = True) -> list[Outcome]:
    """path_tests=False: without the *_paths.py tests, sanitize=False: without the memory checker
    (both to measure what each adds)."""
    def suite_of(m: Mutation) -> list[list[str]]:
        suite = [[a for a in args if path_tests or not a.endswith("_paths.py")] for args in TESTS[m.file]]
        return [args for args in suite if any(a.endswith(".py") for a in args)]
    problems = check_anchors(muts)
    if problems:
        raise CatalogueError("anchors no longer match the sources (re-target the catalogue):\n  " +
                             "\n  ".join(problems))
    MUTANTS.mkdir(parents=True, exist_ok=True)
    with open(MUTANTS / "lock", "w") as lock:  # one run at a time: the workspace path is fixed
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _run_locked(muts, timeout, log, suite_of, sanitize)


def _run_locked(muts, timeout, log, suite_of, sanitize) -> list[Outcome]:
    work = prepare_workspace()
    outcomes = []
    def key(suite):
        return tuple(tuple(args) for args in suite)

    suites = {key(suite_of(m)): suite_of(m) for m in muts if not m.equivalent}
    baseline_s = {}
    for k, suite in suites.items():  # the unmutated sources must pass (and warm the build cache)
        rc, out, secs = run_tests(work, suite, timeout=max(timeout, 1800), sanitize=sanitize)
        names = " + ".join(" ".join(args) for args in suite)
        if rc != 0:
            raise CatalogueError(f"tests fail on the unmutated sources ({names}):\n{out[-3000:]}")
        baseline_s[k] = secs
        log(f"baseline {names}: passed in {secs:.0f} s")
    for m in muts:
        if m.equivalent:
            outcomes.append(Outcome(m.id, "equivalent", m.equivalent))
            log(f"{'equivalent':10s} {m.id}: {m.equivalent}")
            continue
        pristine = (ROOT / m.file).read_text()
        target = work / m.file
        target.write_text(apply(m, pristine))
        try:
            limit = min(timeout, 3 * baseline_s[key(suite_of(m))] + 120)
            rc, out, secs = run_tests(work, suite_of(m), timeout=limit, sanitize=sanitize)
        finally:
            target.write_text(pristine)
        if rc == 0:
            o = Outcome(m.id, "survived", "every test passed", secs)
        elif "BuildError" in out and "command failed" in out:
            o = Outcome(m.id, "stillborn", "the mutant does not compile", secs)
        elif rc == -1:
            o = Outcome(m.id, "killed", "timeout (hang)", secs)
        else:
            o = Outcome(m.id, "killed", first_failure(out), secs)
        outcomes.append(o)
        log(f"{o.status:10s} {m.id} [{m.klass}] {o.seconds:.0f} s: {o.detail}")
    return outcomes


def summary(outcomes: list[Outcome], muts: list[Mutation]) -> tuple[str, float]:
    klass = {m.id: m.klass for m in muts}
    counted = [o for o in outcomes if o.status in ("killed", "survived")]
    killed = [o for o in counted if o.status == "killed"]
    rate = 100.0 * len(killed) / len(counted) if counted else 100.0
    lines = [f"mutants: {len(outcomes)} ({len(counted)} counted, "
             f"{sum(o.status == 'equivalent' for o in outcomes)} equivalent, "
             f"{sum(o.status == 'stillborn' for o in outcomes)} stillborn)",
             f"killed: {len(killed)} / {len(counted)} = {rate:.1f} %"]
    survivors = [o for o in counted if o.status == "survived"]
    if survivors:
        lines.append("survivors:")
        lines += [f"  {o.id} [{klass[o.id]}]" for o in survivors]
    eq = [o for o in outcomes if o.status == "equivalent"]
    if eq:
        lines.append("equivalent:")
        lines += [f"  {o.id}: {o.detail}" for o in eq]
    still = [o for o in outcomes if o.status == "stillborn"]
    if still:
        lines.append("stillborn (catalogue errors):")
        lines += [f"  {o.id}" for o in still]
    return "\n".join(lines), rate


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.simt.mutate", description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--sample", choices=["ci"], help="the fixed CI sample")
    g.add_argument("--only", nargs="+", metavar="ID", help="these mutations only")
    p.add_argument("--list", action="store_true", help="print the catalogue and exit")
    p.add_argument("--check-anchors", action="store_true", help="only check the anchors")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant at most")
    p.add_argument("--min-kill-rate", type=float, default=100.0, help="exit 0 at or above this kill rate (%%)")
    p.add_argument("--json", help="write the outcomes to this file")
    p.add_argument("--without-path-tests", action="store_true",
                   help="leave out the *_paths.py tests (to measure what they add)")
    p.add_argument("--no-sanitize", action="store_true",
                   help="run the kernel tests without the memory checker (to measure what it adds)")
    args = p.parse_args(argv)
    table = by_id()
    if args.sample == "ci":
        muts = [table[i] for i in CI_SAMPLE]
    elif args.only:
        unknown = [i for i in args.only if i not in table]
        if unknown:
            p.error(f"unknown mutation ids: {unknown}")
        muts = [table[i] for i in args.only]
    else:
        muts = list(CATALOGUE)
    if args.list:
        for m in muts:
            print(f"{m.id:45s} {m.klass:12s} {m.file}: {m.why}" + (f" [equivalent: {m.equivalent}]" if m.equivalent else ""))
        return 0
    if args.check_anchors:
        problems = check_anchors(muts)
        for pr in problems:
            print(pr, file=sys.stderr)
        print(f"{len(muts)} mutations, {len(problems)} broken anchors")
        return 2 if problems else 0
    t0 = time.time()
    try:
        outcomes = run(muts, args.timeout, log=lambda s: print(s, flush=True),
                       path_tests=not args.without_path_tests, sanitize=not args.no_sanitize)
    except CatalogueError as e:
        print(f"catalogue error: {e}", file=sys.stderr)
        return 2
    text, rate = summary(outcomes, muts)
    print(text)
    print(f"total {time.time() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps([o.__dict__ for o in outcomes], indent=1))
    if any(o.status == "stillborn" for o in outcomes):
        return 2
    return 0 if rate >= args.min_kill_rate else 1


if __name__ == "__main__":
    sys.exit(main())
