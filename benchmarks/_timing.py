"""Timing, machine load and machine description for the benchmarks.

CPU: ``torch.utils.benchmark.Timer`` (thread count pinned through ``num_threads``), blocks of
``number`` calls sized from a warm-up estimate. Contenders that are compared are timed interleaved
(:func:`time_interleaved`): one block of each in turn, round after round, so that a slow spell of
the machine hits every contender alike. Reported: median and IQR (and min/max) of the per-call time
of each block.

CUDA: the callable is warmed up on a side stream, then captured into a CUDA graph and timed by
replaying it between CUDA events (no launch overhead, no Python in the loop). When capture is not
possible (an op syncs with the host, e.g. ``bincount`` sizing its output), it falls back to CUDA
events around eager calls; the row says which (``timer`` column).

Load: :func:`machine_load` samples how much of the CPUs other processes use (``/proc/stat`` over a
short window, this process excluded) and the load average; a run records it at the start, per
measured slot and at the end, and :func:`is_busy` says when timings cannot be trusted.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

# Peak DRAM bandwidth (bytes/s) of a few accelerators, matched on substrings of the device name.
PEAK_BANDWIDTH = [
    ("H200", 4.8e12),
    ("H100 SXM", 3.35e12),
    ("H100 80GB HBM3", 3.35e12),  # the SXM part reports itself like this
    ("H100 PCIe", 2.0e12),
    ("H100 NVL", 3.9e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB", 2.0e12),
    ("A100-PCIE-40GB", 1.555e12),
    ("A100-SXM4-40GB", 1.555e12),
    ("L40S", 0.864e12),
    ("RTX 4090", 1.008e12),
]


def peak_bandwidth(device_name: Optional[str]) -> Optional[float]:
    """Peak memory bandwidth in bytes/s for a known device name, else None (unknown)."""
    if not device_name:
        return None
    for key, bw in PEAK_BANDWIDTH:
        if key.lower() in device_name.lower():
            return bw
    return None


@dataclass
class Measurement:
    """Per-call seconds of each timed block, and how they were obtained."""

    times: List[float]
    number: int  # calls per block
    timer: str  # "torch.utils.benchmark" | "cuda_graph" | "cuda_events"
    extra: dict = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def quantile(self, q: float) -> float:
        xs = sorted(self.times)
        if len(xs) == 1:
            return xs[0]
        pos = q * (len(xs) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    @property
    def iqr(self) -> float:
        return self.quantile(0.75) - self.quantile(0.25)

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def max(self) -> float:
        return max(self.times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BlockTimer:
    """One contender's timed blocks: ``block()`` runs ``number`` calls and returns the seconds per
    call. CPU: torch.utils.benchmark.Timer with the contender's thread count; CUDA: CUDA events
    around graph replays (or eager calls when the callable cannot be captured)."""

    def __init__(self, fn: Callable[[], object], device: torch.device, *, threads: int, warmup: int = 2,
                 block_time: float = 0.02, use_graph: bool = True):
        self.device = device
        self.timer_name = "torch.utils.benchmark"
        self.extra: dict = {}
        if device.type == "cuda":
            self._setup_cuda(fn, warmup, use_graph)
            return
        from torch.utils.benchmark import Timer

        est = float("inf")
        with _threads(threads):
            for _ in range(max(1, warmup)):
                t0 = time.perf_counter()
                fn()
                est = min(est, time.perf_counter() - t0)
        self.estimate = max(est, 1e-7)
        self.number = max(1, int(block_time / self.estimate))
        self._timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
        self._fn, self._threads = fn, threads

    def _setup_cuda(self, fn, warmup: int, use_graph: bool) -> None:
        device = self.device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(max(1, warmup)):
                fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        _sync(device)
        self._call, self.timer_name = fn, "cuda_events"
        self._calls_per_replay = 1
        self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        if use_graph:
            try:
                self._capture(fn, 1)
                # One call per replay measures the host's replay overhead (tens of µs on an H200,
                # 2026-12-04) rather than the GPU when the call is short: capture enough calls in one
                # graph for a replay to last ~200 µs (few, small calls: the memory stays small).
                self.number = 1
                once = self._cuda_block()
                if once < 1e-4:
                    self._capture(fn, min(32, max(2, int(2e-4 / max(once, 1e-7)))))
            except Exception as exc:  # not capturable: host sync, CPU scalar, ...
                self.extra["note"] = f"graph capture failed: {type(exc).__name__}"
                self._graph, self._call, self._calls_per_replay = None, fn, 1
                self.timer_name = "cuda_events"
                _sync(device)
        self.number = 1
        self.estimate = max(self._cuda_block(), 1e-7)
        self.number = max(1, int(0.005 / self.estimate))

    def _capture(self, fn, calls: int) -> None:
        """Replaces the timed callable with the replay of a graph of ``calls`` calls of ``fn``."""
        self._graph = None  # free the previous graph's pool first
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        graph.replay()
        _sync(self.device)
        self._graph, self._call, self._calls_per_replay = graph, graph.replay, calls
        self.timer_name = "cuda_graph" if calls == 1 else f"cuda_graph x{calls}"

    def _cuda_block(self) -> float:
        start, end = self._events
        start.record()
        for _ in range(self.number):
            self._call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / (self.number * self._calls_per_replay)

    def block(self) -> float:
        if self.device.type == "cuda":
            return self._cuda_block()
        # One untimed call first: the contender timed before this block may have pushed x and this
        # contender's buffers out of the caches, and a block of a few long calls would carry that
        # cold call in its mean far more than a block of many short ones. So every block is timed
        # warm. (The Intel Xeon VM's 480 MiB L3 holds OLMoE's 64 MiB fp32 x at T = 8192: x.sum()
        # reads 154 ns per row from there, the quick benchmark's 1.26 ms, and 294 ns per row from
        # DRAM, `python -m benchmarks.dram_penalty --dram-tokens 131072`, 2 threads.)
        with _threads(self._threads):
            self._fn()
        return self._timer.timeit(self.number).mean


class _threads:
    """Runs a block with torch's intra-op thread count set (and restores it)."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        self.before = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


