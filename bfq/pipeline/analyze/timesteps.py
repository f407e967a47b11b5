"""The time-step error analysis (paper Fig. 4): how far a quantized UNet's noise prediction is from
the float one's at each timestep."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bfq.pipeline.analyze.measure import _Context, _ddim, _predict, _sample
from bfq.pipeline.analyze.settings import analysis_settings
from bfq.pipeline.sensitivity import SensitivityError

TIMESTEP_TABLE_FORMAT = "bfq-timestep-errors"  # the "format" of the table (what `bfq analyze --timestep-table` writes)


def timestep_errors(fp_unet: nn.Module, q_unet: nn.Module, *, timesteps: Sequence[int] | None = None,
                    n_timesteps: int = 20, n_prompts: int = 8, seed: int = 0, scheduler=None, base_dir=None,
                    source: Mapping | None = None, steps: int = 20, guidance: float | None = None,
                    device: str = "auto", batch_size: int = 64) -> dict:  # fmt: skip
    """The paper's Fig. 4: error of a quantized UNet against the fp one at each timestep.

    Clean latents ``x0`` are the fp model's own samples (``n_prompts`` prompts, DDIM ``steps``,
    seeded); for each timestep ``t`` they are noised with one fixed noise draw,
    ``x_t = sqrt(ᾱ_t) x0 + sqrt(1−ᾱ_t) ε``, and both UNets predict the noise (conditional branch).
    Reported per t: ``eps_mse`` = mean ``(ε̂_fp − ε̂_q)²``, ``rel_eps_mse`` (over mean ``ε̂_fp²``) and
    ``latent_err`` = ``(1−ᾱ_t)/ᾱ_t · eps_mse`` (the paper's weighting: the error of the predicted x0).

    Returns ``{"timesteps", "eps_mse", "rel_eps_mse", "latent_err", "settings"}``.
    """
    settings = analysis_settings(fp_unet, mode="proxy", scheduler=scheduler, base_dir=base_dir, source=source,
                                 seed=seed, n_prompts=n_prompts, steps=steps, guidance=guidance, n_timesteps=1)  # fmt: skip
    sched_cfg = settings["scheduler"]
    n_train = int(sched_cfg.get("num_train_timesteps", 1000))
    if timesteps is None:
        timesteps = sorted({int(round(v)) for v in np.linspace(0, n_train - 1, n_timesteps)})
    timesteps = [int(t) for t in timesteps]
    if not timesteps or any(t < 0 or t >= n_train for t in timesteps):
        raise SensitivityError(f"timesteps must lie in 0..{n_train - 1}")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    devices = [next(fp_unet.parameters()).device, next(q_unet.parameters()).device]
    try:
        fp_unet.to(dev).eval()
        q_unet.to(dev).eval()
        ctx = _Context(fp_unet, settings, base_dir, dev, batch_size)
        x0, _ = _sample(fp_unet, ctx.cond, ctx.uncond, sched_cfg, steps, settings["guidance"], ctx.initial_noise(), batch_size)
        sched = _ddim(sched_cfg, steps)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + 3)).to(dev)
        abar = sched.alphas_cumprod.double()
        rows = {"eps_mse": [], "rel_eps_mse": [], "latent_err": []}
        for t in timesteps:
            tt = torch.full((x0.shape[0],), t, dtype=torch.long, device=dev)
            xt = sched.add_noise(x0, noise, tt)
            a = _predict(fp_unet, xt, tt, ctx.cond, batch_size).double()
            b = _predict(q_unet, xt, tt, ctx.cond, batch_size).double()
            mse = float(((a - b) ** 2).mean())
            rows["eps_mse"].append(mse)
            rows["rel_eps_mse"].append(mse / max(float((a**2).mean()), 1e-300))
            rows["latent_err"].append(float((1 - abar[t]) / abar[t]) * mse)
    finally:
        fp_unet.to(devices[0])
        q_unet.to(devices[1])
    return {"format": TIMESTEP_TABLE_FORMAT, "timesteps": timesteps, **rows,
            "settings": {k: settings[k] for k in ("seed", "n_prompts", "conditioning", "steps", "guidance", "scheduler")}}  # fmt: skip


def format_timestep_table(table: Mapping) -> str:
    lines = [f"{'t':>5}  {'eps_mse':>11}  {'rel_eps_mse':>11}  {'latent_err':>11}"]
    for t, a, b, c in zip(table["timesteps"], table["eps_mse"], table["rel_eps_mse"], table["latent_err"]):
        lines.append(f"{t:>5}  {a:>11.4e}  {b:>11.4e}  {c:>11.4e}")
    return "\n".join(lines)


def plot_timestep_errors(table: Mapping, path, *, title: str | None = None) -> Path:
    """Log-scale plot of ``eps_mse`` and ``latent_err`` against t (the paper's Fig. 4). Needs matplotlib."""
    from bfq.pipeline.plots import require_matplotlib, save_figure

    matplotlib = require_matplotlib()

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = table["timesteps"]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(6.4, 5.0), sharex=True)
    ax.plot(t, table["latent_err"], "o-", color="#c44e52")
    ax.set_yscale("log")
    ax.set_ylabel("x0 error\n(1-abar_t)/abar_t * MSE")
    ax.set_title(title or "quantization error per timestep", fontsize=10)
    ax2.plot(t, table["eps_mse"], "s-", color="#4c72b0")
    positive = [v for v in table["eps_mse"] if v > 0]
    if positive and max(positive) / min(positive) > 10:
        ax2.set_yscale("log")
    ax2.set_ylabel("noise-prediction MSE\n|eps_fp - eps_q|^2")
    ax2.set_xlabel("timestep t")
    for a in (ax, ax2):
        a.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)
