"""Fuzzing the reader: seeded mutations of golden files, a property-based writer -> reader round
trip, and (issue 17) hypothesis-driven fuzzing -- mutated golden vectors (spec/vectors/) and
headers generated from spec/header.schema.json, some with a layout made to fit so that they reach
the block checks and decoders. Every input ends in acceptance or exactly one BfqFormatError, in
bounded time and memory; never another exception. Every byte of a .bfq file is covered by some
check (FORMAT.md section 3), so every change to a golden file must be rejected.

CI runs a short budget. A long run is one command (random, not derandomized, when the variable
is set):

    BFQ_FUZZ_EXAMPLES=100000 OMP_NUM_THREADS=1 python -m pytest -q tests/test_fuzz.py -k hypothesis

Coverage-guided fuzzing (optional, not a test dependency: `pip install atheris`):

    OMP_NUM_THREADS=1 python tests/fuzz_atheris.py -max_total_time=600 -rss_limit_mb=4096
"""

from __future__ import annotations

import functools
import json
import os
import random
import struct
import tempfile
import time
import zlib
from pathlib import Path

import numba
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bfq import BfqFormatError
from bfq.format import BfqWriter, open_bfq
from bfq.format.constants import num_levels

VECTORS = Path(__file__).resolve().parents[1] / "spec" / "vectors"
GOLDEN = sorted(p.name for p in VECTORS.glob("*.bfq"))
MAX_SECONDS = 2.0


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Thousands of tiny decodes: one numba thread avoids a thread wake-up per kernel call."""
    old = numba.get_num_threads()
    numba.set_num_threads(1)
    yield
    numba.set_num_threads(old)


@pytest.fixture
def scratch(tmp_path):
    """A scratch folder in memory where there is one (thousands of small files are written)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        with tempfile.TemporaryDirectory(dir=shm, prefix="bfq-fuzz-") as tmp:
            yield Path(tmp)
    else:
        yield tmp_path


def outcome(path: Path) -> str | None:
    """Open and verify: None if the file is accepted, else the BfqFormatError message. Any other
    exception propagates (and fails the test)."""
    start = time.perf_counter()
    try:
        with open_bfq(path) as f:
            f.verify_all()
        return None
    except BfqFormatError as exc:
        return str(exc)
    finally:
        assert time.perf_counter() - start < MAX_SECONDS


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ----------------------------------------------------------------------------------------------
# Mutations of golden files: all rejected


@pytest.mark.parametrize("name", ["worked_example.bfq", "time_scheduler.bfq", "time_grid.bfq", "dense.bfq", "layout.bfq", "empty.bfq"])
def test_every_single_byte_change_is_rejected(name, scratch):
    original = (VECTORS / name).read_bytes()
    rng = random.Random(name)
    masks = (0x01, 0x80) if name in ("worked_example.bfq", "empty.bfq") else (None,)
    path = scratch / name
    for pos in range(len(original)):
        for mask in masks:
            mask = mask or rng.randrange(1, 256)
            data = bytearray(original)
            data[pos] ^= mask
            assert outcome(_write(path, bytes(data))) is not None, f"byte {pos} ^ {mask:#04x} accepted"


