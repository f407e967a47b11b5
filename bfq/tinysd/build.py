"""tiny-sd architecture: the configs of its four parts, the tokenizer files, and saving.

tiny-sd is a Stable Diffusion v1.5 pipeline scaled down, with the same classes and the same kinds
of layers, so every stage of the bfq pipeline can be exercised on a model that was really trained:

* UNet (``UNet2DConditionModel``): SD-v1.5's down/mid/up structure with 3 levels instead of 4
  (``CrossAttnDownBlock2D, CrossAttnDownBlock2D, DownBlock2D`` down and the mirror up), block
  channels (32, 64, 64), one ResNet per level (SD: 2), 1x1-conv ``proj_in``/``proj_out``
  (``use_linear_projection=False`` as in SD-v1.5), GEGLU feed-forwards, 8x8x4 latents. It has every
  layer kind the SD-v1.5 recipe quantizes: conv_in/conv_out, ``time_embedding.linear_1/2``,
  ResNet conv1/conv2/``time_emb_proj``/``conv_shortcut``, attention ``to_q/k/v/out``, ``ff.net``,
  ``proj_in/out``, downsamplers and upsamplers, and the cross-attention mid block.
  ``attention_head_dim=2`` (diffusers' legacy name for the number of heads; SD-v1.5 has 8) gives
  head widths of 16 and 32: 8 heads of width 4-8 made training 2x slower on CPU for nothing, and
  the head count does not change any weight shape.
* VAE (``AutoencoderKL``): 16x16x3 images to 8x8x4 latents (one downsample; SD has three).
* Text encoder (``CLIPTextModel``): 2 layers, width 64, quick-GELU, 77 positions, trained with
  the UNet.
* Tokenizer (``CLIPTokenizer``): a word-level byte-pair vocabulary built here from the caption
  words (:func:`write_tokenizer`), plus CLIP's ``<|startoftext|>``/``<|endoftext|>``.
* Scheduler: SD-v1.5's ``PNDMScheduler`` config (scaled-linear betas 0.00085..0.012, 1000 steps).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from bfq.tinysd.data import IMAGE_SIZE, caption_words

LATENT_SIZE = IMAGE_SIZE // 2
MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
TRAINING_FILE = "TRAINING.json"

UNET_CONFIG = dict(
    sample_size=LATENT_SIZE,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    cross_attention_dim=64,
    attention_head_dim=2,
    norm_num_groups=8,
    use_linear_projection=False,
    act_fn="silu",
)
VAE_CONFIG = dict(
    sample_size=IMAGE_SIZE,
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(16, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    act_fn="silu",
)
TEXT_CONFIG = dict(
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=MAX_LENGTH,
    hidden_act="quick_gelu",
    projection_dim=64,
)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
)
# Not a PNDM argument, but SD-v1.5's scheduler_config.json carries it so that a DDIM scheduler
# made ``from_config`` does not clip latents to [-1, 1]; ours does the same.
SCHEDULER_EXTRA = dict(clip_sample=False)


def _bpe(word: tuple[str, ...], ranks: dict[tuple[str, str], int]) -> tuple[str, ...]:
    """CLIP's byte-pair merge loop: merge the lowest-ranked adjacent pair until none applies."""
    while len(word) > 1:
        pairs = [(ranks.get(p, 1 << 30), i) for i, p in enumerate(zip(word, word[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        word = word[:i] + (word[i] + word[i + 1],) + word[i + 2 :]
    return word


def tokenizer_vocab(words: list[str] | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-pair vocabulary in which every caption word is a single token.

    Merges are added greedily: a word that does not yet reduce to one symbol gets a new merge for
    its first remaining pair, ranked after all earlier merges, so it cannot change how an earlier
    word splits. The vocabulary holds the characters the words use (CLIP's BPE needs them for its
    merges), every merge result, and the two special tokens. A character outside it becomes the
    unknown token (``<|endoftext|>``, as CLIP's tokenizer config names it); a word outside it is
    split into known pieces, exactly as CLIP splits a rare word.

    Returns:
        ``(vocab, merges)``: token -> id and the ranked merge list.
    """
    words = caption_words() if words is None else words
    ranks: dict[tuple[str, str], int] = {}
    symbols: set[str] = set()
    for word in words:
        start = tuple(word[:-1]) + (word[-1] + "</w>",)
        symbols.update(start)
        while len(parts := _bpe(start, ranks)) > 1:
            ranks[(parts[0], parts[1])] = len(ranks)
    merges = sorted(ranks, key=ranks.get)
    tokens = sorted(symbols) + [a + b for a, b in merges]
    tokens = list(dict.fromkeys(tokens)) + [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def write_tokenizer(directory: str | Path) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and the tokenizer configs of tiny-sd into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = tokenizer_vocab()
    (directory / "vocab.json").write_text(json.dumps(vocab, indent=1) + "\n")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n")
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    config = dict(
        specials,
        tokenizer_class="CLIPTokenizer",
        model_max_length=MAX_LENGTH,
        do_lower_case=True,
        add_prefix_space=False,
        clean_up_tokenization_spaces=True,
    )
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


def load_tokenizer(directory: str | Path):
    """The ``CLIPTokenizer`` stored in ``directory`` (a ``tokenizer`` folder)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(directory))


def build_models(tokenizer, seed: int = 0):
    """Freshly initialised ``(unet, vae, text_encoder)`` for tiny-sd, seeded by ``seed``."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    vae = AutoencoderKL(**VAE_CONFIG)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TEXT_CONFIG,
    )
    text_encoder = CLIPTextModel(text_config)
    return unet, vae, text_encoder


def build_scheduler():
    """SD-v1.5's PNDM scheduler config (the one the pipeline ships)."""
    from diffusers import PNDMScheduler

    scheduler = PNDMScheduler(**SCHEDULER_CONFIG)
    scheduler.register_to_config(**SCHEDULER_EXTRA)
    return scheduler


def save_pipeline(directory: str | Path, unet, vae, text_encoder, training: dict | None = None) -> Path:
    """Save a complete ``StableDiffusionPipeline`` directory (safetensors) with our tokenizer files.

    Args:
        directory: the output folder (created; existing model files are overwritten).
        unet, vae, text_encoder: the trained parts.
        training: settings to record in ``TRAINING.json``, which also gets the content hash.
    Returns:
        The directory.
    """
    import shutil

    from diffusers import StableDiffusionPipeline

    directory = Path(directory)
    tok_dir = write_tokenizer(directory / "tokenizer")
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=load_tokenizer(tok_dir),
        unet=unet,
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(directory), safe_serialization=True)
    shutil.rmtree(tok_dir)  # replace what transformers wrote by our own vocabulary files
    write_tokenizer(tok_dir)
    if training is not None:
        record = dict(training, sha256=content_hash(directory))
        (directory / TRAINING_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return directory


def content_hash(directory: str | Path) -> str:
    """SHA-256 over every file of a pipeline directory except ``TRAINING.json``.

    The digest covers each file's relative path and bytes, in sorted path order, so it changes if
    any weight, config or vocabulary file changes, and not with the directory's location.
    """
    directory = Path(directory)
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel == TRAINING_FILE or "__pycache__" in rel:
            continue
        digest.update(rel.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()
