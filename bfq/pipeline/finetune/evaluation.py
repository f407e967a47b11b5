"""Periodic evaluation during fine-tuning (``eval_fn`` of :func:`bfq.pipeline.finetune.finetune`): the
tiny-sd metric, or the CLIP score of any Stable Diffusion pipeline with a local CLIP model."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn.functional as F


def tinysd_eval_fn(*, n_per_digit: int = 20, steps: int = 20, cfg_scales=None, seed: int = 0, base=None) -> Callable:
    """``eval_fn`` for tiny-sd: :func:`bfq.tinysd.evaluate.evaluate` (alignment and Fréchet distance) at
    reduced settings; returns ``{"alignment", "fd"}`` at the default CFG plus ``alignment@cfg`` /
    ``fd@cfg`` for every other scale of ``cfg_scales`` (default: the default scale only)."""
    from bfq.tinysd.evaluate import DEFAULT_CFG, evaluate

    scales = tuple(cfg_scales) if cfg_scales else (DEFAULT_CFG,)

    def run(unet) -> dict:
        r = evaluate(unet, base=base, cfg_scales=scales, n_per_digit=n_per_digit, steps=steps, seed=seed)
        out = {"alignment": r["alignment"], "fd": r["fd"]}
        for row in r["sweep"]:
            if row["cfg"] != r["default_cfg"]:
                out[f"alignment@{row['cfg']:g}"], out[f"fd@{row['cfg']:g}"] = row["alignment"], row["fd"]
        return out

    return run


def clip_eval_fn(pipeline_dir, clip_model, prompts, *, steps: int = 25, cfg: float = 7.5, seed: int = 1024,
                 batch_size: int = 8) -> Callable:  # fmt: skip
    """``eval_fn`` for any Stable Diffusion pipeline: the mean CLIP image-text cosine (the paper's
    CLIP score) of images generated for ``prompts`` (a list or a file with one prompt a line) with
    seeded noise, DDIM ``steps`` steps and guidance ``cfg``. ``clip_model`` is a local directory
    holding a transformers ``CLIPModel`` and its ``CLIPProcessor`` (no download)."""
    from bfq.pipeline.finetune.data import read_prompts

    prompt_list = read_prompts(prompts) if isinstance(prompts, (str, os.PathLike)) else list(prompts)

    @torch.no_grad()
    def run(unet) -> dict:
        from diffusers import DDIMScheduler
        from transformers import CLIPModel, CLIPProcessor

        from bfq.families import family_of

        family = family_of(unet)
        device = next(unet.parameters()).device
        extra = {"requires_safety_checker": False} if "safety_checker" in family.pipeline_kwargs else {}
        pipe = family.pipeline_from(str(pipeline_dir), unet, local_files_only=True, **extra)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
        pipe.set_progress_bar_config(disable=True)
        pipe.to(device)
        model = CLIPModel.from_pretrained(str(clip_model), local_files_only=True).to(device).eval()
        proc = CLIPProcessor.from_pretrained(str(clip_model), local_files_only=True)
        scores = []
        for i in range(0, len(prompt_list), batch_size):
            chunk = prompt_list[i : i + batch_size]
            gen = torch.Generator().manual_seed(seed + i)
            images = pipe(chunk, num_inference_steps=steps, guidance_scale=cfg, generator=gen, output_type="pil",
                          **family.pipeline_call_kwargs(dict(unet.config))).images  # fmt: skip
            inputs = proc(text=chunk, images=images, return_tensors="pt", padding=True, truncation=True)
            out = model(**{k: v.to(device) for k, v in inputs.items()})
            a = F.normalize(out.image_embeds.double(), dim=-1)
            b = F.normalize(out.text_embeds.double(), dim=-1)
            scores.append((a * b).sum(-1).cpu())
        return {"clip_score": float(torch.cat(scores).mean())}

    return run


def default_eval_fn(resolved_model, config=None) -> Callable | None:
    """The periodic evaluation for a resolved model: the tiny-sd metric for the bundled tiny models
    (tiny-sd, tiny-sdxl: with its own pipeline); the CLIP score when ``config.eval_clip`` names a
    local CLIP model and ``config.eval_prompts`` a prompt file (needs the model's pipeline
    directory); else None."""
    from bfq.families import FAMILIES

    name = getattr(resolved_model, "name", "")
    base = getattr(resolved_model, "base_dir", None)
    if name == "tiny-sd":
        return tinysd_eval_fn()
    if name in {f.tiny_name for f in FAMILIES} and base is not None:
        return tinysd_eval_fn(base=base)
    if config is not None and config.eval_clip and config.eval_prompts and base is not None:
        return clip_eval_fn(base, config.eval_clip, config.eval_prompts)
    return None
