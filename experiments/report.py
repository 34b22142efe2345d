"""The generated report of a grid: ``summary.md`` (pre-registration, primary result, Holm-adjusted
secondary comparisons with minimum detectable effects, per-arm across-seed sd, the z-loss control,
SR-MoE / RoMA evidence), ``table.md``, ``results.json`` (meta, per-arm aggregates, comparisons),
``results.csv`` (one row per run) and the figures. Every run in full, traces included, is in
``runs.jsonl`` (written by the runner as runs finish)."""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import subprocess
from dataclasses import asdict
from typing import Dict, List, Optional, Sequence

import torch

from . import arms as arms_mod
from . import stats
from .arms import LINEAR, NUM_EXPERTS, PRIMARY, TOP_K, Arm
from .diagnostics import STABILITY_NOISE

PREREGISTRATION = "PREREGISTRATION.md"

# held-out diagnostics (per-layer lists in a run; reported as the mean over layers)
DIAGNOSTICS = [
    ("load_entropy", "load balance (norm. entropy, 1 = even)"),
    ("specialization", "specialization I(label; expert)/H(label)"),
    ("router_entropy", "router entropy / log E"),
    ("topk_mass", f"top-{TOP_K} gate mass"),
    ("median_q", "median |q| (linear: |logits|)"),
    ("clustering", "cosine var × dim (higher = more clustered)"),
    ("stability", f"routing stability (noise {STABILITY_NOISE})"),
    ("scale", "learned scale"),
    ("sigma", "σ_max(router weight)"),
]


def _fmt(x: Optional[float], digits: int = 4) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _fmt_p(p: float) -> str:
    if not math.isfinite(p):
        return "n/a"
    return f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}"


def layer_mean(run: dict, key: str) -> float:
    values = run[key]
    return float(sum(values) / len(values)) if isinstance(values, list) else float(values)


def _by_arm(results: Sequence[dict]) -> Dict[str, List[dict]]:
    out: Dict[str, List[dict]] = {}
    for r in sorted(results, key=lambda r: r["seed"]):
        out.setdefault(r["arm"], []).append(r)
    return out


def _metric_keys(task) -> List[tuple]:
    return [(task.metric, task.metric_label, task.higher_is_better)] + list(task.extra_metrics)


def aggregate(task, arms: Sequence[Arm], results: Sequence[dict]) -> dict:
    """Per arm: mean, across-seed sd and values of every metric and layer-mean diagnostic."""
    runs = _by_arm(results)
    agg = {}
    for arm in arms:
        entry = {"n": len(runs.get(arm.name, [])), "seeds": [r["seed"] for r in runs.get(arm.name, [])],
                 "train_time_s": stats.mean_sd([r["train_time_s"] for r in runs.get(arm.name, [])])[0]}
        for key, *_ in _metric_keys(task) + DIAGNOSTICS:
            values = [layer_mean(r, key) for r in runs.get(arm.name, [])]
            mean, sd = stats.mean_sd(values)
            entry[key] = {"mean": mean, "sd": sd, "values": values}
        agg[arm.name] = entry
    return agg


def _paired(agg: dict, key: str, arm: str, comparator: str) -> dict:
    a, b = agg[arm], agg[comparator]
    if a["seeds"] != b["seeds"]:
        raise RuntimeError(f"paired comparison {arm} vs {comparator}: seeds {a['seeds']} vs {b['seeds']}")
    return stats.paired_test(a[key]["values"], b[key]["values"])


def _verdict(test: dict, p: float, mde: float, higher_is_better: bool, arm: str) -> str:
    if not math.isfinite(p):
        return "n/a"
    if p < stats.ALPHA:
        better = (test["mean"] > 0) == higher_is_better
        return f"**{arm} {'better' if better else 'worse'}**"
    return f"no detectable difference (MDE {_fmt(mde)})"


