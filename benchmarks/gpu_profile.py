"""Where the GPU time of route / permute goes: per-kernel device times (torch.profiler, CUPTI) and the
time per call with launch overhead amortized (one CUDA graph holding many calls), next to the cost
model's estimate and to linear gating and a plain read of x, at a few shapes.

    python -m benchmarks.gpu_profile --out DIR [--calls-per-graph 20] [--quick] [--sweep]

benchmarks/gpu_check.py times one call per graph replay, so at small shapes it measures the host's
replay overhead (tens of µs), not the GPU. Here:

* ``graph µs``: ``--calls-per-graph`` calls captured in one graph, replays timed with CUDA events,
  divided by the calls: the device time per call including the gaps between its kernels;
* ``kernels µs``: the sum of the call's kernel (and memcpy/memset) durations from the profiler,
  per call; the table lists each kernel's share.

Runs with whichever CUDA backend serves l2r_cuda (nvcc build or NVRTC, ``l2r_cuda.cuda_backend()``).
``--device cpu`` runs the same steps without a GPU (a dry run of the script's logic: its numbers say
nothing). Writes profile.md and profile.json to --out after every shape.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import l2r_cuda  # noqa: E402
from benchmarks import _contenders as C  # noqa: E402
from benchmarks import _timing  # noqa: E402
from benchmarks.gpu_check import model_device  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL_JSON = ROOT / "benchmarks" / "results" / "gpu_model.json"
# (model, T, r, H): the shapes of issue 13's targets, decode, and the largest OLMoE ranks
ROUTE_SHAPES = [("mixtral", 8192, 32, 1), ("olmoe", 8192, 8, 4), ("olmoe", 8192, 2, 1), ("mixtral", 1, 32, 1),
                ("olmoe", 64, 8, 4)]
PERMUTE_SHAPES = [("mixtral", 8192), ("olmoe", 8192), ("deepseek-v3", 8192)]
CONTENDERS = ("l2r_native", "linear")
# --sweep: the forward's time against T at two shapes, for route and for route_logits (no softmax,
# top-k or statistics): a cost that does not fall with T is fixed per call (the first H200 run: the
# forward kernel took 21 µs for one Mixtral token and 36 µs for 64 OLMoE tokens)
SWEEP_SHAPES = [("olmoe", 8, 4), ("mixtral", 32, 1)]
SWEEP_T = (1, 16, 64, 256, 1024, 8192)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--calls-per-graph", type=int, default=20)
    p.add_argument("--replays", type=int, default=10, help="timed replays of the graph (median taken)")
    p.add_argument("--profiled-calls", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="the first route shape and the first permute shape only")
    p.add_argument("--sweep", action="store_true",
                   help="also the forward (route and route_logits) at T = 1 ... 8192 for two shapes")
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default=str(MODEL_JSON))
    return p.parse_args(argv)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def graph_time_us(step, device, calls: int, replays: int) -> dict:
    """Median µs per call over replays of one graph of ``calls`` calls (eager calls on a CPU)."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(calls):
            step()
        return {"us": (time.perf_counter() - t0) / calls * 1e6, "spread_us": 0.0, "timer": "perf_counter (cpu)"}
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    sync(device)
    timer = f"CUDA graph of {calls} calls"
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                step()
        replay = graph.replay
    except Exception as exc:  # noqa: BLE001 - not capturable: eager calls, launch overhead included
        sync(device)
        timer = f"eager ({type(exc).__name__} in capture)"

        def replay():
            for _ in range(calls):
                step()
    for _ in range(3):
        replay()
    sync(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    per_call = []
    for _ in range(replays):
        start.record()
        replay()
        end.record()
        end.synchronize()
        per_call.append(start.elapsed_time(end) * 1e3 / calls)
    q = statistics.quantiles(per_call, n=4) if len(per_call) > 1 else [per_call[0]] * 3
    return {"us": statistics.median(per_call), "spread_us": q[2] - q[0], "timer": timer}


def kernel_profile(step, device, calls: int) -> dict:
    """Per call: the sum of the GPU kernels' (and copies') durations, and each kernel's share."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        step()
    sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(calls):
            step()
        sync(device)
    per_kernel = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        k = per_kernel[e.name]
        k[0] += e.time_range.elapsed_us()
        k[1] += 1
    kernels = sorted(({"name": n, "us": v[0] / calls, "count": v[1] / calls} for n, v in per_kernel.items()),
                     key=lambda r: -r["us"])
    return {"kernels_us": sum(k["us"] for k in kernels), "kernels": kernels}


def measure_into(row: dict, step, args, device) -> None:
    """The step's kernels and its time per call into row, or the error that stopped them."""
    try:
        row.update(kernel_profile(step, device, args.profiled_calls))
        row.update(graph_time_us(step, device, args.calls_per_graph, args.replays))
    except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
        row["error"] = f"{type(exc).__name__}: {exc}"[:500]
        traceback.print_exc()


def short(name: str, n: int = 90) -> str:
    name = name.replace("l2r::route::(anonymous namespace)::", "").replace("l2r::permute::(anonymous namespace)::", "")
    return name if len(name) <= n else name[: n - 1] + "…"


def model_us(model: dict, op: str, mdl: str, T: int, r: int, H: int, dev: str):
    for row in model.get("results", []):
        if (row["op"], row["model"], row["T"], row["r"], row["H"]) == (op, mdl, T, r, H):
            return row["devices"][dev]["time_us"], row["min_bytes"]
    return None, None


def run_shape(kind, shape, args, device, model, dev) -> list[dict]:
    rows = []
    if kind == "route":
        mdl, T, r, H = shape
        m = C.MODELS[mdl]
        x = C.make_x(T, m.d, torch.bfloat16, device, seed=0)
        for mode, op in (("fwd", "route forward"), ("fwdbwd", "route backward")):
            contenders = CONTENDERS + (("read_x",) if mode == "fwd" else ())
            for contender in contenders:
                row = {"op": op, "mode": mode, "contender": contender, "model": mdl, "T": T, "r": r, "H": H}
                if contender == "read_x":
                    step = C.read_x_steps(x)["x.sum()"]
                else:
                    params = C.make_params(contender, m, r, H, torch.bfloat16, device, seed=1)
                    step, _ = C.make_step(contender, x, params, m.k, mode, seed=2)
                measure_into(row, step, args, device)
                if contender == "l2r_native":
                    row["model_us"], row["min_bytes"] = model_us(model, op, mdl, T, r, H, dev)
                rows.append(row)
    else:
        mdl, T = shape
        m = C.MODELS[mdl]
        g = torch.Generator().manual_seed(0)
        x = torch.randn(T, m.d, generator=g).to(device, torch.bfloat16)
        indices = torch.rand(T, m.E, generator=g).topk(m.k, dim=1).indices.to(device)
        weights = torch.rand(T, m.k, generator=g).to(device)
        perm = l2r_cuda.permute(x, indices, m.E, fixed_size=True)
        steps = {"permute": lambda: l2r_cuda.permute(x, indices, m.E, fixed_size=True),
                 "unpermute": lambda: l2r_cuda.unpermute(perm[0], perm[2], weights)}
        for op, step in steps.items():
            row = {"op": op, "mode": "fwd", "contender": "native", "model": mdl, "T": T, "r": 0, "H": 0}
            measure_into(row, step, args, device)
            row["model_us"], row["min_bytes"] = model_us(model, op, mdl, T, 0, 0, dev)
            rows.append(row)
    return rows


def sweep_rows(mdl: str, r: int, H: int, args, device, model, dev) -> list[dict]:
    m = C.MODELS[mdl]
    params = C.make_params("l2r_native", m, r, H, torch.bfloat16, device, seed=1)
    proj, anchors, scale, norm_weight = params
    rows = []
    for T in SWEEP_T:
        x = C.make_x(T, m.d, torch.bfloat16, device, seed=0)
        steps = {
            "route forward": lambda: l2r_cuda.route(x, proj, anchors, scale, top_k=m.k, norm_weight=norm_weight),
            "route_logits": lambda: l2r_cuda.ops.route_logits(x, proj, anchors, scale, norm_weight=norm_weight),
        }
        for op, step in steps.items():
            row = {"op": op, "mode": "fwd", "contender": "l2r_native", "model": mdl, "T": T, "r": r, "H": H,
                   "sweep": True}
            measure_into(row, step, args, device)
            row["model_us"], row["min_bytes"] = model_us(model, op, mdl, T, r, H, dev)
            rows.append(row)
    return rows


def write(rows, out: Path, info: dict, echo: bool) -> None:
    (out / "profile.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    L = [f"# GPU profile on {info['gpu']} — `python -m benchmarks.gpu_profile`", "",
         f"torch {info['torch']}, CUDA {info['cuda']}, l2r_cuda backend {info['backend']}, git {info['git']}. "
         "graph µs: median per call over replays of one CUDA graph of many calls (launch overhead amortized); "
         "kernels µs: the call's kernel durations summed (torch.profiler); GB/s: the model's minimum bytes / graph µs.",
         "", "| op | shape | contender | graph µs (IQR) | kernels µs | model µs | graph / model | GB/s | timer | top kernels (µs per call) |",
         "|---|---|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        shape = f"{r['model']} T={r['T']}" + (f" r={r['r']} H={r['H']}" if r["r"] else "")
        if "error" in r:
            L.append(f"| {r['op']} | {shape} | {r['contender']} | {r['error'][:200]} | | | | | | |")
            continue
        mu = r.get("model_us")
        gbs = f"{r['min_bytes'] / (r['us'] * 1e-6) / 1e9:.0f}" if r.get("min_bytes") else ""
        top = "; ".join(f"{short(k['name'], 60)} {k['us']:.1f}" + (f" ×{k['count']:.0f}" if k["count"] > 1.01 else "")
                        for k in r["kernels"][:4])
        mu_s = "" if not mu else f"{mu:.1f}"
        ratio = "" if not mu else f"{r['us'] / mu:.2f}"
        L.append(f"| {r['op']} | {shape} | {r['contender']} | {r['us']:.1f} ({r['spread_us']:.1f}) | "
                 f"{r['kernels_us']:.1f} | {mu_s} | {ratio} | {gbs} | {r['timer']} | {top} |")
    (out / "profile.md").write_text("\n".join(L) + "\n")
    if echo:
        print("\n".join(L))


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and (not torch.cuda.is_available() or l2r_cuda.cuda_backend() is None):
        print("gpu_profile: needs a GPU and a CUDA backend of l2r_cuda (nvcc build or NVRTC)", file=sys.stderr)
        return 3
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = json.loads(Path(args.model).read_text()) if Path(args.model).exists() else {"results": []}
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)"
    dev = model_device(name)
    info = {"gpu": name, "torch": torch.__version__, "cuda": torch.version.cuda, "git": _timing._git_commit(),
            "backend": l2r_cuda.cuda_backend() if device.type == "cuda" else "cpu"}
    work = [("route", s) for s in ROUTE_SHAPES[: 1 if args.quick else None]] + \
           [("permute", s) for s in PERMUTE_SHAPES[: 1 if args.quick else None]]
    if args.sweep:
        work += [("sweep", s) for s in SWEEP_SHAPES[: 1 if args.quick else None]]
    rows = []
    for kind, shape in work:
        print(f"[gpu_profile] {kind} {shape}", file=sys.stderr, flush=True)
        rows += (sweep_rows(*shape, args, device, model, dev) if kind == "sweep"
                 else run_shape(kind, shape, args, device, model, dev))
        write(rows, out, info, echo=False)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write(rows, out, info, echo=True)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
