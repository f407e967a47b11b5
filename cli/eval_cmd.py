"""``bfq eval MODEL``: the tiny-sd quality metric (prompt alignment and Fréchet distance) of the
bundled tiny models (tiny-sd, tiny-sdxl, tiny-pixart) and the .bfq files made from them."""

from __future__ import annotations

import json
from pathlib import Path

import click
from bfq_cli.options import check_int8_option, runtime_option
from bfq_cli.params import SEED, Count, Device, Finite, Threads
from bfq_cli.paths import Output, check_outputs, force_option, model_paths

from bfq.errors import InputError
from bfq.tinysd.evaluate import (
    CFG_SCALES,
    DEFAULT_CFG,
    DEFAULT_N_PER_DIGIT,
    DEFAULT_STEPS,
)


def _tiny_dirs() -> dict[str, Path]:
    """The bundled tiny pipelines the metric scores, by built-in name (``tiny-sd``, ``tiny-sdxl``, ``tiny-pixart``)."""
    from bfq.families import FAMILIES

    return {f.tiny_name: f.tiny_pipeline_dir() for f in FAMILIES}


def _resolve(model: str, steps: int | None, runtime: str, compute: str = "fp32"):
    """``(unet, base, scheduler, steps, note)`` for MODEL: a bundled tiny model (``tiny-sd``,
    ``tiny-sdxl``, ``tiny-pixart``), a ``.bfq`` made from one, or a pipeline directory. Everything is checked before
    anything is generated: the step count (within the scheduler's training timesteps), the file's
    origin, and for a ``.bfq`` with a scheduler-mode time cache the steps it was made for (the
    default; others are refused). Such a file is sampled with the evaluation's DDIM sampler when
    its timesteps are cached, else with its own scheduler."""
    from bfq.quant.timecache import scheduler_timesteps
    from bfq.tinysd.evaluate import ddim_sampler

    path = Path(model)
    tiny = _tiny_dirs()
    if model in tiny or (path / "model_index.json").is_file():
        base = None if model == "tiny-sd" else tiny.get(model, path)
        steps = steps or DEFAULT_STEPS
        scheduler_timesteps(ddim_sampler(base), steps)
        return None, base, None, steps, None
    if not model.endswith(".bfq"):
        raise click.BadParameter(f"expected {', '.join(tiny)}, a .bfq file made from one, or a pipeline directory",
                                 param_hint="MODEL")  # fmt: skip
    if not path.is_file():
        raise click.BadParameter(f"no such file: {model}", param_hint="MODEL")
    from bfq.runtime.generate import file_sampler

    sampler = file_sampler(model)
    name = _made_from(model, sampler.config, tiny)
    base = None if name == "tiny-sd" else tiny[name]
    steps = steps or sampler.steps or DEFAULT_STEPS
    scheduler, note = None, None
    try:
        sampler.check_steps(steps, ddim_sampler(base))
    except InputError:
        if sampler.scheduler is None or sampler.cache_mode != "scheduler":
            raise
        sampler.check_steps(steps)
        scheduler = sampler.scheduler
        note = (f"sampling with the file's {type(scheduler).__name__} at {steps} steps, the only timesteps its time cache "
                "holds; the scores compare with other files made for this sampler, not with DDIM ones")  # fmt: skip
    import bfq

    unet = bfq.load_unet(model, compute=compute, runtime=runtime)
    return unet, base, scheduler, steps, note


_SHAPE_KEYS = ("in_channels", "sample_size", "cross_attention_dim", "block_out_channels", "addition_embed_type",
               "num_layers", "patch_size", "caption_channels")  # the last three: a diffusion transformer's


def _made_from(model: str, config: dict, tiny: dict[str, Path]) -> str:
    """The bundled tiny model whose model shape ``config`` has (InputError when none)."""
    from bfq.families import model_folder

    for name, directory in tiny.items():
        folder = model_folder(directory)
        if folder is None:  # a tiny model this checkout lacks
            continue
        ref = json.loads((directory / folder / "config.json").read_text())
        if all(config.get(k) == ref.get(k) for k in _SHAPE_KEYS):
            return name
    shape = ", ".join(f"{k} {config.get(k)}" for k in _SHAPE_KEYS[:4])
    raise InputError(f"{model} was not made from {' or '.join(tiny)} (its UNet has {shape}): "
                     "bfq eval scores the bundled tiny models only")  # fmt: skip


@click.command("eval")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--grid", type=Output("image"), default=None, help="Write an image grid of samples here: a row per digit, a block per CFG scale, labelled.")
@click.option("--n-per-digit", type=Count(1), default=DEFAULT_N_PER_DIGIT, show_default=True,
              help="Images per digit and CFG scale.")
@click.option("--steps", type=Count(1), default=None,
              help=f"Sampler steps [default: {DEFAULT_STEPS}; for a .bfq with a scheduler-mode time cache, the steps it was made for].")
@click.option("--cfg", "cfg_scales", type=Finite(0), multiple=True,
              help=f"CFG scale of the sweep (repeatable; default {' '.join(map(str, CFG_SCALES))}).")
@click.option("--default-cfg", type=Finite(0), default=DEFAULT_CFG, show_default=True,
              help="Scale reported as the headline alignment/fd.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--threads", type=Threads(), default=1, show_default=True,
              help="Torch threads (results are bit-reproducible for a fixed count).")
@click.option("--device", type=Device(), default="cpu", show_default=True, help="cpu, cuda, cuda:N or mps.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@runtime_option
@click.option("--compute", type=click.Choice(["fp32", "bf16", "int8"]), default="fp32", show_default=True,
              help="The quantized UNet's compute dtype; bf16 and int8 (8-bit activations on the int8 codes, see "
                   "`bfq generate --help`) on the cpu device only (fp32 keeps the scores comparable with every earlier "
                   "evaluation).")
@force_option
def eval_cmd(model, as_json, grid, n_per_digit, steps, cfg_scales, default_cfg, seed, threads, device, quiet, runtime, compute,
             force):  # fmt: skip
    """Score MODEL (tiny-sd, tiny-sdxl, tiny-pixart, or a .bfq made from one) by prompt alignment and Fréchet distance.

    Generates 10 x N-PER-DIGIT images from fixed prompts and seeds at each CFG scale, labels
    them with the bundled digit classifier and compares their features with the real digits.
    """
    check_outputs(click.get_current_context(), {"MODEL": model_paths(model)})
    if compute != "fp32" and (device != "cpu" or not model.endswith(".bfq")):
        raise click.BadParameter(f"{compute} applies to a .bfq file on the cpu device only", param_hint="--compute")
    check_int8_option(compute, runtime)
    from bfq.tinysd.evaluate import evaluate, format_report

    unet, base, scheduler, steps, note = _resolve(model, steps, runtime, compute)
    if note:
        click.echo(f"note: {note}", err=True)
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
        device=device,
        scheduler=scheduler,
        progress=not quiet,
    )
    result["model"] = model
    result["settings"]["compute"] = compute
    if compute == "int8":
        result["settings"]["int8_layers"] = unet.bfq_int8_layers
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(format_report(result, title=f"bfq eval {model}" + (f" (UNet in {compute})" if compute != "fp32" else "")))
        if grid:
            click.echo(f"grid: {grid}")
