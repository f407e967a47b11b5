"""Stage 5: write a quantized UNet to a .bfq file, streaming one layer at a time (or quantizing and
writing one layer at a time, :func:`quantize_and_export`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bfq.families.lazy import weight_of
from bfq.format import BfqWriter
from bfq.format.constants import replaced_by_time_cache
from bfq.quant.nn import iter_quantized

DENSE_DTYPES = {"f32": torch.float32, "f16": torch.float16}
DENSE_BITS = {"f32": 32, "f16": 16}


def removed_by_cache(name: str, time_cache: dict | None, class_name: str | None = None) -> bool:
    """True for state-dict entries a time cache object replaces in a model of ``class_name`` (FORMAT.md
    §2.3; a scheduler cache of ``{"time_embedding": table}`` keeps the time_emb_proj layers, §2.3.1;
    adaLN-single, §2.3.2); grid mode's "mlp" cache replaces nothing (it stores the time MLP's weights
    under their own names)."""
    mode = time_cache["mode"] if time_cache else None
    per_resnet = "time_embedding" not in time_cache["tables"] if time_cache else True
    return mode in ("scheduler", "grid") and replaced_by_time_cache(name, mode, per_resnet, class_name)


def export_unet(
    unet: nn.Module,
    path: str | os.PathLike,
    *,
    config: dict | None = None,
    class_name: str | None = None,
    source: dict | None = None,
    time_cache: dict | None = None,
    recipe: dict | None = None,
    metadata: dict | None = None,
    dense_dtype: str = "f32",
    progress: bool = True,
) -> Path:
    """Write `unet` (its quantized layers from bfq.quant.nn, everything else dense) to `path`, atomically.

    Args:
        unet: a UNet whose quantized layers are bfq.quant.nn modules.
        config: the original model's config dict (what `from_config` needs to rebuild it);
            default: ``unet.config`` without ``_name_or_path``. ``class_name`` defaults to the
            UNet's class name.
        time_cache: as computed by bfq.quant.timecache.build_cache: {"mode": "scheduler", "timesteps":
            [...], "tables": {resnet name: array [T, D]} or {"time_embedding": array [T, D]}} (the
            parameters it replaces are left out of the file), or {"mode": "mlp", "tables": {time MLP weight name: array}} (grid mode: those
            weights are written in fp16 under their own names).
        recipe: the recipe summary for the header (avg_bits, n_weights_total, n_params_total, ...).
        dense_dtype: "f32" (the paper's accounting) or "f16" for everything kept in floating point.
    """
    from tqdm.auto import tqdm

    quantized = dict(iter_quantized(unet))
    skip = set(quantized) | {name[: -len("weight")] + "scale" for name in quantized}
    model = _header_model(unet, config, class_name, source)
    with BfqWriter(path, model=model, metadata=metadata) as writer:
        for name, module in tqdm(quantized.items(), desc="export", unit="layer", disable=not progress):
            q, scales = module.export_codes()
            writer.add_layer(name, q.cpu().numpy(), scales.cpu().numpy(), module.bits, levels=module.levels, scale_dtype=module.scale_dtype)
        _write_rest(writer, unet, skip, time_cache, recipe, dense_dtype)
    return Path(path)


def _header_model(unet, config, class_name, source) -> dict:
    if config is None:
        config = {k: v for k, v in dict(unet.config).items() if k != "_name_or_path"}
    model = {"class_name": class_name or type(unet).__name__, "config": _jsonable(config)}
    return {**model, "source": source} if source else model


def _write_rest(writer, unet, skip: set, time_cache: dict | None, recipe: dict | None, dense_dtype: str) -> None:
    """Everything but the quantized layers: dense tensors (a lazy UNet's meta weights read one at a
    time), the time cache, the recipe."""
    mode = time_cache["mode"] if time_cache else None
    kept_fp16 = time_cache["tables"] if mode == "mlp" else {}
    for name, tensor in unet.state_dict(keep_vars=True).items():
        if name in skip or removed_by_cache(name, time_cache, type(unet).__name__):
            continue
        if name in kept_fp16:
            writer.add_tensor(name, np.asarray(kept_fp16[name], dtype=np.float16))
            continue
        if tensor.device.type == "meta":
            tensor = weight_of(unet, name)
        writer.add_tensor(name, tensor.detach().to("cpu", DENSE_DTYPES[dense_dtype]).numpy())
    if time_cache and mode != "mlp":
        tables = {k: np.asarray(v, dtype=np.float16) for k, v in time_cache["tables"].items()}
        writer.set_time_cache(mode, time_cache["timesteps"], tables)
    if recipe:
        writer.set_recipe(_jsonable(recipe))


@torch.no_grad()
def quantize_and_export(
    unet: nn.Module,
    path: str | os.PathLike,
    bits: dict[str, int],
    *,
    levels: str = "balanced",
    init: str = "alternating",
    scale_dtype: str = "f16",
    source: dict | None = None,
    time_cache: dict | None = None,
    recipe: dict | None = None,
    metadata: dict | None = None,
    dense_dtype: str = "f32",
    progress: bool = True,
) -> Path:
    """What ``quantize_unet`` + :func:`export_unet` write, one layer at a time: each layer of ``bits``
    (``{weight name: bits}``) is quantized, its codes written and its quantized module dropped, so
    the float model is never joined by a second copy of its weights; a lazy UNet
    (:mod:`bfq.families.lazy`) holds one float layer at a time. ``unet`` is left as it was."""
    from tqdm.auto import tqdm

    from bfq.quant.nn import QuantConv2d, QuantLinear

    names = [f"{n}.weight" for n, m in unet.named_modules() if f"{n}.weight" in bits]
    missing = sorted(set(bits) - set(names))
    if missing:
        raise ValueError(f"not layers of this model: {missing[:5]}")
    total = sum(unet.get_parameter(n).numel() for n in names)
    with BfqWriter(path, model=_header_model(unet, None, None, source), metadata=metadata) as writer, \
            tqdm(total=total, unit="w", unit_scale=True, desc="quantize+export", disable=not progress) as bar:  # fmt: skip
        for name in names:
            mod = unet.get_submodule(name[: -len(".weight")])
            if type(mod) not in (nn.Linear, nn.Conv2d):
                raise ValueError(f"{name} is not an nn.Linear/nn.Conv2d weight")
            original = mod._parameters["weight"]
            mod._parameters["weight"] = nn.Parameter(weight_of(unet, name), requires_grad=False)
            try:
                cls = QuantLinear if isinstance(mod, nn.Linear) else QuantConv2d
                qmod = cls.from_float(mod, bits[name], levels=levels, scale_dtype=scale_dtype, init=init)
                q, scales = qmod.export_codes()
                writer.add_layer(name, q.cpu().numpy(), scales.cpu().numpy(), qmod.bits, levels=qmod.levels,
                                 scale_dtype=qmod.scale_dtype)  # fmt: skip
            finally:
                mod._parameters["weight"] = original
            del qmod, q, scales
            bar.update(original.numel())
        _write_rest(writer, unet, set(names), time_cache, recipe, dense_dtype)
    return Path(path)


def export_finetuned(
    student: nn.Module,
    out: str | os.PathLike,
    *,
    time_cache: str | None = "grid",
    scheduler=None,
    steps: int = 50,
    source: dict | None = None,
    recipe_name: str = "finetuned",
    metadata: dict | None = None,
    dense_dtype: str = "f32",
    progress: bool = True,
) -> Path:
    """Write a fine-tuned student to ``out`` (.bfq) with a time cache from its float time layers.

    ``bfq.load_unet(out)`` then reproduces the student's fake-quantized outputs (up to the fp16
    time cache). See :func:`bfq.quant.timecache.build_cache` for ``time_cache``/``scheduler``/``steps``.
    """
    from bfq.quant import recipe as recipes
    from bfq.quant.timecache import build_cache

    quantized = dict(iter_quantized(student))
    if not quantized:
        raise ValueError("the student has no quantized layers")
    mode = None if time_cache in (None, "none") else time_cache
    cache = build_cache(student, mode, scheduler, steps)
    n_tf = sum(np.asarray(t).size for t in cache["tables"].values()) if cache else 0
    levels = next(iter(quantized.values())).levels
    plan = recipes.Recipe(recipe_name, levels, {n: m.bits for n, m in quantized.items()})
    summary = recipes.summarize(plan, student, mode, n_tf, DENSE_BITS[dense_dtype])
    meta = dict(metadata or {})
    if cache and cache["mode"] == "scheduler":
        meta = {**sampler_metadata(scheduler, steps), **meta}
    return export_unet(student, out, source=source, time_cache=cache, recipe={**summary, "notes": ""}, metadata=meta,
                       dense_dtype=dense_dtype, progress=progress)  # fmt: skip


def sampler_metadata(scheduler, steps: int) -> dict[str, str]:
    """The ``scheduler`` and ``num_inference_steps`` metadata of a file with a scheduler-mode time
    cache (FORMAT.md §2): the sampler the cached timesteps belong to."""
    record = {"class_name": type(scheduler).__name__, "config": dict(scheduler.config)}
    return {"scheduler": json.dumps(record, default=str), "num_inference_steps": str(steps)}


def _jsonable(obj):
    """Config values as plain JSON (tuples to lists, numpy scalars to Python)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj
