"""stable-diffusion.cpp beside bfq on the SDXL shape (issue 19's peer benchmark), on this CPU.

    pip install stable-diffusion-cpp-python     # optional peer: builds sd.cpp from source (CPU, ~20 min)
    OMP_NUM_THREADS=1 python bench/peers/sdcpp_bench.py [--work DIR] [--wtype q2_K f16] [--steps 3]
                                                       [--bfq-file sdxl.bfq]

Without the package it prints one line saying how to install it and exits 0.

Weights: one fp16 safetensors checkpoint of the whole SDXL pipeline (UNet, both text encoders,
VAE) under key prefixes sd.cpp's loader maps (``model_path=<file>``); sd.cpp converts it to
``wtype`` at load. The UNet holds exactly bfq's ``sdxl-random`` weights (``bfq.families.lazy.random_source``,
seed 0, rounded to fp16); the text encoders (CLIP ViT-L and bigG shapes) and the VAE are seeded
random weights of the SDXL shapes. Every tensor is made and written one at a time, so writing the
6.9 GB file needs well under 1 GB.

Measured, each ``wtype`` in a fresh process, one sd.cpp thread:

* load: wall time of ``StableDiffusion(...)`` (reading fp16 and converting to ``wtype``), RSS
  after load minus RSS before, and sd.cpp's own figure for the UNet's parameter memory
  (its ``diffusion_model ...MB`` log line);
* speed: ``generate_image`` at 512x512 with ``cfg_scale`` 7 (two UNet evaluations per step, the
  work of bfq's batch-2 forward), ``--steps`` steps; seconds per step from sd.cpp's progress
  callback (its running average per step, so step k's own time is k*avg_k - (k-1)*avg_(k-1));
  the median over steps 2.. is reported (step 1 includes first-use allocation).

bfq's side: with ``--bfq-file`` (a ``bfq quantize sdxl-random --bits 1.99`` output) the packed
runtime is measured here with bench/sdxl_bench.py's functions (fresh processes); without it the
figures recorded by bench/sdxl_bench.py in README.md are printed, labelled as recorded.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve()
BENCH = HERE.parent.parent
sys.path.insert(0, str(BENCH))

INSTALL = "pip install stable-diffusion-cpp-python"
# bench/sdxl_bench.py on this machine (README "SDXL results"): packed 1.99-bit sdxl-random
RECORDED_BFQ = {"rss_load_gb": 0.708, "forward_s": 102.7, "what": "batch-2 512x512 UNet forward, 1 thread"}

CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
          "hidden_act": "quick_gelu", "projection_dim": 768}  # fmt: skip
CLIP_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
          "hidden_act": "gelu", "projection_dim": 1280}  # fmt: skip
VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
       "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
       "up_block_types": ["UpDecoderBlock2D"] * 4, "sample_size": 1024, "scaling_factor": 0.13025}  # fmt: skip


def rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# ---------------------------------------------------------------- weights


def _generic_source(meta, seed: int):
    """Seeded random values for ``meta``'s parameters (by name, any order): Linear/Conv2d as
    PyTorch's default bound, norms 1/0, embeddings N(0, 0.02)."""
    import numpy as np
    import torch
    from torch import nn

    owner = {f"{m}.{p}" if m else p: mod
             for m, mod in meta.named_modules() for p, _ in mod.named_parameters(recurse=False)}  # fmt: skip

    def source(name: str, shape: tuple) -> torch.Tensor:
        mod = owner[name]
        if isinstance(mod, (nn.GroupNorm, nn.LayerNorm)):
            return torch.full(shape, 1.0 if name.endswith("weight") else 0.0)
        rng = np.random.Generator(np.random.SFC64([seed, zlib.crc32(name.encode())]))
        if isinstance(mod, nn.Embedding):
            return torch.from_numpy(rng.standard_normal(math.prod(shape), dtype=np.float32).reshape(shape) * 0.02)
        bound = 1.0 / math.sqrt(mod.weight[0].numel())
        return torch.from_numpy((rng.random(math.prod(shape), dtype=np.float32) * (2 * bound) - bound).reshape(shape))

    return source


