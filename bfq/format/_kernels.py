"""numba kernels for the radix-fraction-v1 code stream (FORMAT.md, "Code streams").

No validation happens here: callers go through bfq.format.pack, which checks every argument first.

A word packs g base-L digits d_0..d_{g-1} as the k-bit fixed-point fraction
    v = ceil(2^k * sum_i d_i * L^-(i+1)),
so decoding needs no division: d_i = (v * L) >> k, then v = (v * L) mod 2^k.
Words are concatenated LSB-first into a stream of little-endian uint64 cells.
"""

from __future__ import annotations

import os

import numba
import numpy as np
from numba import prange

# numba's default "omp" layer, once started, made every later torch CPU forward in the process
# 5-10x slower here (measured in bfq.pipeline.analyze); "workqueue" does not. Users can still choose.
if not os.environ.get("NUMBA_THREADING_LAYER"):
    numba.config.THREADING_LAYER = "workqueue"

_JIT = dict(nogil=True, cache=True)
_MASK32 = np.uint64(0xFFFFFFFF)

# Words per parallel chunk: a multiple of 64, so every chunk starts on a uint64 cell boundary.
CHUNK_WORDS = 64 * 64


@numba.njit(**_JIT)
def _read_word(stream, pos, k, mask):
    cell = pos >> 6
    shift = pos & 63
    v = stream[cell] >> np.uint64(shift)
    if shift + k > 64:
        v |= stream[cell + 1] << np.uint64(64 - shift)
    return v & mask


@numba.njit(**_JIT)
def _times_level(v, L, k, mask, wide):
    """(v * L) >> k and (v * L) mod 2^k, exact for v < 2^k <= 2^64 and L < 2^24."""
    if not wide:
        x = v * L
        return x >> np.uint64(k), x & mask
    # 96-bit product through 32-bit halves; only reached for k > 32.
    lo = (v & _MASK32) * L
    hi = (v >> np.uint64(32)) * L + (lo >> np.uint64(32))
    low32 = lo & _MASK32
    hk = np.uint64(k - 32)
    digit = hi >> hk
    rest_hi = hi & ((np.uint64(1) << hk) - np.uint64(1))
    return digit, ((rest_hi << np.uint64(32)) | low32) & mask


@numba.njit(**_JIT)
def _mask_for(k):
    if k == 64:
        return np.uint64(0xFFFFFFFFFFFFFFFF)
    return (np.uint64(1) << np.uint64(k)) - np.uint64(1)


@numba.njit(parallel=True, **_JIT)
def pack_stream(digits, L, g, k, stream):
    """Pack digits (uint8/uint16, each < L) into `stream` (zeroed uint64 cells)."""
    n = digits.shape[0]
    n_words = (n + g - 1) // g
    n_chunks = (n_words + CHUNK_WORDS - 1) // CHUNK_WORDS
    Lu = np.uint64(L)
    for c in prange(n_chunks):
        w0 = c * CHUNK_WORDS
        w1 = min(w0 + CHUNK_WORDS, n_words)
        for w in range(w0, w1):
            v = np.uint64(0)
            for i in range(g - 1, -1, -1):
                j = w * g + i
                d = np.uint64(digits[j]) if j < n else np.uint64(0)
                # v = ceil((d * 2^k + v) / L), exact in 64 bits on the fast path (k < 64)
                x = (d << np.uint64(k)) + v
                q = x // Lu
                if q * Lu != x:
                    q += np.uint64(1)
                v = q
            pos = w * k
            cell = pos >> 6
            shift = pos & 63
            stream[cell] |= v << np.uint64(shift)
            if shift + k > 64:
                stream[cell + 1] |= v >> np.uint64(64 - shift)


@numba.njit(parallel=True, **_JIT)
def unpack_digits(stream, n, L, g, k, wide, out):
    """Decode n digits into `out` (any integer array), subtracting nothing."""
    n_words = (n + g - 1) // g
    n_chunks = (n_words + CHUNK_WORDS - 1) // CHUNK_WORDS
    mask = _mask_for(k)
    Lu = np.uint64(L)
    for c in prange(n_chunks):
        w0 = c * CHUNK_WORDS
        w1 = min(w0 + CHUNK_WORDS, n_words)
        for w in range(w0, w1):
            v = _read_word(stream, w * k, k, mask)
            base = w * g
            m = min(g, n - base)
            for i in range(m):
                d, v = _times_level(v, Lu, k, mask, wide)
                out[base + i] = d


