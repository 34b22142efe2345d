"""Timing and machine description for the benchmarks.

CPU: ``torch.utils.benchmark.Timer`` (thread count pinned through ``num_threads``), several blocks
of ``number`` calls each, sized adaptively from a warm-up estimate so that every measurement has at
least ``min_repeats`` blocks. Reported: median and IQR (and min/max) of the per-call time of each
block.

CUDA: the callable is warmed up on a side stream, then captured into a CUDA graph and timed by
replaying it between CUDA events (no launch overhead, no Python in the loop). When capture is not
possible (an op syncs with the host, e.g. ``bincount`` sizing its output), it falls back to CUDA
events around eager calls; the row says which (``timer`` column).
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

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


def time_cpu(
    fn: Callable[[], object],
    *,
    threads: int,
    min_run_time: float = 1.0,
    min_repeats: int = 5,
    max_repeats: int = 50,
    warmup: int = 2,
    block_time: float = 0.02,
) -> Measurement:
    """Time ``fn()`` on CPU with ``torch.utils.benchmark.Timer``.

    Warm-up calls first (``warmup``, at least one), whose duration sizes the blocks: ``number``
    calls per block so a block lasts ~``block_time`` s, and as many blocks as fit in
    ``min_run_time`` s, clamped to ``[min_repeats, max_repeats]``.
    """
    from torch.utils.benchmark import Timer

    t_est = float("inf")
    for _ in range(max(1, warmup)):
        t0 = time.perf_counter()
        fn()
        t_est = min(t_est, time.perf_counter() - t0)
    t_est = max(t_est, 1e-7)
    number = max(1, int(block_time / t_est))
    repeats = int(min_run_time / (number * t_est))
    repeats = max(min_repeats, min(max_repeats, repeats))
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    times = [timer.timeit(number).mean for _ in range(repeats)]
    return Measurement(times, number, "torch.utils.benchmark")


def time_cuda(
    fn: Callable[[], object],
    *,
    device: torch.device,
    min_run_time: float = 1.0,
    min_repeats: int = 5,
    max_repeats: int = 50,
    warmup: int = 3,
    use_graph: bool = True,
) -> Measurement:
    """Time ``fn()`` on a CUDA device: CUDA-graph replay between CUDA events when it captures,
    CUDA events around eager calls otherwise."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(max(1, warmup)):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    _sync(device)

    call = fn
    timer = "cuda_events"
    note = ""
    if use_graph:
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            graph.replay()
            _sync(device)
            call = graph.replay
            timer = "cuda_graph"
        except Exception as exc:  # not capturable: host sync, CPU scalar, ...
            note = f"graph capture failed: {type(exc).__name__}"
            _sync(device)
            call = fn

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    call()
    end.record()
    end.synchronize()
    t_est = max(start.elapsed_time(end) / 1e3, 1e-7)
    number = max(1, int(0.005 / t_est))
    repeats = max(min_repeats, min(max_repeats, int(min_run_time / (number * t_est))))
    times = []
    for _ in range(repeats):
        start.record()
        for _ in range(number):
            call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / number)
    m = Measurement(times, number, timer)
    if note:
        m.extra["note"] = note
    return m


def time_fn(fn: Callable[[], object], device: torch.device, *, threads: int, min_run_time: float,
            min_repeats: int, max_repeats: int = 50, use_graph: bool = True, warmup: int = 2) -> Measurement:
    """CPU: :func:`time_cpu`; CUDA: :func:`time_cuda` (``use_graph=False`` for callables known to
    synchronize with the host, which cannot be captured)."""
    if device.type == "cuda":
        return time_cuda(fn, device=device, min_run_time=min_run_time, min_repeats=min_repeats,
                         max_repeats=max_repeats, use_graph=use_graph)
    return time_cpu(fn, threads=threads, min_run_time=min_run_time, min_repeats=min_repeats,
                    max_repeats=max_repeats, warmup=warmup)


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
