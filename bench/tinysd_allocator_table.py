"""Allocators on tiny-sd at one budget (issue 14, defect 4): the tiny-sd metric of each allocation.

Each row goes the user path `bfq allocate SENS --bits B --method M` -> recipe JSON -> `bfq quantize
tiny-sd --recipe recipe.json` (library calls) -> .bfq -> `bfq.load_unet` -> the tiny-sd metric
(`bfq.tinysd.evaluate.evaluate`, DDIM 20 steps, 10 x --n-per-digit images per evaluation seed and
CFG scale). No fine-tuning. The sensitivity file comes from the image-mode analysis:

    OMP_NUM_THREADS=1 bfq analyze tiny-sd --mode image --threads 1 -o sens-image.json      # ~9 min
    OMP_NUM_THREADS=1 python bench/tinysd_allocator_table.py sens-image.json [--bits 1.99] \\
        [--rows optimal,optimal-align,optimal-align:3,paper] [--n-per-digit 25] [--seeds 0,1]

A row is METHOD or METHOD:ALIGN_WEIGHT (optimal-align's weight of the alignment term).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _cross_attention_bits(bits: dict) -> dict:
    """Mean bits of the cross-attention to_k and to_v layers, and of everything else."""
    groups = {"attn2.to_k": [], "attn2.to_v": []}
    for name, b in bits.items():
        for key, values in groups.items():
            if key in name:
                values.append(b)
    return {key: sum(v) / len(v) for key, v in groups.items() if v}


def main():
    import torch

    import bfq
    from bfq.pipeline.allocate import allocate
    from bfq.pipeline.quantize import quantize
    from bfq.tinysd.evaluate import DEFAULT_STEPS, evaluate

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sensitivity")
    parser.add_argument("--bits", type=float, default=1.99)
    parser.add_argument("--rows", default="optimal,optimal-align,paper")
    parser.add_argument("--n-per-digit", type=int, default=25)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sens = json.loads(Path(args.sensitivity).read_text())
    seeds = [int(s) for s in args.seeds.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for row in args.rows.split(","):
            method, _, weight = row.partition(":")
            alloc = allocate(sens, args.bits, method, **({"align_weight": float(weight)} if weight else {}))
            recipe = alloc.save(Path(tmp) / f"{row}.json")
            path = Path(tmp) / f"{row}.bfq"
            quantize("tiny-sd", path, recipe=str(recipe), steps=DEFAULT_STEPS, progress=False)
            unet = bfq.load_unet(path, dtype=torch.float32)
            scores = [evaluate(unet, cfg_scales=(args.cfg,), default_cfg=args.cfg, n_per_digit=args.n_per_digit,
                               steps=DEFAULT_STEPS, seed=s) for s in seeds]  # fmt: skip
            r = {"row": row, "avg_bits": alloc.avg_bits, "alignment": [s["alignment"] for s in scores],
                 "fd": [s["fd"] for s in scores], "predicted_mse": alloc.predicted_error,
                 "predicted_align": alloc.details.get("predicted_align"), **_cross_attention_bits(alloc.bits)}  # fmt: skip
            results.append(r)
            print(json.dumps(r), flush=True)
    print(f"\n{10 * args.n_per_digit} images per seed, seeds {seeds}, CFG {args.cfg:g}, DDIM {DEFAULT_STEPS} steps")
    print(f"{'row':<18} {'avg bits':>8} {'alignment':>10} {'FD':>7}  per seed (alignment / FD)")
    for r in results:
        per_seed = "  ".join(f"{a:.3f}/{f:.1f}" for a, f in zip(r["alignment"], r["fd"]))
        print(f"{r['row']:<18} {r['avg_bits']:>8.4f} {sum(r['alignment']) / len(seeds):>10.3f} "
              f"{sum(r['fd']) / len(seeds):>7.2f}  {per_seed}")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