def compare(task, agg: dict, contrasts: Sequence[tuple], key: Optional[str] = None,
            higher_is_better: Optional[bool] = None, *, first_is_primary: bool = True) -> List[dict]:
    """The pre-registered contrasts present in ``agg``: the first one (the primary) at level ALPHA, Holm
    over the others (``first_is_primary=False``: Holm over all of them); each with its MDE (80 % power)
    at the level its test faces (secondary: ALPHA / m, the strictest Holm step, so the MDE is
    conservative)."""
    key = key or task.metric
    hib = task.higher_is_better if higher_is_better is None else higher_is_better
    present = [(a, c) for a, c in contrasts if a in agg and c in agg and agg[a]["n"] and agg[c]["n"]]
    rows = []
    for i, (arm, comparator) in enumerate(present):
        test = _paired(agg, key, arm, comparator)
        rows.append({"arm": arm, "comparator": comparator, "primary": first_is_primary and i == 0, **test})
    secondary = [r for r in rows if not r["primary"]]
    for r, adjusted in zip(secondary, stats.holm([r["p"] for r in secondary])):
        r["p_holm"] = adjusted
    m = max(1, len(secondary))
    for r in rows:
        if r["primary"]:
            r["p_holm"], r["alpha"] = r["p"], stats.ALPHA
        else:
            r["alpha"] = stats.ALPHA / m
        r["mde"] = stats.mde_paired(r["sd"], r["n"], r["alpha"])
        r["verdict"] = _verdict(r, r["p_holm"], r["mde"], hib, r["arm"])
    return rows


def _diff(r: dict, digits: int = 4) -> str:
    return f"{r['mean']:+.{digits}f} [{_fmt(r['lo'], digits)}, {_fmt(r['hi'], digits)}]"


def _contrast_table(rows: Sequence[dict], label: str) -> List[str]:
    lines = [f"| arm | comparator | {label}: arm − comparator [95 % CI] | sd of diff | p | Holm p | MDE | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['comparator']} | {_diff(r)} | {_fmt(r['sd'])} | {_fmt_p(r['p'])} | "
                     f"{_fmt_p(r['p_holm']) if not r['primary'] else '(primary)'} | {_fmt(r['mde'])} | {r['verdict']} |")
    return lines


def _arm_table(task, arms: Sequence[Arm], agg: dict) -> str:
    keys = _metric_keys(task)
    lines = [f"| arm | n | " + " | ".join(label for _, label, _ in keys) + " | "
             + " | ".join(label for _, label in DIAGNOSTICS) + " | s/run |",
             "|---|---|" + "---|" * (len(keys) + len(DIAGNOSTICS) + 1)]
    for arm in arms:
        e = agg[arm.name]
        cells = [f"{_fmt(e[k]['mean'])} ± {_fmt(e[k]['sd'])}" for k, *_ in keys]
        cells += [f"{_fmt(e[k]['mean'], 3)} ± {_fmt(e[k]['sd'], 3)}" for k, _ in DIAGNOSTICS]
        lines.append(f"| {arm.name} | {e['n']} | " + " | ".join(cells) + f" | {_fmt(e['train_time_s'], 1)} |")
    return "\n".join(lines)


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def preregistration(out_dir: str, start_unix: Optional[float]) -> List[str]:
    """The committed pre-registration, verbatim, with the commit that added it and whether that commit
    is older than this run."""
    path = os.path.join(out_dir, PREREGISTRATION)
    if not os.path.exists(path):
        return ["**No pre-registration file** (`PREREGISTRATION.md`) in this output directory: the "
                "comparisons below are exploratory.", ""]
    # author dates: a rebase keeps them (commit dates it rewrites)
    added = _git("log", "--diff-filter=A", "--format=%H %at %aI", "--", path).splitlines()
    if added:
        commit, unix, iso = added[-1].split(" ")
        when = ("before this run started" if start_unix and int(unix) < start_unix
                else "AFTER this run started" if start_unix else "(run start unknown)")
        status = f"committed in `{commit[:12]}` at {iso}, {when}"
    else:
        status = "**not committed**"
    text = open(path).read().strip()
    body = [line.replace("# ", "### ", 1) if line.startswith("# ") else line for line in text.splitlines()]
    return [f"## Pre-registration ({status})", "", *["> " + line if line else ">" for line in body], ""]


def _trace_mean(runs: Sequence[dict], key: str) -> List[float]:
    """Mean over seeds and layers of a trace key, per log point."""
    per_run = [[(sum(v) / len(v)) if isinstance(v, list) else v for v in r["trace"][key]] for r in runs]
    return [sum(col) / len(col) for col in zip(*per_run)]


