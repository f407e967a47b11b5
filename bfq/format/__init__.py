"""Everything FORMAT.md specifies, and nothing that needs torch: constants, the numba code-stream
kernels, packing, the header rules, the reader, the writer and the summaries behind `bfq inspect`.

``import bfq.format`` needs only numpy and numba, and imports them only when the reader, the writer
or the kernels are first used (``bfq.format.constants`` alone imports neither).
"""

from bfq.errors import BfqFormatError

_LAZY = {"BfqFile": "bfq.format.reader", "open_bfq": "bfq.format.reader", "BfqWriter": "bfq.format.writer"}


def __getattr__(name):
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    try:
        return importlib.import_module(f"bfq.format.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"bfq.format.{name}":
            raise
        raise AttributeError(f"module 'bfq.format' has no attribute {name!r}") from None


__all__ = ["BfqFile", "BfqFormatError", "BfqWriter", "open_bfq"]
