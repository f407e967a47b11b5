"""The .bfq header: preamble and validation of every field (FORMAT.md §1-§2, §5).

`parse_header` (from bfq.format.strict_json) turns the header bytes into JSON values under
FORMAT.md's JSON rules; `validate_header` checks every object and returns a typed `Header`;
`check_layout` checks that the blocks tile the data section. Reader and writer both go through
these functions. It is one cohesive module: every rule FORMAT.md states about the header, for
every model kind, is checked here and nowhere else.
"""

from __future__ import annotations

import math
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Any

from bfq._io import display
from bfq.errors import BfqFormatError
from bfq.format.constants import (
    ADALN_FEATURES,
    ALIGNMENT,
    CONDITIONED_TIME_KEYS,
    DENSE_DTYPES,
    LEVEL_SETS,
    MAX_BITS,
    MAX_BLOCKS,
    MAX_DIM,
    MAX_ELEMENTS,
    MAX_NDIM,
    MIN_BITS,
    MODEL_KEYS,
    PACKING_SCHEME,
    RECIPE_INTEGER_KEYS,
    RECIPE_NUMBER_KEYS,
    SCALE_DTYPES,
    SHA256_PATTERN,
    SOURCE_KINDS,
    TIME_CACHE_KEYS,
    TIME_CACHE_MODES,
    TOP_LEVEL_KEYS,
    is_adaln_class,
    is_legal_packing,
    num_levels,
    replaced_by_time_cache,
    uses_size_conditions,
)
from bfq.format.pack import stream_cells
from bfq.format.strict_json import parse_header  # noqa: F401  (re-exported: the reader and writer parse here)

_PREAMBLE = struct.Struct("<8sIIQ")  # magic, version, header crc32, header length


def align_up(x: int, a: int = ALIGNMENT) -> int:
    return -(-x // a) * a


def _crc32(buf) -> int:
    return zlib.crc32(buf) & 0xFFFFFFFF


# ----------------------------------------------------------------------------------------------
# Header validation: every field the reader relies on, with the field's path in the message


def _fail(path: str, message: str):
    raise BfqFormatError(f"{path}: {message}")


def _show(value) -> str:
    """A header value quoted in a message: short, and safe to print (bfq._io.display)."""
    if isinstance(value, str):
        return f"'{display(value, 60)}'"
    if isinstance(value, (list, dict)):
        return f"({type(value).__name__} of {len(value)})"
    return display(value, 40)


def _get(obj: dict, key: str, kind, path: str):
    if not isinstance(obj, dict):
        _fail(path, "must be an object")
    if key not in obj:
        _fail(f"{path}.{key}", "missing")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        _fail(f"{path}.{key}", f"expected {getattr(kind, '__name__', kind)}, got {type(value).__name__} {_show(value)}")
    return value


def _only_keys(obj: dict, allowed: set, path: str) -> None:
    extra = set(obj) - allowed
    if extra:
        _fail(path, f"unknown field(s) {', '.join(_show(k) for k in sorted(extra)[:5])}" + (" ..." if len(extra) > 5 else ""))


def _shape(obj: dict, path: str, min_ndim: int = 1) -> tuple[int, ...]:
    shape = _get(obj, "shape", list, path)
    if not (min_ndim <= len(shape) <= MAX_NDIM):
        _fail(f"{path}.shape", f"{len(shape)} dimensions, expected {min_ndim}..{MAX_NDIM}")
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, int) or not (1 <= dim <= MAX_DIM):
            _fail(f"{path}.shape", f"dimension {_show(dim)} outside 1..2^40")
    if math.prod(shape) > MAX_ELEMENTS:
        _fail(f"{path}.shape", f"{math.prod(shape)} elements exceeds 2^48")
    return tuple(shape)


def _name(obj: dict, path: str) -> str:
    name = _get(obj, "name", str, path)
    if not name:
        _fail(f"{path}.name", "must not be empty")
    return name


@dataclass(frozen=True)
class Block:
    """A byte range of the data section, with its CRC-32."""

    path: str
    offset: int
    length: int
    crc32: int


def _block(obj: dict, path: str, expected_length: int) -> Block:
    offset = _get(obj, "offset", int, path)
    length = _get(obj, "length", int, path)
    crc = _get(obj, "crc32", int, path)
    if offset < 0 or offset % ALIGNMENT:
        _fail(f"{path}.offset", f"{offset} is not a non-negative multiple of {ALIGNMENT}")
    if length != expected_length:
        _fail(f"{path}.length", f"{length}, expected {expected_length} from the shape and encoding")
    if not (0 <= crc <= 0xFFFFFFFF):
        _fail(f"{path}.crc32", f"{crc} is not a 32-bit value")
    return Block(path, offset, length, crc)


