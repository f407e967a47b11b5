"""End-to-end benchmark on the SD-v1.5-shaped UNet (issue 4): export with the paper's
bitsfusion-sd15 recipe, file size, load time and peak memory, against saving and loading the same
UNet as fp16 safetensors with diffusers, in the same run.

    OMP_NUM_THREADS=2 python bench/sd15_bench.py [--runs 3] [--workdir /tmp/sd15bench]

Each step runs in a fresh subprocess, so its peak RSS (ru_maxrss) is its own; load times are
medians of --runs subprocesses from a warm page cache. Weights are random (sd15-random, seed 0):
sizes and speeds do not depend on the values.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PRELUDE = """
import json, resource, sys, time
import torch
torch.set_num_threads(int(__import__('os').environ.get('OMP_NUM_THREADS', '2')))
def done(**kw):
    kw['peak_rss_gb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print('RESULT ' + json.dumps(kw))
"""

STEPS = {
    "export": """
from bfq.pipeline.quantize import quantize
t = time.perf_counter()
r = quantize('sd15-random', sys.argv[1] + '/sd15.bfq', recipe='bitsfusion-sd15', progress=False)
done(seconds=time.perf_counter() - t, stages=r.seconds, avg_bits=r.summary['avg_bits'])
""",
    "save_fp16": """
from bfq.pipeline.models import build_sd15_random
unet = build_sd15_random(0, dtype=torch.float16)
t = time.perf_counter()
unet.save_pretrained(sys.argv[1] + '/fp16')
done(seconds=time.perf_counter() - t)
""",
    "load_bfq": """
import bfq, bfq.runtime.load, bfq.quant.timecache
from diffusers import UNet2DConditionModel  # imports are not load time, for either side
t = time.perf_counter()
unet = bfq.load_unet(sys.argv[1] + '/sd15.bfq', dtype=torch.float16, runtime='dense')
done(seconds=time.perf_counter() - t, params=sum(p.numel() for p in unet.parameters()))
""",
    "load_bfq_packed": """
import bfq, bfq.runtime.load, bfq.quant.timecache
from diffusers import UNet2DConditionModel
t = time.perf_counter()
unet = bfq.load_unet(sys.argv[1] + '/sd15.bfq', runtime='packed')
done(seconds=time.perf_counter() - t)
""",
    "load_fp16": """
from diffusers import UNet2DConditionModel
t = time.perf_counter()
unet = UNet2DConditionModel.from_pretrained(sys.argv[1] + '/fp16', torch_dtype=torch.float16)
for p in unet.parameters():
    p.data = p.data.clone()  # materialize every tensor (diffusers maps the file lazily)
done(seconds=time.perf_counter() - t)
""",
}


def run_step(name: str, workdir: Path) -> dict:
    code = PRELUDE + textwrap.dedent(STEPS[name])
    proc = subprocess.run([sys.executable, "-c", code, str(workdir)], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", default="/tmp/bfq-sd15-bench")
    parser.add_argument("--out")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    res = {"loadavg": os.getloadavg(), "export": run_step("export", workdir), "save_fp16": run_step("save_fp16", workdir)}
    for name in ("load_bfq", "load_bfq_packed", "load_fp16"):
        run_step(name, workdir)  # warm the page cache
        runs = [run_step(name, workdir) for _ in range(args.runs)]
        res[name] = {"seconds": statistics.median(r["seconds"] for r in runs), "peak_rss_gb": max(r["peak_rss_gb"] for r in runs)}
    bfq_bytes = (workdir / "sd15.bfq").stat().st_size
    fp16_bytes = sum(p.stat().st_size for p in (workdir / "fp16").glob("*.safetensors"))
    res.update(bfq_bytes=bfq_bytes, fp16_bytes=fp16_bytes, load_ratio=res["load_bfq"]["seconds"] / res["load_fp16"]["seconds"])
    e = res["export"]
    print(f"load average at start {res['loadavg']}; medians of {args.runs} warm-cache runs")
    print(f"export   bitsfusion-sd15: {e['seconds']:.1f} s ({', '.join(f'{k} {v:.1f}s' for k, v in e['stages'].items())}), peak {e['peak_rss_gb']:.2f} GB, avg bits {e['avg_bits']:.4f}")
    print(f"file     .bfq {bfq_bytes / 1e6:.1f} MB vs fp16 safetensors {fp16_bytes / 1e6:.1f} MB ({fp16_bytes / bfq_bytes:.2f}x)")
    print(f"save     fp16 safetensors: {res['save_fp16']['seconds']:.1f} s")
    print(f"load     bfq.load_unet fp16, dense runtime: {res['load_bfq']['seconds']:.2f} s, peak {res['load_bfq']['peak_rss_gb']:.2f} GB")
    print(f"load     bfq.load_unet, packed runtime: {res['load_bfq_packed']['seconds']:.2f} s, peak {res['load_bfq_packed']['peak_rss_gb']:.2f} GB")
    print(f"load     diffusers from_pretrained fp16 + materialize: {res['load_fp16']['seconds']:.2f} s, peak {res['load_fp16']['peak_rss_gb']:.2f} GB")
    print(f"ratio    bfq / safetensors load = {res['load_ratio']:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
