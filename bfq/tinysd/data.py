"""The tiny-sd training data: scikit-learn's handwritten digits, upscaled, with varied captions.

The data are the 1,797 8x8 digits that ship inside scikit-learn (no download). Each image is
upscaled bilinearly to ``IMAGE_SIZE`` x ``IMAGE_SIZE`` and drawn as dark ink on a light background.
A caption names the digit as a word ("seven") or a numeral ("7") through one of
``len(DIGIT_TEMPLATES)`` templates, so the text encoder has to learn that "7", "seven", "the
number 7" and "a handwritten digit seven" mean the same thing, and that the other words don't
matter.

No second attribute: an "inverted" (white-on-black) variant named in half the captions was tried
and the model never learnt to follow it (polarity right 50-53% of the time at every CFG scale,
while digits reached 95%). Global brightness is fixed in the first, noisiest sampling steps, where
SD's schedule leaves almost no signal (the "offset noise" problem of SD-v1.5 itself). A
thick-stroke variant made these already bold 8x8 digits illegible.

Pixel conventions: model images are float tensors in [-1, 1] with 3 identical channels
(``N x 3 x H x W``), as the Stable Diffusion VAE expects; classifier images are grayscale in
[0, 1] with 1 = white (``N x 1 x H x W``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 16
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# {w}: the digit as a word, {n}: as a numeral.
DIGIT_TEMPLATES = (
    "a handwritten digit {w}",
    "the number {n}",
    "{n}",
    "{w}",
    "a handwritten {w}",
    "the digit {n}",
    "number {w}",
    "a drawing of the number {w}",
    "an image of a {n}",
    "a scanned handwritten {n}",
    "digit {w}",
    "the numeral {n}",
)


def caption(digit: int, rng: random.Random) -> str:
    """One caption for ``digit`` (0..9), e.g. ``"the number 7"``, with a template drawn from ``rng``."""
    return rng.choice(DIGIT_TEMPLATES).format(w=DIGIT_WORDS[digit], n=str(digit))


def caption_words() -> list[str]:
    """Every word that a caption can contain, sorted (the tokenizer vocabulary)."""
    texts = [t.format(w=w, n=str(n)) for t in DIGIT_TEMPLATES for n, w in enumerate(DIGIT_WORDS)]
    return sorted({word for text in texts for word in text.split()})


@dataclass(frozen=True)
class EvalPrompt:
    """One fixed evaluation prompt: its text and the digit it asks for."""

    text: str
    digit: int


def eval_prompts(n_per_digit: int, seed: int = 0) -> list[EvalPrompt]:
    """The fixed evaluation prompts, digit-major: ``n_per_digit`` prompts for each digit 0..9.

    Prompt ``j`` of a digit uses template ``(j + seed) % len(DIGIT_TEMPLATES)``, so every
    template is used equally often (up to one) and the prompts do not depend on anything else.
    """
    return [
        EvalPrompt(DIGIT_TEMPLATES[(j + seed) % len(DIGIT_TEMPLATES)].format(w=DIGIT_WORDS[d], n=str(d)), d)
        for d in range(10)
        for j in range(n_per_digit)
    ]


def load_digits_images(size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 scikit-learn digits as ink intensities in [0, 1], upscaled bilinearly.

    Returns:
        ``(ink, labels)``: ``ink`` is float32 ``(1797, size, size)`` with 1 = full ink, ``labels``
        int64 ``(1797,)``.
    """
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    digits = load_digits()
    ink = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
    if size != ink.shape[-1]:
        ink = F.interpolate(ink, size=(size, size), mode="bilinear", align_corners=False)
    return ink[:, 0].clamp(0, 1).numpy(), digits.target.astype(np.int64)


def real_gray_images(size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """All real digits as grayscale ``(1797, size, size)`` float32 in [0, 1] (1 = white), and labels."""
    ink, labels = load_digits_images(size)
    return (1.0 - ink).astype(np.float32), labels


def write_digit_folder(folder, n: int, size: int = IMAGE_SIZE, seed: int = 0) -> list[int]:
    """The first ``n`` digits as an image-caption folder (``digit-00000.png`` + ``.txt``, dark ink on
    white, one caption drawn per image), the layout ``--data folder:PATH`` reads; returns the labels."""
    from pathlib import Path

    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ink, labels = load_digits_images(size)
    rng = random.Random(seed)
    for i in range(n):
        gray = np.round((1.0 - ink[i]) * 255).astype(np.uint8)
        Image.fromarray(gray).convert("RGB").save(folder / f"digit-{i:05d}.png")
        (folder / f"digit-{i:05d}.txt").write_text(caption(int(labels[i]), rng) + "\n")
    return [int(v) for v in labels[:n]]
