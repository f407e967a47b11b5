"""The import hook that makes diffusers know bfq without ``import bfq`` importing diffusers.

diffusers picks a quantization backend from two dicts in ``diffusers.quantizers.auto``. ``import bfq``
calls :func:`install`: when that module is already loaded, bfq registers at once; otherwise a
finder on ``sys.meta_path`` registers right after diffusers first executes it. Registration
itself lives in :mod:`bfq.diffusers`, imported by name here (the one place the base layer reaches
a higher one: a plug-in trigger, run only once diffusers is being imported anyway).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

TARGET = "diffusers.quantizers.auto"


def _register() -> None:
    importlib.import_module("bfq.diffusers").register_or_warn()


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        sys.meta_path.remove(self)  # once: find the real spec, and never again
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_and_register
        return spec


def install() -> None:
    """Register bfq with diffusers now if its quantizer maps are loaded, else when they will be."""
    if TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _Hook) for f in sys.meta_path):
        sys.meta_path.insert(0, _Hook())