def write_report(task, arms: Sequence[Arm], results: Sequence[dict], hp, seeds: Sequence[int], out_dir: str,
                 timing: dict, *, quick: bool) -> str:
    os.makedirs(out_dir, exist_ok=True)
    agg = aggregate(task, arms, results)
    runs = _by_arm(results)
    rows = compare(task, agg, arms_mod.contrasts())
    z_rows = compare(task, agg, arms_mod.z_loss_contrasts(), key="median_q", higher_is_better=True,
                     first_is_primary=False)  # the pre-registration: Holm over the three
    meta = {"task": task.title, "metric": task.metric, "higher_is_better": task.higher_is_better, "quick": quick,
            "seeds": list(seeds), "arms": [asdict(a) for a in arms], "train": asdict(hp), "model": task.model_info,
            "data": task.data_info, "num_experts": NUM_EXPERTS, "top_k": TOP_K, "timing": timing,
            "torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count()}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"meta": meta, "aggregate": agg, "contrasts": rows, "z_loss_contrasts": z_rows}, f, indent=1)
    flat = ["arm", "seed"] + [k for k, *_ in _metric_keys(task)] + [k for k, _ in DIAGNOSTICS] + ["train_time_s"]
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(flat)
        for r in results:
            writer.writerow([r["arm"], r["seed"]] + [layer_mean(r, k) for k in flat[2:]])
    table = _arm_table(task, arms, agg)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(f"### {task.title}: mean ± across-seed sd over {len(seeds)} paired seeds (diagnostics: "
                f"held-out, mean over MoE layers)\n\n{table}\n")
    _plots(task, arms, agg, runs, rows, out_dir)
    summary = _summary(task, arms, agg, runs, rows, z_rows, meta, out_dir, table)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:  # written last: marks a finished report
        f.write(summary)
    return summary


def _summary(task, arms, agg, runs, rows, z_rows, meta, out_dir, table) -> str:
    hp, timing, n = meta["train"], meta["timing"], len(meta["seeds"])
    better = "higher" if task.higher_is_better else "lower"
    lines = [f"# {task.title}: does L2R route better than linear gating, when both get a fair chance?", ""]
    if meta["quick"]:
        lines += ["**Quick (smoke-test) mode: too few seeds and steps for conclusions.**", ""]
    wall = timing.get("wall_s")
    lines += [
        f"- Data: {task.data_info}.",
        f"- Model: {task.model_info}; {NUM_EXPERTS} experts, top-{TOP_K}, softmax scores.",
        f"- Budget, identical for every arm: {hp['steps']} steps, batch {hp['batch_size']}, AdamW lr {hp['lr']} "
        f"(warmup {hp['warmup_frac']:.0%} + cosine to {hp['min_lr_frac']}×), grad clip {hp['grad_clip']}.",
        f"- Router losses: load balancing {hp['lb_coef']} (every arm, normalised scores); z-loss {hp['z_coef']} "
        f"only in `+z` arms; `+SR-MoE`: {hp['sn_coef']}·max(0, σ_max(W) − {hp['sn_frac']}·σ_max(W₀))² + "
        f"{hp['sr_coef']}·(−stable rank W); `+RoMA`: roma_loss weight {hp['roma_weight']}, k = {hp['roma_k']}, "
        "router parameters only. L2R scale learned in log space.",
        f"- {n} paired seeds {meta['seeds']} (same non-router init and data order per seed). "
        + (f"Wall time {wall / 60:.1f} min with {timing['workers']} worker process(es) "
           f"({timing['note']}; paused {timing['paused_s'] / 60:.0f} min), " if wall is not None else
           f"{timing['note']}; ")
        + f"load average before {timing['loadavg_before'][0]:.2f}, after {timing['loadavg_after'][0]:.2f}; "
        f"sum of per-run times {timing['run_time_sum_s'] / 60:.1f} min.",
        "",
    ]
    lines += preregistration(out_dir, timing.get("start_unix"))
    primary = next((r for r in rows if r["primary"]), None)
    secondary = [r for r in rows if not r["primary"]]
    lines += [f"## Primary comparison: {PRIMARY} vs {LINEAR}, {task.metric_label} ({better} is better)", ""]
    if primary:
        base = agg[LINEAR][task.metric]
        arm = agg[PRIMARY][task.metric]
        lines += [
            f"{LINEAR}: {_fmt(base['mean'])} ± {_fmt(base['sd'])}; {PRIMARY}: {_fmt(arm['mean'])} ± "
            f"{_fmt(arm['sd'])} (mean ± across-seed sd, {n} seeds).",
            "",
            f"**Paired difference ({PRIMARY} − {LINEAR}): {_diff(primary)}** (95 % t interval, df = {n - 1}); "
            f"p = {_fmt_p(primary['p'])}; minimum detectable effect (80 % power, α = 0.05) {_fmt(primary['mde'])}. "
            f"Verdict: {primary['verdict']}.",
            "",
        ]
    else:
        lines += ["(not run)", ""]
    winners = [r for r in secondary if r["p_holm"] < stats.ALPHA]
    lines += [f"## Secondary comparisons ({len(secondary)}, Holm-adjusted)", "",
              f"{len(winners)} of {len(secondary)} survive Holm's correction at 0.05"
              + (": " + "; ".join(f"{r['arm']} vs {r['comparator']} ({_diff(r)})" for r in winners) if winners else "")
              + f". MDE: 80 % power at α = 0.05/{max(1, len(secondary))} (Holm's strictest step; conservative).",
              "", *_contrast_table(rows, task.metric_label), ""]
    lines += ["## Per-arm results (mean ± across-seed sd)", "", table, "",
              "Diagnostics are held-out, per MoE layer, averaged over layers. Cosine var × dim is the variance of "
              "pairwise cosines of routing-space vectors times the space's dimension (r for L2R, E for linear): "
              "≈ 1 for isotropic directions, **higher = tokens more clustered** into few directions, lower = "
              "more evenly spread. Specialization is a plug-in estimate (biased upward for small cells).", ""]
    lines += _z_loss_section(agg, runs, z_rows)
    lines += _treatment_section(runs, hp)
    lines += ["## Figures", "", "`metrics.png` (task metrics per arm), `contrasts.png` (every comparison with its "
              "95 % CI), `traces.png` (routers during training), `expert_load.png`, `routing_space.png` (r = 2, "
              "first seed, last layer).", ""]
    return "\n".join(lines)


def _z_loss_section(agg, runs, z_rows) -> List[str]:
    if not z_rows:
        return []
    lines = ["## z-loss control: does the router z-loss collapse L2R's |q|?", "",
             "Median routing-space norm on held-out tokens (L2R: |q|, the argument of tanh; linear: the logit "
             "vector's norm), mean over layers; router entropy / log E and top-2 gate mass alongside. Paired "
             "differences with z-loss minus without; Holm over these three.", "",
             "| arm (with z) | without z | median \\|q\\| with / without | Δ [95 % CI] | Holm p | router entropy "
             "with / without | top-2 mass with / without |", "|---|---|---|---|---|---|---|"]
    for r in z_rows:
        a, c = agg[r["arm"]], agg[r["comparator"]]
        lines.append(f"| {r['arm']} | {r['comparator']} | {_fmt(a['median_q']['mean'], 3)} / "
                     f"{_fmt(c['median_q']['mean'], 3)} | {_diff(r, 3)} | {_fmt_p(r['p_holm'])} | "
                     f"{_fmt(a['router_entropy']['mean'], 3)} / {_fmt(c['router_entropy']['mean'], 3)} | "
                     f"{_fmt(a['topk_mass']['mean'], 3)} / {_fmt(c['topk_mass']['mean'], 3)} |")
    lines.append("")
    steps = next(iter(runs.values()))[0]["trace"]["step"]
    lines += ["Median |q| during training (training batch, mean over seeds and layers), at steps "
              f"{steps}:", ""]
    for name in [r[k] for r in z_rows for k in ("comparator", "arm")]:
        if name in runs:
            lines.append(f"- {name}: " + ", ".join(_fmt(v, 2) for v in _trace_mean(runs[name], "median_q")))
    lines.append("")
    return lines


def _treatment_section(runs, hp) -> List[str]:
    lines = []
    sr = [name for name in runs if name.endswith("+SR-MoE")]
    if sr:
        lines += ["## SR-MoE: is the spectral hinge active?", "",
                  f"Threshold c = {hp['sn_frac']} × σ_max of the initial router weight, per layer. Penalty "
                  "= Σ_layers max(0, σ_max − c)², mean over the steps between log points and over seeds:", ""]
        for name in sr:
            pen = _trace_mean(runs[name], "sn_penalty")
            sigma = _trace_mean(runs[name], "sigma")
            c = sum(sum(r["sn_max"]) / len(r["sn_max"]) for r in runs[name]) / len(runs[name])
            nonzero = sum(v > 0 for r in runs[name] for v in r["trace"]["sn_penalty"])
            total = sum(len(r["trace"]["sn_penalty"]) for r in runs[name])
            lines += [f"- {name}: penalty " + ", ".join(f"{v:.2e}" for v in pen)
                      + f"; non-zero in {nonzero} of {total} logged intervals (all seeds); σ_max "
                      + ", ".join(_fmt(v, 3) for v in sigma) + f" against c ≈ {c:.3f}."]
        lines.append("")
    roma = [name for name in runs if name.endswith("+RoMA")]
    if roma:
        lines += ["## RoMA: loss during training (mean over the steps between log points and over seeds)", ""]
        for name in roma:
            lines.append(f"- {name}: " + ", ".join(f"{v:.2e}" for v in _trace_mean(runs[name], "roma")))
        lines.append("")
    l2r = [name for name in runs if name.startswith("l2r")]
    if l2r:
        lines += ["## L2R's learned scale (exp of the log-space parameter), mean over seeds and layers", "",
                  "| arm | init | end of training |", "|---|---|---|"]
        for name in l2r:
            scale = _trace_mean(runs[name], "scale")
            lines.append(f"| {name} | {_fmt(scale[0], 2)} | {_fmt(scale[-1], 2)} |")
        lines.append("")
    return lines


def _plots(task, arms, agg, runs, rows, out_dir) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [a.name for a in arms]
    keys = _metric_keys(task)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 5.0), squeeze=False)
    colors = ["0.55" if n.startswith(LINEAR) else ("C3" if n == PRIMARY else "C0") for n in names]
    for ax, (key, label, _) in zip(axes[0], keys):
        means = np.array([agg[n][key]["mean"] for n in names])
        sds = np.nan_to_num(np.array([agg[n][key]["sd"] for n in names]))
        ax.bar(range(len(names)), means, yerr=sds, color=colors, capsize=3)
        ax.axhline(agg[LINEAR][key]["mean"], color="0.3", ls="--", lw=0.8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=70, ha="right", fontsize=7)
        ax.set_title(label, fontsize=9)
        lo, hi = np.nanmin(means - sds), np.nanmax(means + sds)
        span = max(hi - lo, 1e-6)
        ax.set_ylim(lo - 0.3 * span, hi + 0.3 * span)
    fig.suptitle(f"{task.title}: mean ± across-seed sd (grey = linear arms, red = primary L2R)", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "metrics.png"), dpi=110)
    plt.close(fig)

    if rows:
        fig, ax = plt.subplots(figsize=(8.5, 0.32 * len(rows) + 1.4))
        for i, r in enumerate(rows):
            sig = r["p_holm"] < stats.ALPHA
            color = "C3" if r["primary"] else ("k" if sig else "0.5")
            ax.errorbar(r["mean"], i, xerr=[[r["mean"] - r["lo"]], [r["hi"] - r["mean"]]], fmt="o", color=color,
                        ms=4, capsize=2)
        ax.axvline(0, color="0.3", lw=0.8)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([f"{r['arm']} − {r['comparator']}" for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(f"paired difference in {task.metric_label} ({'higher' if task.higher_is_better else 'lower'}"
                      " is better), 95 % CI")
        ax.set_title("Pre-registered comparisons (red: primary; black: Holm-significant; grey: not)", fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "contrasts.png"), dpi=110)
        plt.close(fig)

    traced = [n for n in (LINEAR, f"{LINEAR} +z", PRIMARY, f"{PRIMARY} +z", arms_mod.l2r_name(anchors=4),
                          f"{arms_mod.l2r_name(anchors=4)} +z", f"{LINEAR} +SR-MoE", f"{PRIMARY} +SR-MoE") if n in runs]
    panels = [("median_q", "median |q| (linear: |logits|)"), ("router_entropy", "router entropy / log E"),
              ("topk_mass", "top-2 gate mass"), ("scale", "L2R scale"), ("sigma", "σ_max(router weight)"),
              ("sn_penalty", "SR-MoE hinge penalty (log)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.8))
    for ax, (key, label) in zip(axes, panels):
        for i, name in enumerate(traced):
            if key == "sn_penalty" and "SR-MoE" not in name:
                continue  # zero: nothing to show on the log axis
            steps = runs[name][0]["trace"]["step"]
            style = "--" if name.endswith("+z") else (":" if "SR-MoE" in name else "-")
            ax.plot(steps, _trace_mean(runs[name], key), style, color=f"C{i}", label=name, lw=1.2)
        if key == "sn_penalty":
            ax.set_yscale("log")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    axes[0].legend(fontsize=6)
    fig.suptitle("Routers during training (training batch, mean over seeds and layers)", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "traces.png"), dpi=110)
    plt.close(fig)

    mat = []
    for n in names:
        per_run = [np.concatenate([np.sort(np.array(f))[::-1] for f in r["load_fractions"]]) for r in runs[n]]
        mat.append(np.mean(per_run, axis=0))
    mat = np.stack(mat)
    layers = len(runs[names[0]][0]["load_fractions"])
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * mat.shape[1], 1.2 + 0.4 * len(names)))
    im = ax.imshow(mat, aspect="auto", cmap="viridis", vmin=0.0)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xticks(range(mat.shape[1]))
    ax.set_xticklabels([f"L{l}#{e + 1}" for l in range(layers) for e in range(NUM_EXPERTS)], rotation=90, fontsize=7)
    for l in range(1, layers):
        ax.axvline(l * NUM_EXPERTS - 0.5, color="w", lw=1.5)
    fig.colorbar(im, ax=ax, label="load fraction")
    ax.set_title(f"Held-out expert load per layer (experts sorted by load, mean over seeds; even = "
                 f"{1 / NUM_EXPERTS:.3f})", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "expert_load.png"), dpi=110)
    plt.close(fig)

    pts = [r for n in names for r in runs[n] if "points" in r][:6]
    if pts:
        fig, axes = plt.subplots(1, len(pts), figsize=(4.6 * len(pts), 4.9), squeeze=False)
        cmap = plt.get_cmap("tab10")
        for ax, r in zip(axes[0], pts):
            p = r["points"]
            q, lab = np.array(p["q"]), np.array(p["labels"])
            for c in range(task.num_labels):
                m = lab == c
                if m.any():
                    ax.scatter(q[m, 0], q[m, 1], s=3, alpha=0.4, color=cmap(c % 10), label=task.label_names[c])
            radius = np.percentile(np.linalg.norm(q, axis=1), 90) if len(q) else 1.0
            anchors = np.array(p["anchors"])  # [E, H, 2]
            for e in range(anchors.shape[0]):
                for h in range(anchors.shape[1]):
                    a = anchors[e, h] / max(np.linalg.norm(anchors[e, h]), 1e-9) * radius * 1.1
                    ax.plot([0, a[0]], [0, a[1]], color="k", lw=0.4, alpha=0.5)
                    ax.text(a[0], a[1], f"e{e}", fontsize=6)
            ax.set_aspect("equal")
            ax.set_title(f"{r['arm']} (seed {r['seed']})", fontsize=8)
        axes[0][0].legend(fontsize=6, markerscale=3, loc="best")
        fig.suptitle("L2R routing space q = W x~ at r = 2 (held-out tokens, last MoE layer), coloured by label; "
                     "lines = anchor directions", fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "routing_space.png"), dpi=110)
        plt.close(fig)


