"""Train tiny-sd from a seed: ``python -m bfq.tinysd.train --out DIR --seed 0``.

Two stages, both deterministic for a given seed and thread count on a given machine:

1. The VAE (``AutoencoderKL``) learns to encode the 16x16 digits into 8x8x4
   latents: MSE reconstruction plus a small KL term. Its ``scaling_factor`` is then set to
   1 / std of the latent means, as SD's 0.18215 was.
2. The UNet and the CLIP text encoder learn together, with SD's recipe: ε-prediction on latents
   sampled from the VAE posterior, uniform timesteps over SD's 1000-step scaled-linear schedule,
   captions dropped to the empty prompt 10% of the time (what classifier-free guidance needs),
   AdamW with warm-up and cosine decay, and an exponential moving average of the weights (the EMA
   weights are saved).

The defaults are the settings of the bundled ``bfq/data/tiny-sd``; its ``TRAINING.json`` records
them, the wall time and the content hash. Tiny settings (``--vae-steps 2 --unet-steps 2``) make a
smoke test.

Why lr 3e-3 and 1800 steps: the text conditioning appears late and suddenly. In sweeps of this
script on a GPU (``--device cuda``; 300 images per scale), 1500 steps at lr 1e-3 left alignment
near chance (0.13-0.2), lr 2e-3 reached 0.95-1.0 and lr 3e-3 0.98-1.0; with 1000 steps lr 2e-3 gave
0.5 and lr 3e-3 0.8. 1800 steps at 3e-3 leaves a margin.

Cost on one CPU thread of the project's 2-core machine: 0.2-0.45 s per VAE step and 0.65 s per
UNet forward/backward when the machine is idle (about 22 minutes in all), 1.1 s per UNet step
with light load from other jobs and 1.5 s under heavy load; ``TRAINING.json`` has the measured
wall time of the bundled run.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import random
import time
from pathlib import Path

from bfq.tinysd.build import (
    MAX_LENGTH,
    build_models,
    load_tokenizer,
    save_pipeline,
    write_tokenizer,
)
from bfq.tinysd.data import caption, real_gray_images

DEFAULTS = dict(
    seed=0,
    vae_steps=400,
    vae_batch=64,
    vae_lr=1e-3,
    kl_weight=1e-4,
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


def _images():
    """All training images ``(1797, 3, 16, 16)`` in [-1, 1] and their digits."""
    import torch

    gray, labels = real_gray_images()
    return torch.from_numpy(gray * 2 - 1)[:, None].repeat(1, 3, 1, 1), labels


def _timed(log):
    """Prefix each log line with the minutes:seconds since training started."""
    start = time.perf_counter()

    def timed(line: str) -> None:
        minutes, seconds = divmod(int(time.perf_counter() - start), 60)
        log(f"[{minutes:02d}:{seconds:02d}] {line}")

    return timed


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_vae(vae, x, s: dict, gen, log) -> tuple[object, float]:
    """Stage 1. Returns the trained VAE and its latent scaling factor."""
    import torch

    opt = torch.optim.Adam(vae.parameters(), lr=s["vae_lr"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: _lr_factor(i, s["vae_steps"], 50))
    vae.train()
    dev = s["device"]
    for step in range(s["vae_steps"]):
        idx = torch.randint(0, len(x), (s["vae_batch"],), generator=gen)
        xb = x[idx].to(dev)
        post = vae.encode(xb).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(dev)
        rec = vae.decode(z).sample
        mse = (rec - xb).pow(2).mean()
        loss = mse + s["kl_weight"] * post.kl().mean() / z[0].numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == s["vae_steps"] - 1:
            log(f"vae step {step} mse {mse.item():.5f}")
    vae.eval()
    with torch.no_grad():
        mean = torch.cat([vae.encode(x[i : i + 500].to(dev)).latent_dist.mean for i in range(0, len(x), 500)])
    scale = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scale)
    return vae, scale


def train_unet(unet, text_encoder, tokenizer, latents, labels, s: dict, gen, log):
    """Stage 2: ε-prediction on latents, jointly with the text encoder. Returns the EMA copies."""
    import torch
    from diffusers import DDPMScheduler

    from bfq.tinysd.build import SCHEDULER_CONFIG

    noise_sched = DDPMScheduler(
        num_train_timesteps=SCHEDULER_CONFIG["num_train_timesteps"],
        beta_start=SCHEDULER_CONFIG["beta_start"],
        beta_end=SCHEDULER_CONFIG["beta_end"],
        beta_schedule=SCHEDULER_CONFIG["beta_schedule"],
    )
    mean, std = latents
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=s["unet_lr"], weight_decay=s["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: _lr_factor(i, s["unet_steps"], s["warmup"])
    )
    ema = [copy.deepcopy(unet).eval().requires_grad_(False), copy.deepcopy(text_encoder).eval().requires_grad_(False)]
    ema_params = list(ema[0].parameters()) + list(ema[1].parameters())
    rng = random.Random(s["seed"])
    unet.train()
    text_encoder.train()
    dev = s["device"]
    for step in range(s["unet_steps"]):
        idx = torch.randint(0, len(mean), (s["unet_batch"],), generator=gen)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)).to(dev)
        captions = [
            "" if rng.random() < s["uncond_prob"] else caption(int(labels[i]), rng)
            for i in idx.tolist()
        ]
        ids = tokenizer(
            captions, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids.to(dev)
        noise = torch.randn(z0.shape, generator=gen).to(dev)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(z0),), generator=gen).to(dev)
        zt = noise_sched.add_noise(z0, noise, t)
        cond = text_encoder(ids)[0]
        loss = (unet(zt, t, cond).sample - noise).pow(2).mean()
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


def latents_of_digits(vae):
    """The scaled ``vae`` posterior ``(mean, std)`` of every training image (``1797 x 4 x 8 x 8``
    each), and the digits: the data of a denoiser trained on tiny-sd's frozen VAE."""
    import torch

    x, labels = _images()
    vae = vae.eval()
    scale = vae.config.scaling_factor
    with torch.no_grad():
        posts = [vae.encode(x[i : i + 500]).latent_dist for i in range(0, len(x), 500)]
    return (torch.cat([p.mean for p in posts]) * scale, torch.cat([p.std for p in posts]) * scale), labels


