"""`bfq quantize`."""

from __future__ import annotations

import click

TIME_CACHE_HELP = (
    "scheduler: store each ResNet's time features for exactly the sampler's timesteps (the paper's; "
    "smallest, tied to --steps); grid: store the time embedding for all training timesteps and keep "
    "the time projections as quantized layers (any sampler works)."
)


@click.command("quantize")
@click.argument("model")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="Output .bfq file (written atomically).")
@click.option("--bits", type=float, help="Average bits per weight by the paper's accounting, e.g. 1.99: bits per layer come from a sensitivity analysis (cached per model) and an allocator.")
@click.option("--allocator", type=click.Choice(["paper", "optimal", "size-only"]), default="optimal", show_default=True, help="With --bits: the error-minimizing knapsack (best on tiny-sd), the paper's Alg. 1, or layer size alone.")
@click.option("--sensitivity", type=click.Path(exists=True, dir_okay=False), help="With --bits: a sensitivity file from `bfq analyze` (default: reuse or run a proxy analysis).")
@click.option("--recipe", help="A built-in recipe (uniform-1..uniform-8, bitsfusion-sd15) or a recipe JSON file; overrides --bits.")
@click.option("--init", type=click.Choice(["alternating", "minmax"]), default="alternating", show_default=True, help="Scale initialization.")
@click.option("--levels", type=click.Choice(["balanced", "plain"]), default=None, help="Level set (default: the recipe's, balanced 2^n+1).")
@click.option("--time-cache", type=click.Choice(["scheduler", "grid"]), default="scheduler", show_default=True, help=TIME_CACHE_HELP)
@click.option("--steps", type=int, default=None, help="Sampler steps the scheduler cache is made for (default 50; tiny-sd: its evaluation's 20).")
@click.option("--time-proj-bits", type=click.IntRange(1, 8), default=None, help="Bits of the time projections in grid mode (default 4).")
@click.option("--scale-dtype", type=click.Choice(["f16", "f32"]), default="f16", show_default=True)
@click.option("--dense-dtype", type=click.Choice(["f32", "f16"]), default="f32", show_default=True, help="Precision of biases and norms.")
@click.option("--work-dir", type=click.Path(file_okay=False), help="Keep intermediate results here; a rerun with the same settings resumes.")
@click.option("--revision", help="Hub revision (branch, tag or commit) for Hub models.")
@click.option("--allow-pickle", is_flag=True, help="Allow pickle-based checkpoints (.ckpt/.bin). Only for files you trust.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def quantize_cmd(model, out, bits, allocator, sensitivity, recipe, init, levels, time_cache, steps, time_proj_bits, scale_dtype, dense_dtype, work_dir, revision, allow_pickle, quiet):
    """Quantize MODEL's UNet and write a .bfq file.

    MODEL is `tiny-sd` (bundled), `sd15-random` (SD-v1.5-shaped, random weights), `sd15` (the Hub's
    Stable Diffusion v1.5; needs network), a Hub repo id, a diffusers pipeline directory, a UNet
    directory (config.json + weights) or a .safetensors checkpoint.

    \b
    Examples:
      bfq quantize tiny-sd --bits 1.99 -o tiny.bfq
      bfq quantize sd15-random --recipe bitsfusion-sd15 -o sd15.bfq
      bfq quantize ./my-unet --recipe uniform-2 --time-cache grid -o my.bfq
    """
    from bfq.inspect import format_summary, summarize
    from bfq.quantize import quantize

    if bits is None and recipe is None:
        raise click.UsageError("give --bits B (e.g. 1.99) or --recipe NAME_OR_FILE")
    if steps is None:
        steps = _default_steps(model)
    result = quantize(
        model, out, bits=bits, recipe=recipe, init=init, levels=levels, time_cache=time_cache, steps=steps,
        time_proj_bits=time_proj_bits, scale_dtype=scale_dtype, dense_dtype=dense_dtype, work_dir=work_dir,
        revision=revision, allow_pickle=allow_pickle, progress=not quiet, allocator=allocator, sensitivity=sensitivity,
    )  # fmt: skip
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(format_summary(summarize(result.path), max_rows=0))
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items())
    click.echo(f"time        {timings}")
    click.echo(f"wrote       {result.path}")


def _default_steps(model: str) -> int:
    from bfq.quantize import DEFAULT_STEPS

    if model == "tiny-sd":
        from bfq.evaluate import DEFAULT_STEPS as TINY_STEPS

        return TINY_STEPS
    return DEFAULT_STEPS
