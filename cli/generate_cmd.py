"""`bfq generate`: images from a .bfq file or a float model, a grid of them, and what it took."""

from __future__ import annotations

import os
import secrets

import click
from bfq_cli.options import check_int8_option, compute_option, refuse_unused, runtime_option
from bfq_cli.params import TORCH_SEED, Count, Device, Finite, ImageSide
from bfq_cli.paths import Output, check_outputs, force_option, model_paths

from bfq.runtime.generate import SAMPLERS


@click.command("generate")
@click.argument("model")
@click.option("--prompt", "prompts", multiple=True, required=True, help="Text prompt; repeat for several (a row of the grid each).")
@click.option("--negative-prompt", help="What the images should not show (needs --cfg above 1).")
@click.option("--base", help="Pipeline providing the VAE, text encoder and tokenizer (and the scheduler, unless the .bfq names its own): any model name `bfq quantize` accepts that has them (tiny-sd, sd15, a folder, a Hub id). Default: the model's own (a .bfq's source).")
@click.option("-o", "--out", default="grid.png", show_default=True, type=Output("image"), help="Image grid of the results (.png, .jpg, .webp, ...): a row per prompt.")
@click.option("-n", "--batch", "--num-images", "num_images", default=1, show_default=True, type=Count(1, 64), help="Images per prompt (a column each).")
@click.option("--width", type=ImageSide(), help="Image width in pixels, a multiple of 8 [default: the model's].")
@click.option("--height", type=ImageSide(), help="Image height in pixels, a multiple of 8 [default: the model's].")
@click.option("--steps", type=Count(1), help="Sampler steps. Default: the steps a scheduler-mode time cache was made for (the only ones it can sample), else 50.")
@click.option("--sampler", type=click.Choice(list(SAMPLERS)), help="Sampler (diffusers scheduler, with the model's noise schedule) [default: the file's, else the base pipeline's]. A scheduler-mode file takes only those that visit its cached timesteps (it names them); a grid-mode file or a float model takes any.")
@click.option("--cfg", "guidance", default=7.5, show_default=True, type=Finite(0), help="Classifier-free guidance scale.")
@click.option("--seed", type=TORCH_SEED, help="Seed of the initial noise, 0..2^64-1 [default: a random one, printed so the images can be made again].")
@click.option("--device", type=Device(), help="cpu, cuda, cuda:N or mps (default: cuda when available).")
@click.option("--revision", help="Hub revision of MODEL when it is a repo id.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@runtime_option
@compute_option
@force_option
def generate_cmd(model, prompts, negative_prompt, base, out, num_images, width, height, steps, sampler, guidance, seed, device,
                 revision, quiet, runtime, compute, force):  # fmt: skip
    """Generate images with MODEL: a .bfq file or Hub repo id holding one (the quantized UNet), or
    any model name `bfq quantize` accepts (tiny-sd, sd15, a pipeline folder, a Hub pipeline: the
    float UNet, to compare with).

    Prints the seed (random unless --seed is given), the file written and the process's peak memory.

    \b
    Examples:
      bfq generate tiny.bfq --prompt "a handwritten digit seven" --cfg 3 --batch 4 -o sevens.png
      bfq generate tiny-sd --prompt "a handwritten digit seven" --cfg 3 --batch 4 --seed 1 -o float.png
      bfq generate sd.bfq --base ./sd-pipeline --prompt "a red fox" --negative-prompt blurry --width 384 --sampler euler
    """
    ctx = click.get_current_context()
    quantized = _is_quantized(model, revision)
    refuse_unused(ctx, [
        ("negative_prompt", guidance <= 1, "needs --cfg above 1 (diffusers uses it only with classifier-free guidance)"),
        ("runtime", not quantized, "applies to a .bfq file only (MODEL is a float model)"),
        ("compute", not quantized, "applies to a .bfq file only (MODEL is a float model)"),
        ("revision", os.path.exists(model), "applies to a Hub repo id only (MODEL is a local path)"),
    ])  # fmt: skip
    check_int8_option(compute, runtime)
    if compute == "int8" and device not in (None, "cpu"):
        raise click.BadParameter("int8 runs on the cpu device only", param_hint="--compute")
    check_outputs(ctx, {"MODEL": model_paths(model), "--base": base})
    from bfq.runtime.generate import generate, peak_memory

    random_seed = seed is None
    seed = secrets.randbits(32) if random_seed else seed
    kwargs = dict(out=out, num_images=num_images, steps=steps, guidance=guidance, seed=seed, device=device, revision=revision,
                  negative_prompt=negative_prompt, width=width, height=height, sampler=sampler, progress=not quiet)  # fmt: skip
    base = _pipeline_location(base) if base else None
    if quantized:
        path = generate(model, list(prompts), base=base, runtime=runtime, compute=compute, **kwargs)
    else:
        from bfq.pipeline.models import resolve_model

        base = base or _float_base(model)
        resolved = resolve_model(model, revision=revision)
        base = base or resolved.source.get("repo")
        path = generate(model, list(prompts), base=base, unet=resolved.unet, scheduler=resolved.scheduler, **kwargs)
    peak = peak_memory()
    click.echo(f"seed        {seed}" + (f"  (random; --seed {seed} makes these images again)" if random_seed else ""))
    click.echo(f"wrote       {path}")
    click.echo("peak memory " + ", ".join(f"{'CUDA' if k == 'cuda' else 'process RSS'} {v / 1e9:.2f} GB" for k, v in peak.items()))


def _is_quantized(model: str, revision: str | None) -> bool:
    """Whether MODEL names a .bfq (a file, or a Hub repo holding one) rather than a float model."""
    from bfq.pipeline.models import BUILTIN_MODELS, PICKLE_SUFFIXES

    if model in BUILTIN_MODELS or os.path.isdir(model):
        return False
    if os.path.isfile(model):
        return not model.endswith((".safetensors", *PICKLE_SUFFIXES))
    if model.endswith(".bfq"):
        return True
    from bfq.download import download_bfq, is_repo_id
    from bfq.errors import InputError

    if not is_repo_id(model):
        return True  # file_sampler says "no such file"
    try:
        download_bfq(model, revision=revision)
    except InputError as exc:
        if "found none" not in str(exc):  # a repo with several .bfq files: it says which to name
            raise
        return False  # a diffusers repo without a .bfq: the float model
    return True


def _pipeline_location(name: str) -> str:
    """The pipeline (folder or Hub repo) a model name `bfq quantize` accepts stands for, as --base."""
    from bfq.families import FAMILIES
    from bfq.pipeline.models import BUILTIN_MODELS

    for family in FAMILIES:
        if name == family.tiny_name:
            return str(family.tiny_pipeline_dir())
        if name == family.name:
            return family.hub_repo
    if name in BUILTIN_MODELS:
        raise click.BadParameter(f"{name} is a UNet alone (no VAE or text encoder); name a pipeline", param_hint="--base")
    return name


def _float_base(model: str) -> str | None:
    """Where a float model's VAE and text encoder come from: its own pipeline (tiny-sd, sd15, a
    pipeline folder); None for a Hub id (its repo, known once fetched)."""
    from bfq.families import FAMILIES
    from bfq.pipeline.models import BUILTIN_MODELS

    if model in {n for f in FAMILIES for n in (f.tiny_name, f.name)}:
        return _pipeline_location(model)
    if os.path.isfile(os.path.join(model, "model_index.json")) and os.path.isdir(os.path.join(model, "vae")):
        return model
    if os.path.exists(model) or model in BUILTIN_MODELS:
        raise click.BadParameter(f"{model} is a UNet alone (no VAE or text encoder): pass --base PIPELINE", param_hint="MODEL")
    return None