def _mutate(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    kind = rng.choice(["flip", "flip", "truncate", "insert", "delete", "duplicate", "zero", "swap_blocks"])
    n = len(data)
    if kind == "flip":
        out = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            out[rng.randrange(n)] ^= rng.randrange(1, 256)
    elif kind == "truncate":
        out = data[: rng.randrange(n)]
    elif kind == "insert":
        pos = rng.randrange(n + 1)
        out = data[:pos] + bytes(rng.randrange(256) if rng.random() < 0.5 else 0 for _ in range(rng.randint(1, 70))) + data[pos:]
    elif kind == "delete":
        pos = rng.randrange(n)
        out = data[:pos] + data[pos + rng.randint(1, 70) :]
    elif kind == "duplicate":
        pos = rng.randrange(n)
        out = data[: pos + 64] + data[pos : pos + 64] + data[pos + 64 :]
    elif kind == "zero":
        pos = rng.randrange(n)
        out = bytearray(data)
        out[pos : pos + 16] = bytes(len(out[pos : pos + 16]))  # zero a run in place
    else:  # swap two 64-byte-aligned chunks (block reordering without fixing the header)
        k = n // 64
        i, j = rng.sample(range(k), 2) if k >= 2 else (0, 0)
        chunks = [data[c * 64 : (c + 1) * 64] for c in range(k)]
        chunks[i], chunks[j] = chunks[j], chunks[i]
        out = b"".join(chunks) + data[k * 64 :]
    return kind, bytes(out)


def test_random_mutations_are_rejected(scratch):
    rng = random.Random(20240601)
    originals = {name: (VECTORS / name).read_bytes() for name in GOLDEN}
    path = scratch / "m.bfq"
    tried = 0
    while tried < 400:
        name = rng.choice(GOLDEN)
        kind, data = _mutate(rng, originals[name])
        if data == originals[name]:
            continue
        tried += 1
        assert outcome(_write(path, data)) is not None, f"{name}: {kind} mutation accepted (case {tried})"


# ----------------------------------------------------------------------------------------------
# Header mutations with a recomputed CRC: reach the JSON parser and the validator


def _assemble(raw: bytes, data: bytes) -> bytes:
    out = b"\x89BFQ\r\n\x1a\n" + struct.pack("<IIQ", 1, zlib.crc32(raw), len(raw)) + raw
    return out + b"\0" * (-len(out) % 64) + data


def _split(data: bytes) -> tuple[bytes, bytes]:
    (n,) = struct.unpack_from("<Q", data, 16)
    return data[24 : 24 + n], data[-(-(24 + n) // 64) * 64 :]


STRUCTURAL = b'{}[]",:0123456789-+.eEtfnrul \\'
VALUES = [0, 1, -1, 64, 2**32, 2**40 + 1, 2**48, 2**63, 2**64 + 4, -(2**63), 0.5, -0.0, 1e308, 1e-320, True, False,
          None, "", "f16", "bf16", "balanced", "scheduler", "radix-fraction-v1", [], [0], [1, 1], [[]], {}, {"a": 1}]


def _nodes(obj, path=()):
    yield path
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _nodes(value, path + (key,))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from _nodes(value, path + (i,))


def test_header_byte_mutations_with_valid_crc(scratch):
    rng = random.Random(7)
    path = scratch / "h.bfq"
    accepted = 0
    for case in range(300):
        name = rng.choice(GOLDEN)
        raw, data = _split((VECTORS / name).read_bytes())
        raw = bytearray(raw)
        for _ in range(rng.randint(1, 3)):
            pos = rng.randrange(len(raw))
            raw[pos] = rng.choice(STRUCTURAL) if rng.random() < 0.8 else rng.randrange(256)
        accepted += outcome(_write(path, _assemble(bytes(raw), data))) is None
    assert accepted < 150  # most structural edits break something; some (inside strings) do not


def test_header_value_replacements_with_valid_crc(scratch):
    """Replace one JSON value (or key) by another of any type: BfqFormatError or a valid file."""
    rng = random.Random(11)
    path = scratch / "v.bfq"
    for case in range(300):
        name = rng.choice(GOLDEN)
        raw, data = _split((VECTORS / name).read_bytes())
        header = json.loads(raw)
        nodes = [p for p in _nodes(header) if p]
        target = rng.choice(nodes)
        parent = header
        for key in target[:-1]:
            parent = parent[key]
        if isinstance(parent, dict) and rng.random() < 0.2:  # rename or drop a key
            value = parent.pop(target[-1])
            if rng.random() < 0.5:
                parent[rng.choice(["x", "name", "shape", "offset", "crc32", "dtype", "features"])] = value
        else:
            parent[target[-1]] = rng.choice(VALUES)
        new_raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        outcome(_write(path, _assemble(new_raw, data)))


# ----------------------------------------------------------------------------------------------
# Property-based round trip through the writer


def _ref_f32(q: np.ndarray, stored_scales: np.ndarray) -> np.ndarray:
    s = stored_scales.astype(np.float32).reshape((-1,) + (1,) * (q.ndim - 1))
    with np.errstate(over="ignore"):
        return s * q.astype(np.float32)


@st.composite
def layers(draw):
    bits = draw(st.integers(1, 8))
    levels = draw(st.sampled_from(["balanced", "plain"]))
    shape = tuple(draw(st.lists(st.integers(1, 7), min_size=2, max_size=4)))
    if draw(st.booleans()):
        shape = (shape[0], draw(st.integers(1, 300)))
    lo = -(1 << (bits - 1))
    hi = lo + num_levels(bits, levels) - 1
    q = draw(hnp.arrays(np.int16, shape, elements=st.integers(lo, hi)))
    scale_dtype = draw(st.sampled_from(["f16", "f32"]))
    width = 16 if scale_dtype == "f16" else 32
    scales = draw(hnp.arrays(np.float16 if width == 16 else np.float32, (shape[0],),
                             elements=st.floats(width=width, allow_nan=False, allow_infinity=False)))
    return bits, levels, q, scale_dtype, scales


@st.composite
def dense(draw):
    dtype = draw(st.sampled_from(["f32", "f16", "bf16"]))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    if dtype == "bf16":
        return dtype, draw(hnp.arrays(np.uint16, shape))
    np_dtype = np.float32 if dtype == "f32" else np.float16
    return dtype, draw(hnp.arrays(np_dtype, shape, elements=st.floats(width=32 if dtype == "f32" else 16)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(layer_list=st.lists(layers(), min_size=1, max_size=3), tensor_list=st.lists(dense(), max_size=3),
       cache=st.sampled_from([None, "scheduler", "grid"]))
def test_writer_reader_round_trip(layer_list, tensor_list, cache):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rt.bfq"
        with BfqWriter(path, model={"class_name": "UNet2DConditionModel", "config": {}}) as w:
            for i, (bits, levels, q, scale_dtype, scales) in enumerate(layer_list):
                w.add_layer(f"layer{i}.weight", q, scales, bits, levels=levels, scale_dtype=scale_dtype)
            for i, (dtype, array) in enumerate(tensor_list):
                w.add_tensor(f"tensor{i}", array, dtype=dtype)
            table = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
            if cache == "scheduler":
                w.set_time_cache("scheduler", [999, 500.5, 0], {"down_blocks.0.resnets.0": table}, dtype="f32")
            elif cache == "grid":
                w.set_time_cache("grid", [0, 1, 2], {"time_embedding": table.astype(np.float16)})
        with open_bfq(path) as f:
            f.verify_all()
            for i, (bits, levels, q, scale_dtype, scales) in enumerate(layer_list):
                name = f"layer{i}.weight"
                assert np.array_equal(f.read_codes(name), q)
                ref = _ref_f32(q, scales)
                got = f.decode_layer(name, "float32")
                assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))
                with np.errstate(over="ignore"):
                    assert np.array_equal(f.decode_layer(name, "float16"), ref.astype(np.float16).view(np.uint16))
                bf16 = torch.from_numpy(np.ascontiguousarray(ref)).to(torch.bfloat16).view(torch.int16).numpy()
                assert np.array_equal(f.decode_layer(name, "bfloat16"), bf16.view(np.uint16))
            for i, (dtype, array) in enumerate(tensor_list):
                got = f.read_tensor(f"tensor{i}")
                assert got.shape == array.shape and got.tobytes() == np.ascontiguousarray(array).tobytes()
            if cache == "scheduler":
                assert np.array_equal(f.read_time_table("down_blocks.0.resnets.0"), table)
                assert f.header.time_cache.timesteps == (999.0, 500.5, 0.0)
            elif cache == "grid":
                assert np.array_equal(f.read_time_table("time_embedding"), table.astype(np.float16))


# ----------------------------------------------------------------------------------------------
# Hypothesis fuzzing (issue 17): acceptance or one BfqFormatError, in bounded time and memory

FUZZ_EXAMPLES = int(os.environ.get("BFQ_FUZZ_EXAMPLES") or 0)
SCHEMA = json.loads((VECTORS.parent / "header.schema.json").read_text("utf-8"))
MAX_EXTRA_BYTES = 16 << 20  # decoding allocates a small multiple of the file (FORMAT.md §5); fuzz files are KBs


def _fuzz(examples: int):
    """A short, derandomized budget in CI; BFQ_FUZZ_EXAMPLES=N runs N random examples instead."""
    return settings(max_examples=FUZZ_EXAMPLES or examples, deadline=None, derandomize=not FUZZ_EXAMPLES,
                    database=None, suppress_health_check=list(HealthCheck))


@functools.cache
def _compiled() -> bool:
    """Decode every golden file once, so numba's first compilations are not timed as a hang."""
    for name in GOLDEN:
        with open_bfq(VECTORS / name) as f:
            f.verify_all()
    return True


def bounded_outcome(data: bytes) -> str | None:
    """outcome() of these bytes as a file, with its tracemalloc peak bounded too."""
    import tracemalloc

    _compiled()

    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None) as tmp:
        path = _write(Path(tmp) / "f.bfq", data)
        tracemalloc.start()
        try:
            result = outcome(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < 64 * len(data) + MAX_EXTRA_BYTES, f"{peak} bytes for a {len(data)}-byte file"
    return result


EDITS = st.sampled_from(["flip", "set", "insert", "delete", "truncate", "repeat"])


@st.composite
def byte_edits(draw, n: int):
    """One edit of a byte string of length n: (kind, position, payload)."""
    kind = draw(EDITS)
    pos = draw(st.integers(0, max(n - 1, 0)))
    payload = draw(st.one_of(st.binary(min_size=1, max_size=8), st.lists(st.sampled_from(STRUCTURAL), min_size=1, max_size=8).map(bytes)))
    return kind, pos, payload


def _apply(data: bytes, edits) -> bytes:
    out = bytearray(data)
    for kind, pos, payload in edits:
        pos = min(pos, len(out))
        if kind == "flip" and pos < len(out):
            out[pos] ^= payload[0] or 1
        elif kind == "set":
            out[pos : pos + len(payload)] = payload
        elif kind == "insert":
            out[pos:pos] = payload
        elif kind == "delete":
            del out[pos : pos + len(payload)]
        elif kind == "truncate":
            del out[pos:]
        elif kind == "repeat":
            out[pos:pos] = out[pos : pos + 8 * len(payload)]
    return bytes(out)


@_fuzz(150)
@given(name=st.sampled_from(GOLDEN), where=st.sampled_from(["file", "header"]), data=st.data())
def test_hypothesis_mutated_golden_vectors(name, where, data):
    """Edits of the whole file (CRCs left stale) or of the header alone (CRC and length recomputed,
    so the JSON parser and the validator see them): never anything but acceptance or one
    BfqFormatError; a file edit is always refused (every byte is checked)."""
    original = (VECTORS / name).read_bytes()
    if where == "file":
        mutated = _apply(original, data.draw(st.lists(byte_edits(len(original)), min_size=1, max_size=4)))
        result = bounded_outcome(mutated)
        assert result is not None or mutated == original
    else:
        raw, blocks = _split(original)
        mutated = _apply(raw, data.draw(st.lists(byte_edits(len(raw)), min_size=1, max_size=4)))
        bounded_outcome(_assemble(mutated, blocks))


def _strategy(schema: dict, depth: int = 0):
    """Values for the subset of JSON Schema that spec/header.schema.json uses (its if/then rules
    are left to the reader to enforce); small sizes, with the bounds themselves now and then."""
    if "$ref" in schema:
        return _strategy(SCHEMA["$defs"][schema["$ref"].split("/")[-1]], depth)
    for key in ("oneOf", "anyOf"):
        if key in schema:
            base = {k: v for k, v in schema.items() if k != key}
            return st.one_of([_strategy({**base, **branch}, depth) for branch in schema[key]])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind is None:  # any JSON (model.config values)
        return _any_json(depth)
    if isinstance(kind, list):
        return st.one_of([_strategy({**schema, "type": k}, depth) for k in kind])
    if kind == "integer":
        lo, hi = schema.get("minimum", -(2**63)), schema.get("maximum", 2**64)
        small = st.integers(lo, min(hi, lo + 9)) if lo > -(2**63) else st.integers(-3, 9)
        return st.one_of(small, small, small, st.sampled_from(sorted({lo, hi}))) if lo > -(2**63) else small
    if kind == "number":
        return st.one_of(st.integers(-3, 1000), st.floats(allow_nan=False, allow_infinity=False))
    if kind == "string":
        if "pattern" in schema:
            return st.from_regex(schema["pattern"], fullmatch=True)
        return st.text(min_size=schema.get("minLength", 0), max_size=12)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        items = _strategy(schema.get("items", {}), depth + 1)
        lo = schema.get("minItems", 0)
        return st.lists(items, min_size=lo, max_size=min(schema.get("maxItems", lo + 3), lo + 3))
    assert kind == "object", schema
    props = schema.get("properties", {})
    required = {k: _strategy(props[k], depth + 1) for k in schema.get("required", []) if k in props}
    optional = {k: _strategy(v, depth + 1) for k, v in props.items() if k not in required}
    extra = schema.get("additionalProperties", True)
    fixed = st.fixed_dictionaries(required, optional=optional)
    if extra is False or not isinstance(extra, dict) and depth > 2:
        return fixed
    free = st.dictionaries(st.text(max_size=6), _strategy(extra, depth + 1) if isinstance(extra, dict) else _any_json(depth + 1),
                           min_size=schema.get("minProperties", 0), max_size=3)
    return st.tuples(fixed, free).map(lambda pair: {**pair[1], **pair[0]})


def _any_json(depth: int):
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))
    if depth > 4:
        return scalars
    return st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                        max_leaves=6)


