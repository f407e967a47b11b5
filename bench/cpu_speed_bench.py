"""The CPU speed of the default path against dense fp32 (issue 21's table), on an SD-v1.5-shaped .bfq.

    python bench/cpu_speed_bench.py                      # quantizes sd15-random with bitsfusion-sd15 first (as packed_bench.py)
    python bench/cpu_speed_bench.py --file sd15.bfq --threads 1,2 --sizes 64,32 --runs 3 --out cpu.json

Measures, printing how each figure was obtained:

* forward: one UNet forward, batch 2, at 512x512 (64x64 latents) and 256x256 (32x32): dense fp32,
  packed fp32, packed bf16 (the CPU default), and "packed bf16 before" (the same model with
  diffusers' attention processor and oneDNN's convolutions everywhere: what bf16 ran before
  bfq.runtime.cpu_bf16), alternating in one process, `--runs` each after a warm-up at 64x64; medians of wall
  and process CPU time and their ratios to dense fp32, per torch thread count;
* decode share: the packed bf16 decode alone (every layer, in the blocks a forward uses), timed
  between the same forwards, over the packed bf16 forward's time;
* memory: packed bf16 in a fresh process, RSS after load and after a 256x256 forward (packed_bench.py);
* generate: `bfq generate`'s code path (bfq.runtime.generate.generate) at 512x512 in a fresh process
  per variant, packed default vs dense fp32, with the time inside the UNet's forwards and the whole
  time; the file's scheduler cache fixes the step count (4 for packed_bench's file), and a 20-step
  figure is extrapolated as whole + (UNet calls of 20 steps - calls made) x UNet time per call.

The machine this ran on is shared: the load average is printed at the start and end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import packed_bench as pb  # noqa: E402

VARIANTS = ("dense fp32", "packed fp32", "packed bf16", "packed bf16 before")


def _model(path: str, name: str):
    import torch
    from diffusers.models.attention_processor import AttnProcessor2_0

    import bfq

    runtime, dtype = name.split()[:2]
    unet = bfq.load_unet(path, runtime=runtime, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    if name.endswith("before"):
        unet.set_attn_processor(AttnProcessor2_0())
        for m in unet.modules():
            m.__dict__.pop("_conv_forward", None)
    return unet


def _decode_all(unet) -> float:
    from bfq.runtime.packed import packed_layers

    t0 = time.perf_counter()
    for _, m in packed_layers(unet):
        for c0, c1 in m._blocks():
            count = (c1 - c0) * m.per_channel
            m.dequantize(c0, c1, out=m.workspace.get(m.codes.device, m._compute.dtype, count))
    return time.perf_counter() - t0


def measure_forward(path: str, threads: list[int], sizes: list[int], runs: int, variants: list[str]) -> list[dict]:
    import torch

    models = {name: _model(path, name) for name in variants}
    t = pb.first_timestep(path)
    rows = []
    for n in threads:
        torch.set_num_threads(n)
        small = pb.inputs(8)
        for name in models:  # warm-up (numba, oneDNN, allocator), at 64x64 to spare the shared machine
            pb._forward(models[name], *small[:1], t, small[1])
        for size in sizes:
            x, ehs = pb.inputs(size)
            times = {name: [] for name in models}
            decode = []
            for _ in range(runs):
                for name in models:  # interleaved, so drifting load hits every variant alike
                    times[name].append(pb._forward(models[name], x, t, ehs))
                if "packed bf16" in models:
                    decode.append(_decode_all(models["packed bf16"]))
            row = {"threads": n, "latent": size, "image": 8 * size, "loadavg": _loadavg()}
            base = times["dense fp32"]
            for name, values in times.items():
                row[name] = {"wall_s": pb.median(v[0] for v in values), "cpu_s": pb.median(v[1] for v in values),
                             "all_wall_s": [v[0] for v in values]}  # fmt: skip
                row[name]["ratio_wall"] = row[name]["wall_s"] / pb.median(v[0] for v in base)
                row[name]["ratio_cpu"] = row[name]["cpu_s"] / pb.median(v[1] for v in base)
            if decode:
                row["decode_s"] = pb.median(decode)
                row["decode_share"] = row["decode_s"] / row["packed bf16"]["wall_s"]
            rows.append(row)
            cells = ", ".join(f"{name} {row[name]['wall_s']:.2f} s {row[name]['ratio_wall']:.3f}x (CPU {row[name]['ratio_cpu']:.3f}x)"
                              for name in models if name != "dense fp32")  # fmt: skip
            share = f"; decode {row['decode_s']:.3f} s = {100 * row['decode_share']:.1f}% of packed bf16" if decode else ""
            print(f"  {n} thread(s), {8 * size}x{8 * size}: dense fp32 {row['dense fp32']['wall_s']:.2f} s; {cells}{share}; "
                  f"load {' '.join(row['loadavg'])}", flush=True)  # fmt: skip
    return rows


def _loadavg() -> list[str]:
    with open("/proc/loadavg") as f:
        return f.read().split()[:3]


_GENERATE = """import json, sys, time, torch
from bfq.runtime.generate import generate
torch.set_num_threads(int(sys.argv[5]))
spent = []
def pre(module, args):
    spent.append(-time.perf_counter())
def post(module, args, out):
    spent[-1] += time.perf_counter()
import bfq.runtime.generate as g
real = g.load_pipeline
def load(*a, **k):
    pipe = real(*a, **k)
    pipe.unet.register_forward_pre_hook(pre)
    pipe.unet.register_forward_hook(post)
    return pipe