def write_pilot_report(task, arms: Sequence[Arm], results: Sequence[dict], hp, seeds: Sequence[int], out_dir: str,
                       timing: dict, *, quick: bool) -> str:
    """The scale-init pilot: the task metric per init and the init it selects (best mean)."""
    os.makedirs(out_dir, exist_ok=True)
    agg = aggregate(task, arms, results)
    l2r = [a for a in arms if a.router == "l2r"]
    pick = (max if task.higher_is_better else min)(l2r, key=lambda a: agg[a.name][task.metric]["mean"])
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"meta": {"seeds": list(seeds), "train": asdict(hp), "timing": timing, "quick": quick,
                            "selected_init_scale": pick.init_scale},
                   "aggregate": agg}, f, indent=1)
    lines = [f"# {task.title}: pilot for L2R's scale init (log-space scale)", "",
             f"Seeds {list(seeds)} (disjoint from the grid's), {hp.steps} steps, batch {hp.batch_size}; arms "
             f"{[a.name for a in arms]}. Selection rule (fixed before the pilot ran): the init with the best mean "
             f"{task.metric_label} becomes the grid's L2R scale init.", "",
             f"| arm | {task.metric_label} | Δ vs linear [95 % CI] | final scale | median \\|q\\| | router entropy |",
             "|---|---|---|---|---|---|"]
    for a in arms:
        e = agg[a.name]
        d = _diff(_paired(agg, task.metric, a.name, LINEAR)) if a.name != LINEAR else "—"
        lines.append(f"| {a.name} | {_fmt(e[task.metric]['mean'])} ± {_fmt(e[task.metric]['sd'])} | {d} | "
                     f"{_fmt(e['scale']['mean'], 2)} | {_fmt(e['median_q']['mean'], 2)} | "
                     f"{_fmt(e['router_entropy']['mean'], 3)} |")
    wall = timing.get("wall_s")
    lines += ["", f"**Selected init scale: {pick.init_scale:g}** ({pick.name}).", "",
              f"Wall time {wall / 60:.1f} min" if wall is not None else timing["note"], ""]
    summary = "\n".join(lines)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(summary)
    return summary
