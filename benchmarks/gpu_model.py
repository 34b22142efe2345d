"""GPU cost model of the CUDA kernels: estimated H200 / H100 times from the SIMT emulator's
counters, without a GPU. A model, not a measurement (assumptions in benchmarks/_gpu_cost.py and in
the report).

    python -m benchmarks.gpu_model [--quick | --smoke] [--models M ...] [--ops route permute] [--json] [--out DIR]

Runs route forward/backward, permute and unpermute (bf16) at OLMoE (d=2048, E=64, k=8; r×H = 8×4
and 2×1; T = 1, 64, 8192) and Mixtral (d=4096, E=8, k=2; r×H = 32×1; T = 1, 64, 1024: at r = 32 the
backward re-reads the 512 KB projection from global memory per token, about 2·10^9 emulated
accesses at T = 8192, hours on the emulator) shapes, permute and unpermute at DeepSeek-V3's (d=7168,
E=256, k=8; T = 1, 64, 8192, and permute at T·k = 1M rows with its rows extrapolated), on the
emulator with counters on, then writes gpu_model.md (and gpu_model.json with --json) to --out: per op the
launches, unique DRAM bytes against the op's minimum, the estimated time and % of the HBM roofline
on each device; per kernel the counters and every term of the estimate; the shared-memory
instructions with bank conflicts, by source line.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _gpu_cost as cost  # noqa: E402
from benchmarks import _gpu_workloads as work  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results"
PTXAS = ROOT / "benchmarks" / "results" / "ptxas_sm90.md"

MODELS = {  # name: (d, E, k, [(r, H), ...]); no (r, H): permute / unpermute only
    # OLMoE: every (r, H) of issue 13's forward and backward targets, r in {2, 8} x H in {1, 4}
    "olmoe": (2048, 64, 8, [(8, 4), (2, 1), (8, 1), (2, 4)]),
    "mixtral": (4096, 8, 2, [(32, 1)]),
    "deepseek-v3": (7168, 256, 8, []),
}
PRESETS = {  # tokens per model
    "full": {"olmoe": [1, 64, 8192], "mixtral": [1, 64, 1024, 8192], "deepseek-v3": [1, 64, 8192]},
    "quick": {"olmoe": [1, 64, 1024], "mixtral": [1, 64, 256], "deepseek-v3": [1, 64, 1024]},
    "smoke": {"olmoe": [1, 64]},
}
# Issue 13's permute acceptance shape: T·k = 1M rows, E = 256 (DeepSeek-V3's d, E, k). Its 15 GB
# of rows do not fit the emulator: the plan runs there at full size, the row kernels' times are
# the largest emulated T's scaled by the row count (see acceptance()).
ACCEPTANCE = ("deepseek-v3", 131072)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_model", description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="OLMoE T = 1, 64, 1024; Mixtral T = 1, 64, 256")
    g.add_argument("--smoke", action="store_true", help="OLMoE, T = 1, 64 only (seconds; used by the tests)")
    p.add_argument("--tokens", nargs="+", type=int, help="token counts T (overrides the preset)")
    p.add_argument("--models", nargs="+", choices=list(MODELS), help="only these models (default: the preset's)")
    p.add_argument("--ops", nargs="+", choices=["route", "permute"], default=["route", "permute"],
                   help="route (forward, backward) and/or permute (permute, unpermute); default both")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="results folder (default: benchmarks/results)")
    p.add_argument("--json", action="store_true", help="also write gpu_model.json")
    p.add_argument("--devices", nargs="+", default=list(cost.DEVICES), choices=list(cost.DEVICES))
    args = p.parse_args(argv)
    args.preset = "smoke" if args.smoke else "quick" if args.quick else "full"
    preset = PRESETS[args.preset]
    args.tokens_by_model = {m: (args.tokens or ts) for m, ts in preset.items()}
    args.models = [m for m in preset if args.models is None or m in args.models]
    return args


def shapes(args) -> tuple[list[work.Shape], list[work.Shape]]:
    route, permute = [], []
    for m in args.models:
        d, E, k, configs = MODELS[m]
        for T in args.tokens_by_model[m]:
            for r, H in configs:
                route.append(work.Shape(m, d, E, k, r, H, T))
            permute.append(work.Shape(m, d, E, k, 0, 0, T))
    return route, permute


def symbolize(lib_path: str, offsets: list[int]) -> dict[int, str]:
    """offset -> "file:line" (basename) via addr2line; empty where unavailable."""
    a2l = shutil.which("addr2line")
    if not a2l or not offsets:
        return {}
    r = subprocess.run([a2l, "-e", lib_path, *[hex(o) for o in offsets]], capture_output=True, text=True)
    out = {}
    for off, line in zip(offsets, r.stdout.splitlines()):
        line = line.split(" (discriminator")[0].strip()
        if "??" not in line:
            out[off] = f"{Path(line.split(':')[0]).name}:{line.split(':')[-1]}"
    return out


def kernel_flops(flops: dict[str, float], kernel: str) -> float:
    base = cost.normalize_kernel(kernel).split("<")[0]
    return flops.get(base, 0.0)


def evaluate(op: str, shape: work.Shape, run: dict, devices: list[str], registers: dict, lib_path: str) -> dict:
    recs = run["records"]
    conflict_pcs = []
    for rec in recs:
        for pc, kind, size, req, nbytes, sec, ideal_sec, wf, ideal_wf in rec["pcs"]:
            if kind.startswith("shared") and wf > ideal_wf:
                conflict_pcs.append(pc)
    where = symbolize(lib_path, sorted(set(conflict_pcs)))
    out = {
        "op": op, "shape": shape.key, "model": shape.model, "T": shape.T, "r": shape.r, "H": shape.H,
        "d": shape.d, "E": shape.E, "k": shape.k, "launches": len(recs),
        "dram_bytes": sum(r["dram_read"] + r["dram_write"] for r in recs),
        "min_bytes": run["min_bytes"], "min_what": run["min_what"],
        "flops": sum(run["flops"].values()), "kernels": [], "devices": {},
        "plan_launches": run.get("plan_launches"),
    }
    for dev_name in devices:
        dev = cost.DEVICES[dev_name]
        ests = [cost.estimate(dev, rec, registers, kernel_flops(run["flops"], rec["kernel"])) for rec in recs]
        total = sum(e.time_us for e in ests)
        main = max(ests, key=lambda e: e.time_us - dev.launch_gap_us)
        roofline_us = run["min_bytes"] / (dev.hbm_gbs * 1e9) * 1e6
        ceil_us = cost.ceiling_us(dev, len(recs), run["min_bytes"], out["flops"],
                                  sum(r.get("mma", 0) for r in recs) * cost.MMA_FLOPS)
        out["devices"][dev_name] = {
            "time_us": total, "roofline_us": roofline_us, "pct_roofline": 100.0 * roofline_us / total,
            "ceiling_us": ceil_us, "pct_ceiling": 100.0 * roofline_us / ceil_us,
            "main_kernel": main.kernel, "main_bound": main.bound,
            "kernels": [dict(kernel=e.kernel, time_us=e.time_us, bound=e.bound, terms_us=e.terms_us,
                             blocks_per_sm=e.blocks_per_sm, warps_per_sm=e.warps_per_sm, waves=e.waves,
                             registers=e.registers, registers_known=e.registers_known) for e in ests],
        }
    for rec in recs:
        g_req = sum(rec[k]["requests"] for k in ("global_load", "global_store", "global_atomic"))
        g_sec = sum(rec[k]["sectors"] for k in ("global_load", "global_store", "global_atomic"))
        g_ideal = sum(rec[k]["ideal_sectors"] for k in ("global_load", "global_store", "global_atomic"))
        s_req = sum(rec[k]["requests"] for k in ("shared_load", "shared_store", "shared_atomic"))
        s_wf = sum(rec[k]["wavefronts"] for k in ("shared_load", "shared_store", "shared_atomic"))
        s_ideal = sum(rec[k]["ideal_wavefronts"] for k in ("shared_load", "shared_store", "shared_atomic"))
        by_line: dict[tuple, list[int]] = {}  # the instructions of one source line (unrolled copies) together
        for pc, kind, size, req, nbytes, sec, ideal_sec, wf, ideal_wf in rec["pcs"]:
            if kind.startswith("shared") and wf > ideal_wf:
                acc = by_line.setdefault((where.get(pc, hex(pc)), kind, size), [0, 0, 0])
                acc[0] += req
                acc[1] += wf
                acc[2] += ideal_wf
        conflicts = [dict(source=src, kind=kind, size=size, requests=req, wavefronts=wf, ideal=ideal,
                          degree=wf / ideal, excess=wf - ideal)
                     for (src, kind, size), (req, wf, ideal) in by_line.items()]
        conflicts.sort(key=lambda c: -c["excess"])
        out["kernels"].append(dict(
            kernel=rec["kernel"], grid=rec["grid"], block=rec["block"], dyn_smem=rec["dyn_smem"],
            static_smem=rec["static_smem"], dram_bytes=rec["dram_read"] + rec["dram_write"],
            global_requests=g_req, global_sectors=g_sec, global_ideal_sectors=g_ideal,
            global_bytes=sum(rec[k]["bytes"] for k in ("global_load", "global_store", "global_atomic")),
            shared_requests=s_req, shared_wavefronts=s_wf, shared_ideal_wavefronts=s_ideal,
            max_warp_global_loads=rec["max_warp_global_loads"], max_warp_load_misses=rec["max_warp_load_misses"],
            max_warp_load_hits=rec["max_warp_load_hits"], collectives=rec.get("collectives", 0),
            memset=rec.get("memset", False), conflicts=conflicts[:3]))
    return out


def short_kernel(name: str) -> str:
    return cost.normalize_kernel(name).replace("__nv_bfloat16", "bf16").replace(",", ", ")


def fmt_us(v: float) -> str:
    return f"{v:.1f}" if v < 100 else f"{v:.0f}"


def report(results: list[dict], args, elapsed: float, devices: list[str]) -> str:
    try:
        sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip()
    except OSError:
        sha = "?"
    cmd = "python -m benchmarks.gpu_model" + {"full": "", "quick": " --quick", "smoke": " --smoke"}[args.preset]
    if args.tokens:
        cmd += " --tokens " + " ".join(map(str, args.tokens))
    if args.models != list(PRESETS[args.preset]):
        cmd += " --models " + " ".join(args.models)
    if sorted(args.ops) != ["permute", "route"]:
        cmd += " --ops " + " ".join(args.ops)
    if args.json:
        cmd += " --json"
    L = [
        "# GPU cost model of the CUDA kernels (a model, not a measurement)",
        "",
        f"Written by `{cmd}` (git {sha}, {datetime.date.today().isoformat()}, {elapsed:.0f} s on the SIMT emulator).",
        "The unchanged kernels ran on the CPU emulator (tests/simt) with its counters on; the times below are what",
        "`benchmarks/_gpu_cost.py` makes of those counts. `scripts/gpu_check.sh` measures the same ops on a GPU.",
        "",
        "## Assumptions",
        "",
        *[f"- {a}" for a in cost.ASSUMPTIONS],
        "- inputs: bf16 x, float32 parameters, random routing; route: RMSNorm with a norm weight, softmax, no bias;",
        "  route backward with grad_weights and grad_mean_probs; permute: no capacity, align 1; unpermute: weighted",
        "",
        "## Ops",
        "",
        "DRAM: unique bytes by first touch per launch, summed over the op's launches; minimum: the traffic no",
        "implementation can avoid; % roofline: the minimum's time at peak HBM bandwidth over the estimate;",
        "ceiling: the best % roofline any kernels could reach in the same number of launches under this model",
        "(launch gaps + the larger of the minimum DRAM time and the FLOPs at the chip's FP32 FMA peak), so a",
        "target above it needs fewer launches or other arithmetic (tensor cores), not a better kernel.",
        "",
    ]
    head = "| op | shape | launches | DRAM MB | minimum MB | FLOPs (M) |"
    sep = "|---|---|---:|---:|---:|---:|"
    for dev in devices:
        head += f" {dev} est. µs | {dev} % roofline | {dev} ceiling % |"
        sep += "---:|---:|---:|"
    head += " main kernel (bound, " + devices[0] + ") |"
    sep += "---|"
    L += [head, sep]
    for r in results:
        row = (f"| {r['op']} | {r['model']} T={r['T']}" + (f" r={r['r']} H={r['H']}" if r["r"] else "") +
               f" | {r['launches']} | {r['dram_bytes'] / 1e6:.3f} | {r['min_bytes'] / 1e6:.3f} ({r['min_what']}) | "
               f"{r['flops'] / 1e6:.1f} |")
        for dev in devices:
            dv = r["devices"][dev]
            row += f" {fmt_us(dv['time_us'])} | {dv['pct_roofline']:.1f} | {dv['pct_ceiling']:.1f} |"
        d0 = r["devices"][devices[0]]
        row += f" `{short_kernel(d0['main_kernel'])}` ({d0['main_bound']}) |"
        L.append(row)
    dev0 = devices[0]
    L += [
        "",
        f"## Kernels ({dev0})",
        "",
        "global: warp-level requests, 32-byte sectors per request (ideal: the request's unique bytes packed);",
        "shared: requests, wavefronts per request (ideal); collectives: warp shuffles/redux in MIO instructions (they",
        "share the shared-memory term); terms in µs (the largest is the bound). Route kernels' last template argument",
        "is the mode: (RouteMode)0 route, 1 logits, 2 select. `cudaMemsetAsync` rows are a plan's memset steps.",
        "",
        "| op | shape | kernel | grid × block | smem B | regs | warps/SM | waves | global req | sectors/req (ideal) | "
        "shared req | wavefronts/req (ideal) | collectives | DRAM MB | dram | l2 | l1 | smem | fp32 | tensor | latency | est. µs |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        for kr, ke in zip(r["kernels"], r["devices"][dev0]["kernels"]):
            g = kr["global_requests"]
            s = kr["shared_requests"]
            spr = f"{kr['global_sectors'] / g:.1f} ({kr['global_ideal_sectors'] / g:.1f})" if g else "-"
            wpr = f"{kr['shared_wavefronts'] / s:.1f} ({kr['shared_ideal_wavefronts'] / s:.1f})" if s else "-"
            grid = "×".join(str(v) for v in kr["grid"] if v > 1) or "1"
            regs = f"{ke['registers']}" + ("" if ke["registers_known"] else "?")
            t = ke["terms_us"]
            L.append(
                f"| {r['op']} | {r['model']} T={r['T']}" + (f" r={r['r']} H={r['H']}" if r["r"] else "") +
                f" | `{short_kernel(kr['kernel'])}` | {grid} × {kr['block'][0]} | "
                f"{kr['dyn_smem'] + kr['static_smem']} | {regs} | {ke['warps_per_sm']} | {ke['waves']} | {g} | {spr} | {s} | "
                f"{wpr} | {kr['collectives']} | {kr['dram_bytes'] / 1e6:.3f} | " +
                " | ".join(fmt_us(t.get(k, 0.0)) for k in cost.TERMS) +
                f" | {fmt_us(ke['time_us'])} ({ke['bound']}) |")
    L += [
        "",
        "## Shared-memory bank conflicts",
        "",
        "Per kernel, the instructions whose requests need more wavefronts than their ideal (worst three):",
        "",
        "| op | shape | kernel | source | access | requests | wavefronts / request | conflict degree |",
        "|---|---|---|---|---|---:|---:|---:|",
    ]
    for r in results:
        for kr in r["kernels"]:
            for c in kr["conflicts"]:
                L.append(f"| {r['op']} | {r['model']} T={r['T']}" + (f" r={r['r']} H={r['H']}" if r["r"] else "") +
                         f" | `{short_kernel(kr['kernel'])}` | `{c['source']}` | {c['kind'].replace('_', ' ')} "
                         f"{c['size']} B | {c['requests']} | {c['wavefronts'] / c['requests']:.1f} | "
                         f"{c['degree']:.1f}× |")
    L += ["", "## Findings", ""]
    L += findings(results, dev0)
    return "\n".join(L) + "\n"


def findings(results: list[dict], dev: str) -> list[str]:
    out = []
    for r in results:
        if r["op"] != "route forward" or r["T"] < 64:
            continue
        hr = r["H"] * work.padded_rank(r["r"])
        worst = max((c for k in r["kernels"] for c in k["conflicts"]), key=lambda c: c["degree"], default=None)
        if worst is None:
            out.append(f"- route forward, {r['model']} T={r['T']} r={r['r']} H={r['H']} (H·r = {hr}, "
                       f"{hr % 32} mod 32): no shared-memory bank conflicts.")
        else:
            out.append(f"- route forward, {r['model']} T={r['T']} r={r['r']} H={r['H']} (H·r = {hr}, "
                       f"{hr % 32} mod 32): worst shared-memory access `{worst['source']}` is "
                       f"{worst['degree']:.1f}-way bank conflicted ({worst['wavefronts']} wavefronts for "
                       f"{worst['requests']} requests).")
    for r in results:
        if r["T"] != max(x["T"] for x in results if x["model"] == r["model"]):
            continue
        dv = r["devices"][dev]
        out.append(f"- {r['op']}, {r['shape']}: {r['dram_bytes'] / 1e6:.2f} MB from DRAM against a "
                   f"{r['min_bytes'] / 1e6:.2f} MB minimum ({r['dram_bytes'] / r['min_bytes']:.2f}×); estimated "
                   f"{fmt_us(dv['time_us'])} µs on {dev}, {dv['pct_roofline']:.1f} % of the HBM roofline (ceiling {dv['pct_ceiling']:.1f} %), main kernel "
                   f"bound by {dv['main_bound']}.")
    return out


def acceptance(results: list[dict], lib, devices: list[str], registers: dict) -> dict | None:
    """Permute at ACCEPTANCE's shape: the plan emulated at full size; each row kernel's estimate
    from the largest emulated T of that model, its time past the launch gap scaled by the ratio of
    the row counts (the row kernels stream rows in many waves, so their counts grow linearly with
    the rows). An extrapolation, labelled so in the report."""
    model, T = ACCEPTANCE
    base = [r for r in results if r["op"] == "permute" and r["model"] == model]
    if not base:
        return None
    base = max(base, key=lambda r: r["T"])
    d, E, k, _ = MODELS[model]
    shape = work.Shape(model, d, E, k, 0, 0, T)
    print(f"permute {shape.key} (plan only) ...", file=sys.stderr, flush=True)
    plan_recs = work.run_permute_plan(lib, shape)
    scale = T / base["T"]
    out = {"model": model, "T": T, "d": d, "E": E, "k": k, "base_T": base["T"], "scale": scale,
           "launches": len(plan_recs) + base["launches"] - base["plan_launches"],
           "plan_launches": len(plan_recs), "min_bytes": T * d * 2 + T * k * d * 2, "devices": {}}
    for dev_name in devices:
        dev = cost.DEVICES[dev_name]
        plan_ests = [cost.estimate(dev, rec, registers) for rec in plan_recs]
        rows = base["devices"][dev_name]["kernels"][base["plan_launches"]:]
        rows_us = sum(dev.launch_gap_us + (e["time_us"] - dev.launch_gap_us) * scale for e in rows)
        plan_us = sum(e.time_us for e in plan_ests)
        roofline_us = out["min_bytes"] / (dev.hbm_gbs * 1e9) * 1e6
        out["devices"][dev_name] = dict(
            plan_us=plan_us, rows_us=rows_us, time_us=plan_us + rows_us, roofline_us=roofline_us,
            pct_roofline=100.0 * roofline_us / (plan_us + rows_us),
            plan_kernels=[dict(kernel=e.kernel, time_us=e.time_us, bound=e.bound) for e in plan_ests])
    return out


def acceptance_report(acc: dict | None, devices: list[str]) -> list[str]:
    if acc is None:
        return []
    L = ["", f"## Permute at T·k = {acc['T'] * acc['k']:,} rows, E = {acc['E']} (issue 13's acceptance shape; "
         "rows extrapolated)", "",
         f"{acc['model']} d={acc['d']} E={acc['E']} k={acc['k']} T={acc['T']}, bf16: the plan ran on the emulator at this "
         f"size ({acc['plan_launches']} launches); the row kernels ran at T={acc['base_T']} and their estimates past "
         f"the launch gap are scaled ×{acc['scale']:g} (an extrapolation of the model, not an emulation). Minimum: read "
         f"x, write T·k rows ({acc['min_bytes'] / 1e9:.2f} GB).", "",
         "| device | launches | plan µs (emulated) | rows µs (extrapolated) | total µs | % roofline |",
         "|---|---:|---:|---:|---:|---:|"]
    for dev in devices:
        dv = acc["devices"][dev]
        L.append(f"| {dev} | {acc['launches']} | {fmt_us(dv['plan_us'])} | {fmt_us(dv['rows_us'])} | "
                 f"{fmt_us(dv['time_us'])} | {dv['pct_roofline']:.1f} |")
    dv = acc["devices"][devices[0]]
    L += ["", f"Plan kernels ({devices[0]}): " + ", ".join(
        f"`{short_kernel(k['kernel'])}` {fmt_us(k['time_us'])} µs ({k['bound']})" for k in dv["plan_kernels"]) + "."]
    return L


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    registers = cost.load_registers(PTXAS)
    libs = work.build_libs()
    route_shapes, permute_shapes = shapes(args)
    route_shapes = route_shapes if "route" in args.ops else []
    permute_shapes = permute_shapes if "permute" in args.ops else []
    results = []
    for s in route_shapes:
        print(f"route   {s.key} ...", file=sys.stderr, flush=True)
        for op, run in work.run_route(libs["route"], s).items():
            results.append(evaluate(op, s, run, args.devices, registers, libs["route"]._name))
    for s in permute_shapes:
        print(f"permute {s.key} ...", file=sys.stderr, flush=True)
        for op, run in work.run_permute(libs["permute"], s).items():
            results.append(evaluate(op, s, run, args.devices, registers, libs["permute"]._name))
    order = {"route forward": 0, "route backward": 1, "permute": 2, "unpermute": 3}
    results.sort(key=lambda r: (order[r["op"]], r["model"], r["r"], r["H"], r["T"]))
    acc = acceptance(results, libs["permute"], args.devices, registers)
    elapsed = time.time() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = report(results, args, elapsed, args.devices) + "\n".join(acceptance_report(acc, args.devices)) + "\n"
    (out / "gpu_model.md").write_text(md)
    if args.json:
        (out / "gpu_model.json").write_text(json.dumps(
            {"assumptions": cost.ASSUMPTIONS, "devices": {k: vars(v) for k, v in cost.DEVICES.items()},
             "results": results, "acceptance": acc}, indent=1))
    print(md)
    print(f"wrote {out / 'gpu_model.md'}" + (f" and {out / 'gpu_model.json'}" if args.json else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
