"""tiny-sdxl: the bundled SDXL pipeline, its structure, its conditioning, its provenance, its
training script, and tiny-sd's metric on it."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bfq.tinysd.build import content_hash  # noqa: E402
from bfq.tinysdxl import load_pipeline, pipeline_dir  # noqa: E402
from bfq.tinysdxl.build import TIME_IDS, encode  # noqa: E402


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline()


def _images(pipe, prompts, seed=0, steps=4, **kwargs):
    return pipe(
        prompts, num_inference_steps=steps, guidance_scale=3.0, output_type="np",
        generator=torch.Generator().manual_seed(seed), **kwargs,
    ).images  # fmt: skip


def test_import_bfq_tinysdxl_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, bfq.tinysdxl; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_bundled_folder_is_an_sdxl_pipeline_with_two_text_encoders(pipe):
    from diffusers import StableDiffusionXLPipeline

    from bfq.tinysd import pipeline_dir as tinysd_dir

    loaded = StableDiffusionXLPipeline.from_pretrained(str(pipeline_dir()), local_files_only=True)
    assert type(loaded.text_encoder).__name__ == "CLIPTextModel"
    assert type(loaded.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert type(loaded.scheduler).__name__ == "EulerDiscreteScheduler"
    assert loaded.scheduler.config.beta_schedule == "scaled_linear"
    assert loaded.config.force_zeros_for_empty_prompt is False
    assert loaded.vae.config.force_upcast is False
    weights = "vae/diffusion_pytorch_model.safetensors"  # tiny-sd's trained VAE, unchanged
    assert (pipeline_dir() / weights).read_bytes() == (tinysd_dir() / weights).read_bytes()
    vocab = (tinysd_dir() / "tokenizer" / "vocab.json").read_text()
    for name in ("tokenizer", "tokenizer_2"):
        assert (pipeline_dir() / name / "vocab.json").read_text() == vocab


def test_unet_has_sdxl_structure_and_every_layer_kind(pipe):
    unet = pipe.unet
    cfg = unet.config
    assert tuple(cfg.down_block_types) == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    assert tuple(cfg.up_block_types) == ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    assert cfg.mid_block_type == "UNetMidBlock2DCrossAttn"
    assert cfg.addition_embed_type == "text_time" and cfg.use_linear_projection is True
    n_time, proj = len(TIME_IDS), pipe.text_encoder_2.config.projection_dim
    assert cfg.projection_class_embeddings_input_dim == n_time * cfg.addition_time_embed_dim + proj
    assert unet.add_embedding.linear_1.in_features == cfg.projection_class_embeddings_input_dim
    width = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert cfg.cross_attention_dim == width
    depths = [len(a.transformer_blocks) for m in unet.modules() for a in getattr(m, "attentions", [])]
    assert max(depths) > 1 and "mid_block.attentions.0.transformer_blocks.1.attn2.to_k" in dict(unet.named_modules())
    names = set(dict(unet.named_modules()))
    needed = [
        "conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2",
        "add_embedding.linear_1", "add_embedding.linear_2",
        "down_blocks.0.resnets.0.time_emb_proj", "down_blocks.1.resnets.0.conv_shortcut",
        "down_blocks.1.attentions.0.proj_in", "down_blocks.1.attentions.0.proj_out",
        "down_blocks.2.attentions.0.transformer_blocks.1.attn1.to_q",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0",
        "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj",
        "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2",
        "down_blocks.0.downsamplers.0.conv", "up_blocks.0.upsamplers.0.conv",
        "mid_block.resnets.1.conv2", "up_blocks.2.resnets.0.conv_shortcut", "up_blocks.0.attentions.0.proj_out",
    ]  # fmt: skip
    assert not [n for n in needed if n not in names]
    assert not hasattr(unet.down_blocks[0], "attentions")  # no attention at the finest level, as SDXL
    assert isinstance(unet.get_submodule("down_blocks.1.attentions.0.proj_in"), torch.nn.Linear)
    ff = unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0")
    assert type(ff).__name__ == "GEGLU"


def test_training_conditioning_is_the_pipelines(pipe):
    prompts = ["a handwritten digit seven", "", "the number 3"]
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        mine, mine_pooled = encode(pipe.text_encoder, pipe.text_encoder_2, ids)
    assert torch.equal(mine, embeds) and torch.equal(mine_pooled, pooled)
    assert embeds.shape == (3, 77, pipe.unet.config.cross_attention_dim)
    # the default image size gives the training time_ids
    size = pipe.default_sample_size * pipe.vae_scale_factor
    ids = pipe._get_add_time_ids((size, size), (0, 0), (size, size), torch.float32, pooled.shape[-1])
    assert ids.tolist() == [list(TIME_IDS)]


def test_images_are_deterministic_of_the_right_shape_and_follow_the_prompt(pipe):
    a = _images(pipe, ["seven", "the number 2"])
    b = _images(pipe, ["seven", "the number 2"])
    assert a.shape == (2, 16, 16, 3) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[0], a[1])
    assert not np.array_equal(a, _images(pipe, ["seven", "the number 2"], seed=1))


def test_pipeline_makes_the_digit_asked_for_through_the_tinysd_metric():
    from bfq.tinysd.evaluate import evaluate

    result = evaluate(base=pipeline_dir(), n_per_digit=2, steps=10, cfg_scales=(3.0,), default_cfg=3.0)
    assert result["alignment"] >= 0.8 and np.isfinite(result["fd"])
    assert result["settings"]["base"] == str(pipeline_dir())


def test_bundled_artifact_matches_its_recorded_hash_quality_and_is_small():
    record = json.loads((pipeline_dir() / "TRAINING.json").read_text())
    assert record["sha256"] == content_hash(pipeline_dir())
    assert record["settings"]["seed"] == 0
    assert record["evaluation"]["alignment"] >= 0.95
    size = sum(p.stat().st_size for p in pipeline_dir().rglob("*") if p.is_file())
    assert size < 10 * 2**20


def test_training_entry_point_is_deterministic(tmp_path):
    from bfq.tinysdxl.train import main

    args = ["--seed", "3", "--unet-steps", "2", "--unet-batch", "8"]
    main(["--out", str(tmp_path / "a"), *args])
    main(["--out", str(tmp_path / "b"), *args])
    rec_a = json.loads((tmp_path / "a" / "TRAINING.json").read_text())
    rec_b = json.loads((tmp_path / "b" / "TRAINING.json").read_text())
    assert rec_a["sha256"] == rec_b["sha256"] == content_hash(tmp_path / "a")
    assert rec_a["sha256"] != content_hash(pipeline_dir())
    assert rec_a["settings"]["unet_steps"] == 2 and "--unet-steps 2" in rec_a["command"]
    pipe = load_pipeline(directory=tmp_path / "a")
    assert pipe("7", num_inference_steps=1, output_type="np").images.shape == (1, 16, 16, 3)


@pytest.mark.slow
def test_training_reproduces_the_bundled_weights(tmp_path):
    """Full retrain (~20-40 CPU-minutes): same machine type and thread count give the same hash."""
    from bfq.tinysdxl.train import train

    record = json.loads((pipeline_dir() / "TRAINING.json").read_text())
    train(tmp_path / "tiny-sdxl", log=lambda line: None, **record["settings"])
    assert content_hash(tmp_path / "tiny-sdxl") == record["sha256"]
