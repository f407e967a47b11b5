"""bfq.quant.nn: fake-quantized modules, LSQ gradients, export and UNet swapping."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_inputs, tiny_unet
from torch import nn

from bfq.errors import RecipeError
from bfq.quant.nn import QuantConv2d, QuantLinear, iter_quantized, quantize_unet
from bfq.quant.quantizer import (
    code_range,
    dequantize,
    init_scales,
    quantize_codes,
    round_scales,
)

torch.set_num_threads(1)

CONVS = [
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=1),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=2, padding=(1, 0), dilation=(1, 2)),
    dict(in_channels=4, out_channels=6, kernel_size=3, groups=2, bias=False),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, padding_mode="reflect"),
    dict(in_channels=4, out_channels=6, kernel_size=5, padding="same"),
]


def _layer_cases():
    torch.manual_seed(0)
    yield nn.Linear(12, 7), torch.randn(3, 5, 12)
    yield nn.Linear(12, 7, bias=False), torch.randn(2, 12)
    for kw in CONVS:
        yield nn.Conv2d(**kw), torch.randn(2, 4, 9, 8)


@pytest.mark.parametrize(
    "bits,levels,scale_dtype", [(1, "balanced", "f16"), (2, "plain", "f32"), (8, "balanced", "f16"), (3, "balanced", "f32")]
)
def test_forward_equals_exported_codes(bits, levels, scale_dtype):
    for layer, x in _layer_cases():
        ref_w = layer.weight.detach().clone()
        cls = QuantLinear if isinstance(layer, nn.Linear) else QuantConv2d
        qm = cls.from_float(layer, bits, levels=levels, scale_dtype=scale_dtype)
        assert qm.weight is layer.weight and qm.bias is layer.bias  # no copy
        q, s = qm.export_codes()
        assert s.dtype == (torch.float16 if scale_dtype == "f16" else torch.float32)
        assert q.dtype == (torch.int16 if (bits, levels) == (8, "balanced") else torch.int8)
        lo, hi = code_range(bits, levels)
        assert int(q.min()) >= lo and int(q.max()) <= hi and q.shape == ref_w.shape
        # the codes are those of quantize_codes with the stored scale
        assert torch.equal(q, quantize_codes(ref_w, s.float(), bits, levels))
        w_hat = dequantize(q, s, torch.float32)
        assert torch.equal(qm.fake_weight(), w_hat)
        # the module computes exactly the plain layer with the dequantized weight
        plain = type(layer)(**_ctor_kwargs(layer))
        with torch.no_grad():
            plain.weight.copy_(w_hat)
            if layer.bias is not None:
                plain.bias.copy_(layer.bias)
        assert torch.equal(qm(x), plain(x))


def _ctor_kwargs(layer):
    if isinstance(layer, nn.Linear):
        return dict(in_features=layer.in_features, out_features=layer.out_features, bias=layer.bias is not None)
    return dict(
        in_channels=layer.in_channels, out_channels=layer.out_channels, kernel_size=layer.kernel_size,
        stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
        bias=layer.bias is not None, padding_mode=layer.padding_mode,
    )  # fmt: skip


def test_scale_is_initialised_and_rounded():
    torch.manual_seed(1)
    lin = nn.Linear(32, 8)
    qm = QuantLinear.from_float(lin, 2)
    assert torch.equal(qm.scale.detach(), init_scales(lin.weight, 2))
    assert torch.equal(qm.effective_scale(), round_scales(qm.scale, "f16"))
    assert QuantLinear.from_float(lin, 2, init="minmax").scale.detach().tolist() == pytest.approx(
        (lin.weight.detach().abs().amax(1) / 2).tolist()
    )
    assert bool((QuantLinear.from_float(lin, 2, init=None).scale == 1).all())
    with pytest.raises(ValueError):
        QuantLinear.from_float(lin, 2, init="mse")
    with pytest.raises(ValueError):
        QuantLinear.from_float(lin, 2, grad_scale="big")


@pytest.mark.parametrize("grad_scale", [None, "lsq", 0.25])
def test_lsq_gradients(grad_scale):
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 5, 3)
    qm = QuantConv2d.from_float(conv, 2, scale_dtype="f32", grad_scale=grad_scale)
    with torch.no_grad():
        qm.scale.mul_(0.7)  # push some weights outside the clamp range
    w_hat = qm.fake_weight()
    g = torch.randn_like(w_hat)
    (w_hat * g).sum().backward()
    # reference: LSQ STE, written out element by element
    w, s = conv.weight.detach(), qm.scale.detach()
    lo, hi = code_range(2, "balanced")
    x = w / s[:, None, None, None]
    inside = (x >= lo) & (x <= hi)
    q = torch.round(x).clamp(lo, hi)
    dw = torch.where(inside, g, torch.zeros_like(g))
    ds = (g * torch.where(inside, q - x, q)).sum((1, 2, 3))
    factor = {None: 1.0, "lsq": 1.0 / (27 * hi) ** 0.5, 0.25: 0.25}[grad_scale]
    torch.testing.assert_close(conv.weight.grad, dw)
    torch.testing.assert_close(qm.scale.grad, ds * factor, rtol=1e-4, atol=1e-6)


def test_negative_scale_stays_usable():
    torch.manual_seed(3)
    qm = QuantLinear.from_float(nn.Linear(6, 4), 1)
    with torch.no_grad():
        qm.scale.neg_()
    q, s = qm.export_codes()
    assert bool((s > 0).all())
    assert torch.equal(qm.fake_weight(), dequantize(q, s))


def test_training_reduces_error():
    torch.manual_seed(4)
    target = nn.Linear(16, 16)
    student = QuantLinear.from_float(nn.Linear(16, 16), 2)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    x = torch.randn(256, 16)
    losses = []
    for _ in range(60):
        loss = F.mse_loss(student(x), target(x).detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def _all_bits(unet, bits=8, skip=("time_embedding",)):
    return {
        f"{n}.weight": bits
        for n, m in unet.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and not n.startswith(skip)
    }


def test_quantize_unet_swaps_and_exports():
    unet = tiny_unet(seed=0)
    sample, ehs = tiny_inputs(unet)
    with torch.no_grad():
        ref = unet(sample, 10, ehs).sample
    recipe = _all_bits(unet, 8)
    recipe["down_blocks.0.resnets.0.conv1.weight"] = 7
    quantize_unet(unet, recipe, progress=False)
    names = [n for n, _ in iter_quantized(unet)]
    assert sorted(names) == sorted(recipe)
    for name, mod in iter_quantized(unet):
        assert mod.bits == recipe[name]
    assert isinstance(unet.time_embedding.linear_1, nn.Linear)
    assert isinstance(unet.get_submodule("down_blocks.0.resnets.0.conv1"), QuantConv2d)
    with torch.no_grad():
        out = unet(sample, 10, ehs).sample
    assert not torch.equal(out, ref)
    assert (out - ref).norm() < 0.05 * ref.norm()


def test_quantized_unet_state_dict_roundtrip():
    unet = tiny_unet(seed=1)
    recipe = _all_bits(unet, 2)
    quantize_unet(unet, recipe, progress=False, scale_dtype="f32")
    sd = unet.state_dict()
    assert all(f"{n[: -len('.weight')]}.scale" in sd for n in recipe)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    other = quantize_unet(tiny_unet(seed=2), recipe, progress=False, scale_dtype="f32", init=None)
    other.load_state_dict(torch.load(buf, weights_only=True))
    sample, ehs = tiny_inputs(unet, batch=1)
    with torch.no_grad():
        assert torch.equal(unet(sample, 3, ehs).sample, other(sample, 3, ehs).sample)
    for (n1, m1), (n2, m2) in zip(iter_quantized(unet), iter_quantized(other)):
        assert n1 == n2 and all(torch.equal(a, b) for a, b in zip(m1.export_codes(), m2.export_codes()))


def test_quantize_unet_rejects_bad_recipes():
    unet = tiny_unet()
    with pytest.raises(RecipeError, match="2 recipe layer"):
        quantize_unet(unet, {"conv_in.weight": 2, "nope.weight": 2, "conv_in.bias": 2}, progress=False)
    with pytest.raises(RecipeError, match="conv_in.weight"):
        quantize_unet(unet, {"conv_in.weight": 9}, progress=False)
    assert type(unet.conv_in) is nn.Conv2d  # nothing swapped on failure
    quantize_unet(unet, {"conv_in.weight": 4}, progress=False)
    with pytest.raises(RecipeError):  # already quantized
        quantize_unet(unet, {"conv_in.weight": 4}, progress=False)


@pytest.mark.slow
def test_sd15_scale_init_under_five_minutes():
    """Paper: 10 alternating rounds take ~5 min. Reproduce: pytest -m slow tests/test_nn.py -s"""
    import time

    from bfq.pipeline.models import build_sd15_random
    from bfq.quant.recipe import resolve_recipe

    unet = build_sd15_random()
    recipe = resolve_recipe("bitsfusion-sd15", unet)
    start = time.monotonic()
    quantize_unet(unet, recipe.bits, progress=False)
    elapsed = time.monotonic() - start
    print(f"alternating scale init, {len(recipe.bits)} layers, {torch.get_num_threads()} thread(s): {elapsed:.1f} s")
    assert elapsed < 300
