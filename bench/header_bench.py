"""Header parsing cost (issue 17): time and peak extra memory of `open_bfq` on generated headers of
1, 4, 16 and 64 MiB, by kind of content. Every header is accepted or refused with one
BfqFormatError; FORMAT.md §5 asks for time and memory linear in the header length, and bfq's
target is <= 2 s and <= 4x the header size of extra memory at the 64 MiB limit.

Kinds: `long_string` (one metadata string), `short_strings`, `numbers`, `nesting` (arrays 28
deep, over and over), `escapes` (one string of `\\"`), all valid JSON (refused only for the 2^19
JSON values of FORMAT.md §5); `unterminated_escapes` (`{"a":"` + `\\"` * n + `}`, the quadratic
case of issue 17), `deep` (`[` * n) and `non_ascii` (one string with an emoji in it: CPython then
holds the whole string at 4 bytes a character); `at_value_limit` (2^19 empty objects, the most
values FORMAT.md §5 allows, and a long string filling the rest).

Each case runs in a fresh process: the time is that of an untraced `open_bfq`; "peak" is
tracemalloc's peak over a second one (Python and numpy allocations; the mapped file is not
counted), "rss" the growth of the process's peak resident set over the untraced one (the mapped
header pages included).

    OMP_NUM_THREADS=1 python bench/header_bench.py [--sizes 1,4,16,64] [--kinds long_string,...] [--out h.json]
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
MAX_HEADER = 64 * MiB
KINDS = ("long_string", "short_strings", "numbers", "nesting", "escapes", "unterminated_escapes", "deep", "non_ascii",
         "at_value_limit")
MAX_VALUES = 1 << 19


def _valid(filler_key: str, open_: bytes, unit: bytes, close: bytes, size: int, *, sep: bytes = b"") -> bytes:
    """A valid bfq header of exactly `size` bytes whose model.config[filler_key] (or metadata) is
    `open_ + unit (sep unit)* + close`, padded with spaces before `close`."""
    head = b'{"producer":"bench","model":{"class_name":"UNet2DConditionModel","config":{"%s":' % filler_key.encode()
    tail = b'}},"layers":[],"tensors":[]}'
    room = size - len(head) - len(tail) - len(open_) - len(close)
    step = len(unit) + len(sep)
    count = max(1, (room + len(sep)) // step)
    body = sep.join([unit] * count)
    return head + open_ + body + b" " * (room - len(body)) + close + tail


def header(kind: str, size: int) -> bytes:
    """A generated header of `size` bytes (at least a few hundred) of the given kind."""
    if kind == "long_string":
        raw = _valid("s", b'"', b"a", b'"', size)
    elif kind == "short_strings":
        raw = _valid("s", b"[", b'"ab"', b"]", size, sep=b",")
    elif kind == "numbers":
        raw = _valid("s", b"[", b"1.5", b"]", size, sep=b",")
    elif kind == "nesting":
        raw = _valid("s", b"[", b"[" * 27 + b"0" + b"]" * 27, b"]", size, sep=b",")
    elif kind == "escapes":
        raw = _valid("s", b'"', b'\\"', b'"', size)
    elif kind == "at_value_limit":  # as many empty objects as FORMAT.md §5 allows, then one long string
        objects = min(MAX_VALUES - 10, (size - 200) // 4)
        raw = _valid("s", b'[' + b"{}," * objects + b'"', b"a", b'"]', size)
    elif kind == "non_ascii":
        raw = _valid("s", "\"\U0001F600".encode(), b"a", b'"', size)
    elif kind == "unterminated_escapes":
        raw = b'{"a":"' + b'\\"' * ((size - 7) // 2) + b"}"
    elif kind == "deep":
        raw = b"{" + b"[" * (size - 2) + b"}"
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return raw


def bfq_bytes(raw: bytes) -> bytes:
    """A complete .bfq file (no blocks) around header bytes `raw`."""
    out = b"\x89BFQ\r\n\x1a\n" + struct.pack("<IIQ", 1, zlib.crc32(raw), len(raw)) + raw
    return out + b"\0" * (-len(out) % 64)


_CHILD = r"""
import json, sys, time, tracemalloc
from bfq import BfqFormatError
from bfq.format import open_bfq
path = sys.argv[1]
def run():
    try:
        with open_bfq(path):
            return "accepted"
    except BfqFormatError as exc:
        return "refused: " + str(exc)[:70]
def hwm():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set to the current one
except OSError:
    pass
rss0 = hwm()
t = time.perf_counter()
outcome = run()
seconds = time.perf_counter() - t
rss = hwm() - rss0
tracemalloc.start()
run()
peak = tracemalloc.get_traced_memory()[1]
print(json.dumps({"outcome": outcome, "seconds": seconds, "peak": peak, "rss": rss}))
"""


def measure(kind: str, size: int, folder: Path) -> dict:
    """Time and memory of open_bfq on one generated header, in a fresh process."""
    path = folder / f"{kind}_{size}.bfq"
    path.write_bytes(bfq_bytes(header(kind, size)))
    try:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        out = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True, env=env, check=True)
    finally:
        path.unlink()
    return {"kind": kind, "size": size, **json.loads(out.stdout)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,4,16,64", help="header sizes in MiB (64 is the limit)")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = []
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else None) as tmp:
        print(f"{'kind':<21} {'MiB':>4} {'seconds':>8} {'peak/N':>7} {'rss/N':>6}  outcome")
        for kind in args.kinds.split(","):
            for mib in (float(s) for s in args.sizes.split(",")):
                size = min(int(mib * MiB), MAX_HEADER)
                row = measure(kind, size, Path(tmp))
                rows.append(row)
                print(f"{kind:<21} {mib:>4g} {row['seconds']:>8.3f} {row['peak'] / size:>7.2f} {row['rss'] / size:>6.2f}  {row['outcome']}",
                      flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