@dataclass(frozen=True)
class Layer:
    """A quantized weight: codes (a packed stream) and one scale per output channel."""

    name: str
    shape: tuple[int, ...]
    bits: int
    levels: str
    digits_per_word: int
    word_bits: int
    scale_dtype: str
    scales: Block
    codes: Block

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def num_levels(self) -> int:
        return num_levels(self.bits, self.levels)

    @property
    def nbytes(self) -> int:
        return self.scales.length + self.codes.length


@dataclass(frozen=True)
class Dense:
    """A tensor kept in floating point (bias, norm, cached time features, ...)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    block: Block

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def _parse_layer(obj: Any, path: str) -> Layer:
    _only_keys(obj if isinstance(obj, dict) else {}, {"name", "shape", "bits", "levels", "packing", "scales", "codes"}, path)
    name = _name(obj, path)
    shape = _shape(obj, path, min_ndim=2)
    bits = _get(obj, "bits", int, path)
    if not (MIN_BITS <= bits <= MAX_BITS):
        _fail(f"{path}.bits", f"{bits} outside {MIN_BITS}..{MAX_BITS}")
    levels = _get(obj, "levels", str, path)
    if levels not in LEVEL_SETS:
        _fail(f"{path}.levels", f"{_show(levels)} is not one of {LEVEL_SETS}")
    packing = _get(obj, "packing", dict, path)
    _only_keys(packing, {"scheme", "digits_per_word", "word_bits"}, f"{path}.packing")
    scheme = _get(packing, "scheme", str, f"{path}.packing")
    if scheme != PACKING_SCHEME:
        _fail(f"{path}.packing.scheme", f"unknown scheme {_show(scheme)}; this reader knows {PACKING_SCHEME!r}")
    g = _get(packing, "digits_per_word", int, f"{path}.packing")
    k = _get(packing, "word_bits", int, f"{path}.packing")
    if not is_legal_packing(num_levels(bits, levels), g, k):
        _fail(f"{path}.packing", f"digits_per_word={g}, word_bits={k} is illegal for {num_levels(bits, levels)} levels")
    scales = _get(obj, "scales", dict, path)
    _only_keys(scales, {"dtype", "offset", "length", "crc32"}, f"{path}.scales")
    scale_dtype = _get(scales, "dtype", str, f"{path}.scales")
    if scale_dtype not in SCALE_DTYPES:
        _fail(f"{path}.scales.dtype", f"{_show(scale_dtype)} is not one of {SCALE_DTYPES}")
    scales_block = _block(scales, f"{path}.scales", shape[0] * DENSE_DTYPES[scale_dtype][0])
    codes = _get(obj, "codes", dict, path)
    _only_keys(codes, {"offset", "length", "crc32"}, f"{path}.codes")
    codes_block = _block(codes, f"{path}.codes", 8 * stream_cells(math.prod(shape), g, k))
    return Layer(name, shape, bits, levels, g, k, scale_dtype, scales_block, codes_block)


def _parse_dense(obj: Any, path: str, name: str | None = None) -> Dense:
    keys = {"dtype", "shape", "offset", "length", "crc32"} | ({"name"} if name is None else set())
    _only_keys(obj if isinstance(obj, dict) else {}, keys, path)
    if name is None:
        name = _name(obj, path)
    dtype = _get(obj, "dtype", str, path)
    if dtype not in DENSE_DTYPES:
        _fail(f"{path}.dtype", f"unknown dtype {_show(dtype)}; expected one of {sorted(DENSE_DTYPES)}")
    shape = _shape(obj, path)
    return Dense(name, shape, dtype, _block(obj, path, math.prod(shape) * DENSE_DTYPES[dtype][0]))


def _finite_number(value, path: str) -> float:
    """A JSON number (not a boolean) as binary64, which must be finite."""
    try:
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(float(value))
    except OverflowError:  # an integer beyond float range
        ok = False
    if not ok:
        _fail(path, f"expected a finite number, got {_show(value)}")
    return float(value)


@dataclass(frozen=True)
class TimeCache:
    """Cached time features: per-ResNet projections (scheduler) or the embedding table (grid)."""

    mode: str
    timesteps: tuple[float, ...]
    tables: dict[str, Dense]  # scheduler: resnet module name -> [T, D]; grid: "time_embedding" -> [T, D]

    @property
    def per_resnet(self) -> bool:
        """False for the tables that hold ``time_embedding``'s output (grid, and scheduler mode's
        ``embedding``, FORMAT.md §2.3.1): the ``time_emb_proj`` layers stay in the model."""
        return "time_embedding" not in self.tables

    @property
    def num_values(self) -> int:
        return sum(t.size for t in self.tables.values())


def _timesteps(obj: dict, path: str) -> tuple[float, ...]:
    timesteps = _get(obj, "timesteps", list, path)
    if not timesteps:
        _fail(f"{path}.timesteps", "empty")
    steps = tuple(_finite_number(t, f"{path}.timesteps[{i}]") for i, t in enumerate(timesteps))
    if len(set(steps)) != len(steps):
        _fail(f"{path}.timesteps", "contains duplicates (compared as binary64 values)")
    return steps


def _parse_time_cache(obj: Any, path: str) -> TimeCache:
    mode = _get(obj, "mode", str, path)
    if mode not in TIME_CACHE_MODES:
        _fail(f"{path}.mode", f"{_show(mode)} is not one of {TIME_CACHE_MODES}")
    _only_keys(obj, TIME_CACHE_KEYS[mode], path)
    steps = _timesteps(obj, path)
    if mode == "scheduler" and "embedding" in obj:  # v1.2: the timestep MLP's output only (§2.3.1)
        if "features" in obj:
            _fail(path, "holds both 'features' and 'embedding'; scheduler mode takes exactly one")
        tables = {"time_embedding": _parse_dense(_get(obj, "embedding", dict, path), f"{path}.embedding", "time_embedding")}
    elif mode == "scheduler":
        features = _get(obj, "features", dict, path)
        if not features or not all(features):
            _fail(f"{path}.features", "must be a non-empty object with non-empty keys")
        tables = {name: _parse_dense(t, f"{path}.features.{display(name, 80)}", name) for name, t in features.items()}
    else:
        tables = {"time_embedding": _parse_dense(_get(obj, "embedding", dict, path), f"{path}.embedding", "time_embedding")}
        if steps != tuple(float(i) for i in range(len(steps))):
            _fail(f"{path}.timesteps", "grid mode must cover 0, 1, ..., T-1")
    for table in tables.values():
        if len(table.shape) != 2 or table.shape[0] != len(steps):
            _fail(f"{table.block.path}.shape", f"{list(table.shape)} must be [{len(steps)}, D]")
    return TimeCache(mode, steps, tables)


@dataclass(frozen=True)
class Header:
    raw: dict
    layers: dict[str, Layer]
    tensors: dict[str, Dense]
    time_cache: TimeCache | None

    @property
    def model(self) -> dict:
        return self.raw["model"]

    @property
    def recipe(self) -> dict:
        return self.raw.get("recipe") or {}

    @property
    def metadata(self) -> dict:
        return self.raw.get("metadata") or {}

    def blocks(self) -> list[Block]:
        out = []
        for layer in self.layers.values():
            out += [layer.scales, layer.codes]
        out += [t.block for t in self.tensors.values()]
        if self.time_cache:
            out += [t.block for t in self.time_cache.tables.values()]
        return out


def _check_model(header: dict) -> None:
    model = _get(header, "model", dict, "header")
    _only_keys(model, MODEL_KEYS, "header.model")
    if not _get(model, "class_name", str, "header.model"):
        _fail("header.model.class_name", "must not be empty")
    _get(model, "config", dict, "header.model")
    if "source" not in model:
        return
    path = "header.model.source"
    source = _get(model, "source", dict, "header.model")
    kind = _get(source, "kind", str, path)
    if kind not in SOURCE_KINDS:
        _fail(f"{path}.kind", f"{_show(kind)} is not one of {sorted(SOURCE_KINDS)}")
    _only_keys(source, {"kind", *SOURCE_KINDS[kind]}, path)
    for key, (kind_type, required) in SOURCE_KINDS[kind].items():
        if (required or key in source) and _get(source, key, kind_type, path) == "" and required:
            _fail(f"{path}.{key}", "must not be empty")
    if kind == "file" and not re.fullmatch(SHA256_PATTERN, source["sha256"]):
        _fail(f"{path}.sha256", f"{_show(source['sha256'])} is not 64 lowercase hexadecimal digits")


def _check_recipe(header: dict) -> None:
    recipe = _get(header, "recipe", dict, "header")
    for key in RECIPE_NUMBER_KEYS:
        if key in recipe:
            _finite_number(recipe[key], f"recipe.{key}")
    for key in RECIPE_INTEGER_KEYS:
        if key in recipe and _get(recipe, key, int, "recipe") < 1:
            _fail(f"recipe.{key}", f"{recipe[key]} is not a positive integer")


def _check_metadata(header: dict) -> None:
    metadata = _get(header, "metadata", dict, "header")
    if not all(isinstance(v, str) for v in metadata.values()):
        _fail("header.metadata", "must be an object of strings")


def _entries(raw: list, parse, kind: str, taken: dict) -> dict:
    out = {}
    for i, obj in enumerate(raw):
        entry = parse(obj, f"{kind}[{i}]")
        if entry.name in out or entry.name in taken:
            _fail(f"{kind}[{i}].name", f"duplicate name {_show(entry.name)}")
        out[entry.name] = entry
    return out


def _check_time_layers_absent(cache: TimeCache, kind: str, names, class_name: str) -> None:
    for i, name in enumerate(names):
        if replaced_by_time_cache(name, cache.mode, cache.per_resnet, class_name):
            _fail(f"{kind}[{i}].name", f"{_show(name)} is a time layer the {cache.mode} time cache replaces")


def _check_adaln_cache(config: dict, cache: TimeCache, class_name: str) -> None:
    """FORMAT.md §2.3.2: a DiT (adaLN-single) file carries a scheduler-mode cache only; its `features`
    are exactly adaLN-single's two outputs, [T, 6D] and [T, D], and only without size conditions."""
    if cache.mode != "scheduler":
        _fail("time_cache.mode", f"{_show(cache.mode)}: a {class_name} file carries a scheduler-mode time cache only")
    flag = config.get("use_additional_conditions")
    if not (flag is None or isinstance(flag, bool)):
        _fail("model.config.use_additional_conditions", f"{_show(flag)} must be true, false or null beside a time cache")
    if not cache.per_resnet:
        return
    if set(cache.tables) != set(ADALN_FEATURES):
        _fail("time_cache.features", f"keys {sorted(cache.tables)[:4]} of a {class_name} file must be exactly "
                                     f"{sorted(ADALN_FEATURES)}")  # fmt: skip
    width = cache.tables["adaln_single.emb"].shape[1]
    for key, times in ADALN_FEATURES.items():
        if cache.tables[key].shape[1] != times * width:
            _fail(f"time_cache.features.{key}.shape", f"{list(cache.tables[key].shape)}: its width must be {times} x "
                                                      f"{width}, the width of adaln_single.emb")  # fmt: skip
    if uses_size_conditions(config):
        _fail("time_cache", "scheduler-mode features of adaln_single hold what the timestep alone gives, but this model "
                            "embeds the image size (use_additional_conditions, or sample_size 128 when it is unset): "
                            "its cache holds the timestep embedding only ('embedding')")  # fmt: skip


