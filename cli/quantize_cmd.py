"""`bfq quantize`."""

from __future__ import annotations

import click
from bfq_cli.options import quantize_options, run_quantize


@click.command("quantize")
@click.argument("model")
@quantize_options
def quantize_cmd(model, **params):
    """Quantize MODEL's UNet and write a .bfq file; with --stage1-steps/--stage2-steps, fine-tune
    it first (the same training as `bfq finetune`).

    MODEL is `tiny-sd` (bundled), `sd15-random` (SD-v1.5-shaped, random weights), `sd15` (the Hub's
    Stable Diffusion v1.5; needs network), `sdxl-random` / `sdxl` (the same for SDXL base 1.0),
    `tiny-sdxl` (bundled, trained on tiny-sd's digits), `pixart-random` / `pixart` (PixArt-Σ 512's
    transformer), a Hub repo id, a diffusers pipeline directory (unet/ or transformer/), a model
    directory (config.json + weights) or a .safetensors checkpoint, of an SD-1/2-class or an
    SDXL-class UNet or a PixArt-class diffusion transformer.

    \b
    Examples:
      bfq quantize tiny-sd --bits 1.99 -o tiny.bfq
      bfq quantize tiny-sd --bits 1.99 --stage1-steps 400 --lr 1e-4 --batch-size 32 -o tiny-ft.bfq
      bfq quantize tiny-sdxl --bits 1.99 --stage1-steps 400 --stage2-steps 400 -o tiny-sdxl-ft.bfq
      bfq quantize sd15-random --recipe bitsfusion-sd15 -o sd15.bfq
      bfq quantize pixart-random --recipe uniform-2 -o pixart.bfq
      bfq quantize ./my-unet --recipe uniform-2 --time-cache grid -o my.bfq
    """
    run_quantize(model, params)