def write_safetensors(path: Path, entries: list) -> None:
    """An fp16 safetensors file of ``entries`` ((name, shape, make) with ``make()`` the tensor), each
    tensor made and written alone (streaming: memory is one tensor, not the file)."""
    import torch

    header, offset = {}, 0
    for name, shape, _ in entries:
        size = 2 * math.prod(shape)
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for _, shape, make in entries:
            f.write(make().to(torch.float16).contiguous().reshape(shape).numpy().tobytes())
    tmp.replace(path)


def _entries(prefix: str, meta, values, clip: bool = False) -> list:
    def key(n: str) -> str:  # transformers 5 names CLIPTextModel's parameters without its text_model.
        return prefix + ("text_model." + n if clip and not n.startswith(("text_model.", "text_projection")) else n)

    return [(key(n), tuple(p.shape), lambda n=n, s=tuple(p.shape): values(n, s)) for n, p in meta.named_parameters()]


def write_sdxl_checkpoint(path: Path, seed: int = 0) -> Path:
    """The single-file SDXL checkpoint sd.cpp loads (see the module docstring); kept between runs.

    Key prefixes are the ones sd.cpp's loader maps: ``unet.`` + diffusers UNet names (it converts
    them to the original layout), ``te.`` + the ViT-L text encoder, ``cond_stage_model.1.transformer.``
    + the bigG one, ``vae.`` + diffusers VAE names."""
    if path.is_file():
        return path
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from bfq.families import family_for_name
    from bfq.families.build import build_meta_unet
    from bfq.families.lazy import random_source

    config = family_for_name("sdxl").config()
    unet_values = random_source(config, seed)
    with torch.device("meta"):
        vae = AutoencoderKL(**VAE)
        te_l = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        te_g = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))
    entries = _entries("unet.", build_meta_unet(config), lambda n, s: unet_values(n))
    entries += _entries("te.", te_l, _generic_source(te_l, seed + 1), clip=True)
    entries += _entries("cond_stage_model.1.transformer.", te_g, _generic_source(te_g, seed + 2), clip=True)
    entries += _entries("vae.", vae, _generic_source(vae, seed + 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(path, entries)
    return path


# ---------------------------------------------------------------- sd.cpp, one process per wtype


def sdcpp_child(ckpt: str, wtype: str, steps: int) -> dict:
    from stable_diffusion_cpp import StableDiffusion

    before = rss()
    t0 = time.perf_counter()
    sd = StableDiffusion(model_path=ckpt, wtype=wtype, n_threads=1, verbose=True)
    load_s, rss_load = time.perf_counter() - t0, rss() - before
    averages = {}

    def progress(step: int, total: int, avg: float) -> None:
        if total == steps and step >= 1 and step not in averages:
            averages[step] = avg

    t0 = time.perf_counter()
    sd.generate_image(prompt="a photo of a cat", negative_prompt="", width=512, height=512, cfg_scale=7.0,
                      sample_steps=steps, seed=0, progress_callback=progress)  # fmt: skip
    total_s = time.perf_counter() - t0
    per_step = [k * averages[k] - (k - 1) * averages.get(k - 1, 0.0) for k in sorted(averages)]
    return {"wtype": wtype, "load_s": load_s, "rss_load": rss_load, "per_step_s": per_step,
            "generate_s": total_s, "peak_rss": _hwm()}  # fmt: skip


def _hwm() -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))


