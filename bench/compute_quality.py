"""fp32 against bf16 and int8-activation compute of the same .bfq on tiny-sd (issue 21's quality check).

    python bench/compute_quality.py FILE.bfq [N_PER_DIGIT] [--variants fp32,bf16,int8,int8-calibrated]

`bfq eval`'s scores (alignment, Fréchet distance) at CFG 3.0 for seeds 0, 1, 2 with the UNet
computing in fp32, in bf16 (bfq.load_unet(..., dtype=torch.bfloat16): bf16 behind a float32
pipeline), with int8 activations (compute="int8": per-tensor dynamic, each input's own range) and
with int8 activations at calibrated per-layer ranges (int8-calibrated: the min/max each layer's
input reached while the model itself sampled 4 prompts, 20 DDIM steps, CFG 3, seed 1234; then
fixed), and the largest pixel difference (0..255) of one fixed-seed 20-step image against fp32.
One thread. Default 20 images per digit.
"""

import json
import sys
import time

import numpy as np
import torch

import bfq
import bfq.tinysd.evaluate as ev
from bfq.runtime.int8 import Int8Layer
from bfq.tinysd import pipeline_dir

CALIBRATION_PROMPTS = [f"a handwritten digit {d}" for d in ("two", "five", "seven", "nine")]


def calibrate(unet) -> int:
    """Fix each int8 layer's input range to what the model's own sampling reaches (CALIBRATION_PROMPTS)."""
    seen = {}

    def record(module, args):
        lo, hi = torch.aminmax(args[0].detach().float())
        old = seen.get(module, (0.0, 0.0))
        seen[module] = (min(old[0], float(lo)), max(old[1], float(hi)))

    layers = [m for m in unet.modules() if isinstance(m, Int8Layer)]
    hooks = [m.register_forward_pre_hook(record) for m in layers]
    pipe = ev._pipeline(unet, pipeline_dir())
    size = unet.config.sample_size
    latents = torch.randn((len(CALIBRATION_PROMPTS), 4, size, size), generator=torch.Generator().manual_seed(1234))
    ev.generate(pipe, CALIBRATION_PROMPTS, latents, 3.0, 20)
    for h in hooks:
        h.remove()
    for m in layers:
        m.act_range = seen[m]
    return len(layers)


def load(path, variant):
    if variant == "fp32":
        return bfq.load_unet(path, dtype=torch.float32)
    if variant == "bf16":
        return bfq.load_unet(path, dtype=torch.bfloat16)
    unet = bfq.load_unet(path, compute="int8")
    if variant == "int8-calibrated":
        calibrate(unet)
    return unet


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--variants")]
    variants = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--variants=")), "fp32,bf16,int8").split(",")
    path = args[0]
    n = int(args[1]) if len(args) > 1 else 20
    torch.set_num_threads(1)
    res = {}
    for seed in (0, 1, 2):
        for name in variants:
            t0 = time.time()
            r = ev.evaluate(load(path, name), n_per_digit=n, cfg_scales=(3.0,), seed=seed, threads=1)
            res[f"{name} seed {seed}"] = {"alignment": r["alignment"], "fd": r["fd"], "seconds": time.time() - t0}
            print(name, seed, r["alignment"], round(r["fd"], 3), f"{time.time() - t0:.1f} s", flush=True)
    for name in variants:
        rows = [res[f"{name} seed {s}"] for s in (0, 1, 2)]
        fds = " / ".join(f"{r['fd']:.2f}" for r in rows)
        print(f"{name}: alignment {np.mean([r['alignment'] for r in rows]):.4f}, FD {np.mean([r['fd'] for r in rows]):.3f} "
              f"(seeds {fds})", flush=True)  # fmt: skip
    images = {}
    for name in variants:
        pipe = ev._pipeline(load(path, name), pipeline_dir())
        size = pipe.unet.config.sample_size
        latents = torch.randn((1, 4, size, size), generator=torch.Generator().manual_seed(0))
        images[name] = ev.generate(pipe, ["a handwritten digit seven"], latents, 3.0, 20)
    for name in variants[1:]:
        diff = np.abs(images[variants[0]] - images[name]) * 255
        res[f"pixel {name}"] = {"max_abs_0_255": float(diff.max()), "mean_abs_0_255": float(diff.mean())}
        print(f"pixel difference {name} vs {variants[0]}: {json.dumps(res[f'pixel {name}'])}", flush=True)


if __name__ == "__main__":
    main()
