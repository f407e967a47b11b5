"""Issue 6's table on tiny-sd at 1.99 bits: init only, the paper's Stage I ablation steps, Stage II;
with --model tiny-sdxl, issue 19's table on the bundled tiny-sdxl, with --model tiny-pixart issue
22's on the bundled diffusion transformer (same metric and data).

Rows (every quantized row goes the whole user path: `bfq.pipeline.quantize.quantize` with
`stage1_steps`/`stage2_steps` -> .bfq on disk -> `bfq.load_unet` -> the tiny-sd metric):

  fp32                      the bundled tiny model's UNet
  init only                 --bits 1.99, balanced levels, alternating scales, no training
  I: noise distillation     Stage I, CFG-aware noise distillation only, uniform t
  I: + feature distill.     + lambda=0.01 down/up-block feature distillation, uniform t
  I: + Beta(3,1) t          + quantization-error-aware time sampling (= the paper's Stage I)
  I + II                    the paper's Stage I, then Stage II (noise prediction on the digits)
  uniform 2-bit             recipe uniform-2 (every layer 2 bits, the first and last 8), no training

The scheduler-mode time cache of every file is made for the metric's sampler (DDIM, 20 steps, the
model's noise schedule), so each row is scored as the fp32 row is, also where the model's own
scheduler visits other timesteps (tiny-pixart's DPM-Solver++).

All rows share one work directory: the sensitivity analysis and the initialized scales are
computed once, and the last row reuses the Stage I run of the row before it (so its CPU time is
Stage II's alone). A rerun with the same --work-dir reuses finished stages.

    OMP_NUM_THREADS=1 python bench/tinysd_finetune_table.py [--model tiny-sd|tiny-sdxl] [--stage1-steps 400]
        [--stage2-steps 400] [--lr 1e-5] [--batch-size 32] [--n-per-digit 50] [--seeds 0,1,2] [--work-dir DIR] [--out table.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rows(args) -> list[tuple[str, int, int, dict]]:
    """(name, stage1 steps, stage2 steps, Stage I settings)."""
    s1, s2 = args.stage1_steps, args.stage2_steps
    return [
        ("init only", 0, 0, {}),
        ("I: noise distillation, uniform t", s1, 0, {"feat_weight": 0.0, "t_sampling": "uniform"}),
        ("I: + feature distillation", s1, 0, {"t_sampling": "uniform"}),
        ("I: + Beta(3,1) t sampling", s1, 0, {}),
        ("I + II", s1, s2, {}),
        ("uniform 2-bit", 0, 0, {"recipe": "uniform-2"}),
    ]


def main():
    import torch

    import bfq
    from bfq.format.inspect import summarize
    from bfq.pipeline.finetune import FinetuneConfig
    from bfq.pipeline.quantize import quantize
    from bfq.tinysd.evaluate import DEFAULT_CFG, DEFAULT_STEPS, ddim_sampler

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-sd", choices=("tiny-sd", "tiny-sdxl", "tiny-pixart"), help="the bundled tiny model")
    parser.add_argument("--bits", type=float, default=1.99)
    parser.add_argument("--allocator", default="optimal", help="the allocator of --bits (the published table: optimal)")
    parser.add_argument("--stage1-steps", type=int, default=400)
    parser.add_argument("--stage2-steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--stage2-lr", type=float, help="Stage II learning rate (default: --lr)")
    parser.add_argument("--stage2-grad-accum", type=int, default=1, help="Stage II micro-batches per step")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--n-per-digit", type=int, default=50, help="images per digit for the metric (CFG %g)" % DEFAULT_CFG)
    parser.add_argument("--seeds", default="0", help="comma-separated evaluation seeds (prompts and initial noise); the table gives the mean")
    parser.add_argument("--only", help="comma-separated row numbers (1 = init only, 6 = uniform 2-bit) to run; fp32 runs unless --no-fp32")
    parser.add_argument("--no-fp32", action="store_true", help="skip the fp32 row (when completing a table)")
    parser.add_argument("--work-dir", help="keep the analysis, scales and checkpoints here (default: a temporary one)")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    metric = dict(n_per_digit=args.n_per_digit, steps=DEFAULT_STEPS, cfg_scales=(DEFAULT_CFG,))
    base = FinetuneConfig(lr=args.lr, batch_size=args.batch_size, progress=False)
    stage2 = base.replace(lr=args.stage2_lr or args.lr, grad_accum=args.stage2_grad_accum)
    seeds = [int(x) for x in args.seeds.split(",")]
    if args.model != "tiny-sd":
        from bfq.families import family_for_name

        metric["base"] = str(family_for_name(args.model).tiny_pipeline_dir())
    results = [] if args.no_fp32 else [{"row": "fp32", "avg_bits": 32.0, **_scores(None, metric, seeds)}]
    if results:
        _print(results[-1])
    wanted = {int(i) for i in args.only.split(",")} if args.only else None
    with tempfile.TemporaryDirectory() as tmp:
        work_dir = Path(args.work_dir or tmp)
        for i, (name, s1, s2, settings) in enumerate(rows(args), 1):
            if wanted and i not in wanted:
                continue
            path = work_dir / f"row{i}.bfq"
            settings = dict(settings)
            plan = {"recipe": settings.pop("recipe")} if "recipe" in settings else {"bits": args.bits, "allocator": args.allocator}
            done = quantize(args.model, path, **plan, steps=DEFAULT_STEPS, scheduler=ddim_sampler(metric.get("base")),
                            work_dir=work_dir, progress=False,
                            stage1_steps=s1, stage2_steps=s2, finetune_config=base.replace(**settings),
                            finetune_stage2_config=stage2)  # fmt: skip
            scores = _scores(bfq.load_unet(path, dtype=torch.float32), metric, seeds)
            results.append({"row": name, "avg_bits": summarize(path)["avg_bits"], "stage1_steps": s1, "stage2_steps": s2,
                            "finetune_s": done.seconds.get("finetune", 0.0), **scores})  # fmt: skip
            _print(results[-1])
    print(f"\n{args.model}; metric: tiny-sd's, {10 * args.n_per_digit} images, DDIM {DEFAULT_STEPS}, CFG {DEFAULT_CFG:g}, "
          f"mean over seeds {seeds}; "
          f"batch {args.batch_size}, lr {args.lr:g} (Stage II {stage2.lr:g}, {stage2.grad_accum} micro-batches a step), {torch.get_num_threads()} torch thread")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


def _scores(unet, metric: dict, seeds: list[int]) -> dict:
    """Mean alignment and FD over the evaluation seeds, and the FD of each."""
    from bfq.tinysd.evaluate import evaluate

    runs = [evaluate(unet, seed=seed, **metric) for seed in seeds]
    return {"alignment": sum(r["alignment"] for r in runs) / len(runs), "fd": sum(r["fd"] for r in runs) / len(runs),
            "fd_per_seed": [r["fd"] for r in runs]}  # fmt: skip


def _print(row: dict) -> None:
    steps = f"{row.get('stage1_steps', 0):>4} + {row.get('stage2_steps', 0):<4}" if "stage1_steps" in row else " " * 11
    cpu = f"{row['finetune_s']:7.0f} s" if row.get("finetune_s") else " " * 9
    print(f"{row['row']:<34} bits {row['avg_bits']:6.3f}  steps {steps} {cpu}  alignment {row['alignment']:.3f}  FD {row['fd']:6.2f}  "
          f"(per seed {', '.join(f'{x:.2f}' for x in row['fd_per_seed'])})", flush=True)


if __name__ == "__main__":
    main()
