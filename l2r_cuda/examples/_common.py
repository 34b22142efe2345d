"""Shared machinery of the examples: router configurations, a tiny MoE transformer, paired-seed
training, routing diagnostics, paired statistics, and the generated report (tables, plots, summary).

Design decisions (they are what ``summary.md`` and ``table.md`` refer to):

* **Paired seeds.** For seed ``s`` every configuration gets the same non-router initialisation and
  the same data order: the model is built under ``torch.manual_seed(s)``, then every non-router
  parameter is overwritten with the one of a reference model built under the same seed with the
  linear router (so the router's own parameter count cannot shift the random stream), and every
  router is re-initialised under ``torch.manual_seed(s + ROUTER_SEED_OFFSET)``. Batches come from a
  ``torch.Generator`` seeded with ``s``. Differences between configurations at the same seed are
  therefore caused by the router alone (and by the different trajectories it induces).
* **Same budget.** Steps, batch size, learning rate and schedule are identical for every config.
  Every config uses the router z-loss; all but the aux-loss-free one use the Switch
  load-balancing loss. ``+SR-MoE`` adds the spectral-norm and stable-rank penalties on the L2R
  projection; ``+bias`` replaces the load-balancing loss with DeepSeek-V3's selection bias update.
* **Diagnostics** are measured on the held-out set, per MoE layer, then averaged over layers:
  load balance = normalised entropy of the expert load (1 = uniform); specialization = mutual
  information between the token's label and its top-1 expert divided by the label entropy
  (share of label uncertainty explained by the expert, plug-in estimate); angular diversity =
  variance of pairwise cosines in the routing space times its dimension (~1 for isotropic
  directions, > 1 clustered); stability = fraction of tokens whose top-k expert set is unchanged
  when Gaussian noise of std ``STABILITY_NOISE`` is added to the router input (the MoE input is a
  LayerNorm output, RMS ~ 1, so the noise is ~10% of the signal).
* **Routing space of the linear router** = its logit space ``x W_g^T`` (dimension E), the space
  whose geometry decides its top-k; the angular diversity is scaled by E. For L2R it is ``q = W x~``
  (dimension r), scaled by r.
* **Statistics.** Mean ± sample sd over seeds; paired difference to linear at the same seed with a
  two-sided 95% t interval over the ``n`` differences (``df = n - 1``). A config *wins*/*loses*
  when the interval excludes 0 in the better/worse direction, else it *ties*. Intervals are not
  corrected for multiple comparisons.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import losses, metrics
from ..moe import MoE
from ..routers import L2RRouter, LinearRouter

ROUTER_SEED_OFFSET = 1000
STABILITY_NOISE = 0.1
NUM_EXPERTS = 8
TOP_K = 2


# --------------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RouterConfig:
    """One router configuration: ``linear`` or ``l2r`` with rank ``r`` and ``H`` anchors per expert."""

    name: str
    router: str = "l2r"
    rank: int = 2
    num_anchors: int = 4
    srmoe: bool = False  # SR-MoE spectral-norm + stable-rank penalties on the L2R projection
    bias_balance: bool = False  # aux-loss-free balancing (selection bias) instead of the LB loss

    def router_kwargs(self) -> dict:
        if self.router == "linear":
            return {}
        return {"rank": self.rank, "num_anchors": self.num_anchors}


BASELINE = RouterConfig("linear", router="linear", rank=0, num_anchors=0)


def l2r(rank: int, anchors: int, **kw) -> RouterConfig:
    suffix = " +SR-MoE" if kw.get("srmoe") else (" +bias" if kw.get("bias_balance") else "")
    return RouterConfig(f"l2r r={rank} H={anchors}{suffix}", rank=rank, num_anchors=anchors, **kw)


def full_configs() -> List[RouterConfig]:
    """linear; L2R r in {2, 8, 32} x H in {1, 4}; the package default (r=2, H=4) with SR-MoE
    penalties and with aux-loss-free bias balancing."""
    out = [BASELINE]
    for rank in (2, 8, 32):
        for anchors in (1, 4):
            out.append(l2r(rank, anchors))
    out.append(l2r(2, 4, srmoe=True))
    out.append(l2r(2, 4, bias_balance=True))
    return out


def quick_configs() -> List[RouterConfig]:
    return [BASELINE, l2r(2, 4)]


@dataclass
class TrainConfig:
    steps: int
    batch_size: int
    lr: float = 3e-3
    warmup_frac: float = 0.05
    min_lr_frac: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    lb_coef: float = 1e-2  # Switch load-balancing loss
    z_coef: float = 1e-3  # router z-loss
    sn_coef: float = 1e-2  # SR-MoE spectral-norm penalty max(0, sigma_max(W) - sn_max)^2
    sn_max: float = 2.0
    sr_coef: float = 1e-3  # SR-MoE stable-rank penalty -||W||_F^2/||W||_2^2
    bias_rate: float = 1e-3  # aux-loss-free bias update rate


# --------------------------------------------------------------------------------------------------
# Model: a pre-norm transformer whose FFNs are MoE layers
# --------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, d_model: int, heads: int, causal: bool):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """``x + attn(LN(x))`` then ``x + MoE(LN(x))``; with ``record`` set, keeps the MoE input."""

    def __init__(self, d_model: int, heads: int, d_ff: int, cfg: RouterConfig, causal: bool):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, heads, causal)
        self.ln2 = nn.LayerNorm(d_model)
        self.moe = MoE(d_model, d_ff, NUM_EXPERTS, TOP_K, router=cfg.router, **cfg.router_kwargs())
        self.record = False
        self.moe_input: Optional[Tensor] = None

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        h = self.ln2(x)
        if self.record:
            self.moe_input = h.detach().reshape(-1, h.shape[-1])
        return x + self.moe(h)


class MoETransformer(nn.Module):
    """Token encoder (``nn.Linear`` for continuous inputs or ``nn.Embedding`` for bytes) + learned
    positions + ``layers`` MoE blocks + final LayerNorm; the task puts its head on top."""

    def __init__(self, cfg: RouterConfig, *, d_in: Optional[int], vocab: Optional[int], seq_len: int,
                 d_model: int, layers: int, heads: int, d_ff: int, causal: bool, d_out: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model) if vocab else nn.Linear(d_in, d_model)
        self.pos = nn.Parameter(torch.randn(seq_len, d_model) * 0.02)
        self.blocks = nn.ModuleList(Block(d_model, heads, d_ff, cfg, causal) for _ in range(layers))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, d_out)

    def features(self, x: Tensor) -> Tensor:
        h = self.embed(x) + self.pos[: x.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.ln(h)

    def routers(self) -> List[nn.Module]:
        return [block.moe.router for block in self.blocks]


def build_paired(task, cfg: RouterConfig, seed: int) -> nn.Module:
    """The model for ``(cfg, seed)`` with non-router parameters identical across configs (see the
    module docstring)."""
    torch.manual_seed(seed)
    reference = task.build_model(BASELINE)
    torch.manual_seed(seed)
    model = task.build_model(cfg)
    shared = {k: v for k, v in reference.state_dict().items() if ".router." not in k}
    missing, unexpected = model.load_state_dict(shared, strict=False)
    if unexpected or any(".router." not in k for k in missing):
        raise RuntimeError(f"paired init: unexpected {unexpected}, missing {missing}")
    torch.manual_seed(seed + ROUTER_SEED_OFFSET)
    for router in model.routers():
        router.reset_parameters()
    return model


# --------------------------------------------------------------------------------------------------
# One training run
# --------------------------------------------------------------------------------------------------


def _lr_lambda(hp: TrainConfig):
    warmup = max(1, int(hp.warmup_frac * hp.steps))

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, hp.steps - warmup)
        return hp.min_lr_frac + (1 - hp.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return fn


def aux_loss(model: nn.Module, cfg: RouterConfig, hp: TrainConfig) -> Tensor:
    total = torch.zeros(())
    for block in model.blocks:
        route, router = block.moe.last_route, block.moe.router
        total = total + hp.z_coef * losses.router_z_loss(route.lse)
        if not cfg.bias_balance:
            total = total + hp.lb_coef * losses.load_balancing_loss(route.tokens_per_expert, route.mean_probs)
        if cfg.srmoe:
            total = total + hp.sn_coef * losses.spectral_norm_penalty(router.proj, hp.sn_max)
            total = total + hp.sr_coef * losses.stable_rank_penalty(router.proj)
    return total


def routing_diagnostics(model: nn.Module, labels: Tensor, num_labels: int, *, keep_points: bool,
                        max_points: int = 1500) -> dict:
    """Per-layer diagnostics from the MoE inputs recorded during the last (evaluation) forward."""
    out = {"load_entropy": [], "specialization": [], "angular_diversity": [], "stability": [],
           "load_fractions": []}
    for layer, block in enumerate(model.blocks):
        x, router = block.moe_input, block.moe.router
        route = router(x)
        load = metrics.expert_load(route.tokens_per_expert)
        out["load_entropy"].append(load.entropy)
        out["load_fractions"].append([float(f) for f in load.fractions])
        spec = metrics.expert_specialization(route.indices, labels, NUM_EXPERTS, num_labels)
        out["specialization"].append(spec.normalized)
        q = metrics.routing_space(router, x)
        out["angular_diversity"].append(metrics.angular_diversity(q, max_tokens=2048).cosine_variance_scaled)
        out["stability"].append(metrics.routing_stability(router, x, noise_std=STABILITY_NOISE, seed=0))
        if keep_points and layer == len(model.blocks) - 1 and isinstance(router, L2RRouter) and router.rank == 2:
            g = torch.Generator().manual_seed(0)
            pick = torch.randperm(q.shape[0], generator=g)[:max_points]
            anchors = router.anchors.detach().float()
            out["points"] = {"layer": layer, "q": q[pick].tolist(), "labels": labels[pick].tolist(),
                             "top1": route.indices[pick, 0].tolist(), "anchors": anchors.tolist()}
    summary = {k: float(sum(v) / len(v)) for k, v in out.items() if k not in ("load_fractions", "points")}
    summary["load_fractions"] = out["load_fractions"]
    if "points" in out:
        summary["points"] = out["points"]
    return summary


def train_one(task, cfg: RouterConfig, seed: int, hp: TrainConfig, *, keep_points: bool = False,
              progress: bool = False) -> dict:
    """Train ``cfg`` at ``seed`` and return its held-out metric and routing diagnostics."""
    start = time.time()
    model = build_paired(task, cfg, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(hp))
    data_gen = torch.Generator().manual_seed(seed)
    steps = range(hp.steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"{cfg.name} s{seed}", leave=False, position=1, dynamic_ncols=True)
    model.train()
    running = None
    for step in steps:
        batch = task.sample_batch(data_gen, hp.batch_size)
        task_loss = task.loss(model, batch)
        loss = task_loss + aux_loss(model, cfg, hp)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if hp.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), hp.grad_clip)
        optimizer.step()
        schedule.step()
        if cfg.bias_balance:
            for block in model.blocks:
                losses.update_expert_bias_(block.moe.router.expert_bias, block.moe.last_route.tokens_per_expert,
                                           hp.bias_rate)
        value = float(task_loss.detach())
        running = value if running is None else 0.95 * running + 0.05 * value
        if progress and step % 10 == 0:
            steps.set_postfix(loss=f"{running:.3f}")
    train_time = time.time() - start
    model.eval()
    for block in model.blocks:
        block.record = True
    with torch.no_grad():
        primary, labels = task.evaluate(model)
        diag = routing_diagnostics(model, labels, task.num_labels, keep_points=keep_points)
    for block in model.blocks:
        block.record, block.moe_input = False, None
    return {"config": cfg.name, "seed": seed, task.metric: primary, "train_loss": running,
            "train_time_s": train_time, **diag}


# --------------------------------------------------------------------------------------------------
# Running many (config, seed) pairs, optionally in worker processes
# --------------------------------------------------------------------------------------------------

_TASK_CACHE: Dict[str, object] = {}


def _get_task(module: str, quick: bool):
    key = f"{module}:{quick}"
    if key not in _TASK_CACHE:
        _TASK_CACHE[key] = importlib.import_module(module).make_task(quick=quick)
    return _TASK_CACHE[key]


def _worker_init():
    torch.set_num_threads(1)


def _job(module: str, quick: bool, cfg: RouterConfig, seed: int, hp: TrainConfig, keep_points: bool) -> dict:
    return train_one(_get_task(module, quick), cfg, seed, hp, keep_points=keep_points)


def load_checkpoint(path: str) -> List[dict]:
    """Runs saved so far in ``runs.jsonl`` (one JSON object per finished run)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_all(module: str, quick: bool, configs: Sequence[RouterConfig], seeds: Sequence[int],
            hp: TrainConfig, workers: int, checkpoint: Optional[str] = None, resume: bool = False) -> List[dict]:
    """Train every (config, seed), seed-major; each finished run is appended to ``checkpoint``
    (``runs.jsonl``) so an interrupted experiment can be resumed (``resume``) or reported as is."""
    from tqdm.auto import tqdm

    jobs = [(cfg, seed) for seed in seeds for cfg in configs]
    # The 2-D routing picture: points from the first seed of every r=2 config.
    keep = {(cfg.name, seed): (seed == seeds[0] and cfg.router == "l2r" and cfg.rank == 2) for cfg, seed in jobs}
    wanted = {(cfg.name, seed) for cfg, seed in jobs}
    results = [r for r in load_checkpoint(checkpoint) if (r["config"], r["seed"]) in wanted] if (
        checkpoint and resume) else []
    if checkpoint and not resume and os.path.exists(checkpoint):
        os.remove(checkpoint)
    done = {(r["config"], r["seed"]) for r in results}
    jobs_left = [(cfg, seed) for cfg, seed in jobs if (cfg.name, seed) not in done]

    def record(result: dict, cfg: RouterConfig, seed: int) -> None:
        results.append(result)
        if checkpoint:
            with open(checkpoint, "a") as f:
                f.write(json.dumps(result) + "\n")
        bar.set_postfix(last=f"{cfg.name} s{seed}")
        bar.update(1)

    bar = tqdm(total=len(jobs), initial=len(done), desc="runs", position=0, dynamic_ncols=True)
    if workers <= 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # same numerics as the worker processes; tiny models gain little from threads
        try:
            task = _get_task(module, quick)
            for cfg, seed in jobs_left:
                record(train_one(task, cfg, seed, hp, keep_points=keep[(cfg.name, seed)], progress=True), cfg, seed)
        finally:
            torch.set_num_threads(threads)
    elif jobs_left:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init) as pool:
            futures = {pool.submit(_job, module, quick, cfg, seed, hp, keep[(cfg.name, seed)]): (cfg, seed)
                       for cfg, seed in jobs_left}
            for fut in as_completed(futures):
                cfg, seed = futures[fut]
                record(fut.result(), cfg, seed)
    bar.close()
    order = {(cfg.name, seed): i for i, (cfg, seed) in enumerate(jobs)}
    return sorted(results, key=lambda r: order[(r["config"], r["seed"])])


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------

