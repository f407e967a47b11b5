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
def _read_word_unsigned(stream, pos, ku, mask):
    """_read_word with every argument uint64 (mixing uint64 and int64 makes numba use float64)."""
    cell = pos >> np.uint64(6)
    shift = pos & np.uint64(63)
    v = stream[cell] >> shift
    if shift + ku > np.uint64(64):
        v |= stream[cell + np.uint64(1)] << (np.uint64(64) - shift)
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
def _fill_pairs(row, L, pairs):
    """pairs[2(a·L+b)], pairs[2(a·L+b)+1] = row[a], row[b]: the outputs of the digit pair (a, b)."""
    for a in range(L):
        for b in range(L):
            j = 2 * (a * L + b)
            pairs[j] = row[a]
            pairs[j + 1] = row[b]


@numba.njit(**_JIT)
def _decode_words(stream, L, g, k, wide, use_pairs, lut, lut_ch0, per_channel, e0, e1, out, w, w1, pairs):
    """out[e - e0] = lut[e // per_channel - lut_ch0, digit_e] for the elements e in [e0, e1) of
    words [w, w1).

    Fast path (whole groups of four words inside one channel and inside [e0, e1)): two digits per
    multiply, x = v·L², whose top bits are the pair index a·L + b, looked up in a per-channel table
    of output pairs; four words advance together so their multiply chains overlap. Index math is
    unsigned, which spares numba's wraparound checks. Other words decode one digit at a time.
    """
    mask = _mask_for(k)
    one, two, four = np.uint64(1), np.uint64(2), np.uint64(4)
    Lu, ku, gu = np.uint64(L), np.uint64(k), np.uint64(g)
    L2 = Lu * Lu
    per = np.uint64(per_channel)
    ch0 = np.uint64(lut_ch0)
    e0u, e1u, wu, w1u = np.uint64(e0), np.uint64(e1), np.uint64(w), np.uint64(w1)
    n_pairs = gu // two
    loaded = np.uint64(0xFFFFFFFFFFFFFFFF)
    while wu < w1u:
        base = wu * gu
        ch = base // per
        end = base + four * gu
        if use_pairs and wu + four <= w1u and base >= e0u and end <= e1u and end <= (ch + one) * per:
            if ch != loaded:
                _fill_pairs(lut[ch - ch0], L, pairs)
                loaded = ch
            v0 = _read_word_unsigned(stream, wu * ku, ku, mask)
            v1 = _read_word_unsigned(stream, (wu + one) * ku, ku, mask)
            v2 = _read_word_unsigned(stream, (wu + two) * ku, ku, mask)
            v3 = _read_word_unsigned(stream, (wu + np.uint64(3)) * ku, ku, mask)
            o0 = base - e0u
            o1 = o0 + gu
            o2 = o1 + gu
            o3 = o2 + gu
            for p in range(n_pairs):
                i = two * np.uint64(p)
                x0 = v0 * L2
                x1 = v1 * L2
                x2 = v2 * L2
                x3 = v3 * L2
                d0 = two * (x0 >> ku)
                d1 = two * (x1 >> ku)
                d2 = two * (x2 >> ku)
                d3 = two * (x3 >> ku)
                v0 = x0 & mask
                v1 = x1 & mask
                v2 = x2 & mask
                v3 = x3 & mask
                out[o0 + i] = pairs[d0]
                out[o0 + i + one] = pairs[d0 + one]
                out[o1 + i] = pairs[d1]
                out[o1 + i + one] = pairs[d1 + one]
                out[o2 + i] = pairs[d2]
                out[o2 + i + one] = pairs[d2 + one]
                out[o3 + i] = pairs[d3]
                out[o3 + i + one] = pairs[d3 + one]
            if gu > two * n_pairs:  # odd g: the last digit alone
                row = lut[ch - ch0]
                i = gu - one
                out[o0 + i] = row[(v0 * Lu) >> ku]
                out[o1 + i] = row[(v1 * Lu) >> ku]
                out[o2 + i] = row[(v2 * Lu) >> ku]
                out[o3 + i] = row[(v3 * Lu) >> ku]
            wu += four
        elif base >= e0u and base + gu <= e1u and base + gu <= (ch + one) * per:  # one digit per multiply
            v = _read_word_unsigned(stream, wu * ku, ku, mask)
            row = lut[ch - ch0]
            o = base - e0u
            for i in range(g):
                d, v = _times_level(v, Lu, k, mask, wide)
                out[o + np.uint64(i)] = row[d]
            wu += one
        else:  # a word across a channel boundary or an end of the range
            v = _read_word_unsigned(stream, wu * ku, ku, mask)
            for i in range(g):
                d, v = _times_level(v, Lu, k, mask, wide)
                e = base + np.uint64(i)
                if e >= e0u and e < e1u:
                    out[e - e0u] = lut[e // per - ch0, d]
            wu += one


@numba.njit(parallel=True, **_JIT)
def decode_range(stream, L, g, k, wide, use_pairs, lut, lut_ch0, per_channel, e0, e1, out):
    """Fused decode + dequantize of elements [e0, e1) of a layer into out[0 : e1 - e0], in parallel
    chunks of words: out[e - e0] = lut[e // per_channel - lut_ch0, digit_e].

    `lut` holds, per output channel from `lut_ch0` on, the L output values already in the target
    format (float32, or the uint16 bit patterns of fp16/bf16), so one kernel serves every dtype.
    `use_pairs` requires (2^k − 1)·L² < 2^64 (two digits per 64-bit multiply).
    """
    w_first = e0 // g
    w_last = (e1 + g - 1) // g
    n_chunks = (w_last - w_first + CHUNK_WORDS - 1) // CHUNK_WORDS
    for c in prange(n_chunks):
        pairs = np.empty(2 * L * L, dtype=lut.dtype)
        w = w_first + c * CHUNK_WORDS
        _decode_words(stream, L, g, k, wide, use_pairs, lut, lut_ch0, per_channel, e0, e1, out, w,
                      min(w + CHUNK_WORDS, w_last), pairs)  # fmt: skip


@numba.njit(**_JIT)
def decode_range_serial(stream, L, g, k, wide, use_pairs, lut, lut_ch0, per_channel, e0, e1, out):
    """decode_range on the calling thread (for callers that run several layers at once)."""
    pairs = np.empty(2 * L * L, dtype=lut.dtype)
    _decode_words(stream, L, g, k, wide, use_pairs, lut, lut_ch0, per_channel, e0, e1, out, e0 // g,
                  (e1 + g - 1) // g, pairs)  # fmt: skip


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
