"""tiny-sdxl as a first-class bundled model: the defaults of the tiny models come from the family
(20 sampler steps), its built-in digits data for fine-tuning (both text encoders, the pooled
text_embeds, time_ids and the encoded empty prompt, as its pipeline conditions), and `bfq eval` of
tiny-sdxl and of a .bfq made from it."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from bfq_cli.main import main
from click.testing import CliRunner

from bfq.families import FAMILIES, family_for_name
from bfq.format import open_bfq
from bfq.tinysdxl import pipeline_dir
from bfq.tinysdxl.build import TIME_IDS

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def text_pipe():
    """tiny-sdxl's pipeline without UNet and VAE: its own encode_prompt is the reference."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(pipeline_dir(), unet=None, vae=None, local_files_only=True)


@pytest.fixture(scope="module")
def digits():
    from bfq.pipeline.finetune.data import make_source

    return make_source(None, model_name="tiny-sdxl", pipeline_dir=pipeline_dir(), batch_size=6, seed=3)


def test_tiny_models_default_to_their_metrics_steps():
    from bfq.pipeline.quantize import default_steps
    from bfq.tinysd.evaluate import DEFAULT_STEPS as METRIC_STEPS

    assert {f.tiny_name: f.tiny_steps for f in FAMILIES} == {"tiny-sd": METRIC_STEPS, "tiny-sdxl": METRIC_STEPS, "tiny-pixart": METRIC_STEPS}
    assert default_steps("tiny-sd") == default_steps("tiny-sdxl") == METRIC_STEPS == 20
    assert default_steps("sdxl-random") == default_steps("sd15-random") == family_for_name("sdxl").default_steps == 50


def test_quantize_tiny_sdxl_caches_its_metrics_20_steps(tmp_path):
    out = tmp_path / "t.bfq"
    result = CliRunner().invoke(main, ["quantize", "tiny-sdxl", "--recipe", "uniform-2", "--quiet", "-o", str(out)])
    assert result.exit_code == 0, result.output
    with open_bfq(out) as f:
        assert f.header.time_cache.mode == "scheduler" and len(f.header.time_cache.timesteps) == 20


