"""The command line of every experiment: which arms and seeds to train, in how many worker processes,
with a resumable checkpoint (``runs.jsonl``), then the report (:mod:`experiments.report`).

    python -m experiments.<task>                  # the full grid, pre-registered (OUT/PREREGISTRATION.md)
    python -m experiments.<task> --quick          # smoke test: 2 seeds, 5 arms, a few steps
    python -m experiments.<task> --pilot-scale    # the pilot that picks L2R's scale init (seeds 100-102)
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import time
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import arms as arms_mod
from .arms import Arm
from .report import write_pilot_report, write_report
from .training import TrainConfig, train_one

PILOT_FIRST_SEED = 100
PILOT_SEEDS = 3


@dataclass(frozen=True)
class Experiment:
    module: str  # importable name, for the worker processes
    make_task: Callable[..., object]  # make_task(quick=...) -> the task
    out_dir: str
    full: TrainConfig
    quick: TrainConfig
    full_seeds: int
    init_scale: float  # L2R's scale init, chosen by the pilot (PREREGISTRATION.md)


_TASKS: Dict[str, object] = {}


def _task(module: str, quick: bool):
    key = f"{module}:{quick}"
    if key not in _TASKS:
        _TASKS[key] = importlib.import_module(module).EXPERIMENT.make_task(quick=quick)
    return _TASKS[key]


def _worker_init():
    torch.set_num_threads(1)


def _job(module: str, quick: bool, arm: Arm, seed: int, hp: TrainConfig, keep_points: bool) -> dict:
    return train_one(_task(module, quick), arm, seed, hp, keep_points=keep_points)


def load_checkpoint(path: str) -> List[dict]:
    """Runs saved so far in ``runs.jsonl`` (one JSON object per finished run)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _wait_while(path: Optional[str]) -> float:
    """Block while ``path`` exists (polling every 60 s); return the seconds waited."""
    waited = 0.0
    while path and os.path.exists(path):
        print(f"{path} exists: waiting", flush=True)
        time.sleep(60)
        waited += 60
    return waited


def _job_order(arms: Sequence[Arm], seeds: Sequence[int]) -> Dict[tuple, int]:
    """Position of each (arm name, seed) among the jobs: seed-major, arms in grid order."""
    return {(a.name, s): i for i, (s, a) in enumerate((s, a) for s in seeds for a in arms)}


def run_all(module: str, quick: bool, arms: Sequence[Arm], seeds: Sequence[int], hp: TrainConfig, workers: int,
            checkpoint: str, resume: bool, pause_while: Optional[str] = None) -> tuple:
    """Train every (arm, seed), seed-major; each finished run is appended to ``checkpoint`` so an
    interrupted grid can be resumed. Returns the runs (in job order) and the seconds spent paused."""
    from tqdm.auto import tqdm

    jobs = [(arm, seed) for seed in seeds for arm in arms]
    keep = {(a.name, s): s == seeds[0] and a.router == "l2r" and a.rank == 2 for a, s in jobs}
    wanted = {(a.name, s) for a, s in jobs}
    results = [r for r in load_checkpoint(checkpoint) if (r["arm"], r["seed"]) in wanted] if resume else []
    if not resume and os.path.exists(checkpoint):
        os.remove(checkpoint)
    done = {(r["arm"], r["seed"]) for r in results}
    left = [(a, s) for a, s in jobs if (a.name, s) not in done]
    bar = tqdm(total=len(jobs), initial=len(done), desc="runs", dynamic_ncols=True)
    paused = 0.0

    def record(result: dict) -> None:
        results.append(result)
        with open(checkpoint, "a") as f:
            f.write(json.dumps(result) + "\n")
        bar.set_postfix(last=f"{result['arm']} s{result['seed']}")
        bar.update(1)

    if workers <= 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the worker processes' numerics; these models gain little from threads
        try:
            for arm, seed in left:
                paused += _wait_while(pause_while)
                record(_job(module, quick, arm, seed, hp, keep[(arm.name, seed)]))
        finally:
            torch.set_num_threads(threads)
    elif left:
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init) as pool:
            queue, running = list(left), set()
            while queue or running:
                pausing = pause_while is not None and os.path.exists(pause_while)
                if not running:
                    paused += _wait_while(pause_while)
                    pausing = False
                while queue and len(running) < workers and not pausing:  # when pausing, only drain
                    arm, seed = queue.pop(0)
                    running.add(pool.submit(_job, module, quick, arm, seed, hp, keep[(arm.name, seed)]))
                finished, running = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    record(fut.result())
    bar.close()
    order = _job_order(arms, seeds)
    return sorted(results, key=lambda r: order[(r["arm"], r["seed"])]), paused


