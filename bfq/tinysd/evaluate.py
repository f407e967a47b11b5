"""The tiny-sd quality metric: prompt alignment and Fréchet distance, over a CFG-scale sweep.

Modelled on the paper's evaluation (CLIP score and FID over CFG scales 3.5/5.5/7.5/9.5), with a
digit classifier trained by the project (:mod:`bfq.tinysd.classifier`) standing in for both CLIP
and Inception:

* **alignment**: the fraction of generated images that the classifier labels as the digit the
  prompt asked for (higher is better; chance is 0.1);
* **fd**: the Fréchet distance between the classifier's 64 penultimate features of the generated
  images and of all 1,797 real digits (lower is better). It carries a small-sample bias: random
  subsets of the real digits themselves score 16 +- 5 (200 images), 4.8 +- 1.5 (500) and
  1.6 +- 0.3 (1,000), so compare models only at the same ``n_per_digit``.

Everything is fixed: the prompts (:func:`bfq.tinysd.data.eval_prompts`), the initial latents (one
draw from ``seed``, shared by every CFG scale and every model, so two UNets are compared on the
same noise), the sampler (DDIM, ``eta=0``, ``steps`` steps) and the empty negative prompt. Results
are bit-reproducible on one machine for the same thread count (``threads``, 1 by default).

CFG scales: the paper sweeps 3.5/5.5/7.5/9.5 around SD's default 7.5, a scale past SD's best FID
that buys prompt alignment. tiny-sd learnt its text conditioning from 1,797 captioned digits and
needs far less guidance: on the bundled weights (200 images per scale, 20 DDIM steps) alignment is
0.990/0.995/0.995/1.000/1.000 and FD 15/17/24/47/76 at scales 1.5/2/3/5/7.5, so above 5 the
images only get harsher. The sweep ``CFG_SCALES = (1.5, 2.0, 3.0, 5.0)`` spans the same regimes
(under-guided, FD-best, alignment-saturated, over-guided), and the default ``DEFAULT_CFG = 3.0``
takes the role of SD's 7.5: the third of four scales, alignment saturated, FD past its minimum.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

CFG_SCALES = (1.5, 2.0, 3.0, 5.0)
DEFAULT_CFG = 3.0
DEFAULT_STEPS = 20
DEFAULT_N_PER_DIGIT = 50


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between two Gaussians: ``|mu1-mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)``.

    Uses symmetric eigendecompositions only (no ``scipy.linalg.sqrtm``), clipping the tiny negative
    eigenvalues that rounding gives a rank-deficient covariance.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = root1 @ s2 @ root1
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross)


def ddim_sampler(base=None):
    """The evaluation's sampler: DDIM (``eta=0``, no sample clipping) on the noise schedule of the
    pipeline at ``base`` (default: the bundled tiny-sd)."""
    from diffusers import DDIMScheduler

    from bfq.tinysd import pipeline_dir

    config = DDIMScheduler.load_config(str(Path(base or pipeline_dir()) / "scheduler"))
    return DDIMScheduler.from_config(config, clip_sample=False)


# Pipelines whose denoiser is a diffusion transformer (``pipe.transformer``), not a UNet.
TRANSFORMER_PIPELINES = ("PixArtSigmaPipeline", "PixArtAlphaPipeline")


def _pipeline_class(base) -> str:
    """The pipeline class that ``model_index.json`` at ``base`` names: an SDXL one such as
    tiny-sdxl's, a PixArt one such as tiny-pixart's, else tiny-sd's ``StableDiffusionPipeline``."""
    import json

    name = json.loads((Path(base) / "model_index.json").read_text()).get("_class_name")
    return name if name in ("StableDiffusionXLPipeline", *TRANSFORMER_PIPELINES) else "StableDiffusionPipeline"


def denoiser_of(pipe):
    """The pipeline's denoiser: its ``transformer`` (PixArt) or its ``unet``."""
    return pipe.transformer if type(pipe).__name__ in TRANSFORMER_PIPELINES else pipe.unet


def _load(unet, base):
    """The pipeline at ``base``, of the class its ``model_index.json`` names, with ``unet`` (a UNet,
    or for a PixArt pipeline a transformer) swapped in when given. The same prompts, latents,
    sampler and classifier score them all (SDXL's ``time_ids`` are those of the default 16x16 size)."""
    from bfq.tinysd import load_bundled, load_pipeline

    cls = _pipeline_class(base)
    if cls == "StableDiffusionPipeline":
        return load_pipeline(unet=unet, directory=base)
    component = "transformer" if cls in TRANSFORMER_PIPELINES else "unet"
    return load_bundled(cls, base, **{component: unet})