# Two-sided 95% Student t quantiles t_{0.975, df}, used only when scipy is missing.
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
         18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060,
         26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042}


def t_quantile_975(df: int) -> float:
    if df < 1:
        return math.nan
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, df))
    except ImportError:
        return _T975.get(df, 1.96 if df > 120 else 2.0)


def mean_sd(values: Sequence[float]):
    n = len(values)
    mean = sum(values) / n if n else math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return mean, sd


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict:
    """Mean of ``a - b`` over paired seeds with its two-sided 95% t interval."""
    diffs = [x - y for x, y in zip(a, b)]
    n = len(diffs)
    mean, sd = mean_sd(diffs)
    half = t_quantile_975(n - 1) * sd / math.sqrt(n) if n > 1 else math.nan
    return {"n": n, "mean": mean, "sd": sd, "lo": mean - half, "hi": mean + half}


def verdict(diff: dict, higher_is_better: bool) -> str:
    if not (math.isfinite(diff["lo"]) and math.isfinite(diff["hi"])):
        return "n/a"
    if diff["lo"] > 0:
        return "wins" if higher_is_better else "loses"
    if diff["hi"] < 0:
        return "loses" if higher_is_better else "wins"
    return "ties"


def direction(diff: dict) -> str:
    if not (math.isfinite(diff["lo"]) and math.isfinite(diff["hi"])):
        return "n/a"
    if diff["lo"] > 0:
        return "higher"
    if diff["hi"] < 0:
        return "lower"
    return "no significant difference"


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------

