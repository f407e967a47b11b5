"""The whole pipeline behind `bfq quantize` and `bfq finetune`: resolve a model, pick a recipe,
cache the time features, initialize the quantized layers, optionally fine-tune them (Stage I and
Stage II, bfq.pipeline.finetune), export a .bfq.

Each stage lives in its own module; this one only wires them and records what was done:
one cohesive thing, the single place where the stages meet.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bfq._io import atomic_path, locked_dir
from bfq.errors import RecipeError
from bfq.families.lazy import filled, is_lazy
from bfq.pipeline import models
from bfq.pipeline.allocate import DEFAULT_ALLOCATOR, METHODS, allocate
from bfq.pipeline.analyze import analysis_cache_path, shared_analysis
from bfq.pipeline.analyze.settings import is_large
from bfq.pipeline.export import export_unet, quantize_and_export, sampler_metadata
from bfq.pipeline.sensitivity import (
    SensitivityError,
    _is_number,
    check_model,
    load_sensitivity,
    model_fingerprint,
)
from bfq.quant import recipe as recipes
from bfq.quant import timecache
from bfq.quant.nn import iter_quantized, quantize_unet
from bfq.quant.timecache import DEFAULT_STEPS


@dataclass
class QuantizeResult:
    path: Path | None  # None on the other ranks of a multi-process fine-tuning run
    recipe: recipes.Recipe
    summary: dict
    seconds: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def pick_recipe(
    unet,
    *,
    bits: float | None,
    recipe: str | None,
    time_cache: str,
    levels: str | None,
    time_proj_bits: int | None,
    n_time_features: int,
    resolved: models.ResolvedModel | None = None,
    allocator: str = DEFAULT_ALLOCATOR,
    sensitivity: str | os.PathLike | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> tuple[recipes.Recipe, str]:
    """The recipe to use and a sentence saying why.

    `--recipe` fixes every layer's bits (giving `bits` or `sensitivity` too is an error). `--bits B`
    is first checked against the layer sizes (:func:`check_budget`), then allocates bits per layer
    for that budget (bfq.pipeline.allocate; `DEFAULT_ALLOCATOR` unless `allocator` says otherwise)
    from a sensitivity analysis: the given file, or the one cached for this model and these
    settings in the cache every command shares (run, resumably, when missing). One exception: an
    SD-v1.5-shaped model on a CPU-only machine with no analysis at hand, asked for the paper's own
    budget (the average its App. H recipe reaches with these settings, 1.99 with the scheduler
    cache) with the default or the paper's allocator, gets that published recipe; any other budget
    or allocator runs the allocation it asks for.
    """
    if recipe is not None and (bits is not None or sensitivity is not None):
        raise RecipeError("a recipe fixes every layer's bits: give a recipe, or bits (with a sensitivity analysis), not both")
    if recipe is not None:
        chosen = recipes.resolve_recipe(recipe, unet, time_cache, time_proj_bits, levels)
        return chosen, f"recipe {chosen.name} as requested"
    if bits is None:
        raise RecipeError("give --bits B or --recipe NAME_OR_FILE")
    check_budget(unet, bits, time_cache=time_cache, levels=levels, time_proj_bits=time_proj_bits,
                 n_time_features=n_time_features)  # fmt: skip
    if sensitivity is None and allocator in ("paper", DEFAULT_ALLOCATOR) and not torch.cuda.is_available():
        shortcut = _paper_recipe_if_sd15(unet, bits, time_cache, levels, time_proj_bits, n_time_features)
        if shortcut is not None:
            cached = analysis_cache_path(unet, resolved=resolved, time_cache=time_cache, levels=levels)
            if not cached.is_file():
                return shortcut
    return recipe_for_budget(
        unet, bits, sensitivity=sensitivity, method=allocator, resolved=resolved, time_cache=time_cache,
        n_time_features=n_time_features, levels=levels, time_proj_bits=time_proj_bits, progress=progress, log=log,
    )  # fmt: skip


def recipe_for_budget(unet, budget: float, *, sensitivity=None, method: str = DEFAULT_ALLOCATOR, resolved=None,
                      time_cache: str = "scheduler", n_time_features: int, levels: str | None = None,
                      time_proj_bits: int | None = None, cache_dir=None, mode: str | None = None,
                      analysis_options: Mapping | None = None, progress: bool = True,
                      allocator_options: Mapping | None = None, log: Callable[[str], None] | None = None):  # fmt: skip
    """The recipe for ``bfq quantize MODEL --bits B``: analysis (reused or run), allocation, checks.

    Args:
        unet: the *float* UNet (before any quantization; its weights are restored after analysis).
        budget: average bits by the paper's accounting.
        sensitivity: a sensitivity file (path) or object to use; None runs the analysis, or reuses
            the one cached in ``cache_dir`` for this model's fingerprint and these settings (a partial
            one is resumed).
        method: one of ``bfq.pipeline.allocate.METHODS`` ("paper" is Alg. 1).
        resolved: the :class:`bfq.pipeline.models.ResolvedModel` (scheduler, pipeline directory and source give
            the analysis its sampler and text conditioning); None analyses the bare UNet (seeded random
            text embeddings, SD's scheduler).
        time_cache, n_time_features, levels, time_proj_bits: as in ``bfq quantize`` (``n_time_features``
            = N_tf of the cache that will be exported, so the accounting matches ``bfq inspect``).
            In grid mode ``time_proj_bits`` fixes the time projections; without it they are allocated.
        cache_dir: where analyses are cached (default :func:`bfq.pipeline.sensitivity.default_cache_dir`:
            the cache ``bfq analyze`` shares).
        mode: analysis mode when one has to be run ("proxy", "image" or "local"); None:
            :func:`default_analysis_mode`.
        analysis_options: extra keyword arguments for :func:`bfq.pipeline.analyze.analyze`.
        allocator_options: extra keyword arguments for the allocator (e.g. ``{"eta": 0.3}``).
        log: told whether the analysis is reused, resumed or computed, and where it is cached.
    Returns:
        ``(recipe, why)``: a validated :class:`bfq.quant.recipe.Recipe` and one sentence for the notes.
    Raises:
        RecipeError / SensitivityError: bad budget, sensitivity file from another model, missing
        layers, NaN errors, incompatible settings.
    """
    if method not in METHODS:
        raise SensitivityError(f"unknown allocation method {method!r}; one of {', '.join(METHODS)}")
    if not _is_number(budget) or not math.isfinite(budget):
        raise SensitivityError(f"the bit budget must be a finite number, got {budget!r}")
    levels = levels or "balanced"
    mode = mode or default_analysis_mode(unet)
    need = list(recipes.quantizable_layers(unet, time_cache))
    source = getattr(resolved, "source", None)
    fp = model_fingerprint(unet, source=source)
    if sensitivity is not None:
        sens = load_sensitivity(sensitivity)
        where = "the sensitivity file" if isinstance(sensitivity, Mapping) else f"sensitivity file {os.fspath(sensitivity)}"
        check_model(sens, fp, where=where)
        origin = "given" if isinstance(sensitivity, Mapping) else Path(sensitivity).name
    else:
        sens, path = shared_analysis(
            unet, cache_dir=cache_dir, log=log, mode=mode, levels=levels, time_cache=time_cache,
            scheduler=getattr(resolved, "scheduler", None), base_dir=getattr(resolved, "base_dir", None), source=source,
            n_time_features=n_time_features, progress=progress, **dict(analysis_options or {}),
        )  # fmt: skip
        origin = f"cached as {path.name}"
    if sens["accounting"]["levels"] != levels:
        raise SensitivityError(
            f"the sensitivity analysis measured {sens['accounting']['levels']} levels, but {levels} levels were asked for"
        )
    fixed = {}
    if time_proj_bits is not None:  # where the cache keeps them (grid; SDXL's scheduler cache)
        fixed = {n: int(time_proj_bits) for n in recipes.time_projections(unet, time_cache)}
    alloc = allocate(sens, budget, method, fixed=fixed, n_time_features=n_time_features, need_layers=need,
                     **dict(allocator_options or {}))  # fmt: skip
    recipe = alloc.to_recipe()
    recipes.validate(recipe, unet, time_cache)
    why = (f"{method} allocation for {budget:g} bits from the sensitivity analysis {origin} "
           f"({sens['settings'].get('mode', '?')} mode): {alloc.avg_bits:.4f} bits by the paper's accounting")  # fmt: skip
    return recipe, why


def default_analysis_mode(unet) -> str:
    """The analysis ``--bits`` runs when none is at hand: "proxy" (a full-model forward per layer
    and bit-width) for small models or with a GPU; "local" (one recording forward, then each layer's
    own output error; bfq.pipeline.analyze) for a lazy UNet or a large model
    (``bfq.pipeline.analyze.settings.LARGE_MODEL_PARAMS``: SD-v1.5, SDXL) on a CPU-only machine,
    where the proxy takes days."""
    if is_lazy(unet) or (is_large(unet) and not torch.cuda.is_available()):
        return "local"
    return "proxy"


def check_budget(unet, bits: float, *, time_cache: str, levels: str | None, time_proj_bits: int | None,
                 n_time_features: int) -> None:  # fmt: skip
    """Raise RecipeError unless ``bits`` lies between the averages of every layer at the fewest and at
    the most bits (conv_in/conv_out at 8, the time features counted): known from the layer sizes
    alone, so an impossible budget is refused before any sensitivity analysis."""
    if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not math.isfinite(bits):
        raise RecipeError(f"the bit budget must be a finite number, got {bits!r}")
    lo, hi = (recipes.summarize(recipes.resolve_recipe(f"uniform-{b}", unet, time_cache, time_proj_bits, levels), unet,
                                time_cache, n_time_features)["avg_bits"] for b in (recipes.MIN_BITS, recipes.MAX_BITS))  # fmt: skip
    if not lo <= bits <= hi:
        raise RecipeError(
            f"a budget of {bits:g} bits per weight is impossible for this model: from {lo:.4f} (every layer at "
            f"{recipes.MIN_BITS} bit) to {hi:.4f} (every layer at {recipes.MAX_BITS} bits, {n_time_features:,} cached time "
            f"features, conv_in/conv_out at 8 bits) with these settings"
        )


PAPER_BUDGET_TOLERANCE = 0.005  # the paper prints its 1.9885 bits as "1.99"


def _paper_recipe_if_sd15(unet, bits, time_cache, levels, time_proj_bits, n_time_features):
    """The paper's own App. H recipe for SD-v1.5-shaped models on CPU-only machines, where a
    sensitivity analysis of 768 candidates would take days, when ``bits`` is the paper's own
    budget: the recipe's average with these settings, to the two decimals the paper prints
    (1.9885 -> 1.99 with the scheduler cache). None for other models and other budgets: the recipe
    was made for one budget and says nothing about where bits should go at another."""
    try:
        sd = recipes.resolve_recipe("bitsfusion-sd15", unet, time_cache, time_proj_bits, levels)
    except RecipeError:
        return None
    avg = recipes.summarize(sd, unet, time_cache, n_time_features)["avg_bits"]
    if abs(avg - bits) > PAPER_BUDGET_TOLERANCE:
        return None
    return sd, (
        f"SD-v1.5 layers, no GPU and the paper's own budget: using the paper's bitsfusion-sd15 recipe "
        f"({avg:.4f} bits) instead of running a sensitivity analysis here (days on a CPU; other budgets and "
        "allocators run one); pass --sensitivity FILE (from `bfq analyze` on a GPU) to allocate from one"
    )


def compute_time_cache(resolved: models.ResolvedModel, mode: str, steps: int) -> dict:
    """{"mode", "timesteps", "tables"} for export, from the float model's time layers."""
    if mode == "scheduler" and resolved.scheduler is None:
        raise RecipeError(
            f"{resolved.name}: no scheduler comes with this model, so the 'scheduler' time cache cannot "
            "know which timesteps to store; use --time-cache grid"
        )
    return timecache.build_cache(resolved.unet, mode, resolved.scheduler, steps)


def _settings_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _init_layers(unet, plan: recipes.Recipe, *, init: str, scale_dtype: str, work_dir: Path | None, settings: dict, progress: bool) -> bool:
    """quantize_unet, reusing scales saved by an earlier run with the same settings. Returns True
    when the scales came from the work directory."""
    from safetensors.torch import load_file, save_file

    scales_path = work_dir / f"scales-{_settings_key(settings)}.safetensors" if work_dir else None
    if scales_path is not None and scales_path.is_file():
        quantize_unet(unet, plan.bits, levels=plan.levels, init=None, scale_dtype=scale_dtype, progress=False)
        saved = load_file(scales_path)
        with torch.no_grad():
            for name, module in iter_quantized(unet):
                module.scale.copy_(saved[name])
        return True
    quantize_unet(unet, plan.bits, levels=plan.levels, init=init, scale_dtype=scale_dtype, progress=progress)
    if scales_path is not None:
        with atomic_path(scales_path) as tmp:
            save_file({name: m.scale.detach().contiguous() for name, m in iter_quantized(unet)}, str(tmp))
    return False


def _finetune(resolved, unet, stage1_steps, stage2_steps, config, stage2_config, **kwargs) -> str | None:
    """Stage I and Stage II in place (bfq.pipeline.finetune); the "finetune" metadata record, or None on the
    ranks of a multi-process run that do not export."""
    from bfq.pipeline.finetune import (
        FinetuneConfig,
        is_main_process,
        run_finetune_stages,
    )

    config = config or FinetuneConfig()
    run_finetune_stages(resolved, unet, stage1_steps=stage1_steps, stage2_steps=stage2_steps, config=config,
                        stage2_config=stage2_config, **kwargs)  # fmt: skip
    if not is_main_process(config.cpu):
        return None
    unet.cpu()
    return json.dumps({"stage1_steps": stage1_steps, "stage2_steps": stage2_steps, "config": _public(config),
                       "stage2_config": _public((stage2_config or config).replace(stage="noise"))})  # fmt: skip


def _public(config) -> dict:
    """A fine-tuning config for a file that may be published: the paths it names (data folder,
    prompt file, CLIP model) reduced to their last component, nothing local; the learning rate used."""
    out = config.to_dict() | {"lr": config.stage_lr}
    for key in ("data", "eval_clip", "eval_prompts"):
        value = out.get(key)
        if isinstance(value, str) and (os.sep in value or "/" in value):
            kind, colon, path = value.partition(":") if key == "data" else ("", "", value)
            out[key] = f"{kind}{colon}{Path(path).name}"
    return out


@contextmanager
def _removed_on_failure(work_dir):
    """Within the block: a work directory that did not exist before is removed again if the block
    fails before the directory holds what a rerun resumes from (a checkpoint, encoded data)."""
    created = work_dir is not None and not os.path.exists(work_dir) and int(os.environ.get("RANK", "0")) == 0
    try:
        yield
    except BaseException:
        if created and not _resumable(Path(work_dir)):
            shutil.rmtree(work_dir, ignore_errors=True)
        raise


def _resumable(work_dir: Path) -> bool:
    finetune = work_dir / "finetune"
    return any(finetune.glob("*/checkpoints/*/trainer.json")) or any(finetune.glob("data/*"))


def default_steps(model: str | os.PathLike) -> int:
    """Sampler steps a scheduler cache is made for when none are given: for a bundled tiny model
    (tiny-sd, tiny-sdxl) its family's ``tiny_steps`` (the tiny-sd metric's 20), for another built-in
    its family's ``default_steps`` (the reference pipeline's: 50 for SD-v1.5 and SDXL, 20 for
    PixArt-Σ), else the paper's PNDM-50."""
    from bfq.families import family_for_name, is_builtin

    name = os.fspath(model)
    if is_builtin(name):
        family = family_for_name(name)
        return family.tiny_steps if name == family.tiny_name else family.default_steps
    return DEFAULT_STEPS


def quantize(
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    bits: float | None = None,
    recipe: str | None = None,
    init: str = "alternating",
    levels: str | None = None,
    time_cache: str = "scheduler",
    steps: int | None = None,
    time_proj_bits: int | None = None,
    scale_dtype: str = "f16",
    dense_dtype: str = "f32",
    work_dir: str | os.PathLike | None = None,
    revision: str | None = None,
    subfolder: str | None = None,
    allow_pickle: bool = False,
    progress: bool = True,
    allocator: str = DEFAULT_ALLOCATOR,
    sensitivity: str | os.PathLike | None = None,
    stage1_steps: int = 0,
    stage2_steps: int = 0,
    finetune_config=None,
    finetune_stage2_config=None,
    log: Callable[[str], None] | None = None,
    scheduler=None,
) -> QuantizeResult:
    """Quantize `model` (see bfq.pipeline.models.resolve_model) and write `out`.

    `scheduler` (a diffusers scheduler with the model's noise schedule, e.g. the DDIM sampler of a
    tiny model's metric) is the sampler a scheduler-mode time cache is made for and the file
    records, instead of the model's own.

    `work_dir`, when given, keeps the initialized scales and the fine-tuning checkpoints, so that a
    rerun with the same settings resumes where it stopped; it is locked for the run (a second run
    on it is refused, naming the first). Sensitivity analyses live in the shared cache
    (:func:`bfq.pipeline.analyze.shared_analysis`), announced through `log`.
    `stage1_steps`/`stage2_steps` > 0 fine-tune the initialized model before the export
    (bfq.pipeline.finetune.run_finetune_stages with `finetune_config`/`finetune_stage2_config`, both
    bfq.pipeline.finetune.FinetuneConfig). Under `accelerate launch` only the main process exports; the
    others return a result whose `path` is None. A work directory this call creates is removed again
    when the run fails before it holds anything resumable (a fine-tuning checkpoint, encoded data).
    """
    with _removed_on_failure(work_dir), ExitStack() as stack:
        if work_dir is not None and int(os.environ.get("RANK", "0")) == 0:  # one lock per run, not per rank
            stack.enter_context(locked_dir(work_dir))
        seconds = {}
        t0 = time.perf_counter()
        # Without fine-tuning or a work directory to keep scales in, layers are quantized and written
        # one at a time, from a lazy model where the source allows it (bfq.families.lazy).
        stream = not (stage1_steps or stage2_steps) and work_dir is None
        resolved = models.resolve_model(model, revision=revision, subfolder=subfolder, allow_pickle=allow_pickle,
                                        lazy=stream)  # fmt: skip
        unet = resolved.unet
        if scheduler is not None:
            resolved.scheduler = scheduler
        seconds["load"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        steps = default_steps(model) if steps is None else steps
        with filled(unet, resolved.family.is_time_layer):  # the time layers of a lazy model (small)
            cache = compute_time_cache(resolved, time_cache, steps)
        n_tf = sum(t.size for t in cache["tables"].values())
        seconds["time_cache"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        plan, why = pick_recipe(
            unet, bits=bits, recipe=recipe, time_cache=time_cache, levels=levels, time_proj_bits=time_proj_bits,
            n_time_features=n_tf, resolved=resolved, allocator=allocator, sensitivity=sensitivity, progress=progress,
            log=log,
        )  # fmt: skip
        summary = recipes.summarize(plan, unet, time_cache, n_tf)
        seconds["recipe"] = time.perf_counter() - t0

        if stream:
            t0 = time.perf_counter()
            metadata = {"init": init, "recipe_note": why}
            if resolved.scheduler is not None and time_cache == "scheduler":
                metadata.update(sampler_metadata(resolved.scheduler, steps))
            path = quantize_and_export(unet, out, plan.bits, levels=plan.levels, init=init, scale_dtype=scale_dtype,
                                       source=resolved.source, time_cache=cache, recipe={**summary, "notes": plan.notes or ""},
                                       metadata=metadata, dense_dtype=dense_dtype, progress=progress)  # fmt: skip
            seconds["quantize_export"] = time.perf_counter() - t0
            return QuantizeResult(Path(path), plan, summary, seconds, [why])

        t0 = time.perf_counter()
        settings = {"source": resolved.source, "recipe": plan.to_json(), "init": init, "scale_dtype": scale_dtype}
        resumed = _init_layers(unet, plan, init=init, scale_dtype=scale_dtype, work_dir=Path(work_dir) if work_dir else None,
                               settings=settings, progress=progress)  # fmt: skip
        seconds["initialize"] = time.perf_counter() - t0

        metadata = {"init": init, "recipe_note": why}
        if stage1_steps or stage2_steps:
            t0 = time.perf_counter()
            record = _finetune(resolved, unet, stage1_steps, stage2_steps, finetune_config, finetune_stage2_config,
                               work_dir=work_dir, progress=progress, log=log)  # fmt: skip
            seconds["finetune"] = time.perf_counter() - t0
            if record is None:  # another rank of a multi-process run: the main one exports
                return QuantizeResult(None, plan, summary, seconds, [why])
            metadata["finetune"] = record

        t0 = time.perf_counter()
        if resolved.scheduler is not None and time_cache == "scheduler":
            metadata.update(sampler_metadata(resolved.scheduler, steps))
        path = export_unet(unet, out, source=resolved.source, time_cache=cache, recipe={**summary, "notes": plan.notes or ""},
                           metadata=metadata, dense_dtype=dense_dtype, progress=progress)  # fmt: skip
        seconds["export"] = time.perf_counter() - t0
    notes = [why] + (["initialized scales reused from the work directory"] if resumed else [])
    return QuantizeResult(Path(path), plan, summary, seconds, notes)
