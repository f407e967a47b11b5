"""tiny-pixart: the bundled PixArt-Σ pipeline, its diffusion-transformer structure, its conditioning,
its provenance, its training script, and tiny-sd's metric on it."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bfq.tinypixart import load_pipeline, pipeline_dir  # noqa: E402
from bfq.tinypixart.build import TRAIN_LENGTH, build_tokenizer, encode, tokenize  # noqa: E402
from bfq.tinysd.build import content_hash  # noqa: E402


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline()


def _images(pipe, prompts, seed=0, steps=4, **kwargs):
    return pipe(
        prompts, num_inference_steps=steps, guidance_scale=3.0, output_type="np", use_resolution_binning=False,
        generator=torch.Generator().manual_seed(seed), **kwargs,
    ).images  # fmt: skip


def test_import_bfq_tinypixart_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, bfq.tinypixart; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_bundled_folder_is_a_pixart_sigma_pipeline_with_a_t5_encoder_and_tiny_sds_vae():
    from diffusers import PixArtSigmaPipeline

    from bfq.tinysd import pipeline_dir as tinysd_dir

    index = json.loads((pipeline_dir() / "model_index.json").read_text())
    assert index["_class_name"] == "PixArtSigmaPipeline"
    loaded = PixArtSigmaPipeline.from_pretrained(str(pipeline_dir()), local_files_only=True)
    assert type(loaded.text_encoder).__name__ == "T5EncoderModel"
    assert type(loaded.tokenizer).__name__ == "T5Tokenizer"
    assert type(loaded.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert loaded.scheduler.config.beta_schedule == "linear" and loaded.scheduler.config.prediction_type == "epsilon"
    assert loaded.vae.config.force_upcast is False
    weights = "vae/diffusion_pytorch_model.safetensors"  # tiny-sd's trained VAE, unchanged
    assert (pipeline_dir() / weights).read_bytes() == (tinysd_dir() / weights).read_bytes()
    # the tokenizer is the one build_tokenizer makes: caption words are single pieces, every prompt ends in </s>
    tok = loaded.tokenizer
    prompts = ["a handwritten digit seven", ""]
    assert tok(prompts).input_ids == build_tokenizer()(prompts).input_ids
    ids = tok("a handwritten digit seven").input_ids
    assert len(ids) == 5 and ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids
    assert tok("").input_ids == [tok.eos_token_id]


def test_transformer_is_pixarts_with_adaln_single_and_patch_2(pipe):
    from diffusers import PixArtTransformer2DModel

    tr = pipe.transformer
    cfg = tr.config
    assert type(tr) is PixArtTransformer2DModel
    assert cfg.norm_type == "ada_norm_single" and cfg.patch_size == 2 and cfg.sample_size == 8
    assert cfg.in_channels == cfg.out_channels == 4 and cfg.use_additional_conditions is False
    assert tr.use_additional_conditions is False and not hasattr(tr.adaln_single.emb, "resolution_embedder")
    width = cfg.num_attention_heads * cfg.attention_head_dim
    assert cfg.cross_attention_dim == width and cfg.caption_channels == pipe.text_encoder.config.d_model
    # adaLN-single: one timestep MLP giving 6 x width, and a learned table per block
    assert tr.adaln_single.linear.out_features == 6 * width
    assert all(block.scale_shift_table.shape == (6, width) for block in tr.transformer_blocks)
    assert tr.pos_embed.proj.kernel_size == (2, 2)
    names = set(dict(tr.named_modules()))
    needed = [
        "pos_embed.proj", "caption_projection.linear_1", "caption_projection.linear_2",
        "adaln_single.emb.timestep_embedder.linear_1", "adaln_single.emb.timestep_embedder.linear_2",
        "adaln_single.linear", "proj_out",
        "transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.to_out.0",
        "transformer_blocks.0.attn2.to_k", "transformer_blocks.0.attn2.to_v", "transformer_blocks.0.ff.net.2",
    ]  # fmt: skip
    assert not [n for n in needed if n not in names]
    size = sum(p.numel() for p in tr.parameters())
    assert 0.5e6 < size < 3e6


def test_training_conditioning_is_the_pipelines_at_300_tokens(pipe):
    """Training pads captions to TRAIN_LENGTH tokens; the pipeline pads to 300. Both mask the
    padding, so the embeddings of the real tokens and the transformer's output agree."""
    prompts = ["a handwritten digit seven", "", "the number 3"]
    embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device="cpu")
    assert embeds.shape == (3, 300, pipe.text_encoder.config.d_model) and mask.shape == (3, 300)
    ids, short_mask = tokenize(pipe.tokenizer, prompts)
    assert ids.shape == (3, TRAIN_LENGTH)
    with torch.no_grad():
        short = encode(pipe.text_encoder, ids, short_mask)
    torch.testing.assert_close(short_mask, mask[:, :TRAIN_LENGTH])
    assert int(mask[:, TRAIN_LENGTH:].sum()) == 0
    keep = short_mask.bool()
    torch.testing.assert_close(short[keep], embeds[:, :TRAIN_LENGTH][keep], atol=1e-5, rtol=1e-5)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 500, 990])
    kw = dict(timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    with torch.no_grad():
        long_out = pipe.transformer(x, encoder_hidden_states=embeds, encoder_attention_mask=mask, **kw).sample
        short_out = pipe.transformer(x, encoder_hidden_states=short, encoder_attention_mask=short_mask, **kw).sample
    torch.testing.assert_close(short_out, long_out, atol=1e-5, rtol=1e-4)


def test_images_are_deterministic_16_pixels_and_follow_the_prompt(pipe):
    a = _images(pipe, ["seven", "the number 2"])
    b = _images(pipe, ["seven", "the number 2"])
    assert a.shape == (2, 16, 16, 3) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[0], a[1])
    assert not np.array_equal(a, _images(pipe, ["seven", "the number 2"], seed=1))


