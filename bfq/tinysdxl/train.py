"""Train tiny-sdxl from a seed: ``python -m bfq.tinysdxl.train --out DIR --seed 0``.

The data and the recipe are tiny-sd's (:mod:`bfq.tinysd.train`): the 1,797 scikit-learn digits at
16x16 with varied captions, encoded once by tiny-sd's trained VAE (which tiny-sdxl reuses, so there
is no VAE stage); ε-prediction on latents sampled from the VAE posterior, uniform timesteps over
the 1000-step scaled-linear schedule, captions dropped to the empty prompt 10% of the time, AdamW
with warm-up and cosine decay, and an exponential moving average of the weights (the EMA weights
are saved). The UNet and both text encoders learn together, conditioned as SDXL's pipeline
conditions them (:func:`bfq.tinysdxl.build.encode`, ``time_ids`` of the 16x16 images).

Deterministic for a given seed and thread count on a given machine. The defaults are the settings
of the bundled ``bfq/data/tiny-sdxl``; its ``TRAINING.json`` records them, the wall time, the
content hash and the measured quality. Tiny settings (``--unet-steps 2 --unet-batch 8``) make a
smoke test.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from bfq.tinysd.build import MAX_LENGTH, load_tokenizer
from bfq.tinysd.train import _timed, latents_of_digits, reused_vae_record, run_cli, train_denoiser, training_settings
from bfq.tinysdxl.build import (
    SCHEDULER_CONFIG,
    build_models,
    encode,
    load_vae,
    save_pipeline,
    time_ids,
    tinysd_dir,
)

DEFAULTS = dict(
    seed=0,
    unet_steps=1800,
    unet_batch=128,
    unet_lr=3e-3,
    warmup=100,
    weight_decay=1e-2,
    ema_decay=0.995,
    uncond_prob=0.1,
    grad_clip=1.0,
    threads=1,
    device="cpu",
)


def train_unet(unet, encoders, tokenizer, latents, labels, s: dict, gen, log):
    """ε-prediction on latents (:func:`bfq.tinysd.train.train_denoiser`), jointly with both text
    encoders. Returns the EMA copies ``[unet, text_encoder, text_encoder_2]``."""
    dev = s["device"]

    def predict(zt, t, captions):
        ids = tokenizer(
            captions, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids.to(dev)
        cond, pooled = encode(*encoders, ids)
        added = dict(text_embeds=pooled, time_ids=time_ids(len(zt)).to(dev))
        return unet(zt, t, cond, added_cond_kwargs=added).sample

    return train_denoiser(
        [unet, *encoders], predict, latents, labels, s, gen, log,
        steps=s["unet_steps"], batch=s["unet_batch"], lr=s["unet_lr"], noise_config=SCHEDULER_CONFIG,
    )  # fmt: skip


def train(out: str | Path, log=print, **settings) -> dict:
    """Train tiny-sdxl and save the pipeline to ``out``.

    Args:
        out: output pipeline directory.
        log: a function taking one line of progress text.
        **settings: overrides of :data:`DEFAULTS` (e.g. ``seed=1``, ``unet_steps=2``).
    Returns:
        The ``TRAINING.json`` record (settings, timings, content hash).
    """
    import torch

    s = training_settings(DEFAULTS, settings)
    start = time.perf_counter()
    log = _timed(log)
    tokenizer = load_tokenizer(tinysd_dir() / "tokenizer")
    unet, *encoders = (m.to(s["device"]) for m in build_models(tokenizer, s["seed"]))
    gen = torch.Generator().manual_seed(s["seed"])
    latents, labels = latents_of_digits(load_vae())
    unet, *encoders = train_unet(unet, encoders, tokenizer, latents, labels, s, gen, log)
    seconds = time.perf_counter() - start
    record = reused_vae_record("bfq.tinysdxl.train", DEFAULTS, s, seconds, s["unet_steps"])
    save_pipeline(out, unet.cpu(), *(e.cpu() for e in encoders), training=record)
    record = json.loads((Path(out) / "TRAINING.json").read_text())
    log(f"saved {out} in {seconds:.0f}s, sha256 {record['sha256']}")
    return record


def main(argv=None):
    """Command line: every key of DEFAULTS is an option (``--unet-steps 1500``)."""
    run_cli(train, DEFAULTS, __doc__, argv)


if __name__ == "__main__":
    main()
