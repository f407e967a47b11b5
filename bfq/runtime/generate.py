"""Generate images with a quantized UNet inside its base pipeline (the model family's pipeline class:
``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``).

A file with a scheduler-mode time cache holds time features for one sampler and step count only:
sampling defaults to them, and any other step count is refused before anything is loaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from bfq._io import atomic_path
from bfq._quiet import quiet_libraries
from bfq.errors import InputError
from bfq.families import FAMILIES, family_for_config
from bfq.quant.timecache import check_cached_steps, scheduler_timesteps

DEFAULT_STEPS = 50
GUTTER = 4  # pixels between the images of a grid
GUTTER_COLOR = (255, 255, 255)


def base_pipeline_for(source: dict | None) -> str:
    """Where the VAE, text encoder and tokenizer of a .bfq's source model live."""
    source = source or {}
    tiny = {f.tiny_name: f for f in FAMILIES}
    if source.get("kind") == "builtin" and source.get("name") in tiny:
        return str(tiny[source["name"]].tiny_pipeline_dir())
    if source.get("kind") == "hub" and source.get("repo"):
        return source["repo"]
    raise InputError(
        f"the file does not say which pipeline it was made from (model.source {source or 'absent'}), so the "
        "VAE and text encoder are unknown: pass --base DIR_OR_REPO (a Stable Diffusion pipeline)"
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


@dataclass
class FileSampler:
    """What a .bfq file says about sampling with it."""

    path: str
    source: dict | None
    config: dict  # the UNet's config
    class_name: str  # the UNet's diffusers class
    cache_mode: str | None  # "scheduler", "grid" or None
    cached_timesteps: list[float]
    scheduler: object | None  # the scheduler a scheduler-mode cache was made for (None: unknown)
    steps: int | None  # its step count

    def check_steps(self, steps: int, scheduler=None) -> None:
        """Raise InputError unless ``scheduler`` (default: the file's own; None: nothing known yet) can
        sample ``steps`` steps with this file: 1..its training timesteps, and only cached timesteps
        for a scheduler-mode cache."""
        scheduler = scheduler or self.scheduler
        if scheduler is None:
            return
        if self.cache_mode == "scheduler":
            check_cached_steps(self.cached_timesteps, scheduler, steps, self.steps)
        else:
            scheduler_timesteps(scheduler, steps)

    def default_steps(self) -> int:
        return self.steps or DEFAULT_STEPS


def file_sampler(model: str, revision: str | None = None) -> FileSampler:
    """Read (without decoding any layer) the sampling facts of a .bfq path or Hub repo id."""
    from bfq.download import download_bfq
    from bfq.format import open_bfq

    path = model if os.path.exists(model) else download_bfq(model, revision=revision)
    with open_bfq(path) as f:
        model, metadata, cache = f.header.model, f.header.metadata, f.header.time_cache
    scheduler, steps = cached_sampler(metadata)
    mode = cache.mode if cache is not None else None
    timesteps = list(cache.timesteps) if cache else []
    return FileSampler(os.fspath(path), model.get("source"), model["config"], model["class_name"], mode, timesteps,
                       scheduler, steps)  # fmt: skip


def load_pipeline(model: str, *, base: str | None = None, device: str | None = None, revision: str | None = None,
                  sampler: FileSampler | None = None, runtime: str = "auto"):  # fmt: skip
    """The family's pipeline (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``) with the quantized
    UNet of `model`, and its default step count. `runtime` is :func:`bfq.load_unet`'s ("auto":
    packed on the CPU, dense on accelerators)."""
    import bfq

    sampler = sampler or file_sampler(model, revision)
    family = family_for_config(sampler.config, sampler.class_name)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    base = base or base_pipeline_for(sampler.source)
    unet = bfq.load_unet(sampler.path, device=device, dtype=dtype, runtime=runtime)
    with quiet_libraries():
        import diffusers

        try:
            pipe = getattr(diffusers, family.pipeline_class).from_pretrained(base, unet=unet, **family.pipeline_kwargs)
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot load the base pipeline {base} (VAE, text encoder): {exc}; pass --base "
                             f"DIR_OR_REPO naming a {family.title} pipeline") from None  # fmt: skip
        if sampler.scheduler is not None:
            pipe.scheduler = sampler.scheduler
        pipe.set_progress_bar_config(disable=True)
        pipe = pipe.to(device, dtype) if dtype != torch.float32 else pipe.to(device)
    return pipe, sampler.steps


def generate(model: str, prompts: list[str], *, base=None, out="grid.png", num_images=1, steps=None, guidance=7.5, seed=0,
             device=None, revision=None, runtime="auto") -> Path:  # fmt: skip
    """Generate `num_images` per prompt and save them as one image grid (a row per prompt, gutters
    between images). The step count defaults to the one a scheduler-mode time cache was made for;
    another one is refused before the pipeline is loaded."""
    image_format = _pil_format(out)
    sampler = file_sampler(model, revision)
    steps = steps or sampler.default_steps()
    sampler.check_steps(steps)
    pipe, _ = load_pipeline(model, base=base, device=device, revision=revision, sampler=sampler, runtime=runtime)
    sampler.check_steps(steps, pipe.scheduler)  # a file that does not name its scheduler: the base's
    generator = torch.Generator("cpu").manual_seed(seed)
    rows = [pipe([prompt] * num_images, num_inference_steps=steps, guidance_scale=guidance, generator=generator).images
            for prompt in prompts]  # fmt: skip
    grid = image_grid(rows)
    with atomic_path(out) as tmp:
        grid.save(tmp, format=image_format)
    return Path(out)


def image_grid(rows: list[list], gutter: int = GUTTER):
    """One image of equally sized images, a row per list, ``gutter`` pixels between them; images
    smaller than 128 px (tiny-sd: 16 px) are enlarged to be seen."""
    from PIL import Image

    w0, h0 = rows[0][0].size
    zoom = max(1, 128 // w0)
    w, h = w0 * zoom, h0 * zoom
    cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (cols * w + (cols - 1) * gutter, len(rows) * h + (len(rows) - 1) * gutter), GUTTER_COLOR)
    for r, images in enumerate(rows):
        for c, image in enumerate(images):
            grid.paste(image.resize((w, h), Image.NEAREST), (c * (w + gutter), r * (h + gutter)))
    return grid


def _pil_format(path) -> str:
    from PIL import Image

    Image.init()
    suffix = Path(path).suffix.lower()
    if Image.registered_extensions().get(suffix) not in Image.SAVE:
        raise InputError(f"{path}: cannot write an image with the suffix {suffix or '(none)'}; use .png, .jpg or .webp")
    return Image.registered_extensions()[suffix]
