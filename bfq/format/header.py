"""The .bfq header: preamble, strict JSON parsing and validation of every field (FORMAT.md §1-§2, §5).

`parse_header` turns the header bytes into JSON values under FORMAT.md's JSON rules;
`validate_header` checks every object and returns a typed `Header`; `check_layout` checks that the
blocks tile the data section. Reader and writer both go through these functions.
"""

from __future__ import annotations

import json
import math
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Any

from bfq.errors import BfqFormatError
from bfq.format.constants import (
    ALIGNMENT,
    DENSE_DTYPES,
    LEVEL_SETS,
    MAX_BITS,
    MAX_BLOCKS,
    MAX_JSON_DEPTH,
    MAX_NDIM,
    MIN_BITS,
    PACKING_SCHEME,
    SCALE_DTYPES,
    is_legal_packing,
    num_levels,
)
from bfq.format.pack import stream_cells

_PREAMBLE = struct.Struct("<8sIIQ")  # magic, version, header crc32, header length
MAX_DIM = 1 << 40
MAX_ELEMENTS = 1 << 48
TOP_LEVEL_KEYS = {"producer", "model", "metadata", "layers", "tensors", "time_cache", "recipe"}


def align_up(x: int, a: int = ALIGNMENT) -> int:
    return -(-x // a) * a


def _crc32(buf) -> int:
    return zlib.crc32(buf) & 0xFFFFFFFF


# ----------------------------------------------------------------------------------------------
# Header parsing: strict JSON, bounded depth, no duplicate keys, no non-finite numbers


_STRING_OR_BRACKET = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _check_depth(raw: bytes) -> None:
    """Reject nesting deeper than MAX_JSON_DEPTH before json.loads can recurse (strings skipped)."""
    depth = 0
    for match in _STRING_OR_BRACKET.finditer(raw):
        token = match.group()
        if token in (b"{", b"["):
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise BfqFormatError(f"header: JSON nesting deeper than {MAX_JSON_DEPTH}")
        elif token in (b"}", b"]"):
            depth -= 1


def _no_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise BfqFormatError(f"header: duplicate key {key!r}")
        out[key] = value
    return out


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BfqFormatError(f"header: non-finite number {text[:32]!r}")
    return value


def _reject_constant(name: str):
    raise BfqFormatError(f"header: {name} is not allowed in JSON")


def parse_header(raw: bytes) -> dict:
    if not raw.startswith(b"{"):
        raise BfqFormatError(f"header: must start with '{{', found {raw[:1]!r}")
    _check_depth(raw)
    try:
        text = raw.decode("utf-8")
        header = json.loads(
            text, object_pairs_hook=_no_duplicates, parse_float=_finite_float, parse_constant=_reject_constant
        )
    except BfqFormatError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BfqFormatError(f"header: not valid UTF-8 JSON ({exc})") from None
    if not isinstance(header, dict):
        raise BfqFormatError("header: top level must be a JSON object")
    return header


# ----------------------------------------------------------------------------------------------
# Header validation: every field the reader relies on, with the field's path in the message


def _fail(path: str, message: str):
    raise BfqFormatError(f"{path}: {message}")


def _get(obj: dict, key: str, kind, path: str):
    if not isinstance(obj, dict):
        _fail(path, "must be an object")
    if key not in obj:
        _fail(f"{path}.{key}", "missing")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        _fail(f"{path}.{key}", f"expected {getattr(kind, '__name__', kind)}, got {type(value).__name__} {value!r:.60}")
    return value


def _only_keys(obj: dict, allowed: set, path: str) -> None:
    extra = set(obj) - allowed
    if extra:
        _fail(path, f"unknown field(s) {sorted(extra)!r:.120}")


def _shape(obj: dict, path: str, min_ndim: int = 1) -> tuple[int, ...]:
    shape = _get(obj, "shape", list, path)
    if not (min_ndim <= len(shape) <= MAX_NDIM):
        _fail(f"{path}.shape", f"{len(shape)} dimensions, expected {min_ndim}..{MAX_NDIM}")
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, int) or not (1 <= dim <= MAX_DIM):
            _fail(f"{path}.shape", f"dimension {dim!r:.40} outside 1..2^40")
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
        _fail(f"{path}.levels", f"{levels!r:.40} is not one of {LEVEL_SETS}")
    packing = _get(obj, "packing", dict, path)
    _only_keys(packing, {"scheme", "digits_per_word", "word_bits"}, f"{path}.packing")
    scheme = _get(packing, "scheme", str, f"{path}.packing")
    if scheme != PACKING_SCHEME:
        _fail(f"{path}.packing.scheme", f"unknown scheme {scheme!r:.60}; this reader knows {PACKING_SCHEME!r}")
    g = _get(packing, "digits_per_word", int, f"{path}.packing")
    k = _get(packing, "word_bits", int, f"{path}.packing")
    if not is_legal_packing(num_levels(bits, levels), g, k):
        _fail(f"{path}.packing", f"digits_per_word={g}, word_bits={k} is illegal for {num_levels(bits, levels)} levels")
    scales = _get(obj, "scales", dict, path)
    _only_keys(scales, {"dtype", "offset", "length", "crc32"}, f"{path}.scales")
    scale_dtype = _get(scales, "dtype", str, f"{path}.scales")
    if scale_dtype not in SCALE_DTYPES:
        _fail(f"{path}.scales.dtype", f"{scale_dtype!r:.40} is not one of {SCALE_DTYPES}")
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
        _fail(f"{path}.dtype", f"unknown dtype {dtype!r:.40}; expected one of {sorted(DENSE_DTYPES)}")
    shape = _shape(obj, path)
    return Dense(name, shape, dtype, _block(obj, path, math.prod(shape) * DENSE_DTYPES[dtype][0]))


