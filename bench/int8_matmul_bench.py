"""Is W8A8 worth it on this CPU? torch's int8 kernels against bf16 and fp32 on SD-v1.5-shaped
layers (issue 21), one thread by default, each row the best of two interleaved rounds of medians.

    python bench/int8_matmul_bench.py [--runs 5] [--threads 1] [--only linear,conv]

Linear, 8192 tokens (batch 2, 64x64 latents) x 640 -> 640: fp32 and bf16 ``F.linear``;
``torch._int_mm`` (int8 x int8 -> int32, the GEMM alone) and per-token activation quantization in
torch ops (what feeding it costs); ``quantized::linear_dynamic`` (per-tensor dynamic activation
quantization inside the kernel) on weights prepacked per channel by the fbgemm, x86 and onednn
engines; ``onednn::qlinear_pointwise`` on uint8 activations with float output (what
``compute="int8"`` runs) and the quantization in front of it, in torch ops and in bfq's numba pass.

3x3 convolutions at the three UNet levels of a 512x512 image (batch 2): fp32 (contiguous and
channels-last), bf16 channels-last, ``quantized::conv2d`` (static: quantized tensors in and out,
calibrated scale) per engine, ``onednn::qconv2d_pointwise`` on uint8 activations with float output,
and the dynamic per-call quantization of the input (aminmax + quantize) in torch ops and in bfq's
numba pass (bfq.runtime.int8.quantize_input).

Prepack rows: what it would cost to prepack the int8 weights at every forward instead of once.
"""

import argparse
import time
import warnings

import torch
import torch.nn.functional as F

from bfq.quant.activations import act_qparams, quantize_uint8
from bfq.runtime.int8 import quantize_input


