"""Compute dtypes of a loaded .bfq UNet (issue 21): bf16 on the CPU behind a float32 interface,
the ``auto`` choice from the CPU's ISA, the CLI's ``--compute``, and bench/gpu_check.py's no-GPU path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bfq_cli.main import main
from click.testing import CliRunner

import bfq
from bfq.runtime import load
from tests.helpers import tiny_inputs, tiny_unet
from tests.test_edges import _one_line_error

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    from bfq.pipeline.quantize import quantize

    root = tmp_path_factory.mktemp("compute")
    tiny_unet(seed=3).save_pretrained(root / "unet")
    return quantize(str(root / "unet"), root / "tiny.bfq", recipe="uniform-2", time_cache="grid", progress=False).path


@pytest.mark.parametrize("runtime", ["packed", "dense"])
def test_bf16_on_the_cpu_takes_and_returns_float32_close_to_fp32_compute(tiny_file, runtime):
    fp32 = bfq.load_unet(tiny_file, runtime=runtime, dtype=torch.float32)
    bf16 = bfq.load_unet(tiny_file, runtime=runtime, dtype=torch.bfloat16)
    assert bf16.conv_in.bias.dtype == torch.bfloat16 and bf16.bfq_compute == "bf16"
    sample, ehs = tiny_inputs(fp32, seq=5)
    with torch.no_grad():
        ref = fp32(sample, 37, ehs).sample
        out = bf16(sample, 37, encoder_hidden_states=ehs).sample  # float32 in, float32 out
        as_tuple = bf16(sample=sample, timestep=37, encoder_hidden_states=ehs, return_dict=False)[0]
        native = bf16(sample.bfloat16(), 37, ehs.bfloat16()).sample
    assert out.dtype == torch.float32 and out.is_contiguous() and torch.equal(out, as_tuple)
    assert native.dtype == torch.bfloat16 and torch.equal(native.float(), out)
    rel = float((out - ref).norm() / ref.norm())
    assert 0 < rel < 0.03, rel  # bf16 rounds (so not equal), but stays close


def test_a_bf16_model_cast_to_float32_computes_in_float32(tiny_file):
    """Only the dense tensors keep their bf16 rounding: the boundary steps aside, nothing is cast."""
    bf16 = bfq.load_unet(tiny_file, dtype=torch.bfloat16)
    cast = bfq.load_unet(tiny_file, dtype=torch.bfloat16).to(torch.float32)
    sample, ehs = tiny_inputs(cast, seq=5)
    with torch.no_grad():
        out, before = cast(sample, 37, ehs).sample, bf16(sample, 37, ehs).sample
        by_hand = cast(sample.bfloat16().float(), 37, ehs.bfloat16().float()).sample
    assert out.dtype == torch.float32 and not torch.equal(out, before) and not torch.equal(out, by_hand)


def test_fp32_and_fp16_loads_have_no_bf16_boundary(tiny_file):
    for dtype in (torch.float32, torch.float16):
        unet = bfq.load_unet(tiny_file, dtype=dtype)
        assert not hasattr(unet, "bfq_compute") and not unet._forward_pre_hooks


def test_auto_compute_is_bf16_only_where_the_cpu_has_native_bf16(monkeypatch):
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    assert load.cpu_has_native_bf16() == (" avx512_bf16" in flags or " amx_bf16" in flags)
    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(load, "cpu_has_native_bf16", lambda native=native: native)
        assert load.compute_dtype("auto", "cpu") == expected
    assert load.compute_dtype("fp32", "cpu") == torch.float32 and load.compute_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="compute must be"):
        load.compute_dtype("int4", "cpu")


def test_compute_option_mistakes_are_one_line_errors():
    runner = CliRunner()
    _one_line_error(runner.invoke(main, ["eval", "tiny-sd", "--compute", "bf16"]), "--compute", "cpu device only")
    _one_line_error(runner.invoke(main, ["generate", "tiny-sd", "--prompt", "a seven", "--compute", "fp32"]),
                    "--compute", "applies to a .bfq file only")  # fmt: skip


def test_eval_scores_a_bf16_file_in_bf16(tiny_file, monkeypatch):
    """`bfq eval --compute bf16` hands the evaluator a bf16 UNet, which it keeps (no float32 copy)."""
    import bfq.tinysd.evaluate as evaluate
    from bfq.tinysd import pipeline_dir

    seen = []
    real = evaluate._load
    monkeypatch.setattr(evaluate, "_load", lambda unet, base: seen.append(unet) or real(unet, base))
    unet = bfq.load_unet(tiny_file, dtype=torch.bfloat16)
    pipe = evaluate._pipeline(unet, pipeline_dir())
    assert seen[0] is unet and pipe.unet is unet


def test_gpu_check_without_a_gpu_says_so_in_one_line_and_exits_0():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--out", os.devnull],
                          capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0], proc.stdout
    assert "Traceback" not in proc.stderr


def test_eval_compute_bf16_is_recorded_with_the_scores(tmp_path):
    import json

    from bfq.pipeline.quantize import quantize

    path = quantize("tiny-sd", tmp_path / "tiny.bfq", recipe="uniform-2", time_cache="grid", progress=False).path
    runs = {c: CliRunner().invoke(main, ["eval", str(path), "--compute", c, "--n-per-digit", "1", "--cfg", "3", "--steps", "4",
                                         "--json", "--quiet"]) for c in ("fp32", "bf16")}  # fmt: skip
    results = {c: json.loads(r.stdout) for c, r in runs.items() if r.exit_code == 0}
    assert set(results) == {"fp32", "bf16"}, {c: r.output for c, r in runs.items()}
    assert results["bf16"]["settings"]["compute"] == "bf16" and results["fp32"]["settings"]["compute"] == "fp32"
    assert results["bf16"]["fd"] != results["fp32"]["fd"]  # really computed in bf16 (close, not equal)
    assert abs(results["bf16"]["fd"] - results["fp32"]["fd"]) < 0.1 * results["fp32"]["fd"]


# ------------------------------------------------------ bf16 on the CPU: attention and small convs


# blocks of 64 query rows of one head (self-attention, cross-attention), or of 4 whole heads of 6
@pytest.mark.parametrize("tokens, keys, scores", [(100, 64, 512), (100, 7, 512), (4, 8, 128)])
def test_blocked_attention_is_sdpa(monkeypatch, tokens, keys, scores):
    from bfq.runtime import cpu_bf16

    monkeypatch.setattr(cpu_bf16, "_SCORES_PER_BLOCK", scores)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 5, generator=gen) for n in (tokens, keys, keys))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, tokens, 15)
    out = cpu_bf16.blocked_attention(q, k, v)
    assert out.shape == ref.shape and out.is_contiguous()
    assert torch.allclose(out, ref, atol=1e-6, rtol=1e-5)
    half = cpu_bf16.blocked_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert half.dtype == torch.bfloat16 and float((half.float() - ref).norm() / ref.norm()) < 0.02


@pytest.mark.parametrize("kernel, stride, padding, bias", [(3, 1, 1, True), (3, 2, 1, False), (1, 1, 0, True), (3, 1, 0, True)])
def test_im2col_conv_is_conv2d(kernel, stride, padding, bias):
    from bfq.runtime.cpu_bf16 import im2col_conv

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 7, 5, generator=gen).to(memory_format=torch.channels_last)
    w, b = torch.randn(4, 6, kernel, kernel, generator=gen), torch.randn(4, generator=gen) if bias else None
    ref = torch.nn.functional.conv2d(x, w, b, stride=stride, padding=padding)
    out = im2col_conv(x, w, b, (stride, stride), (padding, padding))
    assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_small_bf16_convolutions_take_im2col_and_unbatched_inputs_still_work():
    from bfq.runtime import cpu_bf16

    conv = torch.nn.Conv2d(6, 4, 3, padding=1).to(torch.bfloat16)
    plain = torch.nn.functional.conv2d
    cpu_bf16.install(conv)
    x = torch.randn(2, 6, 8, 8, generator=torch.Generator().manual_seed(2)).bfloat16()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.no_grad():
            assert cpu_bf16._few_pixels(conv, x) and not cpu_bf16._few_pixels(conv, torch.zeros(2, 6, 9, 8))
            assert torch.allclose(conv(x).float(), plain(x, conv.weight, conv.bias, padding=1).float(), atol=0.05)
            assert torch.equal(conv(x[0]), plain(x[0], conv.weight, conv.bias, padding=1))  # unbatched: torch's own
    finally:
        torch.set_num_threads(threads)


def test_bf16_cpu_unet_takes_the_fast_paths(tiny_file, monkeypatch):
    """Attention and small convolutions run bfq.runtime.cpu_bf16's paths in bf16 on one thread only
    (diffusers' and torch's own on two); the blocked attention changes the output within
    bf16 rounding (on channels this few, im2col gives the very bits of oneDNN's convolution)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from bfq.runtime import cpu_bf16

    calls = {"attention": 0, "conv": 0}

    def counted(name, fn):
        return lambda *a: calls.__setitem__(name, calls[name] + 1) or fn(*a)

    monkeypatch.setattr(cpu_bf16, "blocked_attention", counted("attention", cpu_bf16.blocked_attention))
    monkeypatch.setattr(cpu_bf16, "im2col_conv", counted("conv", cpu_bf16.im2col_conv))
    fast, flash = (bfq.load_unet(tiny_file, dtype=torch.bfloat16) for _ in range(2))
    assert all(type(p) is cpu_bf16.CpuBlockedAttnProcessor for p in fast.attn_processors.values())
    flash.set_attn_processor(AttnProcessor2_0())
    sample, ehs = tiny_inputs(fast, seq=5)
    threads, out, seen = torch.get_num_threads(), {}, {}
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            with torch.no_grad():
                out[n] = fast(sample, 37, ehs).sample, flash(sample, 37, ehs).sample
            seen[n] = dict(calls)
            calls.update(attention=0, conv=0)
    finally:
        torch.set_num_threads(threads)
    assert seen[1]["attention"] == seen[2]["attention"] == 8 and seen[3]["attention"] == 0  # 4 transformers
    assert seen[1]["conv"] > 0 and seen[2]["conv"] == seen[3]["conv"] == 0
    (a, b), (a2, b2) = out[1], out[3]
    assert not torch.equal(a, b) and torch.equal(a2, b2) and float((a - b).norm() / b.norm()) < 0.03
    with torch.no_grad():
        bfq.load_unet(tiny_file)(sample.float(), 37, ehs.float())
    assert calls == {"attention": 0, "conv": 0}  # float32: diffusers' and torch's own paths
