"""Small file helpers shared by every stage: strict JSON reading (duplicate keys are errors), atomic
writes (a temporary file next to the target, fsynced, then renamed over it), the one-line
:class:`~bfq.errors.OutputError` for an output that cannot be written, the lock of a work
directory, and :func:`display`, the one rule for printing text taken from a file.

Outputs follow one policy: missing folders are created; a file being replaced survives any failure;
a new file gets the permissions the umask gives (``0o666 & ~umask``, as ``cp`` or ``touch`` would).
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bfq.errors import InputError, OutputError

# -- display of text taken from a file ------------------------------------------------------------


def display(text, limit: int | None = None) -> str:
    """``text`` (any value: it is ``str()``-ed first) made safe to print: every character that
    ``str.isprintable()`` rejects -- control characters (CR, LF, TAB, ESC, DEL, C1), format
    characters (bidi overrides, zero-width characters), line and paragraph separators, non-ASCII
    spaces, surrogates, private-use and unassigned code points -- becomes its Python escape
    (``\\n``, ``\\x1b``, ``\\u202e``, ``\\U000e0001``); everything else is kept, a backslash
    included, so that ``display(display(t)) == display(t)``. With ``limit``, at most ``limit``
    characters of ``text`` are shown, then ``...``. Linear in the characters shown."""
    text = text if isinstance(text, str) else str(text)
    cut = limit is not None and len(text) > limit
    if cut:
        text = text[:limit]
    if not text.isprintable():
        text = _NOT_PRINTABLE_ASCII.sub(_escape, text)
    return text + "..." if cut else text


_NOT_PRINTABLE_ASCII = re.compile(r"[^ -~]")  # candidates: ASCII controls and every non-ASCII character


def _escape(match) -> str:
    char = match.group()
    return char if char.isprintable() else repr(char)[1:-1]


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
        raise error(f"cannot read {what} {os.fspath(path)}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise error(f"{what} {os.fspath(path)}: not a text (JSON) file") from None
    try:
        return json.loads(text, object_pairs_hook=no_duplicates)
    except ValueError as e:
        raise error(f"{what} {os.fspath(path)}: invalid JSON ({e})") from None


# -- outputs -------------------------------------------------------------------------------------


def new_file_mode() -> int:
    """The permission bits a new file gets from the process's umask: ``0o666 & ~umask``."""
    try:  # Linux: read it without changing it (os.umask can only be read by setting it)
        with open("/proc/self/status") as f:
            mask = int(next(line.split()[1] for line in f if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def output_error(path: str | os.PathLike, exc: OSError) -> OutputError:
    """``exc``, raised while writing ``path``, as one line naming the path and the reason."""
    path = os.fspath(path)
    if isinstance(exc, OutputError):
        return exc
    if exc.errno in (errno.EEXIST, errno.ENOTDIR):
        blocker = next((p for p in Path(path).parents if p.is_file()), None)
        if blocker is not None:
            return OutputError(f"cannot write {path}: {blocker} is a file, not a folder")
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        reason += " (the disk is full; the old file, if any, is unchanged)"
    return OutputError(f"cannot write {path}: {reason}")


def check_writable(path: str | os.PathLike) -> None:
    """Raise :class:`OutputError` now, before any work, when ``path`` cannot be written: it is a
    folder, a parent is a file, or its folder does not take new files (read-only file system, no
    permission; tried by creating and removing a temporary file there). Missing folders are fine:
    writers create them."""
    import tempfile

    path = Path(path)
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a folder")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"cannot write {path}: {folder} is a file, not a folder")
    if _read_only(folder):
        raise OutputError(f"cannot write {path}: {folder} is on a read-only file system")
    if folder != path.parent:  # the folders will be created: the nearest one must let us
        if not os.access(folder, os.W_OK | os.X_OK):
            raise OutputError(f"cannot write {path}: no permission to create folders in {folder}")
        return
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=f".{path.name}.probe."):
            pass
    except OSError as e:
        raise OutputError(f"cannot write {path}: cannot create files in {folder} ({e.strerror})") from None


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # no statvfs (Windows): the probe tells
        return False


def make_parents(path: Path) -> None:
    """Create the missing folders above ``path``; :class:`OutputError` when that is impossible."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise output_error(path, e) from None


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path in ``path``'s folder (created if missing) for the caller to write; when the
    block ends without an exception it is fsynced and renamed over ``path``, else removed. The name
    carries the process id, so ranks of a multi-process run never write the same temporary file.
    An ``OSError`` while writing becomes an :class:`OutputError` naming ``path``."""
    path = Path(path)
    make_parents(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        try:
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            raise output_error(path, e) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


# -- work directories ----------------------------------------------------------------------------

LOCK_FILE = "bfq.lock"


@contextmanager
def locked_dir(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (created if missing) for the block, so that two runs
    never share a work directory. A second holder gets :class:`InputError` naming the process (pid,
    host, start time) that holds it. The lock is the kernel's (``flock``): it ends with the process,
    even a killed one. Where ``flock`` does not exist (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        yield Path(folder)
        return
    folder = Path(folder)
    lock = folder / LOCK_FILE
    make_parents(lock)
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise output_error(lock, e) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            raise InputError(f"the work directory {folder} is in use by {holder}; wait for that run to end, "
                             "or give this one another --work-dir") from None  # fmt: skip
        os.ftruncate(fd, 0)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        os.pwrite(fd, f"bfq (pid {os.getpid()} on host {socket.gethostname()}, since {since})\n".encode(), 0)
        try:
            yield folder
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB chunks."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()
