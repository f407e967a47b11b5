"""Is W8A8 worth it on this CPU? torch's int8 paths against bf16 and fp32 on one SD-v1.5-shaped
GEMM (issue 21): 8192 tokens (batch 2, 64x64 latents) x 640 -> 640, one thread, medians.

    python bench/int8_matmul_bench.py [--runs 7]

Rows: fp32 and bf16 matmul; torch._int_mm (int8 x int8 -> int32, the GEMM alone); per-token
dynamic activation quantization in torch ops (what feeding _int_mm costs); torch's dynamic int8
Linear (quantize_dynamic, activation quantization fused) on the fbgemm and onednn engines.
"""

import argparse
import time
import warnings

import torch


def timed(fn, runs):
    fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return sorted(out)[runs // 2]


def _on(engine, fn, *args):
    torch.backends.quantized.engine = engine
    return fn(*args)


def _prepack(codes):
    """What a packed layer would pay at every forward to hand its codes to torch's int8 Linear."""
    scales = torch.full((codes.shape[0],), 0.01, dtype=torch.float64)
    weight = torch._make_per_channel_quantized_tensor(codes, scales, torch.zeros(codes.shape[0], dtype=torch.int64), 0)
    return torch.ops.quantized.linear_prepack(weight, None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    m, k, n = 8192, 640, 640
    a, lin = torch.randn(m, k), torch.nn.Linear(k, n)
    ab, lb = a.bfloat16(), torch.nn.Linear(k, n).bfloat16()
    ai = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    wi = torch.randint(-4, 5, (k, n), dtype=torch.int8)
    rows = {
        "fp32 linear": lambda: lin(a),
        "bf16 linear": lambda: lb(ab),
        "torch._int_mm (GEMM alone)": lambda: torch._int_mm(ai, wi),
        "per-token int8 quantization of the activations (torch ops)":
            lambda: (a / (a.abs().amax(1, keepdim=True) / 127)).round().clamp(-127, 127).to(torch.int8),
    }  # fmt: skip
    for engine in ("fbgemm", "onednn"):
        if engine in torch.backends.quantized.supported_engines:
            torch.backends.quantized.engine = engine
            q = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
            rows[f"dynamic int8 Linear ({engine})"] = lambda q=q, e=engine: _on(e, q, a)
            rows[f"  its weight prepack from int8 codes + scales ({engine})"] = lambda e=engine: _on(e, _prepack, wi.t().contiguous())
    times = {name: [] for name in rows}
    for _ in range(2):  # two interleaved rounds
        for name, fn in rows.items():
            times[name].append(timed(fn, args.runs))
    base = min(times["bf16 linear"])
    for name, values in times.items():
        print(f"{name:60s} {min(values) * 1e3:8.1f} ms  {min(values) / base:5.2f}x bf16")


if __name__ == "__main__":
    main()
