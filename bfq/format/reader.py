"""Read and write .bfq containers (FORMAT.md is normative).

`BfqWriter` streams blocks to a temporary file as they are added and renames the finished file
into place, so an interrupted write never touches an existing file. `open_bfq` memory-maps a
file, validates its whole header and layout up front, and decodes tensors lazily.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bfq import pack
from bfq.errors import BfqFormatError
from bfq.format import (
    ALIGNMENT,
    DENSE_DTYPES,
    LEVEL_SETS,
    MAGIC,
    MAX_BITS,
    MAX_BLOCKS,
    MAX_HEADER_BYTES,
    MAX_JSON_DEPTH,
    MAX_NDIM,
    MIN_BITS,
    PACKING_SCHEME,
    PREAMBLE_SIZE,
    SCALE_DTYPES,
    VERSION,
    choose_packing,
    fits_fast_path,
    is_legal_packing,
    num_levels,
)

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
    codes_block = _block(codes, f"{path}.codes", 8 * pack.stream_cells(math.prod(shape), g, k))
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


# ----------------------------------------------------------------------------------------------
# Reader


class BfqFile:
    """A validated, memory-mapped .bfq file. Tensors are decoded on request."""

    def __init__(self, path: str | os.PathLike, *, verify: bool = True):
        self.path = Path(path)
        self.verify = verify
        with open(self.path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < PREAMBLE_SIZE:
                raise BfqFormatError(f"file: {size} bytes is shorter than the {PREAMBLE_SIZE}-byte preamble")
            self._mmap = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        self.file_bytes = size
        try:
            self.header = self._read_header()
        except BaseException:
            self.close()
            raise

    def _read_header(self) -> Header:
        magic, version, header_crc, header_len = _PREAMBLE.unpack_from(self._mmap, 0)
        if magic != MAGIC:
            hint = " (line endings were changed: transfer the file in binary mode)" if magic[:4] == MAGIC[:4] else ""
            raise BfqFormatError(f"magic: {magic!r} is not a .bfq file{hint}")
        if version != VERSION:
            raise BfqFormatError(f"version: {version} is not supported (this reader reads version {VERSION})")
        if header_len > MAX_HEADER_BYTES:
            raise BfqFormatError(f"header_length: {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit")
        if PREAMBLE_SIZE + header_len > self.file_bytes:
            raise BfqFormatError(f"header_length: {header_len} runs past the end of the {self.file_bytes}-byte file")
        raw = self._mmap[PREAMBLE_SIZE : PREAMBLE_SIZE + header_len]
        if _crc32(raw) != header_crc:
            raise BfqFormatError(f"header_crc32: stored {header_crc:#010x}, computed {_crc32(raw):#010x}")
        header = validate_header(parse_header(raw))
        self.data_start = align_up(PREAMBLE_SIZE + header_len)
        data_len = check_layout(header.blocks())
        if self.data_start + data_len != self.file_bytes:
            raise BfqFormatError(
                f"file: {self.file_bytes} bytes, but the layout ends at {self.data_start + data_len}"
                + (" (truncated)" if self.file_bytes < self.data_start + data_len else " (trailing bytes)")
            )
        self._check_padding(PREAMBLE_SIZE + header_len, self.data_start, "header padding")
        end = 0
        for block in sorted(header.blocks(), key=lambda b: b.offset):
            self._check_padding(self.data_start + end, self.data_start + block.offset, f"padding before {block.path}")
            end = block.offset + block.length
        return header

    def _check_padding(self, start: int, stop: int, what: str) -> None:
        if any(self._mmap[start:stop]):
            raise BfqFormatError(f"{what}: bytes {start}..{stop} must be zero")

    def close(self) -> None:
        if getattr(self, "_mmap", None) is not None:
            try:
                self._mmap.close()
            except BufferError:  # numpy views still alive; the map closes when they go
                pass
            self._mmap = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- raw access ------------------------------------------------------------------------

    def _bytes(self, block: Block, check: bool | None = None) -> memoryview:
        view = memoryview(self._mmap)[self.data_start + block.offset : self.data_start + block.offset + block.length]
        if self.verify if check is None else check:
            crc = _crc32(view)
            if crc != block.crc32:
                raise BfqFormatError(f"{block.path}.crc32: stored {block.crc32:#010x}, computed {crc:#010x}")
        return view

    def _array(self, block: Block, dtype: str, count: int, check: bool | None = None) -> np.ndarray:
        return np.frombuffer(self._bytes(block, check), dtype=dtype, count=count)

    # -- public decoding -------------------------------------------------------------------

    @property
    def layers(self) -> dict[str, Layer]:
        return self.header.layers

    @property
    def tensors(self) -> dict[str, Dense]:
        return self.header.tensors

    def read_scales(self, name: str) -> np.ndarray:
        layer = self.layers[name]
        scales = self._array(layer.scales, DENSE_DTYPES[layer.scale_dtype][1], layer.shape[0])
        if not np.isfinite(scales).all():
            bad = int(np.flatnonzero(~np.isfinite(scales))[0])
            raise BfqFormatError(f"{layer.scales.path}: scale of channel {bad} is {scales[bad]} (must be finite)")
        return scales

    def read_stream(self, name: str) -> np.ndarray:
        layer = self.layers[name]
        return self._array(layer.codes, "<u8", layer.codes.length // 8)

    def read_codes(self, name: str) -> np.ndarray:
        """The integer levels q of a layer, int16, in its logical shape."""
        layer = self.layers[name]
        stream = self.read_stream(name)
        self._check_stream_padding(layer, stream)
        codes = pack.unpack_codes(stream, layer.size, layer.bits, layer.levels, layer.digits_per_word, layer.word_bits)
        return codes.reshape(layer.shape)

    def _check_stream_padding(self, layer: Layer, stream: np.ndarray) -> None:
        if pack.padding_bits_set(stream, layer.size, layer.digits_per_word, layer.word_bits):
            raise BfqFormatError(f"{layer.codes.path}: bits after the last word must be zero")

    def decode_layer(self, name: str, dtype: str = "float16", out: np.ndarray | None = None, parallel: bool = True) -> np.ndarray:
        """Dequantized weight of a layer: float32, or fp16/bf16 as uint16 bit patterns (see pack).
        Thread-safe; `parallel=False` decodes on the calling thread."""
        layer = self.layers[name]
        scales = self.read_scales(name)
        stream = self.read_stream(name)
        self._check_stream_padding(layer, stream)
        result = pack.unpack_dequantize(
            stream, layer.shape, scales, layer.bits, layer.levels, layer.digits_per_word, layer.word_bits, dtype, out, parallel
        )
        return result.reshape(layer.shape) if out is None else result

    def read_tensor(self, name: str) -> np.ndarray:
        """A dense tensor: float32/float16 arrays, bf16 as uint16 bit patterns (read-only view)."""
        tensor = self.tensors[name]
        return self._dense(tensor)

    def _dense(self, tensor: Dense) -> np.ndarray:
        return self._array(tensor.block, DENSE_DTYPES[tensor.dtype][1], tensor.size).reshape(tensor.shape)

    def read_time_table(self, name: str) -> np.ndarray:
        return self._dense(self.header.time_cache.tables[name])

    def decode_layers(self, outputs: dict[str, np.ndarray], dtype: str = "float16", threads: int | None = None) -> None:
        """Decode many layers into preallocated arrays, largest first, one layer per thread at a
        time: no per-layer fork/join, so a busy core slows one layer instead of every layer."""
        from concurrent.futures import ThreadPoolExecutor

        import numba

        order = sorted(outputs, key=lambda name: -self.layers[name].size)
        with ThreadPoolExecutor(max_workers=threads or numba.get_num_threads()) as pool:
            for future in [pool.submit(self.decode_layer, name, dtype, outputs[name], False) for name in order]:
                future.result()

    def verify_all(self) -> None:
        """Check every checksum, scale and stream, and decode every layer."""
        for block in self.header.blocks():
            self._bytes(block, check=True)
        for name, layer in self.layers.items():
            self.decode_layer(name, "float32")
            bad = pack.noncanonical_words(self.read_stream(name), layer.size, layer.bits, layer.levels, layer.digits_per_word, layer.word_bits)
            if bad:
                raise BfqFormatError(f"{layer.codes.path}: {bad} word(s) not canonically encoded (FORMAT.md §4)")


def open_bfq(path: str | os.PathLike, *, verify: bool = True) -> BfqFile:
    """Open and validate a .bfq file. `verify=False` skips per-block checksums when decoding."""
    return BfqFile(path, verify=verify)


# ----------------------------------------------------------------------------------------------
# Writer


class BfqWriter:
    """Stream layers and tensors into a new .bfq file, atomically.

    Blocks go to a temporary data file as they are added; `close()` writes the preamble and
    header, appends the data, fsyncs, and renames over `path`. If anything fails before that,
    `path` is untouched and the temporary files are removed.
    """

    def __init__(self, path: str | os.PathLike, *, model: dict, producer: str | None = None, metadata=None):
        from bfq import __version__

        self.path = Path(path)
        self._header: dict[str, Any] = {
            "producer": producer or f"bfq {__version__}",
            "model": model,
            "metadata": dict(metadata or {}),
            "layers": [],
            "tensors": [],
        }
        self._names: set[str] = set()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".data", dir=self.path.parent)
        self._data = os.fdopen(fd, "w+b")
        self._data_path = Path(tmp)
        self._end = 0
        self._closed = False

    def _write_block(self, buf) -> dict:
        view = memoryview(buf).cast("B")
        if len(view) == 0:
            raise ValueError("empty blocks are not allowed")
        pad = align_up(self._end) - self._end
        if pad:
            self._data.write(b"\0" * pad)
        offset = self._end + pad
        self._data.write(view)
        self._end = offset + len(view)
        return {"offset": offset, "length": len(view), "crc32": _crc32(view)}

    def _claim(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"invalid tensor name {name!r}")
        if name in self._names:
            raise ValueError(f"duplicate tensor name {name!r}")
        self._names.add(name)

    def add_layer(self, name: str, codes: np.ndarray, scales: np.ndarray, bits: int, *, levels: str = "balanced", scale_dtype: str = "f16") -> dict:
        """Add a quantized layer: integer levels `codes` (logical shape, dim 0 = output channels)
        and one scale per output channel, stored as `scale_dtype` ('f16' or 'f32')."""
        if levels not in LEVEL_SETS:
            raise ValueError(f"levels must be one of {LEVEL_SETS}, got {levels!r}")
        if not (MIN_BITS <= bits <= MAX_BITS):
            raise ValueError(f"bits must be in {MIN_BITS}..{MAX_BITS}, got {bits}")
        if scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES}, got {scale_dtype!r}")
        codes = np.asarray(codes)
        if codes.ndim < 2:
            raise ValueError(f"{name}: quantized layers need >= 2 dimensions, got shape {codes.shape}")
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is caught as non-finite below
            stored_scales = np.ascontiguousarray(np.asarray(scales).reshape(-1), dtype=DENSE_DTYPES[scale_dtype][1])
        if stored_scales.shape != (codes.shape[0],):
            raise ValueError(f"{name}: {stored_scales.size} scales for {codes.shape[0]} output channels")
        if not np.isfinite(stored_scales).all():
            raise ValueError(f"{name}: scales must be finite in {scale_dtype}")
        self._claim(name)
        stream, g, k = pack.pack_codes(codes, bits, levels)
        entry = {
            "name": name,
            "shape": list(codes.shape),
            "bits": bits,
            "levels": levels,
            "packing": {"scheme": PACKING_SCHEME, "digits_per_word": g, "word_bits": k},
            "scales": {"dtype": scale_dtype, **self._write_block(stored_scales)},
            "codes": self._write_block(stream),
        }
        self._header["layers"].append(entry)
        return entry

    def _dense_entry(self, array: np.ndarray, dtype: str | None) -> dict:
        array = np.asarray(array)
        if dtype is None:
            dtype = {np.dtype("float32"): "f32", np.dtype("float16"): "f16"}.get(array.dtype)
            if dtype is None:
                raise ValueError(f"cannot store {array.dtype}; pass dtype='bf16' for bfloat16 bit patterns")
        if dtype not in DENSE_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DENSE_DTYPES)}, got {dtype!r}")
        if dtype == "bf16" and array.dtype.itemsize != 2:
            raise ValueError("bf16 tensors are passed as uint16 bit patterns")
        stored = np.ascontiguousarray(array).view(DENSE_DTYPES[dtype][1]) if dtype == "bf16" else np.ascontiguousarray(array, dtype=DENSE_DTYPES[dtype][1])
        shape = list(array.shape) or [1]
        return {"dtype": dtype, "shape": shape, **self._write_block(stored.reshape(-1))}

    def add_tensor(self, name: str, array: np.ndarray, dtype: str | None = None) -> dict:
        """Add a dense tensor kept in floating point (f32, f16, or bf16 given as uint16 bits)."""
        self._claim(name)
        entry = {"name": name, **self._dense_entry(array, dtype)}
        self._header["tensors"].append(entry)
        return entry

    def set_time_cache(self, mode: str, timesteps, tables: dict[str, np.ndarray], dtype: str = "f16") -> None:
        """scheduler mode: tables = {resnet name: [T, D]}; grid mode: {"time_embedding": [T, D]}."""
        if "time_cache" in self._header:
            raise ValueError("the time cache was already set")
        if mode not in ("scheduler", "grid"):
            raise ValueError(f"time cache mode must be 'scheduler' or 'grid', got {mode!r}")
        if mode == "grid" and set(tables) != {"time_embedding"}:
            raise ValueError(f"grid mode takes exactly one table, 'time_embedding'; got {sorted(tables)}")
        steps = [float(t) for t in timesteps]
        stored = {name: self._dense_entry(table, dtype) for name, table in tables.items()}
        if mode == "scheduler":
            self._header["time_cache"] = {"mode": mode, "timesteps": steps, "features": stored}
        else:
            self._header["time_cache"] = {"mode": mode, "timesteps": steps, "embedding": stored["time_embedding"]}

    def set_recipe(self, recipe: dict) -> None:
        self._header["recipe"] = recipe

    def close(self) -> Path:
        """Finish the file: header + data into a temporary file, fsync, rename over `path`."""
        if self._closed:
            return self.path
        try:
            raw = json.dumps(self._header, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
            # the writer never emits what the reader rejects
            if check_layout(validate_header(parse_header(raw)).blocks()) != self._end:
                raise ValueError("internal error: the blocks do not tile the data written")
            if len(raw) > MAX_HEADER_BYTES:
                raise ValueError(f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(_PREAMBLE.pack(MAGIC, VERSION, _crc32(raw), len(raw)))
                    out.write(raw)
                    out.write(b"\0" * (align_up(PREAMBLE_SIZE + len(raw)) - PREAMBLE_SIZE - len(raw)))
                    self._data.flush()
                    self._data.seek(0)
                    while chunk := self._data.read(16 << 20):
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, self.path)
                _fsync_dir(self.path.parent)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        finally:
            self._discard()
        return self.path

    def abort(self) -> None:
        """Drop everything written so far; `path` is left as it was."""
        self._discard()

    def _discard(self) -> None:
        if not self._closed:
            self._closed = True
            self._data.close()
            self._data_path.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
