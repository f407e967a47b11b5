"""bf16 against fp32 compute of the same .bfq on tiny-sd (issue 21's quality check).

    python bench/compute_quality.py FILE.bfq [N_PER_DIGIT]      # default 20 images per digit

`bfq eval`'s scores (alignment, Fréchet distance) at CFG 3.0 for seeds 0, 1, 2 with the UNet
computing in fp32 and in bf16 (bfq.load_unet(..., dtype=torch.bfloat16): bf16 behind a float32
pipeline), and the largest pixel difference (0..255) of one fixed-seed 20-step image. One thread.
"""

import json
import sys
import time

import numpy as np
import torch

import bfq
import bfq.tinysd.evaluate as ev
from bfq.tinysd import pipeline_dir

DTYPES = (("fp32", torch.float32), ("bf16", torch.bfloat16))


def main() -> None:
    path = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    res = {}
    for seed in (0, 1, 2):
        for name, dtype in DTYPES:
            t0 = time.time()
            r = ev.evaluate(bfq.load_unet(path, dtype=dtype), n_per_digit=n, cfg_scales=(3.0,), seed=seed, threads=1)
            res[f"{name} seed {seed}"] = {"alignment": r["alignment"], "fd": r["fd"], "seconds": time.time() - t0}
            print(name, seed, r["alignment"], round(r["fd"], 3), f"{time.time() - t0:.1f} s", flush=True)
    images = {}
    for name, dtype in DTYPES:
        pipe = ev._pipeline(bfq.load_unet(path, dtype=dtype), pipeline_dir())
        size = pipe.unet.config.sample_size
        latents = torch.randn((1, 4, size, size), generator=torch.Generator().manual_seed(0))
        images[name] = ev.generate(pipe, ["a handwritten digit seven"], latents, 3.0, 20)
    diff = np.abs(images["fp32"] - images["bf16"]) * 255
    res["pixel"] = {"max_abs_0_255": float(diff.max()), "mean_abs_0_255": float(diff.mean())}
    print(json.dumps(res["pixel"]))


if __name__ == "__main__":
    main()