def time_interleaved(timers: Dict[str, BlockTimer], *, min_run_time: float, min_repeats: int,
                     max_repeats: int = 50) -> Dict[str, Measurement]:
    """Blocks of every timer in turn (the order rotated each round), until each has at least
    ``min_repeats`` blocks and ``min_run_time`` seconds of calls (at most ``max_repeats`` blocks)."""
    names = list(timers)
    times: Dict[str, List[float]] = {n: [] for n in names}
    spent = {n: 0.0 for n in names}
    for round_ in range(max_repeats):
        done = all(len(times[n]) >= min_repeats and spent[n] >= min_run_time for n in names)
        if done:
            break
        order = names[round_ % len(names):] + names[:round_ % len(names)]
        for n in order:
            t = timers[n].block()
            times[n].append(t)
            spent[n] += t * timers[n].number
    out = {}
    for n in names:
        m = Measurement(times[n], timers[n].number, timers[n].timer_name)
        m.extra.update(timers[n].extra)
        out[n] = m
    return out


def single_calls(fn: Callable[[], object], calls: int, *, threads: int, warmup: int = 2) -> List[float]:
    """Seconds of each of ``calls`` identical calls, timed one by one (run-to-run stability: a
    block average would hide a slow call)."""
    with _threads(threads):
        for _ in range(warmup):
            fn()
        out = []
        for _ in range(calls):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return out


# ----------------------------------------------------------------------------------------------
# Machine load


def _cpu_ticks():
    """(busy, total) jiffies of all CPUs, and this process's own (user + system) jiffies."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])
    with open(f"/proc/{os.getpid()}/stat") as f:
        own = f.read().rsplit(")", 1)[1].split()
    return total - idle, total, int(own[11]) + int(own[12])


def machine_load(window: float = 0.5) -> dict:
    """How loaded the machine is: ``others`` = the share of all CPUs that other processes kept busy
    during ``window`` seconds (0 = idle, 1 = every CPU busy), and the 1/5/15-minute load averages."""
    out = {"load_average": tuple(round(v, 2) for v in os.getloadavg()) if hasattr(os, "getloadavg") else None,
           "others": None}
    try:
        b0, t0, own0 = _cpu_ticks()
        time.sleep(window)
        b1, t1, own1 = _cpu_ticks()
        if t1 > t0:
            out["others"] = round(max(0.0, (b1 - b0) - (own1 - own0)) / (t1 - t0), 3)
    except (OSError, ValueError, IndexError):
        pass
    return out


# A machine counts as busy when other processes keep more than this share of its CPUs busy, or
# (where /proc/stat cannot be read) when the 1-minute load average exceeds this share of its CPUs.
BUSY_SHARE = 0.10


def is_busy(load: dict, cpus: int) -> bool:
    if load.get("others") is not None:
        return load["others"] > BUSY_SHARE
    la = load.get("load_average")
    return la is not None and la[0] > BUSY_SHARE * cpus + 0.5


def describe_load(load: dict) -> str:
    la = load.get("load_average")
    text = "load average " + (" ".join(f"{v:.2f}" for v in la) if la else "n/a")
    if load.get("others") is not None:
        text += f", other processes {100 * load['others']:.0f}% of the CPUs"
    return text


# ----------------------------------------------------------------------------------------------
# Machine description


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_available() -> tuple:
    total = avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024
                elif line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    return total, avail


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes free for the benchmark's tensors (CUDA: free device memory; CPU: MemAvailable)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return _mem_total_available()[1]


def _git_commit() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except Exception:
        pass
    return "unknown"


def machine_info(device: torch.device, threads: int) -> dict:
    """What the numbers were measured on (for the CSV header and summary.md)."""
    total, avail = _mem_total_available()
    info = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "host_cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": threads,
        "load_average": " ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a",
        "ram_gib": f"{total / 2**30:.1f}" if total else "n/a",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda or "none",
        "git_commit": _git_commit(),
        "device": str(device),
    }
    try:
        import l2r_cuda

        info["l2r_cuda"] = getattr(l2r_cuda, "__version__", "?")
        info["l2r_cuda_cuda_built"] = bool(l2r_cuda.cuda_built())
        # the CPU kernels' lane width, chosen at run time from the CPU's features: the project's 2-core
        # VM has come with and without AVX-512, and the figures are not comparable across the two
        info["l2r_cuda_cpu_isa"] = torch.ops.l2r_cuda.cpu_isa()
    except Exception as exc:  # pragma: no cover
        info["l2r_cuda"] = f"import failed: {exc}"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = f"{props.total_memory / 2**30:.1f}"
        info["gpu_capability"] = f"sm_{props.major}{props.minor}"
        bw = peak_bandwidth(props.name)
        info["gpu_peak_bandwidth"] = f"{bw / 1e12:.2f} TB/s" if bw else "unknown"
    return info


def time_fn(fn: Callable[[], object], device: torch.device, *, threads: int, min_run_time: float,
            min_repeats: int, use_graph: bool = True) -> Measurement:
    """One callable timed alone (blocks of :class:`BlockTimer` until ``min_repeats`` blocks and
    ``min_run_time`` seconds): for scripts with a single contender per measurement (gpu_check)."""
    timer = BlockTimer(fn, device, threads=threads, use_graph=use_graph)
    return time_interleaved({"fn": timer}, min_run_time=min_run_time, min_repeats=min_repeats)["fn"]
