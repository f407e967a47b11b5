"""bfq.quant.quantizer: codes, dequantization, stored scales and scale initialisation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bfq.format.constants import num_levels
from bfq.quant.quantizer import (
    code_dtype,
    code_range,
    dequantize,
    gaussian_step,
    init_scales,
    quant_error,
    quantize_codes,
    round_scales,
)

torch.set_num_threads(1)
LEVELS = ("balanced", "plain")


def ref_codes(w: np.ndarray, s: np.ndarray, bits: int, levels: str) -> np.ndarray:
    """Element by element: float32 division, Python's round-half-even, clamp."""
    half = 2 ** (bits - 1)
    lo, hi = -half, half if levels == "balanced" else half - 1
    w2 = w.reshape(w.shape[0], -1).astype(np.float32)
    out = np.empty(w2.shape, dtype=np.int64)
    for i in range(w2.shape[0]):
        for j in range(w2.shape[1]):
            x = float(np.float32(w2[i, j]) / np.float32(s[i]))
            out[i, j] = min(max(round(x), lo), hi)
    return out.reshape(w.shape)


def ref_alternating(w: np.ndarray, bits: int, levels: str, iters: int = 10) -> np.ndarray:
    """Slow per-channel version of the documented algorithm (best start, Lloyd rounds, best seen)."""
    half = 2 ** (bits - 1)
    lo, hi = -half, half if levels == "balanced" else half - 1
    c = gaussian_step(bits, levels)
    out = []
    for row in w.reshape(w.shape[0], -1).astype(np.float32):
        r64 = row.astype(np.float64)
        if not np.any(row):
            out.append(1.0)
            continue

        def codes(s):
            return np.clip(np.round(row / np.float32(s)), lo, hi).astype(np.float64)

        def err(s):
            return float(((r64 - np.float64(np.float32(s)) * codes(s)) ** 2).sum())

        starts = [np.float32(np.abs(row).max() / half), np.float32(c * math.sqrt((r64**2).mean()))]
        s = min(starts, key=err)
        best = (err(s), s)
        for _ in range(iters):
            q = codes(s)
            s = np.float32((r64 * q).sum() / (q * q).sum())
            best = min(best, (err(s), s))
        out.append(best[1])
    return np.array(out, dtype=np.float32)


def weights(draw, max_out=6, max_in=40):
    out = draw(st.integers(1, max_out))
    shape = draw(st.sampled_from([(out, draw(st.integers(1, max_in))), (out, draw(st.integers(1, 4)), 3, 3)]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(["normal", "t", "uniform", "sparse"]))
    w = torch.randn(shape, generator=gen)
    if kind == "t":
        w = w / torch.rand(shape, generator=gen).clamp_min(0.05)
    elif kind == "uniform":
        w = torch.rand(shape, generator=gen) * 2 - 1
    elif kind == "sparse":
        w = w * (torch.rand(shape, generator=gen) < 0.2)
    scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    w = w * scale
    if draw(st.booleans()):
        w[0] = 0.0  # an all-zero channel
    return w


weight_st = st.composite(weights)()


def test_code_range_and_dtype():
    assert code_range(1, "balanced") == (-1, 1) and code_range(1, "plain") == (-1, 0)
    assert code_range(2, "balanced") == (-2, 2) and code_range(2, "plain") == (-2, 1)
    assert code_range(8, "balanced") == (-128, 128) and code_range(8, "plain") == (-128, 127)
    for bits in range(1, 9):
        for levels in LEVELS:
            lo, hi = code_range(bits, levels)
            assert hi - lo + 1 == num_levels(bits, levels)
    assert code_dtype(8, "balanced") == torch.int16
    assert code_dtype(8, "plain") == torch.int8 and code_dtype(7, "balanced") == torch.int8
    for bad in (0, 9, 2.0, True, "2"):
        with pytest.raises(ValueError):
            code_range(bad)
    with pytest.raises(ValueError):
        code_range(2, "nf4")


def test_round_half_to_even():
    w = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999997]])
    assert quantize_codes(w, torch.tensor([1.0]), 3).tolist() == [[0, 2, 2, 0, -2, -2, 0]]


