"""Stage 5: write a quantized UNet to a .bfq file, streaming one layer at a time."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bfq.container import BfqWriter
from bfq.nn import iter_quantized

DENSE_DTYPES = {"f32": torch.float32, "f16": torch.float16}


def removed_by_cache(name: str, mode: str | None) -> bool:
    """True for state-dict entries the time cache replaces (FORMAT.md §2.3)."""
    if mode is None:
        return False
    if name.startswith("time_embedding."):
        return True
    return mode == "scheduler" and ".time_emb_proj." in name


def export_unet(
    unet: nn.Module,
    path: str | os.PathLike,
    *,
    config: dict,
    class_name: str = "UNet2DConditionModel",
    source: dict | None = None,
    time_cache: dict | None = None,
    recipe: dict | None = None,
    metadata: dict | None = None,
    dense_dtype: str = "f32",
    progress: bool = True,
) -> Path:
    """Write `unet` (its quantized layers from bfq.nn, everything else dense) to `path`, atomically.

    Args:
        unet: a UNet whose quantized layers are bfq.nn modules.
        config: the original model's config dict (what `from_config` needs to rebuild it).
        time_cache: {"mode": "scheduler"|"grid", "timesteps": [...], "tables": {name: array [T, D]}},
            as computed by bfq.timecache; the parameters it replaces are left out of the file.
        recipe: the recipe summary for the header (avg_bits, n_weights_total, n_params_total, ...).
        dense_dtype: "f32" (the paper's accounting) or "f16" for everything kept in floating point.
    """
    from tqdm.auto import tqdm

    mode = time_cache["mode"] if time_cache else None
    quantized = dict(iter_quantized(unet))
    skip = set(quantized) | {name[: -len("weight")] + "scale" for name in quantized}
    model = {"class_name": class_name, "config": _jsonable(config)}
    if source:
        model["source"] = source
    state = unet.state_dict()
    with BfqWriter(path, model=model, metadata=metadata) as writer:
        for name, module in tqdm(quantized.items(), desc="export", unit="layer", disable=not progress):
            q, scales = module.export_codes()
            writer.add_layer(name, q.cpu().numpy(), scales.cpu().numpy(), module.bits, levels=module.levels, scale_dtype=module.scale_dtype)
        for name, tensor in state.items():
            if name in skip or removed_by_cache(name, mode):
                continue
            writer.add_tensor(name, tensor.detach().to("cpu", DENSE_DTYPES[dense_dtype]).numpy())
        if time_cache:
            tables = {k: np.asarray(v, dtype=np.float16) for k, v in time_cache["tables"].items()}
            writer.set_time_cache(mode, time_cache["timesteps"], tables)
        if recipe:
            writer.set_recipe(_jsonable(recipe))
    return Path(path)


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
