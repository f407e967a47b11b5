"""The README's picture: tiny-sd's float UNet against the same model quantized to 3 and to 1.99
bits per weight (`bfq quantize tiny-sd --bits B`, no fine-tuning), one column per prompt, the same
prompt and seed down each column, so what the bits cost is seen at a glance.

    python bench/readme_grid.py                  # writes docs/tiny-sd-grid.png

A few minutes on one CPU thread, most of it the sensitivity analysis `--bits` runs once (cached in
$BFQ_CACHE_DIR/sensitivity, shared by both budgets); the quantized files are kept in --work.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
LABEL_WIDTH = 150


def quantized(work: Path, bits: float) -> Path:
    from bfq.pipeline.quantize import quantize

    path = work / f"tiny-sd-{bits:g}.bfq"
    if not path.is_file():
        print(f"bfq quantize tiny-sd --bits {bits:g} -o {path}", flush=True)
        quantize("tiny-sd", path, bits=bits, progress=False)
    return path


def row(pipe, steps: int, cfg: float, seed: int) -> list:
    import torch

    return [pipe(f"a handwritten digit {word}", num_inference_steps=steps, guidance_scale=cfg,
                 generator=torch.Generator().manual_seed(seed + i)).images[0] for i, word in enumerate(DIGITS)]  # fmt: skip


def labelled(grid, labels: list[str], row_height: int, gutter: int):
    from PIL import Image, ImageDraw, ImageFont

    out = Image.new("RGB", (grid.width + LABEL_WIDTH, grid.height), "white")
    out.paste(grid, (LABEL_WIDTH, 0))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=22)
    for i, text in enumerate(labels):
        y = i * (row_height + gutter) + row_height // 2
        draw.text((LABEL_WIDTH - 12, y), text, fill="black", font=font, anchor="rm")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/tiny-sd-grid.png")
    ap.add_argument("--work", default="/tmp/bfq-readme-grid", help="Folder for the quantized files (reused when present).")
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    from diffusers import StableDiffusionPipeline

    from bfq.format.inspect import summarize
    from bfq.runtime.generate import GUTTER, image_grid, load_pipeline
    from bfq.tinysd import pipeline_dir

    torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    files = [quantized(work, 3.0), quantized(work, 1.99)]
    rows, labels = [], ["float32"]
    for path in files:
        pipe, steps = load_pipeline(str(path), device="cpu")
        rows.append(row(pipe, steps, args.cfg, args.seed))
        labels.append(f"{summarize(path)['avg_bits']:.2f} bits")
    base = StableDiffusionPipeline.from_pretrained(pipeline_dir(), safety_checker=None)
    base.scheduler = pipe.scheduler  # the sampler the quantized files' time caches were made for
    base.set_progress_bar_config(disable=True)
    rows.insert(0, row(base, steps, args.cfg, args.seed))
    grid = image_grid(rows)
    out = labelled(grid, labels, (grid.height - 2 * GUTTER) // 3, GUTTER)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    out.save(args.out, optimize=True)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size:,} bytes): rows {', '.join(labels)}; {steps} steps, CFG {args.cfg:g}")


if __name__ == "__main__":
    main()