@settings(max_examples=40, deadline=None)
@given(
    w=weight_st, bits=st.integers(1, 8), levels=st.sampled_from(LEVELS), method=st.sampled_from(["minmax", "alternating"])
)
def test_codes_match_reference_and_stay_in_range(w, bits, levels, method):
    s = init_scales(w, bits, levels, method=method)
    assert s.dtype == torch.float32 and s.shape == (w.shape[0],)
    assert bool(torch.isfinite(s).all()) and bool((s > 0).all())
    q = quantize_codes(w, s, bits, levels)
    lo, hi = code_range(bits, levels)
    assert q.dtype == code_dtype(bits, levels) and q.shape == w.shape
    assert int(q.min()) >= lo and int(q.max()) <= hi
    np.testing.assert_array_equal(q.numpy().astype(np.int64), ref_codes(w.numpy(), s.numpy(), bits, levels))
    # zero channels: codes all zero, scale 1
    zero = (w.reshape(w.shape[0], -1) == 0).all(1)
    assert bool((q.reshape(w.shape[0], -1)[zero] == 0).all())
    assert bool((s[zero] == 1.0).all())
    # error bound: inside the grid |w - s q| <= s/2; the stored (f16) scale keeps it finite too
    wh = dequantize(q, s)
    x = w / s.reshape(-1, *[1] * (w.ndim - 1))
    inside = (x >= lo - 0.5) & (x <= hi + 0.5)
    bound = (s.reshape(-1, *[1] * (w.ndim - 1)) / 2).expand_as(w) * (1 + 1e-5)
    assert bool(((w - wh).abs() <= bound)[inside].all())
    s16 = round_scales(s, "f16")
    assert bool(torch.isfinite(dequantize(quantize_codes(w, s16, bits, levels), s16)).all())


@settings(max_examples=40, deadline=None)
@given(w=weight_st, bits=st.integers(1, 8), levels=st.sampled_from(LEVELS))
def test_alternating_never_worse_than_its_starts(w, bits, levels):
    e_alt = quant_error(w, init_scales(w, bits, levels), bits, levels)
    e_mm = quant_error(w, init_scales(w, bits, levels, method="minmax"), bits, levels)
    e_zero_iters = quant_error(w, init_scales(w, bits, levels, iters=0), bits, levels)
    tol = 1e-5 * (w.reshape(w.shape[0], -1).double() ** 2).sum(1) + 1e-30
    assert bool((e_alt <= e_mm + tol).all())
    assert bool((e_alt <= e_zero_iters + tol).all())
    assert bool((e_zero_iters <= e_mm + tol).all())  # the chosen start is the better one


@settings(max_examples=15, deadline=None)
@given(w=weight_st, bits=st.integers(1, 4), levels=st.sampled_from(LEVELS))
def test_alternating_matches_slow_reference(w, bits, levels):
    ours = init_scales(w, bits, levels)
    ref = torch.from_numpy(ref_alternating(w.numpy(), bits, levels))
    e_ours, e_ref = quant_error(w, ours, bits, levels), quant_error(w, ref, bits, levels)
    tol = 1e-5 * (w.reshape(w.shape[0], -1).double() ** 2).sum(1) + 1e-30
    assert bool((e_ours <= e_ref + tol).all()) and bool((e_ref <= e_ours + tol).all())


def test_alternating_beats_minmax_on_heavy_tails():
    gen = torch.Generator().manual_seed(0)
    chi2 = torch._standard_gamma(torch.full((64, 512), 2.0), generator=gen) * 2.0
    w = torch.randn(64, 512, generator=gen) / torch.sqrt(chi2 / 4.0)  # Student-t, 4 dof
    total = (w.double() ** 2).sum()
    for bits in (1, 2, 3):
        rel_alt = (quant_error(w, init_scales(w, bits), bits).sum() / total).sqrt()
        rel_mm = (quant_error(w, init_scales(w, bits, method="minmax"), bits).sum() / total).sqrt()
        assert rel_alt < 0.8 * rel_mm


def test_minmax_definition():
    w = torch.tensor([[0.1, -0.8, 0.3], [0.0, 0.0, 0.0], [2.0, 1.0, -1.0]])
    for levels in LEVELS:
        assert init_scales(w, 2, levels, method="minmax").tolist() == pytest.approx([0.4, 1.0, 1.0])


def test_gaussian_step_known_values():
    assert gaussian_step(1) == pytest.approx(1.224, abs=2e-3)
    assert gaussian_step(2) == pytest.approx(0.843, abs=2e-3)
    assert gaussian_step(8) < gaussian_step(7) < gaussian_step(3)


