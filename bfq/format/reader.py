"""Read .bfq files: `open_bfq` memory-maps a file, validates its whole header and layout up front
(bfq.format.header), and decodes tensors lazily (FORMAT.md is normative)."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np

from bfq.errors import BfqFormatError
from bfq.format import pack
from bfq.format.constants import (
    DENSE_DTYPES,
    MAGIC,
    MAX_HEADER_BYTES,
    PREAMBLE_SIZE,
    VERSION,
)
from bfq.format.header import (
    _PREAMBLE,
    Block,
    Dense,
    Header,
    Layer,
    _crc32,
    align_up,
    check_layout,
    parse_header,
    validate_header,
)


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
        with memoryview(self._mmap) as whole, whole[PREAMBLE_SIZE : PREAMBLE_SIZE + header_len] as raw:  # not copied
            if _crc32(raw) != header_crc:
                raise BfqFormatError(f"header_crc32: stored {header_crc:#010x}, computed {_crc32(raw):#010x}")
            header = validate_header(parse_header(raw))
        self.header_length = header_len
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

    @classmethod
    def from_bytes(cls, data: bytes | bytearray, name: str, *, verify: bool = True) -> BfqFile:
        """A .bfq held in memory (``name`` is for messages): what the diffusers layout rebuilds."""
        self = cls.__new__(cls)
        self.path, self.verify, self.file_bytes = Path(name), verify, len(data)
        if self.file_bytes < PREAMBLE_SIZE:
            raise BfqFormatError(f"file: {self.file_bytes} bytes is shorter than the {PREAMBLE_SIZE}-byte preamble")
        self._mmap = data
        self.header = self._read_header()
        return self

    def _check_padding(self, start: int, stop: int, what: str) -> None:
        if any(self._mmap[start:stop]):
            raise BfqFormatError(f"{what}: bytes {start}..{stop} must be zero")

    def close(self) -> None:
        if getattr(self, "_mmap", None) is not None:
            try:
                if isinstance(self._mmap, mmap.mmap):
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
        """A layer's scales, CRC-checked and finite (FORMAT.md §3.1: checked before use, always)."""
        layer = self.layers[name]
        scales = self._array(layer.scales, DENSE_DTYPES[layer.scale_dtype][1], layer.shape[0], check=True)
        if not np.isfinite(scales).all():
            bad = int(np.flatnonzero(~np.isfinite(scales))[0])
            raise BfqFormatError(f"{layer.scales.path}: scale of channel {bad} is {scales[bad]} (must be finite)")
        return scales

    def read_stream(self, name: str) -> np.ndarray:
        """A layer's code stream (uint64 cells), its end checked: zero bits after the last word and
        zero digits completing it. Its CRC-32 is checked here when `verify` (else by verify_all())."""
        layer = self.layers[name]
        stream = self._array(layer.codes, "<u8", layer.codes.length // 8)
        if pack.padding_bits_set(stream, layer.size, layer.digits_per_word, layer.word_bits):
            raise BfqFormatError(f"{layer.codes.path}: bits after the last word must be zero")
        if pack.last_word_unused_digits_set(stream, layer.size, layer.num_levels, layer.digits_per_word, layer.word_bits):
            raise BfqFormatError(f"{layer.codes.path}: the last word must be completed with zero digits")
        return stream

    def read_codes(self, name: str) -> np.ndarray:
        """The integer levels q of a layer, int16, in its logical shape."""
        layer = self.layers[name]
        stream = self.read_stream(name)
        codes = pack.unpack_codes(stream, layer.size, layer.bits, layer.levels, layer.digits_per_word, layer.word_bits)
        return codes.reshape(layer.shape)

    def decode_layer(self, name: str, dtype: str = "float16", out: np.ndarray | None = None, parallel: bool = True) -> np.ndarray:
        """Dequantized weight of a layer: float32, or fp16/bf16 as uint16 bit patterns (see pack).
        Thread-safe; `parallel=False` decodes on the calling thread."""
        layer = self.layers[name]
        scales = self.read_scales(name)
        stream = self.read_stream(name)
        result = pack.unpack_dequantize(
            stream, layer.shape, scales, layer.bits, layer.levels, layer.digits_per_word, layer.word_bits, dtype, out, parallel
        )
        return result.reshape(layer.shape) if out is None else result

    def read_tensor(self, name: str) -> np.ndarray:
        """A dense tensor: float32/float16 arrays, bf16 as uint16 bit patterns (read-only view)."""
        tensor = self.tensors[name]
        return self._dense(tensor)

    def _dense(self, tensor: Dense) -> np.ndarray:
        return self._array(tensor.block, DENSE_DTYPES[tensor.dtype][1], tensor.size, check=True).reshape(tensor.shape)

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
        """Every check of FORMAT.md, the deferrable ones of §3.1 included: every block's CRC-32,
        every scale, every stream's end and the canonical form of every word; decodes every layer."""
        for block in self.header.blocks():
            self._bytes(block, check=True)
        for name, layer in self.layers.items():
            self.decode_layer(name, "float32")
            bad = pack.noncanonical_words(self.read_stream(name), layer.size, layer.bits, layer.levels, layer.digits_per_word, layer.word_bits)
            if bad:
                raise BfqFormatError(f"{layer.codes.path}: {bad} word(s) not canonically encoded (FORMAT.md §4)")


def open_bfq(path: str | os.PathLike, *, verify: bool = True) -> BfqFile:
    """Open and validate a .bfq file: everything FORMAT.md §3.1 requires before use is checked at
    open (structure) or when a block is read (its CRC-32, finite scales, the end of a code stream).
    `verify=False` defers what §3.1 lets a reader defer, the code blocks' CRC-32, to verify_all()."""
    return BfqFile(path, verify=verify)


