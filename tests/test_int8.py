"""int8 activations on the int8 codes (``compute="int8"``, bfq.runtime.int8) and fine-tuning's
matching activation fake quantization (``act_bits=8``, bfq.quant.activations)."""

from __future__ import annotations

import json

import pytest
import torch
from bfq_cli.main import main
from click.testing import CliRunner

import bfq
from bfq.quant import activations
from bfq.quant.nn import QuantLinear, iter_quantized, set_act_bits
from bfq.runtime import int8, load
from bfq.runtime.packed import PackedLayer, packed_layers
from tests.helpers import tiny_inputs, tiny_unet
from tests.test_edges import _one_line_error

needs_int8 = pytest.mark.skipif(int8.cpu_int8_problem() is not None, reason=f"{int8.cpu_int8_problem()}")


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    from bfq.pipeline.quantize import quantize

    root = tmp_path_factory.mktemp("int8")
    tiny_unet(seed=3).save_pretrained(root / "unet")
    # uniform-2 keeps conv_in and conv_out at 8 bits (257 levels: +128 does not fit int8)
    return quantize(str(root / "unet"), root / "tiny.bfq", recipe="uniform-2", time_cache="grid", progress=False).path


def _fake_quantized_reference(unet):
    """``unet`` (fp32, packed) with every int8-eligible layer's input fake-quantized: what the int8
    kernels compute, up to float rounding."""
    for _, layer in packed_layers(unet):
        if int8.eligible(layer):
            layer.register_forward_pre_hook(lambda m, args: (activations.fake_quantize(args[0]),))
    return unet


@needs_int8
def test_int8_layers_compute_the_fake_quantized_model(tiny_file):
    """The int8 kernels' integer GEMM is exact, so the int8 model equals the fp32 model with
    fake-quantized activations up to fp32 rounding of the sums (the products q_w * (q_x - zp) are
    small integers times two scales): ~1e-6 per layer, under 1e-4 after the whole UNet. Against
    the plain fp32 model it differs by the activation quantization itself (~2%, and never 0)."""
    plain = bfq.load_unet(tiny_file, dtype=torch.float32)
    reference = _fake_quantized_reference(bfq.load_unet(tiny_file, dtype=torch.float32))
    fast = bfq.load_unet(tiny_file, dtype=torch.float32)
    counts = int8.convert(fast)
    sample, ehs = tiny_inputs(plain, seq=5)
    with torch.no_grad():
        a, r, f = (m(sample, 37, ehs).sample for m in (plain, reference, fast))
    assert counts["int8"] > 0
    assert float((f - r).norm() / r.norm()) < 1e-4
    assert 1e-3 < float((f - a).norm() / a.norm()) < 0.05


@needs_int8
def test_layers_whose_codes_do_not_fit_int8_stay_float(tiny_file):
    unet = bfq.load_unet(tiny_file, compute="int8")
    kinds = {name: isinstance(layer, int8.Int8Layer) for name, layer in packed_layers(unet)}
    assert not kinds["conv_in"] and not kinds["conv_out"]  # 8-bit balanced: codes -128..128
    assert unet.conv_in.bits == 8 and unet.conv_in.num_levels == 257
    assert all(kinds[n] for n in kinds if n not in ("conv_in", "conv_out"))
    assert unet.bfq_int8_layers == {"int8": len(kinds) - 2, "float": 2} and unet.bfq_compute == "int8"
    assert all(isinstance(m, PackedLayer) for _, m in packed_layers(unet))  # codes kept: state_dict unchanged
    assert set(unet.state_dict()) == set(bfq.load_unet(tiny_file).state_dict())