def test_zero_and_tiny_weights():
    w = torch.zeros(3, 7)
    w[1, 2] = 1e-30  # underflows every float32 rms and every fp16 scale
    s = init_scales(w, 1)
    assert bool(torch.isfinite(s).all()) and bool((s > 0).all())
    for sd in ("f16", "f32"):
        rs = round_scales(s, sd)
        q = quantize_codes(w, rs, 1)
        assert bool((rs > 0).all()) and bool(torch.isfinite(dequantize(q, rs)).all())
    assert quantize_codes(w, round_scales(s, "f16"), 1).abs().sum() == 0
    sub = torch.tensor([[1e-45, 0.0, -1e-45]])  # max|w| / 128 underflows in float32
    for method in ("minmax", "alternating"):
        s = init_scales(sub, 8, method=method)
        assert bool((s > 0).all()) and quantize_codes(sub, s, 8).tolist() == [[1, 0, -1]]


def test_non_finite_weights_rejected():
    w = torch.ones(2, 3)
    w[1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        init_scales(w, 2)
    w[1, 1] = float("inf")
    with pytest.raises(ValueError):
        init_scales(w, 2, method="minmax")


def test_round_scales():
    s = torch.tensor([0.1, -0.3, 0.0, 1e-12, 1e9, 3.0])
    r16 = round_scales(s, "f16")
    assert r16.dtype == torch.float32
    assert torch.equal(r16.to(torch.float16).to(torch.float32), r16)  # exactly representable
    assert r16[0].item() == torch.tensor(0.1).half().float().item()
    assert r16[1].item() == torch.tensor(0.3).half().float().item()
    assert r16[2].item() == 2.0**-24 and r16[3].item() == 2.0**-24 and r16[4].item() == 65504.0
    r32 = round_scales(s, "f32")
    assert r32[0].item() == torch.tensor(0.1).item() and bool((r32 > 0).all())
    with pytest.raises(ValueError):
        round_scales(s, "bf16")


def test_dequantize_is_the_defined_expression():
    gen = torch.Generator().manual_seed(1)
    q = torch.randint(-2, 3, (5, 3, 3, 3), generator=gen, dtype=torch.int8)
    s = torch.rand(5, generator=gen).half()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        out = dequantize(q, s, dtype)
        ref = torch.stack([(s[i].float() * q[i].float()) for i in range(5)]).to(dtype)
        assert out.dtype == dtype and torch.equal(out, ref)


def test_low_precision_inputs():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(8, 16, generator=gen)
    for dtype in (torch.float16, torch.bfloat16):
        s = init_scales(w.to(dtype), 2)
        assert s.dtype == torch.float32
        assert torch.equal(quantize_codes(w.to(dtype), s, 2), quantize_codes(w.to(dtype).float(), s, 2))
    wt = torch.randn(16, 8, generator=gen).t()  # non-contiguous
    assert torch.equal(init_scales(wt, 3), init_scales(wt.contiguous(), 3))


def test_shape_checks():
    with pytest.raises(ValueError):
        quantize_codes(torch.ones(4), torch.ones(4), 2)
    with pytest.raises(ValueError):
        quantize_codes(torch.ones(4, 2), torch.ones(3), 2)
    with pytest.raises(ValueError):
        init_scales(torch.ones(4, 2), 2, method="mse")


@settings(max_examples=15, deadline=None)
@given(w=weight_st, bits=st.integers(1, 8), levels=st.sampled_from(LEVELS))
def test_torch_path_agrees_with_numba_path(w, bits, levels):
    """Accelerator tensors take the torch path; CPU tensors the fused numba kernel."""
    import bfq.quant.quantizer as qz

    fast = init_scales(w, bits, levels)
    old = qz._USE_NUMBA
    qz._USE_NUMBA = False
    try:
        slow = init_scales(w, bits, levels)
    finally:
        qz._USE_NUMBA = old
    e_fast, e_slow = quant_error(w, fast, bits, levels), quant_error(w, slow, bits, levels)
    tol = 1e-5 * (w.reshape(w.shape[0], -1).double() ** 2).sum(1) + 1e-30
    assert bool((e_fast <= e_slow + tol).all()) and bool((e_slow <= e_fast + tol).all())
