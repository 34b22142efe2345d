"""Expert MLPs: stacked SwiGLU experts, ready for a grouped GEMM over the rows that ``permute`` groups
by expert, and the always-on shared experts."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SwiGLUExperts", "SharedExperts"]


def _grouped_mm_supported(x: Tensor, weight: Tensor) -> bool:
    # torch._grouped_mm's fast kernels: CUDA, bf16, Hopper (sm90) or newer, 16-byte aligned rows
    # (feature sizes multiple of 8 in bf16). Anything else takes the per-expert loop (the CPU
    # kernel exists in recent torch but its backward is not reliable).
    return (
        hasattr(torch, "_grouped_mm")
        and x.is_cuda
        and weight.shape[-1] % 8 == 0
        and weight.shape[-2] % 8 == 0
        and x.dtype == torch.bfloat16
        and weight.dtype == torch.bfloat16
        and torch.cuda.get_device_capability(x.device)[0] >= 9
    )


class SwiGLUExperts(nn.Module):
    """``E`` SwiGLU feed-forward experts with their weights stacked, ready for a grouped GEMM.

    Expert ``e`` computes ``down_e( silu(x @ w_gate[e]) * (x @ w_up[e]) )``:

    - ``w_gate [E, d, f]``, ``w_up [E, d, f]``, ``w_down [E, f, d]`` stored input-major (``x @ W``),
      which is the ``[G, K, N]`` layout ``torch._grouped_mm`` takes.
    - ``forward(x [N, d], expert_offsets [E+1])``: rows ``offsets[e]:offsets[e+1]`` go to expert ``e``
      (the output of ``l2r_cuda.permute``); rows past ``offsets[-1]`` come out as zeros.
    - ``use_grouped_mm``: ``None`` (default) uses ``torch._grouped_mm`` when it is fast (CUDA, bf16,
      sm90+) and otherwise a per-expert loop over the offsets; ``True``/``False`` force one path.

    Init: uniform(+-1/sqrt(fan_in)) per matrix, like ``nn.Linear``.
    """

    def __init__(self, num_experts: int, d_model: int, d_ff: int, *, use_grouped_mm: Optional[bool] = None,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.use_grouped_mm = use_grouped_mm
        self.w_gate = nn.Parameter(torch.empty(num_experts, d_model, d_ff, **factory))
        self.w_up = nn.Parameter(torch.empty(num_experts, d_model, d_ff, **factory))
        self.w_down = nn.Parameter(torch.empty(num_experts, d_ff, d_model, **factory))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for weight, fan_in in ((self.w_gate, self.d_model), (self.w_up, self.d_model), (self.w_down, self.d_ff)):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(weight, -bound, bound)

    def expert_forward(self, x: Tensor, expert: int) -> Tensor:
        """Expert ``expert`` alone on rows ``x [n, d]`` (the per-token definition the tests use)."""
        x = x.to(self.w_gate.dtype)
        return (F.silu(x @ self.w_gate[expert]) * (x @ self.w_up[expert])) @ self.w_down[expert]

    def forward(self, x: Tensor, expert_offsets: Tensor) -> Tensor:
        use_grouped = self.use_grouped_mm
        if use_grouped is None:
            use_grouped = _grouped_mm_supported(x, self.w_gate)
        if use_grouped:
            return self._forward_grouped(x, expert_offsets)
        return self._forward_loop(x, expert_offsets)

    def _forward_grouped(self, x: Tensor, expert_offsets: Tensor) -> Tensor:
        # offs are the int32 end rows of each group; rows after the last group are not computed.
        ends = expert_offsets[1:].to(torch.int32)
        x = x.to(self.w_gate.dtype)
        hidden = F.silu(torch._grouped_mm(x, self.w_gate, offs=ends)) * torch._grouped_mm(x, self.w_up, offs=ends)
        out = torch._grouped_mm(hidden, self.w_down, offs=ends)
        tail = torch.arange(x.shape[0], device=x.device) >= expert_offsets[-1]
        return out.masked_fill(tail[:, None], 0.0)

    def _forward_loop(self, x: Tensor, expert_offsets: Tensor) -> Tensor:
        # One host sync for the E+1 offsets, then one dense SwiGLU per non-empty expert slice. The
        # slices are disjoint and cover rows [0, offsets[-1]), so concatenation rebuilds the order.
        bounds = expert_offsets.tolist()
        pieces = []
        for expert in range(self.num_experts):
            start, end = bounds[expert], bounds[expert + 1]
            if end > start:
                pieces.append(self.expert_forward(x[start:end], expert))
        tail = x.shape[0] - bounds[-1]
        if tail > 0:
            pieces.append(x.new_zeros(tail, self.d_model, dtype=self.w_down.dtype))
        if not pieces:
            return x.new_zeros(x.shape[0], self.d_model, dtype=self.w_down.dtype)
        return torch.cat(pieces, dim=0)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}"


class SharedExperts(nn.Module):
    """Always-on experts: every token goes through them, their output is added to the routed one
    (DeepSeekMoE's shared experts, Qwen2-MoE's shared expert, Megatron-Core's ``shared_experts``).

    ``n`` shared SwiGLU experts of width ``f`` sum to one SwiGLU MLP of width ``n*f`` (the hidden
    units just concatenate), so they are held as one MLP of width ``d_ff`` (pass ``n*f``; DeepSeek-V3
    does the same with ``n_shared_experts * moe_intermediate_size``). ``gate=True`` multiplies the
    output per token by ``sigmoid(x . w_gate)``, a learned scalar gate (Qwen2-MoE's
    ``shared_expert_gate``, Megatron-Core's ``moe_shared_expert_gate``); ``gate_weight [d]`` starts
    at zero, i.e. a gate of 0.5 for every token.

    ``forward(x [N, d]) -> [N, d]`` in the weights' dtype.
    """

    def __init__(self, d_model: int, d_ff: int, *, gate: bool = False, device=None, dtype=None):
        super().__init__()
        if d_model < 1 or d_ff < 1:
            raise ValueError(f"SharedExperts: d_model and d_ff must be >= 1, got {d_model}, {d_ff}")
        self.d_model, self.d_ff = d_model, d_ff
        self.mlp = SwiGLUExperts(1, d_model, d_ff, use_grouped_mm=False, device=device, dtype=dtype)
        if gate:
            self.gate_weight = nn.Parameter(torch.zeros(d_model, device=device, dtype=dtype))
        else:
            self.register_parameter("gate_weight", None)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.mlp.reset_parameters()
        if self.gate_weight is not None:
            self.gate_weight.zero_()

    def forward(self, x: Tensor) -> Tensor:
        out = self.mlp.expert_forward(x, 0)
        if self.gate_weight is not None:
            out = out * torch.sigmoid(x.to(self.gate_weight.dtype) @ self.gate_weight).unsqueeze(-1)
        return out

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_ff={self.d_ff}, gate={self.gate_weight is not None}"
