"""Generate images with a quantized UNet or diffusion transformer (or a float one) inside its base
pipeline (the model family's pipeline class: ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``,
``PixArtSigmaPipeline``/``PixArtAlphaPipeline`` with the model as its ``transformer``).

A file with a scheduler-mode time cache holds time features for the timesteps of one sampler and
step count only: sampling defaults to them, and a step count or sampler that would visit other
timesteps is refused before anything is loaded. A grid-mode file, or a float model, takes any.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from bfq._io import atomic_path, display, sha256_file
from bfq._quiet import quiet_libraries
from bfq.errors import InputError
from bfq.families import FAMILIES, family_for_config, model_folder
from bfq.quant.timecache import check_cached_steps, scheduler_timesteps
from bfq.runtime.load import compute_dtype

DEFAULT_STEPS = 50
GUTTER = 4  # pixels between the images of a grid
GUTTER_COLOR = (255, 255, 255)
# --sampler names (as other front ends call them) -> diffusers schedulers; each takes the noise
# schedule (betas, offsets, spacing) of the file's or the base pipeline's own scheduler.
SAMPLERS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "lms": "LMSDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
}


def base_pipeline_for(source: dict | None, file: str | os.PathLike | None = None) -> str:
    """Where the VAE, text encoder and tokenizer of a .bfq's source model live: tiny-sd's bundled
    pipeline, the Hub repo it came from, or for a local pipeline folder the folder of that name
    (next to the file, or in the current folder) whose UNet weights still hash to the recorded sha256."""
    source = source or {}
    tiny = {f.tiny_name: f for f in FAMILIES}
    if source.get("kind") == "builtin" and source.get("name") in tiny:
        return str(tiny[source["name"]].tiny_pipeline_dir())
    if source.get("kind") == "hub" and source.get("repo"):
        return source["repo"]
    if source.get("kind") == "file" and source.get("name"):
        return _local_pipeline(source["name"], source["sha256"], file)
    raise InputError(
        f"the file does not say which pipeline it was made from (model.source {source or 'absent'}), so the "
        "VAE and text encoder are unknown: pass --base DIR_OR_REPO (a Stable Diffusion pipeline)"
    )


def _local_pipeline(name: str, sha256: str, file) -> str:
    """The pipeline folder ``name`` next to ``file`` or in the current folder whose UNet is the one the
    file was made from (the header stores no local path, FORMAT.md: only the folder's name and hash)."""
    where = [Path(file).resolve().parent] if file is not None else []
    folders = [d / name for d in (*where, Path.cwd()) if (d / name / "model_index.json").is_file()]
    for folder in dict.fromkeys(folders):
        if _unet_sha256(folder / (model_folder(folder) or "unet")) == sha256:
            return str(folder)
    if folders:
        raise InputError(f"the file was made from a pipeline folder named {name!r}; {folders[0]} has that name but another "
                         f"UNet: pass --base {folders[0]} to use its VAE and text encoder anyway")  # fmt: skip
    raise InputError(f"the file was made from a local model named {name!r}; no pipeline folder of that name holding its "
                     "UNet is next to the file or in the current folder: pass --base DIR (a Stable Diffusion pipeline "
                     "with its VAE and text encoder)")  # fmt: skip


def _unet_sha256(unet_dir: Path) -> str | None:
    """The source hash bfq.pipeline.models records for a UNet folder's safetensors weights: sha256 of
    one file; for several, sha256 over the lines ``"<name> <sha256>\\n"`` (sorted)."""
    files = sorted(unet_dir.glob("*.safetensors"))
    files = [p for p in files if ".fp16." not in p.name] or files
    if not files:
        return None
    if len(files) == 1:
        return sha256_file(files[0])
    return hashlib.sha256("".join(f"{p.name} {sha256_file(p)}\n" for p in files).encode()).hexdigest()


def cached_sampler(metadata: dict):
    """(scheduler, steps) a scheduler-mode cache was made for, from the file's metadata, or (None, None).

    Metadata is free text that any writer may fill: what cannot be a diffusers scheduler is refused
    in one line (:class:`InputError`, its text escaped) instead of reaching diffusers."""
    if "scheduler" not in metadata:
        return None, None
    import diffusers

    try:
        spec = json.loads(metadata["scheduler"])
        name, config = spec["class_name"], spec["config"]
        steps = int(metadata.get("num_inference_steps", DEFAULT_STEPS))
        if not (isinstance(name, str) and name.endswith("Scheduler") and isinstance(config, dict) and 1 <= steps <= 10_000):
            raise ValueError
    except (ValueError, TypeError, KeyError, RecursionError):
        raise InputError(f"the file's metadata names no usable sampler (scheduler {display(metadata['scheduler'], 80)}, "
                         f"steps {display(metadata.get('num_inference_steps'), 20)})") from None  # fmt: skip
    cls = getattr(diffusers, name, None)
    if cls is None:
        return None, None
    try:
        with quiet_libraries():
            return cls.from_config(config), steps
    except Exception as exc:  # a hostile config may break a scheduler's constructor anywhere
        raise InputError(f"the file's scheduler {display(name, 60)} cannot be built from its metadata: "
                         f"{display(str(exc), 120)}") from None  # fmt: skip


def make_sampler(name: str, like):
    """The diffusers scheduler for the sampler ``name`` (a key of SAMPLERS) with ``like``'s noise schedule."""
    import diffusers

    if name not in SAMPLERS:
        raise InputError(f"unknown sampler {name!r}: one of {', '.join(SAMPLERS)}")
    with quiet_libraries():
        return getattr(diffusers, SAMPLERS[name]).from_config(like.config)


@dataclass
class FileSampler:
    """What a .bfq file (or a float model: path None, no cache) says about sampling with it."""

    path: str | None
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

    def check_sampler(self, name: str, steps: int, like=None):
        """The scheduler of sampler ``name`` (with ``like``'s noise schedule; default the file's own
        scheduler), after checking it can sample ``steps`` steps with this file: a scheduler-mode cache
        allows exactly the samplers whose timesteps at ``steps`` steps are all cached."""
        like = like or self.scheduler
        if like is None:
            return None
        scheduler = make_sampler(name, like)
        if self.cache_mode != "scheduler":
            scheduler_timesteps(scheduler, steps)
            return scheduler
        self.check_steps(steps, like)
        cached = {float(t) for t in self.cached_timesteps}
        with quiet_libraries():
            fits = [n for n in SAMPLERS if set(scheduler_timesteps(make_sampler(n, like), steps)) <= cached]
        if name not in fits:
            raise InputError(
                f"this file's time cache (scheduler mode) holds the timesteps of {type(like).__name__} at {self.steps} steps "
                f"only; sampler {name} visits others at {steps} steps. Samplers that fit: {', '.join(fits) or 'none'}; "
                "or make a file for any sampler with `bfq quantize ... --time-cache grid`"
            )
        return scheduler

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


def float_sampler(unet, scheduler=None) -> FileSampler:
    """The sampling facts of a float UNet (any sampler, any step count) with its pipeline's scheduler."""
    return FileSampler(None, None, dict(unet.config), type(unet).__name__, None, [], scheduler, None)


def load_pipeline(model: str, *, base: str | None = None, device: str | None = None, dtype: torch.dtype | None = None,
                  revision: str | None = None, runtime: str = "auto", sampler: FileSampler | None = None, unet=None,
                  compute: str = "auto"):  # fmt: skip
    """The model family's diffusers pipeline (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``,
    ``PixArtSigmaPipeline``) around the quantized model of ``model`` (a .bfq path or Hub repo id),
    ready to call::

        pipe = bfq.load_pipeline("tiny.bfq")
        image = pipe("a handwritten digit seven", num_inference_steps=20).images[0]

    The VAE, text encoder and tokenizer come from ``base`` (a pipeline folder or Hub repo), by
    default from the model the file was made from (its header records it); a scheduler-mode file
    brings the scheduler its time cache was made for, and samples only its step count (``bfq
    inspect`` shows it). ``runtime`` is :func:`bfq.load_unet`'s ("auto": packed on the CPU, dense on
    accelerators); ``dtype`` (the pipeline's) defaults to float16 on CUDA, else float32. ``compute``
    is the quantized UNet's dtype when ``dtype`` is not given (:func:`bfq.runtime.load.compute_dtype`;
    "auto": bf16 on a CPU with native bf16, behind the float32 pipeline; "int8": 8-bit activations on
    the int8 codes, :func:`bfq.load_unet`). ``unet`` (with ``sampler``
    from :func:`float_sampler`) uses that UNet instead of a file's."""
    import bfq

    sampler = sampler or file_sampler(model, revision)
    family = family_for_config(sampler.config, sampler.class_name)
    device = device or ("cuda" if torch.cuda.is_available() and compute != "int8" else "cpu")
    unet_dtype = dtype or compute_dtype(compute, device)
    dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
    base = base or base_pipeline_for(sampler.source, sampler.path)
    if unet is None:
        int8 = dict(compute="int8") if compute == "int8" and dtype is None else dict(dtype=unet_dtype)
        unet = bfq.load_unet(sampler.path, device=device, runtime=runtime, **int8)
    with quiet_libraries():
        try:
            pipe = family.pipeline_from(base, unet)
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot load the base pipeline {base} (VAE, text encoder): {exc}; pass --base "
                             f"DIR_OR_REPO naming a {family.title} pipeline") from None  # fmt: skip
        if sampler.scheduler is not None:
            pipe.scheduler = sampler.scheduler
        pipe.set_progress_bar_config(disable=True)
        pipe = pipe.to(device, dtype) if dtype != torch.float32 else pipe.to(device)
    return pipe