def test_pipeline_makes_the_digit_asked_for_through_the_tinysd_metric(pipe):
    """tiny-sd's metric scores the PixArt pipeline, and scores a transformer swapped into it."""
    import copy

    from bfq.tinysd.evaluate import evaluate

    kw = dict(base=pipeline_dir(), n_per_digit=2, steps=10, cfg_scales=(3.0,), default_cfg=3.0)
    result = evaluate(**kw)
    assert result["alignment"] >= 0.8 and np.isfinite(result["fd"])
    assert result["settings"]["base"] == str(pipeline_dir())
    assert evaluate(pipe.transformer, **kw)["sweep"] == result["sweep"]
    broken = copy.deepcopy(pipe.transformer)
    with torch.no_grad():
        broken.proj_out.weight.zero_()  # predicts a constant: no digit at all
    assert evaluate(broken, **kw)["fd"] > result["fd"] + 10


def test_bfq_eval_tiny_pixart():
    """`bfq eval tiny-pixart` (the pixart family's built-in name) scores the bundled PixArt pipeline."""
    from bfq_cli.main import main
    from click.testing import CliRunner

    result = CliRunner().invoke(main, ["eval", "tiny-pixart", "--n-per-digit", "2", "--cfg", "3", "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output)
    assert scores["settings"]["base"] == str(pipeline_dir()) and scores["settings"]["steps"] == 20
    assert scores["alignment"] >= 0.8


def test_bfq_eval_scores_a_file_made_from_tiny_pixart(tmp_path):
    """`bfq eval FILE.bfq` finds tiny-pixart as the file's base by its transformer's shape."""
    from bfq_cli.main import main
    from click.testing import CliRunner

    runner = CliRunner()
    out = tmp_path / "t.bfq"
    made = runner.invoke(main, ["quantize", "tiny-pixart", "--recipe", "uniform-4", "--quiet", "-o", str(out)])
    assert made.exit_code == 0, made.output
    result = runner.invoke(main, ["eval", str(out), "--n-per-digit", "2", "--cfg", "3", "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)  # stderr may hold a note on the file's sampler
    assert scores["settings"]["base"] == str(pipeline_dir()) and scores["alignment"] >= 0.5


def test_bundled_artifact_matches_its_recorded_hash_quality_and_is_small():
    record = json.loads((pipeline_dir() / "TRAINING.json").read_text())
    assert record["sha256"] == content_hash(pipeline_dir())
    assert record["settings"]["seed"] == 0
    assert record["evaluation"]["alignment"] >= 0.95
    size = sum(p.stat().st_size for p in pipeline_dir().rglob("*") if p.is_file())
    assert size < 10 * 2**20


def test_training_entry_point_is_deterministic(tmp_path):
    from bfq.tinypixart.train import main

    args = ["--seed", "3", "--steps", "2", "--batch", "8"]
    main(["--out", str(tmp_path / "a"), *args])
    main(["--out", str(tmp_path / "b"), *args])
    rec_a = json.loads((tmp_path / "a" / "TRAINING.json").read_text())
    rec_b = json.loads((tmp_path / "b" / "TRAINING.json").read_text())
    assert rec_a["sha256"] == rec_b["sha256"] == content_hash(tmp_path / "a")
    assert rec_a["sha256"] != content_hash(pipeline_dir())
    assert rec_a["settings"]["steps"] == 2 and "--steps 2" in rec_a["command"]
    pipe = load_pipeline(directory=tmp_path / "a")
    image = pipe("7", num_inference_steps=1, output_type="np", use_resolution_binning=False).images
    assert image.shape == (1, 16, 16, 3)


@pytest.mark.slow
def test_bundled_alignment_is_at_least_095():
    """The recorded quality, re-measured on a smaller sample (100 images, the default scale)."""
    from bfq.tinysd.evaluate import evaluate

    result = evaluate(base=pipeline_dir(), n_per_digit=10, cfg_scales=(3.0,))
    assert result["alignment"] >= 0.95


@pytest.mark.slow
def test_training_reproduces_the_bundled_weights(tmp_path):
    """Full retrain (~30-60 CPU-minutes): same machine type and thread count give the same hash."""
    from bfq.tinypixart.train import train

    record = json.loads((pipeline_dir() / "TRAINING.json").read_text())
    train(tmp_path / "tiny-pixart", log=lambda line: None, **record["settings"])
    assert content_hash(tmp_path / "tiny-pixart") == record["sha256"]
