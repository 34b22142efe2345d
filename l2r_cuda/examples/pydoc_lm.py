"""L2R vs linear routing in a byte-level MoE language model on CPython's own docs (no download).

    python -m l2r_cuda.examples.pydoc_lm            # full: 9 router configs x 5 paired seeds
    python -m l2r_cuda.examples.pydoc_lm --quick    # smoke test (< 1 min)

Corpus: ``pydoc_data.topics.topics`` (the English text of the Python language reference topics that
ship with CPython, ~465 KB), values joined in sorted key order, UTF-8 encoded. The last 10% of the
bytes are the validation set, the rest is the training set. Model: byte embedding + learned
positions, two causal pre-norm blocks (self-attention + MoE FFN with 8 SwiGLU experts, top-2),
context 64 bytes. Metric: validation bits per byte, i.e. the mean next-byte cross-entropy in bits
over non-overlapping 64-byte windows of the validation set (each window starts with an empty
context, so this is a little higher than a sliding-window estimate). A token's label for the
specialization metric is the class of its input byte: letter, digit, whitespace, punctuation,
other (non-ASCII bytes, control characters). Results go to ``results/pydoc_lm/`` (``--out``).
"""

from __future__ import annotations

import math
import string

import torch
import torch.nn.functional as F

from . import _common
from ._common import MoETransformer, RouterConfig, TrainConfig

CONTEXT = 64
D_MODEL, LAYERS, HEADS, D_FF = 64, 2, 4, 128
VAL_FRACTION = 0.1

FULL = TrainConfig(steps=400, batch_size=16, lr=3e-3)
QUICK = TrainConfig(steps=15, batch_size=8, lr=3e-3)
QUICK_EVAL_WINDOWS = 32

BYTE_CLASSES = ["letter", "digit", "whitespace", "punctuation", "other"]


def load_corpus() -> bytes:
    from pydoc_data.topics import topics

    return "".join(topics[key] for key in sorted(topics)).encode("utf-8")


def byte_classes() -> torch.Tensor:
    """``[256]`` int64: the class index (into ``BYTE_CLASSES``) of every byte value."""
    table = torch.full((256,), 4, dtype=torch.int64)
    for chars, cls in ((string.ascii_letters, 0), (string.digits, 1), (" \t\n\r\x0b\x0c", 2), (string.punctuation, 3)):
        for c in chars:
            table[ord(c)] = cls
    return table


class PydocTask:
    title = "Pydoc byte-level MoE LM"
    metric = "val_bpb"
    metric_label = "validation bits/byte"
    higher_is_better = False
    num_labels = len(BYTE_CLASSES)
    label_names = BYTE_CLASSES

    def __init__(self, quick: bool = False):
        data = torch.frombuffer(bytearray(load_corpus()), dtype=torch.uint8).to(torch.int64)
        n_val = int(len(data) * VAL_FRACTION)
        self.train, self.val = data[:-n_val], data[-n_val:]
        windows = (len(self.val) - 1) // CONTEXT
        if quick:
            windows = min(windows, QUICK_EVAL_WINDOWS)
        span = self.val[: windows * CONTEXT + 1]
        self.val_x = span[:-1].reshape(windows, CONTEXT)
        self.val_y = span[1:].reshape(windows, CONTEXT)
        self.classes = byte_classes()
        self.data_info = (f"pydoc_data.topics (CPython {__import__('platform').python_version()}), {len(data)} bytes; "
                          f"train = first {len(self.train)} bytes, validation = last {n_val} bytes "
                          f"({windows} non-overlapping {CONTEXT}-byte windows evaluated)")
        self.model_info = (f"byte-level causal transformer, context {CONTEXT}, d_model {D_MODEL}, {LAYERS} blocks "
                           f"(attention + MoE FFN, expert d_ff {D_FF}), {HEADS} heads")

    def build_model(self, cfg: RouterConfig) -> MoETransformer:
        return MoETransformer(cfg, d_in=None, vocab=256, seq_len=CONTEXT, d_model=D_MODEL, layers=LAYERS,
                              heads=HEADS, d_ff=D_FF, causal=True, d_out=256)

    def sample_batch(self, gen: torch.Generator, batch_size: int):
        start = torch.randint(len(self.train) - CONTEXT - 1, (batch_size,), generator=gen)
        idx = start[:, None] + torch.arange(CONTEXT + 1)
        chunk = self.train[idx]
        return chunk[:, :-1], chunk[:, 1:]

    def loss(self, model, batch):
        x, y = batch
        return F.cross_entropy(model.head(model.features(x)).reshape(-1, 256), y.reshape(-1))

    def evaluate(self, model):
        """Validation bits per byte (one forward over all windows), and the byte class of every input
        token, matching the recorded MoE inputs."""
        logits = model.head(model.features(self.val_x))
        nats = F.cross_entropy(logits.reshape(-1, 256), self.val_y.reshape(-1))
        return float(nats) / math.log(2), self.classes[self.val_x.reshape(-1)]


def make_task(quick: bool = False) -> PydocTask:
    return PydocTask(quick)


def main(argv=None):
    return _common.main(__name__ if __name__ != "__main__" else "l2r_cuda.examples.pydoc_lm",
                        __doc__.split("\n")[0], "results/pydoc_lm", FULL, QUICK, argv)


if __name__ == "__main__":
    main()
