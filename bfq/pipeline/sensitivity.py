"""Sensitivity files (``bfq-sensitivity``, ``spec/sensitivity.schema.json``): reading and checking
them, the fingerprint that ties one to a model, and where analyses are cached.

This module does not import torch at import time (``bfq allocate`` starts fast).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

from bfq._io import read_json_file
from bfq.errors import RecipeError
from bfq.format.constants import LEVEL_SETS, MAX_BITS, MIN_BITS

SENSITIVITY_FORMAT = "bfq-sensitivity"
SENSITIVITY_VERSION = 1


class SensitivityError(RecipeError):
    """A sensitivity file is malformed, incomplete, from another model, or cannot meet a budget."""


# ---------------------------------------------------------------------------------- reading


def _summarize(names, limit: int = 5) -> str:
    names = list(names)
    head = ", ".join(str(n) for n in names[:limit])
    return f"{len(names)}: {head}" + (f", ... (+{len(names) - limit} more)" if len(names) > limit else "")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def load_sensitivity(source) -> dict:
    """Read (a path) or take (a dict) a sensitivity object and check its structure.

    Checks the format, version, accounting constants, layer entries and that every error value is
    a finite number. It does *not* require the analysis to be complete (allocators check the
    entries they need and name what is missing).

    Raises:
        SensitivityError: naming the field or layer that is wrong.
    """
    if isinstance(source, Mapping):
        obj, where = dict(source), "sensitivity"
    else:
        where = os.fspath(source)
        obj = read_json_file(source, SensitivityError, "sensitivity file")
    if not isinstance(obj, dict):
        raise SensitivityError(f"{where}: expected a JSON object")
    if obj.get("format") != SENSITIVITY_FORMAT:
        raise SensitivityError(f"{where}: format must be {SENSITIVITY_FORMAT!r}, got {obj.get('format')!r}")
    if obj.get("version") != SENSITIVITY_VERSION or not _is_int(obj.get("version")):
        raise SensitivityError(f"{where}: version must be {SENSITIVITY_VERSION}, got {obj.get('version')!r}")
    model = obj.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("fingerprint"), str):
        raise SensitivityError(f"{where}: model.fingerprint missing")
    settings = obj.get("settings")
    if not isinstance(settings, dict):
        raise SensitivityError(f"{where}: settings missing")
    bits = settings.get("bits")
    if not (isinstance(bits, list) and bits and all(_is_int(b) and MIN_BITS <= b <= MAX_BITS for b in bits)
            and len(set(bits)) == len(bits)):  # fmt: skip
        raise SensitivityError(f"{where}: settings.bits must be distinct integers in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    acc = obj.get("accounting")
    if not isinstance(acc, dict):
        raise SensitivityError(f"{where}: accounting missing")
    if acc.get("levels") not in LEVEL_SETS:
        raise SensitivityError(f"{where}: accounting.levels must be one of {list(LEVEL_SETS)}, got {acc.get('levels')!r}")
    if not (_is_int(acc.get("n_weights_total")) and acc["n_weights_total"] > 0):
        raise SensitivityError(f"{where}: accounting.n_weights_total must be a positive integer")
    if not (_is_int(acc.get("n_time_features")) and acc["n_time_features"] >= 0):
        raise SensitivityError(f"{where}: accounting.n_time_features must be a non-negative integer")
    layers = obj.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise SensitivityError(f"{where}: layers must be a non-empty object")
    bad_count, bad_fixed, bad_err = [], [], []
    keys = {str(b) for b in bits}
    for name, entry in layers.items():
        if not isinstance(entry, dict) or not (_is_int(entry.get("n_weights")) and entry["n_weights"] > 0):
            bad_count.append(name)
            continue
        if "fixed_bits" in entry:
            fb = entry["fixed_bits"]
            if not (_is_int(fb) and MIN_BITS <= fb <= MAX_BITS) or "errors" in entry:
                bad_fixed.append(name)
            continue
        errors = entry.get("errors", {})
        if not isinstance(errors, dict) or not set(errors) <= keys:
            bad_err.append(name)
            continue
        for metrics in errors.values():
            if not isinstance(metrics, dict) or not all(
                _is_number(v) and math.isfinite(v) for v in metrics.values()
            ):
                bad_err.append(name)
                break
    if bad_count:
        raise SensitivityError(f"{where}: layers without a positive integer n_weights ({_summarize(bad_count)})")
    if bad_fixed:
        raise SensitivityError(f"{where}: layers with a bad fixed_bits entry ({_summarize(bad_fixed)})")
    if bad_err:
        raise SensitivityError(
            f"{where}: layers with non-finite (NaN/inf) or malformed errors, or errors for bit-widths not in "
            f"settings.bits {bits} ({_summarize(bad_err)})"
        )
    n_sum = sum(e["n_weights"] for e in layers.values())
    if n_sum > acc["n_weights_total"]:
        raise SensitivityError(
            f"{where}: the layers hold {n_sum} weights, more than accounting.n_weights_total {acc['n_weights_total']}"
        )
    return obj


def check_model(sens: Mapping, fingerprint: Mapping, *, where: str = "sensitivity file") -> None:
    """Raise :class:`SensitivityError` unless ``sens`` was made for the model ``fingerprint`` describes
    (``bfq.pipeline.analyze.model_fingerprint``): same layer names and shapes, same weights."""
    mine = sens.get("model", {})
    if mine.get("fingerprint") == fingerprint.get("fingerprint"):
        return
    if mine.get("layers_sha256") != fingerprint.get("layers_sha256"):
        theirs = set(sens.get("layers", {}))
        ours = set(fingerprint.get("layer_names", []))
        detail = ""
        if ours:
            missing, unknown = sorted(ours - theirs), sorted(theirs - ours)
            parts = ([f"missing layers {_summarize(missing)}"] if missing else []) + (
                [f"unknown layers {_summarize(unknown)}"] if unknown else []
            )
            detail = "; " + "; ".join(parts) if parts else "; same layer names, different shapes"
        raise SensitivityError(f"{where} is from another model (its layers differ from this model's{detail})")
    raise SensitivityError(
        f"{where} is from another model: same layer names and shapes but different weights "
        f"(fingerprint {mine.get('fingerprint', '?')[:16]} vs {fingerprint.get('fingerprint', '?')[:16]})"
    )


def model_fingerprint(unet, source: Mapping | None = None) -> dict:
    """Identity of a float UNet for sensitivity files.

    ``layers_sha256``: sha256 over the sorted ``(name, shape)`` of every Linear/Conv2d weight;
    ``weights_sha256``: sha256 over their float32 bytes in that order (two models with the same
    architecture but different weights differ); ``fingerprint``: sha256 of both. ``source`` (from
    :func:`bfq.pipeline.models.resolve_model`) is recorded for people but is not part of the identity, so the
    same weights loaded from another path match.
    """
    import torch
    from torch import nn

    from bfq.families.lazy import is_lazy, weight_of

    lazy = is_lazy(unet)
    if lazy and getattr(unet, "_bfq_fingerprint", None):  # its weights cannot change; reading them takes a minute
        return {**unet._bfq_fingerprint, "source": dict(source) if source else None}
    weights = {name: m.weight for name, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    if not weights:
        raise SensitivityError("the model has no Linear/Conv2d layers")
    names = sorted(weights)
    shapes = json.dumps([[f"{n}.weight", list(weights[n].shape)] for n in names]).encode()
    layers_sha = hashlib.sha256(shapes).hexdigest()
    h = hashlib.sha256()
    with torch.no_grad():
        for n in names:
            w = weight_of(unet, f"{n}.weight") if lazy else weights[n]  # a lazy UNet's, one at a time
            if w.device.type == "meta":
                raise SensitivityError("cannot fingerprint a meta-device model (no weights)")
            h.update(memoryview(w.detach().to("cpu", torch.float32).contiguous().numpy()).cast("B"))
    weights_sha = h.hexdigest()
    fp = {
        "fingerprint": hashlib.sha256(f"{layers_sha}:{weights_sha}".encode()).hexdigest(),
        "layers_sha256": layers_sha,
        "weights_sha256": weights_sha,
        "class_name": type(unet).__name__,
        "source": dict(source) if source else None,
        "n_layers": len(names),
        "layer_names": [f"{n}.weight" for n in names],
    }
    if lazy:
        unet._bfq_fingerprint = fp
    return fp



def default_cache_dir() -> Path:
    """``$BFQ_CACHE_DIR/sensitivity``, else ``$XDG_CACHE_HOME/bfq/sensitivity``, else ``~/.cache/bfq/sensitivity``."""
    if os.environ.get("BFQ_CACHE_DIR"):
        return Path(os.environ["BFQ_CACHE_DIR"]) / "sensitivity"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "bfq" / "sensitivity"


def _settings_key(settings: Mapping) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]




def cache_path(fingerprint: str, settings: Mapping, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the analysis of the model with ``fingerprint`` under ``settings`` is cached:
    ``<cache_dir>/sensitivity-<fingerprint[:16]>-<settings hash>.json``."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return cache / f"sensitivity-{fingerprint[:16]}-{_settings_key(settings)}.json"