g.load_pipeline = load
t0 = time.perf_counter()
generate(sys.argv[1], ["a photo of a cat"], base=sys.argv[2], out=sys.argv[3], runtime=sys.argv[4], compute=sys.argv[6],
         width=512, height=512, device="cpu", seed=0)
print(json.dumps({"whole_s": time.perf_counter() - t0, "unet_s": sum(spent), "unet_calls": len(spent)}))
"""


def extrapolate_20_steps(row: dict, steps: int) -> None:
    """20-step figures from a ``steps``-step run: the UNet calls a sampler adds beyond one a step
    (PNDM: one) stay, every other call costs the measured time per call."""
    row["unet_per_call_s"] = row["unet_s"] / row["unet_calls"]
    calls = 20 + row["unet_calls"] - steps
    row["unet_20_steps_s"] = calls * row["unet_per_call_s"]
    row["whole_20_steps_s"] = row["whole_s"] + (calls - row["unet_calls"]) * row["unet_per_call_s"]


def measure_generate(path: str, base: Path, out_dir: Path, threads: int) -> dict:
    from bfq.runtime.generate import file_sampler

    steps = file_sampler(path).default_steps()
    out = {"steps": steps, "threads": threads}
    for label, runtime, compute in (("packed default", "auto", "auto"), ("dense fp32", "dense", "fp32")):
        done = subprocess.run([sys.executable, "-c", _GENERATE, path, str(base), str(out_dir / f"gen-{runtime}.png"), runtime,
                               str(threads), compute], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": str(threads)})  # fmt: skip
        if done.returncode:
            raise RuntimeError(f"generate failed: {done.stderr[-2000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        extrapolate_20_steps(row, steps)
        out[label] = row
        print(f"  {label}: {steps} steps {row['whole_s']:.1f} s whole, {row['unet_s']:.1f} s in the UNet; 20 steps "
              f"(extrapolated) {row['whole_20_steps_s']:.0f} s whole, {row['unet_20_steps_s']:.0f} s UNet; load {' '.join(_loadavg())}", flush=True)  # fmt: skip
    for key in ("whole_20_steps_s", "unet_20_steps_s"):
        out[f"ratio_{key}"] = out["packed default"][key] / out["dense fp32"][key]
    print(f"  packed default / dense fp32, 20 steps: UNet {out['ratio_unet_20_steps_s']:.3f}x, whole {out['ratio_whole_20_steps_s']:.3f}x")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--file", help="SD-v1.5-shaped .bfq (default: quantize sd15-random with bitsfusion-sd15 into --work)")
    ap.add_argument("--work", default="/tmp/bfq-packed-bench", help="Folder for the quantized file and the base pipeline.")
    ap.add_argument("--base", help="SD-shaped pipeline directory for generate (default: built with random weights).")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--sizes", default="64,32", help="Latent sizes (64 = 512x512 images).")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"Forward rows, comma-separated: dense fp32 first, then any of {VARIANTS[1:]}.")  # fmt: skip
    ap.add_argument("--generate-threads", type=int, default=1)
    ap.add_argument("--only", default="forward,memory,generate")
    ap.add_argument("--out", help="Write the results as JSON here.")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    path = args.file or str(work / "sd15.bfq")
    if not Path(path).is_file():
        from bfq.pipeline.quantize import quantize

        print(f"quantizing sd15-random with bitsfusion-sd15 (scheduler cache for 4 steps) -> {path}", flush=True)
        quantize("sd15-random", path, recipe="bitsfusion-sd15", steps=4, progress=False)
    only = set(args.only.split(","))
    variants = list(dict.fromkeys(["dense fp32", *(v.strip() for v in args.variants.split(",") if v.strip())]))
    if set(variants) - set(VARIANTS):
        ap.error(f"--variants: unknown {sorted(set(variants) - set(VARIANTS))}; choose from {VARIANTS}")
    results = {"file": path, "loadavg_start": _loadavg(), "runs": args.runs, "cpus": os.cpu_count()}
    print(f"load average at start: {' '.join(results['loadavg_start'])}  ({os.cpu_count()}-core machine)")
    if "forward" in only:
        print(f"one UNet forward, batch 2, medians of {args.runs} (ratios: to dense fp32 in the same run):", flush=True)
        results["forward"] = measure_forward(path, [int(n) for n in args.threads.split(",")],
                                             [int(s) for s in args.sizes.split(",")], args.runs, variants)  # fmt: skip
    if "memory" in only:
        print("memory, packed bf16, fresh process:", flush=True)
        code = f"import json,sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); import packed_bench as b; " \
               f"print(json.dumps(b.memory_child({path!r}, 'packed', 'bfloat16', False)))"  # fmt: skip
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
        results["memory"] = json.loads(done.stdout.strip().splitlines()[-1])
        m = results["memory"]
        print(f"  RSS +{m['rss_load'] / 1e9:.3f} GB after load, +{m['rss_after_forward'] / 1e9:.3f} GB after a 256x256 "
              f"forward; modules {m['module_bytes'] / 1e9:.3f} GB", flush=True)  # fmt: skip
    if "generate" in only:
        base = Path(args.base) if args.base else pb.sd_base_pipeline(work / "sd15-random-base")
        print(f"generate 512x512, {args.generate_threads} thread(s), fresh process per variant:", flush=True)
        results["generate"] = measure_generate(path, base, work, args.generate_threads)
    results["loadavg_end"] = _loadavg()
    print(f"load average at end: {' '.join(results['loadavg_end'])}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
