"""`bfq analyze`: per-layer sensitivity analysis (and the time-step error analysis)."""

from __future__ import annotations

import functools
import json
import os

import click
from bfq_cli.params import SEED, Count, Device, Finite, Threads, check_recipe_file
from bfq_cli.options import refuse_unused
from bfq_cli.paths import Output, check_outputs, force_option, model_paths

MODE_HELP = (
    "proxy: error of the noise prediction on a fixed set of latents, prompts and timesteps (fast; for large "
    "models on small machines). image: MSE/PSNR of generated images and the alignment drop (the paper's). "
    "local: each layer's own output error on inputs recorded in one forward at a small size (no model forward "
    "per layer; what `bfq quantize --bits` runs for large models on a CPU; reads the weights layer by layer)."
)


def _parse_bits(ctx, param, value):
    try:
        bits = [int(v) for v in str(value).replace(" ", "").split(",") if v]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers like 1,2,3, got {value!r}") from None
    if not bits or any(not 1 <= b <= 8 for b in bits) or len(set(bits)) != len(bits):
        raise click.BadParameter(f"expected distinct bit-widths in 1..8, got {value!r}")
    return tuple(sorted(bits))


@click.command("analyze")
@click.argument("model")
@click.option("-o", "--out", type=Output("sensitivity"), help="Sensitivity JSON to write; an unfinished one with the same model and settings is resumed. The analysis is also cached (one per model and settings, $BFQ_CACHE_DIR, shared with `bfq quantize --bits`): a cached one is reused.")
@click.option("--mode", type=click.Choice(["proxy", "image", "local"]), default="proxy", show_default=True, help=MODE_HELP)
@click.option("--bits", default="1,2,3", show_default=True, callback=_parse_bits, help="Candidate bit-widths per layer.")
@click.option("--finetune-steps", type=Count(0), default=0, show_default=True, help="Steps of fine-tuning each quantized layer against the full-precision model (the paper's T; 0 = none).")
@click.option("--finetune-lr", type=Finite(0, min_open=True), default=1e-4, show_default=True, help="Adam learning rate of that fine-tuning.")
@click.option("--prompts", "n_prompts", type=Count(1), default=None, help="Number of fixed prompts (default: tiny-sd 10 proxy / 20 image, else 8).")
@click.option("--steps", type=Count(1), default=None, help="DDIM steps of the sampler that makes the latents (proxy, local) or images (image) (default: 20; 4 in local mode on a large model).")
@click.option("--timesteps", "n_timesteps", type=Count(1), default=None, help="Proxy and local mode: trajectory states per prompt (evenly spaced steps; default: 4; 2 in local mode on a large model).")
@click.option("--guidance", type=Finite(0), default=None, help="CFG scale (default: tiny-sd 3.0, else 7.5).")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--clip", type=click.Path(file_okay=False, exists=True), default=None, help="Image mode on SD: a local transformers CLIP model directory for the CLIP-score drop (skipped without it).")
@click.option("--levels", type=click.Choice(["balanced", "plain"]), default="balanced", show_default=True)
@click.option("--time-cache", type=click.Choice(["scheduler", "grid"]), default="scheduler", show_default=True, help="Which layers a recipe needs (grid keeps and analyses the time projections) and the N_tf of the accounting.")
@click.option("--cache-steps", type=click.IntRange(1, 1000), default=None, help="Sampler steps the exported time cache will hold (N_tf of the accounting; default as `bfq quantize --steps`).")
@click.option("--device", type=Device(allow_auto=True), default="auto", show_default=True, help="auto (CUDA when available), cpu, cuda, cuda:1, mps.")
@click.option("--batch-size", type=Count(1), default=64, show_default=True, help="UNet batch size.")
@click.option("--threads", type=Threads(), default=None, help="Torch CPU threads (default: torch's).")
@click.option("--max-entries", type=Count(0), default=None, help="Stop after this many new (layer, bits) entries (rerun to resume).")
@click.option("--timestep-plot", type=Output("plot"), default=None, help="Also run the time-step error analysis (paper Fig. 4) and plot it here (.png, .pdf or .svg).")
@click.option("--timestep-table", type=Output("timestep-table"), default=None, help="Write the time-step error table here (JSON).")
@click.option("--timestep-recipe", default="uniform-2", show_default=True, help="The quantized model of the time-step analysis: a built-in recipe or a recipe JSON file.")
@click.option("--revision", help="Hub revision for Hub models.")
@click.option("--allow-pickle", is_flag=True, help="Allow pickle-based checkpoints (only for files you trust).")
@click.option("--subfolder", help="The UNet's folder inside MODEL (a Hub repo or a local folder), as diffusers' subfolder=.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@force_option
def analyze_cmd(model, out, mode, bits, finetune_steps, finetune_lr, n_prompts, steps, n_timesteps, guidance, seed, clip,
                levels, time_cache, cache_steps, device, batch_size, threads, max_entries, timestep_plot, timestep_table,
                timestep_recipe, revision, allow_pickle, subfolder, quiet, force):  # fmt: skip
    """Measure how much quantizing each layer of MODEL alone hurts, per candidate bit-width.

    Writes a versioned sensitivity JSON (-o) for `bfq allocate`. Rerunning with the same -o skips
    finished entries; a killed run loses at most one. MODEL is as for `bfq quantize`.

    \b
    Examples:
      bfq analyze tiny-sd -o sens.json
      bfq analyze tiny-sd --mode image -o sens-image.json
      bfq analyze tiny-sd --timestep-plot t.png --timestep-recipe recipe.json
    """
    if out is None and timestep_plot is None and timestep_table is None:
        raise click.UsageError("give -o SENS.json, --timestep-plot PNG or --timestep-table JSON")
    ctx = click.get_current_context()
    sens_only = "applies to the sensitivity analysis only: add -o SENS.json"
    refuse_unused(ctx, [
        ("timestep_recipe", timestep_plot is None and timestep_table is None,
         "applies to the time-step analysis only: add --timestep-plot or --timestep-table"),
        *((name, out is None, sens_only) for name in ("mode", "bits", "finetune_steps", "finetune_lr", "clip", "cache_steps",
                                                      "max_entries", "n_timesteps")),
        ("finetune_lr", finetune_steps == 0, "has no effect without --finetune-steps N"),
        ("n_timesteps", mode == "image", "applies to --mode proxy and local only (image mode samples whole images)"),
        ("clip", mode != "image", "applies to --mode image only (the CLIP-score drop of generated images)"),
        ("finetune_steps", mode == "local", "does not apply to --mode local (it scores each layer as initialized)"),
        ("revision", os.path.exists(model), "applies to Hub models only (MODEL is a local path)"),
    ])  # fmt: skip
    check_outputs(ctx, {"MODEL": model_paths(model), "--clip": clip, "--timestep-recipe": timestep_recipe})
    if timestep_plot is not None or timestep_table is not None:
        check_recipe_file(timestep_recipe, "--timestep-recipe")
    if timestep_plot is not None:
        from bfq.pipeline.plots import require_matplotlib

        try:
            require_matplotlib()
        except ImportError as e:
            raise click.ClickException(str(e)) from None
    import torch

    from bfq.pipeline.analyze import format_sensitivity, format_timestep_table, shared_analysis
    from bfq.pipeline.models import resolve_model

    if threads is not None:
        torch.set_num_threads(threads)
    lazy = mode == "local" and timestep_plot is None and timestep_table is None  # weights read layer by layer
    resolved = resolve_model(model, revision=revision, subfolder=subfolder, allow_pickle=allow_pickle, lazy=lazy)
    common = dict(scheduler=resolved.scheduler, base_dir=resolved.base_dir, source=resolved.source)
    if out is not None:
        sens, _ = shared_analysis(
            resolved.unet, out=out, log=functools.partial(click.echo, err=True), replace=force, mode=mode, bits=bits,
            levels=levels, time_cache=time_cache, cache_steps=cache_steps, device=device, batch_size=batch_size,
            progress=not quiet, max_entries=max_entries, seed=seed, n_prompts=n_prompts, steps=steps, guidance=guidance,
            n_timesteps=n_timesteps, finetune_steps=finetune_steps, finetune_lr=finetune_lr, clip=clip, **common,
        )  # fmt: skip
        click.echo(format_sensitivity(sens))
        click.echo(f"wrote       {out}")
    if timestep_plot is not None or timestep_table is not None:
        import copy

        from bfq._io import write_text_atomic
        from bfq.pipeline.analyze import plot_timestep_errors, timestep_errors
        from bfq.quant.nn import quantize_unet
        from bfq.quant.recipe import resolve_recipe

        recipe = resolve_recipe(timestep_recipe, resolved.unet, time_cache, None, levels)
        q_unet = quantize_unet(copy.deepcopy(resolved.unet), recipe.bits, levels=recipe.levels, progress=not quiet)
        table = timestep_errors(resolved.unet, q_unet, seed=seed, steps=steps or 20, guidance=guidance, device=device,
                                batch_size=batch_size, n_prompts=n_prompts or 8, **common)  # fmt: skip
        table["recipe"] = recipe.name
        click.echo(f"time-step errors of {recipe.name} against the full-precision model:")
        click.echo(format_timestep_table(table))
        if timestep_table is not None:
            write_text_atomic(timestep_table, json.dumps(table, indent=1) + "\n")
            click.echo(f"wrote       {timestep_table}")
        if timestep_plot is not None:
            plot_timestep_errors(table, timestep_plot, title=f"{model}: {recipe.name} vs full precision, per timestep")
            click.echo(f"plot        {timestep_plot}")