def run_sdcpp(ckpt: Path, wtype: str, steps: int) -> dict:
    code = f"import json,sys; sys.path.insert(0, {str(HERE.parent)!r}); import sdcpp_bench as b; " \
           f"print('RESULT ' + json.dumps(b.sdcpp_child({str(ckpt)!r}, {wtype!r}, {steps})))"  # fmt: skip
    log = ckpt.parent / f"sdcpp-{wtype}.log"
    with open(log, "w") as err:  # sd.cpp's own log, followable while it runs
        done = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=err, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    text = done.stdout + log.read_text(errors="replace")
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"sd.cpp ({wtype}) failed (exit {done.returncode}), log {log}: {text[-3000:]}")
    out = json.loads(lines[-1][len("RESULT "):])
    unet_mb = re.findall(r"diffusion_model ([0-9.]+)MB", text)
    out["unet_params_bytes"] = float(unet_mb[-1]) * 2**20 if unet_mb else None
    return out


def bfq_side(bfq_file: str | None, runs: int) -> dict:
    if not bfq_file:
        return {"recorded": True, **RECORDED_BFQ}
    import sdxl_bench

    mem = sdxl_bench._child("memory_child", bfq_file, "packed", "float32")
    speed = sdxl_bench._child("speed_child", bfq_file, "packed", runs)
    return {"recorded": False, "rss_load_gb": mem["rss_load"] / 1e9, "module_gb": mem["module_bytes"] / 1e9,
            "forward_s": speed["wall_s"], "what": RECORDED_BFQ["what"]}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/bfq-sdcpp-bench", help="where the SDXL checkpoint is written (kept)")
    parser.add_argument("--wtype", nargs="+", default=["q2_K"], help="sd.cpp weight types to measure (e.g. q2_K f16)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--bfq-file", help="measure bfq's packed runtime on this sdxl-random 1.99-bit .bfq here")
    parser.add_argument("--runs", type=int, default=1, help="timed bfq forwards (with --bfq-file)")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    if importlib.util.find_spec("stable_diffusion_cpp") is None:
        print(f"sdcpp_bench: stable-diffusion-cpp-python is not installed ({INSTALL}); nothing measured")
        return 0
    ckpt = Path(args.work) / "sdxl-random-fp16.safetensors"
    print(f"the SDXL-shaped fp16 checkpoint {ckpt} (written once, kept for reruns) ...", flush=True)
    t0 = time.perf_counter()
    write_sdxl_checkpoint(ckpt)
    print(f"  {time.perf_counter() - t0:.0f} s", flush=True)
    out = {"sdcpp": {}}
    for wtype in args.wtype:
        print(f"sd.cpp {wtype}: load + 512x512 generation, {args.steps} steps, cfg 7, 1 thread (fresh process; "
              f"its log: {ckpt.parent}/sdcpp-{wtype}.log) ...", flush=True)  # fmt: skip
        r = out["sdcpp"][wtype] = run_sdcpp(ckpt, wtype, args.steps)
        steps = r["per_step_s"][1:] or r["per_step_s"]
        r["step_s"] = sorted(steps)[len(steps) // 2] if steps else None
        unet = f"{r['unet_params_bytes'] / 1e9:.3f} GB" if r["unet_params_bytes"] else "n/a"
        print(f"  load {r['load_s']:.0f} s, RSS after load +{r['rss_load'] / 1e9:.2f} GB (all four models), "
              f"UNet params {unet}, per step {', '.join(f'{s:.1f}' for s in r['per_step_s'])} s "
              f"(median of steps 2.. {r['step_s']:.1f} s), peak RSS {r['peak_rss'] / 1e9:.2f} GB",
              flush=True)  # fmt: skip
    out["bfq"] = b = bfq_side(args.bfq_file, args.runs)
    label = "recorded by bench/sdxl_bench.py" if b["recorded"] else "measured now"
    print(f"bfq packed 1.99-bit sdxl-random ({label}): RSS after load +{b['rss_load_gb']:.3f} GB (UNet only), "
          f"{b['forward_s']:.1f} s per {b['what']}")  # fmt: skip
    print("(machine shared with other jobs: timings are noisy)")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
