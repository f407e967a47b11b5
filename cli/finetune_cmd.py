"""`bfq finetune`: `bfq quantize` with Stage I on by default."""

from __future__ import annotations

import click
from bfq_cli.options import quantize_options, run_quantize


@click.command("finetune")
@click.argument("model")
@quantize_options
def finetune_cmd(model, **params):
    """Quantize MODEL's UNet, fine-tune it and write a .bfq file: BitsFusion Stage I (distillation;
    1000 steps, lr 1e-4 by default) and, with --stage2-steps N, Stage II (noise prediction; lr 1e-5
    by default; it needs a large effective batch, --batch-size x --grad-accum, to help).

    Runs on the CPU, on one GPU, or on many through Hugging Face accelerate (DDP); checkpoints
    and a JSON-lines log (log.jsonl) go to the work directory (default: OUT with .work instead of
    .bfq), and a killed run resumes from its last checkpoint when rerun with the same settings.

    \b
    Examples:
      bfq finetune tiny-sd --bits 1.99 --stage1-steps 400 --lr 1e-4 --batch-size 32 -o tiny-ft.bfq
      bfq finetune ./sd-pipeline --bits 1.99 --data folder:./images --batch-size 8 --grad-accum 16 \\
          --mixed-precision bf16 --gradient-checkpointing -o sd.bfq
      accelerate launch --num_processes 8 -m bfq_cli.main finetune ./sd-pipeline --bits 1.99 \\
          --data folder:./images --stage1-steps 20000 -o sd.bfq
    """
    run_quantize(model, params, default_stage1_steps=1000)
