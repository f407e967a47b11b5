"""``bfq eval MODEL``: the tiny-sd quality metric (prompt alignment and Fréchet distance)."""

from __future__ import annotations

import json
from pathlib import Path

import click
from bfq_cli.options import runtime_option

from bfq.tinysd.evaluate import (
    CFG_SCALES,
    DEFAULT_CFG,
    DEFAULT_N_PER_DIGIT,
    DEFAULT_STEPS,
)


def _resolve(model: str, runtime: str):
    """``(unet, base)`` for MODEL: ``tiny-sd``, a ``.bfq`` made from it, or a pipeline directory."""
    if model == "tiny-sd":
        return None, None
    path = Path(model)
    if model.endswith(".bfq"):
        if not path.is_file():
            raise click.BadParameter(f"no such file: {model}", param_hint="MODEL")
        import torch

        import bfq

        try:
            return bfq.load_unet(str(path), dtype=torch.float32, runtime=runtime), None
        except ValueError as exc:  # BfqFormatError and other bad-input errors
            raise click.ClickException(f"cannot load {model}: {exc}") from exc
    if (path / "model_index.json").is_file():
        return None, path
    raise click.BadParameter(
        "expected 'tiny-sd', a .bfq file made from it, or a StableDiffusionPipeline directory",
        param_hint="MODEL",
    )


@click.command("eval")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--grid", type=click.Path(dir_okay=False), default=None, help="Write a PNG grid of samples here.")
@click.option("--n-per-digit", type=click.IntRange(1), default=DEFAULT_N_PER_DIGIT, show_default=True,
              help="Images per digit and CFG scale.")
@click.option("--steps", type=click.IntRange(1), default=DEFAULT_STEPS, show_default=True, help="DDIM steps.")
@click.option("--cfg", "cfg_scales", type=float, multiple=True,
              help=f"CFG scale of the sweep (repeatable; default {' '.join(map(str, CFG_SCALES))}).")
@click.option("--default-cfg", type=float, default=DEFAULT_CFG, show_default=True,
              help="Scale reported as the headline alignment/fd.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=1, show_default=True,
              help="Torch threads (results are bit-reproducible for a fixed count).")
@runtime_option
def eval_cmd(model, as_json, grid, n_per_digit, steps, cfg_scales, default_cfg, seed, threads, runtime):
    """Score MODEL (tiny-sd or a .bfq made from it) by prompt alignment and Fréchet distance.

    Generates 10 x N-PER-DIGIT images from fixed prompts and seeds at each CFG scale, labels
    them with the bundled digit classifier and compares their features with the real digits.
    """
    from bfq.tinysd.evaluate import evaluate, format_report

    unet, base = _resolve(model, runtime)
    result = evaluate(
        unet,
        base=base,
        cfg_scales=cfg_scales or CFG_SCALES,
        default_cfg=default_cfg,
        n_per_digit=n_per_digit,
        steps=steps,
        seed=seed,
        grid_path=grid,
        threads=threads,
    )
    result["model"] = model
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(format_report(result, title=f"bfq eval {model}"))
        if grid:
            click.echo(f"grid: {grid}")
