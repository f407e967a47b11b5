"""Container benchmark (issue 2): packing density, pack / unpack+dequantize throughput, and
decoding a whole 1.99-bit SD-v1.5-shaped UNet against loading its fp16 safetensors.

Weights are synthetic: every layer of the SD-v1.5 UNet (shapes from its public config) gets
random codes at the bit-width the paper's bitsfusion-sd15 recipe gives it. Throughput does not
depend on the values. Prints a table and writes JSON with --out.

    OMP_NUM_THREADS=1 python bench/container_bench.py [--runs 5] [--threads 2] [--out bench.json]

Timings are medians of --runs; the copy ceiling is numpy.copyto of the same output bytes,
measured in the same run. Run on a quiet machine (`cat /proc/loadavg`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numba
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bfq.format import (  # noqa: E402
    BfqWriter,
    open_bfq,
    pack,  # noqa: E402
)
from bfq.format.constants import choose_packing, level_offset, num_levels  # noqa: E402


def median_time(fn, runs: int) -> float:
    fn()  # warm-up (JIT, page cache)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def sd15_plan() -> list[tuple[str, tuple[int, ...], int]]:
    """(name, shape, bits) for every quantized layer of SD-v1.5 under bitsfusion-sd15."""
    from bfq.pipeline.models import build_meta_unet, sd15_config
    from bfq.quant.recipe import bitsfusion_sd15

    unet = build_meta_unet(sd15_config())
    recipe = bitsfusion_sd15(unet)
    state = unet.state_dict()
    return [(name, tuple(state[name].shape), bits) for name, bits in recipe.bits.items()]


def density_table() -> list[dict]:
    rows = []
    for bits in range(1, 9):
        for levels in ("balanced", "plain"):
            L = num_levels(bits, levels)
            g, k = choose_packing(L)
            rows.append({"bits": bits, "levels": levels, "L": L, "g": g, "k": k, "bits_per_weight": k / g, "log2_L": math.log2(L)})
    return rows


def throughput(runs: int, n: int = 1280 * 2880 * 4) -> list[dict]:
    """Pack and unpack+dequantize (fp16 and fp32) one SD-sized weight matrix per bit-width."""
    rng = np.random.default_rng(0)
    rows = []
    channels = 1280
    dst = np.empty(n * 2, np.uint8)
    src = np.ones(n * 2, np.uint8)
    copy16 = median_time(lambda: np.copyto(dst, src), runs)
    for bits in (1, 2, 3, 4, 8):
        off = level_offset(bits)
        q = rng.integers(-off, off + 1, n).astype(np.int16)
        scales = (rng.random(channels) + 0.5).astype(np.float16)
        stream, g, k = pack.pack_codes(q, bits)
        out16 = np.empty(n, np.uint16)
        out32 = np.empty(n, np.float32)
        shape = (channels, n // channels)
        t_pack = median_time(lambda: pack.pack_codes(q, bits), max(1, runs // 2))
        t16 = median_time(lambda: pack.unpack_dequantize(stream, shape, scales, bits, "balanced", g, k, "float16", out16), runs)
        t32 = median_time(lambda: pack.unpack_dequantize(stream, shape, scales, bits, "balanced", g, k, "float32", out32), runs)
        rows.append({
            "bits": bits, "weights": n, "pack_Gw_s": n / t_pack / 1e9, "unpack_fp16_Gw_s": n / t16 / 1e9,
            "unpack_fp32_Gw_s": n / t32 / 1e9, "copy_ceiling_fp16_Gw_s": n / copy16 / 1e9,
        })  # fmt: skip
    return rows


def whole_unet(runs: int, workdir: Path) -> dict:
    """Decode every layer of a 1.99-bit SD-shaped .bfq to fp16 vs safetensors load + touch of fp16."""
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(1)
    plan = sd15_plan()
    bfq_path = workdir / "sd15.bfq"
    fp16 = {}
    t0 = time.perf_counter()
    with BfqWriter(bfq_path, model={"class_name": "UNet2DConditionModel", "config": {}}) as writer:
        for name, shape, bits in plan:
            off = level_offset(bits)
            q = rng.integers(-off, off + 1, shape).astype(np.int16)
            writer.add_layer(name, q, (rng.random(shape[0]) * 0.01 + 1e-3).astype(np.float32), bits)
            fp16[name] = rng.standard_normal(shape, dtype=np.float32).astype(np.float16)
    t_write = time.perf_counter() - t0
    st_path = workdir / "sd15_fp16.safetensors"
    save_file(fp16, str(st_path))
    del fp16
    n_weights = sum(math.prod(s) for _, s, _ in plan)
    outs = {name: np.empty(shape, np.uint16) for name, shape, _ in plan}

    def decode_bfq():
        with open_bfq(bfq_path) as f:
            f.decode_layers(outs, "float16")

    def load_safetensors():
        for t in load_file(str(st_path)).values():
            t.copy()  # touch every byte, like safetensors' load_file + clone

    t_bfq = median_time(decode_bfq, runs)
    t_st = median_time(load_safetensors, runs)
    return {
        "layers": len(plan), "weights": n_weights, "bfq_bytes": bfq_path.stat().st_size,
        "safetensors_fp16_bytes": st_path.stat().st_size, "bfq_write_s": t_write,
        "bfq_decode_fp16_s": t_bfq, "safetensors_load_touch_s": t_st, "ratio": t_bfq / t_st,
        "decode_Gw_s": n_weights / t_bfq / 1e9,
    }  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="numba threads")
    parser.add_argument("--skip-unet", action="store_true", help="skip the whole-UNet comparison (needs ~4 GB of disk in /tmp)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    numba.set_num_threads(args.threads)
    result = {"threads": args.threads, "runs": args.runs, "loadavg": os.getloadavg(), "density": density_table(), "throughput": throughput(args.runs)}
    if not args.skip_unet:
        with tempfile.TemporaryDirectory() as tmp:
            result["whole_unet"] = whole_unet(args.runs, Path(tmp))
    print(f"numba threads {args.threads}, median of {args.runs} runs, load average at start {result['loadavg']}")
    print("\nbits levels   L   g   k  bits/weight  log2(L)  overhead")
    for r in result["density"]:
        print(f"{r['bits']:>4} {r['levels']:<8} {r['L']:>3} {r['g']:>3} {r['k']:>3}  {r['bits_per_weight']:>10.4f} {r['log2_L']:>8.4f}  {100 * (r['bits_per_weight'] / r['log2_L'] - 1):6.2f}%")
    print("\nbits  pack Gw/s  unpack->fp16 Gw/s  unpack->fp32 Gw/s  copyto ceiling fp16 Gw/s")
    for r in result["throughput"]:
        print(f"{r['bits']:>4} {r['pack_Gw_s']:>10.3f} {r['unpack_fp16_Gw_s']:>18.3f} {r['unpack_fp32_Gw_s']:>18.3f} {r['copy_ceiling_fp16_Gw_s']:>24.3f}")
    if "whole_unet" in result:
        u = result["whole_unet"]
        print(
            f"\nwhole SD-v1.5-shaped UNet, bitsfusion-sd15 bits, {u['layers']} layers, {u['weights']:,} weights:\n"
            f"  .bfq {u['bfq_bytes'] / 1e6:.1f} MB (written in {u['bfq_write_s']:.1f} s), decode to fp16 {u['bfq_decode_fp16_s']:.3f} s "
            f"({u['decode_Gw_s']:.2f} Gw/s)\n"
            f"  safetensors fp16 {u['safetensors_fp16_bytes'] / 1e6:.1f} MB, load + touch {u['safetensors_load_touch_s']:.3f} s\n"
            f"  ratio bfq/safetensors = {u['ratio']:.2f}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
