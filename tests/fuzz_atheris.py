"""Coverage-guided fuzzing of the .bfq reader with atheris (optional: `pip install atheris`; not a
test dependency and not collected by pytest). Seeds are the golden files of spec/vectors/ and the
invalid files of spec/invalid/; each input is opened, every block read and verified. Anything but
acceptance or one BfqFormatError -- another exception, a hang past -timeout, memory past
-rss_limit_mb -- is a finding, written by libFuzzer as crash-*/timeout-*/oom-* files.

    OMP_NUM_THREADS=1 python tests/fuzz_atheris.py -max_total_time=600 -rss_limit_mb=4096 -timeout=10

The first byte of an input chooses: even, the rest is a whole file; odd, the rest is a header put
behind a valid preamble with its CRC, so that the fuzzer reaches the JSON rules and the validator
instead of stopping at the header CRC.
"""

from __future__ import annotations

import os
import struct
import sys
import tempfile
import zlib
from pathlib import Path

import atheris

import bfq.format._kernels  # numba kernels: imported first, so not instrumented (it breaks numba's typing)

with atheris.instrument_imports():  # bfq.format loads these lazily: import them here to instrument them
    import bfq._io
    import bfq.format.header
    import bfq.format.pack
    import bfq.format.reader
    import bfq.format.strict_json  # noqa: F401
    from bfq import BfqFormatError
    from bfq.format.reader import open_bfq

SPEC = Path(__file__).resolve().parents[1] / "spec"
SCRATCH = Path(tempfile.mkdtemp(prefix="bfq-atheris-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None))


def as_file(data: bytes) -> bytes:
    """The input after its first byte: as a whole file when that byte is even, else as a header
    behind a correct preamble."""
    if not data or data[0] % 2 == 0:
        return data[1:]
    raw = data[1:]
    out = b"\x89BFQ\r\n\x1a\n" + struct.pack("<IIQ", 1, zlib.crc32(raw), len(raw)) + raw
    return out + b"\0" * (-len(out) % 64)


def test_one_input(data: bytes) -> None:
    path = SCRATCH / "input.bfq"
    path.write_bytes(as_file(data))
    try:
        with open_bfq(path, verify=False) as f:
            for name in f.layers:
                f.read_scales(name)
                f.read_codes(name)
            for name in f.tensors:
                f.read_tensor(name)
            f.verify_all()
    except BfqFormatError:
        pass


def main() -> None:
    corpus = SCRATCH / "corpus"
    corpus.mkdir()
    for i, seed in enumerate(sorted(SPEC.glob("*/*.bfq"))):
        if seed.stat().st_size < 1 << 16:
            (corpus / f"{i}").write_bytes(b"\0" + seed.read_bytes())
    atheris.Setup([sys.argv[0], str(corpus), *sys.argv[1:]], test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
