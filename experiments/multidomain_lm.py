"""L2R vs linear routing in a byte-level MoE language model on three text domains every CPython
install carries (no download): English prose, Python code, Unicode data records.

    python -m experiments.multidomain_lm            # full grid -> results/multidomain_lm/
    python -m experiments.multidomain_lm --quick    # smoke test (CI)

Corpus: :mod:`experiments.corpora` (documents split train/validation by a hash of their name).
Every training batch holds the same number of 64-byte windows from each domain, drawn uniformly from
that domain's training bytes. Model: byte embedding + learned positions, two causal pre-norm
blocks (self-attention + MoE FFN with 8 SwiGLU experts, top-2). Metric: multi-domain validation
bits/byte = the mean over the three domains of each domain's mean next-byte cross-entropy in bits,
on ``VAL_WINDOWS`` fixed 64-byte windows per domain at evenly spaced offsets of its validation text
(each window starts with an empty context). A token's label for the specialization metric is its
domain, so specialization = I(domain; top-1 expert) / H(domain). RoMA's task embedding is the
window's byte histogram; a window is successful when its loss is at most the batch median.
"""

from __future__ import annotations

import math
import platform

import torch
import torch.nn.functional as F

from .arms import Arm
from .corpora import DOMAINS, load_domains
from .model import MoETransformer
from .runner import Experiment, main as run_main
from .training import TrainConfig

CONTEXT = 64
D_MODEL, LAYERS, HEADS, D_FF = 64, 2, 4, 128
VAL_WINDOWS = 256
QUICK_VAL_WINDOWS = 16


class MultiDomainTask:
    title = "Multi-domain byte-level MoE LM"
    metric = "val_bpb"
    metric_label = "multi-domain validation bits/byte"
    higher_is_better = False
    extra_metrics = [(f"bpb_{d}", f"{d} bits/byte", False) for d in DOMAINS]
    num_labels = len(DOMAINS)
    label_names = list(DOMAINS)

    def __init__(self, quick: bool = False):
        domains = load_domains()
        self.train = [torch.frombuffer(bytearray(d.train), dtype=torch.uint8).to(torch.int64) for d in domains]
        windows = QUICK_VAL_WINDOWS if quick else VAL_WINDOWS
        val_x, val_y = [], []
        for d in domains:
            data = torch.frombuffer(bytearray(d.val), dtype=torch.uint8).to(torch.int64)
            starts = torch.linspace(0, len(data) - CONTEXT - 1, windows).long()
            chunk = data[starts[:, None] + torch.arange(CONTEXT + 1)]
            val_x.append(chunk[:, :-1])
            val_y.append(chunk[:, 1:])
        self.val_x, self.val_y = torch.stack(val_x), torch.stack(val_y)  # [D, W, C]
        sizes = ", ".join(f"{d.name} {len(d.train) / 1e6:.2f} MB train ({d.train_docs} docs) / "
                          f"{len(d.val) / 1e3:.0f} kB val ({d.val_docs} docs)" for d in domains)
        self.data_info = (f"CPython {platform.python_version()} install: {sizes}; {windows} validation windows "
                          f"of {CONTEXT} bytes per domain")
        self.model_info = (f"byte-level causal transformer, context {CONTEXT}, d_model {D_MODEL}, {LAYERS} blocks "
                           f"(attention + MoE FFN, expert d_ff {D_FF}), {HEADS} heads")

    def build_model(self, arm: Arm) -> MoETransformer:
        return MoETransformer(arm, d_in=None, vocab=256, seq_len=CONTEXT, d_model=D_MODEL, layers=LAYERS,
                              heads=HEADS, d_ff=D_FF, causal=True, d_out=256)

    def sample_batch(self, gen: torch.Generator, batch_size: int):
        """``batch_size / 3`` windows from each domain (domain-major)."""
        per_domain = batch_size // len(self.train)
        if per_domain * len(self.train) != batch_size:
            raise ValueError(f"batch_size {batch_size} must be a multiple of {len(self.train)} domains")
        chunks = []
        for data in self.train:
            start = torch.randint(len(data) - CONTEXT - 1, (per_domain,), generator=gen)
            chunks.append(data[start[:, None] + torch.arange(CONTEXT + 1)])
        chunk = torch.cat(chunks)
        return chunk[:, :-1], chunk[:, 1:]

    def loss(self, model, batch):
        """Mean next-byte cross-entropy, and which windows are at most the batch median (RoMA's success)."""
        x, y = batch
        nats = F.cross_entropy(model.head(model.features(x)).transpose(1, 2), y, reduction="none").mean(1)
        per_window = nats.detach()
        return nats.mean(), per_window <= per_window.median()

    @staticmethod
    def sample_embedding(batch) -> torch.Tensor:
        x = batch[0]
        return torch.zeros(x.shape[0], 256).scatter_add_(1, x, torch.ones_like(x, dtype=torch.float32)) / x.shape[1]

    def evaluate(self, model):
        """Bits/byte per domain and their mean; the domain of every recorded MoE input token."""
        domains, windows, context = self.val_x.shape
        logits = model.head(model.features(self.val_x.reshape(-1, context)))
        nats = F.cross_entropy(logits.transpose(1, 2), self.val_y.reshape(-1, context), reduction="none")
        per_domain = nats.reshape(domains, -1).mean(1) / math.log(2)
        scores = {f"bpb_{name}": float(v) for name, v in zip(DOMAINS, per_domain)}
        scores["val_bpb"] = float(per_domain.mean())
        labels = torch.arange(domains)[:, None].expand(-1, windows * context).reshape(-1)
        return scores, labels


EXPERIMENT = Experiment(
    module="experiments.multidomain_lm", make_task=MultiDomainTask, out_dir="results/multidomain_lm",
    full=TrainConfig(steps=800, batch_size=30), quick=TrainConfig(steps=10, batch_size=12, log_points=3),
    full_seeds=8, init_scale=15.0,  # the pilot's pick: results/multidomain_lm/pilot_scale/summary.md
)


def main(argv=None):
    return run_main(EXPERIMENT, __doc__.split("\n")[0], argv)


if __name__ == "__main__":
    main()
