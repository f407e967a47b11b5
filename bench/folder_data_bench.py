"""Training throughput with ``--data folder:PATH`` on tiny-sd's pipeline (issue 14, defect 3).

Writes tiny-sd's first ``--images`` digits as an image+caption folder (unless ``--folder`` exists),
makes the batch source as ``bfq finetune tiny-sd --data folder:PATH --work-dir W`` does
(``make_source``; the cache, where the code has one, in a temporary work directory) and runs Stage I
(``finetune``) for ``--steps`` steps at ``--batch-size`` on a 2-bit tiny-sd, twice with the same
work directory (the second source reuses whatever the first left). Reported per run: data
preparation and training, each in wall seconds and CPU seconds of this process, the CPU time of
making one batch (mean of 10), and training
samples per wall second and per CPU second (the CPU figure is the one to compare on a shared
machine: it does not count the time other processes hold the cores).

    OMP_NUM_THREADS=1 python bench/folder_data_bench.py --folder /tmp/digits [--images 512] [--steps 40]
    OMP_NUM_THREADS=1 python bench/folder_data_bench.py --folder /tmp/digits --code OLD_CHECKOUT   # "before"

``--code DIR`` imports ``bfq`` from another checkout (e.g. ``git archive`` of the commit before the
data cache) for the numbers before the change; the folder must exist then.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import sys
import tempfile
import time
from pathlib import Path


class _Clock:
    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", required=True)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--code", help="import bfq from this checkout instead")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(args.code or Path(__file__).resolve().parents[1]).resolve()))
    import torch

    import bfq
    from bfq.pipeline.finetune import FinetuneConfig, finetune, float_teacher
    from bfq.pipeline.finetune.data import make_source
    from bfq.pipeline.models import resolve_model
    from bfq.quant.nn import quantize_unet
    from bfq.quant.recipe import uniform_recipe
    from bfq.tinysd import pipeline_dir

    torch.set_num_threads(1)
    folder = Path(args.folder)
    if not folder.is_dir():
        from bfq.tinysd.data import write_digit_folder

        write_digit_folder(folder, args.images)
    unet = resolve_model("tiny-sd").unet
    quantize_unet(unet, uniform_recipe(unet, 2).bits, progress=False)
    teacher = float_teacher(unet)
    cfg = FinetuneConfig(steps=args.steps, batch_size=args.batch_size, lr=1e-4, log_every=0, progress=False)
    print(f"bfq from {Path(bfq.__file__).parent}; {len(list(folder.glob('*.png')))} images; "
          f"{args.steps} steps of batch {args.batch_size}; torch threads 1", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        cached = "cache_dir" in inspect.signature(make_source).parameters
        extra = {"cache_dir": Path(tmp) / "data"} if cached else {}
        for run in ("first run", "second run"):
            with _Clock() as prep:
                source = make_source(f"folder:{folder}", model_name="tiny-sd", pipeline_dir=pipeline_dir(),
                                     batch_size=args.batch_size, **extra)  # fmt: skip
            with _Clock() as batches:
                for i in range(10):
                    source.batch(i)
            with _Clock() as train:
                finetune(copy.deepcopy(unet), teacher, source, cfg)
            n = args.steps * args.batch_size
            print(f"{run}: data {prep.wall:.1f} s wall / {prep.cpu:.1f} s CPU, then {100 * batches.cpu:.2f} CPU ms a batch; "
                  f"training {train.wall:.1f} s wall / "
                  f"{train.cpu:.1f} s CPU = {n / train.wall:.1f} samples/s, {n / train.cpu:.1f} samples per CPU s",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
