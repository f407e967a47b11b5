"""The JSON rules of the .bfq header (FORMAT.md §2, "JSON", and §5): RFC 8259 text that starts with
`{` and ends with `}`, at most 32 levels of nesting and 2^19 values, no duplicate keys (compared
after unescaping), no number that rounds to an infinite binary64 (integer literals included), no
unpaired surrogate.

`parse_header` is the only entry point; every violation raises `BfqFormatError`. Time and memory
are linear in the header length (FORMAT.md §5): a vectorized pre-scan, in fixed-size chunks,
checks the nesting and counts the values before `json.loads` builds a single Python object, so
the objects built are at most MAX_JSON_VALUES whatever the header holds.
"""

from __future__ import annotations

import functools
import json
import math
import re

from bfq._io import display
from bfq.errors import BfqFormatError
from bfq.format.constants import MAX_JSON_DEPTH, MAX_JSON_VALUES

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")
# A JSON integer (no leading zeros) of more digits than this is >= 10^309 > the largest binary64.
_MAX_FINITE_DIGITS = 309
_CHUNK = 1 << 16  # bytes per pre-scan step: its temporaries are ~20x this (1.3 MiB), whatever N is
_BACKSLASH, _QUOTE, _COMMA = 0x5C, 0x22, 0x2C
_OPEN, _CLOSE = (0x5B, 0x7B), (0x5D, 0x7D)  # [ {   ] }
_SPACE = (0x20, 0x09, 0x0A, 0x0D)


