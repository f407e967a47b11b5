"""The tiny-sd quality metric: Fréchet distance, a reduced evaluation, sensitivity, CLI."""

import importlib
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bfq.tinysd.evaluate import evaluate, format_report, frechet_distance  # noqa: E402

REDUCED = dict(n_per_digit=3, steps=8, cfg_scales=(3.0,), default_cfg=3.0)


def _eval_cmd():
    try:
        return importlib.import_module("bfq_cli.eval_cmd").eval_cmd
    except ImportError:  # not installed: load cli/eval_cmd.py from the source tree
        path = Path(__file__).resolve().parent.parent / "cli" / "eval_cmd.py"
        spec = importlib.util.spec_from_file_location("_bfq_eval_cmd", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.eval_cmd


@pytest.fixture(scope="module")
def fp32_unet():
    from diffusers import UNet2DConditionModel

    from bfq.tinysd import pipeline_dir

    return UNet2DConditionModel.from_pretrained(str(pipeline_dir() / "unet"), local_files_only=True)


@pytest.fixture(scope="module")
def fp32_result(tmp_path_factory):
    grid = tmp_path_factory.mktemp("grid") / "grid.png"
    return evaluate(grid_path=grid, **REDUCED), grid


def test_frechet_distance_of_equal_gaussians_is_zero_and_matches_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 5))
    mu, sigma = a.mean(0), np.cov(a, rowvar=False)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8
    # diagonal covariances: sum (mu1-mu2)^2 + (sqrt(v1) - sqrt(v2))^2
    v1, v2 = np.array([1.0, 4.0]), np.array([9.0, 1.0])
    fd = frechet_distance([0, 0], np.diag(v1), [1, 2], np.diag(v2))
    assert fd == pytest.approx(5 + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum())


def test_frechet_distance_matches_scipy_sqrtm():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(100, 6)), rng.normal(size=(100, 6)) * 1.5 + 0.3
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    m1, m2 = a.mean(0), b.mean(0)
    ref = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy_linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(ref, rel=1e-6)


def test_reduced_evaluation_structure_grid_and_report(fp32_result):
    result, grid = fp32_result
    assert set(result) >= {"alignment", "fd", "default_cfg", "sweep", "settings", "seconds"}
    assert [row["cfg"] for row in result["sweep"]] == [3.0]
    assert result["settings"]["images_per_scale"] == 30
    assert 0 <= result["alignment"] <= 1 and result["fd"] >= 0
    assert result["alignment"] >= 0.7  # fp32 tiny-sd, even at 8 steps and 30 images
    from PIL import Image

    from bfq.tinysd.evaluate import LABEL_BAND

    assert Image.open(grid).size == (3 * (2 + 3 * 18), 3 * (2 + 10 * 18) + LABEL_BAND)  # a band for the scale labels
    assert "alignment" in format_report(result)


def test_evaluation_is_bit_reproducible_and_takes_any_unet(fp32_result, fp32_unet):
    again = evaluate(fp32_unet, **REDUCED)
    first = fp32_result[0]
    assert again["sweep"] == first["sweep"]


def test_half_precision_unet_is_scored_in_float32(fp32_result, fp32_unet):
    import copy

    half = copy.deepcopy(fp32_unet).half()
    result = evaluate(half, **REDUCED)
    assert next(half.parameters()).dtype == torch.float16  # the caller's model is left alone
    assert result["alignment"] >= fp32_result[0]["alignment"] - 0.1


def test_destroyed_unet_scores_clearly_worse(fp32_result, fp32_unet):
    from bfq.tinysd.sensitivity import fake_quantize_unet

    ternary = evaluate(fake_quantize_unet(fp32_unet, bits=1, scales="minmax"), **REDUCED)
    fp32 = fp32_result[0]
    assert ternary["alignment"] < fp32["alignment"] - 0.3
    assert ternary["fd"] > 2 * fp32["fd"]


def test_4bit_loses_little(fp32_result, fp32_unet):
    """Min-max scales: least-squares ones clip conv_in/conv_out outliers and triple the FD."""
    from bfq.tinysd.sensitivity import fake_quantize_unet

    q4 = evaluate(fake_quantize_unet(fp32_unet, bits=4, scales="minmax"), **REDUCED)
    fp32 = fp32_result[0]
    assert q4["alignment"] >= fp32["alignment"] - 0.1
    assert q4["fd"] < 1.5 * fp32["fd"] + 5


def test_fake_quantizer_io_bits_apply_to_conv_in_and_out_only(fp32_unet):
    from bfq.tinysd.sensitivity import fake_quantize_unet

    q = fake_quantize_unet(fp32_unet, bits=1, scales="minmax", io_bits=8)
    assert torch.equal(q.conv_out.weight, fake_quantize_unet(fp32_unet, 8).conv_out.weight)
    assert q.conv_in.weight.unique().numel() > 3
    assert q.conv_out.weight[0].unique().numel() > 3
    assert q.down_blocks[0].resnets[0].conv1.weight[0].unique().numel() <= 3


def test_fake_quantizer_levels_and_least_squares_scales():
    from bfq.tinysd.sensitivity import fake_quantize_weight

    w = torch.randn(4, 3, 3, 3)
    for bits in (1, 2, 4):
        q = fake_quantize_weight(w, bits, "minmax")
        s = w.reshape(4, -1).abs().amax(1) / 2 ** (bits - 1)
        codes = q.reshape(4, -1) / s[:, None]
        assert torch.allclose(codes, codes.round(), atol=1e-4)
        assert codes.abs().max() <= 2 ** (bits - 1) + 1e-4
        err_mm = (fake_quantize_weight(w, bits, "minmax") - w).pow(2).sum()
        err_ls = (fake_quantize_weight(w, bits, "lsq") - w).pow(2).sum()
        assert err_ls <= err_mm + 1e-6


def test_cli_eval_tiny_sd_json():
    from click.testing import CliRunner

    args = ["tiny-sd", "--json", "--n-per-digit", "2", "--steps", "4", "--cfg", "1.5", "--cfg", "3.0"]
    result = CliRunner().invoke(_eval_cmd(), args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model"] == "tiny-sd" and data["default_cfg"] == 3.0
    assert {"alignment", "fd"} <= set(data)
    assert [row["cfg"] for row in data["sweep"]] == [1.5, 3.0]


def test_cli_eval_of_a_bfq_made_from_tiny_sd(tmp_path):
    from click.testing import CliRunner

    quantize = pytest.importorskip("bfq.pipeline.quantize").quantize
    path = tmp_path / "u4.bfq"
    quantize("tiny-sd", path, recipe="uniform-4", steps=REDUCED["steps"], progress=False)
    args = [str(path), "--json", "--n-per-digit", "3", "--steps", str(REDUCED["steps"]), "--cfg", "3.0"]
    result = CliRunner().invoke(_eval_cmd(), args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model"] == str(path) and data["alignment"] >= 0.7


def test_cli_eval_rejects_unknown_models(tmp_path):
    from click.testing import CliRunner

    runner = CliRunner()
    assert runner.invoke(_eval_cmd(), ["sd-v9"]).exit_code == 2
    assert runner.invoke(_eval_cmd(), [str(tmp_path / "missing.bfq")]).exit_code == 2
