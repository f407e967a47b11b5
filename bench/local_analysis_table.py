"""The local analysis against the proxy analysis on the bundled tiny models (issue 19).

``bfq quantize MODEL --bits B`` runs the *proxy* analysis (a full-model forward on the proxy set per
layer and bit-width) on small models and the *local* one (one recording forward at a small size,
then each layer's own output error) on large ones on a CPU (bfq.pipeline.quantize.default_analysis_mode).
This script runs both on tiny-sd and tiny-sdxl, where both are affordable, and prints per model:
the time of each analysis, the Spearman rank correlation of the layer sensitivities (``mse`` at
each bit-width, and of ``guidance_err`` at 1 bit), the share of layers the default allocator gives
the same bits at ``--bits``, and the tiny-sd metric (alignment, FD; DDIM 20 steps, CFG 3,
10 x --n-per-digit images per seed) of the two 1.99-bit models, no fine-tuning:

    OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python bench/local_analysis_table.py [--models tiny-sd,tiny-sdxl] \\
        [--bits 1.99] [--n-per-digit 25] [--seeds 0]

Analyses are cached like any other (``$BFQ_CACHE_DIR``), so a rerun reuses them (and reports the
recorded times).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def spearman(a, b) -> float:
    ra, rb = (np.argsort(np.argsort(x)).astype(float) for x in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])


def _column(sens: dict, metric: str, bits: int, names: list[str]) -> list[float]:
    return [sens["layers"][n]["errors"][str(bits)][metric] for n in names]


def compare(model: str, args) -> dict:
    import torch

    import bfq
    from bfq.pipeline.allocate import DEFAULT_ALLOCATOR, allocate
    from bfq.pipeline.analyze import shared_analysis
    from bfq.pipeline.models import resolve_model
    from bfq.pipeline.quantize import quantize
    from bfq.tinysd.evaluate import DEFAULT_STEPS, evaluate

    r = resolve_model(model)
    sens = {}
    for mode in ("proxy", "local"):
        sens[mode], _ = shared_analysis(r.unet, mode=mode, scheduler=r.scheduler, base_dir=r.base_dir, source=r.source,
                                        cache_steps=DEFAULT_STEPS, progress=False)  # fmt: skip
    names = [n for n, e in sens["proxy"]["layers"].items() if "errors" in e]
    row = {"model": model, "n_layers": len(names),
           "seconds": {m: round(s["timing"]["reference_s"] + s["timing"]["entries_s"], 1) for m, s in sens.items()},
           "spearman": {f"mse@{b}": spearman(_column(sens["proxy"], "mse", b, names), _column(sens["local"], "mse", b, names))
                        for b in sens["proxy"]["settings"]["bits"]}}  # fmt: skip
    row["spearman"]["guidance_err@1"] = spearman(_column(sens["proxy"], "guidance_err", 1, names),
                                                 _column(sens["local"], "guidance_err", 1, names))  # fmt: skip
    base = r.base_dir
    seeds = [int(s) for s in args.seeds.split(",")]
    allocs, quality = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, s in sens.items():
            alloc = allocate(s, args.bits, DEFAULT_ALLOCATOR)
            allocs[mode] = alloc
            recipe = alloc.save(Path(tmp) / f"{mode}.json")
            path = Path(tmp) / f"{mode}.bfq"
            quantize(model, path, recipe=str(recipe), steps=DEFAULT_STEPS, progress=False)
            unet = bfq.load_unet(path, dtype=torch.float32)
            scores = [evaluate(unet, base=base, cfg_scales=(args.cfg,), default_cfg=args.cfg, n_per_digit=args.n_per_digit,
                               steps=DEFAULT_STEPS, seed=seed) for seed in seeds]  # fmt: skip
            quality[mode] = {"avg_bits": alloc.avg_bits, "alignment": float(np.mean([q["alignment"] for q in scores])),
                             "fd": float(np.mean([q["fd"] for q in scores]))}  # fmt: skip
    same = sum(allocs["proxy"].bits[n] == allocs["local"].bits[n] for n in names)
    row.update(same_bits=same / len(names), quality=quality)
    return row


def main():
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny-sd,tiny-sdxl")
    parser.add_argument("--bits", type=float, default=1.99)
    parser.add_argument("--n-per-digit", type=int, default=25)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--cfg", type=float, default=3.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for model in args.models.split(","):
        rows.append(compare(model, args))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.bits:g} bits, default allocator, no fine-tuning; {10 * args.n_per_digit} images per seed, "
          f"seeds {args.seeds}, CFG {args.cfg:g}")  # fmt: skip
    print(f"{'model':<10} {'analysis':<8} {'time s':>7} {'avg bits':>8} {'align':>6} {'FD':>6}  "
          "Spearman proxy~local (mse@1/2/3, guidance_err@1), same bits")  # fmt: skip
    for r in rows:
        for mode in ("proxy", "local"):
            q = r["quality"][mode]
            extra = ""
            if mode == "local":
                extra = "  " + " / ".join(f"{v:.2f}" for v in r["spearman"].values()) + f", {100 * r['same_bits']:.0f}%"
            print(f"{r['model']:<10} {mode:<8} {r['seconds'][mode]:>7.1f} {q['avg_bits']:>8.4f} {q['alignment']:>6.3f} "
                  f"{q['fd']:>6.1f}{extra}")  # fmt: skip


if __name__ == "__main__":
    main()