@needs_int8
def test_load_int8_takes_float32_and_stays_close_to_fp32(tiny_file):
    fp32 = bfq.load_unet(tiny_file, dtype=torch.float32)
    fast = bfq.load_unet(tiny_file, compute="int8")
    sample, ehs = tiny_inputs(fp32, seq=5)
    with torch.no_grad():
        ref, out = fp32(sample, 37, ehs).sample, fast(sample, 37, ehs).sample
    assert out.dtype == torch.float32
    assert 0 < float((out - ref).norm() / ref.norm()) < 0.05


def test_int8_is_refused_where_it_cannot_run(tiny_file, monkeypatch):
    with pytest.raises(ValueError, match="dtype or compute"):
        bfq.load_unet(tiny_file, compute="int8", dtype=torch.float32)
    with pytest.raises(ValueError, match="packed runtime"):
        bfq.load_unet(tiny_file, compute="int8", runtime="dense")
    monkeypatch.setattr(int8, "cpu_int8_problem", lambda: "this CPU has no int8 dot-product instructions (...)")
    with pytest.raises(ValueError, match="compute int8: this CPU has no int8"):
        bfq.load_unet(tiny_file, compute="int8")
    runner = CliRunner()
    _one_line_error(runner.invoke(main, ["eval", str(tiny_file), "--compute", "int8"]), "--compute", "no int8 dot-product")
    _one_line_error(runner.invoke(main, ["generate", str(tiny_file), "--prompt", "a seven", "--compute", "int8"]),
                    "--compute", "no int8 dot-product")  # fmt: skip


def test_int8_cli_mistakes_are_one_line_errors(tiny_file):
    runner = CliRunner()
    _one_line_error(runner.invoke(main, ["generate", str(tiny_file), "--prompt", "a seven", "--compute", "int8",
                                         "--runtime", "dense"]), "--compute", "packed runtime")  # fmt: skip
    _one_line_error(runner.invoke(main, ["eval", "tiny-sd", "--compute", "int8"]), "--compute", "cpu device only")
    _one_line_error(runner.invoke(main, ["generate", "tiny-sd", "--prompt", "a seven", "--compute", "int8"]),
                    "--compute", "applies to a .bfq file only")  # fmt: skip


def test_auto_never_chooses_int8(monkeypatch):
    monkeypatch.setattr(load, "cpu_has_native_bf16", lambda: True)
    assert load.compute_dtype("auto", "cpu") == torch.bfloat16 and load.compute_dtype("int8", "cpu") == torch.bfloat16
    monkeypatch.setattr(load, "cpu_has_native_bf16", lambda: False)
    assert load.compute_dtype("int8", "cpu") == torch.float32  # the float layers: emulated bf16 would be slower


@needs_int8
def test_eval_compute_int8_scores_and_records_the_layers(tmp_path):
    from bfq.pipeline.quantize import quantize

    path = quantize("tiny-sd", tmp_path / "tiny.bfq", recipe="uniform-2", time_cache="grid", progress=False).path
    run = CliRunner().invoke(main, ["eval", str(path), "--compute", "int8", "--n-per-digit", "1", "--cfg", "3", "--steps", "4",
                                    "--json", "--quiet"])  # fmt: skip
    assert run.exit_code == 0, run.output
    result = json.loads(run.stdout)
    assert result["settings"]["compute"] == "int8" and result["settings"]["int8_layers"]["int8"] > 0


def test_the_numba_quantizer_is_the_torch_one_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 5, 5, generator=g) * 3 + 1
    channels_last = x.contiguous(memory_format=torch.channels_last).bfloat16()
    for t in (x, x.bfloat16(), channels_last, x[:, :, 1:4]):  # the last one strided: the torch path
        q, scale, zp = int8.quantize_input(t)
        assert (scale, zp) == activations.act_qparams(t)
        assert torch.equal(q, activations.quantize_uint8(t, scale, zp)) and q.shape == t.shape
    assert int8.quantize_input(channels_last)[0].is_contiguous(memory_format=torch.channels_last)
    q, scale, zp = int8.quantize_input(x, act_range=(-1.0, 1.0))  # calibrated: what falls outside is clamped
    assert (scale, zp) == activations.range_qparams(-1.0, 1.0) and int(q.min()) == 0 and int(q.max()) == 255


