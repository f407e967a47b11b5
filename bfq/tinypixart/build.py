"""tiny-pixart architecture: the configs of its parts, its T5-style tokenizer, its text conditioning,
and saving.

tiny-pixart is a PixArt-Σ pipeline (``PixArtSigmaPipeline``) scaled down to tiny-sd's 16x16 digits,
with PixArt's classes, so that the diffusion-transformer (DiT) code paths of bfq run on a model that
was really trained:

* Transformer (``PixArtTransformer2DModel``): adaLN-single (``norm_type="ada_norm_single"``: one
  timestep MLP, ``adaln_single``, whose ``6 x width`` output modulates every block through each
  block's learned ``scale_shift_table``), patch size 2 over the 8x8x4 latents (16 tokens), self-
  and cross-attention and a GELU-tanh feed-forward in each of :data:`TRANSFORMER_CONFIG`'s blocks,
  the ``caption_projection`` MLP from the text encoder's width, and the final
  ``norm_out``/``proj_out``. Width 96 (PixArt: 1152), 8 blocks (PixArt: 28), 4 heads of 24.
  ``out_channels=4``: no learned variance (PixArt's 8 channels; ``PixArtSigmaPipeline`` keeps the
  first half when there are 8). No resolution/aspect-ratio conditions
  (``use_additional_conditions=False``, as PixArt-Σ).
* Text encoder (``T5EncoderModel``): T5 v1.1's layout (gated-GELU feed-forward, relative position
  buckets, RMS layer norms, no biases), width 64, 2 layers, trained with the transformer. The
  pipeline conditions on its last hidden state under the prompt's attention mask.
* Tokenizer (``T5Tokenizer``, the ``tokenizers``-backed unigram tokenizer of transformers):
  T5's special tokens (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2) and ``▁`` pieces, one per caption
  word, plus single characters so that an unknown lowercase word is spelled out
  (:func:`build_tokenizer`). Every prompt ends with ``</s>``, so even the empty prompt (the
  unconditional branch) has one unmasked token.
* VAE: tiny-sd's trained ``AutoencoderKL``, copied byte for byte (``force_upcast`` false).
* Scheduler: PixArt-Σ's ``DPMSolverMultistepScheduler`` config (DiT's linear betas 0.0001..0.02
  over 1000 steps, DPM-Solver++ order 2, "linspace" spacing); the metric's DDIM sampler is made
  from the same config.

``PixArtSigmaPipeline``'s default ``use_resolution_binning=True`` only knows PixArt's 256-2048 pixel
sizes: call it with ``use_resolution_binning=False`` (the default size is then
``sample_size * 2`` = 16 pixels).

Padding: the pipeline pads prompts to ``max_sequence_length`` (300) tokens and masks the padding
both in the encoder's self-attention and in the transformer's cross-attention, so the conditioning
does not depend on the padded length; training pads to :data:`TRAIN_LENGTH` tokens, which is the
same computation at a fraction of the cost (tests/test_tinypixart.py checks it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bfq.tinysd.build import TRAINING_FILE, content_hash
from bfq.tinysd.data import IMAGE_SIZE, caption_words

LATENT_SIZE = IMAGE_SIZE // 2
TRAIN_LENGTH = 16  # tokens per training caption; the longest caption has 7 with its </s>
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
SPACE = "\u2581"  # sentencepiece's word-start marker

TEXT_CONFIG = dict(
    d_model=64,
    d_kv=16,
    d_ff=128,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    dropout_rate=0.0,
    feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6,
    is_encoder_decoder=False,
    use_cache=False,
)
TRANSFORMER_CONFIG = dict(
    sample_size=LATENT_SIZE,
    patch_size=2,
    in_channels=4,
    out_channels=4,
    num_layers=8,
    num_attention_heads=4,
    attention_head_dim=24,
    cross_attention_dim=96,
    caption_channels=TEXT_CONFIG["d_model"],
    norm_type="ada_norm_single",
    num_embeds_ada_norm=1000,
    norm_elementwise_affine=False,
    norm_eps=1e-6,
    activation_fn="gelu-approximate",
    attention_bias=True,
    use_additional_conditions=False,
    interpolation_scale=1,
)
# PixArt-alpha/PixArt-Sigma-XL-2-512-MS's scheduler_config.json.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    prediction_type="epsilon",
    algorithm_type="dpmsolver++",
    solver_order=2,
    solver_type="midpoint",
    lower_order_final=True,
    thresholding=False,
    dynamic_thresholding_ratio=0.995,
    sample_max_value=1.0,
    timestep_spacing="linspace",
    steps_offset=0,
    use_karras_sigmas=False,
)


def tinysd_dir() -> Path:
    """The bundled tiny-sd pipeline, whose VAE tiny-pixart reuses."""
    from bfq.tinysd import pipeline_dir

    return pipeline_dir()


def tokenizer_pieces() -> list[tuple[str, float]]:
    """The unigram vocabulary ``[(piece, log-probability), ...]``: T5's special tokens, ``▁``, one
    ``▁word`` piece per caption word (preferred: score -1) and every lowercase letter and digit
    (score -10, so a word is split into characters only when it is not in the vocabulary)."""
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789"))
    return (
        [(PAD, 0.0), (EOS, 0.0), (UNK, 0.0), (SPACE, -2.0)]
        + [(SPACE + word, -1.0) for word in caption_words()]
        + [(c, -10.0) for c in chars]
    )


def build_tokenizer():
    """tiny-pixart's ``T5Tokenizer`` over the caption vocabulary, built locally (no download)."""
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=tokenizer_pieces(), extra_ids=0, model_max_length=512)


