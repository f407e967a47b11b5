"""bfq: BitsFusion ~2-bit quantization of Stable Diffusion UNets and the .bfq container.

Reading, writing and inspecting containers needs only numpy and numba: ``import bfq`` does not
import torch or diffusers. The torch-side entry points are imported lazily on first use.
"""

from bfq.errors import BfqFormatError, RecipeError

__version__ = "0.1.0"

_LAZY = {
    "load_unet": "bfq.load",
}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bfq' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = ["BfqFormatError", "RecipeError", "__version__", *_LAZY]
