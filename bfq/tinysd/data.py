"""The tiny-sd training data: scikit-learn's handwritten digits, upscaled, with varied captions.

The data are the 1,797 8x8 digits that ship inside scikit-learn (no download). Each image is
upscaled bilinearly to ``IMAGE_SIZE`` x ``IMAGE_SIZE`` and shown in one of two *polarities*, the
one extra attribute the captions carry:

* ``"normal"``: dark ink on a light background (how a scanned page looks);
* ``"inverted"``: a light digit on a dark background.

Every image appears once in each polarity. A caption always names the digit (as a word, "seven",
or a numeral, "7") through one of ``len(DIGIT_TEMPLATES)`` templates, and names the polarity in
about half of the captions; a caption that does not name it fits either polarity. Polarity is an
honest attribute: it changes every pixel, the digit classifier sees both polarities in training,
and the Fréchet distance compares against the real set in both polarities.

Pixel conventions: model images are float tensors in [-1, 1] with 3 identical channels
(``N x 3 x H x W``), as the Stable Diffusion VAE expects; classifier images are grayscale in
[0, 1] (``N x 1 x H x W``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 16
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
POLARITIES = ("normal", "inverted")

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
POLARITY_PHRASES = {
    "normal": (
        "black on white",
        "dark ink on white paper",
        "on a white background",
        "in black ink",
    ),
    "inverted": (
        "white on black",
        "inverted",
        "light on a dark background",
        "on a black background",
        "in inverted colors",
    ),
}


def caption(digit: int, polarity: str | None, rng: random.Random) -> str:
    """One caption for ``digit``; names ``polarity`` unless it is None.

    Args:
        digit: 0..9.
        polarity: ``"normal"``, ``"inverted"`` or None (not mentioned).
        rng: the source of the template and phrase choices.
    Returns:
        A lower-case caption such as ``"the number 7, white on black"``.
    """
    text = rng.choice(DIGIT_TEMPLATES).format(w=DIGIT_WORDS[digit], n=str(digit))
    if polarity is None:
        return text
    phrase = rng.choice(POLARITY_PHRASES[polarity])
    return f"{text}, {phrase}" if rng.random() < 0.5 else f"{text} {phrase}"


def training_caption(digit: int, polarity: str, rng: random.Random) -> str:
    """A training caption: the polarity is named with probability 1/2."""
    return caption(digit, polarity if rng.random() < 0.5 else None, rng)


def caption_words() -> list[str]:
    """Every word and punctuation mark that a caption can contain, sorted (the tokenizer vocabulary)."""
    texts = [t.format(w=w, n=str(n)) for t in DIGIT_TEMPLATES for n, w in enumerate(DIGIT_WORDS)]
    texts += [p for ps in POLARITY_PHRASES.values() for p in ps] + [","]
    return sorted({word for text in texts for word in text.replace(",", " , ").split()})


@dataclass(frozen=True)
class EvalPrompt:
    """One fixed evaluation prompt: its text, the digit it asks for, and the polarity it names."""

    text: str
    digit: int
    polarity: str | None


def eval_prompts(n_per_digit: int, seed: int = 0) -> list[EvalPrompt]:
    """The fixed evaluation prompts, digit-major: ``n_per_digit`` prompts for each digit 0..9.

    Prompt ``j`` of a digit names no polarity, the normal or the inverted one for ``j % 3`` equal to
    0, 1 or 2, so a third of the prompts leave the choice to the model; the templates are drawn from
    a generator seeded by ``seed`` and the digit. The real reference set holds both polarities
    equally, which is what these prompts ask for on average.
    """
    prompts = []
    for digit in range(10):
        rng = random.Random(seed * 1000 + digit)
        for j in range(n_per_digit):
            polarity = (None, "normal", "inverted")[j % 3]
            prompts.append(EvalPrompt(caption(digit, polarity, rng), digit, polarity))
    return prompts


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


def ink_to_gray(ink, polarity: str):
    """Grayscale in [0, 1] (1 = white) from ink intensity, for a polarity (array or tensor)."""
    if polarity == "normal":
        return 1.0 - ink
    if polarity == "inverted":
        return ink
    raise ValueError(f"polarity must be one of {POLARITIES}, not {polarity!r}")


def real_gray_images(size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All real digits in both polarities as grayscale ``(2*1797, size, size)`` in [0, 1].

    Returns:
        ``(gray, labels, inverted)`` where ``inverted`` is a bool array (False for the first half).
    """
    ink, labels = load_digits_images(size)
    gray = np.concatenate([ink_to_gray(ink, p) for p in POLARITIES])
    inverted = np.repeat(np.array([False, True]), len(ink))
    return gray.astype(np.float32), np.concatenate([labels, labels]), inverted
