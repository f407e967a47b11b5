"""Write .bfq files: `BfqWriter` streams blocks to a temporary file as they are added and renames
the finished file into place, so an interrupted write never touches an existing file. The file gets
the permissions the umask gives (``0o666 & ~umask``); an OS error (read-only file system, full disk,
a file where a folder should be) is a one-line `bfq.errors.OutputError` naming the path."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bfq._io import make_parents, new_file_mode, output_error
from bfq.format import pack
from bfq.format.constants import (
    DENSE_DTYPES,
    LEVEL_SETS,
    MAGIC,
    MAX_BITS,
    MAX_HEADER_BYTES,
    MIN_BITS,
    PACKING_SCHEME,
    PREAMBLE_SIZE,
    SCALE_DTYPES,
    VERSION,
)
from bfq.format.header import (
    _PREAMBLE,
    _crc32,
    align_up,
    check_layout,
    parse_header,
    validate_header,
)


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
        make_parents(self.path)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".data", dir=self.path.parent)
        except OSError as e:
            raise output_error(self.path, e) from None
        self._data = os.fdopen(fd, "w+b")
        self._data_path = Path(tmp)
        self._end = 0
        self._closed = False

    def _write_block(self, buf) -> dict:
        view = memoryview(buf).cast("B")
        if len(view) == 0:
            raise ValueError("empty blocks are not allowed")
        pad = align_up(self._end) - self._end
        offset = self._end + pad
        try:
            self._data.write(b"\0" * pad)
            self._data.write(view)
        except OSError as e:
            raise output_error(self.path, e) from None
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
        """scheduler mode: tables = {resnet name: [T, D]} or, for models whose time features depend on
        more than the timestep, {"time_embedding": [T, D]} (FORMAT.md §2.3.1); grid mode: {"time_embedding": [T, D]}."""
        if "time_cache" in self._header:
            raise ValueError("the time cache was already set")
        if mode not in ("scheduler", "grid"):
            raise ValueError(f"time cache mode must be 'scheduler' or 'grid', got {mode!r}")
        if mode == "grid" and set(tables) != {"time_embedding"}:
            raise ValueError(f"grid mode takes exactly one table, 'time_embedding'; got {sorted(tables)}")
        steps = [float(t) for t in timesteps]
        stored = {name: self._dense_entry(table, dtype) for name, table in tables.items()}
        if mode == "scheduler" and set(tables) != {"time_embedding"}:
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
            try:
                self._write_file(raw)
            except OSError as e:
                raise output_error(self.path, e) from None
        finally:
            self._discard()
        return self.path

    def _write_file(self, raw: bytes) -> None:
        """Preamble, header and data into a temporary file beside `path`, renamed over it."""
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            os.fchmod(fd, new_file_mode())
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

    def abort(self) -> None:
        """Drop everything written so far; `path` is left as it was."""
        self._discard()

    def _discard(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self._data.close()
            except OSError:  # flushing data that is thrown away failed (a full disk): nothing to keep
                pass
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