class _Scan:
    """The pre-scan's state between chunks: inside a string, the parity of the backslash run the
    last chunk ended with, the nesting depth, whether the last non-blank byte opened a container,
    and the count of values so far (1 + commas + containers opened - containers closed empty:
    every value but the top-level one is an element or a member, and a container of n of them
    holds n - 1 commas)."""

    def __init__(self):
        self.in_string = False
        self.odd_backslashes = False
        self.depth = 0
        self.last_opened = False
        self.values = 1

    def feed(self, a) -> None:
        import numpy as np

        quote = a == _QUOTE
        backslash = a == _BACKSLASH
        if self.odd_backslashes or backslash.any():
            self._unescape(quote, backslash)
        if not quote.any() and self.in_string:
            return  # all inside one string
        if quote.any():
            parity = np.cumsum(quote, dtype=np.int32)
            outside = (parity & 1) == (1 if self.in_string else 0)
            self.in_string = not outside[-1]
        else:
            outside = np.ones(len(a), dtype=bool)
        opens = ((a == _OPEN[0]) | (a == _OPEN[1])) & outside
        closes = ((a == _CLOSE[0]) | (a == _CLOSE[1])) & outside
        self.values += int(np.count_nonzero((a == _COMMA) & outside)) + int(np.count_nonzero(opens))
        if opens.any() or closes.any():
            steps = np.cumsum(opens.astype(np.int8) - closes.astype(np.int8), dtype=np.int32)
            if self.depth + int(steps.max()) > MAX_JSON_DEPTH:
                raise BfqFormatError(f"header: JSON nesting deeper than {MAX_JSON_DEPTH}")
            self.depth += int(steps[-1])
            blank = (a == _SPACE[0]) | (a == _SPACE[1]) | (a == _SPACE[2]) | (a == _SPACE[3])
            opened, closed = opens[~blank], closes[~blank]
            if len(opened):
                empty = int(np.count_nonzero(closed[1:] & opened[:-1])) + int(closed[0] and self.last_opened)
                self.values -= empty
                self.last_opened = bool(opened[-1])
        elif not ((a == _SPACE[0]) | (a == _SPACE[1]) | (a == _SPACE[2]) | (a == _SPACE[3])).all():
            self.last_opened = False
        if self.values > MAX_JSON_VALUES + 1:  # a container opened at the chunk's end may close empty
            raise BfqFormatError(f"header: more than {MAX_JSON_VALUES} JSON values")

    def _unescape(self, quote, backslash) -> None:
        """Clear `quote` where the quote follows an odd run of backslashes (an escaped quote);
        runs may continue from the previous chunk. simdjson's carry trick on the chunk's bits as
        one Python integer: adding a run's start bit to the run carries out just after its end,
        so the ends of odd runs come from two additions, whatever the runs' lengths."""
        import numpy as np

        n = len(backslash)
        width = 1 << n
        bits = int.from_bytes(np.packbits(backslash, bitorder="little").tobytes(), "little")
        even = _even_bits(n) ^ int(self.odd_backslashes)  # a run continued from the last chunk starts "odd"
        starts = bits & ~(bits << 1)
        even_carries = bits + (starts & even)
        odd_carries = (bits + (starts & ~even & (width - 1))) & (width - 1) | int(self.odd_backslashes)
        odd_ends = (even_carries & ~bits & ~_even_bits(n)) | (odd_carries & ~bits & _even_bits(n))
        odd_ends &= width - 1
        last_other = (~bits & (width - 1)).bit_length() - 1  # the last byte that is not a backslash, or -1
        self.odd_backslashes = bool((n - 1 - last_other + (self.odd_backslashes if last_other < 0 else 0)) & 1)
        if odd_ends:
            escaped = np.unpackbits(np.frombuffer(odd_ends.to_bytes(-(-n // 8), "little"), np.uint8), count=n, bitorder="little")
            quote &= ~escaped.view(bool)


@functools.lru_cache(maxsize=4)
def _even_bits(n: int) -> int:
    """The integer whose bits 0, 2, 4, ... below n are set."""
    return int.from_bytes(b"\x55" * -(-n // 8), "little") & ((1 << n) - 1)


def _prescan(raw) -> None:
    """Nesting depth and value count of the header bytes, in chunks. Where the bytes are not JSON
    the figures may be wrong, but only after the first error json.loads reports anyway."""
    import numpy as np

    data = np.frombuffer(raw, dtype=np.uint8)
    scan = _Scan()
    for start in range(0, len(data), _CHUNK):
        scan.feed(data[start : start + _CHUNK])
    if scan.values > MAX_JSON_VALUES:
        raise BfqFormatError(f"header: more than {MAX_JSON_VALUES} JSON values")


def _no_duplicates(pairs):
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise BfqFormatError(f"header: duplicate key '{display(key, 80)}'")
            seen.add(key)
    return out


def _overflow(text: str):
    raise BfqFormatError(f"header: non-finite number '{display(text, 32)}' (overflows binary64)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        _overflow(text)
    return value


def _finite_int(text: str) -> int:
    """An integer literal, exact, provided that it rounds to a finite binary64."""
    if len(text.lstrip("-")) > _MAX_FINITE_DIGITS:
        _overflow(text)
    value = int(text)
    try:
        float(value)
    except OverflowError:
        _overflow(text)
    return value


def _reject_constant(name: str):
    raise BfqFormatError(f"header: {name} is not allowed in JSON")


def _check_surrogates(value) -> None:
    """Escaped surrogates must pair up (json joins a valid pair into one character)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                raise BfqFormatError(f"header: string '{display(item, 60)}' contains an unpaired surrogate escape")
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def parse_header(raw) -> dict:
    """The header bytes (bytes or any buffer: a memoryview of the mapped file is not copied) as
    JSON values, under FORMAT.md's JSON rules."""
    raw = memoryview(raw).cast("B")
    if raw[:1] != b"{":
        raise BfqFormatError(f"header: must start with '{{', found {bytes(raw[:1])!r}")
    _prescan(raw)
    try:
        header = json.loads(
            str(raw, "utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_float=_finite_float,
            parse_int=_finite_int,
            parse_constant=_reject_constant,
        )
    except BfqFormatError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BfqFormatError(f"header: not valid UTF-8 JSON ({display(exc, 200)})") from None
    if raw[-1:] != b"}":
        raise BfqFormatError(f"header: must end with '}}' (no whitespace after it), found {bytes(raw[-1:])!r}")
    if _SURROGATE_ESCAPE.search(raw):
        _check_surrogates(header)
    return header
