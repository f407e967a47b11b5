"""The whole pipeline behind `bfq quantize` and `bfq finetune`: resolve a model, pick a recipe,
cache the time features, initialize the quantized layers, optionally fine-tune them (Stage I and
Stage II, bfq.finetune), export a .bfq.

Each stage lives in its own module; this one only wires them and records what was done.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bfq import models, recipe as recipes, timecache
from bfq.errors import RecipeError
from bfq.export import export_unet, sampler_metadata
from bfq.nn import iter_quantized, quantize_unet

DEFAULT_STEPS = 50  # the paper's PNDM-50 sampler


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
    allocator: str = "optimal",
    sensitivity: str | os.PathLike | None = None,
    work_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> tuple[recipes.Recipe, str]:
    """The recipe to use and a sentence saying why.

    `--recipe` wins. `--bits B` allocates bits per layer for that budget (bfq.allocate; the
    error-minimizing allocator by default, since it beat the paper's Alg. 1 on tiny-sd) from a
    sensitivity analysis: the given file, one cached for this model and these settings, or a new
    (resumable) proxy analysis. SD-v1.5-shaped models on a CPU-only machine with no analysis at
    hand get the paper's published recipe.
    """
    if recipe is not None:
        chosen = recipes.resolve_recipe(recipe, unet, time_cache, time_proj_bits, levels)
        return chosen, f"recipe {chosen.name} as requested"
    if bits is None:
        raise RecipeError("give --bits B or --recipe NAME_OR_FILE")
    from bfq.allocate import analysis_cache_path, recipe_for_budget

    cache_dir = Path(work_dir) / "analysis" if work_dir else None
    if sensitivity is None and not torch.cuda.is_available():
        shortcut = _paper_recipe_if_sd15(unet, bits, time_cache, levels, time_proj_bits, n_time_features)
        cached = analysis_cache_path(unet, resolved=resolved, time_cache=time_cache, levels=levels, cache_dir=cache_dir)
        if shortcut is not None and not cached.is_file():
            return shortcut
    return recipe_for_budget(
        unet, bits, sensitivity=sensitivity, method=allocator, resolved=resolved, time_cache=time_cache,
        n_time_features=n_time_features, levels=levels, time_proj_bits=time_proj_bits,
        cache_dir=cache_dir, progress=progress,
    )  # fmt: skip


def _paper_recipe_if_sd15(unet, bits, time_cache, levels, time_proj_bits, n_time_features):
    """The paper's own App. H recipe for SD-v1.5-shaped models on CPU-only machines, where a
    sensitivity analysis of 768 candidates would take days; None for other models."""
    try:
        sd = recipes.resolve_recipe("bitsfusion-sd15", unet, time_cache, time_proj_bits, levels)
    except RecipeError:
        return None
    avg = recipes.summarize(sd, unet, time_cache, n_time_features)["avg_bits"]
    if avg > bits + 0.005:  # the paper's 1.9885 is its "1.99"
        return None
    return sd, (
        f"SD-v1.5 layers and no GPU: using the paper's bitsfusion-sd15 recipe ({avg:.4f} bits) instead of "
        "running a sensitivity analysis here; pass --sensitivity FILE (from `bfq analyze` on a GPU) to allocate"
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
        work_dir.mkdir(parents=True, exist_ok=True)
        tmp = scales_path.with_name(f".{scales_path.name}.{os.getpid()}.tmp")  # ranks of a multi-process run race here
        save_file({name: m.scale.detach().contiguous() for name, m in iter_quantized(unet)}, str(tmp))
        os.replace(tmp, scales_path)
    return False


def _finetune(resolved, unet, stage1_steps, stage2_steps, config, stage2_config, **kwargs) -> str | None:
    """Stage I and Stage II in place (bfq.finetune); the "finetune" metadata record, or None on the
    ranks of a multi-process run that do not export."""
    from bfq.finetune import FinetuneConfig, is_main_process, run_finetune_stages

    config = config or FinetuneConfig()
    run_finetune_stages(resolved, unet, stage1_steps=stage1_steps, stage2_steps=stage2_steps, config=config,
                        stage2_config=stage2_config, **kwargs)  # fmt: skip
    if not is_main_process(config.cpu):
        return None
    unet.cpu()
    return json.dumps({"stage1_steps": stage1_steps, "stage2_steps": stage2_steps, "config": config.to_dict(),
                       "stage2_config": (stage2_config or config).to_dict()})  # fmt: skip


def quantize(
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    bits: float | None = None,
    recipe: str | None = None,
    init: str = "alternating",
    levels: str | None = None,
    time_cache: str = "scheduler",
    steps: int = DEFAULT_STEPS,
    time_proj_bits: int | None = None,
    scale_dtype: str = "f16",
    dense_dtype: str = "f32",
    work_dir: str | os.PathLike | None = None,
    revision: str | None = None,
    allow_pickle: bool = False,
    progress: bool = True,
    allocator: str = "optimal",
    sensitivity: str | os.PathLike | None = None,
    stage1_steps: int = 0,
    stage2_steps: int = 0,
    finetune_config=None,
    finetune_stage2_config=None,
    log: Callable[[str], None] | None = None,
) -> QuantizeResult:
    """Quantize `model` (see bfq.models.resolve_model) and write `out`.

    `work_dir`, when given, keeps the initialized scales, the sensitivity analysis and the
    fine-tuning checkpoints, so that a rerun with the same settings resumes where it stopped.
    `stage1_steps`/`stage2_steps` > 0 fine-tune the initialized model before the export
    (bfq.finetune.run_finetune_stages with `finetune_config`/`finetune_stage2_config`, both
    bfq.finetune.FinetuneConfig). Under `accelerate launch` only the main process exports; the
    others return a result whose `path` is None.
    """
    seconds = {}
    t0 = time.perf_counter()
    resolved = models.resolve_model(model, revision=revision, allow_pickle=allow_pickle)
    unet = resolved.unet
    seconds["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    cache = compute_time_cache(resolved, time_cache, steps)
    n_tf = sum(t.size for t in cache["tables"].values())
    plan, why = pick_recipe(
        unet, bits=bits, recipe=recipe, time_cache=time_cache, levels=levels, time_proj_bits=time_proj_bits,
        n_time_features=n_tf, resolved=resolved, allocator=allocator, sensitivity=sensitivity, work_dir=work_dir,
        progress=progress,
    )  # fmt: skip
    summary = recipes.summarize(plan, unet, time_cache, n_tf)
    seconds["time_cache"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    settings = {"source": resolved.source, "recipe": plan.to_json(), "init": init, "scale_dtype": scale_dtype}
    resumed = _init_layers(unet, plan, init=init, scale_dtype=scale_dtype, work_dir=Path(work_dir) if work_dir else None, settings=settings, progress=progress)
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
    path = export_unet(
        unet,
        out,
        source=resolved.source,
        time_cache=cache,
        recipe={**summary, "notes": plan.notes or ""},
        metadata=metadata,
        dense_dtype=dense_dtype,
        progress=progress,
    )
    seconds["export"] = time.perf_counter() - t0
    notes = [why] + (["initialized scales reused from the work directory"] if resumed else [])
    return QuantizeResult(Path(path), plan, summary, seconds, notes)
