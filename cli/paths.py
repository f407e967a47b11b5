"""Where commands may write: one policy for every output path (``-o``, ``--grid``, ``--plot``, ...).

* The suffix says what is written (``.bfq``, ``.json``, an image format PIL can write) and is
  checked when the option is parsed.
* An output may not be one of the command's inputs, nor lie inside a model folder being read
  (refused even with ``--force``); two outputs of one command may not be the same file.
* An existing file is replaced only when it is what the command writes (a ``.bfq`` by a ``.bfq``,
  a recipe by a recipe, an image by an image); anything else needs ``--force``.
* Missing folders are created when the file is written; a folder that cannot be written (a file
  in the way, a read-only file system) is reported before any work.

Commands declare their outputs with the :class:`Output` type and call :func:`check_outputs` first.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click

from bfq._io import check_writable
from bfq.errors import InputError


def _starts_with(*magics: bytes) -> Callable[[Path], bool]:
    def test(path: Path) -> bool:
        with open(path, "rb") as f:
            head = f.read(64)
        return any(head.lstrip().startswith(m) for m in magics)

    return test


def _json_format(name: str) -> Callable[[Path], bool]:
    def test(path: Path) -> bool:
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            return False
        return isinstance(doc, dict) and doc.get("format") == name

    return test


def _is_image(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path):
            return True
    except Exception:  # PIL raises many types for what it cannot read
        return False


def _pil_writes(suffix: str) -> bool:
    """Whether PIL can save an RGB image under this suffix (tried in memory: some formats are
    registered but cannot hold RGB, or need a plugin)."""
    from PIL import Image

    Image.init()
    fmt = Image.registered_extensions().get(suffix)
    if fmt is None or fmt not in Image.SAVE:
        return False
    try:
        Image.new("RGB", (1, 1)).save(io.BytesIO(), format=fmt)
    except Exception:  # noqa: BLE001 - any failure means "not for our grids"
        return False
    return True


@dataclass(frozen=True)
class Kind:
    """What an output holds: its suffixes (a test on the suffix), a phrase for messages, and a
    test that an existing file is of this kind (and so may be replaced)."""

    what: str
    suffixes: str  # for messages, e.g. ".json"
    suffix_ok: Callable[[str], bool]
    is_kind: Callable[[Path], bool]


def _one_of(*suffixes: str) -> Callable[[str], bool]:
    return lambda suffix: suffix in suffixes


def _is_bfq(path: Path) -> bool:
    from bfq.format.constants import MAGIC

    return _starts_with(MAGIC)(path)


def _is_plot(path: Path) -> bool:
    return _is_image(path) or _starts_with(b"%PDF", b"<?xml", b"<svg")(path)


KINDS = {
    "bfq": Kind("a .bfq file", ".bfq", _one_of(".bfq"), _is_bfq),
    "recipe": Kind("a bfq recipe", ".json", _one_of(".json"), _json_format("bfq-recipe")),
    "sensitivity": Kind("a bfq sensitivity analysis", ".json", _one_of(".json"), _json_format("bfq-sensitivity")),
    "timestep-table": Kind("a bfq time-step error table", ".json", _one_of(".json"), _json_format("bfq-timestep-errors")),
    "image": Kind("an image", ".png, .jpg, .webp or another image suffix PIL can write", _pil_writes, _is_image),
    "plot": Kind("a plot", ".png, .pdf or .svg", _one_of(".png", ".pdf", ".svg"), _is_plot),
}


class Output(click.ParamType):
    """An output path of a given kind (see KINDS); its suffix is checked when parsed."""

    def __init__(self, kind: str):
        self.kind = kind
        self.name = f"output {kind}"

    def convert(self, value, param, ctx):
        value = os.fspath(value)
        kind = KINDS[self.kind]
        suffix = Path(value).suffix.lower()
        if not kind.suffix_ok(suffix):
            got = f"'{suffix}'" if suffix else "no suffix"
            self.fail(f"{value}: the name must end in {kind.suffixes} ({kind.what} is written; got {got})", param, ctx)
        return value


FORCE_HELP = "Replace an existing output file even when it is not what this command writes (never one of its inputs)."


def force_option(f):
    """The ``--force`` flag of every command that writes files."""
    return click.option("--force", is_flag=True, help=FORCE_HELP)(f)


def model_paths(model: str) -> list[str]:
    """The local files or folders a MODEL argument reads (none for a Hub repo id)."""
    if os.path.exists(model):
        return [model]
    from bfq.families import FAMILIES

    tiny = {f.tiny_name: f.tiny_pipeline_dir() for f in FAMILIES}
    return [str(tiny[model])] if model in tiny else []


def check_outputs(ctx: click.Context, inputs: dict[str, str | list[str] | None]) -> None:
    """Apply the policy above to every :class:`Output` option of the running command.

    ``inputs`` maps an argument's name (``MODEL``, ``--sensitivity``) to the local path(s) it reads;
    a folder among them (a model) may not contain an output either.
    """
    read = {}
    for label, paths in inputs.items():
        for p in [paths] if isinstance(paths, str) else (paths or []):
            if p and os.path.exists(p):
                read[Path(p).resolve()] = label
    seen = {}
    force = bool(ctx.params.get("force"))
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if not isinstance(param.type, Output) or value is None:
            continue
        option = param.opts[-1] if param.opts else param.name
        where = Path(value).resolve()
        if where in seen:
            raise InputError(f"{option} {value}: the same file as {seen[where]}; give each output its own name")
        seen[where] = option
        for path, label in read.items():
            if where == path:
                raise InputError(f"{option} {value}: the same file as {label}, which this command reads; write the output elsewhere")
            if path.is_dir() and path in where.parents:
                raise InputError(f"{option} {value}: inside {label} ({path}), which this command reads; write the output elsewhere")
        check_writable(value)
        kind = KINDS[param.type.kind]
        if where.is_file() and not force and not kind.is_kind(where):
            raise InputError(f"{option} {value}: the file exists and is not {kind.what}; pass --force to replace it")
