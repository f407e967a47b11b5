"""tiny-sd: the bundled pipeline, its tokenizer, its structure, its provenance and its training script."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bfq.tinysd import classifier_dir, load_pipeline, pipeline_dir  # noqa: E402
from bfq.tinysd.build import MAX_LENGTH, content_hash, load_tokenizer, tokenizer_vocab  # noqa: E402
from bfq.tinysd.data import caption_words, eval_prompts, real_gray_images  # noqa: E402


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(pipeline_dir() / "tokenizer")


def test_import_bfq_tinysd_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, bfq.tinysd, bfq.tinysd.evaluate; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_committed_vocabulary_is_the_built_one(tokenizer):
    vocab, merges = tokenizer_vocab()
    on_disk = json.loads((pipeline_dir() / "tokenizer" / "vocab.json").read_text())
    assert on_disk == vocab
    assert tokenizer.model_max_length == MAX_LENGTH
    assert len(tokenizer) == len(vocab)


def test_every_caption_word_is_one_token(tokenizer):
    unk = tokenizer.unk_token_id
    for word in caption_words():
        ids = tokenizer(word).input_ids
        assert len(ids) == 3 and unk not in ids[1:-1], (word, ids)
    for prompt in eval_prompts(3):
        assert unk not in tokenizer(prompt.text).input_ids[1:-1]


def test_unknown_characters_become_unk_and_unknown_words_split(tokenizer):
    ids = tokenizer("qü 🙂 seven").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    inner = ids[1:-1]
    assert inner[-1] == tokenizer.convert_tokens_to_ids("seven</w>")
    assert inner[:-1] and all(i == tokenizer.unk_token_id for i in inner[:-1])
    pieces = tokenizer("xylophone").input_ids[1:-1]  # a word we never saw: known pieces and unk, as CLIP
    assert len(pieces) > 1 and all(0 <= i < len(tokenizer) for i in pieces)


def test_long_prompts_truncate_at_77(tokenizer):
    ids = tokenizer(
        " ".join(["seven"] * 200), padding="max_length", max_length=MAX_LENGTH, truncation=True
    ).input_ids
    assert len(ids) == MAX_LENGTH and ids[-1] == tokenizer.eos_token_id


def test_unet_has_every_sd15_layer_kind(pipe):
    unet = pipe.unet
    names = {name for name, _ in unet.named_modules()}
    cfg = unet.config
    assert tuple(cfg.down_block_types) == ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    assert tuple(cfg.up_block_types) == ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    assert cfg.use_linear_projection is False and cfg.in_channels == 4
    needed = [
        "conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2",
        "down_blocks.0.attentions.0.proj_in", "down_blocks.0.attentions.0.proj_out",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0",
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
        "down_blocks.0.resnets.0.time_emb_proj", "down_blocks.1.resnets.0.conv_shortcut",
        "down_blocks.0.downsamplers.0.conv", "up_blocks.0.upsamplers.0.conv",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_v", "mid_block.resnets.1.conv2",
        "up_blocks.2.resnets.0.conv_shortcut", "up_blocks.2.attentions.0.proj_out",
    ]
    assert not [n for n in needed if n not in names]
    assert isinstance(unet.get_submodule("down_blocks.0.attentions.0.proj_in"), torch.nn.Conv2d)
    assert pipe.vae.config.latent_channels == 4
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"


def test_bundled_artifact_matches_its_recorded_hash_and_is_small():
    record = json.loads((pipeline_dir() / "TRAINING.json").read_text())
    assert record["sha256"] == content_hash(pipeline_dir())
    assert record["settings"]["seed"] == 0
    size = sum(p.stat().st_size for p in pipeline_dir().rglob("*") if p.is_file())
    assert size < 10 * 2**20


@pytest.mark.parametrize(
    "prompt",
    ["", "a zebra riding a xylophone in quebec ü 🙂", " ".join(["a handwritten digit seven"] * 50)],
    ids=["empty", "out-of-vocabulary", "200-words"],
)
def test_pipeline_generates_offline_from_any_prompt(pipe, prompt):
    out = pipe(
        prompt,
        num_inference_steps=2,
        guidance_scale=3.0,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (1, 16, 16, 3) and np.isfinite(out).all()


def test_pipeline_makes_the_digit_asked_for(pipe):
    from diffusers import DDIMScheduler

    from bfq.tinysd.classifier import load_classifier

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    prompts = [f"a handwritten digit {w}" for w in ("zero", "one", "seven", "eight")]
    images = pipe(
        prompts, num_inference_steps=10, guidance_scale=3.0, output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    labels, _ = load_classifier()(images.mean(-1))
    assert (labels == np.array([0, 1, 7, 8])).sum() >= 3


def test_bundled_classifier_is_accurate_on_real_digits():
    from bfq.tinysd.classifier import load_classifier

    clf = load_classifier(classifier_dir())
    gray, labels = real_gray_images()
    pred, feats = clf(gray)
    assert (pred == labels).mean() > 0.98
    assert feats.shape == (len(gray), 64)
    np.testing.assert_allclose(feats.mean(0), clf.mu, atol=1e-4)
    assert clf.config["heldout_accuracy"] > 0.97


def test_training_entry_point_is_deterministic(tmp_path):
    from bfq.tinysd.train import main

    args = ["--seed", "3", "--vae-steps", "2", "--unet-steps", "2", "--unet-batch", "8", "--vae-batch", "8"]
    main(["--out", str(tmp_path / "a"), *args])
    main(["--out", str(tmp_path / "b"), *args])
    rec_a = json.loads((tmp_path / "a" / "TRAINING.json").read_text())
    rec_b = json.loads((tmp_path / "b" / "TRAINING.json").read_text())
    assert rec_a["sha256"] == rec_b["sha256"] == content_hash(tmp_path / "a")
    assert rec_a["settings"]["unet_steps"] == 2 and "--unet-steps 2" in rec_a["command"]
    pipe = load_pipeline(directory=tmp_path / "a")
    assert pipe("7", num_inference_steps=1, output_type="np").images.shape == (1, 16, 16, 3)


@pytest.mark.slow
def test_training_reproduces_the_bundled_weights(tmp_path):
    """Full retrain (~20 CPU-minutes): same machine type and thread count give the same hash."""
    from bfq.tinysd.train import train

    record = json.loads((pipeline_dir() / "TRAINING.json").read_text())
    settings = dict(record["settings"])
    train(tmp_path / "tiny-sd", log=lambda line: None, **settings)
    assert content_hash(tmp_path / "tiny-sd") == record["sha256"]
