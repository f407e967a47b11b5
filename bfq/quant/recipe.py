"""Recipes (bit plans): which bit-width each Linear/Conv2d weight of a UNet (or a diffusion transformer) gets.

A recipe is JSON (schema: ``spec/recipe.schema.json``)::

    {"format": "bfq-recipe", "version": 1, "name": "...", "levels": "balanced" | "plain",
     "bits": {"<state-dict weight name>": 1..8, ...}, "notes": "optional"}

It must name exactly the layers :func:`quantizable_layers` lists for the model and the time-cache
mode: every ``nn.Linear``/``nn.Conv2d`` weight except the time layers the cache removes
(``scheduler``: ``time_embedding.*`` and every ``time_emb_proj``; ``grid``: ``time_embedding.*`` only).
For a model whose time features depend on more than the timestep (its family says so, e.g. SDXL's
``add_embedding``) the scheduler cache removes ``time_embedding.*`` only, as grid mode does. A
PixArt transformer's scheduler cache removes all of ``adaln_single`` (grid mode: its timestep MLP
only); everything else is quantizable: attention, cross-attention, feed-forward, ``caption_projection``,
the patch embedding and ``proj_out`` (:meth:`bfq.families.Family.replaced_by_time_cache`).

Built-in recipes:

* ``uniform-N`` (N = 1..8): every layer at N bits, except ``conv_in`` and ``conv_out`` at 8 bits as
  in the paper (§3.3 step 4); for a diffusion transformer (PixArt) its first and last layers, the
  patch embedding ``pos_embed.proj`` and the final ``proj_out``. In grid mode the ``time_emb_proj`` layers get N bits too (or
  ``time_proj_bits`` when given).
* ``bitsfusion-sd15``: the paper's App. H table (BITSFUSION.md §3.4) for the SD-v1.5 UNet, 258
  layers. In grid mode the 22 ``time_emb_proj`` layers, which the paper deletes, get
  ``time_proj_bits`` (default :data:`DEFAULT_TIME_PROJ_BITS` = 4: they are few (3% of the weights)
  and known to be quantization-sensitive (TFMQ-DM), so they are kept above the ~2-bit average).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from bfq._io import read_json_file
from bfq.errors import RecipeError
from bfq.families import family_of
from bfq.format.constants import LEVEL_SETS, MAX_BITS, MIN_BITS, bits_per_level_ideal

RECIPE_FORMAT = "bfq-recipe"
RECIPE_VERSION = 1
FIRST_LAST_BITS = 8
DEFAULT_TIME_PROJ_BITS = 4
TIME_CACHE_MODES = ("scheduler", "grid")
BUILTIN_RECIPES = tuple(f"uniform-{n}" for n in range(MIN_BITS, MAX_BITS + 1)) + ("bitsfusion-sd15",)
_KEYS = {"format", "version", "name", "levels", "bits", "notes"}


@dataclass
class Recipe:
    """A bit plan: ``bits`` maps state-dict weight names to 1..8, in model order."""

    name: str
    levels: str = "balanced"
    bits: dict[str, int] = field(default_factory=dict)
    notes: str | None = None

    def to_json(self) -> dict:
        out = {"format": RECIPE_FORMAT, "version": RECIPE_VERSION, "name": self.name, "levels": self.levels,
               "bits": dict(self.bits)}  # fmt: skip
        if self.notes is not None:
            out["notes"] = self.notes
        return out

    @classmethod
    def from_json(cls, obj) -> Recipe:
        """Parse and check a recipe object (raises :class:`RecipeError` naming the bad field)."""
        if not isinstance(obj, dict):
            raise RecipeError("recipe: expected a JSON object")
        extra = sorted(set(obj) - _KEYS)
        if extra:
            raise RecipeError(f"recipe: unknown field(s) {extra}")
        if obj.get("format") != RECIPE_FORMAT:
            raise RecipeError(f"recipe.format: expected {RECIPE_FORMAT!r}, got {obj.get('format')!r}")
        if obj.get("version") != RECIPE_VERSION or isinstance(obj.get("version"), bool):
            raise RecipeError(f"recipe.version: expected {RECIPE_VERSION}, got {obj.get('version')!r}")
        if not isinstance(obj.get("name"), str) or not obj["name"]:
            raise RecipeError("recipe.name: expected a non-empty string")
        if obj.get("levels") not in LEVEL_SETS:
            raise RecipeError(f"recipe.levels: expected one of {list(LEVEL_SETS)}, got {obj.get('levels')!r}")
        if "notes" in obj and not isinstance(obj["notes"], str):
            raise RecipeError("recipe.notes: expected a string")
        bits = obj.get("bits")
        if not isinstance(bits, dict) or not bits:
            raise RecipeError("recipe.bits: expected a non-empty object {layer weight name: bits}")
        _check_bit_values(bits)
        return cls(obj["name"], obj["levels"], dict(bits), obj.get("notes"))

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Recipe:
        return cls.from_json(read_json_file(path, RecipeError, "recipe"))


def _summarize(names, limit: int = 5) -> str:
    names = list(names)
    head = ", ".join(names[:limit])
    return f"{len(names)}: {head}" + (f", ... (+{len(names) - limit} more)" if len(names) > limit else "")


def _check_bit_values(bits: Mapping) -> None:
    def ok(name, b) -> bool:
        return isinstance(name, str) and isinstance(b, int) and not isinstance(b, bool) and MIN_BITS <= b <= MAX_BITS

    bad = [k for k, b in bits.items() if not ok(k, b)]
    if bad:
        raise RecipeError(
            f"recipe.bits: values must be integers in {MIN_BITS}..{MAX_BITS}; bad layers {_summarize(bad)}"
        )


def _check_mode(time_cache: str) -> None:
    if time_cache not in TIME_CACHE_MODES:
        raise ValueError(f"time_cache must be one of {TIME_CACHE_MODES}, got {time_cache!r}")


def _is_time_embedding(name: str) -> bool:
    return name.startswith("time_embedding.")


def _is_time_proj(name: str) -> bool:
    return name.endswith("time_emb_proj.weight")


def linear_conv_weights(unet: nn.Module) -> dict[str, int]:
    """``{weight name: n_weights}`` of every ``nn.Linear``/``nn.Conv2d`` (incl. time layers), model order.

    On the original UNet, the sum is N_w of the accounting (859,077,120 for SD-v1.5).
    """
    return {
        f"{name}.weight": m.weight.numel() for name, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
    }


def replaced_by_cache(unet: nn.Module, name: str, time_cache: str) -> bool:
    """True when the ``time_cache`` mode removes weight ``name`` from ``unet`` (asks the model's family
    whether a scheduler cache holds per-ResNet features or the timestep MLP's output only)."""
    return family_of(unet).replaced_by_time_cache(name, time_cache, dict(unet.config))


def time_projections(unet: nn.Module, time_cache: str) -> list[str]:
    """The quantizable layers on the model's time path that the cache mode keeps: a UNet's
    ``time_emb_proj`` layers (grid mode; SDXL's scheduler cache), a PixArt transformer's
    ``adaln_single.linear`` (grid mode) and size embedders (a size-conditioned model): the layers
    ``time_proj_bits`` gives bits."""
    family = family_of(unet)
    return [n for n in quantizable_layers(unet, time_cache) if family.is_time_layer(n.removesuffix(".weight"))]


def _keeps_time_proj(unet: nn.Module, time_cache: str) -> bool:
    """True when time projections stay (and need bits) under this cache mode."""
    return bool(time_projections(unet, time_cache))


def quantizable_layers(unet: nn.Module, time_cache: str = "scheduler") -> dict[str, int]:
    """``{weight name: n_weights}`` of the layers a recipe must cover, in model order (any model of
    a supported family, :mod:`bfq.families`; meta-device models are fine)."""
    _check_mode(time_cache)
    return {name: n for name, n in linear_conv_weights(unet).items() if not replaced_by_cache(unet, name, time_cache)}


def validate(recipe: Recipe, unet: nn.Module, time_cache: str = "scheduler") -> None:
    """Raise :class:`RecipeError` unless ``recipe`` covers exactly ``quantizable_layers(unet, time_cache)``
    with bits in 1..8 and a known level set."""
    if recipe.levels not in LEVEL_SETS:
        raise RecipeError(f"recipe {recipe.name!r}: levels must be one of {list(LEVEL_SETS)}, got {recipe.levels!r}")
    _check_bit_values(recipe.bits)
    expected = quantizable_layers(unet, time_cache)
    missing = [n for n in expected if n not in recipe.bits]
    unknown = [n for n in recipe.bits if n not in expected]
    if not (missing or unknown):
        return
    parts = []
    if missing:
        parts.append(f"missing layers {_summarize(missing)}")
    if unknown:
        parts.append(f"unknown layers {_summarize(unknown)}")
        removed = [n for n in unknown if _is_time_embedding(n) or _is_time_proj(n)]
        if removed:
            parts.append(f"({len(removed)} of them are time layers the {time_cache!r} time cache removes)")
    if missing and set(missing) <= set(time_projections(unet, time_cache)):
        who = "grid mode" if time_cache == "grid" else "this model's scheduler time cache"
        parts.append(f"({who} keeps time_emb_proj layers: give them bits, e.g. with time_proj_bits)")
    raise RecipeError(f"recipe {recipe.name!r} does not fit this model: " + "; ".join(parts))


# -------------------------------------------------------------------------------- built-ins

# BITSFUSION.md §3.4 (paper App. H), transcribed verbatim. Attention column order:
# proj_in | attn1 q k v out | attn2 q k v out | ff.net.0.proj ff.net.2 | proj_out
_SD15_ATTENTION = """
down_blocks.0.attentions.0   6 | 5 5 4 6 | 5 7 3 3 | 3 3 | 5
down_blocks.0.attentions.1   4 | 3 4 6 5 | 5 7 2 3 | 3 3 | 6
down_blocks.1.attentions.0   4 | 3 3 4 4 | 3 5 4 3 | 2 2 | 4
down_blocks.1.attentions.1   4 | 2 2 4 4 | 3 6 4 3 | 2 2 | 4
down_blocks.2.attentions.0   3 | 3 2 3 3 | 3 4 4 3 | 2 1 | 3
down_blocks.2.attentions.1   4 | 4 2 3 3 | 3 4 4 3 | 2 2 | 4
mid_block.attentions.0       2 | 3 1 2 2 | 1 4 4 3 | 2 1 | 3
up_blocks.1.attentions.0     3 | 2 1 2 3 | 3 4 4 2 | 2 2 | 3
up_blocks.1.attentions.1     3 | 2 2 2 2 | 2 4 3 1 | 1 1 | 3
up_blocks.1.attentions.2     3 | 1 1 2 2 | 1 3 2 1 | 1 1 | 2
up_blocks.2.attentions.0     4 | 2 2 3 3 | 1 2 1 1 | 1 1 | 3
up_blocks.2.attentions.1     4 | 2 3 3 3 | 1 3 1 1 | 1 1 | 3
up_blocks.2.attentions.2     4 | 2 2 2 3 | 2 3 1 1 | 1 1 | 3
up_blocks.3.attentions.0     4 | 2 2 6 3 | 2 3 1 1 | 1 1 | 4
up_blocks.3.attentions.1     4 | 2 3 5 3 | 2 3 1 1 | 2 1 | 4
up_blocks.3.attentions.2     6 | 2 3 4 3 | 4 5 1 1 | 3 2 | 4
"""
# ResBlocks: conv1, conv2[, conv_shortcut]
_SD15_RESNETS = """
down0.r0 3,3     down0.r1 3,4     down1.r0 3,3,7   down1.r1 3,2     down2.r0 3,2,4   down2.r1 2,1
down3.r0 1,1     down3.r1 1,1     mid.r0 1,1       mid.r1 1,1
up0.r0 1,2,1     up0.r1 1,1,1     up0.r2 2,1,1     up1.r0 1,1,3     up1.r1 1,1,3     up1.r2 1,1,3
up2.r0 1,2,4     up2.r1 1,2,4     up2.r2 1,1,4     up3.r0 1,2,4     up3.r1 2,2,4     up3.r2 2,2,4
"""
_SD15_SAMPLERS = "down0 4, down1 4, down2 1, up0 1, up1 2, up2 3"
_ATTN_COLUMNS = (
    ["proj_in"]
    + [f"transformer_blocks.0.attn{a}.{p}" for a in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")]
    + ["transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2", "proj_out"]
)


def _block(short: str) -> str:
    """"down1" -> "down_blocks.1", "up0" -> "up_blocks.0", "mid" -> "mid_block"."""
    if short == "mid":
        return "mid_block"
    kind = "down" if short.startswith("down") else "up"
    return f"{kind}_blocks.{int(short[len(kind):])}"


def _sd15_table_bits() -> dict[str, int]:
    bits = {"conv_in.weight": FIRST_LAST_BITS}
    for line in _SD15_ATTENTION.strip().splitlines():
        prefix, values = line.split(maxsplit=1)
        nums = [int(v) for v in values.replace("|", " ").split()]
        if len(nums) != len(_ATTN_COLUMNS):
            raise RuntimeError(f"malformed built-in table row: {line}")
        bits.update({f"{prefix}.{col}.weight": b for col, b in zip(_ATTN_COLUMNS, nums)})
    for entry in zip(*[iter(_SD15_RESNETS.split())] * 2):
        block, res = entry[0].split(".")
        nums = [int(v) for v in entry[1].split(",")]
        prefix = f"{_block(block)}.resnets.{int(res[1:])}"
        bits.update({f"{prefix}.{conv}.weight": b for conv, b in zip(("conv1", "conv2", "conv_shortcut"), nums)})
    for item in _SD15_SAMPLERS.split(","):
        block, b = item.split()
        kind = "downsamplers" if block.startswith("down") else "upsamplers"
        bits[f"{_block(block)}.{kind}.0.conv.weight"] = int(b)
    bits["conv_out.weight"] = FIRST_LAST_BITS
    return bits


def _in_model_order(bits: dict[str, int], order) -> dict[str, int]:
    rank = {n: i for i, n in enumerate(order)}
    return dict(sorted(bits.items(), key=lambda kv: rank.get(kv[0], len(rank))))


def first_last_layers(unet: nn.Module) -> tuple[str, ...]:
    """The weights every recipe keeps at :data:`FIRST_LAST_BITS`: a UNet's ``conv_in``/``conv_out``,
    a DiT's patch embedding and final projection (the model's family says which)."""
    return family_of(unet).first_last_layers(dict(unet.config))


def uniform_recipe(unet: nn.Module, bits: int, *, time_cache: str = "scheduler", levels: str = "balanced",
                   time_proj_bits: int | None = None) -> Recipe:  # fmt: skip
    """``uniform-N``: every quantizable layer at ``bits``, the first and last layers (conv_in/conv_out)
    at 8 bits."""
    layers = quantizable_layers(unet, time_cache)
    ends, time_projs = first_last_layers(unet), set(time_projections(unet, time_cache))
    plan = {}
    for name in layers:
        if name in ends:
            plan[name] = FIRST_LAST_BITS
        elif name in time_projs and time_proj_bits is not None:
            plan[name] = time_proj_bits
        else:
            plan[name] = bits
    notes = f"every layer {bits}-bit {levels}, {'/'.join(n.removesuffix('.weight') for n in ends)} {FIRST_LAST_BITS}-bit"
    return Recipe(f"uniform-{bits}", levels, plan, notes)


def bitsfusion_sd15(unet: nn.Module | None = None, *, time_cache: str = "scheduler",
                    time_proj_bits: int | None = None) -> Recipe:  # fmt: skip
    """The paper's 1.99-bit SD-v1.5 recipe (App. H), balanced levels.

    In grid mode ``unet`` is needed to name its ``time_emb_proj`` layers, which get ``time_proj_bits``
    (default 4). The result is in ``unet``'s module order when ``unet`` is given.
    """
    _check_mode(time_cache)
    plan = _sd15_table_bits()
    if time_cache == "grid":
        if unet is None:
            raise ValueError("bitsfusion-sd15 in grid mode needs the UNet to name its time_emb_proj layers")
        tb = DEFAULT_TIME_PROJ_BITS if time_proj_bits is None else time_proj_bits
        plan.update({n: tb for n in quantizable_layers(unet, "grid") if _is_time_proj(n)})
    if unet is not None:
        plan = _in_model_order(plan, linear_conv_weights(unet))
    notes = "BitsFusion (Sui et al. 2024) App. H recipe for SD-v1.5; conv_in/conv_out 8-bit"
    if time_cache == "grid":
        notes += f"; grid time cache: time_emb_proj {plan[next(n for n in plan if _is_time_proj(n))]}-bit"
    return Recipe("bitsfusion-sd15", "balanced", plan, notes)


def builtin_recipe(name: str, unet: nn.Module, time_cache: str = "scheduler",
                   time_proj_bits: int | None = None) -> Recipe:  # fmt: skip
    """One of :data:`BUILTIN_RECIPES` for ``unet`` (not validated; see :func:`resolve_recipe`)."""
    if name == "bitsfusion-sd15":
        return bitsfusion_sd15(unet, time_cache=time_cache, time_proj_bits=time_proj_bits)
    if name in BUILTIN_RECIPES:
        bits = int(name.split("-")[1])
        return uniform_recipe(unet, bits, time_cache=time_cache, time_proj_bits=time_proj_bits)
    raise RecipeError(f"unknown built-in recipe {name!r}; built-ins: {', '.join(BUILTIN_RECIPES)}")


def resolve_recipe(name_or_path: str | os.PathLike, unet: nn.Module, time_cache: str = "scheduler",
                   time_proj_bits: int | None = None, levels: str | None = None) -> Recipe:  # fmt: skip
    """A validated recipe from a built-in name or a JSON file.

    ``levels`` ("balanced"/"plain"), when given, overrides the recipe's level set (built-ins are
    balanced). Where the time cache keeps the ``time_emb_proj`` layers (grid mode; scheduler mode of a model
    whose time features depend on more than the timestep, like SDXL), those a recipe file leaves out get
    ``time_proj_bits`` (default 4), so recipes written for the per-ResNet scheduler cache (like the paper's)
    work unchanged.

    Raises:
        RecipeError: unknown name, unreadable/invalid file, or a recipe that does not fit ``unet``.
    """
    _check_mode(time_cache)
    if time_proj_bits is not None:
        _check_bit_values({"time_proj_bits": time_proj_bits})
    name = os.fspath(name_or_path)
    if name in BUILTIN_RECIPES:
        recipe = builtin_recipe(name, unet, time_cache, time_proj_bits)
    elif Path(name).is_file():
        recipe = Recipe.load(name)
        if _keeps_time_proj(unet, time_cache):
            tb = DEFAULT_TIME_PROJ_BITS if time_proj_bits is None else time_proj_bits
            for n in time_projections(unet, time_cache):
                if n not in recipe.bits:
                    recipe.bits[n] = tb
            recipe.bits = _in_model_order(recipe.bits, linear_conv_weights(unet))
    else:
        raise RecipeError(f"unknown recipe {name!r}: not a built-in ({', '.join(BUILTIN_RECIPES)}) nor a file")
    if levels is not None:
        recipe.levels = levels
    validate(recipe, unet, time_cache)
    return recipe


# ------------------------------------------------------------------------------- accounting


def average_bits(bits_by_layer: Mapping[str, int], n_weights_by_layer: Mapping[str, int], levels: str,
                 n_time_features: int, n_weights_total: int) -> float:  # fmt: skip
    """BITSFUSION.md §5.1: ``(Σ_i log2(L_i)·N_i + 16·N_tf) / N_w``.

    ``L_i`` = 2^b+1 (balanced) or 2^b (plain); ``N_tf`` = cached fp16 time-feature values; ``N_w`` =
    every Linear/Conv weight of the *original* UNet, including the time layers a cache removed.
    """
    if n_weights_total <= 0:
        raise ValueError("n_weights_total must be positive")
    missing = [n for n in bits_by_layer if n not in n_weights_by_layer]
    if missing:
        raise RecipeError(f"no weight count for layers {_summarize(missing)}")
    total = sum(bits_per_level_ideal(b, levels) * n_weights_by_layer[n] for n, b in bits_by_layer.items())
    return (total + 16.0 * n_time_features) / n_weights_total


def dense_weights(recipe: Recipe, unet: nn.Module, time_cache: str | None) -> dict[str, int]:
    """``{weight name: n_weights}`` of the Linear/Conv weights an export keeps in floating point:
    neither in ``recipe`` nor replaced by the time cache (``None``: no cache, nothing replaced)."""
    return {
        n: c
        for n, c in linear_conv_weights(unet).items()
        if n not in recipe.bits and not (time_cache and replaced_by_cache(unet, n, time_cache))
    }


def summarize(recipe: Recipe, unet: nn.Module, time_cache: str | None, n_time_features: int,
              dense_bits: int = 32) -> dict:  # fmt: skip
    """Accounting summary of ``recipe`` on the *original* ``unet`` (time layers still present).

    Every Linear/Conv weight is counted (FORMAT.md §2.4): the recipe's layers at log2(L) bits, the
    time layers the cache replaces through its ``n_time_features`` fp16 values, and every other
    weight, which the file keeps in floating point, at ``dense_bits`` (32 for f32, 16 for f16).
    """
    if time_cache is not None:
        _check_mode(time_cache)
    counts = linear_conv_weights(unet)
    n_w = sum(counts.values())
    n_dense = sum(dense_weights(recipe, unet, time_cache).values())
    by_bits: dict[int, int] = {}
    for b in recipe.bits.values():
        by_bits[b] = by_bits.get(b, 0) + 1
    return {
        "name": recipe.name,
        "levels": recipe.levels,
        "time_cache": time_cache,
        "avg_bits": average_bits(recipe.bits, counts, recipe.levels, n_time_features, n_w) + dense_bits * n_dense / n_w,
        "n_layers": len(recipe.bits),
        "layers_by_bits": {str(b): by_bits[b] for b in sorted(by_bits)},
        "n_quantized_weights": sum(counts[n] for n in recipe.bits),
        "n_time_features": n_time_features,
        "n_dense_weights": n_dense,
        "dense_bits": dense_bits,
        "n_weights_total": n_w,
        "n_params_total": sum(p.numel() for p in unet.parameters()),
    }