# ------------------------------------------------------------------------------ fine-tuning


def test_activation_quantization_is_per_tensor_uint8_with_the_range_of_the_tensor():
    x = torch.tensor([-1.0, 0.0, 0.5, 3.0])
    scale, zp = activations.act_qparams(x)
    assert scale == pytest.approx(4.0 / 255) and zp == round(1.0 / scale)
    q = activations.quantize_uint8(x, scale, zp)
    assert q.dtype == torch.uint8 and int(q.min()) == 0 and int(q.max()) == 255
    x_hat = activations.fake_quantize(x)
    assert float((x_hat - x).abs().max()) <= scale / 2 + 1e-7 and not torch.equal(x_hat, x)
    assert activations.act_qparams(torch.zeros(3)) == (1.0, 0)
    assert activations.fits_int8(7, "balanced") and not activations.fits_int8(8, "balanced") and activations.fits_int8(8, "plain")


def test_act_bits_fake_quantizes_the_inputs_with_a_straight_through_gradient():
    torch.manual_seed(0)
    layer = QuantLinear.from_float(torch.nn.Linear(16, 8), 2, init="minmax")
    x = torch.randn(4, 16, requires_grad=True)
    plain = layer(x)
    layer.act_bits = 8
    fq = layer(x)
    expected = torch.nn.functional.linear(activations.fake_quantize(x), layer.fake_weight(), layer.bias)
    assert torch.equal(fq, expected) and not torch.equal(fq, plain)
    (grad,) = torch.autograd.grad(fq.sum(), x)
    (grad_plain,) = torch.autograd.grad(plain.sum(), x)
    assert torch.equal(grad, grad_plain)  # straight through: d x_hat / d x = 1
    with pytest.raises(ValueError, match="act_bits"):
        set_act_bits(torch.nn.Sequential(layer), 4)


def test_act_bits_config_and_option_validation():
    from bfq.pipeline.finetune import FinetuneConfig

    assert FinetuneConfig(act_bits=8).validate().act_bits == 8
    with pytest.raises(ValueError, match="act_bits must be 8"):
        FinetuneConfig(act_bits=4).validate()
    assert FinetuneConfig().key() != FinetuneConfig(act_bits=8).key()  # changes the trajectory: no silent resume
    runner = CliRunner()
    result = runner.invoke(main, ["finetune", "tiny-sd", "--bits", "1.99", "-o", "x.bfq", "--act-bits", "4"])
    assert result.exit_code == 2 and "--act-bits" in result.output, result.output
    _one_line_error(runner.invoke(main, ["quantize", "tiny-sd", "--recipe", "uniform-2", "-o", "x.bfq", "--act-bits", "8"]),
                    "--act-bits", "no effect without fine-tuning")  # fmt: skip


def test_fake_quantization_is_active_during_training_only(monkeypatch):
    import bfq.quant.nn as qnn
    from tests.test_finetune import fast_config, make_setup

    student, teacher, source = make_setup("grid")
    calls = []
    real = qnn.fake_quantize
    monkeypatch.setattr(qnn, "fake_quantize", lambda x: calls.append(x.shape) or real(x))
    notes = []
    bfq.pipeline.finetune.finetune(student, teacher, source, fast_config(steps=1, act_bits=8), log=notes.append)
    eligible = [m for _, m in iter_quantized(student) if qnn.takes_int8_activations(m)]
    assert len(calls) >= len(eligible) > 0
    assert any(f"inputs of {len(eligible)} layers" in str(n) for n in notes), notes
    assert all(m.act_bits is None for _, m in iter_quantized(student))  # off again after training
    calls.clear()
    sample, ehs = tiny_inputs(student, seq=5)
    with torch.no_grad():
        student(sample, 10, ehs)
    assert not calls
