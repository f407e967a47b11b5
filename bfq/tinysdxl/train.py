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

import argparse
import copy
import json
import platform
import random
import time
from pathlib import Path

from bfq.tinysd.build import MAX_LENGTH, load_tokenizer
from bfq.tinysd.data import caption
from bfq.tinysd.train import _images, _lr_factor, _timed
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


def latents_of_digits():
    """The scaled VAE posterior ``(mean, std)`` of every training image (``1797 x 4 x 8 x 8`` each)
    under tiny-sd's VAE, and the digits."""
    import torch

    x, labels = _images()
    vae = load_vae().eval()
    scale = vae.config.scaling_factor
    with torch.no_grad():
        posts = [vae.encode(x[i : i + 500]).latent_dist for i in range(0, len(x), 500)]
    return (torch.cat([p.mean for p in posts]) * scale, torch.cat([p.std for p in posts]) * scale), labels


def train_unet(unet, encoders, tokenizer, latents, labels, s: dict, gen, log):
    """ε-prediction on latents, jointly with both text encoders. Returns the EMA copies
    ``[unet, text_encoder, text_encoder_2]``."""
    import torch
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler(
        **{k: SCHEDULER_CONFIG[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")}
    )
    models = [unet, *encoders]
    mean, std = latents
    params = [p for m in models for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=s["unet_lr"], weight_decay=s["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: _lr_factor(i, s["unet_steps"], s["warmup"]))
    ema = [copy.deepcopy(m).eval().requires_grad_(False) for m in models]
    ema_params = [p for m in ema for p in m.parameters()]
    rng = random.Random(s["seed"])
    for m in models:
        m.train()
    dev = s["device"]
    for step in range(s["unet_steps"]):
        idx = torch.randint(0, len(mean), (s["unet_batch"],), generator=gen)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)).to(dev)
        captions = [
            "" if rng.random() < s["uncond_prob"] else caption(int(labels[i]), rng) for i in idx.tolist()
        ]
        ids = tokenizer(
            captions, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids.to(dev)
        noise = torch.randn(z0.shape, generator=gen).to(dev)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(z0),), generator=gen).to(dev)
        zt = noise_sched.add_noise(z0, noise, t)
        cond, pooled = encode(*encoders, ids)
        added = dict(text_embeds=pooled, time_ids=time_ids(len(z0)).to(dev))
        loss = (unet(zt, t, cond, added_cond_kwargs=added).sample - noise).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, s["grad_clip"])
        opt.step()
        sched.step()
        decay = min(s["ema_decay"], (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        if step % 100 == 0 or step == s["unet_steps"] - 1:
            log(f"unet step {step} loss {loss.item():.4f} lr {sched.get_last_lr()[0]:.2e}")
    return ema


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

    unknown = set(settings) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown training settings: {sorted(unknown)}")
    s = dict(DEFAULTS, **settings)
    torch.set_num_threads(s["threads"])
    start = time.perf_counter()
    log = _timed(log)
    tokenizer = load_tokenizer(tinysd_dir() / "tokenizer")
    unet, *encoders = (m.to(s["device"]) for m in build_models(tokenizer, s["seed"]))
    gen = torch.Generator().manual_seed(s["seed"])
    latents, labels = latents_of_digits()
    unet, *encoders = train_unet(unet, encoders, tokenizer, latents, labels, s, gen, log)
    seconds = time.perf_counter() - start
    record = dict(
        command=f"python -m bfq.tinysdxl.train --out DIR --seed {s['seed']}"
        + "".join(f" --{k.replace('_', '-')} {v}" for k, v in s.items() if k != "seed" and v != DEFAULTS[k]),
        settings=s,
        data="scikit-learn digits (1797 images, 8x8) upscaled bilinearly to 16x16, dark on light",
        vae="tiny-sd's trained VAE, weights copied unchanged (force_upcast false)",
        seconds_total=round(seconds, 1),
        seconds_per_step=round(seconds / max(1, s["unet_steps"]), 3),
        machine=f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}",
    )
    save_pipeline(out, unet.cpu(), *(e.cpu() for e in encoders), training=record)
    record = json.loads((Path(out) / "TRAINING.json").read_text())
    log(f"saved {out} in {seconds:.0f}s, sha256 {record['sha256']}")
    return record


def main(argv=None):
    """Command line: every key of DEFAULTS is an option (``--unet-steps 1500``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output pipeline directory")
    for key, value in DEFAULTS.items():
        parser.add_argument("--" + key.replace("_", "-"), type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    train(out, log=lambda line: print(line, flush=True), **args)


if __name__ == "__main__":
    main()