def timed(fn, runs):
    fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return sorted(out)[runs // 2]


def _per_channel(codes, scales, engine):
    torch.backends.quantized.engine = engine
    zero = torch.zeros(codes.shape[0], dtype=torch.int64)
    return torch._make_per_channel_quantized_tensor(codes, scales.double(), zero, 0)


def linear_rows(m=8192, k=640, n=640) -> dict:
    a, w, b = torch.randn(m, k), torch.randn(n, k) * 0.05, torch.randn(n)
    ab, wb, bb = a.bfloat16(), w.bfloat16(), b.bfloat16()
    codes = torch.randint(-4, 5, (n, k), dtype=torch.int8)
    scales = torch.rand(n) * 0.01 + 1e-3
    ai, wi = torch.randint(-127, 128, (m, k), dtype=torch.int8), codes.t().contiguous()
    rows = {
        "fp32 linear": lambda: F.linear(a, w, b),
        "bf16 linear": lambda: F.linear(ab, wb, bb),
        "torch._int_mm (GEMM alone)": lambda: torch._int_mm(ai, wi),
        "  + per-token int8 quantization in torch ops":
            lambda: (a / (a.abs().amax(1, keepdim=True) / 127)).round().clamp(-127, 127).to(torch.int8),
    }  # fmt: skip
    for engine in ("fbgemm", "x86", "onednn"):
        if engine in torch.backends.quantized.supported_engines:
            packed = torch.ops.quantized.linear_prepack(_per_channel(codes, scales, engine), b)
            rows[f"quantized::linear_dynamic, {engine} prepack"] = lambda p=packed: torch.ops.quantized.linear_dynamic(a, p, False)
            rows[f"  prepack ({engine})"] = lambda e=engine: torch.ops.quantized.linear_prepack(_per_channel(codes, scales, e), b)
    w8 = torch.ops.onednn.qlinear_prepack(codes, None)
    s, zp = act_qparams(a)
    xq = quantize_uint8(a, s, zp)
    zeros = torch.zeros(n, dtype=torch.int64)
    for out_dtype, bias in ((torch.float32, b), (torch.bfloat16, bb)):
        name = str(out_dtype).split(".")[1]
        rows[f"onednn::qlinear_pointwise, uint8 in, {name} out"] = lambda o=out_dtype, bias=bias: torch.ops.onednn.qlinear_pointwise(
            xq, s, zp, w8, scales, zeros, bias, 1.0, 0, o, "none", [], "")  # fmt: skip
    rows["  per-tensor quantization of bf16 input, torch ops (aminmax + quantize_uint8)"] = lambda: quantize_uint8(ab, *act_qparams(ab))
    rows["  the same, bfq's numba pass (what compute='int8' runs)"] = lambda: quantize_input(ab)
    rows["  prepack (onednn::qlinear_prepack)"] = lambda: torch.ops.onednn.qlinear_prepack(codes, None)
    return rows


def conv_rows(c, size, batch=2) -> dict:
    x = torch.randn(batch, c, size, size)
    xc = x.contiguous(memory_format=torch.channels_last)
    xb = xc.bfloat16()
    w, b = torch.randn(c, c, 3, 3) * 0.02, torch.randn(c)
    wb, bb = w.bfloat16().contiguous(memory_format=torch.channels_last), b.bfloat16()
    codes = torch.randint(-4, 5, (c, c, 3, 3), dtype=torch.int8)
    scales = torch.rand(c) * 0.01 + 1e-3
    s, zp = act_qparams(xc)
    one = [1, 1]
    tag = f"conv3x3 {c}ch {size}x{size}"
    rows = {
        f"{tag} fp32": lambda: F.conv2d(x, w, b, padding=1),
        f"{tag} fp32 channels-last": lambda: F.conv2d(xc, w, b, padding=1),
        f"{tag} bf16 channels-last": lambda: F.conv2d(xb, wb, bb, padding=1),
    }
    qx = torch.quantize_per_tensor(xc, s, zp, torch.quint8)
    for engine in ("fbgemm", "x86", "onednn"):
        if engine in torch.backends.quantized.supported_engines:
            packed = torch.ops.quantized.conv2d_prepack(_per_channel(codes, scales, engine), b, one, one, one, 1)
            rows[f"{tag} quantized::conv2d static ({engine})"] = lambda p=packed: torch.ops.quantized.conv2d(qx, p, 0.05, 128)
    w8 = torch.ops.onednn.qconv_prepack(codes, scales, 1.0, 0, one, one, one, 1, None)
    xq = quantize_uint8(xc, s, zp)
    zeros = torch.zeros(c, dtype=torch.int64)
    for out_dtype, bias in ((torch.float32, b), (torch.bfloat16, bb)):
        name = str(out_dtype).split(".")[1]
        rows[f"{tag} onednn::qconv2d_pointwise, uint8 in, {name} out"] = lambda o=out_dtype, bias=bias: (
            torch.ops.onednn.qconv2d_pointwise(xq, s, zp, w8, scales, zeros, bias, one, one, one, 1, 1.0, 0, o, "none", [], ""))  # fmt: skip
    rows[f"{tag}   dynamic quantization of the bf16 input, torch ops"] = lambda: quantize_uint8(xb, *act_qparams(xb))
    rows[f"{tag}   the same, bfq's numba pass"] = lambda: quantize_input(xb)
    rows[f"{tag}   prepack (onednn::qconv_prepack)"] = lambda: torch.ops.onednn.qconv_prepack(codes, scales, 1.0, 0, one, one, one, 1, None)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="linear,conv")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    groups = []
    if "linear" in args.only:
        groups.append(("linear 8192x640 -> 640", linear_rows(), "bf16 linear"))
    if "conv" in args.only:
        for c, size in ((320, 64), (640, 32), (1280, 16)):
            groups.append((f"conv {c}", conv_rows(c, size), f"conv3x3 {c}ch {size}x{size} bf16 channels-last"))
    for title, rows, base_name in groups:
        times = {name: [] for name in rows}
        for _ in range(2):  # two interleaved rounds
            for name, fn in rows.items():
                times[name].append(timed(fn, args.runs))
        base = min(times[base_name])
        print(f"-- {title}, {args.threads} thread(s)")
        for name, values in times.items():
            print(f"{name:72s} {min(values) * 1e3:8.1f} ms  {min(values) / base:5.2f}x bf16", flush=True)


if __name__ == "__main__":
    main()