def _pipeline(unet, base, scheduler=None):
    """The pipeline at ``base`` with ``unet`` (or a PixArt transformer) swapped in and ``scheduler``
    (default :func:`ddim_sampler`).

    Everything runs in float32: a denoiser with half-precision weights is evaluated as a float32
    copy, except one that computes in bf16 behind a float32 interface (``bfq_compute``, a CPU bf16
    load).
    """
    import copy

    import torch

    tensors = unet.state_dict().values() if unet is not None else ()
    if getattr(unet, "bfq_compute", None) is None and any(t.is_floating_point() and t.dtype != torch.float32 for t in tensors):
        unet = copy.deepcopy(unet).float()
    pipe = _load(unet, base)
    pipe.scheduler = copy.deepcopy(scheduler) if scheduler is not None else ddim_sampler(base)
    denoiser_of(pipe).eval()
    return pipe


def _call_kwargs(pipe) -> dict:
    """Pipeline arguments beyond the common ones: PixArt's resolution binning knows only its own
    256-2048 pixel sizes (off: the default size is the model's), and its caption cleaning would
    depend on whether bs4 and ftfy are installed (off: the prompts are plain)."""
    if type(pipe).__name__ in TRANSFORMER_PIPELINES:
        return {"use_resolution_binning": False, "clean_caption": False}
    return {}


