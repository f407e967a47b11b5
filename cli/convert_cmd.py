"""`bfq convert`: a .bfq file to the diffusers layout (FORMAT.md appendix A) and back, losslessly."""

from __future__ import annotations

import os
from pathlib import Path

import click


@click.command("convert")
@click.argument("source", type=click.Path(exists=True))
@click.option("-o", "--output", required=True, help="A folder (from a .bfq) or a .bfq file (from a folder).")
@click.option("--force", is_flag=True, help="Replace an existing output .bfq file.")
def convert_cmd(source, output, force):
    """Convert between a .bfq FILE and the diffusers layout (a folder), bit for bit.

    From a .bfq, writes OUTPUT/unet/config.json and OUTPUT/unet/diffusion_pytorch_model.safetensors
    (``transformer/`` for DiT families): after ``import bfq``, diffusers' own
    ``from_pretrained(OUTPUT, subfolder="unet")`` loads it. From a folder (the component folder or
    the one holding it), writes the .bfq it holds: the same bytes as the original file.

    \b
    Examples:
      bfq convert tiny.bfq -o tiny-diffusers
      bfq convert tiny-diffusers -o tiny-again.bfq
    """
    from bfq.errors import InputError, OutputError

    if os.path.isdir(source):
        if not output.endswith(".bfq"):
            raise InputError(f"{output}: converting a folder writes a .bfq file; name the output FILE.bfq")
        if os.path.exists(output) and not force:
            raise OutputError(f"{output}: already exists; add --force to replace it")
        _folder_to_bfq(source, output)
        click.echo(f"wrote {output} from {source}")
        return
    if output.endswith(".bfq"):
        raise InputError(f"{output}: converting a .bfq writes a folder; name a folder, not a .bfq file")
    folder = _bfq_to_folder(source, output)
    click.echo(f"wrote {folder} (diffusers layout; load with `import bfq` + from_pretrained({output!r}, subfolder={folder.name!r}))")


def _folder_to_bfq(source: str, output: str) -> None:
    from bfq._io import atomic_path
    from bfq.format.diffusers_layout import read_layout
    from bfq.format.reader import BfqFile

    data = read_layout(source)
    BfqFile.from_bytes(data, source).verify_all()  # every checksum and word, before anything is written
    with atomic_path(output) as tmp:
        tmp.write_bytes(data)


def _bfq_to_folder(source: str, output: str) -> Path:
    from bfq.families import FamilyError, family_for_config
    from bfq.format import open_bfq
    from bfq.format.diffusers_layout import write_layout
    from bfq.errors import BfqFormatError

    with open_bfq(source) as bfq:
        model = bfq.header.model
        try:
            component = family_for_config(model["config"], model["class_name"]).component
        except FamilyError as exc:
            raise BfqFormatError(f"model: {exc}") from None
        return write_layout(bfq, output, component)
