"""PixArt-Σ-shaped diffusion transformer at 1.99 bits (issue 22's benchmark), on `pixart-random`.

    OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python bench/pixart_bench.py [--work DIR] [--file F.bfq] [--runs 3]

Measures, printing how each figure was obtained:

* quantize: `bfq quantize pixart-random --recipe R` in a fresh process (20-step DPM-Solver
  scheduler cache, layer-by-layer conversion from the lazy model): wall time and peak RSS (VmHWM).
  R is a 1.99-bit recipe made here from the layer sizes alone (every layer at 2 bits, then the
  largest at 1 bit until the paper's accounting reaches the budget): file size, memory and speed
  depend on how many weights have each bit-width, not on which (the per-layer sensitivity analysis
  of a transformer chooses *which*); skipped with ``--file``;
* file size of the .bfq;
* memory: each runtime loaded in a fresh process: RSS after load minus RSS before (torch,
  diffusers and bfq imported) and the bytes of the module's parameters, buffers and workspace
  (`bfq.runtime.packed.resident_bytes`): packed, dense fp16, dense fp32;
* speed: one forward of batch 2 (classifier-free guidance) at 512x512 (64x64 latents, 1024
  tokens), T5 features of 300 tokens, fp32, one torch thread, packed and dense fp32 in one process,
  alternating: a warm-up forward each, then ``--runs`` timed ones each (median wall and CPU time);
* the time cache: what it removes per sampler step, the adaLN-single MLP and projection
  (`adaln_single.emb.timestep_embedder`, `adaln_single.linear`): weights, FLOPs of a batch-2 step,
  and the measured time of the float module against the cached lookup (median of 200 calls).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))

from packed_bench import _PEAK, median, rss  # noqa: E402

BUDGET = 1.99
STEPS = 20  # PixArtSigmaPipeline's default, what `bfq quantize pixart-random` caches
SEQ = 300  # PixArt-Σ's T5 sequence length


def _child(fn: str, *args) -> dict:
    code = f"import json,sys; sys.path.insert(0, {str(HERE.parent)!r}); import pixart_bench as b; " \
           f"print(json.dumps(b.{fn}(*{list(args)!r})))"  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"})  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"{fn}{args} failed: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _hwm() -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))


def make_recipe(path: Path) -> dict:
    """The size-greedy 1.99-bit recipe (see the module docstring), saved as a recipe file."""
    from bfq.families.build import build_meta_unet
    from bfq.families.pixart import FAMILY
    from bfq.quant import recipe as recipes
    from bfq.quant.timecache import n_time_features

    model = build_meta_unet(FAMILY.config())
    n_tf = n_time_features(model, "scheduler", STEPS)
    layers = recipes.quantizable_layers(model, "scheduler")
    bits = {name: 2 for name in layers}
    plan = recipes.Recipe("pixart-size-greedy-1.99", "balanced", bits)
    for name in sorted(layers, key=lambda n: -layers[n]):
        if recipes.summarize(plan, model, "scheduler", n_tf)["avg_bits"] <= BUDGET:
            break
        bits[name] = 1
    summary = recipes.summarize(plan, model, "scheduler", n_tf)
    plan.notes = "size-greedy: 2 bits, the largest layers at 1 bit until the budget (bench/pixart_bench.py)"
    plan.save(path)
    return {k: summary[k] for k in ("avg_bits", "layers_by_bits", "n_quantized_weights", "n_time_features", "n_weights_total")}


def run_quantize(path: Path, recipe: Path) -> dict:
    args = ["quantize", "pixart-random", "--recipe", str(recipe), "-o", str(path), "--force", "--quiet"]
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _PEAK, *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"})  # fmt: skip
    seconds = time.perf_counter() - t0
    peaks = [int(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("peak_rss")]
    if done.returncode or not peaks:
        raise RuntimeError(f"bfq quantize failed: {done.stderr[-3000:]}")
    return {"seconds": seconds, "peak_rss": peaks[0]}


def _load(path: str, runtime: str, dtype: str):
    import torch

    import bfq

    return bfq.load_transformer(path, runtime=runtime, dtype=getattr(torch, dtype))


def memory_child(path: str, runtime: str, dtype: str) -> dict:
    import torch
    from diffusers import PixArtTransformer2DModel  # noqa: F401  (imports count before the baseline, not in it)

    import bfq.runtime.load  # noqa: F401
    from bfq.runtime.packed import resident_bytes

    torch.set_num_threads(1)
    torch.ones(8, 8) @ torch.ones(8, 8)
    before = rss()
    model = _load(path, runtime, dtype)
    return {"rss_load": rss() - before, "module_bytes": resident_bytes(model), "peak_rss": _hwm()}


def _inputs(model):
    import torch

    from bfq.families import family_of

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 64, 64, generator=gen)
    return x, family_of(model).conditioning(dict(model.config), 2, height=64, width=64, seq_len=SEQ, generator=gen)


def speed_child(path: str, runs: int) -> dict:
    """Packed and dense fp32 in this one process, alternating, each after its own warm-up forward."""
    import torch

    from bfq.families import family_of
    from bfq.format import open_bfq

    torch.set_num_threads(1)
    models = {"packed": _load(path, "packed", "float32"), "dense": _load(path, "dense", "float32")}
    family = family_of(models["dense"])
    x, cond = _inputs(models["dense"])
    with open_bfq(path) as f:
        t = torch.tensor([float(f.header.time_cache.timesteps[0])] * 2)
    times = {k: [] for k in models}
    outputs = {}
    with torch.no_grad():
        for i in range(runs + 1):
            for name, model in models.items():
                wall, cpu = time.perf_counter(), time.process_time()
                outputs[name] = family.forward(model, x, t, cond)
                if i:  # the first round is the warm-up
                    times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    out = {name: {"wall_s": median([w for w, _ in ts]), "cpu_s": median([c for _, c in ts]),
                  "all_wall_s": [w for w, _ in ts]} for name, ts in times.items()}  # fmt: skip
    out["packed_equals_dense"] = bool(torch.equal(outputs["packed"], outputs["dense"]))
    out["peak_rss"] = _hwm()
    return out


def time_cache_child(path: str) -> dict:
    """Weights, FLOPs and measured time of the float adaLN-single path against the cached lookup."""
    import torch

    from bfq.families.lazy import filled, lazy_unet, random_source
    from bfq.families.pixart import FAMILY

    torch.set_num_threads(1)
    config = FAMILY.config()
    float_model = lazy_unet(config, random_source(config, 0))
    cached = _load(path, "packed", "float32")
    t = torch.tensor([float(cached.adaln_single._state.keys[0])] * 2)
    cached.adaln_single._state.pre_hook(cached, (torch.zeros(2, 4, 64, 64), None, t), {})
    kwargs = dict(added_cond_kwargs={"resolution": None, "aspect_ratio": None}, batch_size=2, hidden_dtype=torch.float32)
    result = {}
    with torch.no_grad(), filled(float_model, FAMILY.is_time_layer):
        ada = float_model.adaln_single
        linears = [m for m in ada.modules() if isinstance(m, torch.nn.Linear)]
        weights = sum(m.weight.numel() for m in linears)
        result["weights"] = weights
        result["params"] = sum(p.numel() for p in ada.parameters())
        result["flops_batch2"] = 2 * 2 * weights
        for name, module in (("float", ada), ("cached", cached.adaln_single)):
            samples = []
            for _ in range(200):
                t0 = time.perf_counter()
                module(t, **kwargs)
                samples.append(time.perf_counter() - t0)
            result[f"{name}_s"] = median(samples)
    result["model_weights"] = sum(m.weight.numel() for m in float_model.modules() if type(m) in (torch.nn.Linear, torch.nn.Conv2d))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/bfq-pixart-bench")
    parser.add_argument("--file", help="a pixart-random .bfq (skips the quantize step)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = {"machine": f"{os.cpu_count()} CPUs (shared), torch threads 1"}
    if args.file:
        path = Path(args.file)
    else:
        recipe = work / "pixart-1.99.json"
        out["recipe"] = make_recipe(recipe)
        print(f"recipe: {out['recipe']}", flush=True)
        path = work / "pixart-random-1.99.bfq"
        print("bfq quantize pixart-random --recipe (fresh process) ...", flush=True)
        out["quantize"] = run_quantize(path, recipe)
        print(f"  {out['quantize']['seconds']:.0f} s, peak RSS {out['quantize']['peak_rss'] / 1e9:.2f} GB", flush=True)
    out["file_bytes"] = path.stat().st_size
    print(f"file {out['file_bytes'] / 1e6:.1f} MB", flush=True)

    print("memory (fresh process each):", flush=True)
    out["memory"] = {}
    for label, runtime, dtype in [("packed", "packed", "float32"), ("dense fp16", "dense", "float16"),
                                  ("dense fp32", "dense", "float32")]:  # fmt: skip
        out["memory"][label] = m = _child("memory_child", str(path), runtime, dtype)
        print(f"  {label:11s} RSS +{m['rss_load'] / 1e9:.3f} GB after load; modules {m['module_bytes'] / 1e9:.3f} GB; "
              f"process peak {m['peak_rss'] / 1e9:.2f} GB", flush=True)  # fmt: skip

    print("time cache (per sampler step, batch 2):", flush=True)
    out["time_cache"] = c = _child("time_cache_child", str(path))
    print(f"  removes adaln_single: {c['weights']:,} weights ({c['params']:,} parameters, "
          f"{100 * c['weights'] / c['model_weights']:.2f}% of the model's {c['model_weights']:,}), "
          f"{c['flops_batch2'] / 1e6:.1f} MFLOP a step; float {c['float_s'] * 1e3:.2f} ms vs cached "
          f"{c['cached_s'] * 1e3:.3f} ms", flush=True)  # fmt: skip

    if not args.skip_speed:
        print(f"one forward, batch 2, 512x512, T5 seq {SEQ}, fp32, 1 thread, packed and dense in one process:", flush=True)
        out["speed"] = s = _child("speed_child", str(path), args.runs)
        for key in ("wall_s", "cpu_s"):
            s[f"ratio_{key}"] = s["packed"][key] / s["dense"][key]
        print(f"  packed {s['packed']['wall_s']:.1f} s wall ({s['packed']['cpu_s']:.1f} s CPU), dense fp32 "
              f"{s['dense']['wall_s']:.1f} s wall ({s['dense']['cpu_s']:.1f} s CPU): packed / dense "
              f"{s['ratio_wall_s']:.3f}x wall, {s['ratio_cpu_s']:.3f}x CPU; outputs equal: {s['packed_equals_dense']}", flush=True)  # fmt: skip
        print(f"  the cached adaLN-single path is {c['float_s'] / s['dense']['wall_s'] * 100:.4f}% of a dense forward", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
