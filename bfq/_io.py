"""Small file helpers shared by every stage: strict JSON reading (duplicate keys are errors) and
atomic writes (a temporary file next to the target, fsynced, then renamed over it)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
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
    except UnicodeDecodeError:
        raise error(f"{what} {os.fspath(path)}: not a text (JSON) file") from None
    try:
        return json.loads(text, object_pairs_hook=no_duplicates)
    except ValueError as e:
        raise error(f"{what} {os.fspath(path)}: invalid JSON ({e})") from None


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path in ``path``'s folder (created if missing) for the caller to write; when the
    block ends without an exception it is fsynced and renamed over ``path``, else removed. The name
    carries the process id, so ranks of a multi-process run never write the same temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)
