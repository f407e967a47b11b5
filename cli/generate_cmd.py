"""`bfq generate`."""

from __future__ import annotations

import click
from bfq_cli.options import runtime_option
from bfq_cli.params import Device, Finite
from bfq_cli.paths import Output, check_outputs, force_option, model_paths


@click.command("generate")
@click.argument("model")
@click.option("--prompt", "prompts", multiple=True, required=True, help="Text prompt; repeat for several.")
@click.option("--base", help="Pipeline (directory or Hub id) providing VAE, text encoder, tokenizer, scheduler. Default: the model's source.")
@click.option("-o", "--out", default="grid.png", show_default=True, type=Output("image"), help="Image grid of the results (.png, .jpg, .webp, ...): a row per prompt.")
@click.option("-n", "--num-images", default=1, show_default=True, type=click.IntRange(1, 64), help="Images per prompt.")
@click.option("--steps", type=click.IntRange(1), help="Sampler steps. Default: the steps a scheduler-mode time cache was made for (the only ones it can sample), else 50.")
@click.option("--cfg", "guidance", default=7.5, show_default=True, type=Finite(0), help="Classifier-free guidance scale.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0))
@click.option("--device", type=Device(), help="cpu, cuda, cuda:N or mps (default: cuda when available).")
@click.option("--revision", help="Hub revision of MODEL when it is a repo id.")
@runtime_option
@force_option
def generate_cmd(model, prompts, base, out, num_images, steps, guidance, seed, device, revision, runtime, force):
    """Generate images with the quantized UNet in MODEL (a .bfq file or Hub repo id).

    \b
    Example:
      bfq generate tiny.bfq --prompt "a handwritten digit seven" --cfg 3 -n 4 -o sevens.png
    """
    check_outputs(click.get_current_context(), {"MODEL": model_paths(model), "--base": base})
    from bfq.runtime.generate import generate

    path = generate(model, list(prompts), base=base, out=out, num_images=num_images, steps=steps,
                    guidance=guidance, seed=seed, device=device, revision=revision, runtime=runtime)  # fmt: skip
    click.echo(f"wrote {path}")
