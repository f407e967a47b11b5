"""Everything FORMAT.md specifies, and nothing that needs torch: constants, the numba code-stream
kernels, packing, the header rules, the reader, the writer and the summaries behind `bfq inspect`.

``import bfq.format`` needs only numpy and numba, and imports them only when the reader, the writer
or the kernels are first used (``bfq.format.constants`` alone imports neither).
"""

from bfq import lazy_getattr
from bfq.errors import BfqFormatError

_LAZY = {"BfqFile": "bfq.format.reader", "open_bfq": "bfq.format.reader", "BfqWriter": "bfq.format.writer"}


__getattr__ = lazy_getattr("bfq.format", _LAZY)

__all__ = ["BfqFile", "BfqFormatError", "BfqWriter", "open_bfq"]
