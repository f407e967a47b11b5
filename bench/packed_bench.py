"""Packed runtime against the dense one, on an SD-v1.5-shaped .bfq (issue 12's benchmarks).

    python bench/packed_bench.py                       # quantizes sd15-random with bitsfusion-sd15 first
    python bench/packed_bench.py --file sd15.bfq --runs 3 --threads 1,2 --sizes 64,32 --out packed.json

Measures, printing how each figure was obtained:

* memory: each runtime loaded in a fresh process: RSS after load and after one 256x256 forward,
  minus RSS before (torch, diffusers and bfq imported), and the bytes of the module's parameters,
  buffers and workspace (`bfq.runtime.packed.resident_bytes`); packed (read and memory-mapped),
  dense fp32, dense fp16;
* speed: one UNet forward, batch 2 (classifier-free guidance), at 512x512 (64x64 latents) and
  256x256 (32x32), each `--variants` entry (runtime and compute dtype: dense fp32, packed fp32,
  packed bf16, dense bf16, packed int8 = `compute="int8"`; bf16 on the CPU runs channels-last, see
  bfq.runtime.load) alternating in
  one process, `--runs` each, medians of wall time (and of process CPU time, steadier on a shared
  machine) and ratios to dense fp32, per torch thread count;
* decode: the packed runtime's decode alone, every layer in the blocks a forward uses, into the
  workspace, in fp32 and in bf16, next to `np.copyto` of the same output bytes, in the same run
  (G weights/s);
* generate: a whole `bfq generate` at 512x512, 4 steps, packed and dense, peak RSS of the process
  (`--base`: an SD-shaped pipeline directory; by default one is built with random VAE and text
  encoder weights, since no download is possible here);
* compile: eager vs `torch.compile` forward of the packed tiny-sd UNet (`--compile`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve()


def median(values):
    values = sorted(values)
    return values[len(values) // 2]


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def inputs(size: int, seq: int = 77, dim: int = 768):
    import torch

    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, size, size, generator=gen), torch.randn(2, seq, dim, generator=gen)


def first_timestep(path) -> float:
    from bfq.format import open_bfq

    with open_bfq(path) as f:
        cache = f.header.time_cache
    return float(cache.timesteps[0]) if cache is not None and cache.mode == "scheduler" else 500.0


# ------------------------------------------------------------------------------------ memory


def memory_child(path: str, runtime: str, dtype: str, mmap: bool) -> dict:
    """Runs in its own process: RSS deltas of loading and of a first forward."""
    import torch
    from diffusers import UNet2DConditionModel  # noqa: F401  (imports count before the baseline, not in it)

    import bfq
    import bfq.runtime.load  # noqa: F401
    from bfq.runtime.packed import resident_bytes

    torch.set_num_threads(1)
    torch.ones(8, 8) @ torch.ones(8, 8)  # torch's own lazy allocations happen before the baseline
    before = rss()
    unet = bfq.load_unet(path, runtime=runtime, dtype=getattr(torch, dtype), mmap=mmap)
    loaded = rss()
    out = {"rss_load": loaded - before, "module_bytes": resident_bytes(unet)}
    if dtype in ("float32", "bfloat16"):  # what CPUs compute in (an fp16 forward takes minutes here)
        x, ehs = inputs(32)
        with torch.no_grad():
            unet(x, first_timestep(path), ehs)
        out["rss_after_forward"] = rss() - before
    return out


def measure_memory(path: str) -> dict:
    out = {}
    for label, runtime, dtype, mmap in (("packed", "packed", "float32", False), ("packed bf16", "packed", "bfloat16", False),
                                        ("packed, mmap", "packed", "float32", True),
                                        ("dense fp32", "dense", "float32", False), ("dense fp16", "dense", "float16", False)):  # fmt: skip
        code = f"import json,sys; sys.path.insert(0, {str(HERE.parent)!r}); import packed_bench as b; " \
               f"print(json.dumps(b.memory_child({path!r}, {runtime!r}, {dtype!r}, {mmap!r})))"  # fmt: skip
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
        out[label] = json.loads(done.stdout.strip().splitlines()[-1])
        forward = out[label].get("rss_after_forward")
        after = f", +{forward / 1e9:.3f} GB after a 256x256 forward" if forward is not None else ""
        print(f"  {label:13s} RSS +{out[label]['rss_load'] / 1e9:.3f} GB after load{after}; "
              f"modules {out[label]['module_bytes'] / 1e9:.3f} GB", flush=True)  # fmt: skip
    return out


# ------------------------------------------------------------------------------------- speed


def _forward(unet, x, t, ehs) -> tuple[float, float]:
    import torch

    wall, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        unet(x, t, ehs)
    return time.perf_counter() - wall, time.process_time() - cpu


VARIANTS = ("dense fp32", "packed fp32", "packed bf16", "dense bf16", "packed int8")


def _variant(path: str, name: str, workspace_mb: int):
    """A model for a variant name: runtime and compute dtype (bf16 on the CPU computes with
    channels-last activations, see bfq.runtime.load)."""
    import torch

    import bfq

    runtime, dtype = name.split()
    if dtype == "int8":  # 8-bit activations on the int8 codes, the rest in bf16 where native (bfq.runtime.int8)
        unet = bfq.load_unet(path, runtime=runtime, compute="int8", workspace_bytes=workspace_mb << 20)
        return unet, unet.dtype
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    return bfq.load_unet(path, runtime=runtime, dtype=dtype, workspace_bytes=workspace_mb << 20), dtype


def measure_speed(path: str, threads: list[int], sizes: list[int], runs: int, workspaces_mb: list[int],
                  variants: list[str] = ("dense fp32", "packed fp32")) -> list[dict]:  # fmt: skip
    """Dense fp32 against the packed runtime in each variant (runtime, compute dtype, activation
    layout) and with each workspace size (the default first, for the plain packed fp32 variant); a
    workspace of at least the largest layer (118 MB for SD-v1.5) decodes every layer whole."""
    import torch

    models = {name: _variant(path, name, workspaces_mb[0]) for name in variants}
    for mb in workspaces_mb[1:]:
        models[f"packed fp32 {mb} MB"] = _variant(path, "packed fp32", mb)
    baseline = "dense fp32"
    t = first_timestep(path)
    rows = []
    for n in threads:
        torch.set_num_threads(n)
        for size in sizes:
            x, ehs = inputs(size)

            def run(name):
                unet, dtype = models[name]
                return _forward(unet, x.to(dtype), t, ehs.to(dtype))

            for name in models:  # warm-up
                run(name)
            times = {name: [] for name in models}
            for _ in range(runs):
                for name in models:  # interleaved, so drifting load hits every variant alike
                    times[name].append(run(name))
            row = {"threads": n, "latent": size, "image": 8 * size}
            for name, values in times.items():
                row[name] = {"wall_s": median(v[0] for v in values), "cpu_s": median(v[1] for v in values)}
                row[name]["ratio_wall"] = row[name]["wall_s"] / median(v[0] for v in times[baseline])
                row[name]["ratio_cpu"] = row[name]["cpu_s"] / median(v[1] for v in times[baseline])
            rows.append(row)
            others = ", ".join(f"{name} {row[name]['wall_s']:.2f} s {row[name]['ratio_wall']:.3f}x "
                               f"(CPU {row[name]['ratio_cpu']:.3f}x)" for name in models if name != baseline)  # fmt: skip
            print(f"  {n} thread(s), {8 * size}x{8 * size}: {baseline} {row[baseline]['wall_s']:.2f} s; {others}", flush=True)
    return rows


def measure_decode(path: str, threads: list[int], runs: int, dtype_name: str = "fp32") -> list[dict]:
    """The decode a packed forward performs, alone, next to np.copyto of the same bytes."""
    import numpy as np
    import torch

    import bfq
    from bfq.runtime.packed import packed_layers

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    unet = bfq.load_unet(path, runtime="packed", dtype=dtype)
    layers = [m for _, m in packed_layers(unet)]
    rows = []
    for n in threads:
        torch.set_num_threads(n)

        def decode_all():
            for m in layers:
                for c0, c1 in m._blocks():
                    count = (c1 - c0) * m.per_channel
                    m.dequantize(c0, c1, out=m.workspace.get(m.codes.device, dtype, count))

        largest = max(m.workspace.block_channels(m.per_channel, m.weight_shape[0], dtype) * m.per_channel for m in layers)
        src, dst = np.ones(largest, np.float32 if dtype_name == 'fp32' else np.uint16), np.empty(largest, np.float32 if dtype_name == 'fp32' else np.uint16)
        sizes = [(c1 - c0) * m.per_channel for m in layers for c0, c1 in m._blocks()]

        def copy_all():
            for count in sizes:
                np.copyto(dst[:count], src[:count])

        decode_all()
        decode_times, copy_times = [], []
        for _ in range(runs):
            t0 = time.perf_counter()
            decode_all()
            decode_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            copy_all()
            copy_times.append(time.perf_counter() - t0)
        weights = sum(sizes)
        row = {"threads": n, "dtype": dtype_name, "weights": weights, "decode_s": median(decode_times), "copyto_s": median(copy_times)}
        row["decode_gweights_s"] = weights / row["decode_s"] / 1e9
        row["copyto_gweights_s"] = weights / row["copyto_s"] / 1e9
        rows.append(row)
        print(f"  {n} thread(s): decode of {weights / 1e6:.0f} M weights into {dtype_name} {row['decode_s']:.3f} s "
              f"({row['decode_gweights_s']:.2f} G weights/s); np.copyto of the same bytes {row['copyto_gweights_s']:.2f} G/s", flush=True)  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------- generate


def sd_base_pipeline(folder: Path) -> Path:
    """An SD-v1.5-shaped pipeline directory without a UNet (bfq generate brings the quantized one):
    VAE and CLIP text encoder with SD-v1.5's shapes and random weights, tiny-sd's tokenizer, SD's
    PNDM scheduler."""
    if (folder / "model_index.json").is_file():
        return folder
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from bfq.pipeline.models import sd15_scheduler
    from bfq.tinysd import pipeline_dir

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                  up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
                  layers_per_block=2, latent_channels=4, sample_size=512).save_pretrained(folder / "vae")  # fmt: skip
    CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                 max_position_embeddings=77, vocab_size=49408)).save_pretrained(folder / "text_encoder")  # fmt: skip
    CLIPTokenizer.from_pretrained(Path(pipeline_dir()) / "tokenizer").save_pretrained(folder / "tokenizer")
    sd15_scheduler().save_pretrained(folder / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "scheduler": ["diffusers", "PNDMScheduler"],
             "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}  # fmt: skip
    (folder / "model_index.json").write_text(json.dumps(index, indent=1))
    return folder


# VmHWM, the process's own peak RSS: getrusage's ru_maxrss survives exec, so a child started from
# a big parent would report the parent's peak.
_PEAK = """import sys
from bfq_cli.main import main
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print("peak_rss", int(hwm.split()[1]) * 1024, file=sys.stderr)
"""


def measure_generate(path: str, base: Path, out_dir: Path) -> dict:
    out = {}
    for runtime in ("packed", "dense"):
        args = ["generate", path, "--base", str(base), "--prompt", "a photo of a cat", "--steps", "4", "--device", "cpu",
                "--runtime", runtime, "-o", str(out_dir / f"generate-{runtime}.png")]  # fmt: skip
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", _PEAK, *args], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "2"})  # fmt: skip
        seconds = time.perf_counter() - t0
        peaks = [int(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("peak_rss")]
        if done.returncode or not peaks:
            raise RuntimeError(f"bfq generate failed: {done.stderr[-2000:]}")
        out[runtime] = {"peak_rss": peaks[0], "seconds": seconds}
        print(f"  bfq generate --runtime {runtime}: peak RSS {peaks[0] / 1e9:.2f} GB, {seconds:.0f} s", flush=True)
    return out


# ----------------------------------------------------------------------------------- compile


def measure_compile(runs: int, caches: list[str]) -> dict:
    """``torch.compile(unet, fullgraph=True)`` (inductor) of the packed tiny-sd UNet, for a default
    (scheduler time cache) file and a grid file: the first call with an empty compiler cache (what
    a first run costs; a fresh TORCHINDUCTOR_CACHE_DIR), then eager against compiled forwards."""
    import tempfile

    import torch

    import bfq
    from bfq.pipeline.quantize import quantize

    torch.set_num_threads(1)
    out = {}
    for cache in caches:
        path = Path("/tmp") / f"bfq-bench-tiny-{cache}.bfq"
        if not path.is_file():
            quantize("tiny-sd", path, recipe="uniform-2", steps=20, time_cache=cache, progress=False)
        unet = bfq.load_unet(path, runtime="packed")
        x, ehs = inputs(unet.config.sample_size, seq=8, dim=unet.config.cross_attention_dim)
        t = torch.tensor(int(first_timestep(path)))  # what a pipeline passes
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bfq-inductor-")  # cold: no cached kernels
        torch._dynamo.reset()
        t0, c0 = time.perf_counter(), time.process_time()
        compiled = torch.compile(unet, fullgraph=True)
        _forward(compiled, x, t, ehs)
        compile_s, compile_cpu = time.perf_counter() - t0, time.process_time() - c0
        eager = median(_forward(unet, x, t, ehs)[0] for _ in range(runs))
        fast = median(_forward(compiled, x, t, ehs)[0] for _ in range(runs))
        print(f"  tiny-sd packed UNet, {cache} time cache, batch 2, 1 thread: eager {eager * 1e3:.1f} ms, compiled "
              f"{fast * 1e3:.1f} ms (first call incl. compilation, cold cache: {compile_s:.0f} s, {compile_cpu:.0f} s CPU in this process)", flush=True)  # fmt: skip
        out[cache] = {"eager_s": eager, "compiled_s": fast, "compile_s": compile_s, "compile_cpu_s": compile_cpu}
    return out


# -------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--file", help="SD-v1.5-shaped .bfq (default: quantize sd15-random with bitsfusion-sd15 into --work)")
    ap.add_argument("--work", default="/tmp/bfq-packed-bench", help="Folder for the quantized file and the base pipeline.")
    ap.add_argument("--base", help="SD-shaped pipeline directory for the generate row (default: built with random weights).")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--sizes", default="64,32", help="Latent sizes (64 = 512x512 images).")
    ap.add_argument("--workspaces", default="32", help="Packed-runtime workspace sizes in MB, the default first "
                    "(e.g. 32,8,128: 128 MB holds every SD-v1.5 layer whole).")
    ap.add_argument("--variants", default="dense fp32,packed fp32,packed bf16", help="Speed rows, comma-separated: "
                    f"dense fp32 first, then any of {', '.join(VARIANTS)}.")
    ap.add_argument("--only", default="memory,speed,decode,generate,compile")
    ap.add_argument("--compile-caches", default="scheduler,grid", help="Time-cache modes of the compile rows, in order "
                    "(the first pays the compiler's one-time start-up in the process).")
    ap.add_argument("--out", help="Write the results as JSON here.")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    path = args.file or str(work / "sd15.bfq")
    if not Path(path).is_file():
        from bfq.pipeline.quantize import quantize

        print(f"quantizing sd15-random with bitsfusion-sd15 (scheduler cache for 4 steps) -> {path}", flush=True)
        quantize("sd15-random", path, recipe="bitsfusion-sd15", steps=4, progress=False)
    threads = [int(n) for n in args.threads.split(",")]
    only = set(args.only.split(","))
    with open("/proc/loadavg") as f:
        results = {"file": path, "loadavg_start": f.read().split()[:3], "runs": args.runs}
    print(f"load average at start: {' '.join(results['loadavg_start'])}  (2-core machine)")
    if "memory" in only:
        print("memory (fresh process per runtime):", flush=True)
        results["memory"] = measure_memory(path)
    if "speed" in only:
        print(f"one UNet forward, batch 2, medians of {args.runs}:", flush=True)
        results["speed"] = measure_speed(path, threads, [int(s) for s in args.sizes.split(",")], args.runs,
                                         [int(mb) for mb in args.workspaces.split(",")], args.variants.split(","))
    if "decode" in only:
        print("decode alone (what one packed forward decodes):", flush=True)
        results["decode"] = [row for name in ("fp32", "bf16") for row in measure_decode(path, threads, args.runs, name)]
    if "generate" in only:
        base = Path(args.base) if args.base else sd_base_pipeline(work / "sd15-random-base")
        print("bfq generate 512x512, 4 steps, 2 threads:", flush=True)
        results["generate"] = measure_generate(path, base, work)
    if "compile" in only:
        print("torch.compile (inductor) vs eager:", flush=True)
        results["compile"] = measure_compile(args.runs, args.compile_caches.split(","))
    with open("/proc/loadavg") as f:
        results["loadavg_end"] = f.read().split()[:3]
    print(f"load average at end: {' '.join(results['loadavg_end'])}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
