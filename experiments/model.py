"""A small pre-norm transformer whose FFNs are :class:`l2r_cuda.MoE` layers, and the paired
initialisation that makes every arm at a given seed differ in its router only.

Paired seeds: the model for ``(arm, seed)`` is built under ``torch.manual_seed(seed)``; every
non-router parameter is then overwritten with the one of a reference model built under the same
seed with the linear router (so the router's own parameter count cannot shift the random stream),
and every router is re-initialised under ``torch.manual_seed(seed + ROUTER_SEED_OFFSET)``.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from l2r_cuda import MoE

from .arms import LINEAR, NUM_EXPERTS, TOP_K, Arm

ROUTER_SEED_OFFSET = 1000


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

    def __init__(self, d_model: int, heads: int, d_ff: int, arm: Arm, causal: bool):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, heads, causal)
        self.ln2 = nn.LayerNorm(d_model)
        self.moe = MoE(d_model, d_ff, NUM_EXPERTS, TOP_K, router=arm.make_router(d_model))
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
    positions + ``layers`` MoE blocks + final LayerNorm + a linear head."""

    def __init__(self, arm: Arm, *, d_in: Optional[int], vocab: Optional[int], seq_len: int, d_model: int,
                 layers: int, heads: int, d_ff: int, causal: bool, d_out: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model) if vocab else nn.Linear(d_in, d_model)
        self.pos = nn.Parameter(torch.randn(seq_len, d_model) * 0.02)
        self.blocks = nn.ModuleList(Block(d_model, heads, d_ff, arm, causal) for _ in range(layers))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, d_out)

    def features(self, x: Tensor) -> Tensor:
        h = self.embed(x) + self.pos[: x.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.ln(h)

    def routers(self) -> List[nn.Module]:
        return [block.moe.router for block in self.blocks]

    def set_record(self, on: bool) -> None:
        for block in self.blocks:
            block.record = on
            if not on:
                block.moe_input = None


def build_paired(build_model, arm: Arm, seed: int) -> MoETransformer:
    """``build_model(arm)`` for ``(arm, seed)`` with non-router parameters identical across arms."""
    torch.manual_seed(seed)
    reference = build_model(Arm(LINEAR, router="linear"))
    torch.manual_seed(seed)
    model = build_model(arm)
    shared = {k: v for k, v in reference.state_dict().items() if ".router." not in k}
    missing, unexpected = model.load_state_dict(shared, strict=False)
    if unexpected or any(".router." not in k for k in missing):
        raise RuntimeError(f"paired init: unexpected {unexpected}, missing {missing}")
    torch.manual_seed(seed + ROUTER_SEED_OFFSET)
    for router in model.routers():
        router.reset_parameters()
    return model
