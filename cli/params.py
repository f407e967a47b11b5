"""Click parameter types and checks that catch a bad value where it is parsed, so a mistake is one line
before any work: counts and seeds in the range the libraries take, finite numbers, devices that exist
on this machine, text files, recipe files."""

from __future__ import annotations

import math
import os

import click

INT_MAX = 2**31 - 1  # torch and numpy take counts (steps, batch sizes, entries) as C ints
# torch.Generator.manual_seed takes 0..2**64-1; bfq's own seeds are offset and mixed as 32-bit words
# (numpy SeedSequence), so larger ones would alias smaller ones.
TORCH_SEED = click.IntRange(0, 2**64 - 1)
SEED = click.IntRange(0, 2**32 - 1)


def Count(minimum: int = 1, maximum: int = INT_MAX) -> click.IntRange:  # noqa: N802 (a type, like click's)
    """An integer count in ``minimum..maximum`` (default at most a C int)."""
    return click.IntRange(minimum, maximum)


def Threads() -> click.IntRange:  # noqa: N802
    """CPU threads: 1..the CPUs this process may use (more never makes torch faster)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return click.IntRange(1, max(1, usable or 1))


class Finite(click.FloatRange):
    """A float in an optional range that is also finite (click's FloatRange lets NaN through)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


class Device(click.ParamType):
    """A torch device that exists here (``cpu``, ``cuda``, ``cuda:1``, ``mps``); ``auto`` too when allowed."""

    name = "device"

    def __init__(self, allow_auto: bool = False):
        self.allow_auto = allow_auto

    def convert(self, value, param, ctx):
        if self.allow_auto and value == "auto":
            return value
        from bfq.runtime.load import device_problem

        problem = device_problem(str(value))
        if problem:
            self.fail(problem, param, ctx)
        return str(value)


def text_file_problem(path: str) -> str | None:
    """Why ``path`` is not a readable UTF-8 text file, or None."""
    try:
        with open(path, encoding="utf-8") as f:
            f.read(1 << 16)
    except FileNotFoundError:
        return f"no such file: {path}"
    except IsADirectoryError:
        return f"{path} is a folder, not a file"
    except UnicodeDecodeError:
        return f"{path} is not a text file"
    except OSError as e:
        return f"cannot read {path}: {e.strerror}"
    return None


def check_recipe_file(recipe: str, option: str) -> None:
    """A recipe option names a built-in recipe or a recipe file that reads (RecipeError if not)."""
    from bfq.quant.recipe import BUILTIN_RECIPES, Recipe

    if recipe in BUILTIN_RECIPES:
        return
    if not os.path.isfile(recipe):
        raise click.BadParameter(f"{recipe!r} is neither a built-in recipe ({', '.join(BUILTIN_RECIPES)}) nor a file",
                                 param_hint=option)  # fmt: skip
    Recipe.load(recipe)


class ImageSide(click.IntRange):
    """An image width or height in pixels: a multiple of 8 (the VAE's latent scale), 8..16384."""

    def __init__(self):
        super().__init__(8, 16384)

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if number % 8:
            self.fail(f"{number} is not a multiple of 8 (the VAE works on 8x8-pixel latents)", param, ctx)
        return number
