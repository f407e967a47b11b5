"""A slow, obviously correct reference of radix-fraction-v1 (FORMAT.md section 4), in pure Python.

Exact integers and fractions only: no numpy, no numba, no bfq import. Streams are lists of
Python ints, one per little-endian u64 cell; codes are the signed levels q.
"""

from __future__ import annotations

import math
from fractions import Fraction

M64 = (1 << 64) - 1


def num_levels(bits: int, levels: str) -> int:
    """L = 2^n + 1 levels (balanced) or 2^n (plain)."""
    assert levels in ("balanced", "plain")
    return 2**bits + (1 if levels == "balanced" else 0)


def level_offset(bits: int) -> int:
    """d = q + 2^(n-1) for both level sets."""
    return 2 ** (bits - 1)


def code_range(bits: int, levels: str) -> tuple[int, int]:
    lo = -level_offset(bits)
    return lo, lo + num_levels(bits, levels) - 1


def is_legal(L: int, g: int, k: int) -> bool:
    return 2 <= L <= 257 and 1 <= g <= 64 and 1 <= k <= 64 and L**g <= 2**k


def min_word_bits(L: int, g: int) -> int:
    """The smallest k with L^g <= 2^k."""
    k = 0
    while 2**k < L**g:
        k += 1
    return k


def is_wide(L: int, k: int) -> bool:
    """Decoding needs products wider than 64 bits: (2^k - 1) * L >= 2^64."""
    return (2**k - 1) * L >= 2**64


def legal_packings(L: int):
    """Every legal (g, k) for L levels."""
    for g in range(1, 65):
        for k in range(min_word_bits(L, g), 65):
            yield g, k


def encode_word(digits: list[int], L: int, k: int) -> int:
    """v = ceil(2^k * 0.d_0 d_1 ... d_{g-1} in base L)."""
    W = 0
    for d in digits:  # W = sum_i d_i * L^(g-1-i): the digits as a base-L integer
        assert 0 <= d < L
        W = W * L + d
    v = math.ceil(Fraction(W, L ** len(digits)) * 2**k)
    assert 0 <= v < 2**k
    return v


def decode_word(v: int, L: int, g: int, k: int) -> list[int]:
    """for i in 0..g-1: x = v * L; d_i = x >> k; v = x mod 2^k."""
    digits = []
    for _ in range(g):
        x = v * L
        digits.append(x >> k)
        v = x % 2**k
    return digits


def n_cells(n: int, g: int, k: int) -> int:
    return math.ceil(math.ceil(n / g) * k / 64)


def pack(q: list[int], bits: int, levels: str, g: int, k: int) -> list[int]:
    """Signed codes -> stream cells."""
    L = num_levels(bits, levels)
    assert is_legal(L, g, k)
    lo, hi = code_range(bits, levels)
    digits = []
    for x in q:
        assert lo <= x <= hi
        digits.append(x - lo)
    cells, acc, nbits = [], 0, 0
    for start in range(0, len(digits), g):
        word = digits[start : start + g]
        word += [0] * (g - len(word))  # the last word is completed with zero digits
        acc |= encode_word(word, L, k) << nbits  # word j occupies bits [j*k, (j+1)*k), LSB first
        nbits += k
        while nbits >= 64:
            cells.append(acc & M64)
            acc >>= 64
            nbits -= 64
    if nbits:
        cells.append(acc)
    assert len(cells) == n_cells(len(q), g, k)
    return cells


def words(cells: list[int], n: int, g: int, k: int) -> list[int]:
    """The k-bit words of a stream holding n digits."""
    out, acc, nbits, it = [], 0, 0, iter(cells)
    for _ in range(math.ceil(n / g)):
        while nbits < k:
            acc |= next(it) << nbits
            nbits += 64
        out.append(acc & (2**k - 1))
        acc >>= k
        nbits -= k
    return out


def unpack(cells: list[int], n: int, bits: int, levels: str, g: int, k: int) -> list[int]:
    """Stream cells -> n signed codes."""
    L = num_levels(bits, levels)
    assert is_legal(L, g, k) and len(cells) == n_cells(n, g, k)
    digits = []
    for v in words(cells, n, g, k):
        digits += decode_word(v, L, g, k)
    return [d - level_offset(bits) for d in digits[:n]]


def padding_bits(cells: list[int], n: int, g: int, k: int) -> int:
    """Number of set bits after the last word."""
    used = math.ceil(n / g) * k
    return sum((cells[b // 64] >> (b % 64)) & 1 for b in range(used, 64 * len(cells)))
