"""L2R vs linear routing in a small ViT-style MoE on scikit-learn's 8x8 digits (no download).

    python -m l2r_cuda.examples.digits            # full: 9 router configs x 5 paired seeds
    python -m l2r_cuda.examples.digits --quick    # smoke test (< 1 min)

Each 8x8 image (values 0..16, scaled to [0, 1]) becomes 16 tokens of 2x2 patches; a linear patch
embedding plus learned positions feeds two pre-norm blocks (self-attention + MoE FFN with 8 SwiGLU
experts, top-2); the mean-pooled tokens go to a linear classifier. Fixed stratified split
(``train_test_split(test_size=0.3, random_state=0)``: 1257 train / 540 test images). Reported:
test accuracy and the routing diagnostics of :mod:`l2r_cuda.examples._common`, where a token's
label is the digit class of its image. Results go to ``results/digits/`` (``--out``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _common
from ._common import MoETransformer, RouterConfig, TrainConfig

PATCH = 2
D_MODEL, LAYERS, HEADS, D_FF = 64, 2, 4, 128

FULL = TrainConfig(steps=300, batch_size=64, lr=3e-3)
QUICK = TrainConfig(steps=15, batch_size=32, lr=3e-3)


def patchify(images: torch.Tensor, patch: int = PATCH) -> torch.Tensor:
    """``[N, 8, 8]`` -> ``[N, (8/p)^2, p*p]`` row-major patches."""
    n, side = images.shape[0], images.shape[-1]
    g = side // patch
    return images.reshape(n, g, patch, g, patch).permute(0, 1, 3, 2, 4).reshape(n, g * g, patch * patch)


class DigitsTask:
    title = "Digits ViT-MoE"
    metric = "test_acc"
    metric_label = "test accuracy"
    higher_is_better = True
    num_labels = 10
    label_names = [str(i) for i in range(10)]

    def __init__(self, quick: bool = False):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32) / 16.0
        y = torch.tensor(digits.target, dtype=torch.int64)
        idx = torch.arange(len(y)).numpy()
        tr, te = train_test_split(idx, test_size=0.3, random_state=0, stratify=digits.target)
        tr, te = torch.as_tensor(tr), torch.as_tensor(te)
        self.x_train, self.y_train = patchify(x[tr]), y[tr]
        self.x_test, self.y_test = patchify(x[te]), y[te]
        self.tokens = self.x_train.shape[1]
        self.data_info = (f"sklearn load_digits, {len(tr)} train / {len(te)} test images (stratified split, "
                          f"random_state=0), {PATCH}x{PATCH} patches -> {self.tokens} tokens per image")
        self.model_info = (f"ViT-style, d_model {D_MODEL}, {LAYERS} blocks (attention + MoE FFN, expert d_ff "
                           f"{D_FF}), {HEADS} heads, mean pooling")

    def build_model(self, cfg: RouterConfig) -> MoETransformer:
        return MoETransformer(cfg, d_in=PATCH * PATCH, vocab=None, seq_len=self.tokens, d_model=D_MODEL,
                              layers=LAYERS, heads=HEADS, d_ff=D_FF, causal=False, d_out=10)

    @staticmethod
    def logits(model: MoETransformer, x: torch.Tensor) -> torch.Tensor:
        return model.head(model.features(x).mean(1))

    def sample_batch(self, gen: torch.Generator, batch_size: int):
        i = torch.randint(len(self.y_train), (batch_size,), generator=gen)
        return self.x_train[i], self.y_train[i]

    def loss(self, model, batch):
        x, y = batch
        return F.cross_entropy(self.logits(model, x), y)

    def evaluate(self, model):
        """Test accuracy, and the per-token labels (image class) matching the recorded MoE inputs."""
        pred = self.logits(model, self.x_test).argmax(-1)
        acc = float((pred == self.y_test).double().mean())
        labels = self.y_test[:, None].expand(-1, self.tokens).reshape(-1)
        return acc, labels


def make_task(quick: bool = False) -> DigitsTask:
    return DigitsTask(quick)


def main(argv=None):
    return _common.main(__name__ if __name__ != "__main__" else "l2r_cuda.examples.digits", __doc__.split("\n")[0],
                        "results/digits", FULL, QUICK, argv)


if __name__ == "__main__":
    main()