def _fit_layout(header: dict) -> bytes | None:
    """Give every block the offset, length and CRC its entry implies (zero bytes: finite scales,
    canonical all-zero code words), so that the header reaches the checks after the layout.
    None when an entry is too odd or too big to fit."""
    from bfq.format import pack
    from bfq.format.constants import DENSE_DTYPES, num_levels

    data = bytearray()

    def place(block: dict, length: int) -> None:
        data.extend(b"\0" * (-len(data) % 64))
        block.update(offset=len(data), length=length, crc32=zlib.crc32(bytes(length)))
        data.extend(bytes(length))

    try:
        for layer in header["layers"]:
            size = int(np.prod(layer["shape"], dtype=object))
            g, k = layer["packing"]["digits_per_word"], layer["packing"]["word_bits"]
            num_levels(layer["bits"], layer["levels"])
            if size > 1 << 16:
                return None
            place(layer["scales"], layer["shape"][0] * DENSE_DTYPES[layer["scales"]["dtype"]][0])
            place(layer["codes"], 8 * pack.stream_cells(size, g, k))
        cache = header.get("time_cache") or {}
        tables = list(cache.get("features", {}).values()) + ([cache["embedding"]] if "embedding" in cache else [])
        for entry in header["tensors"] + tables:
            size = int(np.prod(entry["shape"], dtype=object))
            if size > 1 << 16:
                return None
            place(entry, size * DENSE_DTYPES[entry["dtype"]][0])
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError, ZeroDivisionError):
        return None
    return bytes(data)


@_fuzz(150)
@given(header=_strategy(SCHEMA), fit=st.booleans())
def test_hypothesis_headers_from_the_schema(header, fit):
    """Headers generated from the JSON Schema, with their blocks made to fit or not: acceptance or
    one BfqFormatError; and whatever the reader accepts, the schema accepts (the schema expresses
    a subset of FORMAT.md's rules, never a rule the reader does not make)."""
    import jsonschema

    data = _fit_layout(header) if fit else None
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    result = bounded_outcome(_assemble(raw, data or b""))
    if result is None:
        jsonschema.Draft202012Validator(SCHEMA).validate(header)
