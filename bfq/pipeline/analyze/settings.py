"""What an analysis measures and with what: its constants, prompts and the settings record that
keys its file and its cache entry (`analysis_settings`)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import nn

from bfq.pipeline.sensitivity import SensitivityError

MODES = ("proxy", "image", "local")
LOCAL_RESOLUTION = 16  # latent side of local mode's recording forward (at most the model's own)
LOCAL_PROBES = 4  # random-projection backwards per target (guided prediction, guidance direction)
LOCAL_MAX_ROWS = 256  # input rows (Linear) or feature-map positions (Conv2d) recorded per layer and CFG half
DEFAULT_BITS = (1, 2, 3)
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    set_alpha_to_one=False, steps_offset=1, clip_sample=False)  # fmt: skip
RANDOM_SEQ_LEN = 16  # token count of the random embeddings of a bare UNet
# Fixed prompts for models with a text encoder that are not tiny-sd (PartiPrompts-like, written here).
DEFAULT_PROMPTS = (
    "a teddy bear on a skateboard in times square",
    "a red sports car parked on a cobblestone street",
    "an oil painting of a lighthouse in a storm",
    "a bowl of ramen with a soft-boiled egg, studio photo",
    "a portrait of an old man with a white beard",
    "a cat wearing sunglasses sitting on a beach chair",
    "a watercolor of cherry blossoms along a river",
    "a futuristic city skyline at night with flying cars",
    "a wooden cabin in a snowy forest at dawn",
    "a close-up photo of a hummingbird drinking nectar",
    "a plate of sushi on a black slate board",
    "an astronaut riding a horse on the moon",
    "a stained glass window depicting a peacock",
    "a golden retriever puppy playing in autumn leaves",
    "a steam locomotive crossing a stone bridge",
    "a minimalist poster of a mountain and the sun",
)


def prefer_workqueue_threads() -> str | None:
    """Make numba's parallel kernels (the quantizer's scale initialisation) use the ``workqueue``
    threading layer when numba has not started one yet and ``NUMBA_THREADING_LAYER`` is unset.

    Measured here: once numba's default ``omp`` layer has run a kernel, every later torch CPU forward
    in the process is 5-10x slower (CPU time, not just wall time), even with one thread each; the
    ``workqueue`` layer has no such effect. The analysis alternates the two thousands of times.
    Returns the layer numba uses (or will use), None if numba is missing.
    """
    try:
        import numba
        from numba.np.ufunc import parallel
    except ImportError:  # pragma: no cover
        return None
    if getattr(parallel, "_is_initialized", False):
        return numba.threading_layer()
    if not os.environ.get("NUMBA_THREADING_LAYER"):
        numba.config.THREADING_LAYER = "workqueue"
    return numba.config.THREADING_LAYER



LARGE_MODEL_PARAMS = 100_000_000


def is_large(unet: nn.Module) -> bool:
    """More than :data:`LARGE_MODEL_PARAMS` parameters (SD-v1.5, SDXL; not the tiny models)."""
    return sum(p.numel() for p in unet.parameters()) > LARGE_MODEL_PARAMS


def _is_tinysd(base_dir, source) -> bool:
    """A bundled tiny model analysed with tiny-sd's digit prompts and guidance (its family's
    ``tiny_digit_analysis``: tiny-sd, tiny-pixart; tiny-sdxl keeps the generic prompts its published
    analysis used), by built-in name or pipeline folder."""
    from bfq.families import FAMILIES

    tiny = [f for f in FAMILIES if f.tiny_digit_analysis]
    if source and source.get("kind") == "builtin" and source.get("name") in {f.tiny_name for f in tiny}:
        return True
    if base_dir is None:
        return False
    try:
        return any(Path(base_dir).resolve() == f.tiny_pipeline_dir().resolve() for f in tiny)
    except Exception:  # pragma: no cover
        return False


def _has_text_encoder(base_dir) -> bool:
    return base_dir is not None and (Path(base_dir) / "text_encoder").is_dir() and (Path(base_dir) / "tokenizer").is_dir()


def _has_vae(base_dir) -> bool:
    return base_dir is not None and (Path(base_dir) / "vae").is_dir()


def _prompts(base_dir, source, n_prompts: int, seed: int, prompts=None) -> tuple[list[str], list[int] | None]:
    """``(texts, digits or None)``: explicit prompts, tiny-sd digit prompts (balanced), or DEFAULT_PROMPTS."""
    if prompts is not None:
        texts = [str(p) for p in prompts]
        if not texts:
            raise SensitivityError("prompts must not be empty")
        return texts, None
    if _is_tinysd(base_dir, source):
        from bfq.tinysd.data import eval_prompts

        per_digit = -(-n_prompts // 10)
        allp = eval_prompts(per_digit, seed)  # digit-major
        ordered = [allp[d * per_digit + j] for j in range(per_digit) for d in range(10)][:n_prompts]
        return [p.text for p in ordered], [p.digit for p in ordered]
    return [DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)] for i in range(n_prompts)], None


def analysis_settings(unet: nn.Module, *, mode: str = "proxy", bits: Sequence[int] = DEFAULT_BITS,
                      levels: str = "balanced", time_cache: str = "scheduler", scheduler=None, base_dir=None,
                      source: Mapping | None = None, seed: int = 0, n_prompts: int | None = None,
                      steps: int | None = None, guidance: float | None = None, n_timesteps: int | None = None,
                      finetune_steps: int = 0, finetune_lr: float = 1e-4, finetune_batch: int = 16,
                      prompts: Sequence[str] | None = None, clip: str | os.PathLike | None = None,
                      init_iters: int = 10, scale_dtype: str = "f16", **_ignored) -> dict:  # fmt: skip
    """The normalized settings that determine an analysis's numbers (and its cache key).

    Raises :class:`SensitivityError` for impossible combinations (e.g. image mode without a VAE).
    """
    from bfq.quant.quantizer import check_bits
    from bfq.quant.recipe import TIME_CACHE_MODES

    if mode not in MODES:
        raise SensitivityError(f"mode must be one of {MODES}, got {mode!r}")
    bits = sorted(int(b) for b in bits)
    if not bits or len(set(bits)) != len(bits):
        raise SensitivityError(f"bits must be distinct bit-widths, got {bits}")
    for b in bits:
        try:
            check_bits(b, levels)
        except ValueError as e:
            raise SensitivityError(f"bits: {e}") from None
    if time_cache not in TIME_CACHE_MODES:
        raise SensitivityError(f"time_cache must be one of {TIME_CACHE_MODES}, got {time_cache!r}")
    if mode == "local" and finetune_steps:
        raise SensitivityError("local mode scores each layer as initialized; finetune_steps needs mode 'proxy' or 'image'")
    # local mode on a large model (SDXL: each forward reads every layer again): a short trajectory, few prompts
    small = mode == "local" and is_large(unet)
    steps = (4 if small else 20) if steps is None else steps
    n_timesteps = (2 if small else 4) if n_timesteps is None else n_timesteps
    if n_prompts is None and small:
        n_prompts = 2
    for name, v, lo in (("steps", steps, 1), ("n_timesteps", n_timesteps, 1), ("finetune_steps", finetune_steps, 0),
                        ("finetune_batch", finetune_batch, 1), ("init_iters", init_iters, 0)):  # fmt: skip
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise SensitivityError(f"{name} must be an integer >= {lo}, got {v!r}")
    if mode in ("proxy", "local") and n_timesteps > steps:
        raise SensitivityError(f"n_timesteps ({n_timesteps}) cannot exceed the sampler steps ({steps})")
    tiny = _is_tinysd(base_dir, source)
    if n_prompts is None:
        n_prompts = (10 if mode == "proxy" else 20) if tiny else 8
    if not isinstance(n_prompts, int) or n_prompts < 1:
        raise SensitivityError(f"n_prompts must be a positive integer, got {n_prompts!r}")
    if guidance is None:
        if tiny:
            from bfq.tinysd.evaluate import DEFAULT_CFG

            guidance = DEFAULT_CFG
        else:
            guidance = 7.5
    conditioning = "text_encoder" if _has_text_encoder(base_dir) else "random"
    if mode == "image" and not (_has_vae(base_dir) and conditioning == "text_encoder"):
        raise SensitivityError(
            "image mode needs a diffusers pipeline directory with vae/, text_encoder/ and tokenizer/; this model has "
            "none (a bare UNet, or a Hub download of the UNet only): use mode 'proxy'"
        )
    texts, digits = _prompts(base_dir, source, n_prompts, seed, prompts)
    if conditioning == "random":
        texts, digits = [], None
    align, align_note = None, None
    if mode == "image":
        if tiny and digits is not None:
            align = "digit-classifier"
        elif clip is not None:
            if not Path(clip).is_dir():
                raise SensitivityError(f"--clip {clip}: not a directory with a local CLIP model")
            align = f"clip:{Path(clip).resolve()}"
        else:
            align_note = "no local CLIP model given (clip=PATH): the align_drop column is omitted"
    sched_cfg = dict(scheduler.config) if scheduler is not None else dict(SD_SCHEDULER)
    sched_cfg = {k: sched_cfg[k] for k in sorted(sched_cfg) if k in (
        "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "set_alpha_to_one",
        "steps_offset", "prediction_type", "timestep_spacing", "rescale_betas_zero_snr")}  # fmt: skip
    if sched_cfg.get("trained_betas") is not None:
        sched_cfg["trained_betas"] = [float(b) for b in sched_cfg["trained_betas"]]
    out = {
        "mode": mode, "bits": bits, "levels": levels, "init": "alternating", "init_iters": init_iters,
        "scale_dtype": scale_dtype, "time_cache": time_cache, "seed": int(seed), "n_prompts": n_prompts,
        "prompts": texts, "conditioning": conditioning, "sampler": "DDIM eta=0", "steps": steps,
        "guidance": float(guidance), "scheduler": sched_cfg, "finetune_steps": finetune_steps,
    }  # fmt: skip
    if finetune_steps:
        out.update(finetune_lr=float(finetune_lr), finetune_batch=finetune_batch, finetune_target="fp noise prediction")
    if mode in ("proxy", "local"):
        out["n_timesteps"] = n_timesteps
    if mode == "local":
        # on a large model the recorded rows and gradients bound the memory (SDXL: 743 Linear layers)
        out.update(resolution=min(LOCAL_RESOLUTION, int(unet.config.sample_size)),
                   max_rows=LOCAL_MAX_ROWS // 4 if small else LOCAL_MAX_ROWS, probes=2 if small else LOCAL_PROBES,
                   local_metric="projected output error")  # fmt: skip
    else:
        out["align"] = align
        if align_note:
            out["align_note"] = align_note
    return out


def _n_time_features(unet, time_cache: str, scheduler, cache_steps: int) -> int:
    from bfq.quant import timecache

    if time_cache == "scheduler":
        if scheduler is not None:
            n = len(timecache.scheduler_timesteps(scheduler, cache_steps))
        else:
            n = cache_steps
        return timecache.n_time_features(unet, "scheduler", n)
    n_train = scheduler.config.num_train_timesteps if scheduler is not None else 1000
    return timecache.n_time_features(unet, "grid", n_train)


def _default_cache_steps(base_dir, source) -> int:
    from bfq.families import FAMILIES

    name = (source or {}).get("name") if (source or {}).get("kind") == "builtin" else None
    tiny = {f.tiny_name: f.tiny_steps for f in FAMILIES}
    if name in tiny:
        return tiny[name]
    if _is_tinysd(base_dir, source):
        from bfq.tinysd.evaluate import DEFAULT_STEPS

        return DEFAULT_STEPS
    from bfq.quant.timecache import DEFAULT_STEPS

    return DEFAULT_STEPS


# ------------------------------------------------------------------------------- sampling


