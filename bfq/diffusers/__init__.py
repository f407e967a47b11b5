"""bfq as a diffusers quantization backend (``quant_method="bfq"``).

diffusers has no plugin API: it picks a backend from two dicts in ``diffusers.quantizers.auto``.
``import bfq`` installs an import hook (:mod:`bfq._diffusers_hook`, no torch or diffusers import)
that calls :func:`register_or_warn` the moment diffusers first imports that module, or at once
when it already has. With a diffusers whose internals differ from the supported range, importing bfq and diffusers
still works; registration is skipped with one warning, and :func:`register` raises the reason.
"""

from __future__ import annotations

import importlib
import sys
import warnings

from bfq.errors import UserError

SUPPORTED_DIFFUSERS = ("0.42", "0.43")  # >= first, < second: the versions whose loader hooks bfq uses
_AUTO = "diffusers.quantizers.auto"


class DiffusersVersionError(UserError, ImportError):
    """The installed diffusers cannot take bfq's quantizer."""


def _problem() -> str | None:
    import diffusers
    from packaging.version import Version

    version = Version(diffusers.__version__)
    lo, hi = SUPPORTED_DIFFUSERS
    if not (Version(lo) <= Version(version.base_version) < Version(hi)):
        return f"diffusers {diffusers.__version__} is outside the range bfq supports (>={lo},<{hi})"
    auto = sys.modules.get(_AUTO) or importlib.import_module(_AUTO)
    from diffusers.quantizers.base import DiffusersQuantizer

    for name in ("AUTO_QUANTIZER_MAPPING", "AUTO_QUANTIZATION_CONFIG_MAPPING"):
        if not isinstance(getattr(auto, name, None), dict):
            return f"diffusers {diffusers.__version__} has no {_AUTO}.{name}"
    if not hasattr(getattr(auto, "DiffusersAutoQuantizer", None), "merge_quantization_configs"):
        return f"diffusers {diffusers.__version__} has no DiffusersAutoQuantizer.merge_quantization_configs"
    for hook in ("maybe_update_loaded_keys", "maybe_update_state_dict", "get_state_dict_and_metadata"):
        if not hasattr(DiffusersQuantizer, hook):
            return f"diffusers {diffusers.__version__}'s DiffusersQuantizer has no {hook}"
    return None


def register() -> None:
    """Add ``"bfq"`` to diffusers' quantizer maps (idempotent). Raises DiffusersVersionError when
    this diffusers cannot take it."""
    problem = _problem()
    if problem:
        raise DiffusersVersionError(f"bfq cannot register with diffusers: {problem}; use bfq.load_unet instead")
    from bfq.diffusers.quantizer import BfqConfig, BfqQuantizer

    auto = sys.modules[_AUTO]
    auto.AUTO_QUANTIZER_MAPPING["bfq"] = BfqQuantizer
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING["bfq"] = BfqConfig
    merge = auto.DiffusersAutoQuantizer.merge_quantization_configs
    if not getattr(merge, "_bfq", False):
        auto.DiffusersAutoQuantizer.merge_quantization_configs = classmethod(_runtime_from_args(merge.__func__))


def _runtime_from_args(merge):
    """diffusers takes a saved folder's quantization_config over the caller's (with a warning);
    for a bfq folder the caller's BfqConfig still chooses how to load it: its ``runtime``."""

    def merged(cls, quantization_config, quantization_config_from_args):
        from bfq.diffusers.quantizer import BfqConfig

        saved = quantization_config.get("quant_method") if isinstance(quantization_config, dict) else None
        if saved == "bfq" and isinstance(quantization_config_from_args, BfqConfig):
            config = BfqConfig.from_dict(quantization_config)
            config.runtime = quantization_config_from_args.runtime
            return config
        return merge(cls, quantization_config, quantization_config_from_args)

    merged._bfq = True
    return merged


def register_or_warn() -> None:
    try:
        register()
    except DiffusersVersionError as exc:
        warnings.warn(str(exc), stacklevel=2)


def __getattr__(name):
    if name in ("BfqConfig", "BfqQuantizer"):
        from bfq.diffusers import quantizer

        return getattr(quantizer, name)
    raise AttributeError(f"module 'bfq.diffusers' has no attribute {name!r}")
