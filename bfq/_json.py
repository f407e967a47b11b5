"""Strict JSON reading for the files bfq reads (recipes, sensitivity files): duplicate keys are errors."""

from __future__ import annotations

import json
import os
from pathlib import Path


def no_duplicates(pairs):
    """``object_pairs_hook`` that refuses a key given twice (json keeps the last one silently)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def read_json_file(path: str | os.PathLike, error: type[Exception], what: str):
    """The parsed contents of ``path``; an unreadable file or invalid JSON raises ``error`` naming
    ``what`` and the path."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise error(f"cannot read {what} {os.fspath(path)}: {e}") from None
    try:
        return json.loads(text, object_pairs_hook=no_duplicates)
    except ValueError as e:
        raise error(f"{what} {os.fspath(path)}: invalid JSON ({e})") from None
