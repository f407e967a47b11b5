"""SDXL-shaped UNet at 1.99 bits (issue 19's benchmarks), on `sdxl-random` (seeded random weights).

    OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python bench/sdxl_bench.py [--work DIR] [--file sdxl.bfq] [--runs 1]

Measures, printing how each figure was obtained:

* quantize: `bfq quantize sdxl-random --bits 1.99` in a fresh process (local analysis, default
  allocator, layer-by-layer conversion): wall time and the process's peak RSS (VmHWM); skipped
  with ``--file``;
* file size of the .bfq;
* memory: each runtime loaded in a fresh process: RSS after load minus RSS before (torch,
  diffusers and bfq imported) and the bytes of the module's parameters, buffers and workspace
  (`bfq.runtime.packed.resident_bytes`): packed, dense fp16, and dense fp32 when the machine has
  the memory for it (13 GB available), else dense fp32 is computed from the parameter count
  and said so;
* speed: one UNet forward, batch 2 (classifier-free guidance), 512x512 (64x64 latents), fp32, one
  torch thread, packed and dense fp32 each in its own process (they do not fit together on a
  24 GB machine shared with other jobs): a warm-up forward, then ``--runs`` timed ones (median
  wall and CPU time); the processes alternate ``--rounds`` times.
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

DENSE_FP32_NEED = 13e9  # bytes MemAvailable must show before a dense fp32 SDXL UNet (10.3 GB) is loaded


def available() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _child(fn: str, *args) -> dict:
    code = f"import json,sys; sys.path.insert(0, {str(HERE.parent)!r}); import sdxl_bench as b; " \
           f"print(json.dumps(b.{fn}(*{list(args)!r})))"  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"{fn}{args} failed: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _load(path: str, runtime: str, dtype: str):
    import torch

    import bfq

    return bfq.load_unet(path, runtime=runtime, dtype=getattr(torch, dtype))


def memory_child(path: str, runtime: str, dtype: str) -> dict:
    import torch
    from diffusers import UNet2DConditionModel  # noqa: F401  (imports count before the baseline, not in it)

    import bfq.runtime.load  # noqa: F401
    from bfq.runtime.packed import resident_bytes

    torch.set_num_threads(1)
    torch.ones(8, 8) @ torch.ones(8, 8)
    before = rss()
    unet = _load(path, runtime, dtype)
    return {"rss_load": rss() - before, "module_bytes": resident_bytes(unet), "peak_rss": _hwm()}


def _hwm() -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))


def speed_child(path: str, runtime: str, runs: int) -> dict:
    import torch

    from bfq.families import family_of

    torch.set_num_threads(1)
    unet = _load(path, runtime, "float32")
    family = family_of(unet)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 64, 64, generator=gen)
    cond = family.conditioning(dict(unet.config), 2, height=64, width=64, generator=gen)
    from bfq.format import open_bfq

    with open_bfq(path) as f:
        t = float(f.header.time_cache.timesteps[0])
    times = []
    with torch.no_grad():
        for i in range(runs + 1):
            wall, cpu = time.perf_counter(), time.process_time()
            family.forward(unet, x, torch.tensor([t, t]), cond)
            if i:  # the first is the warm-up
                times.append((time.perf_counter() - wall, time.process_time() - cpu))
    return {"wall_s": median([w for w, _ in times]), "cpu_s": median([c for _, c in times]), "runs": runs, "peak_rss": _hwm()}


def run_quantize(path: Path) -> dict:
    args = ["quantize", "sdxl-random", "--bits", "1.99", "-o", str(path), "--force"]
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _PEAK, *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"})  # fmt: skip
    seconds = time.perf_counter() - t0
    peaks = [int(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("peak_rss")]
    if done.returncode or not peaks:
        raise RuntimeError(f"bfq quantize failed: {done.stderr[-3000:]}")
    return {"seconds": seconds, "peak_rss": peaks[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/bfq-sdxl-bench")
    parser.add_argument("--file", help="an sdxl-random .bfq made by `bfq quantize sdxl-random --bits 1.99` (skips that step)")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = {}
    if args.file:
        path = Path(args.file)
    else:
        path = work / "sdxl-random-1.99.bfq"
        print("bfq quantize sdxl-random --bits 1.99 (fresh process) ...", flush=True)
        out["quantize"] = run_quantize(path)
        print(f"  {out['quantize']['seconds']:.0f} s, peak RSS {out['quantize']['peak_rss'] / 1e9:.2f} GB", flush=True)
    out["file_bytes"] = path.stat().st_size
    from bfq.format import open_bfq

    with open_bfq(path) as f:
        out["avg_bits"] = f.header.recipe.get("avg_bits") if isinstance(f.header.recipe, dict) else None
    print(f"file {out['file_bytes'] / 1e9:.3f} GB, {out['avg_bits']} avg bits", flush=True)

    print("memory (fresh process each):", flush=True)
    out["memory"] = {}
    variants = [("packed", "packed", "float32"), ("dense fp16", "dense", "float16"), ("dense fp32", "dense", "float32")]
    for label, runtime, dtype in variants:
        if label == "dense fp32" and available() < DENSE_FP32_NEED:
            from bfq.families import sdxl
            from bfq.families.build import n_params

            n = n_params(sdxl.FAMILY.config())
            out["memory"][label] = {"computed_bytes": 4 * n, "note": f"not loaded: {available() / 1e9:.1f} GB available"}
            print(f"  {label:11s} not loaded ({available() / 1e9:.1f} GB available): {4 * n / 1e9:.3f} GB of fp32 "
                  "parameters (computed)", flush=True)  # fmt: skip
            continue
        out["memory"][label] = m = _child("memory_child", str(path), runtime, dtype)
        print(f"  {label:11s} RSS +{m['rss_load'] / 1e9:.3f} GB after load; modules {m['module_bytes'] / 1e9:.3f} GB; "
              f"process peak {m['peak_rss'] / 1e9:.2f} GB", flush=True)  # fmt: skip

    if not args.skip_speed:
        print("one forward, batch 2, 512x512, fp32, 1 thread (each runtime in its own process):", flush=True)
        speed = {"packed": [], "dense": []}
        for _ in range(args.rounds):
            for runtime in ("packed", "dense"):
                if runtime == "dense" and available() < DENSE_FP32_NEED:
                    print(f"  dense fp32 skipped: {available() / 1e9:.1f} GB available", flush=True)
                    continue
                r = _child("speed_child", str(path), runtime, args.runs)
                speed[runtime].append(r)
                print(f"  {runtime}: {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU", flush=True)
        out["speed"] = speed
        if speed["packed"] and speed["dense"]:
            for key in ("wall_s", "cpu_s"):
                ratio = median([r[key] for r in speed["packed"]]) / median([r[key] for r in speed["dense"]])
                out["speed"][f"ratio_{key}"] = ratio
                print(f"  packed / dense fp32 ({key[:-2]} time): {ratio:.3f}x", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
