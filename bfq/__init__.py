"""bfq: BitsFusion ~2-bit quantization of Stable Diffusion UNets and the .bfq container.

Reading, writing and inspecting containers needs only numpy and numba: ``import bfq`` does not
import torch or diffusers. The torch-side entry points are imported lazily on first use.
"""

from bfq.errors import BfqFormatError, InputError, OutputError, RecipeError, UserError

__version__ = "0.1.0"

_LAZY = {
    "load_unet": "bfq.runtime.load",
    "load_transformer": "bfq.runtime.load",
    "load_pipeline": "bfq.runtime.generate",
    "BfqConfig": "bfq.diffusers",
}


def lazy_getattr(package: str, names: dict[str, str]):
    """A module ``__getattr__`` for ``package``: ``names`` maps an attribute to the module that
    defines it, imported on first use; any other attribute is looked up as a submodule."""
    import importlib

    def __getattr__(name):
        if name in names:
            return getattr(importlib.import_module(names[name]), name)
        try:
            return importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{package}.{name}":
                raise
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None

    return __getattr__


__getattr__ = lazy_getattr("bfq", _LAZY)  # `bfq.load_unet`, `bfq.load_pipeline`, `bfq.tinysd`, `bfq.format.inspect`, ...


from bfq import _diffusers_hook  # noqa: E402  (after lazy_getattr: the hook needs nothing else of bfq)

_diffusers_hook.install()  # after this, diffusers' from_pretrained loads bfq folders; diffusers is not imported here

__all__ = ["BfqFormatError", "InputError", "OutputError", "RecipeError", "UserError", "__version__", *_LAZY]
