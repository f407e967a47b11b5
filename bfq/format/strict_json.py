"""The JSON rules of the .bfq header (FORMAT.md §2, "JSON"): RFC 8259 text that starts with `{` and
ends with `}`, at most 32 levels of nesting, no duplicate keys (compared after unescaping), no
number that rounds to an infinite binary64 (integer literals included), no unpaired surrogate.

`parse_header` is the only entry point; every violation raises `BfqFormatError`.
"""

from __future__ import annotations

import json
import math
import re

from bfq.errors import BfqFormatError
from bfq.format.constants import MAX_JSON_DEPTH

_STRING_OR_BRACKET = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")
# A JSON integer (no leading zeros) of more digits than this is >= 10^309 > the largest binary64.
_MAX_FINITE_DIGITS = 309


def _check_depth(raw: bytes) -> None:
    """Reject nesting deeper than MAX_JSON_DEPTH before json.loads can recurse: every `{` and `[`
    outside strings opens a level, the top-level object is level 1."""
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
            raise BfqFormatError(f"header: duplicate key {key!r:.80}")
        out[key] = value
    return out


def _overflow(text: str):
    shown = text if len(text) <= 32 else text[:32] + "..."
    raise BfqFormatError(f"header: non-finite number {shown!r} (overflows binary64)")


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
                raise BfqFormatError(f"header: string {item!r:.60} contains an unpaired surrogate escape")
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def parse_header(raw: bytes) -> dict:
    """The header bytes as JSON values, under FORMAT.md's JSON rules."""
    if not raw.startswith(b"{"):
        raise BfqFormatError(f"header: must start with '{{', found {raw[:1]!r}")
    _check_depth(raw)
    try:
        header = json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_float=_finite_float,
            parse_int=_finite_int,
            parse_constant=_reject_constant,
        )
    except BfqFormatError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BfqFormatError(f"header: not valid UTF-8 JSON ({exc})") from None
    if not raw.endswith(b"}"):
        raise BfqFormatError(f"header: must end with '}}' (no whitespace after it), found {raw[-1:]!r}")
    if _SURROGATE_ESCAPE.search(raw):
        _check_surrogates(header)
    return header
