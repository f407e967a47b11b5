"""Model families: everything family-specific, in one module per family (``sd15``, ``sdxl``, ``pixart``).

The stages ask the family of a model (:func:`family_of`, :func:`family_for_config`) or of a
built-in name (:func:`family_for_name`) instead of assuming one; a model no family recognizes is
refused up front with :class:`FamilyError`, naming the families supported. A new family (a
diffusion transformer, say) is a new module here plus its entry in :data:`FAMILIES`.

Importing this package does not import torch or diffusers.
"""

from __future__ import annotations

from bfq.errors import InputError
from bfq.families import pixart, sd15, sdxl
from bfq.families.family import TIMESTEP_AND_CONDITIONING, TIMESTEP_ONLY, Family

FAMILIES: tuple[Family, ...] = (sd15.FAMILY, sdxl.FAMILY, pixart.FAMILY)


class FamilyError(InputError):
    """A model that no supported family covers (the message names the families supported)."""


def supported() -> str:
    """``"SD-v1.5 (sd15), SDXL (sdxl), PixArt-Σ (pixart)"``: for messages."""
    return ", ".join(f"{f.title} ({f.name})" for f in FAMILIES)


def _describe(class_name: str, config: dict) -> str:
    added = config.get("addition_embed_type") if isinstance(config, dict) else None
    return f"{class_name}" + (f" with addition_embed_type {added!r}" if added is not None else "")


def family_for_config(config: dict, class_name: str | None = None) -> Family:
    """The family of a model of diffusers class ``class_name`` (default: ``config["_class_name"]``,
    else ``UNet2DConditionModel``) with ``config``.

    Raises:
        FamilyError: no family covers it.
    """
    config = dict(config)
    class_name = class_name or config.get("_class_name") or "UNet2DConditionModel"
    for family in FAMILIES:
        if family.matches(class_name, config):
            return family
    raise FamilyError(f"{_describe(class_name, config)} is not a model family bfq supports; supported: {supported()}")


def family_of(model) -> Family:
    """The family of a diffusers model object (its class and ``config``), even with a time cache
    or quantized layers installed.

    Raises:
        FamilyError: no family covers it (or it is not a diffusers model with a config).
    """
    config = getattr(model, "config", None)
    if config is None:
        raise FamilyError(f"{type(model).__name__} is not a diffusers model; supported: {supported()}")
    return family_for_config(dict(config), type(model).__name__)


def family_for_name(name: str) -> Family:
    """The family whose name (``"sdxl"``) or built-in model (``"sdxl-random"``, ``"tiny-sdxl"``) is ``name``.

    Raises:
        FamilyError: no family has that name.
    """
    for family in FAMILIES:
        if name == family.name or name in family.builtin_names():
            return family
    raise FamilyError(f"{name!r} is not a model family or built-in model; families: {supported()}; "
                      f"built-in models: {', '.join(builtin_models())}")  # fmt: skip


def model_folder(pipeline_dir) -> str | None:
    """The folder of a diffusers pipeline directory that holds its model (``"unet"``; a DiT
    pipeline's ``"transformer"``): the first family component with a ``config.json``, else None."""
    from pathlib import Path

    for component in dict.fromkeys(f.component for f in FAMILIES):
        if (Path(pipeline_dir) / component / "config.json").is_file():
            return component
    return None


def pipeline_family(pipeline_dir) -> tuple[Family, dict]:
    """``(family, model config)`` of a diffusers pipeline directory (its ``unet/`` or ``transformer/``).

    Raises:
        FamilyError: no model folder, or a model no family covers.
    """
    import json
    from pathlib import Path

    folder = model_folder(pipeline_dir)
    if folder is None:
        raise FamilyError(f"{pipeline_dir} holds no model folder ({' or '.join(dict.fromkeys(f.component for f in FAMILIES))}/)")
    config = json.loads((Path(pipeline_dir) / folder / "config.json").read_text())
    return family_for_config(config), config


def builtin_models() -> tuple[str, ...]:
    """Every built-in model name: ``tiny-sd``, ``sd15-random``, ``sd15``, ``tiny-sdxl``, ..."""
    return tuple(n for f in FAMILIES for n in f.builtin_names())


def is_builtin(name: str) -> bool:
    return name in builtin_models()


__all__ = ["FAMILIES", "Family", "FamilyError", "TIMESTEP_AND_CONDITIONING", "TIMESTEP_ONLY", "builtin_models",
           "family_for_config", "family_for_name", "family_of", "is_builtin", "model_folder", "pipeline_family",
           "supported"]  # fmt: skip
