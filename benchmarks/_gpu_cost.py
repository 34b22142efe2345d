"""The GPU cost model: device figures and the equations that turn one kernel launch's emulator
counters (tests/simt/runtime/simt_counters.cpp) into an estimated time on an H100 / H200.

A model, not a measurement. Every figure below is an assumption, stated where it is defined;
scripts/gpu_check.sh puts measured times next to these estimates on a real GPU.

Per launch:
    t_dram    = unique DRAM bytes (first touch of every 32-byte sector, reads + writes) / HBM bandwidth
    t_l2      = global sectors requested * 32 B / L2 bandwidth          (no L1 hits assumed)
    t_l1      = global sectors requested / (active SMs * 4 sectors/clk)  (L1/LSU throughput)
    t_smem    = (shared-memory wavefronts + MIO instructions of warp collectives) / (active SMs * 1/clk)
    t_fp32    = FLOPs / (active SMs * 256 FLOP/clk)                      (FLOPs counted analytically)
    t_tensor  = mma.sync instructions * 4096 FLOP / (active SMs * 2048 FLOP/clk)  (m16n8k16: 2048 FMAs;
                the emulator counts the instructions)
    t_latency = waves * (busiest warp's L1-missing loads * miss latency + L1-hitting loads * hit
                latency) / loads in flight    (L1 hit: every sector already touched by its block)
    time      = launch gap + max(all of the above)     (the largest term names the bound)
active SMs = blocks / ceil(blocks / SMs): the per-SM terms are the busiest SM's, which runs
ceil(blocks / SMs) of the (equal) blocks (192 blocks on 132 SMs: 2 blocks on the busiest, as if
96 SMs shared the work; min(SMs, blocks) when blocks <= SMs; wave quantization);
waves = ceil(blocks / (SMs * resident blocks per SM)); resident
blocks per SM from threads, registers (ptxas, benchmarks/results/ptxas_sm90.md) and shared memory
(static + dynamic + 1 KiB reserved per block), as the CUDA occupancy calculator does.
A cudaMemsetAsync of the op (a plan's memset step) is a launch of its own: launch gap + its bytes
at HBM bandwidth.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from tests.simt.rewrite import strip_parameters


@dataclass(frozen=True)
class Device:
    name: str
    hbm_gbs: float                     # peak HBM bandwidth, GB/s (vendor figure)
    sms: int = 132                     # SXM parts
    clock_ghz: float = 1.755           # sustained SM clock under load (boost is 1.98 GHz)
    l2_bytes_per_clk: int = 5120       # whole-chip L2 bandwidth (A100/H100-class figure)
    l1_sectors_per_clk: int = 4        # per SM: 128 B/clk of L1 / load-store throughput
    smem_wavefronts_per_clk: int = 1   # per SM: 32 banks x 4 B = 128 B/clk
    fp32_flops_per_clk: int = 256      # per SM: 128 FP32 lanes, FMA = 2 FLOPs
    # per SM, bf16 mma.sync with float accumulation: half of the 4096 FLOP/clk of Hopper's dense bf16
    # peak (989 TFLOP/s = 132 SMs x 1.83 GHz x 4096), which only the asynchronous warpgroup MMA
    # (wgmma) reaches; public reports put mma.sync at about half of wgmma's throughput on sm_90.
    mma_sync_flops_per_clk: int = 2048
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    regs_per_sm: int = 65536
    smem_per_sm: int = 233472          # 228 KiB
    smem_reserved_per_block: int = 1024
    load_latency_clk: int = 550        # a global load that misses L1 (DRAM/L2 mix), in SM clocks
    l1_hit_latency_clk: int = 40       # a global load served by L1
    loads_in_flight: int = 4           # independent loads a warp keeps in flight (unrolled loops)
    launch_gap_us: float = 2.0         # GPU time between dependent kernels of one stream

    @property
    def clock_hz(self) -> float:
        return self.clock_ghz * 1e9


def ceiling_us(dev: Device, launches: int, min_bytes: float, flops: float, tensor_flops: float = 0.0) -> float:
    """The fastest any kernels doing the op's work in `launches` launches can be under this model's own
    terms: the launch gaps, plus the largest of the unavoidable DRAM traffic at peak bandwidth, the
    op's CUDA-core FLOPs at the full chip's FP32 FMA rate and its tensor-core FLOPs (mma.sync) at the
    full chip's mma.sync rate. An op whose ceiling is below a target cannot meet it by any kernel
    change that keeps the launch count and the arithmetic."""
    t_dram = min_bytes / (dev.hbm_gbs * 1e9)
    t_fp32 = flops / (dev.sms * dev.fp32_flops_per_clk * dev.clock_hz)
    t_tensor = tensor_flops / (dev.sms * dev.mma_sync_flops_per_clk * dev.clock_hz)
    return launches * dev.launch_gap_us + max(t_dram, t_fp32, t_tensor) * 1e6


# The terms of one launch's estimate, in the order the report prints them.
TERMS = ("dram", "l2", "l1", "smem", "fp32", "tensor", "latency")
MMA_FLOPS = 2 * 16 * 8 * 16  # one mma.sync.m16n8k16: 2048 multiply-adds

DEVICES = {
    "H200": Device("H200", hbm_gbs=4800.0),
    "H100": Device("H100", hbm_gbs=3350.0),
}

ASSUMPTIONS = [
    "H200 SXM: 132 SMs, 4.8 TB/s HBM3e; H100 SXM: 132 SMs, 3.35 TB/s HBM3; both at a sustained 1.755 GHz SM clock",
    "peak figures throughout: no DRAM efficiency factor (real kernels reach about 90 % of peak HBM bandwidth)",
    "L2: 5120 B/clk for the chip; L1/LSU: 4 sectors (128 B)/clk per SM; shared memory: one 128-byte wavefront/clk per SM, "
    "shared with the warp collectives that issue through the same MIO pipe (one per shuffle of 4 bytes, 8-byte shuffles "
    "two, one per redux; votes and __syncwarp free)",
    "every global sector requested goes through L2 (no L1 hits), every first touch of a sector in a launch goes to DRAM "
    "(nothing stays in L2 between launches; a sector written and then read in one launch is one DRAM write)",
    "latency: 550 clocks per global load that misses L1, 40 per L1 hit (every sector already touched by the same block), "
    "4 independent loads in flight per warp; a wave lasts as long as its busiest warp's chain of global loads",
    "2 us per launch (GPU-side gap between dependent kernels, launch latency included); a cudaMemsetAsync step is a "
    "launch too (gap + its bytes at HBM bandwidth)",
    "FP32: 256 FLOP/clk per SM, FLOPs counted analytically per kernel (projection, scoring, gradients)",
    "tensor cores: 2048 FLOP/clk per SM for bf16 mma.sync (m16n8k16, float accumulation; the emulator counts the "
    "instructions): half of the H100/H200 dense bf16 peak, which needs wgmma; an assumption, not a measurement",
    "per-SM throughput (L1, shared memory, FP32) is the busiest SM's: blocks do equal work and an SM runs "
    "ceil(blocks / SMs) of them (a grid of 192 blocks on 132 SMs takes as long as 96 SMs would for its work)",
    "occupancy from ptxas registers (benchmarks/results/ptxas_sm90.md; 32 when a kernel is missing there), "
    "threads per block and static + dynamic shared memory (+1 KiB reserved per block)",
    "counts come from the SIMT emulator running the unchanged kernels: a warp-level request is the n-th execution of one "
    "access site by the lanes of a warp, which is how the hardware groups lanes as long as they do not diverge",
]


def normalize_kernel(name: str) -> str:
    """A kernel instantiation name comparable between nm (emulator) and ptxas tables."""
    n = strip_parameters(re.sub(r"\(anonymous namespace\)::", "", name))
    n = re.sub(r"^void ", "", n)
    n = re.sub(r"\bl2r::\w+::", "", n)
    return n.replace(" ", "")


def load_registers(path: Path) -> dict[str, int]:
    """kernel (normalized) -> registers per thread, from a ptxas_<arch>.md table."""
    regs: dict[str, int] = {}
    if not path.exists():
        return regs
    for line in path.read_text().splitlines():
        m = re.match(r"\|\s*`([^`]+)`\s*\|\s*(\d+)\s*\|", line)
        if m:
            regs[normalize_kernel(m.group(1))] = int(m.group(2))
    return regs


@dataclass
class KernelEstimate:
    kernel: str
    terms_us: dict = field(default_factory=dict)
    time_us: float = 0.0
    bound: str = ""
    blocks_per_sm: int = 0
    warps_per_sm: int = 0
    waves: int = 0
    registers: int = 0
    registers_known: bool = True


def occupancy(dev: Device, threads: int, regs: int, smem_bytes: int) -> int:
    """Resident blocks per SM (the CUDA occupancy calculator's rules, allocation granularity of
    registers 256 per warp)."""
    warps = max(1, math.ceil(threads / 32))
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = dev.regs_per_sm // (warps * regs_per_warp)
    by_warps = dev.max_warps_per_sm // warps
    by_smem = dev.smem_per_sm // (smem_bytes + dev.smem_reserved_per_block)
    return max(0, min(by_regs, by_warps, by_smem, dev.max_blocks_per_sm))


def estimate(dev: Device, rec: dict, registers: dict[str, int], flops: float = 0.0) -> KernelEstimate:
    """Estimated time of one launch from its counter record (see the module docstring)."""
    name = rec["kernel"]
    norm = normalize_kernel(name)
    est = KernelEstimate(kernel=name)
    if rec.get("memset"):
        t_dram = rec["dram_write"] / (dev.hbm_gbs * 1e9)
        est.terms_us = {k: 0.0 for k in TERMS}
        est.terms_us["dram"] = t_dram * 1e6
        est.bound, est.time_us, est.waves = "dram", dev.launch_gap_us + t_dram * 1e6, 1
        return est
    est.registers_known = norm in registers
    est.registers = registers.get(norm, 32)
    threads = rec["block"][0] * rec["block"][1] * rec["block"][2]
    blocks = rec["grid"][0] * rec["grid"][1] * rec["grid"][2]
    smem = rec["dyn_smem"] + rec["static_smem"]
    est.blocks_per_sm = occupancy(dev, threads, est.registers, smem)
    est.warps_per_sm = est.blocks_per_sm * math.ceil(threads / 32)
    per_wave = max(1, dev.sms * est.blocks_per_sm)
    est.waves = math.ceil(blocks / per_wave)
    active = blocks / math.ceil(blocks / dev.sms)  # the busiest SM's share (module docstring)
    clk = dev.clock_hz
    sectors = sum(rec[k]["sectors"] for k in ("global_load", "global_store", "global_atomic"))
    wavefronts = sum(rec[k]["wavefronts"] for k in ("shared_load", "shared_store", "shared_atomic"))
    wavefronts += rec.get("collectives", 0)
    t = {
        "dram": (rec["dram_read"] + rec["dram_write"]) / (dev.hbm_gbs * 1e9),
        "l2": sectors * 32 / (dev.l2_bytes_per_clk * clk),
        "l1": sectors / (active * dev.l1_sectors_per_clk * clk),
        "smem": wavefronts / (active * dev.smem_wavefronts_per_clk * clk),
        "fp32": flops / (active * dev.fp32_flops_per_clk * clk),
        "tensor": rec.get("mma", 0) * MMA_FLOPS / (active * dev.mma_sync_flops_per_clk * clk),
        "latency": est.waves * (rec["max_warp_load_misses"] * dev.load_latency_clk +
                                rec["max_warp_load_hits"] * dev.l1_hit_latency_clk) / dev.loads_in_flight / clk,
    }
    est.terms_us = {k: v * 1e6 for k, v in t.items()}
    est.bound = max(t, key=t.get)
    est.time_us = dev.launch_gap_us + max(t.values()) * 1e6
    return est