def _finite_number(value, path: str) -> float:
    try:
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(float(value))
    except OverflowError:  # an integer beyond float range
        ok = False
    if not ok:
        _fail(path, f"expected a finite number, got {str(value)[:40]}")
    return float(value)


@dataclass(frozen=True)
class TimeCache:
    """Cached time features: per-ResNet projections (scheduler) or the embedding table (grid)."""

    mode: str
    timesteps: tuple[float, ...]
    tables: dict[str, Dense]  # scheduler: resnet module name -> [T, D]; grid: "time_embedding" -> [T, D]

    @property
    def num_values(self) -> int:
        return sum(t.size for t in self.tables.values())


def _parse_time_cache(obj: Any, path: str) -> TimeCache:
    mode = _get(obj, "mode", str, path)
    if mode not in ("scheduler", "grid"):
        _fail(f"{path}.mode", f"{mode!r:.40} is not 'scheduler' or 'grid'")
    timesteps = _get(obj, "timesteps", list, path)
    if not timesteps:
        _fail(f"{path}.timesteps", "empty")
    steps = tuple(_finite_number(t, f"{path}.timesteps[{i}]") for i, t in enumerate(timesteps))
    if len(set(steps)) != len(steps):
        _fail(f"{path}.timesteps", "contains duplicates")
    if mode == "scheduler":
        _only_keys(obj, {"mode", "timesteps", "features"}, path)
        features = _get(obj, "features", dict, path)
        tables = {name: _parse_dense(t, f"{path}.features.{name}", name) for name, t in features.items()}
    else:
        _only_keys(obj, {"mode", "timesteps", "embedding"}, path)
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


def validate_header(header: dict) -> Header:
    _only_keys(header, TOP_LEVEL_KEYS, "header")
    _get(header, "producer", str, "header")
    model = _get(header, "model", dict, "header")
    _get(model, "class_name", str, "header.model")
    _get(model, "config", dict, "header.model")
    if "source" in model:
        _get(model, "source", dict, "header.model")
    metadata = header.get("metadata", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        _fail("header.metadata", "must be an object of strings")
    layers_raw = _get(header, "layers", list, "header")
    tensors_raw = _get(header, "tensors", list, "header")
    if len(layers_raw) * 2 + len(tensors_raw) > MAX_BLOCKS:
        _fail("header", f"more than {MAX_BLOCKS} blocks")
    layers = {}
    for i, obj in enumerate(layers_raw):
        layer = _parse_layer(obj, f"layers[{i}]")
        if layer.name in layers:
            _fail(f"layers[{i}].name", f"duplicate name {layer.name!r}")
        layers[layer.name] = layer
    tensors = {}
    for i, obj in enumerate(tensors_raw):
        tensor = _parse_dense(obj, f"tensors[{i}]")
        if tensor.name in tensors or tensor.name in layers:
            _fail(f"tensors[{i}].name", f"duplicate name {tensor.name!r}")
        tensors[tensor.name] = tensor
    cache = _parse_time_cache(_get(header, "time_cache", dict, "header"), "time_cache") if "time_cache" in header else None
    if "recipe" in header:
        recipe = _get(header, "recipe", dict, "header")
        for key in ("avg_bits", "n_weights_total"):
            if key in recipe:
                _finite_number(recipe[key], f"recipe.{key}")
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


