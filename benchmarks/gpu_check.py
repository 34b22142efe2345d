"""Measured GPU times of the CUDA kernels next to the cost model's estimates (run by
scripts/gpu_check.sh on a machine with an NVIDIA GPU).

    python -m benchmarks.gpu_check --out DIR [--model benchmarks/results/gpu_model.json] [--budget-s 300]

For every shape of the cost model (gpu_model.json, written by `python -m benchmarks.gpu_model
--json`): route forward and forward+backward (l2r_cuda.route, against linear gating and the
torch.compile'd reference), permute and unpermute (l2r_cuda.permute / unpermute, against the eager
reference). CUDA events around CUDA-graph replay where the op captures (eager calls otherwise; a graph holds
enough calls for a replay to last ~200 µs, so that short calls are not timed by the host's replay
overhead), benchmarks/_timing.py's time_fn. Achieved GB/s counts the op's minimum traffic (the model's min_bytes); % of the device's peak bandwidth from benchmarks/_timing.PEAK_BANDWIDTH. Writes
timing.md and timing.json to --out; exits 1 when a check or a measurement failed.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import l2r_cuda  # noqa: E402
from benchmarks import _contenders as C  # noqa: E402
from benchmarks import _timing  # noqa: E402
from l2r_cuda import reference  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL_JSON = ROOT / "benchmarks" / "results" / "gpu_model.json"
ROUTE_CONTENDERS = ("l2r_native", "linear", "l2r_ref_compiled")
MODEL_NAMES = {name: C.MODELS[name] for name in ("olmoe", "mixtral", "deepseek-v3")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="results folder")
    p.add_argument("--model", default=str(MODEL_JSON), help="the cost model's JSON (gpu_model.json)")
    p.add_argument("--budget-s", type=float, default=300.0,
                   help="stop compiling the reference after this many seconds (the eager contenders still run)")
    p.add_argument("--min-run-time", type=float, default=0.2, help="seconds of timed calls per measurement")
    p.add_argument("--device", default="cuda",
                   help="cuda (default); cpu runs the same steps on the CPU: a dry run of this script's logic "
                        "(its times say nothing about a GPU; tests/test_gpu_check_script.py uses it)")
    return p.parse_args(argv)


def model_device(name: str) -> str:
    return "H200" if "H200" in name else "H100"


def measure(fn, use_graph=True) -> dict:
    m = _timing.time_fn(fn, torch.device(ARGS.device), threads=1, min_run_time=ARGS.min_run_time, min_repeats=3,
                        use_graph=use_graph)
    return {"us": statistics.median(m.times) * 1e6, "timer": m.timer, **m.extra}


def route_rows(shape: dict, t0: float) -> list[dict]:
    m = MODEL_NAMES[shape["model"]]
    T, r, H = shape["T"], shape["r"], shape["H"]
    x = C.make_x(T, m.d, torch.bfloat16, ARGS.device, seed=0)
    rows = []
    for mode, op in (("fwd", "route forward"), ("fwdbwd", "route backward")):
        for contender in ROUTE_CONTENDERS:
            row = {"op": op, "mode": mode, "contender": contender, "model": shape["model"], "T": T, "r": r, "H": H}
            if contender == "l2r_ref_compiled" and (time.time() - t0 > ARGS.budget_s or T == 1):
                row["skipped"] = "time budget" if T != 1 else "T=1 (a graph of its own)"
                rows.append(row)
                continue
            try:
                params = C.make_params(contender, m, r, H, torch.bfloat16, ARGS.device, seed=1)
                if mode == "fwd":  # agreement with the contender's oracle, once per shape
                    ok, why = C.check_contender(contender, x, params, m.k)
                    # an order of summation may swap experts whose keys tie to rounding: not a failure
                    row["check"] = "ok" if ok else (f"near-tie swaps: {why}" if "near-tie: True" in why
                                                     else f"FAILED: {why}")
                step, _ = C.make_step(contender, x, params, m.k, mode, seed=2)
                row.update(measure(step, use_graph=contender in C.GRAPHABLE))
            except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                row["error"] = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
            rows.append(row)
    return rows


def permute_rows(shape: dict) -> list[dict]:
    m = MODEL_NAMES[shape["model"]]
    T = shape["T"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, m.d, generator=g).to(ARGS.device, torch.bfloat16)
    indices = torch.rand(T, m.E, generator=g).topk(m.k, dim=1).indices.to(ARGS.device)
    weights = torch.rand(T, m.k, generator=g).to(ARGS.device)
    rows = []
    native = l2r_cuda.permute(x, indices, m.E)
    want = reference.permute(x, indices, m.E)
    check = "ok" if torch.equal(native[0], want[0]) and torch.equal(native[2], want[2]) else "FAILED: rows differ"
    y = native[0]
    for op, fns in (
        ("permute", {"native": lambda: l2r_cuda.permute(x, indices, m.E),
                     "reference": lambda: reference.permute(x, indices, m.E)}),
        ("unpermute", {"native": lambda: l2r_cuda.unpermute(y, native[2], weights),
                       "reference": lambda: reference.unpermute(y, native[2], weights)}),
    ):
        for contender, fn in fns.items():
            row = {"op": op, "mode": "fwd", "contender": contender, "model": shape["model"], "T": T, "r": 0, "H": 0}
            if contender == "native":
                row["check"] = check
            try:
                row.update(measure(fn, use_graph=contender == "native"))
            except Exception as exc:  # noqa: BLE001
                row["error"] = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
            rows.append(row)
    return rows


def attach_model(rows: list[dict], model: dict, dev: str, peak: float | None) -> None:
    by_key = {(r["op"], r["model"], r["T"], r["r"], r["H"]): r for r in model.get("results", [])}
    acc = model.get("acceptance")
    if acc:
        by_key[("permute", acc["model"], acc["T"], 0, 0)] = acc
    for row in rows:
        ref = by_key.get((row["op"], row["model"], row["T"], row["r"], row["H"]))
        if ref is None:
            continue
        row["min_bytes"] = ref["min_bytes"]
        row["model_us"] = ref["devices"][dev]["time_us"] if row["contender"] in ("l2r_native", "native") else None
        if "us" in row:
            row["gbs"] = ref["min_bytes"] / (row["us"] * 1e-6) / 1e9
            row["pct_peak"] = 100.0 * row["gbs"] * 1e9 / peak if peak else None


def write(rows: list[dict], out: Path, info: dict, echo: bool = True) -> None:
    (out / "timing.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    L = [f"# Measured on {info['gpu']} (model device {info['model_device']}, peak "
         f"{info['peak_gbs']} GB/s) — `scripts/gpu_check.sh`",
         "", f"torch {info['torch']}, CUDA {info['cuda']}, git {info['git']}; timer: CUDA events (graph replay where "
         "the op captures). GB/s: the op's minimum traffic / measured time.", "",
         "| op | shape | contender | measured µs | model µs | measured / model | GB/s | % peak | timer | check |",
         "|---|---|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        shape = f"{r['model']} T={r['T']}" + (f" r={r['r']} H={r['H']}" if r["r"] else "")
        if "us" not in r:
            L.append(f"| {r['op']} | {shape} | {r['contender']} | {r.get('skipped') or r.get('error', '?')} | | | | | | |")
            continue
        model = r.get("model_us")
        ratio = f"{r['us'] / model:.2f}" if model else ""
        L.append(f"| {r['op']} | {shape} | {r['contender']} | {r['us']:.1f} | {model:.1f} | {ratio} | "
                 if model else f"| {r['op']} | {shape} | {r['contender']} | {r['us']:.1f} | | | ")
        L[-1] += (f"{r.get('gbs', 0):.0f} | " + (f"{r['pct_peak']:.1f}" if r.get("pct_peak") is not None else "") +
                  f" | {r['timer']} | {r.get('check', '')} |")
    (out / "timing.md").write_text("\n".join(L) + "\n")
    if echo:
        print("\n".join(L))


ARGS = None


def main(argv=None) -> int:
    global ARGS
    ARGS = parse_args(argv)
    if ARGS.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device", file=sys.stderr)
        return 3
    if ARGS.device == "cuda" and not l2r_cuda.cuda_built():
        print("gpu_check: l2r_cuda was built without its CUDA kernels", file=sys.stderr)
        return 3
    out = Path(ARGS.out)
    out.mkdir(parents=True, exist_ok=True)
    model = json.loads(Path(ARGS.model).read_text()) if Path(ARGS.model).exists() else {"results": []}
    name = torch.cuda.get_device_name() if ARGS.device == "cuda" else "cpu (dry run)"
    dev = model_device(name)
    peak = _timing.peak_bandwidth(name)
    info = {"gpu": name, "model_device": dev, "peak_gbs": peak / 1e9 if peak else None, "torch": torch.__version__,
            "cuda": torch.version.cuda, "git": _timing._git_commit()}
    shapes = {}  # route shapes (forward and backward measured together), permute shapes (with unpermute)
    for r in model.get("results", []):
        kind = "route" if r["op"].startswith("route") else "permute"
        shapes[(kind, r["model"], r["T"], r["r"], r["H"])] = r
    acc = model.get("acceptance")  # issue 13's permute shape (T·k = 1M rows), modelled by extrapolation
    if acc:
        shapes[("permute", acc["model"], acc["T"], 0, 0)] = acc
    if not shapes:
        print("gpu_check: no cost-model shapes (run python -m benchmarks.gpu_model --json first)", file=sys.stderr)
        return 2
    t0 = time.time()
    rows = []
    for (kind, mdl, T, r, H) in sorted(shapes, key=lambda k: (k[0] != "route", k[2] == 8192, k)):
        print(f"[gpu_check] {kind} {mdl} T={T} r={r} H={H}", file=sys.stderr, flush=True)
        s = {"model": mdl, "T": T, "r": r, "H": H}
        rows += route_rows(s, t0) if kind == "route" else permute_rows(s)
        attach_model(rows, model, dev, peak)
        write(rows, out, info, echo=False)  # after every shape: a run stopped early keeps what it measured
        if ARGS.device == "cuda":
            # the caching allocator kept ~100 GiB reserved after the 1M-row permute, and the next
            # shapes' references ran out of memory (first H200 run)
            torch.cuda.empty_cache()
    write(rows, out, info)
    failed = [r for r in rows if "error" in r or str(r.get("check", "")).startswith("FAILED")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