def train_denoiser(models, predict, latents, labels, s: dict, gen, log, *, steps: int, batch: int, lr: float,
                   noise_config: dict):  # fmt: skip
    """tiny-sd's recipe for a denoiser on frozen-VAE latents, jointly with its text encoder(s).

    ε-prediction on latents sampled from the VAE posterior, uniform timesteps over the DDPM
    schedule of ``noise_config`` (``num_train_timesteps``, ``beta_start``, ``beta_end``,
    ``beta_schedule``), captions dropped to the empty prompt with probability ``s["uncond_prob"]``,
    AdamW with warm-up and cosine decay, gradient clipping and an EMA of the weights.

    Args:
        models: the modules trained together (the denoiser first, then the text encoders).
        predict: ``predict(zt, t, captions)`` -> the noise estimate, conditioning as the
            pipeline does.
        latents, labels: :func:`latents_of_digits`.
        s: ``seed``, ``warmup``, ``weight_decay``, ``ema_decay``, ``uncond_prob``, ``grad_clip``,
            ``device``.
        gen: the torch generator of batches, latents, noise and timesteps.
        steps, batch, lr: optimizer steps, images per step, peak learning rate.
    Returns:
        The EMA copies of ``models``, in eval mode.
    """
    import torch
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler(
        **{k: noise_config[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")}
    )
    mean, std = latents
    params = [p for m in models for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=s["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: _lr_factor(i, steps, s["warmup"]))
    ema = [copy.deepcopy(m).eval().requires_grad_(False) for m in models]
    ema_params = [p for m in ema for p in m.parameters()]
    rng = random.Random(s["seed"])
    for m in models:
        m.train()
    dev = s["device"]
    for step in range(steps):
        idx = torch.randint(0, len(mean), (batch,), generator=gen)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)).to(dev)
        captions = [
            "" if rng.random() < s["uncond_prob"] else caption(int(labels[i]), rng) for i in idx.tolist()
        ]
        noise = torch.randn(z0.shape, generator=gen).to(dev)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(z0),), generator=gen).to(dev)
        zt = noise_sched.add_noise(z0, noise, t)
        loss = (predict(zt, t, captions) - noise).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, s["grad_clip"])
        opt.step()
        sched.step()
        decay = min(s["ema_decay"], (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        if step % 100 == 0 or step == steps - 1:
            log(f"step {step} loss {loss.item():.4f} lr {sched.get_last_lr()[0]:.2e}")
    return ema


def train(out: str | Path, log=print, **settings) -> dict:
    """Train tiny-sd and save the pipeline to ``out``.

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
    out = Path(out)
    log = _timed(log)
    tokenizer = load_tokenizer(write_tokenizer(out / "tokenizer"))
    unet, vae, text_encoder = (m.to(s["device"]) for m in build_models(tokenizer, s["seed"]))
    gen = torch.Generator().manual_seed(s["seed"])
    x, labels = _images()

    vae, scale = train_vae(vae, x, s, gen, log)
    t_vae = time.perf_counter() - start
    with torch.no_grad():
        posts = [vae.encode(x[i : i + 500].to(s["device"])).latent_dist for i in range(0, len(x), 500)]
        latents = (torch.cat([p.mean for p in posts]).cpu() * scale, torch.cat([p.std for p in posts]).cpu() * scale)
        rec = torch.cat([vae.decode(p.mean).sample for p in posts]).cpu()
    vae_mse = float((rec - x).pow(2).mean())
    log(f"vae done in {t_vae:.0f}s: scaling_factor {scale:.4f}, reconstruction mse {vae_mse:.5f}")

    unet, text_encoder = train_unet(unet, text_encoder, tokenizer, latents, labels, s, gen, log)
    seconds = time.perf_counter() - start
    record = dict(
        command=f"python -m bfq.tinysd.train --out DIR --seed {s['seed']}"
        + "".join(f" --{k.replace('_', '-')} {v}" for k, v in s.items() if k != "seed" and v != DEFAULTS[k]),
        settings=s,
        data="scikit-learn digits (1797 images, 8x8) upscaled bilinearly to 16x16, dark on light",
        vae_scaling_factor=scale,
        vae_reconstruction_mse=vae_mse,
        seconds_vae=round(t_vae, 1),
        seconds_total=round(seconds, 1),
        machine=f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}",
    )
    save_pipeline(out, unet.cpu(), vae.cpu(), text_encoder.cpu(), training=record)
    record = json.loads((out / "TRAINING.json").read_text())
    log(f"saved {out} in {seconds:.0f}s, sha256 {record['sha256']}")
    return record


def training_settings(defaults: dict, overrides: dict) -> dict:
    """``defaults`` updated with ``overrides`` (a TypeError names unknown keys); sets torch's thread count."""
    import torch

    unknown = set(overrides) - set(defaults)
    if unknown:
        raise TypeError(f"unknown training settings: {sorted(unknown)}")
    s = dict(defaults, **overrides)
    torch.set_num_threads(s["threads"])
    return s


def reused_vae_record(module: str, defaults: dict, s: dict, seconds: float, steps: int) -> dict:
    """The ``TRAINING.json`` record of a tiny model trained on tiny-sd's digits with tiny-sd's VAE
    (tiny-sdxl, tiny-pixart): the command that reproduces it, its settings and its timing."""
    import torch

    return dict(
        command=f"python -m {module} --out DIR --seed {s['seed']}"
        + "".join(f" --{k.replace('_', '-')} {v}" for k, v in s.items() if k != "seed" and v != defaults[k]),
        settings=s,
        data="scikit-learn digits (1797 images, 8x8) upscaled bilinearly to 16x16, dark on light",
        vae="tiny-sd's trained VAE, weights copied unchanged (force_upcast false)",
        seconds_total=round(seconds, 1),
        seconds_per_step=round(seconds / max(1, steps), 3),
        machine=f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}",
    )


def run_cli(train, defaults: dict, doc: str, argv=None) -> None:
    """A training module's command line: ``--out`` and every key of ``defaults`` as an option."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output pipeline directory")
    for key, value in defaults.items():
        parser.add_argument("--" + key.replace("_", "-"), type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    train(out, log=lambda line: print(line, flush=True), **args)



def main(argv=None):
    """Command line: every key of DEFAULTS is an option (``--unet-steps 1500``)."""
    run_cli(train, DEFAULTS, __doc__, argv)


if __name__ == "__main__":
    main()
