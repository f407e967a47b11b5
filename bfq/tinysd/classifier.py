"""The digit classifier behind the tiny-sd quality metric, and its real-data feature statistics.

A small CNN trained on the real digits at tiny-sd's resolution. It plays the
two roles CLIP and Inception play in the paper's evaluation: its label of a generated image scores
prompt alignment, and its penultimate layer (``FEATURE_DIM`` ReLU features) is the space of the
Fréchet distance. The real statistics (mean and covariance of the features of all 1,797 real
images) are stored next to the weights, so evaluation needs no data pass.

Training uses 80% of the digits (a fixed split) with +-1 pixel shifts as augmentation; the other
20% give the held-out accuracy recorded in ``config.json``.

Re-train the bundled classifier with ``python -m bfq.tinysd.classifier --out bfq/data/digit-classifier``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from bfq.tinysd.data import IMAGE_SIZE, real_gray_images

FEATURE_DIM = 64
WEIGHTS_FILE = "model.safetensors"
STATS_FILE = "real_stats.safetensors"
CONFIG_FILE = "config.json"


def _module():
    import torch.nn as nn

    class DigitClassifier(nn.Module):
        """CNN: 16x16x1 -> conv16 -> conv32/2 -> conv64/2 -> 64 features -> 10 logits."""

        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(16, 32, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(32, 64, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Flatten(),
                nn.Linear(64 * (IMAGE_SIZE // 4) ** 2, FEATURE_DIM),
                nn.ReLU(),
            )
            self.head = nn.Linear(FEATURE_DIM, 10)

        def forward(self, gray):
            """``gray``: ``N x 1 x 16 x 16`` in [0, 1]. Returns ``(logits, features)``."""
            features = self.body(gray * 2 - 1)
            return self.head(features), features

    return DigitClassifier()


class Classifier:
    """A loaded digit classifier plus the real feature statistics.

    Attributes:
        model: the torch module (eval mode).
        mu, sigma: mean ``(64,)`` and covariance ``(64, 64)`` of real features, float64 numpy.
        config: the contents of ``config.json``.
    """

    def __init__(self, model, mu: np.ndarray, sigma: np.ndarray, config: dict):
        self.model, self.mu, self.sigma, self.config = model, mu, sigma, config

    def __call__(self, gray, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
        """Labels and features of grayscale images.

        Args:
            gray: ``N x H x W`` (or ``N x 1 x H x W``) array or tensor in [0, 1]; other sizes are
                resized bilinearly to 16x16.
        Returns:
            ``(labels (N,) int64, features (N, 64) float64)``.
        """
        import torch
        import torch.nn.functional as F

        x = torch.as_tensor(np.asarray(gray, dtype=np.float32))
        x = x[:, None] if x.ndim == 3 else x
        if x.shape[-1] != IMAGE_SIZE:
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
        labels, feats = [], []
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                logits, f = self.model(x[i : i + batch_size])
                labels.append(logits.argmax(1))
                feats.append(f.double())
        if not labels:
            return np.zeros(0, np.int64), np.zeros((0, FEATURE_DIM))
        return torch.cat(labels).numpy(), torch.cat(feats).numpy()


def load_classifier(directory: str | Path | None = None) -> Classifier:
    """Load the bundled digit classifier (or the one in ``directory``)."""
    from safetensors.torch import load_file

    from bfq.tinysd import classifier_dir

    directory = Path(directory or classifier_dir())
    model = _module()
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    model.eval()
    stats = load_file(str(directory / STATS_FILE))
    config = json.loads((directory / CONFIG_FILE).read_text())
    return Classifier(model, stats["mu"].double().numpy(), stats["sigma"].double().numpy(), config)


def _shift(x, rng):
    """Random +-1 pixel translations (wrapping; the digits' borders are blank)."""
    import torch

    out = torch.empty_like(x)
    for i in range(len(x)):
        dy, dx = (int(v) for v in rng.integers(-1, 2, size=2))
        out[i] = torch.roll(x[i], shifts=(dy, dx), dims=(-2, -1))
    return out


def train_classifier(out: str | Path, seed: int = 0, epochs: int = 30, batch_size: int = 128) -> dict:
    """Train the digit classifier and write weights, real statistics and config to ``out``.

    Args:
        out: output directory.
        seed: seeds the split, the initialisation and the batches.
        epochs: passes over the training split.
        batch_size: images per step.
    Returns:
        The config written (settings, held-out accuracy, seconds).
    """
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    start = time.perf_counter()
    gray, labels = real_gray_images()
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(gray), bool)
    is_test[rng.permutation(len(gray))[: len(gray) // 5]] = True
    x = torch.from_numpy(gray)[:, None]
    y = torch.from_numpy(labels)
    x_train, y_train = x[~is_test], y[~is_test]

    torch.manual_seed(seed)
    model = _module()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * (len(x_train) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    for _ in range(epochs):
        order = torch.from_numpy(rng.permutation(len(x_train)))
        for i in range(len(x_train) // batch_size):
            idx = order[i * batch_size : (i + 1) * batch_size]
            xb = 1 - _shift(1 - x_train[idx], rng)  # shift the ink, so background comes in
            loss = F.cross_entropy(model(xb)[0], y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    clf = Classifier(model, None, None, {})
    pred, feats = clf(x)
    acc_test = float((pred[is_test] == labels[is_test]).mean())
    acc_all = float((pred == labels).mean())
    mu = feats.mean(0)
    sigma = np.cov(feats, rowvar=False)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / WEIGHTS_FILE))
    save_file(
        {"mu": torch.from_numpy(mu), "sigma": torch.from_numpy(sigma)}, str(out / STATS_FILE)
    )
    config = dict(
        architecture="conv16-conv32s2-conv64s2-fc64-fc10, ReLU, input 16x16 gray in [0,1]",
        feature_dim=FEATURE_DIM,
        seed=seed,
        epochs=epochs,
        batch_size=batch_size,
        optimizer="AdamW lr 2e-3 one-cycle, weight decay 1e-4",
        augmentation="random +-1 pixel shifts",
        train_images=int((~is_test).sum()),
        heldout_images=int(is_test.sum()),
        heldout_accuracy=round(acc_test, 4),
        all_real_accuracy=round(acc_all, 4),
        real_stats="mean/covariance of the 64 features over all 1797 real images",
        torch_threads=torch.get_num_threads(),
        seconds=round(time.perf_counter() - start, 1),
    )
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return config


def main(argv=None):
    """``python -m bfq.tinysd.classifier --out DIR [--seed 0] [--epochs 30] [--threads 1]``."""
    import argparse

    import torch

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(json.dumps(train_classifier(args.out, args.seed, args.epochs), indent=2))


if __name__ == "__main__":
    main()
