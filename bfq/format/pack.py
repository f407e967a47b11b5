"""Pack and unpack integer codes as radix-fraction-v1 code streams (FORMAT.md, "Code streams").

Public wrappers check their arguments and call the numba kernels in bfq.format._kernels.
Codes are the signed levels q; the stream stores digits d = q + 2^(n-1).
"""

from __future__ import annotations

import numpy as np

from bfq.format import _kernels
from bfq.format.constants import (
    choose_packing,
    fits_fast_path,
    is_legal_packing,
    level_offset,
    num_levels,
)

OUTPUT_DTYPES = ("float32", "float16", "bfloat16")


def stream_cells(n: int, digits_per_word: int, word_bits: int) -> int:
    """Number of uint64 cells of a stream holding n digits."""
    n_words = -(-n // digits_per_word)
    return -(-(n_words * word_bits) // 64)


def _check_packing(levels_count: int, g: int, k: int) -> None:
    if not is_legal_packing(levels_count, g, k):
        raise ValueError(f"illegal packing: L={levels_count}, digits_per_word={g}, word_bits={k}")


def pack_codes(q: np.ndarray, bits: int, levels: str = "balanced", packing=None) -> tuple[np.ndarray, int, int]:
    """Pack signed codes q into a stream. Returns (uint64 cells, digits_per_word, word_bits)."""
    levels_count = num_levels(bits, levels)
    g, k = packing if packing is not None else choose_packing(levels_count)
    _check_packing(levels_count, g, k)
    if not fits_fast_path(levels_count, k):
        raise ValueError(f"the writer only packs fast-path words; L={levels_count}, word_bits={k} is not")
    q = np.ascontiguousarray(q).reshape(-1)
    if q.dtype.kind not in "iu":
        raise TypeError(f"codes must be integers, got {q.dtype}")
    offset = level_offset(bits)
    lo, hi = -offset, levels_count - 1 - offset
    if q.size and (int(q.min()) < lo or int(q.max()) > hi):
        raise ValueError(f"codes outside [{lo}, {hi}] for {bits}-bit {levels} levels")
    digits = (q.astype(np.int32) + offset).astype(np.uint16)
    stream = np.zeros(stream_cells(q.size, g, k), dtype=np.uint64)
    _kernels.pack_stream(digits, levels_count, g, k, stream)
    return stream, g, k


def _check_stream(stream: np.ndarray, n: int, levels_count: int, g: int, k: int) -> None:
    _check_packing(levels_count, g, k)
    if stream.dtype != np.uint64 or stream.ndim != 1:
        raise TypeError("stream must be a 1-D uint64 array")
    need = stream_cells(n, g, k)
    if stream.shape[0] != need:
        raise ValueError(f"stream has {stream.shape[0]} cells, {need} expected for {n} digits")


def unpack_codes(stream: np.ndarray, n: int, bits: int, levels: str, g: int, k: int) -> np.ndarray:
    """Decode n signed codes (int16) from a stream."""
    levels_count = num_levels(bits, levels)
    _check_stream(stream, n, levels_count, g, k)
    out = np.empty(n, dtype=np.int16)
    _kernels.unpack_digits(stream, n, levels_count, g, k, not fits_fast_path(levels_count, k), out)
    out -= np.int16(level_offset(bits))
    return out


def noncanonical_words(stream: np.ndarray, n: int, bits: int, levels: str, g: int, k: int) -> int:
    """Words a writer following FORMAT.md §4 would not have written (0 in a valid stream)."""
    levels_count = num_levels(bits, levels)
    _check_stream(stream, n, levels_count, g, k)
    power = levels_count**g
    return int(_kernels.count_noncanonical_words(stream, n, levels_count, g, k, not fits_fast_path(levels_count, k), np.uint64(0 if power >= 1 << 64 else power)))


def padding_bits_set(stream: np.ndarray, n: int, g: int, k: int) -> int:
    """Set bits after the last word of a stream; a valid stream has none."""
    return int(_kernels.count_nonzero_padding(stream, n, g, k))


def last_word_unused_digits_set(stream: np.ndarray, n: int, levels_count: int, g: int, k: int) -> bool:
    """True when the last word's digits after the n-th are not all zero (FORMAT.md §4: the last
    word is completed with zero digits). Reads one word, exact integer arithmetic."""
    n_words = -(-n // g)
    used = n - (n_words - 1) * g
    if used == g:
        return False
    start = (n_words - 1) * k
    first, last = start // 64, (start + k - 1) // 64
    cells = int.from_bytes(np.ascontiguousarray(stream[first : last + 1]).astype("<u8").tobytes(), "little")
    v = (cells >> (start - 64 * first)) & ((1 << k) - 1)
    for i in range(g):
        x = v * levels_count
        digit, v = x >> k, x & ((1 << k) - 1)
        if i >= used and digit:
            return True
    return False


def _f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, round to nearest even (what torch does for finite values)."""
    u = x.astype(np.float32).view(np.uint32)
    rounded = u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def dequant_table(scales: np.ndarray, bits: int, levels: str, dtype: str) -> np.ndarray:
    """Per-channel table of the L output values: float32(scale) * float32(q), cast to `dtype`.

    fp16/bf16 tables hold uint16 bit patterns. This product, in float32 then cast, is the
    definition of a dequantized weight (FORMAT.md, "Dequantization").
    """
    levels_count = num_levels(bits, levels)
    q = np.arange(levels_count, dtype=np.float32) - np.float32(level_offset(bits))
    with np.errstate(over="ignore"):  # a huge f32 scale times q may overflow to inf, as defined
        values = scales.astype(np.float32)[:, None] * q[None, :]
    if dtype == "float32":
        return np.ascontiguousarray(values)
    if dtype == "float16":
        with np.errstate(over="ignore"):
            return np.ascontiguousarray(values.astype(np.float16).view(np.uint16))
    if dtype == "bfloat16":
        return np.ascontiguousarray(_f32_to_bf16_bits(values))
    raise ValueError(f"unknown output dtype {dtype!r}; expected one of {OUTPUT_DTYPES}")


def uses_pair_path(levels_count: int, word_bits: int) -> bool:
    """Whether two digits fit one 64-bit multiply, (2^k − 1)·L² < 2^64 (the decoder's fast path)."""
    return ((1 << word_bits) - 1) * levels_count * levels_count < (1 << 64)


def unpack_dequantize(
    stream: np.ndarray,
    shape: tuple[int, ...],
    scales: np.ndarray,
    bits: int,
    levels: str,
    g: int,
    k: int,
    dtype: str = "float16",
    out: np.ndarray | None = None,
    parallel: bool = True,
    channels: tuple[int, int] | None = None,
) -> np.ndarray:
    """Decode and dequantize a layer straight into `dtype` (uint16 bit patterns for fp16/bf16).

    `channels=(c0, c1)` decodes only output channels c0..c1-1 (what a runtime computing a layer in
    blocks of output channels needs); the result then holds (c1 − c0)·prod(shape[1:]) values.
    `out`, when given, must be a C-contiguous array of that size with itemsize 4 (float32) or 2
    (fp16/bf16 viewed as uint16 or float16); it is filled in place and returned. `parallel=False`
    decodes on the calling thread (the GIL is released), for callers that decode several layers
    from a thread pool.
    """
    n = int(np.prod(shape))
    n_channels = shape[0]
    levels_count = num_levels(bits, levels)
    _check_stream(stream, n, levels_count, g, k)
    if scales.shape != (n_channels,):
        raise ValueError(f"scales shape {scales.shape} does not match {n_channels} output channels")
    c0, c1 = channels if channels is not None else (0, n_channels)
    if not 0 <= c0 < c1 <= n_channels:
        raise ValueError(f"channels ({c0}, {c1}) outside 0..{n_channels}")
    per_channel = n // n_channels
    count = (c1 - c0) * per_channel
    lut = dequant_table(scales[c0:c1], bits, levels, dtype)
    if out is None:
        out = np.empty(count, dtype=lut.dtype)
    if out.size != count or out.dtype.itemsize != lut.dtype.itemsize or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous array of {count} {dtype} values")
    flat = out.reshape(-1).view(lut.dtype)
    kernel = _kernels.decode_range if parallel else _kernels.decode_range_serial
    kernel(stream, levels_count, g, k, not fits_fast_path(levels_count, k), uses_pair_path(levels_count, k), lut, c0,
           per_channel, c0 * per_channel, c1 * per_channel, flat)  # fmt: skip
    return out