def test_digit_batches_are_conditioned_as_the_pipeline_conditions(digits, text_pipe):
    """Every field an SDXL forward needs, equal to StableDiffusionXLPipeline.encode_prompt of the
    batch's captions; the time ids of the 16-pixel images; the unconditional side is the encoded ""
    (tiny-sdxl's force_zeros_for_empty_prompt is false), not zeros."""
    batch = digits.batch(2)
    assert batch["latents"].shape == (6, 4, 8, 8)
    with torch.no_grad():
        ehs, _, pooled, _ = text_pipe.encode_prompt(digits.caption(2), device="cpu", do_classifier_free_guidance=False)
        empty, _, empty_pooled, _ = text_pipe.encode_prompt([""], device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(batch["encoder_hidden_states"], ehs.float())
    torch.testing.assert_close(batch["text_embeds"], pooled.float())
    torch.testing.assert_close(batch["time_ids"], torch.tensor([TIME_IDS], dtype=torch.float32).repeat(6, 1))
    torch.testing.assert_close(batch["uncond_hidden_states"], empty[0].float())
    torch.testing.assert_close(batch["uncond_text_embeds"], empty_pooled[0].float())
    assert batch["uncond_text_embeds"].abs().sum() > 0
    torch.testing.assert_close(digits.batch(2)["latents"], batch["latents"])  # indexed: batch i is a pure function of i
    from bfq.pipeline.finetune.data import make_source

    by_name = make_source(None, model_name="tiny-sdxl", batch_size=6, seed=3).batch(2)  # the bundled pipeline's
    torch.testing.assert_close(by_name["text_embeds"], batch["text_embeds"])


def test_sdxl_prompt_encoding_uses_the_pipelines_image_size():
    """The size conditions are the pipeline's default image size (sample_size x its VAE's scale: 16
    pixels for tiny-sdxl), what StableDiffusionXLPipeline passes, not SDXL's 8 pixels a latent."""
    from bfq.tinysdxl import load_pipeline

    config = json.loads((pipeline_dir() / "unet" / "config.json").read_text())
    cond = family_for_name("tiny-sdxl").encode_prompts(pipeline_dir(), ["seven", "3"], config)
    pipe = load_pipeline()
    size = pipe.default_sample_size * pipe.vae_scale_factor
    assert size == 16
    projection = pipe.text_encoder_2.config.projection_dim
    expected = pipe._get_add_time_ids((size, size), (0, 0), (size, size), torch.float32,
                                      text_encoder_projection_dim=projection)  # fmt: skip
    torch.testing.assert_close(cond["added_cond_kwargs"]["time_ids"], expected.repeat(2, 1))


def test_finetune_tiny_sdxl_on_its_built_in_digits(tmp_path):
    """`bfq quantize tiny-sdxl --stage1-steps --stage2-steps` with no --data trains on the digits
    (Stage II: noise prediction on their latents) and changes the scales."""
    runner = CliRunner()
    common = ["quantize", "tiny-sdxl", "--recipe", "uniform-2", "--quiet"]
    assert runner.invoke(main, [*common, "-o", str(tmp_path / "init.bfq")]).exit_code == 0
    result = runner.invoke(main, [*common, "--stage1-steps", "2", "--stage2-steps", "2", "--batch-size", "4",
                                  "--lr", "1e-2", "-o", str(tmp_path / "ft.bfq")])  # fmt: skip
    assert result.exit_code == 0, result.output
    with open_bfq(tmp_path / "init.bfq") as a, open_bfq(tmp_path / "ft.bfq") as b:
        record = json.loads(b.header.metadata["finetune"])
        changed = [n for n in a.layers if not np.array_equal(a.read_scales(n), b.read_scales(n))]
    assert record["stage1_steps"] == 2 and record["stage2_steps"] == 2
    assert len(changed) > 10


def test_default_eval_fn_scores_tiny_sdxl_with_its_own_pipeline(monkeypatch):
    import bfq.tinysd.evaluate as metric
    from bfq.pipeline.finetune.evaluation import default_eval_fn
    from bfq.pipeline.models import resolve_model

    seen = {}

    def fake_evaluate(unet, **kwargs):
        seen.update(kwargs)
        return {"alignment": 1.0, "fd": 2.0, "default_cfg": 3.0, "sweep": [{"cfg": 3.0, "alignment": 1.0, "fd": 2.0}]}

    monkeypatch.setattr(metric, "evaluate", fake_evaluate)
    for name, base in (("tiny-sdxl", pipeline_dir()), ("tiny-sd", None)):
        model = resolve_model(name)
        assert default_eval_fn(model)(model.unet) == {"alignment": 1.0, "fd": 2.0}
        assert seen["base"] == base and seen["steps"] == 20
    assert default_eval_fn(SimpleNamespace(name="sdxl-random", base_dir=None)) is None


def test_eval_tiny_sdxl_and_a_file_made_from_it(tmp_path):
    """`bfq eval tiny-sdxl` and `bfq eval FILE.bfq` (a tiny-sdxl file) score with tiny-sdxl's own
    pipeline; the float model's digits are recognized."""
    runner = CliRunner()
    out = tmp_path / "t.bfq"
    made = runner.invoke(main, ["quantize", "tiny-sdxl", "--recipe", "uniform-4", "--quiet", "-o", str(out)])
    assert made.exit_code == 0, made.output
    results = {}
    for model in ("tiny-sdxl", str(out)):
        result = runner.invoke(main, ["eval", model, "--n-per-digit", "3", "--cfg", "3", "--quiet", "--json"])
        assert result.exit_code == 0, result.output
        results[model] = json.loads(result.output)
        assert results[model]["settings"]["base"] == str(pipeline_dir())
        assert results[model]["settings"]["steps"] == 20
    assert results["tiny-sdxl"]["alignment"] >= 0.9
    assert results[str(out)]["alignment"] >= 0.5


def test_packed_tiny_sdxl_generates_the_dense_images_through_its_pipeline(tmp_path):
    """A 1.99-bit-style tiny-sdxl file (uniform-2, scheduler cache) in StableDiffusionXLPipeline:
    the packed runtime gives the dense runtime's images, and they are digits-like, not noise."""
    import bfq
    from bfq.pipeline.quantize import quantize

    path = quantize("tiny-sdxl", tmp_path / "t.bfq", recipe="uniform-2", steps=4, progress=False).path
    images = {}
    for runtime in ("packed", "dense"):
        pipe = bfq.load_pipeline(str(path), runtime=runtime, device="cpu", compute="fp32")
        assert type(pipe).__name__ == "StableDiffusionXLPipeline"
        assert any(type(m).__name__.startswith("Packed") for m in pipe.unet.modules()) == (runtime == "packed")
        images[runtime] = pipe(["a handwritten digit three", "a handwritten digit seven"], num_inference_steps=4,
                               guidance_scale=3.0, generator=torch.Generator().manual_seed(0), output_type="np").images  # fmt: skip
    np.testing.assert_allclose(images["packed"], images["dense"], atol=1e-5)
    assert images["packed"].shape == (2, 16, 16, 3) and images["packed"].std() > 0.1