DIAGNOSTICS = [
    # key, label, higher is better (None: descriptive)
    ("load_entropy", "load balance (norm. entropy)", True),
    ("specialization", "specialization (MI / H(label))", None),
    ("angular_diversity", "angular diversity (var cos x dim)", None),
    ("stability", f"routing stability (noise {STABILITY_NOISE})", True),
]


def _fmt(x: float, digits: int = 4) -> str:
    return "nan" if not math.isfinite(x) else f"{x:.{digits}f}"


def _fmt_diff(d: dict, digits: int = 4) -> str:
    return f"{d['mean']:+.{digits}f} [{_fmt(d['lo'], digits)}, {_fmt(d['hi'], digits)}]"


def aggregate(task, configs: Sequence[RouterConfig], results: List[dict]) -> dict:
    keys = [(task.metric, task.metric_label, task.higher_is_better)] + DIAGNOSTICS
    by_cfg = {cfg.name: sorted((r for r in results if r["config"] == cfg.name), key=lambda r: r["seed"])
              for cfg in configs}
    base = by_cfg[BASELINE.name]
    agg = {}
    for cfg in configs:
        runs = by_cfg[cfg.name]
        entry = {"n": len(runs), "train_time_s": mean_sd([r["train_time_s"] for r in runs])[0]}
        for key, _, _ in keys:
            vals = [r[key] for r in runs]
            mean, sd = mean_sd(vals)
            entry[key] = {"mean": mean, "sd": sd, "values": vals}
            if cfg.name != BASELINE.name:
                if [r["seed"] for r in runs] != [r["seed"] for r in base]:
                    raise RuntimeError("paired comparison needs the same seeds for every config")
                entry[key]["diff"] = paired_difference(vals, [r[key] for r in base])
        agg[cfg.name] = entry
    return agg