def generate(model: str, prompts: list[str], *, base=None, out="grid.png", num_images=1, steps=None, guidance=7.5, seed=0,
             device=None, revision=None, runtime="auto", negative_prompt=None, width=None, height=None, sampler=None,
             progress=False, unet=None, scheduler=None, compute="auto") -> Path:  # fmt: skip
    """Generate ``num_images`` per prompt and save them as one image grid (a row per prompt, gutters
    between images). The step count defaults to the one a scheduler-mode time cache was made for;
    a step count or ``sampler`` (a key of SAMPLERS; default the file's or the base's own scheduler)
    that would visit uncached timesteps is refused before the pipeline is loaded. ``unet`` (a float
    UNet, with its pipeline's ``scheduler``) generates with it instead of the file ``model``.
    ``progress`` shows a bar per prompt with the time per step (on stderr)."""
    image_format = _pil_format(out)
    facts = file_sampler(model, revision) if unet is None else float_sampler(unet, scheduler)
    steps = steps or facts.default_steps()
    facts.check_steps(steps)
    chosen = facts.check_sampler(sampler, steps) if sampler else None
    pipe = load_pipeline(model, base=base, device=device, revision=revision, sampler=facts, runtime=runtime, unet=unet,
                         compute=compute)  # fmt: skip
    if sampler and chosen is None:  # the file names no scheduler: the base's schedule
        chosen = facts.check_sampler(sampler, steps, pipe.scheduler)
    pipe.scheduler = chosen or pipe.scheduler
    family = family_for_config(facts.config, facts.class_name)
    extra = family.pipeline_call_kwargs(facts.config)
    if negative_prompt is not None:  # PixArt's pipelines take "" for none, not None
        extra["negative_prompt"] = negative_prompt
    facts.check_steps(steps, pipe.scheduler)  # a file that does not name its scheduler: the base's
    generator = torch.Generator("cpu").manual_seed(seed)
    rows = []
    for i, prompt in enumerate(prompts):
        pipe.set_progress_bar_config(disable=not progress, desc=f"prompt {i + 1}/{len(prompts)}", unit="step", file=sys.stderr,
                                     bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_inv_fmt}]")  # fmt: skip
        rows.append(pipe(prompt, num_images_per_prompt=num_images, num_inference_steps=steps, guidance_scale=guidance,
                         generator=generator, width=width, height=height, **extra).images)  # fmt: skip
    grid = image_grid(rows)
    with atomic_path(out) as tmp:
        grid.save(tmp, format=image_format)
    return Path(out)


def peak_memory() -> dict[str, int]:
    """The process's peak memory so far in bytes: ``{"rss": ...}`` and, when CUDA was used, ``{"cuda": ...}``."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = {"rss": rss if sys.platform == "darwin" else rss * 1024}  # macOS reports bytes, Linux KiB
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["cuda"] = torch.cuda.max_memory_allocated()
    return peak


def image_grid(rows: list[list], gutter: int = GUTTER):
    """One image of equally sized images, a row per list, ``gutter`` pixels between them; images
    smaller than 128 px (tiny-sd: 16 px) are enlarged to be seen."""
    from PIL import Image

    w0, h0 = rows[0][0].size
    zoom = max(1, 128 // min(w0, h0))
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
