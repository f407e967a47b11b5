"""bfq: BitsFusion ~2-bit quantization of Stable Diffusion UNets and the .bfq container.

Reading, writing and inspecting containers needs only numpy and numba: ``import bfq`` does not
import torch or diffusers. The torch-side entry points are imported lazily on first use.
"""

from bfq.errors import BfqFormatError, InputError, OutputError, RecipeError, UserError

__version__ = "0.1.0"

_LAZY = {
    "load_unet": "bfq.runtime.load",
}


def __getattr__(name):
    """Lazy access to `load_unet` and to submodules (`bfq.tinysd`, `bfq.format.inspect`, ...)."""
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    try:
        return importlib.import_module(f"bfq.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"bfq.{name}":
            raise
        raise AttributeError(f"module 'bfq' has no attribute {name!r}") from None


__all__ = ["BfqFormatError", "InputError", "OutputError", "RecipeError", "UserError", "__version__", *_LAZY]
