"""Upcycle a trained OLMoE's linear gates into L2R routers, on CPython's own docs (no download).

    python -m experiments.upcycle_olmoe            # full run -> results/upcycle_olmoe/
    python -m experiments.upcycle_olmoe --quick    # smoke test (seconds)

1. Trains a tiny byte-level ``transformers.OlmoeForCausalLM`` (linear top-k gates, the model's own
   Switch loss) on the training split of ``pydoc_data.topics`` (the topics in sorted key order,
   UTF-8; the last 10% of the bytes held out).
2. For each rank ``r`` in ``--ranks`` and each initialisation (``linear``: upcycled from the trained
   gate; ``random``: L2R's own init, for comparison), on a copy of that model:
   ``hf.replace_routers(model, rank=r, num_anchors=H, init=...)``, then ``hf.distill_routers`` on
   training batches (only the routers train; the rest of the model is frozen).
3. Measures on held-out windows, before and after distillation: top-k agreement with the original
   gates (``hf.routing_agreement``: share of the original top-k experts the L2R router also picks,
   over every layer and token, with L2R routing the model) and the LM loss (mean next-byte
   cross-entropy, nats), next to the original model's loss.

Writes ``results.json`` and ``summary.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from typing import Dict, List

import torch
import transformers

from l2r_cuda.integrations import hf

from .corpora import prose_documents

VAL_FRACTION = 0.1


def load_corpus() -> bytes:
    """The ``pydoc_data.topics`` text, topics in sorted key order, as UTF-8 bytes."""
    return b"".join(text for _, text in prose_documents())


CONTEXT = 64
MODEL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, max_position_embeddings=CONTEXT,
             pad_token_id=None, bos_token_id=None, eos_token_id=None, router_aux_loss_coef=0.01)


def build_model(seed: int) -> transformers.OlmoeForCausalLM:
    torch.manual_seed(seed)
    return transformers.OlmoeForCausalLM(transformers.OlmoeConfig(**MODEL))


def split_corpus():
    data = torch.frombuffer(bytearray(load_corpus()), dtype=torch.uint8).to(torch.int64)
    n_val = int(len(data) * VAL_FRACTION)
    return data[:-n_val], data[-n_val:]


def sample_windows(data: torch.Tensor, gen: torch.Generator, batch_size: int) -> torch.Tensor:
    start = torch.randint(len(data) - CONTEXT, (batch_size,), generator=gen)
    return data[start[:, None] + torch.arange(CONTEXT)]


def train(model, data: torch.Tensor, steps: int, batch_size: int, lr: float, seed: int) -> List[float]:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    history = []
    for _ in range(steps):
        ids = sample_windows(data, gen, batch_size)
        out = model(ids, labels=ids, output_router_logits=True)  # LM loss + the model's Switch loss
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        history.append(out.loss.item())
    model.eval()
    return history


@torch.no_grad()
def lm_loss(model, windows: List[torch.Tensor]) -> float:
    """Mean next-byte cross-entropy (nats) over the windows, without any auxiliary loss."""
    was_training = model.training
    model.eval()
    total = sum(model(ids, labels=ids, output_router_logits=False).loss.item() for ids in windows)
    model.train(was_training)
    return total / len(windows)


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: a few steps, one rank")
    parser.add_argument("--train-steps", type=int, default=None, help="OLMoE training steps (default 200)")
    parser.add_argument("--distill-steps", type=int, default=None, help="distillation steps (default 100)")
    parser.add_argument("--ranks", type=int, nargs="+", default=None, help="L2R ranks (default 2 8)")
    parser.add_argument("--num-anchors", type=int, default=4, help="anchors per expert (default 4)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/upcycle_olmoe", help="output directory")
    args = parser.parse_args(argv)
    train_steps = args.train_steps if args.train_steps is not None else (5 if args.quick else 200)
    distill_steps = args.distill_steps if args.distill_steps is not None else (3 if args.quick else 100)
    ranks = args.ranks or ([2] if args.quick else [2, 8])
    eval_windows = 2 if args.quick else 8

    started = time.time()
    train_data, val_data = split_corpus()
    eval_gen = torch.Generator().manual_seed(10_000 + args.seed)
    eval_batches = [sample_windows(val_data, eval_gen, args.batch_size) for _ in range(eval_windows)]
    distill_gen = torch.Generator().manual_seed(20_000 + args.seed)
    distill_batches = [sample_windows(train_data, distill_gen, args.batch_size) for _ in range(distill_steps or 1)]

    model = build_model(args.seed)
    history = train(model, train_data, train_steps, args.batch_size, 3e-3, args.seed)
    original_loss = lm_loss(model, eval_batches)
    print(f"trained OLMoE ({train_steps} steps): train loss {history[0]:.3f} -> {history[-1]:.3f}, "
          f"held-out LM loss {original_loss:.4f}")

    runs = []
    for rank in ranks:
        for init in ("linear", "random"):
            torch.manual_seed(args.seed + 1)
            upcycled = copy.deepcopy(model)
            hf.replace_routers(upcycled, rank=rank, num_anchors=args.num_anchors, init=init)
            loss_before = lm_loss(upcycled, eval_batches)
            report = hf.distill_routers(upcycled, distill_batches, distill_steps, lr=1e-2,
                                        eval_batches=eval_batches, progress=not args.quick)
            run = dict(rank=rank, num_anchors=args.num_anchors, init=init,
                       agreement_before=report.agreement_before, agreement_after=report.agreement_after,
                       lm_loss_before=loss_before, lm_loss_after=lm_loss(upcycled, eval_batches),
                       kl_first=report.kl[0] if report.kl else None, kl_last=report.kl[-1] if report.kl else None)
            runs.append(run)
            print(f"r={rank} H={args.num_anchors} init={init}: {report}; LM loss {run['lm_loss_before']:.4f} -> "
                  f"{run['lm_loss_after']:.4f} (original {original_loss:.4f})")

    result = dict(
        command="python -m experiments.upcycle_olmoe" + (" " + " ".join(argv) if argv else ""),
        model=MODEL, context=CONTEXT, batch_size=args.batch_size, train_steps=train_steps,
        distill_steps=distill_steps, eval_tokens=eval_windows * args.batch_size * CONTEXT, seed=args.seed,
        train_loss_first=history[0], train_loss_last=history[-1], original_lm_loss=original_loss, runs=runs,
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                f"transformers {transformers.__version__}",
        seconds=round(time.time() - started, 1),
    )
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(summary_md(result))
    print(f"wrote {args.out}/results.json and summary.md ({result['seconds']} s)")
    return result


def summary_md(result: Dict) -> str:
    lines = [
        "# Upcycling a trained OLMoE's linear gates into L2R routers",
        "",
        f"`{result['command']}` ({result['seconds']} s; {result['machine']}). Tiny byte-level OLMoE "
        f"(d={result['model']['hidden_size']}, {result['model']['num_hidden_layers']} layers, "
        f"{result['model']['num_experts']} experts, top-{result['model']['num_experts_per_tok']}) trained "
        f"{result['train_steps']} steps on pydoc_data.topics (train loss {result['train_loss_first']:.3f} -> "
        f"{result['train_loss_last']:.3f}); distillation: {result['distill_steps']} steps, only the routers "
        f"train. Held-out: {result['eval_tokens']} tokens. Original model's LM loss: "
        f"**{result['original_lm_loss']:.4f}** nats/byte.",
        "",
        "| r | H | init | top-k agreement before | after | LM loss before | after |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        lines.append(f"| {run['rank']} | {run['num_anchors']} | {run['init']} | {run['agreement_before']:.3f} | "
                     f"{run['agreement_after']:.3f} | {run['lm_loss_before']:.4f} | {run['lm_loss_after']:.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