def build_models(tokenizer, seed: int = 0):
    """Freshly initialised ``(transformer, text_encoder)`` for tiny-pixart, seeded by ``seed``."""
    import torch
    from diffusers import PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(**TRANSFORMER_CONFIG)
    config = T5Config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        **TEXT_CONFIG,
    )
    return transformer, T5EncoderModel(config)


def tokenize(tokenizer, captions: list[str], max_length: int = TRAIN_LENGTH):
    """``(input_ids, attention_mask)`` of ``captions`` as ``PixArtSigmaPipeline.encode_prompt``
    tokenizes them, padded to ``max_length``."""
    out = tokenizer(
        captions, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
        return_tensors="pt",
    )  # fmt: skip
    return out.input_ids, out.attention_mask


def encode(text_encoder, input_ids, attention_mask):
    """The pipeline's text conditioning: the encoder's last hidden state under the mask."""
    return text_encoder(input_ids, attention_mask=attention_mask)[0]


def load_vae():
    """tiny-sd's trained VAE (``AutoencoderKL``), ``force_upcast`` false."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(tinysd_dir() / "vae"))
    vae.register_to_config(force_upcast=False)
    return vae


def build_scheduler():
    """PixArt-Σ's DPM-Solver++ scheduler config (the one the pipeline ships)."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(**SCHEDULER_CONFIG)


def save_pipeline(directory: str | Path, transformer, text_encoder, training: dict | None = None) -> Path:
    """Save a complete ``PixArtSigmaPipeline`` directory (safetensors): the trained parts, the
    tokenizer, and tiny-sd's VAE weights (copied).

    Args:
        directory: the output folder (created; existing model files are overwritten).
        transformer, text_encoder: the trained parts.
        training: settings to record in ``TRAINING.json``, which also gets the content hash.
    Returns:
        The directory.
    """
    from diffusers import PixArtSigmaPipeline

    directory = Path(directory)
    pipe = PixArtSigmaPipeline(
        tokenizer=build_tokenizer(),
        text_encoder=text_encoder,
        vae=load_vae(),
        transformer=transformer,
        scheduler=build_scheduler(),
    )
    pipe.save_pretrained(str(directory), safe_serialization=True)
    weights = "diffusion_pytorch_model.safetensors"
    shutil.copyfile(tinysd_dir() / "vae" / weights, directory / "vae" / weights)
    if training is not None:
        record = dict(training, sha256=content_hash(directory))
        (directory / TRAINING_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return directory


__all__ = [
    "TRANSFORMER_CONFIG", "TEXT_CONFIG", "SCHEDULER_CONFIG", "TRAIN_LENGTH",
    "build_tokenizer", "build_models", "build_scheduler", "tokenize", "encode", "load_vae", "save_pipeline",
]  # fmt: skip