def _check_time_cache_fits(config: dict, cache: TimeCache, class_name: str = "") -> None:
    """FORMAT.md §2.3: a time cache holds features of the timestep alone; a model whose time
    embedding mixes in conditioning must not carry one that this conditioning would change."""
    if is_adaln_class(class_name):
        _check_adaln_cache(config, cache, class_name)
        return
    kind = "features" if cache.per_resnet else "embedding"
    for key in CONDITIONED_TIME_KEYS[kind]:
        if config.get(key) is not None:
            what = "per-ResNet time features" if cache.per_resnet else "the time embedding"
            _fail("time_cache", f"a {cache.mode}-mode cache of {what} holds features of the timestep alone, but "
                                f"model.config.{key} is {_show(config[key])}: what it caches depends on conditioning")


def validate_header(header: dict) -> Header:
    _only_keys(header, TOP_LEVEL_KEYS, "header")
    _get(header, "producer", str, "header")
    _check_model(header)
    if "metadata" in header:
        _check_metadata(header)
    if "recipe" in header:
        _check_recipe(header)
    layers_raw = _get(header, "layers", list, "header")
    tensors_raw = _get(header, "tensors", list, "header")
    cache = _parse_time_cache(_get(header, "time_cache", dict, "header"), "time_cache") if "time_cache" in header else None
    n_blocks = 2 * len(layers_raw) + len(tensors_raw) + (len(cache.tables) if cache else 0)
    if n_blocks > MAX_BLOCKS:
        _fail("header", f"{n_blocks} blocks, more than {MAX_BLOCKS}")
    layers = _entries(layers_raw, _parse_layer, "layers", {})
    tensors = _entries(tensors_raw, _parse_dense, "tensors", layers)
    if cache:
        class_name = header["model"]["class_name"]
        _check_time_cache_fits(header["model"]["config"], cache, class_name)
        _check_time_layers_absent(cache, "layers", layers, class_name)
        _check_time_layers_absent(cache, "tensors", tensors, class_name)
    return Header(header, layers, tensors, cache)


def check_layout(blocks: list[Block]) -> int:
    """Blocks sorted by offset must tile the data section: each starts at the aligned end of the
    previous one (no holes, no overlaps). Returns the data section's length."""
    end = 0
    for block in sorted(blocks, key=lambda b: b.offset):
        expected = align_up(end)
        if block.offset != expected:
            what = "overlaps the previous block" if block.offset < expected else "leaves a hole"
            _fail(f"{block.path}.offset", f"{block.offset} {what}; expected {expected}")
        end = block.offset + block.length
    return end
