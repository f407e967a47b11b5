"""One-command check of bfq on one CUDA GPU (issue 21), in under 8 minutes, one JSON of results.

    python bench/gpu_check.py                      # writes gpu_check.json
    python bench/gpu_check.py --out r.json --file sd15.bfq

Checks, each bounded and timed (a failing step is recorded and the rest still run):

* decoder: the torch decoder on the GPU against the CPU (numba) decoder, bit for bit, on every
  layer of an SD-v1.5-shaped .bfq (the first 64 output channels of each) in fp32, fp16 and bf16;
* forward: packed vs dense fp16 forward of sd15-random's UNet, batch 2, 512x512 (64x64 latents),
  medians of interleaved runs, and the relative L2 difference of their outputs;
* decode: decode throughput on the GPU (every layer whole, fp16, G weights/s);
* stage1: 200 Stage I steps of tiny-sd on the GPU (`bfq finetune tiny-sd --bits 1.99`);
* analyze: a bounded `bfq analyze sd15-random --device cuda` (the analysis `bfq quantize
  sd15-random --bits 2.5` runs first), `--max-entries` new entries.

Without a CUDA GPU it says so in one line and exits 0 (what CI runs).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def median(values):
    values = sorted(values)
    return values[len(values) // 2]


def _sync_time(fn, runs: int) -> list[float]:
    import torch

    out = []
    for _ in range(runs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def check_decoder(path: str) -> dict:
    import torch

    import bfq
    from bfq.runtime.decode import decode_torch, dequantize
    from bfq.runtime.packed import packed_layers

    unet = bfq.load_unet(path, runtime="packed")
    mismatches, checked = [], 0
    for name, m in packed_layers(unet):
        c1 = min(64, m.weight_shape[0])
        args = (m.codes, m.scale_bits, m.weight_shape, m.bits, m.num_levels, m.digits_per_word, m.word_bits, 0, c1)
        gpu_args = (m.codes.cuda(), m.scale_bits.cuda(), *args[2:])
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            cpu = dequantize(*args, dtype)
            gpu = decode_torch(*gpu_args, dtype).cpu()
            checked += cpu.numel()
            if not torch.equal(cpu.view(-1).view(torch.uint8), gpu.view(-1).view(torch.uint8)):
                mismatches.append(f"{name} {dtype}")
    return {"bit_for_bit": not mismatches, "weights_checked": checked, "mismatches": mismatches[:20]}


def check_forward(path: str, runs: int) -> dict:
    import torch

    import bfq

    models = {rt: bfq.load_unet(path, runtime=rt, device="cuda", dtype=torch.float16) for rt in ("dense", "packed")}
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 64, 64, generator=gen).cuda().half()
    ehs = torch.randn(2, 77, 768, generator=gen).cuda().half()
    t = _first_timestep(path)
    outs, times = {}, {rt: [] for rt in models}
    with torch.no_grad():
        for rt, unet in models.items():  # warm-up
            outs[rt] = unet(x, t, ehs).sample.float()
        for _ in range(runs):
            for rt, unet in models.items():
                times[rt] += _sync_time(lambda u=unet: u(x, t, ehs), 1)
    rel = float((outs["packed"] - outs["dense"]).norm() / outs["dense"].norm())
    result = {f"{rt}_s": median(v) for rt, v in times.items()}
    result["packed_over_dense"] = result["packed_s"] / result["dense_s"]
    result["rel_l2_packed_vs_dense"] = rel
    result["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return result


def check_decode_throughput(path: str, runs: int) -> dict:
    import torch

    import bfq
    from bfq.runtime.decode import decode_torch
    from bfq.runtime.packed import packed_layers

    unet = bfq.load_unet(path, runtime="packed", device="cuda", dtype=torch.float16)
    layers = [m for _, m in packed_layers(unet)]

    def decode_all():
        for m in layers:
            decode_torch(m.codes, m.scale_bits, m.weight_shape, m.bits, m.num_levels, m.digits_per_word, m.word_bits,
                         0, m.weight_shape[0], torch.float16)  # fmt: skip

    decode_all()
    seconds = median(_sync_time(decode_all, runs))
    weights = sum(m.weight_shape[0] * m.per_channel for m in layers)
    return {"weights": weights, "decode_s": seconds, "gweights_per_s": weights / seconds / 1e9}


def _first_timestep(path) -> float:
    from bfq.format import open_bfq

    with open_bfq(path) as f:
        cache = f.header.time_cache
    return float(cache.timesteps[0]) if cache is not None and cache.mode == "scheduler" else 500.0


def _cli(args: list[str], timeout: int) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bfq_cli.main", *args], capture_output=True, text=True, timeout=timeout)
    return {"command": "bfq " + " ".join(args), "rc": proc.returncode, "seconds": time.perf_counter() - t0,
            "tail": (proc.stdout + proc.stderr)[-800:]}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--file", help="SD-v1.5-shaped .bfq (default: quantize sd15-random with bitsfusion-sd15 into --work)")
    ap.add_argument("--work", default="/tmp/bfq-gpu-check")
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--stage1-steps", type=int, default=200)
    ap.add_argument("--analyze-entries", type=int, default=20, help="New (layer, bits) entries of the bounded analysis.")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA GPU here (torch {torch.__version__}); nothing to check")
        return 0
    start = time.perf_counter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "steps": {}}
    path = args.file or str(work / "sd15.bfq")

    def step(name, fn):
        t0 = time.perf_counter()
        try:
            results["steps"][name] = {"ok": True, **fn()}
        except Exception as exc:  # one failing check must not hide the others
            results["steps"][name] = {"ok": False, "error": repr(exc), "trace": traceback.format_exc()[-1500:]}
        results["steps"][name]["seconds"] = time.perf_counter() - t0
        print(f"{name}: {json.dumps(results['steps'][name])[:400]}", flush=True)

    if not Path(path).is_file():
        step("quantize_sd15", lambda: _cli(["quantize", "sd15-random", "--recipe", "bitsfusion-sd15", "--steps", "4",
                                            "-o", path, "--force"], 240))  # fmt: skip
    step("decoder", lambda: check_decoder(path))
    step("forward_512", lambda: check_forward(path, args.runs))
    step("decode_throughput", lambda: check_decode_throughput(path, args.runs))
    step("stage1_tiny_sd", lambda: _cli(["finetune", "tiny-sd", "--bits", "1.99", "--stage1-steps", str(args.stage1_steps),
                                         "-o", str(work / "tiny-ft.bfq"), "--force", "--quiet"], 180))  # fmt: skip
    step("analyze_sd15", lambda: _cli(["analyze", "sd15-random", "--device", "cuda", "--bits", "2,3", "--max-entries",
                                       str(args.analyze_entries), "-o", str(work / "sd15-sens.json"), "--quiet"], 150))  # fmt: skip
    results["seconds"] = time.perf_counter() - start
    results["ok"] = all(s["ok"] and s.get("rc", 0) == 0 and s.get("bit_for_bit", True) for s in results["steps"].values())
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"gpu_check: {'all passed' if results['ok'] else 'FAILURES'} in {results['seconds']:.0f} s -> {args.out}")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
