"""Everything FORMAT.md specifies, and nothing that needs torch: constants, the numba code-stream
kernels, packing, the header rules, the reader, the writer and the summaries behind `bfq inspect`.

``import bfq.format`` needs only numpy and numba.
"""

from bfq.errors import BfqFormatError
from bfq.format.reader import BfqFile, open_bfq
from bfq.format.writer import BfqWriter

__all__ = ["BfqFile", "BfqFormatError", "BfqWriter", "open_bfq"]
