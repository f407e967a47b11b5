"""Issue 4's ablation on tiny-sd, without fine-tuning: fp32 against uniform-4/2/1 (ternary) with
min-max and alternating (least-squares) scale initialization, plain vs balanced levels for 2 bits.

Every quantized row goes the whole user path: `bfq quantize` (library call) -> .bfq on disk ->
`bfq.load_unet` -> the tiny-sd metric (`bfq.tinysd.evaluate.evaluate`).

    OMP_NUM_THREADS=1 python bench/tinysd_init_table.py [--n-per-digit 20] [--out table.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROWS = [
    ("uniform-4", "alternating", "balanced"),
    ("uniform-4", "minmax", "balanced"),
    ("uniform-2", "alternating", "balanced"),
    ("uniform-2", "minmax", "balanced"),
    ("uniform-2", "alternating", "plain"),
    ("uniform-1", "alternating", "balanced"),
    ("uniform-1", "minmax", "balanced"),
]


def main():
    import torch

    import bfq
    from bfq.format.inspect import summarize
    from bfq.pipeline.quantize import quantize
    from bfq.tinysd.evaluate import DEFAULT_STEPS, evaluate, format_report

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-per-digit", type=int, default=20)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    kwargs = dict(n_per_digit=args.n_per_digit, steps=DEFAULT_STEPS)
    results = [{"row": "fp32", "avg_bits": 32.0, **evaluate(None, **kwargs)}]
    print(format_report(results[0], "fp32"), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for recipe, init, levels in ROWS:
            path = Path(tmp) / f"{recipe}-{init}-{levels}.bfq"
            t = time.perf_counter()
            quantize("tiny-sd", path, recipe=recipe, init=init, levels=levels, steps=DEFAULT_STEPS, progress=False)
            seconds = time.perf_counter() - t
            unet = bfq.load_unet(path, dtype=torch.float32)
            r = evaluate(unet, **kwargs)
            s = summarize(path)
            row = {"row": f"{recipe} {levels} {init}", "avg_bits": s["avg_bits"], "file_bytes": s["file_bytes"], "quantize_s": seconds, **r}
            results.append(row)
            print(f"{row['row']:<34} bits {row['avg_bits']:.3f}  alignment {r['alignment']:.3f}  fd {r['fd']:.2f}", flush=True)
    print(f"\nsettings: {results[0]['settings']}")
    print(f"{'row':<34} {'avg bits':>8} {'align':>6} {'FD':>8}   sweep (cfg: align/FD)")
    for r in results:
        sweep = "  ".join(f"{s['cfg']:g}: {s['alignment']:.2f}/{s['fd']:.1f}" for s in r["sweep"])
        print(f"{r['row']:<34} {r['avg_bits']:>8.3f} {r['alignment']:>6.3f} {r['fd']:>8.2f}   {sweep}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
