"""Keep diffusers' and transformers' own chatter off the user's terminal while bfq loads pipelines:
deprecations of their API that bfq uses, notes about optional backends (torchvision), and their
loading progress bars. None of it is the user's business; bfq's own progress and errors are."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Within the block: diffusers and transformers log errors only, show no progress bars, and
    their FutureWarnings/DeprecationWarnings are ignored. Everything is restored afterwards."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = (diffusers_logging, transformers_logging)
    saved = [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in libraries]
    for lib in libraries:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            for category in (FutureWarning, DeprecationWarning):
                warnings.filterwarnings("ignore", category=category, module=r"(diffusers|transformers)(\.|$)")
            warnings.filterwarnings("ignore", message=r".*`torch_dtype` is deprecated")
            yield
    finally:
        for lib, (verbosity, bars) in zip(libraries, saved):
            lib.set_verbosity(verbosity)
            (lib.enable_progress_bar if bars else lib.disable_progress_bar)()
