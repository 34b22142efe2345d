"""The ops of the GPU cost model, run by the SIMT emulator with its counters on: route forward,
route backward, permute (plan + row copy) and unpermute (weighted gather), on random bf16 inputs.
Each run returns the per-launch counter records (kernel instantiation named from the library's
symbols), the op's analytic FLOPs per kernel and its minimum DRAM traffic."""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from l2r_cuda.ops import plan_maps_every_row
from tests.simt import harness as simt
from tests.simt.drivers import permute as permute_emu

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import backends  # noqa: E402  (tests/backends.py: the route kernels' emulator driver)


@dataclass(frozen=True)
class Shape:
    model: str
    d: int
    E: int
    k: int
    r: int
    H: int
    T: int

    @property
    def key(self) -> str:
        return f"{self.model} d={self.d} E={self.E} k={self.k} r={self.r} H={self.H} T={self.T}"


def padded_rank(r: int) -> int:
    if r <= 32:
        return 1 << max(0, math.ceil(math.log2(max(r, 1))))
    return (r + 7) // 8 * 8


def _records(lib) -> list[dict]:
    syms = simt._symbols(lib)
    recs = simt.counters(lib, reset=True)
    for r in recs:
        r["kernel"] = simt._pretty(syms.get(r["fn_offset"], r["name"]))
    return recs


def route_flops(s: Shape) -> dict[str, dict[str, float]]:
    """Analytic FLOPs per kernel (base name -> FLOPs) of the forward and the backward."""
    rp = padded_rank(s.r)
    scoring = 2.0 * s.T * s.E * s.H * rp * (2 if s.H > 1 else 1)  # expert_logit: two passes when H > 1
    fwd = {"route_forward_kernel": 2.0 * s.T * s.d * rp + 2.0 * s.T * s.d + scoring}
    bwd = {
        # recompute the logits, then per anchor: u, dah and acc updates
        "route_backward_token_kernel": scoring + 6.0 * s.T * s.E * s.H * rp + 2.0 * 2.0 * s.T * s.d * rp,
        "route_backward_column_kernel": 2.0 * s.T * s.d * rp,
    }
    return {"forward": fwd, "backward": bwd}