def write_report(task, configs: Sequence[RouterConfig], results: List[dict], hp: TrainConfig,
                 seeds: Sequence[int], out_dir: str, elapsed: float, quick: bool, workers: int,
                 elapsed_note: str = "wall time") -> dict:
    os.makedirs(out_dir, exist_ok=True)
    agg = aggregate(task, configs, results)
    meta = {"task": task.title, "metric": task.metric, "higher_is_better": task.higher_is_better,
            "quick": quick, "seeds": list(seeds), "configs": [asdict(c) for c in configs],
            "train": asdict(hp), "model": task.model_info, "data": task.data_info,
            "num_experts": NUM_EXPERTS, "top_k": TOP_K, "stability_noise": STABILITY_NOISE,
            "router_seed_offset": ROUTER_SEED_OFFSET, "elapsed_s": elapsed, "elapsed_note": elapsed_note,
            "workers": workers,
            "torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count()}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"meta": meta, "aggregate": agg, "runs": results}, f, indent=1)
    flat_keys = ["config", "seed", task.metric, "load_entropy", "specialization", "angular_diversity",
                 "stability", "train_loss", "train_time_s"]
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(flat_keys)
        for r in results:
            writer.writerow([r[k] for k in flat_keys])
    table = _table_md(task, configs, agg, meta)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(table)
    _plots(task, configs, agg, results, out_dir)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:  # written last: marks a finished report
        f.write(_summary_md(task, configs, agg, meta, table))
    return agg


def _table_md(task, configs, agg, meta) -> str:
    keys = [(task.metric, task.metric_label, task.higher_is_better)] + DIAGNOSTICS
    n = len(meta["seeds"])
    lines = [f"### {task.title}: mean ± sd over {n} paired seeds", "",
             "| config | " + " | ".join(label for _, label, _ in keys) + " |",
             "|---|" + "---|" * len(keys)]
    for cfg in configs:
        e = agg[cfg.name]
        cells = [f"{_fmt(e[k]['mean'])} ± {_fmt(e[k]['sd'])}" for k, _, _ in keys]
        lines.append(f"| {cfg.name} | " + " | ".join(cells) + " |")
    lines += ["", f"### Paired difference to linear (config − linear, same seed), mean [95% t CI, df={n - 1}]", "",
              "| config | " + " | ".join(label for _, label, _ in keys) + " | verdict |",
              "|---|" + "---|" * (len(keys) + 1)]
    for cfg in configs:
        if cfg.name == BASELINE.name:
            continue
        e = agg[cfg.name]
        cells = [_fmt_diff(e[k]["diff"]) for k, _, _ in keys]
        v = verdict(e[task.metric]["diff"], task.higher_is_better)
        lines.append(f"| {cfg.name} | " + " | ".join(cells) + f" | {v} |")
    lines.append("")
    lines.append(f"Verdict on {task.metric_label} ({'higher' if task.higher_is_better else 'lower'} is better): "
                 "wins/loses when the 95% CI of the paired difference excludes 0, ties otherwise; "
                 "not corrected for multiple comparisons.")
    lines.append("")
    return "\n".join(lines)


def _summary_md(task, configs, agg, meta, table) -> str:
    metric, hib = task.metric, task.higher_is_better
    base = agg[BASELINE.name][metric]
    n = len(meta["seeds"])
    hp = meta["train"]
    lines = [f"# {task.title}: does L2R route better than linear gating?", ""]
    if meta["quick"]:
        lines += ["**Quick (smoke-test) mode: too few seeds and steps for conclusions.**", ""]
    lines += [
        f"- Data: {task.data_info}",
        f"- Model: {task.model_info}; {NUM_EXPERTS} experts, top-{TOP_K}.",
        f"- Budget (identical for every config): {hp['steps']} steps, batch {hp['batch_size']}, AdamW lr "
        f"{hp['lr']} (warmup + cosine), router z-loss {hp['z_coef']}, load-balancing loss {hp['lb_coef']} "
        f"(except `+bias`, which uses the selection-bias update at rate {hp['bias_rate']} instead); `+SR-MoE` adds "
        f"{hp['sn_coef']}·max(0, σ_max(W) − {hp['sn_max']})² + {hp['sr_coef']}·(−stable rank(W)).",
        f"- {n} paired seeds {meta['seeds']} (same non-router init and data order per seed); "
        f"{meta['elapsed_note']} {meta['elapsed_s'] / 60:.1f} min with {meta['workers']} worker process(es).",
        "",
        f"## {task.metric_label} ({'higher' if hib else 'lower'} is better)",
        "",
        f"Linear router: {_fmt(base['mean'])} ± {_fmt(base['sd'])}.",
        "",
    ]
    counts = {"wins": [], "ties": [], "loses": [], "n/a": []}
    for cfg in configs:
        if cfg.name == BASELINE.name:
            continue
        e = agg[cfg.name][metric]
        v = verdict(e["diff"], hib)
        counts[v].append(cfg.name)
        lines.append(f"- **{cfg.name}**: {_fmt(e['mean'])} ± {_fmt(e['sd'])}; difference to linear "
                     f"{_fmt_diff(e['diff'])} → **L2R {v}**" if v != "n/a" else
                     f"- **{cfg.name}**: {_fmt(e['mean'])}; difference {e['diff']['mean']:+.4f} (CI needs ≥ 2 seeds)")
    lines.append("")
    total = sum(len(v) for v in counts.values())
    lines.append(f"**Overall on {task.metric_label}: L2R wins in {len(counts['wins'])}, ties in "
                 f"{len(counts['ties'])} and loses in {len(counts['loses'])} of {total} configurations** "
                 "(95% paired t intervals, uncorrected).")
    if counts["wins"]:
        lines.append(f"Wins: {', '.join(counts['wins'])}.")
    if counts["loses"]:
        lines.append(f"Losses: {', '.join(counts['loses'])}.")
    best = min if not hib else max
    best_cfg = best(configs, key=lambda c: agg[c.name][metric]["mean"])
    lines.append(f"Best mean: {best_cfg.name} ({_fmt(agg[best_cfg.name][metric]['mean'])}).")
    lines += ["", "## Routing diagnostics (held-out set, averaged over MoE layers)", ""]
    for key, label, better in DIAGNOSTICS:
        b = agg[BASELINE.name][key]
        higher = [c.name for c in configs if c.name != BASELINE.name and direction(agg[c.name][key]["diff"]) == "higher"]
        lower = [c.name for c in configs if c.name != BASELINE.name and direction(agg[c.name][key]["diff"]) == "lower"]
        same = [c.name for c in configs if c.name != BASELINE.name
                and direction(agg[c.name][key]["diff"]) == "no significant difference"]
        note = "" if better is None else f" ({'higher' if better else 'lower'} is better)"
        lines.append(f"- **{label}**{note}: linear {_fmt(b['mean'])} ± {_fmt(b['sd'])}. "
                     f"Significantly higher than linear: {', '.join(higher) or 'none'}; "
                     f"lower: {', '.join(lower) or 'none'}; no significant difference: {', '.join(same) or 'none'}.")
    lines += [
        "",
        "Notes: the linear router's routing space is its logit space (dimension E), L2R's is q = W x~ "
        "(dimension r); angular diversity is the variance of pairwise cosines times that dimension (≈1 "
        "for isotropic directions, > 1 when tokens cluster into few directions). Specialization is a "
        "plug-in mutual-information estimate (biased upward for small cells). Intervals are per "
        "comparison, not corrected for the number of configurations and metrics.",
        "",
        "## Full table",
        "",
        table,
    ]
    return "\n".join(lines)


def _plots(task, configs, agg, results, out_dir) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [c.name for c in configs]
    keys = [(task.metric, task.metric_label)] + [(k, label) for k, label, _ in DIAGNOSTICS]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 4.6))
    colors = ["0.55" if n == BASELINE.name else "C0" for n in names]
    for ax, (key, label) in zip(axes, keys):
        means = [agg[n][key]["mean"] for n in names]
        sds = [0.0 if not math.isfinite(agg[n][key]["sd"]) else agg[n][key]["sd"] for n in names]
        ax.bar(range(len(names)), means, yerr=sds, color=colors, capsize=3)
        ax.axhline(agg[BASELINE.name][key]["mean"], color="0.3", ls="--", lw=0.8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        ax.set_title(label, fontsize=9)
        finite = [m - s for m, s in zip(means, sds) if math.isfinite(m)]
        top = [m + s for m, s in zip(means, sds) if math.isfinite(m)]
        if finite and key == task.metric:
            span = max(top) - min(finite)
            ax.set_ylim(min(finite) - 0.3 * span - 1e-6, max(top) + 0.3 * span + 1e-6)
    fig.suptitle(f"{task.title}: mean ± sd over seeds (grey = linear, dashed = linear mean)", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "metrics.png"), dpi=120)
    plt.close(fig)

    # Expert load heat map: rows = configs, columns = layer x expert rank (experts sorted by load
    # within each run, since expert indices are arbitrary across seeds), mean over seeds.
    rows = []
    for n in names:
        runs = [r for r in results if r["config"] == n]
        per_run = [np.concatenate([np.sort(np.array(f))[::-1] for f in r["load_fractions"]]) for r in runs]
        rows.append(np.mean(per_run, axis=0))
    mat = np.stack(rows)
    layers = len(results[0]["load_fractions"])
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * mat.shape[1], 1.2 + 0.4 * len(names)))
    im = ax.imshow(mat, aspect="auto", cmap="viridis", vmin=0.0)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xticks(range(mat.shape[1]))
    ax.set_xticklabels([f"L{l}#{e + 1}" for l in range(layers) for e in range(NUM_EXPERTS)], rotation=90, fontsize=7)
    for l in range(1, layers):
        ax.axvline(l * NUM_EXPERTS - 0.5, color="w", lw=1.5)
    for i in range(mat.shape[0]):
        for j in range(mat.shape[1]):
            ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=5,
                    color="w" if mat[i, j] < 0.6 * mat.max() else "k")
    fig.colorbar(im, ax=ax, label="load fraction")
    ax.set_title(f"Expert load per layer (experts sorted by load, mean over seeds; uniform = {1 / NUM_EXPERTS:.3f})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "expert_load.png"), dpi=120)
    plt.close(fig)

    # 2-D routing space of the r=2 configs (first seed, last MoE layer).
    pts = [r for r in results if "points" in r]
    if pts:
        fig, axes = plt.subplots(1, len(pts), figsize=(max(8.0, 5.0 * len(pts)), 5.4), squeeze=False)
        cmap = plt.get_cmap("tab10")
        for ax, r in zip(axes[0], pts):
            p = r["points"]
            q = np.array(p["q"])
            lab = np.array(p["labels"])
            for c in range(task.num_labels):
                m = lab == c
                if m.any():
                    ax.scatter(q[m, 0], q[m, 1], s=4, alpha=0.5, color=cmap(c % 10), label=task.label_names[c])
            radius = np.percentile(np.linalg.norm(q, axis=1), 90) if len(q) else 1.0
            anchors = np.array(p["anchors"])  # [E, H, 2]
            for e in range(anchors.shape[0]):
                for h in range(anchors.shape[1]):
                    a = anchors[e, h]
                    a = a / max(np.linalg.norm(a), 1e-9) * radius * 1.1
                    ax.plot([0, a[0]], [0, a[1]], color="k", lw=0.5, alpha=0.5)
                    ax.scatter([a[0]], [a[1]], marker="*", s=120, color="k", zorder=3)
                    ax.text(a[0], a[1], f" e{e}", fontsize=7, zorder=4)
            ax.set_aspect("equal")
            ax.set_title(f"{r['config']} (seed {r['seed']}, layer {p['layer']})", fontsize=9)
        axes[0][0].legend(fontsize=6, markerscale=3, loc="best")
        fig.suptitle("L2R routing space q = W x~ (r = 2, held-out tokens of the last MoE layer)\n"
                     "coloured by label; stars = anchor directions (labelled by expert), not to scale", fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "routing_space.png"), dpi=120)
        plt.close(fig)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def main(module: str, description: str, default_out: str, full_hp: TrainConfig, quick_hp: TrainConfig,
         argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 seeds, 2 configs, few steps")
    parser.add_argument("--seeds", type=int, default=None, help="number of paired seeds (default 5; quick 2)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run")
    parser.add_argument("--out", default=default_out, help=f"output directory (default {default_out})")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes, one thread each (default: min(2, CPUs); quick: 1, in-process)")
    parser.add_argument("--configs", default=None,
                        help="comma-separated config names to run (e.g. 'l2r r=2 H=4'); linear is always included")
    parser.add_argument("--resume", action="store_true",
                        help="keep the finished runs of OUT/runs.jsonl (same settings!) and train the rest")
    parser.add_argument("--report-only", action="store_true",
                        help="no training: report OUT/runs.jsonl, using the seeds finished for every config")
    args = parser.parse_args(argv)
    hp = replace(quick_hp if args.quick else full_hp)
    if args.steps:
        hp.steps = args.steps
    seeds = list(range(args.seeds if args.seeds else (2 if args.quick else 5)))
    configs = quick_configs() if args.quick else full_configs()
    if args.configs:
        chosen = {name.strip() for name in args.configs.split(",")} | {BASELINE.name}
        unknown = chosen - {c.name for c in full_configs()}
        if unknown:
            raise SystemExit(f"unknown configs {sorted(unknown)}; known: {[c.name for c in full_configs()]}")
        configs = [c for c in full_configs() if c.name in chosen]
    workers = args.workers if args.workers is not None else (1 if args.quick else min(2, os.cpu_count() or 1))
    task = _get_task(module, args.quick)
    os.makedirs(args.out, exist_ok=True)
    checkpoint = os.path.join(args.out, "runs.jsonl")
    start = time.time()
    if args.report_only:
        saved = load_checkpoint(checkpoint)
        have = {(r["config"], r["seed"]) for r in saved}
        seeds = [s for s in sorted({r["seed"] for r in saved}) if all((c.name, s) in have for c in configs)]
        if not seeds:
            raise SystemExit(f"{checkpoint}: no seed finished for every config")
        results = [r for r in saved if r["seed"] in seeds and r["config"] in {c.name for c in configs}]
        elapsed = sum(r["train_time_s"] for r in results) / max(1, workers)
        note = "reported from saved runs (--report-only); sum of per-run times / workers ="
        print(f"report from {len(results)} saved runs, seeds {seeds}")
    else:
        resumed = len(load_checkpoint(checkpoint)) if args.resume else 0
        results = run_all(module, args.quick, configs, seeds, hp, workers, checkpoint, args.resume)
        elapsed = time.time() - start
        note = "wall time" if not resumed else "wall time of the resuming invocation only (earlier runs resumed):"
    agg = write_report(task, configs, results, hp, seeds, args.out, elapsed, args.quick, workers, note)
    print(open(os.path.join(args.out, "table.md")).read())
    print(f"wrote {args.out}/ (table.md, summary.md, results.json, results.csv, *.png) in {elapsed / 60:.1f} min")
    return agg
