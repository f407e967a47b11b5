"""Generate images with a quantized UNet inside its base Stable Diffusion pipeline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from bfq.errors import BfqFormatError

DEFAULT_STEPS = 50


def base_pipeline_for(source: dict | None) -> str:
    """Where the VAE, text encoder and tokenizer of a .bfq's source model live."""
    source = source or {}
    if source.get("kind") == "builtin" and source.get("name") == "tiny-sd":
        from bfq.tinysd import pipeline_dir

        return str(pipeline_dir())
    if source.get("kind") == "hub" and source.get("repo"):
        return source["repo"]
    raise BfqFormatError(
        f"model.source {source!r} names no pipeline to take the VAE and text encoder from; pass --base DIR_OR_ID"
    )


def cached_sampler(metadata: dict):
    """(scheduler, steps) a scheduler-mode cache was made for, from the file's metadata, or (None, None)."""
    if "scheduler" not in metadata:
        return None, None
    import diffusers

    spec = json.loads(metadata["scheduler"])
    cls = getattr(diffusers, spec["class_name"], None)
    if cls is None:
        return None, None
    return cls.from_config(spec["config"]), int(metadata.get("num_inference_steps", DEFAULT_STEPS))


def load_pipeline(model: str, *, base: str | None = None, device: str | None = None, revision: str | None = None,
                  runtime: str = "auto"):  # fmt: skip
    """A StableDiffusionPipeline with the quantized UNet of `model`, and its default step count.
    `runtime` is :func:`bfq.load_unet`'s ("auto": packed on the CPU, dense on accelerators)."""
    from diffusers import StableDiffusionPipeline

    import bfq
    from bfq.download import download_bfq
    from bfq.format import open_bfq

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    path = model if os.path.exists(model) else download_bfq(model, revision=revision)
    with open_bfq(path) as f:
        source, metadata = f.header.model.get("source"), f.header.metadata
    unet = bfq.load_unet(path, device=device, dtype=dtype, runtime=runtime)
    pipe = StableDiffusionPipeline.from_pretrained(base or base_pipeline_for(source), unet=unet, torch_dtype=dtype, safety_checker=None)
    scheduler, steps = cached_sampler(metadata)
    if scheduler is not None:
        pipe.scheduler = scheduler
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device), steps


def generate(model: str, prompts: list[str], *, base=None, out="grid.png", num_images=1, steps=None, guidance=7.5, seed=0, device=None, revision=None, runtime="auto") -> Path:
    """Generate `num_images` per prompt and save them as one PNG grid (a row per prompt)."""
    from PIL import Image

    pipe, cached_steps = load_pipeline(model, base=base, device=device, revision=revision, runtime=runtime)
    steps = steps or cached_steps or DEFAULT_STEPS
    generator = torch.Generator("cpu").manual_seed(seed)
    rows = []
    for prompt in prompts:
        result = pipe([prompt] * num_images, num_inference_steps=steps, guidance_scale=guidance, generator=generator)
        rows.append(result.images)
    zoom = max(1, 128 // rows[0][0].size[0])  # small models (tiny-sd: 16 px) are enlarged to be seen
    rows = [[image.resize((image.width * zoom, image.height * zoom), Image.NEAREST) for image in images] for images in rows]
    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * num_images, h * len(rows)))
    for r, images in enumerate(rows):
        for c, image in enumerate(images):
            grid.paste(image, (c * w, r * h))
    out = Path(out)
    grid.save(out)
    return out