def generate(pipe, prompts: list[str], latents, cfg: float, steps: int, batch_size: int = 250, bar=None) -> np.ndarray:
    """Images ``N x H x W x 3`` in [0, 1] for ``prompts`` from the given initial ``latents``;
    ``bar`` (a tqdm bar) advances by the images of each batch."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            result = pipe(
                prompt=prompts[i : i + batch_size],
                latents=latents[i : i + batch_size],
                guidance_scale=cfg,
                num_inference_steps=steps,
                eta=0.0,
                output_type="np",
                **_call_kwargs(pipe),
            )
            out.append(np.asarray(result.images, dtype=np.float32))
            if bar is not None:
                bar.update(len(out[-1]))
    return np.concatenate(out)


def evaluate(
    unet=None,
    *,
    base=None,
    cfg_scales=CFG_SCALES,
    default_cfg: float = DEFAULT_CFG,
    n_per_digit: int = DEFAULT_N_PER_DIGIT,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    grid_path=None,
    grid_columns: int = 4,
    batch_size: int = 250,
    threads: int | None = 1,
    classifier=None,
    device: str = "cpu",
    scheduler=None,
    progress: bool = False,
) -> dict:
    """Score a tiny-sd (or tiny-sdxl, tiny-pixart) denoiser: alignment and Fréchet distance at each CFG scale.

    Args:
        unet: the denoiser to put into the pipeline: a ``UNet2DConditionModel`` (a quantized one
            from ``bfq.load_unet`` for instance), or for a PixArt ``base`` a
            ``PixArtTransformer2DModel``; None scores the denoiser of ``base``.
        base: the pipeline directory that provides VAE, text encoder(s), tokenizer(s) and scheduler
            config (default: the bundled tiny-sd; the bundled tiny-sdxl's is
            ``bfq.tinysdxl.pipeline_dir()``, tiny-pixart's ``bfq.tinypixart.pipeline_dir()``).
        cfg_scales: the guidance sweep; ``default_cfg`` is added to it if missing.
        default_cfg: the scale whose scores are reported as top-level ``alignment`` and ``fd``.
        n_per_digit: images per digit and scale (10x that many per scale).
        steps: DDIM steps.
        seed: seeds the prompts' templates and the initial latents.
        grid_path: if given, an image grid is written there: one row per digit, ``grid_columns``
            samples for each scale, scales left to right, each labelled with its scale.
        batch_size: prompts per pipeline call.
        threads: torch threads while evaluating (restored afterwards); None leaves it alone.
        classifier: a loaded :class:`bfq.tinysd.classifier.Classifier` (default: the bundled one).
        device: where the pipeline runs (the initial latents are drawn on the CPU either way).
        scheduler: the sampler (default :func:`ddim_sampler`; a UNet whose scheduler-mode time
            cache holds other timesteps needs the scheduler it was made for).
        progress: show a progress bar (images generated, with ETA) on stderr.
    Returns:
        ``{"alignment", "fd", "default_cfg", "sweep": [{"cfg", "alignment", "fd"}, ...],
        "settings": {...}, "seconds"}``.

    Example:
        >>> r = evaluate(n_per_digit=5, steps=10, cfg_scales=(3.0,))
        >>> r["alignment"], r["fd"]
    """
    import torch
    from tqdm.auto import tqdm

    from bfq.tinysd import pipeline_dir
    from bfq.tinysd.classifier import load_classifier
    from bfq.tinysd.data import eval_prompts

    start = time.perf_counter()
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        base = Path(base or pipeline_dir())
        scales = sorted(set(float(c) for c in cfg_scales) | {float(default_cfg)})
        clf = classifier or load_classifier()
        pipe = _pipeline(unet, base, scheduler).to(device)
        prompts = eval_prompts(n_per_digit, seed)
        config = denoiser_of(pipe).config
        shape = (len(prompts), config.in_channels, config.sample_size, config.sample_size)
        latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)
        digits = np.array([p.digit for p in prompts])
        sweep, grids = [], []
        with tqdm(total=len(scales) * len(prompts), desc="eval", unit="image", disable=not progress) as bar:
            for cfg in scales:
                bar.set_postfix_str(f"cfg {cfg:g}", refresh=False)
                images = generate(pipe, [p.text for p in prompts], latents, cfg, steps, batch_size, bar)
                labels, feats = clf(images.mean(-1))
                fd = frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), clf.mu, clf.sigma)
                sweep.append(dict(cfg=cfg, alignment=float((labels == digits).mean()), fd=fd))
                grids.append(images.reshape(10, n_per_digit, *images.shape[1:])[:, :grid_columns])
    finally:
        torch.set_num_threads(previous_threads)
    at_default = next(row for row in sweep if row["cfg"] == float(default_cfg))
    if grid_path is not None:
        save_grid(grids, grid_path, labels=[f"cfg {c:g}" for c in scales])
    return dict(
        alignment=at_default["alignment"],
        fd=at_default["fd"],
        default_cfg=float(default_cfg),
        sweep=sweep,
        settings=dict(
            base=str(base),
            n_per_digit=n_per_digit,
            images_per_scale=len(prompts),
            steps=steps,
            sampler="DDIM eta=0" if scheduler is None else type(scheduler).__name__,
            seed=seed,
            threads=threads,
        ),
        seconds=round(time.perf_counter() - start, 1),
    )


def save_grid(blocks, path, zoom: int = 3, gap: int = 2, labels=None) -> Path:
    """Write sample blocks (each ``rows x cols x H x W x 3`` in [0, 1]) side by side as one image,
    atomically (missing folders are created).

    Pixels are enlarged ``zoom`` times (nearest neighbour); blocks and images are separated by
    mid-gray gaps of ``gap`` pixels; ``labels`` (one per block, e.g. its CFG scale) are written in a
    band above the blocks.
    """
    from PIL import Image

    from bfq._io import atomic_path

    tiles = []
    for block in blocks:
        rows, cols, h, w, _ = block.shape
        canvas = np.full((rows * (h + gap) + gap, cols * (w + gap) + gap, 3), 0.5, np.float32)
        for r in range(rows):
            for c in range(cols):
                y, x = gap + r * (h + gap), gap + c * (w + gap)
                canvas[y : y + h, x : x + w] = block[r, c]
        tiles.append(canvas)
    sep = np.full((tiles[0].shape[0], 2 * gap, 3), 0.2, np.float32)
    grid = np.concatenate([t for tile in tiles for t in (tile, sep)][:-1], axis=1)
    grid = np.kron(grid, np.ones((zoom, zoom, 1), np.float32))
    image = Image.fromarray((grid.clip(0, 1) * 255).round().astype(np.uint8))
    if labels:
        image = _label_blocks(image, [t.shape[1] * zoom for t in tiles], 2 * gap * zoom, labels)
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format=Image.registered_extensions().get(path.suffix.lower(), "PNG"))
    return path


LABEL_BAND = 14  # pixels above the blocks for their labels
LABEL_INK = (0, 0, 0)


def _label_blocks(image, widths: list[int], sep: int, labels: list[str]):
    """``image`` with a white band on top holding ``labels[i]`` centred over the block of ``widths[i]``."""
    from PIL import Image, ImageDraw

    out = Image.new("RGB", (image.width, image.height + LABEL_BAND), (255, 255, 255))
    out.paste(image, (0, LABEL_BAND))
    draw = ImageDraw.Draw(out)
    x = 0
    for width, label in zip(widths, labels):
        left, top, right, bottom = draw.textbbox((0, 0), label)
        draw.text((x + (width - (right - left)) // 2, (LABEL_BAND - (bottom - top)) // 2 - top), label, fill=LABEL_INK)
        x += width + sep
    return out


def format_report(result: dict, title: str = "") -> str:
    """A plain-text table of an :func:`evaluate` result, one row per CFG scale (* = default)."""
    lines = [title] if title else []
    lines.append(f"{'cfg':>6}  {'alignment':>9}  {'fd':>8}")
    for row in result["sweep"]:
        mark = "*" if row["cfg"] == result["default_cfg"] else " "
        lines.append(f"{row['cfg']:>5.1f}{mark}  {row['alignment']:>9.3f}  {row['fd']:>8.2f}")
    s = result["settings"]
    lines.append(
        f"{s['images_per_scale']} images per scale, {s['sampler']} {s['steps']} steps, seed {s['seed']}, "
        f"{result['seconds']:.0f}s"
    )
    return "\n".join(lines)
