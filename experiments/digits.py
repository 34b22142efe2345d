"""L2R vs linear routing in a small ViT-style MoE on scikit-learn's 8x8 digits (no download).

    python -m experiments.digits            # full grid -> results/digits/
    python -m experiments.digits --quick    # smoke test (CI)

Each 8x8 image (values 0..16, scaled to [0, 1]) becomes 16 tokens of 2x2 patches; a linear patch
embedding plus learned positions feeds two pre-norm blocks (self-attention + MoE FFN with 8 SwiGLU
experts, top-2); the mean-pooled tokens go to a linear classifier. Fixed stratified split
(``train_test_split(test_size=0.3, random_state=0)``: 1257 train / 540 test images). Metric: test
accuracy (also reported: test cross-entropy). A token's label for the specialization metric is the
digit class of its image. RoMA's task embedding is the raw image; a sample is successful when the
training forward classifies it correctly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .arms import Arm
from .model import MoETransformer
from .runner import Experiment, main as run_main
from .training import TrainConfig

PATCH = 2
D_MODEL, LAYERS, HEADS, D_FF = 64, 2, 4, 128


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
    extra_metrics = [("test_nll", "test cross-entropy (nats)", False)]
    num_labels = 10
    label_names = [str(i) for i in range(10)]

    def __init__(self, quick: bool = False):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32) / 16.0
        y = torch.tensor(digits.target, dtype=torch.int64)
        tr, te = train_test_split(torch.arange(len(y)).numpy(), test_size=0.3, random_state=0, stratify=digits.target)
        tr, te = torch.as_tensor(tr), torch.as_tensor(te)
        self.x_train, self.y_train = patchify(x[tr]), y[tr]
        self.x_test, self.y_test = patchify(x[te]), y[te]
        self.tokens = self.x_train.shape[1]
        self.data_info = (f"sklearn load_digits, {len(tr)} train / {len(te)} test images (stratified split, "
                          f"random_state=0), {PATCH}x{PATCH} patches -> {self.tokens} tokens per image")
        self.model_info = (f"ViT-style, d_model {D_MODEL}, {LAYERS} blocks (attention + MoE FFN, expert d_ff "
                           f"{D_FF}), {HEADS} heads, mean pooling")

    def build_model(self, arm: Arm) -> MoETransformer:
        return MoETransformer(arm, d_in=PATCH * PATCH, vocab=None, seq_len=self.tokens, d_model=D_MODEL,
                              layers=LAYERS, heads=HEADS, d_ff=D_FF, causal=False, d_out=10)

    @staticmethod
    def logits(model: MoETransformer, x: torch.Tensor) -> torch.Tensor:
        return model.head(model.features(x).mean(1))

    def sample_batch(self, gen: torch.Generator, batch_size: int):
        i = torch.randint(len(self.y_train), (batch_size,), generator=gen)
        return self.x_train[i], self.y_train[i]

    def loss(self, model, batch):
        """Mean cross-entropy, and which samples the forward classified correctly (RoMA's success)."""
        x, y = batch
        logits = self.logits(model, x)
        return F.cross_entropy(logits, y), logits.detach().argmax(-1) == y

    @staticmethod
    def sample_embedding(batch) -> torch.Tensor:
        return batch[0].reshape(batch[0].shape[0], -1)

    def evaluate(self, model):
        """Test accuracy and cross-entropy, and the per-token labels (image class) of the recorded MoE inputs."""
        logits = self.logits(model, self.x_test)
        scores = {"test_acc": float((logits.argmax(-1) == self.y_test).double().mean()),
                  "test_nll": float(F.cross_entropy(logits, self.y_test))}
        return scores, self.y_test[:, None].expand(-1, self.tokens).reshape(-1)


EXPERIMENT = Experiment(
    module="experiments.digits", make_task=DigitsTask, out_dir="results/digits",
    full=TrainConfig(steps=300, batch_size=64), quick=TrainConfig(steps=12, batch_size=32, log_points=3),
    full_seeds=10, init_scale=1.5,  # the pilot's pick: results/digits/pilot_scale/summary.md
)


def main(argv=None):
    return run_main(EXPERIMENT, __doc__.split("\n")[0], argv)


if __name__ == "__main__":
    main()
