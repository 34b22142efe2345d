"""Microbenchmark: L2R routing (``l2r_cuda.route``) against linear gating, on real MoE shapes.

    python -m benchmarks.route [--quick | --smoke] [--out benchmarks/results] [options]
    python benchmarks/bench_route.py ...                       (the same)

Sweeps model shapes (OLMoE, Qwen3-30B-A3B, Mixtral-8x7B, DeepSeek-V3, Llama-4-Scout), L2R rank r and
anchors per expert H, token counts from decode (T=1) to training batches, fp32/bf16, forward
(inference) and forward+backward. Contenders (see ``benchmarks/_contenders.py``): ``l2r_native``,
``l2r_ref`` (eager reference), ``l2r_ref_compiled``, ``linear`` (x W^T in x's dtype, as HF models
do), ``linear_fp32`` (the float32 router, 16-bit runs), ``linear_compiled``, ``cosine``, and
``read_x`` (one reduction over x: the memory-read floor every router pays).

Trust: the load of the machine is recorded with every run (start, every measured slot, end) and a
busy machine is reported (``--strict`` refuses to time on one); the contenders of one (model, dtype,
T, mode) are timed interleaved, block by block, and reported as median and IQR; every contender is
checked against its oracle at every timed T, tie-aware. Output: a markdown table on stdout,
``route.csv``, ``route.md``, ``route.png`` (when matplotlib is installed) and ``summary.md``
(machine, acceptance table, native vs reference on every row, static CUDA kernel figures when a
``ptxas_<arch>.md`` is present) in ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import glob
import itertools
import os
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks import _contenders as C
from benchmarks import _timing

ACCEPTANCE = {"model": "olmoe", "T": 8192, "r": 8, "H": 4, "dtype": "fp32"}
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

PRESETS = {
    # The full sweep of the issue. On a CPU the time cap (--max-call-s) drops the slowest cases.
    "full": dict(models=list(C.MODELS), tokens=[1, 16, 256, 4096, 8192, 16384], configs=None,
                 ranks=[2, 8, 32], anchors=[1, 4], dtypes=["fp32", "bf16"], modes=["fwd", "fwdbwd"],
                 compile_scope="all", min_run_time=1.0, min_repeats=5),
    # A few minutes on a 2-core CPU (cold torch.compile caches included). Compiled contenders only
    # at the acceptance shape/config in fp32 and T >= 2 (one dynamic-batch graph per mode).
    # Mixtral (d=4096) stops at T=2048 to keep the run short; OLMoE reaches the acceptance T=8192.
    "quick": dict(models=["olmoe", "mixtral"], tokens=[1, 256, 8192], tokens_by_model={"mixtral": [1, 256, 2048]},
                  configs=[(8, 4), (2, 1)],
                  dtypes=["fp32", "bf16"], modes=["fwd", "fwdbwd"], compile_scope="acceptance",
                  min_run_time=0.15, min_repeats=3),
    # Seconds: a test of the tooling, not a measurement.
    "smoke": dict(models=["olmoe"], tokens=[16], configs=[(8, 4)], dtypes=["fp32"],
                  modes=["fwd", "fwdbwd"], compile_scope="none", min_run_time=0.0, min_repeats=1, threads=1),
}


# ----------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.route", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="short sweep (a few minutes on a laptop CPU)")
    g.add_argument("--smoke", action="store_true", help="seconds-long run that only exercises the tooling")
    p.add_argument("--out", default=DEFAULT_OUT, help="results folder (default: benchmarks/results)")
    p.add_argument("--models", nargs="+", choices=list(C.MODELS), help="model shapes")
    p.add_argument("--tokens", nargs="+", type=int, help="token counts T")
    p.add_argument("--ranks", nargs="+", type=int, help="L2R ranks r (crossed with --anchors)")
    p.add_argument("--anchors", nargs="+", type=int, help="L2R anchors per expert H")
    p.add_argument("--configs", nargs="+", help="explicit L2R (r, H) pairs as RxH, e.g. 8x4 2x1")
    p.add_argument("--dtypes", nargs="+", choices=list(C.DTYPES), help="input/parameter dtypes")
    p.add_argument("--modes", nargs="+", choices=["fwd", "fwdbwd"], help="forward, forward+backward")
    p.add_argument("--contenders", nargs="+", choices=C.CONTENDERS, help="subset of contenders")
    p.add_argument("--compile-scope", choices=["all", "acceptance", "none"],
                   help="where to run the torch.compile contenders (acceptance: OLMoE, r=8, H=4, fp32, T>=2)")
    p.add_argument("--no-compile", action="store_true", help="same as --compile-scope none")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all usable cores)")
    p.add_argument("--min-run-time", type=float, help="seconds of timed calls per measurement")
    p.add_argument("--min-repeats", type=int, help="at least this many timed blocks per measurement")
    p.add_argument("--max-call-s", type=float, default=None,
                   help="skip a case whose single call is predicted (from the previous T) to take longer "
                        "(default: 4 s on CPU, none on GPU)")
    p.add_argument("--mem-fraction", type=float, default=0.5,
                   help="skip a case whose estimated allocation exceeds this fraction of free memory")
    p.add_argument("--check-tokens", type=int, default=8192,
                   help="agreement checks run at every timed T on x, or on this many evenly spaced rows of "
                        "it when T is larger (default 8192)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strict", action="store_true",
                   help="refuse to time on a busy machine, and exit non-zero when an agreement check fails, "
                        "a contender raises, or the machine got busy during the run")
    p.add_argument("--no-scaling", action="store_true",
                   help="do not also time l2r_native with 1 thread at the acceptance shape (thread scaling)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = p.parse_args(argv)

    explicit_tokens = args.tokens is not None
    preset = PRESETS["smoke" if args.smoke else "quick" if args.quick else "full"]
    args.preset = "smoke" if args.smoke else "quick" if args.quick else "full"
    for key in ("models", "tokens", "dtypes", "modes", "min_run_time", "min_repeats"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    # Per-model token lists of the preset, unless --tokens is given.
    args.tokens_by_model = {} if explicit_tokens else dict(preset.get("tokens_by_model", {}))
    if args.compile_scope is None:
        args.compile_scope = preset["compile_scope"]
    if args.no_compile:
        args.compile_scope = "none"
    if args.configs:
        args.configs = [tuple(int(v) for v in c.lower().split("x")) for c in args.configs]
    elif args.ranks or args.anchors:
        args.configs = list(itertools.product(args.ranks or [2, 8, 32], args.anchors or [1, 4]))
    elif preset["configs"] is not None:
        args.configs = list(preset["configs"])
    else:
        args.configs = list(itertools.product(preset["ranks"], preset["anchors"]))
    args.contenders = args.contenders or list(C.CONTENDERS)
    if args.compile_scope == "none":
        args.contenders = [c for c in args.contenders if c not in C.COMPILED]
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.device = torch.device(args.device)
    if args.threads is None:
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        args.threads = preset.get("threads") or usable
    if args.max_call_s is None:
        args.max_call_s = 4.0 if args.device.type == "cpu" else float("inf")
    args.scaling = not args.no_scaling
    return args


# ----------------------------------------------------------------------------------------------
# The sweep


def _compile_here(args, contender: str, model: str, r: int, H: int, dtype: str, T: int) -> bool:
    if contender not in C.COMPILED or args.compile_scope == "none":
        return contender not in C.COMPILED
    if args.compile_scope == "all":
        return True
    acc = ACCEPTANCE
    if model != acc["model"] or dtype != acc["dtype"] or T < 2:
        return False
    return contender == "linear_compiled" or (r, H) == (acc["r"], acc["H"])


def acceptance_T(args) -> Optional[int]:
    """The T of the acceptance rows: 8192 when swept for the acceptance model, else its largest T."""
    model = ACCEPTANCE["model"]
    if model not in args.models:
        return None
    tokens = args.tokens_by_model.get(model, args.tokens)
    return ACCEPTANCE["T"] if ACCEPTANCE["T"] in tokens else max(tokens)


def _at_acceptance(args, model: str, r: int, H: int, T: int) -> bool:
    return model == ACCEPTANCE["model"] and (r, H) == (ACCEPTANCE["r"], ACCEPTANCE["H"]) and T == acceptance_T(args)


def plan_cases(args) -> List[dict]:
    """Every (model, dtype, T, mode, contender, r, H, threads) to run, in execution order; the cases
    of one (model, dtype, T, mode) form a slot, timed interleaved."""
    cases = []
    for model, dtype in itertools.product(args.models, args.dtypes):
        tokens = sorted(args.tokens_by_model.get(model, args.tokens))
        for T, mode, contender in itertools.product(tokens, args.modes, args.contenders):
            base = dict(model=model, dtype=dtype, T=T, mode=mode, contender=contender, threads=args.threads)
            if contender == "read_x":
                if mode == "fwd":
                    cases.append(dict(base, r=0, H=0))
                continue
            if contender == "linear_fp32" and dtype == "fp32":
                continue  # the same as linear
            configs = args.configs if contender in C.L2R_CONTENDERS else [(0, 0)]
            for r, H in configs:
                if _compile_here(args, contender, model, r, H, dtype, T):
                    cases.append(dict(base, r=r, H=H))
                if (contender == "l2r_native" and args.scaling and args.device.type == "cpu" and args.threads > 1
                        and _at_acceptance(args, model, r, H, T)):
                    cases.append(dict(base, r=r, H=H, threads=1))  # thread scaling, same slot
    return cases


def _slots(cases: List[dict]) -> List[List[dict]]:
    out: Dict[tuple, List[dict]] = {}
    for c in cases:
        out.setdefault((c["model"], c["dtype"], c["T"], c["mode"]), []).append(c)
    return list(out.values())


def _progress(total: int, disable: bool):
    try:
        from tqdm import tqdm

        return tqdm(total=total, file=sys.stderr, disable=disable, unit="case", dynamic_ncols=True)
    except ImportError:  # tqdm is optional
        class _Quiet:
            def update(self, n=1):
                pass

            def set_postfix_str(self, text):
                pass

            def close(self):
                pass

        return _Quiet()


def _check_rows(x: torch.Tensor, limit: int) -> torch.Tensor:
    """x, or ``limit`` evenly spaced rows of it."""
    T = x.shape[0]
    if T <= limit:
        return x
    return x[torch.linspace(0, T - 1, limit).round().long().to(x.device)]


def run_sweep(args, log) -> List[dict]:
    device = args.device
    cases = plan_cases(args)
    rows: List[dict] = []
    params_cache: Dict[tuple, list] = {}
    last_time: Dict[tuple, Tuple[int, float]] = {}
    free_mem = _timing.available_memory(device)
    bar = _progress(len(cases), args.no_progress)
    for slot in _slots(cases):
        model, dtype_name, T, mode = (slot[0][k] for k in ("model", "dtype", "T", "mode"))
        m = C.MODELS[model]
        dtype = C.DTYPES[dtype_name]
        s = torch.empty((), dtype=dtype).element_size()
        load = _timing.machine_load(0.2) if device.type == "cpu" else {}
        x = C.make_x(T, m.d, dtype, device, seed=args.seed + T)
        x_leaf = x.detach().clone().requires_grad_(True) if mode == "fwdbwd" else None
        x_check = _check_rows(x, args.check_tokens)
        timers: Dict[int, _timing.BlockTimer] = {}
        slot_rows: Dict[int, dict] = {}
        need_total = 0
        for case in slot:
            contender, r, H, threads = case["contender"], case["r"], case["H"], case["threads"]
            bar.set_postfix_str(f"{model} {dtype_name} T={T} {mode} {contender}" + (f" r={r} H={H}" if r else "")
                                + (f" {threads}t" if threads != args.threads else ""))
            row = dict(model=model, model_name=m.name, d=m.d, E=m.E, k=m.k, r=r or "", H=H or "", T=T,
                       dtype=dtype_name, mode=mode, contender=contender, threads=threads,
                       load_others=load.get("others", ""),
                       load1=load["load_average"][0] if load.get("load_average") else "")
            cost = C.analytic_cost(contender, m, r, H, s, mode)
            row.update({f"{key}_per_token": v for key, v in cost.items() if key != "param_bytes"})
            row["param_bytes"] = cost.get("param_bytes", 0)
            rows.append(row)
            bar.update()
            # Caps: memory (estimate) and time (extrapolated from the previous T of the same series).
            series = (model, dtype_name, mode, contender, r, H, threads)
            need = C.peak_memory_estimate(contender, m, H, s, T, mode)
            if free_mem is not None and need > args.mem_fraction * free_mem:
                row["status"] = f"skipped: needs ~{need / 2**30:.1f} GiB"
                continue
            if series in last_time:
                T0, t0 = last_time[series]  # linear in T from a T large enough not to be all overhead
                est = t0 * T / T0
                if T0 >= 64 and est > args.max_call_s:
                    row["status"] = f"skipped: ~{est:.1f} s/call > --max-call-s"
                    continue
            try:
                if contender == "read_x":
                    for i, (name, fn) in enumerate(C.read_x_steps(x).items()):
                        timers[id(row) + i] = _timing.BlockTimer(fn, device, threads=threads)
                        slot_rows[id(row) + i] = dict(row, note=name)
                    row["check"] = "n/a"
                    continue
                pkey = (contender.replace("_compiled", ""), model, dtype_name, r, H)
                if pkey not in params_cache:
                    params_cache[pkey] = C.make_params(contender, m, r, H, dtype, device, seed=args.seed + 1)
                params = params_cache[pkey]
                t_build = time.perf_counter()  # compiled: the check's forward compiles too
                # Agreement at this T (compiled contenders on x itself: no graph of their own).
                xc = x if contender in C.COMPILED else x_check
                if contender in C.COMPILED and T > 1:
                    torch._dynamo.maybe_mark_dynamic(xc, 0)
                try:
                    ok, msg = C.check_contender(contender, xc, params, m.k, with_grad=mode == "fwdbwd")
                except Exception as exc:
                    ok, msg = False, f"check raised {type(exc).__name__}: {exc}"
                if not ok:
                    log(f"AGREEMENT CHECK FAILED: {contender} {model} {dtype_name} T={T} r={r} H={H}: {msg}")
                row["check"] = "ok" if ok else f"FAIL: {msg}"
                row["check_note"] = msg
                step, inputs = C.make_step(contender, x, params, m.k, mode, seed=args.seed, mark_dynamic=True,
                                           x_leaf=x_leaf)
                warm = 0
                if contender in C.COMPILED:  # compile outside the timed region, and report it
                    step()
                    row["compile_s"] = round(time.perf_counter() - t_build, 2)
                    warm += 1
                if mode == "fwdbwd" and contender not in C.COMPILED and threads == args.threads:
                    _saved_figures(row, step, inputs, T)  # doubles as a warm-up call
                    warm += 1
                timers[id(row)] = _timing.BlockTimer(step, device, threads=threads, warmup=max(1, 2 - warm),
                                                     use_graph=contender in C.GRAPHABLE)
                slot_rows[id(row)] = row
                if mode == "fwdbwd" and device.type == "cuda":
                    _peak_memory(row, step, device)
                if contender == "l2r_native" and threads == args.threads and _at_acceptance(args, model, r, H, T):
                    _acceptance_probes(args, row, step, x, params, m.k, mode, dtype_name)
                need_total += need
            except Exception as exc:
                row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
                log(f"{series} T={T}: {row['status']}")
        # Interleaved timing of the slot (one at a time when together they would not fit in memory).
        together = free_mem is None or need_total <= args.mem_fraction * free_mem
        groups = [list(timers)] if together else [[key] for key in timers]
        for keys in groups:
            if not keys:
                continue
            try:
                meas = _timing.time_interleaved({k: timers[k] for k in keys}, min_run_time=args.min_run_time,
                                                min_repeats=args.min_repeats)
            except Exception as exc:
                for k in keys:
                    slot_rows[k]["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                continue
            for k in keys:
                _store_measurement(slot_rows[k], meas[k])
        _pick_read_x(rows, slot_rows)
        for row in slot_rows.values():
            if row.get("status") == "ok":
                last_time[(model, dtype_name, mode, row["contender"], row["r"], row["H"], row["threads"])] = (
                    T, row["median_s"])
        del timers, x, x_leaf, x_check
    bar.close()
    _derive(rows, device)
    return rows


def _store_measurement(row: dict, meas: _timing.Measurement) -> None:
    row.update(status="ok", timer=meas.timer, median_s=meas.median, iqr_s=meas.iqr, min_s=meas.min,
               max_s=meas.max, p25_s=meas.quantile(0.25), p75_s=meas.quantile(0.75),
               repeats=len(meas.times), calls_per_repeat=meas.number)
    if "note" in meas.extra:
        row["note"] = (row.get("note", "") + " " + meas.extra["note"]).strip()


def _pick_read_x(rows: List[dict], slot_rows: Dict[int, dict]) -> None:
    """read_x is the faster of its reductions: its row takes that one's measurement."""
    for row in rows:
        if row["contender"] != "read_x" or "status" in row:
            continue
        timed = [r for k, r in slot_rows.items() if r.get("contender") == "read_x" and r.get("status") == "ok"
                 and r["T"] == row["T"] and r["model"] == row["model"] and r["dtype"] == row["dtype"]]
        if timed:
            best = min(timed, key=lambda r: r["median_s"])
            row.update({k: v for k, v in best.items() if k not in row or k in ("note",)})
            row["status"] = "ok"


