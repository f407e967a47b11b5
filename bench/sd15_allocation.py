"""What each allocator gives SD-v1.5's cross-attention to_k/to_v at 1.99 bits (issue 14, defect 4).

A full proxy analysis of SD-v1.5 (768 candidates at 64x64 latents) takes days on a CPU, so this
runs a *reduced* one of ``sd15-random`` (the SD-v1.5 UNet shape with seeded random weights, random
text embeddings): the real weights and analysis code, but latents of ``--latent`` x ``--latent``
(the UNet's ``sample_size`` overridden), ``--prompts`` prompts, ``--timesteps`` trajectory states
of a ``--steps``-step DDIM trajectory. The file is resumable (rerun with the same ``--sens``).
Then it prints, per allocator at ``--bits``, the bits of the 16 cross-attention to_k and to_v
layers, the weight-weighted mean bits per layer class, and how alike the two measures are.

    OMP_NUM_THREADS=1 python bench/sd15_allocation.py --sens sd15-proxy8.json   # ~1 h on one thread
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CLASSES = (("cross-attn to_k/to_v", ("attn2.to_k", "attn2.to_v")), ("cross-attn q/out", ("attn2",)),
           ("self-attn", ("attn1",)), ("conv_shortcut", ("conv_shortcut",)), ("resnet conv1/conv2", ("resnets",)),
           ("ff", ("ff.net",)), ("proj_in/out", ("proj_in", "proj_out")), ("samplers", ("sampler",)))  # fmt: skip
ROWS = (("optimal", {}), ("optimal-align", {"align_weight": 0.3}), ("optimal-align", {}),
        ("optimal-align", {"align_weight": 3.0}), ("paper", {}))  # fmt: skip


def _class(name: str) -> str | None:
    return next((c for c, keys in CLASSES if any(k in name for k in keys)), None)


def _class_means(bits: dict, counts: dict) -> dict:
    sums: dict[str, list[float]] = {}
    for name, b in bits.items():
        c = _class(name)
        if c is not None:
            s = sums.setdefault(c, [0.0, 0.0])
            s[0], s[1] = s[0] + b * counts[name], s[1] + counts[name]
    return {c: s[0] / s[1] for c, s in sums.items()}


def main():
    import torch

    from bfq.pipeline.allocate import allocate
    from bfq.pipeline.analyze import analyze
    from bfq.pipeline.models import resolve_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sens", required=True, help="the sensitivity file (written, or resumed)")
    parser.add_argument("--latent", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--timesteps", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--bits", type=float, default=1.99)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = resolve_model("sd15-random")
    model.unet.register_to_config(sample_size=args.latent)
    sens = analyze(model.unet, out=args.sens, mode="proxy", scheduler=model.scheduler, source=model.source,
                   n_prompts=args.prompts, n_timesteps=args.timesteps, steps=args.steps, device="cpu")  # fmt: skip
    counts = {n: e["n_weights"] for n, e in sens["layers"].items()}
    for method, kwargs in ROWS:
        a = allocate(sens, args.bits, method, **kwargs)
        k = [b for n, b in a.bits.items() if "attn2.to_k" in n]
        v = [b for n, b in a.bits.items() if "attn2.to_v" in n]
        label = f"{method}" + (f" (weight {kwargs['align_weight']:g})" if kwargs else "")
        print(f"{label:<28} {a.avg_bits:.4f} bits  to_k {k} (mean {np.mean(k):.2f})  to_v {v} (mean {np.mean(v):.2f})")
        print("    mean bits by class: " + ", ".join(f"{c} {m:.2f}" for c, m in _class_means(a.bits, counts).items()))
    layers = [e for e in sens["layers"].values() if "errors" in e]
    for b in sens["settings"]["bits"]:
        mse = [e["errors"][str(b)]["mse"] for e in layers]
        guidance = [e["errors"][str(b)]["guidance_err"] for e in layers]
        print(f"{b} bit(s): Pearson correlation of mse and guidance_err over layers {np.corrcoef(mse, guidance)[0, 1]:.4f}")
    print(json.dumps({"settings": {k: sens["settings"][k] for k in ("n_prompts", "n_timesteps", "steps", "conditioning")}}))


if __name__ == "__main__":
    main()