@numba.njit(**_JIT)
def _lookup_words(stream, n, L, g, k, wide, lut, per_channel, out, w, w1):
    """out[i] = lut[i // per_channel, digit_i] for the digits of words [w, w1).

    Four words whose digits all fall in one channel are decoded together, so their multiply
    chains overlap; indices in that loop are unsigned, which spares numba's wraparound code.
    """
    mask = _mask_for(k)
    Lu = np.uint64(L)
    ku = np.uint64(k)
    gu = np.uint64(g)
    while w < w1:
        pos = w * g
        ch = pos // per_channel
        left = (ch + 1) * per_channel - pos
        if not wide and w + 4 <= w1 and left >= 4 * g and (w + 4) * g <= n:
            row = lut[ch]
            v0 = _read_word(stream, w * k, k, mask)
            v1 = _read_word(stream, (w + 1) * k, k, mask)
            v2 = _read_word(stream, (w + 2) * k, k, mask)
            v3 = _read_word(stream, (w + 3) * k, k, mask)
            b = np.uint64(pos)
            for i in range(gu):
                x0 = v0 * Lu
                x1 = v1 * Lu
                x2 = v2 * Lu
                x3 = v3 * Lu
                out[b + i] = row[x0 >> ku]
                out[b + gu + i] = row[x1 >> ku]
                out[b + np.uint64(2) * gu + i] = row[x2 >> ku]
                out[b + np.uint64(3) * gu + i] = row[x3 >> ku]
                v0 = x0 & mask
                v1 = x1 & mask
                v2 = x2 & mask
                v3 = x3 & mask
            w += 4
        else:
            v = _read_word(stream, w * k, k, mask)
            for i in range(min(g, n - pos)):
                d, v = _times_level(v, Lu, k, mask, wide)
                out[pos + i] = lut[(pos + i) // per_channel, d]
            w += 1


@numba.njit(parallel=True, **_JIT)
def unpack_lookup(stream, n, L, g, k, wide, lut, per_channel, out):
    """Fused decode + dequantize: out[i] = lut[i // per_channel, digit_i], in parallel chunks.

    `lut` holds, per output channel, the L output values already in the target format
    (float32, or the uint16 bit patterns of fp16/bf16), so one kernel serves every dtype.
    """
    n_words = (n + g - 1) // g
    n_chunks = (n_words + CHUNK_WORDS - 1) // CHUNK_WORDS
    for c in prange(n_chunks):
        _lookup_words(stream, n, L, g, k, wide, lut, per_channel, out, c * CHUNK_WORDS, min((c + 1) * CHUNK_WORDS, n_words))


@numba.njit(**_JIT)
def unpack_lookup_serial(stream, n, L, g, k, wide, lut, per_channel, out):
    """unpack_lookup on the calling thread (for callers that run several layers at once)."""
    _lookup_words(stream, n, L, g, k, wide, lut, per_channel, out, 0, (n + g - 1) // g)


@numba.njit(parallel=True, **_JIT)
def count_noncanonical_words(stream, n, L, g, k, wide, levels_pow_g):
    """Words that are not the canonical ceil(W * 2^k / L^g) (their last residual is >= L^g, so the
    word minus one decodes to the same digits), plus a last word whose unused digits are not zero.
    `levels_pow_g` is L^g, or 0 when L^g = 2^64 (every residual is then canonical)."""
    n_words = (n + g - 1) // g
    n_chunks = (n_words + CHUNK_WORDS - 1) // CHUNK_WORDS
    mask = _mask_for(k)
    Lu = np.uint64(L)
    bad = np.zeros(n_chunks, dtype=np.int64)
    for c in prange(n_chunks):
        for w in range(c * CHUNK_WORDS, min((c + 1) * CHUNK_WORDS, n_words)):
            v = _read_word(stream, w * k, k, mask)
            used = min(g, n - w * g)
            for i in range(g):
                d, v = _times_level(v, Lu, k, mask, wide)
                if i >= used and d != 0:
                    bad[c] += 1
            if levels_pow_g != 0 and v >= levels_pow_g:
                bad[c] += 1
    return bad.sum()


@numba.njit(**_JIT)
def count_nonzero_padding(stream, n, g, k):
    """Number of set bits after the last word (must be zero in a valid stream)."""
    n_words = (n + g - 1) // g
    used = n_words * k
    total = stream.shape[0] * 64
    bad = 0
    for pos in range(used, total):
        if (stream[pos >> 6] >> np.uint64(pos & 63)) & np.uint64(1):
            bad += 1
    return bad