def _acceptance_probes(args, row: dict, step, x, params, k: int, mode: str, dtype_name: str) -> None:
    """At the acceptance shape: 15 identical calls timed one by one (run-to-run stability), and in
    the forward the lane-width / thread-count agreement of the native op."""
    calls = _timing.single_calls(step, 15, threads=row["threads"])
    med = statistics.median(calls)
    row["single_calls_ms"] = " ".join(f"{c * 1e3:.2f}" for c in calls)
    row["max_over_median_15"] = max(calls) / med
    if mode == "fwd" and args.device.type == "cpu":
        ok, msg = C.lane_width_check(x[: min(x.shape[0], 1024)], params, k, threads=sorted({1, args.threads}))
        row["lane_width_check"] = ("ok: " if ok else "FAIL: ") + msg


def _saved_figures(row: dict, step, inputs, T: int) -> None:
    """Bytes autograd saves for backward in one forward+backward (eager contenders only: hooks
    would make dynamo retrace a compiled one)."""
    total, extra = C.saved_bytes(step, inputs)
    row["saved_bytes"] = total
    row["saved_extra_bytes_per_token"] = extra / T


def _peak_memory(row: dict, step, device: torch.device) -> None:
    """CUDA: peak allocation of one (warm) forward+backward above what was allocated before it."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    row["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device) - base


def _derive(rows: List[dict], device: torch.device) -> None:
    """Ratios to the read floor and to linear gating (both at the run's thread count); achieved
    bandwidth and FLOP rate."""
    peak = _timing.peak_bandwidth(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    ok = [r for r in rows if r.get("status") == "ok"]
    threads = max((r["threads"] for r in ok), default=1)
    t = {}
    for row in ok:
        t[(row["model"], row["dtype"], row["T"], row["mode"], row["contender"], row["r"], row["H"],
           row["threads"])] = row["median_s"]
    for row in ok:
        key = (row["model"], row["dtype"], row["T"])
        read = t.get(key + ("fwd", "read_x", "", "", threads))
        lin = t.get(key + (row["mode"], "linear", "", "", threads))
        if read:
            row["vs_read_x"] = row["median_s"] / read
        if lin:
            row["vs_linear"] = row["median_s"] / lin
        if row["contender"] in C.L2R_CONTENDERS and row["contender"] != "l2r_native":
            nat = t.get(key + (row["mode"], "l2r_native", row["r"], row["H"], row["threads"]))
            if nat:
                row["vs_native"] = row["median_s"] / nat
        if "bytes_per_token" in row:
            moved = row["bytes_per_token"] * row["T"] + row["param_bytes"]
            row["achieved_GBps"] = moved / row["median_s"] / 1e9
            row["achieved_GFLOPs"] = row["flops_per_token"] * row["T"] / row["median_s"] / 1e9
            if peak:
                row["pct_peak_bw"] = 100.0 * moved / row["median_s"] / peak


# ----------------------------------------------------------------------------------------------
# Outputs

CSV_FIELDS = ["model", "model_name", "d", "E", "k", "r", "H", "T", "dtype", "mode", "contender", "threads",
              "status", "check", "load_others", "load1", "timer", "median_s", "iqr_s", "p25_s", "p75_s", "min_s", "max_s", "repeats",
              "calls_per_repeat", "vs_read_x", "vs_linear", "vs_native", "bytes_per_token",
              "flops_per_token", "param_bytes", "achieved_GBps", "achieved_GFLOPs", "pct_peak_bw",
              "saved_bytes", "saved_extra_bytes_per_token", "peak_mem_bytes", "compile_s", "max_over_median_15",
              "single_calls_ms", "lane_width_check", "check_note", "note"]


def _fmt_t(s) -> str:
    if s is None or s == "":
        return ""
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def _fmt(v, spec="{:.2f}") -> str:
    return "" if v is None or v == "" else spec.format(v)


def _si(v) -> str:
    if v is None or v == "":
        return ""
    for unit, f in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= f:
            return f"{v / f:.3g}{unit}"
    return f"{v:.3g}"


def markdown_table(rows: List[dict], gpu: bool) -> str:
    head = ["model", "dtype", "mode", "T", "contender", "r×H", "median", "IQR", "×read_x", "×linear",
            "B/tok", "FLOP/tok", "GB/s"] + (["%peak BW", "peak mem"] if gpu else []) + ["saved B/tok", "check", "load"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    threads = max((r["threads"] for r in rows), default=1)
    for r in rows:
        cfg = f"{r['r']}×{r['H']}" if r.get("r") else ""
        name = r["contender"] + (f" ({r['threads']} thread{'s' if r['threads'] > 1 else ''})"
                                 if r["threads"] != threads else "")
        if r.get("status") != "ok":
            cells = [r["model"], r["dtype"], r["mode"], str(r["T"]), name, cfg, r.get("status", "")] + \
                    [""] * (len(head) - 7)
        else:
            cells = [r["model"], r["dtype"], r["mode"], str(r["T"]), name, cfg, _fmt_t(r["median_s"]),
                     _fmt_t(r["iqr_s"]), _fmt(r.get("vs_read_x")), _fmt(r.get("vs_linear")),
                     _si(r.get("bytes_per_token")), _si(r.get("flops_per_token")), _fmt(r.get("achieved_GBps"))]
            if gpu:
                cells += [_fmt(r.get("pct_peak_bw"), "{:.1f}"), _si(r.get("peak_mem_bytes"))]
            cells += [_fmt(r.get("saved_extra_bytes_per_token"), "{:.0f}"), r.get("check", ""), _load_text(r)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def write_csv(rows: List[dict], path: str, info: dict) -> None:
    with open(path, "w", newline="") as f:
        for k, v in info.items():
            f.write(f"# {k}: {v}\n")
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in CSV_FIELDS})


PLOT_STYLE = {
    "read_x": dict(color="black", ls="--", marker=""),
    "linear": dict(color="tab:blue", ls="-", marker="o"),
    "linear_fp32": dict(color="tab:cyan", ls="-", marker="d"),
    "linear_compiled": dict(color="tab:blue", ls=":", marker="s"),
    "cosine": dict(color="tab:purple", ls="-", marker="^"),
    "l2r_native": dict(color="tab:red", ls="-", marker="o"),
    "l2r_ref": dict(color="tab:green", ls="-", marker="v"),
    "l2r_ref_compiled": dict(color="tab:green", ls=":", marker="s"),
}


def plot(rows: List[dict], path: str, title: str) -> Optional[str]:
    """Time vs tokens (log-log), one subplot per model (rows) and dtype/mode (columns), one line per
    contender; L2R contenders at r=8, H=4 when measured (else the first config), other L2R configs
    of the native kernel as thin lines. Raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads = max((r["threads"] for r in rows if r.get("status") == "ok"), default=1)
    ok = [r for r in rows if r.get("status") == "ok" and r["threads"] == threads]
    if not ok:
        return None
    models = list(dict.fromkeys(r["model"] for r in ok))
    panels = list(dict.fromkeys((r["dtype"], r["mode"]) for r in ok))
    cfgs = list(dict.fromkeys((r["r"], r["H"]) for r in ok if r["contender"] in C.L2R_CONTENDERS))
    main_cfg = (8, 4) if (8, 4) in cfgs else (cfgs[0] if cfgs else None)
    fig, axes = plt.subplots(len(models), len(panels), figsize=(4.2 * len(panels), 3.3 * len(models)),
                             squeeze=False, sharex=True)
    for i, model in enumerate(models):
        for j, (dtype, mode) in enumerate(panels):
            ax = axes[i][j]
            sel = [r for r in ok if r["model"] == model and r["dtype"] == dtype and
                   (r["mode"] == mode or r["contender"] == "read_x")]
            for contender in C.CONTENDERS:
                series = {}
                for r in sel:
                    if r["contender"] != contender:
                        continue
                    series.setdefault((r["r"], r["H"]), []).append(r)
                for cfg, pts in series.items():
                    pts.sort(key=lambda r: r["T"])
                    T = [r["T"] for r in pts]
                    y = [r["median_s"] * 1e3 for r in pts]
                    err = [[(r["median_s"] - r["p25_s"]) * 1e3 for r in pts], [(r["p75_s"] - r["median_s"]) * 1e3 for r in pts]]
                    st = dict(PLOT_STYLE[contender])
                    label = contender
                    if contender in C.L2R_CONTENDERS:
                        if cfg != main_cfg:
                            if contender != "l2r_native":
                                continue
                            st.update(lw=0.8, alpha=0.5, marker="")
                            label = f"l2r_native r={cfg[0]} H={cfg[1]}"
                        else:
                            label = f"{contender} r={cfg[0]} H={cfg[1]}"
                    ax.errorbar(T, y, yerr=err, label=label, ms=3.5, capsize=2, **st)
            m = C.MODELS[model]
            ax.set_title(f"{m.name} (d={m.d}, E={m.E}, k={m.k})\n{dtype}, {'forward' if mode == 'fwd' else 'forward+backward'}",
                         fontsize=8)
            ax.set_xscale("log")
            ax.set_yscale("log")
            Ts = [r["T"] for r in ok]
            ax.set_xlim(min(Ts) / 2, max(Ts) * 2)
            ax.grid(True, which="both", alpha=0.3)
            ax.tick_params(labelsize=7)
            if i == len(models) - 1:
                ax.set_xlabel("tokens T", fontsize=8)
            if j == 0:
                ax.set_ylabel("time per call (ms)", fontsize=8)
            ax.legend(fontsize=5.5, loc="upper left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _find(rows, **kw) -> Optional[dict]:
    for r in rows:
        if r.get("status") == "ok" and all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def ptxas_section(out_dir: str) -> str:
    """Static figures of the CUDA kernels from ``ptxas_<arch>.md`` files (written by the CUDA
    compile test), looked up in ``out_dir`` and in benchmarks/results."""
    paths = sorted(set(glob.glob(os.path.join(out_dir, "ptxas_*.md")) + glob.glob(os.path.join(DEFAULT_OUT, "ptxas_*.md"))))
    if not paths:
        return ("No `ptxas_<arch>.md` found in the results folder: the static figures of the CUDA kernels "
                "(registers, shared memory, spills) are absent on this machine (the CUDA compile test writes them).\n")
    parts = []
    for p in paths:
        with open(p) as f:
            parts.append(f"#### {os.path.basename(p)}\n\n{f.read().strip()}\n")
    return "\n".join(parts)


def _load_text(row: Optional[dict]) -> str:
    if not row or row.get("load_others") in ("", None):
        return "n/a"
    return f"{100 * row['load_others']:.0f}% / {row['load1']:.2f}"


def acceptance_table(rows: List[dict], args) -> List[str]:
    """Issue 14's acceptance targets, each with the figure measured in this run, whether it is met,
    and the load the machine had when it was measured (other processes' share of the CPUs / 1-minute
    load average)."""
    a = ACCEPTANCE
    T = acceptance_T(args)
    if T is None:
        return ["The acceptance model was not part of this sweep."]

    def get(contender, dtype, mode, with_cfg=True, threads=None, tokens=None):
        kw = dict(model=a["model"], T=tokens or T, dtype=dtype, mode=mode, contender=contender,
                  threads=threads or args.threads)
        if with_cfg:
            kw.update(r=a["r"], H=a["H"])
        return _find(rows, **kw)

    out = []

    def add(target, value, met, row):
        status = "n/a" if met is None else ("met" if met else "**missed**")
        out.append(f"| {target} | {value} | {status} | {_load_text(row)} |")

    def ratio(num, den):
        return num["median_s"] / den["median_s"] if num and den else None

    nat_f, nat_b = get("l2r_native", "fp32", "fwd"), get("l2r_native", "fp32", "fwdbwd")
    read32 = get("read_x", "fp32", "fwd", False)
    v = ratio(nat_f, read32)
    add("fp32 forward ≤ 2× read-x", f"{v:.2f}× ({_fmt_t(nat_f['median_s'])} vs {_fmt_t(read32['median_s'])})"
        if v else "n/a", v is not None and v <= 2.0 if v else None, nat_f)
    v = ratio(get("linear", "fp32", "fwd", False), nat_f)
    add("fp32 forward ≥ 6× faster than linear gating", f"{v:.2f}×" if v else "n/a", v >= 6.0 if v else None, nat_f)
    nat_bf = get("l2r_native", "bf16", "fwd")
    v = ratio(get("linear", "bf16", "fwd", False), nat_bf)
    v32 = ratio(get("linear_fp32", "bf16", "fwd", False), nat_bf)
    add("bf16 forward ≥ 3× faster than bf16 linear gating (x·Wᵀ in bf16)",
        (f"{v:.2f}×" if v else "n/a") + (f" (fp32 router: {v32:.2f}×)" if v32 else ""), v >= 3.0 if v else None, nat_bf)
    v = ratio(nat_b, read32)
    add("fp32 forward+backward ≤ 8× read-x", f"{v:.2f}× ({_fmt_t(nat_b['median_s'])})" if v else "n/a",
        v <= 8.0 if v else None, nat_b)
    v = ratio(get("linear", "fp32", "fwdbwd", False), nat_b)
    add("fp32 forward+backward ≥ 3× faster than linear forward+backward", f"{v:.2f}×" if v else "n/a",
        v >= 3.0 if v else None, nat_b)
    v = nat_b.get("max_over_median_15") if nat_b else None
    add("fp32 forward+backward: no call of 15 identical calls slower than 1.5× their median",
        f"max / median = {v:.2f} (ms: {nat_b['single_calls_ms']})" if v else "n/a", v <= 1.5 if v else None, nat_b)
    for dtype, mode in (("fp32", "fwd"), ("fp32", "fwdbwd"), ("bf16", "fwd"), ("bf16", "fwdbwd")):
        one = get("l2r_native", dtype, mode, threads=1) if args.threads > 1 else None
        many = get("l2r_native", dtype, mode)
        v = ratio(one, many)
        if v is not None or dtype == "fp32":
            add(f"{args.threads} threads ≥ 1.7× faster than 1 thread, {dtype} {'forward' if mode == 'fwd' else 'forward+backward'}",
                f"{v:.2f}× ({_fmt_t(one['median_s'])} → {_fmt_t(many['median_s'])})" if v else "n/a",
                v >= 1.7 if v else None, many)
    one_tok = get("l2r_native", "fp32", "fwd", tokens=1) if 1 in args.tokens_by_model.get(a["model"], args.tokens) else None
    lin_one = get("linear", "fp32", "fwd", False, tokens=1) if one_tok else None
    add("T=1 forward ≤ 10 µs", _fmt_t(one_tok["median_s"]) if one_tok else "n/a",
        one_tok["median_s"] <= 10e-6 if one_tok else None, one_tok)
    v = ratio(lin_one, one_tok)
    add("T=1 forward not slower than fp32 linear gating", f"{v:.2f}× as fast ({_fmt_t(lin_one['median_s'])} linear)"
        if v else "n/a", v >= 1.0 if v else None, one_tok)
    lw = nat_f.get("lane_width_check") if nat_f else None
    add("results equal across lane widths (tolerance), bitwise per width and thread count", lw or "n/a",
        lw.startswith("ok") if lw else None, nat_f)
    m = C.MODELS[a["model"]]
    head = [f"{m.name} shape (d={m.d}, E={m.E}, k={m.k}), T={T} (T=1 for the decode rows), r={a['r']}, H={a['H']}, "
            f"{args.threads} thread(s), all in this run. Load: other processes' share of the CPUs / 1-minute load "
            "average when the figure's slot was timed.", "",
            "| target | measured | status | load |", "|---|---|---|---|"]
    return head + out


def failed_checks(rows: List[dict]) -> List[dict]:
    """Rows whose agreement check failed (summary.md lists them; --strict exits 1 on any)."""
    return [r for r in rows if str(r.get("check", "")).startswith("FAIL")]


def errored_rows(rows: List[dict]) -> List[dict]:
    """Rows whose contender raised (summary.md lists them; --strict exits 1 on any)."""
    return [r for r in rows if str(r.get("status", "")).startswith("error")]


def summary_markdown(rows: List[dict], info: dict, args, wall_s: float) -> str:
    a = ACCEPTANCE
    T_acc = acceptance_T(args) or a["T"]
    L = ["# L2R routing microbenchmark: summary", ""]
    L.append(f"Command: `{' '.join(['python -m benchmarks.route'] + list(args.argv))}` "
             f"(preset `{args.preset}`, {wall_s:.0f} s wall)")
    if info.get("busy"):
        L += ["", f"**Warning: the machine was busy ({info['busy']}); these timings are not to be trusted.**"]
    L += ["", "## Machine", ""]
    L += [f"- {k}: {v}" for k, v in info.items()]
    L += ["", "Timing: " + ("CUDA events around CUDA-graph replays (eager calls when capture fails; `timer` column)"
                            if args.device.type == "cuda" else
                            f"torch.utils.benchmark.Timer with {args.threads} thread(s), blocks sized adaptively, each after "
                            f"one untimed call, >= {args.min_repeats} blocks and >= {args.min_run_time} s per "
                            f"measurement")
          + "; the contenders of one (model, dtype, T, mode) interleaved block by block; median and IQR of "
            "the per-call time of each block. Every contender checked against its oracle at every timed T "
            "(tie-aware: equal values may be chosen in either order).", ""]
    L += ["## Acceptance (issue 14)", ""] + acceptance_table(rows, args) + [""]
    m = C.MODELS[a["model"]]
    L += [f"## Acceptance row: {m.name} shape (d={m.d}, E={m.E}, k={m.k}), T={T_acc}, r={a['r']}, H={a['H']}", ""]

    def get(contender, dtype, mode, with_cfg=True):
        kw = dict(model=a["model"], T=T_acc, dtype=dtype, mode=mode, contender=contender, threads=args.threads)
        if with_cfg:
            kw.update(r=a["r"], H=a["H"])
        return _find(rows, **kw)

    figures = []
    for dtype in ("fp32", "bf16"):
        read = get("read_x", dtype, "fwd", False)
        for mode in ("fwd", "fwdbwd"):
            nat = get("l2r_native", dtype, mode)
            if not nat:
                continue
            t = nat["median_s"]

            def speedup(contender, with_cfg=False):
                other = get(contender, dtype, mode, with_cfg)
                return f"{other['median_s'] / t:.2f}×" if other else "n/a"

            figures.append((dtype, mode, _fmt_t(t) + f" (IQR {_fmt_t(nat['iqr_s'])})",
                            f"{t / read['median_s']:.2f}" if read else "n/a", speedup("linear"),
                            speedup("linear_fp32"), speedup("linear_compiled"), speedup("cosine"),
                            speedup("l2r_ref", True), speedup("l2r_ref_compiled", True),
                            _fmt_t(read["median_s"]) + f" ({read.get('note', '')})" if read else "n/a",
                            _load_text(nat)))
    if figures:
        L.append("| dtype | mode | l2r_native | native / read_x | speedup vs linear | vs fp32 router | "
                 "vs linear (compiled) | vs cosine | vs reference | vs reference (compiled) | read_x | load |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        L += ["| " + " | ".join(f) + " |" for f in figures]
        L += ["", "Speedups are contender time / l2r_native time (> 1: native faster); `native / read_x` is "
              "how many reads of x the native call costs (forward+backward must at least read x twice and "
              "write grad_x). `linear` computes x·Wᵀ in x's dtype (HF models); the fp32 router casts x to "
              "float32 against a float32 W (16-bit runs only)."]
    else:
        L.append("The acceptance row was not part of this sweep.")

    # Native vs reference on every row.
    L += ["", "## l2r_native against the reference, every row", "",
          "| model | dtype | mode | T | r×H | native | reference | ref / native | compiled ref | compiled / native |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("status") != "ok" or r["contender"] != "l2r_native" or r["threads"] != args.threads:
            continue
        key = dict(model=r["model"], dtype=r["dtype"], mode=r["mode"], T=r["T"], r=r["r"], H=r["H"])
        ref = _find(rows, contender="l2r_ref", **key)
        refc = _find(rows, contender="l2r_ref_compiled", **key)
        L.append(f"| {r['model']} | {r['dtype']} | {r['mode']} | {r['T']} | {r['r']}×{r['H']} | {_fmt_t(r['median_s'])} | "
                 f"{_fmt_t(ref['median_s']) if ref else ''} | {_fmt(ref['median_s'] / r['median_s']) if ref else ''} | "
                 f"{_fmt_t(refc['median_s']) if refc else ''} | {_fmt(refc['median_s'] / r['median_s']) if refc else ''} |")

    # Saved activations: must not grow with E*H.
    L += ["", "## Bytes saved for backward per token (beyond x and the parameters)", "",
          "Measured with `torch.autograd.graph.saved_tensors_hooks` on one forward+backward. "
          "l2r_native keeps q [r] fp32, rstd fp32 and the indices [k] int64 per token: independent of E·H.", "",
          "| model | dtype | T | r×H | E·H | l2r_native | l2r_ref | linear | cosine |", "|---|---|---|---|---|---|---|---|---|"]
    seen = set()
    for r in rows:
        if (r.get("status") != "ok" or r["contender"] != "l2r_native" or r["mode"] != "fwdbwd"
                or r["threads"] != args.threads):
            continue
        key = (r["model"], r["dtype"], r["T"], r["r"], r["H"])
        if key in seen or r["T"] != max(x["T"] for x in rows if x.get("status") == "ok" and x["model"] == r["model"]
                                        and x["contender"] == "l2r_native" and x["mode"] == "fwdbwd"):
            continue
        seen.add(key)
        kw = dict(model=r["model"], dtype=r["dtype"], mode="fwdbwd", T=r["T"])
        ref = _find(rows, contender="l2r_ref", r=r["r"], H=r["H"], **kw)
        lin = _find(rows, contender="linear", **kw)
        cos = _find(rows, contender="cosine", **kw)
        val = lambda x: _fmt(x.get("saved_extra_bytes_per_token"), "{:.0f}") if x else ""
        L.append(f"| {r['model']} | {r['dtype']} | {r['T']} | {r['r']}×{r['H']} | {r['E'] * r['H']} | {val(r)} | "
                 f"{val(ref)} | {val(lin)} | {val(cos)} |")

    # Checks.
    fails = failed_checks(rows)
    errs = errored_rows(rows)
    skipped = [r for r in rows if str(r.get("status", "")).startswith("skipped")]
    L += ["", "## Agreement checks and skipped cases", "",
          f"- agreement checks failed: {len(fails)}" + "".join(
              f"\n  - {r['contender']} {r['model']} {r['dtype']} T={r['T']} {r['mode']} r={r['r']} H={r['H']}: {r['check']}"
              for r in fails[:20]),
          f"- errors: {len(errs)}" + "".join(f"\n  - {r['contender']} {r['model']} {r['dtype']} T={r['T']}: {r['status']}"
                                            for r in errs[:20]),
          f"- skipped (time/memory caps): {len(skipped)}"]

    # Static figures of the CUDA kernels and the analytic cost per token.
    L += ["", "## CUDA kernels: static figures", "", ptxas_section(args.out)]
    L += ["## Analytic cost per token (machine-independent)", "",
          "Estimated DRAM bytes and FLOPs per token (formulas in `benchmarks/_contenders.py::analytic_cost`; "
          "parameters are read once per call and counted apart). Time at the memory roofline = "
          "T·bytes/token / peak bandwidth.", "",
          "| model | dtype | mode | contender | r×H | bytes/token | FLOPs/token | FLOP/byte | param bytes |",
          "|---|---|---|---|---|---|---|---|---|"]
    seen = set()
    for r in rows:
        if "bytes_per_token" not in r or r["model"] != a["model"]:
            continue
        key = (r["model"], r["dtype"], r["mode"], r["contender"], r["r"], r["H"])
        if key in seen:
            continue
        seen.add(key)
        L.append(f"| {r['model']} | {r['dtype']} | {r['mode']} | {r['contender']} | "
                 f"{str(r['r']) + '×' + str(r['H']) if r['r'] else ''} | {r['bytes_per_token']:.0f} | "
                 f"{r['flops_per_token']:.0f} | {r['flops_per_token'] / r['bytes_per_token']:.1f} | {r['param_bytes']:.0f} |")
    L.append("")
    return "\n".join(L)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stderr)
        except ImportError:
            print(msg, file=sys.stderr)

    info = _timing.machine_info(args.device, args.threads)
    start_load = _timing.machine_load(1.0)
    info["load_at_start"] = _timing.describe_load(start_load)
    log("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    cpus = info.get("cpus_usable") or info.get("logical_cpus") or 1
    if args.device.type == "cpu" and _timing.is_busy(start_load, cpus):
        log(f"WARNING: the machine is busy ({info['load_at_start']}): timings will be noisy and slow"
            + ("; --strict: not timing (rerun without --strict to time anyway)" if args.strict else ""))
        if args.strict:
            return 3
    if args.device.type == "cpu":
        log("CUDA kernels: no GPU here; static figures: "
            + ("see summary.md" if glob.glob(os.path.join(args.out, "ptxas_*.md")) + glob.glob(os.path.join(DEFAULT_OUT, "ptxas_*.md"))
               else "absent (no ptxas_<arch>.md in the results folder)"))
    os.makedirs(args.out, exist_ok=True)
    rows = run_sweep(args, log)
    wall = time.perf_counter() - t_start
    info["wall_s"] = f"{wall:.0f}"
    end_load = _timing.machine_load(1.0)
    info["load_at_end"] = _timing.describe_load(end_load)
    busiest = max((r["load_others"] for r in rows if r.get("load_others") not in ("", None)), default=None)
    if busiest is not None:
        info["busiest_slot"] = f"other processes {100 * busiest:.0f}% of the CPUs"
    busy = args.device.type == "cpu" and (
        _timing.is_busy(end_load, cpus) or (busiest is not None and busiest > _timing.BUSY_SHARE))
    if busy:
        info["busy"] = f"start: {info['load_at_start']}; end: {info['load_at_end']}; busiest slot: {info.get('busiest_slot')}"
        log(f"WARNING: the machine was busy during the run ({info['busy']})")

    table = markdown_table(rows, gpu=args.device.type == "cuda")
    print(table)
    paths = {"csv": os.path.join(args.out, "route.csv"), "md": os.path.join(args.out, "route.md"),
             "png": os.path.join(args.out, "route.png"), "summary": os.path.join(args.out, "summary.md")}
    write_csv(rows, paths["csv"], info)
    with open(paths["md"], "w") as f:
        f.write("# L2R routing microbenchmark: all rows\n\n")
        f.write("\n".join(f"- {k}: {v}" for k, v in info.items()) + "\n\n" + table + "\n")
    wrote = [paths["csv"], paths["md"]]
    if not args.no_plot:
        try:
            plotted = plot(rows, paths["png"], f"L2R routing vs linear gating — {info.get('gpu', info['host_cpu'])}, "
                                               f"{args.threads} thread(s), torch {torch.__version__}")
            if plotted:
                wrote.append(plotted)
        except ImportError:
            log("matplotlib is not installed: no route.png (pip install matplotlib for the plot)")
    summary = summary_markdown(rows, info, args, wall)
    with open(paths["summary"], "w") as f:
        f.write(summary)
    wrote.append(paths["summary"])
    acceptance = summary[summary.index("## Acceptance (issue 14)"):summary.index("## Acceptance row")].strip()
    print("\n" + acceptance)
    if args.device.type == "cpu":
        # No GPU: the static figures of the CUDA kernels (ptxas report when present) and the
        # analytic bytes/FLOPs per token, from which the GPU roofline is read off on paper.
        print("\n" + summary[summary.index("## CUDA kernels"):].strip())
    log(f"wrote {', '.join(wrote)} in {wall:.0f} s")
    failed = bool(failed_checks(rows))
    if failed:
        log("some agreement checks FAILED (see the check column)")
    # A contender that raised has no figure: a run with such rows is not a result either.
    errored = bool(errored_rows(rows))
    if errored:
        log("some rows raised errors (see the status column and summary.md's errors)")
    return 1 if (failed or errored or busy) and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