def run_route(lib, s: Shape, seed: int = 0) -> dict[str, dict]:
    g = torch.Generator().manual_seed(seed)
    call = backends._call("route", s.T, s.d, s.r, s.E, s.H, s.k, None, beta=1.0, norm="rms")
    x = torch.randn(s.T, s.d, generator=g).to(torch.bfloat16)
    proj = torch.randn(s.r, s.d, generator=g) / math.sqrt(s.d)
    anchors = torch.randn(s.E, s.H, s.r, generator=g)
    scale = torch.tensor([4.0])
    norm_weight = 1.0 + 0.1 * torch.randn(s.d, generator=g)
    simt.reset_counters(lib)
    # As an eager call of the torch op runs it: the executor keeps the ticket counters zero for the
    # stream (route_ops_cuda.cpp persistent_counters), so the plan has no memset step. (Captured
    # into a CUDA graph, the plan zeroes a workspace slice instead: one more launch, ~2 us here.)
    fwd = backends._forward(call, x, proj, anchors, scale, norm_weight, None, None, None, seed=seed,
                            persistent_counters=True)
    fwd_recs = _records(lib)
    grads = (torch.randn(s.T, s.k, generator=g), torch.randn(s.E, generator=g), None, None)
    saved = (x, proj, anchors, scale, norm_weight, None, None, fwd["indices"], fwd["q"], fwd["rstd"])
    backends._backward(call, grads, saved, seed=seed)
    bwd_recs = _records(lib)
    flops = route_flops(s)
    if any(r.get("mma", 0) for r in fwd_recs):
        # The projection ran on tensor cores (the emulator counted its mma.sync: the cost model's
        # tensor term). The CUDA cores split each staged projection value into three bf16 parts,
        # once per m-group (4) of each block of 8 chunks (128 tokens): about 6 FLOPs a value.
        fwd = flops["forward"]
        fwd["route_forward_kernel"] -= 2.0 * s.T * s.d * padded_rank(s.r)
        fwd["route_forward_kernel"] += 6.0 * 4 * 32 * s.d * -(-s.T // 128)
    if any(r.get("mma", 0) for r in bwd_recs):
        # dL/dx_hat = grad_q W and the projection's partials ran on tensor cores in the column kernel
        # (route_column_mma.cuh): the token kernel keeps only the scoring (and RMSNorm's mean_dot,
        # 2 FLOPs per rank), and the CUDA cores split operands into bf16 parts (each warp's
        # kColumnMmaWarpCols = 16 columns: per token 32 grad_q values into two parts, ~4 FLOPs a
        # value, and 32 rstd * grad_q values into three, ~6; the product rstd * grad_q once per
        # block of 128 columns when staged) and run RMSNorm's epilogue (~4 FLOPs per element of dL/dx).
        bwd = flops["backward"]
        rp = padded_rank(s.r)
        bwd["route_backward_token_kernel"] += -2.0 * 2.0 * s.T * s.d * rp + 2.0 * s.T * rp
        bwd["route_backward_column_kernel"] = (s.T * -(-s.d // 16) * 32 * (4 + 6) + s.T * -(-s.d // 128) * 32
                                               + 4.0 * s.T * s.d)
    xb = s.T * s.d * 2
    return {
        "route forward": dict(records=fwd_recs, flops=flops["forward"], min_bytes=xb,
                              min_what="read x once"),
        "route backward": dict(records=bwd_recs, flops=flops["backward"], min_bytes=2 * xb,
                               min_what="read x, write grad_x"),
    }


def run_permute(lib, s: Shape, seed: int = 0) -> dict[str, dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(s.T, s.d, generator=g).to(torch.bfloat16)
    indices = torch.rand(s.T, s.E, generator=g).topk(s.k, dim=1).indices
    weights = torch.rand(s.T, s.k, generator=g)
    simt.reset_counters(lib)
    row_map, offsets, _, flag = permute_emu.plan(lib, indices, s.E, seed=seed)
    assert flag == 0
    plan_launches = len(simt.counters(lib, reset=False))
    num_rows = int(offsets[-1])
    # as l2r_cuda.permute() calls it (align 1, exact size: every row is some slot's, no scratch reset)
    y = permute_emu.permute_rows(lib, x, row_map, num_rows, seed=seed,
                                 every_row_mapped=plan_maps_every_row(1, False, False))
    perm_recs = _records(lib)
    permute_emu.gather(lib, y, row_map, weights, seed=seed)
    unperm_recs = _records(lib)
    rows = s.T * s.k * s.d * 2
    return {
        "permute": dict(records=perm_recs, flops={}, min_bytes=s.T * s.d * 2 + rows,
                        min_what="read x, write T*k rows", plan_launches=plan_launches),
        "unpermute": dict(records=unperm_recs, flops={"gather_reduce_kernel": 2.0 * s.T * s.k * s.d},
                          min_bytes=rows + s.T * s.d * 2, min_what="read T*k rows, write T rows"),
    }


def run_permute_plan(lib, s: Shape, seed: int = 0) -> list[dict]:
    """The dispatch plan alone (no row copy: its indices are all it reads) at shape s: its
    per-launch counter records. For shapes whose rows would not fit the emulator."""
    g = torch.Generator().manual_seed(seed)
    indices = torch.rand(s.T, s.E, generator=g).topk(s.k, dim=1).indices
    simt.reset_counters(lib)
    _, _, _, flag = permute_emu.plan(lib, indices, s.E, seed=seed)
    assert flag == 0
    return _records(lib)


def build_libs():
    """The emulator libraries (the memory checker is compiled in by default); racecheck off (the model needs
    counters, not race detection), memcheck on (cheap, and an out-of-bounds access would make
    the counts meaningless)."""
    libs = {"route": backends.simt_library(), "permute": permute_emu.build(sanitize=True)}
    for lib in libs.values():
        simt.set_checks(lib, memcheck=True, racecheck=False, counters=True)
    return libs