def main(exp: Experiment, description: str, argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 seeds, 5 arms, a few steps (CI)")
    parser.add_argument("--pilot-scale", action="store_true",
                        help=f"the pilot: L2R r=2 H=1 at scale inits {arms_mod.SCALE_SWEEP} and linear, seeds "
                             f"{PILOT_FIRST_SEED}..{PILOT_FIRST_SEED + PILOT_SEEDS - 1} (default OUT/pilot_scale)")
    parser.add_argument("--seeds", type=int, default=None, help=f"paired seeds (default {exp.full_seeds}; quick 2)")
    parser.add_argument("--first-seed", type=int, default=None, help="first seed (default 0; pilot 100)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run")
    parser.add_argument("--out", default=None, help=f"output directory (default {exp.out_dir})")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes, one thread each (default: min(2, CPUs); quick: 1, in-process)")
    parser.add_argument("--arms", default=None, help="comma-separated arm names to run (a subset of the grid)")
    parser.add_argument("--resume", action="store_true", help="keep the finished runs of OUT/runs.jsonl")
    parser.add_argument("--report-only", action="store_true", help="no training: report OUT/runs.jsonl")
    parser.add_argument("--pause-while", default=None, metavar="PATH",
                        help="before starting runs, wait while PATH exists (polling every 60 s)")
    args = parser.parse_args(argv)
    hp = replace(exp.quick if args.quick else exp.full)
    if args.steps:
        hp.steps = args.steps
    if args.pilot_scale:
        arms = arms_mod.scale_sweep_arms()
        first, count = PILOT_FIRST_SEED, PILOT_SEEDS
        out = args.out or os.path.join(exp.out_dir, "pilot_scale")
    else:
        arms = (arms_mod.quick_arms if args.quick else arms_mod.full_arms)(exp.init_scale)
        first, count = 0, (2 if args.quick else exp.full_seeds)
        out = args.out or exp.out_dir
    if args.arms:
        chosen = {name.strip() for name in args.arms.split(",")}
        unknown = chosen - {a.name for a in arms}
        if unknown:
            raise SystemExit(f"unknown arms {sorted(unknown)}; known: {[a.name for a in arms]}")
        arms = [a for a in arms if a.name in chosen]
    seeds = list(range(args.first_seed if args.first_seed is not None else first,
                       (args.first_seed if args.first_seed is not None else first) + (args.seeds or count)))
    workers = args.workers if args.workers is not None else (1 if args.quick else min(2, os.cpu_count() or 1))
    task = _task(exp.module, args.quick)
    os.makedirs(out, exist_ok=True)
    checkpoint = os.path.join(out, "runs.jsonl")
    start = time.time()
    load_before = os.getloadavg()
    if args.report_only:
        saved = load_checkpoint(checkpoint)
        have = {(r["arm"], r["seed"]) for r in saved}
        seeds = [s for s in sorted({r["seed"] for r in saved}) if all((a.name, s) in have for a in arms)]
        if not seeds:
            raise SystemExit(f"{checkpoint}: no seed finished for every arm")
        # in a training invocation's job order (seed-major), not the order the runs finished in
        order = _job_order(arms, seeds)
        results = sorted((r for r in saved if (r["arm"], r["seed"]) in order),
                         key=lambda r: order[(r["arm"], r["seed"])])
        timing = {"note": "reported from saved runs (--report-only); wall time unknown", "wall_s": None,
                  "paused_s": 0.0, "start_unix": None, "workers": workers, "loadavg_before": load_before,
                  "loadavg_after": os.getloadavg()}
        previous = os.path.join(out, "results.json")
        if os.path.exists(previous):  # the report of the run that trained them knows its wall time
            with open(previous) as f:
                timing = json.load(f)["meta"]["timing"]
            if "--report-only" not in timing["note"]:  # idempotent: regenerating again changes nothing
                timing["note"] += "; report regenerated with --report-only"
    else:
        resumed = args.resume and bool(load_checkpoint(checkpoint))
        results, paused = run_all(exp.module, args.quick, arms, seeds, hp, workers, checkpoint, args.resume,
                                  args.pause_while)
        timing = {"note": "wall time of this invocation" + (" (earlier runs resumed)" if resumed else ""),
                  "wall_s": time.time() - start - paused, "paused_s": paused, "start_unix": start,
                  "workers": workers, "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    timing["run_time_sum_s"] = sum(r["train_time_s"] for r in results)
    writer = write_pilot_report if args.pilot_scale else write_report
    summary = writer(task, arms, results, hp, seeds, out, timing, quick=args.quick)
    print(summary)
    return {"out": out, "results": results}
