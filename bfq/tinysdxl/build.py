"""tiny-sdxl architecture: the configs of its parts, SDXL's text conditioning, and saving.

tiny-sdxl is a Stable Diffusion XL pipeline scaled down to tiny-sd's 16x16 digits, with SDXL's
classes and every kind of layer SDXL's UNet has, so that the SDXL code paths of bfq run on a model
that was really trained:

* UNet (``UNet2DConditionModel``): SDXL's layout with 3 levels (as SDXL), block channels
  (32, 64, 64) instead of (320, 640, 1280), one ResNet per level (SDXL: 2): ``DownBlock2D`` first
  (no attention at the finest resolution, as in SDXL), then ``CrossAttnDownBlock2D`` twice, a
  cross-attention mid block, and the mirror up; linear ``proj_in``/``proj_out``
  (``use_linear_projection=True``), GEGLU feed-forwards, ``transformer_layers_per_block`` (1, 1, 2)
  (SDXL: 1, 2, 10; the mid block takes the last), and SDXL's ``addition_embed_type="text_time"``:
  ``add_embedding`` maps the pooled text embedding and the sinusoidal features of the six
  ``time_ids`` (original size, crop corner, target size) to a vector added to the time embedding.
* Text encoders: ``CLIPTextModel`` (width 32, quick-GELU, as SDXL's CLIP ViT-L) and
  ``CLIPTextModelWithProjection`` (width 64, GELU, as SDXL's OpenCLIP bigG), 2 layers each. SDXL's
  pipeline conditions on the *penultimate* hidden state of both, concatenated (cross-attention
  width 32 + 64 = 96), and takes the pooled embedding from the second's projection. So, as in
  SDXL, the first encoder's last layer is never used: it keeps its initial weights.
* Tokenizers: tiny-sd's word-level vocabulary (:func:`bfq.tinysd.build.write_tokenizer`), twice.
* VAE: tiny-sd's trained ``AutoencoderKL``, copied byte for byte (``force_upcast`` false: it is
  fine in half precision); only the UNet and the text encoders are trained here.
* Scheduler: SDXL-base's ``EulerDiscreteScheduler`` config (scaled-linear betas 0.00085..0.012 as
  SD-v1.5, 1000 steps, "leading" spacing with offset 1).
* ``force_zeros_for_empty_prompt`` is false: training drops captions to the empty prompt, so the
  unconditional branch of classifier-free guidance is the encoded ``""`` (tiny-sd's convention),
  not SDXL's zero vectors.

The pipeline's default size is ``sample_size * 2`` = 16 pixels, so its default ``time_ids`` are
exactly the ones used in training: :data:`TIME_IDS`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bfq.tinysd.build import MAX_LENGTH, TRAINING_FILE, content_hash, load_tokenizer, write_tokenizer
from bfq.tinysd.data import IMAGE_SIZE

LATENT_SIZE = IMAGE_SIZE // 2
# original_size (h, w), crops_coords_top_left (y, x), target_size (h, w) of every training image.
TIME_IDS = (IMAGE_SIZE, IMAGE_SIZE, 0, 0, IMAGE_SIZE, IMAGE_SIZE)
TIME_EMBED_DIM = 16

TEXT_CONFIG = dict(
    hidden_size=32,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=MAX_LENGTH,
    hidden_act="quick_gelu",
    projection_dim=32,
)
TEXT_CONFIG_2 = dict(
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=MAX_LENGTH,
    hidden_act="gelu",
    projection_dim=64,
)
UNET_CONFIG = dict(
    sample_size=LATENT_SIZE,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    transformer_layers_per_block=(1, 1, 2),
    cross_attention_dim=TEXT_CONFIG["hidden_size"] + TEXT_CONFIG_2["hidden_size"],
    attention_head_dim=2,
    norm_num_groups=8,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_EMBED_DIM,
    projection_class_embeddings_input_dim=len(TIME_IDS) * TIME_EMBED_DIM + TEXT_CONFIG_2["projection_dim"],
    act_fn="silu",
)
# stabilityai/stable-diffusion-xl-base-1.0's scheduler_config.json.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    interpolation_type="linear",
    use_karras_sigmas=False,
    timestep_spacing="leading",
    steps_offset=1,
)
# Not Euler arguments, but SDXL-base's scheduler_config.json carries them (for DDIM/PNDM made
# ``from_config``: no sample clipping).
SCHEDULER_EXTRA = dict(clip_sample=False, sample_max_value=1.0, set_alpha_to_one=False, skip_prk_steps=True)


def tinysd_dir() -> Path:
    """The bundled tiny-sd pipeline, whose VAE and tokenizer tiny-sdxl reuses."""
    from bfq.tinysd import pipeline_dir

    return pipeline_dir()


def load_vae():
    """tiny-sd's trained VAE (``AutoencoderKL``), ``force_upcast`` false."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(tinysd_dir() / "vae"))
    vae.register_to_config(force_upcast=False)
    return vae


def build_models(tokenizer, seed: int = 0):
    """Freshly initialised ``(unet, text_encoder, text_encoder_2)`` for tiny-sdxl, seeded by ``seed``."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    special = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    text_encoder = CLIPTextModel(CLIPTextConfig(**special, **TEXT_CONFIG))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**special, **TEXT_CONFIG_2))
    return unet, text_encoder, text_encoder_2


def encode(text_encoder, text_encoder_2, input_ids):
    """SDXL's text conditioning of token ids (``N x 77``), as ``StableDiffusionXLPipeline.encode_prompt``
    computes it: ``(prompt_embeds N x 77 x 96, pooled N x 64)`` — the penultimate hidden states of
    both encoders side by side, and the second encoder's projected pooled output."""
    import torch

    out_1 = text_encoder(input_ids, output_hidden_states=True)
    out_2 = text_encoder_2(input_ids, output_hidden_states=True)
    return torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1), out_2.text_embeds


def time_ids(n: int):
    """The ``time_ids`` of ``n`` training images (``n x 6``, float32)."""
    import torch

    return torch.tensor([TIME_IDS], dtype=torch.float32).repeat(n, 1)


def build_scheduler():
    """SDXL-base's Euler scheduler config (the one the pipeline ships)."""
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler(**SCHEDULER_CONFIG)
    scheduler.register_to_config(**SCHEDULER_EXTRA)
    return scheduler


def save_pipeline(directory: str | Path, unet, text_encoder, text_encoder_2, training: dict | None = None) -> Path:
    """Save a complete ``StableDiffusionXLPipeline`` directory (safetensors): the trained parts,
    tiny-sd's VAE weights (copied) and its tokenizer files (twice).

    Args:
        directory: the output folder (created; existing model files are overwritten).
        unet, text_encoder, text_encoder_2: the trained parts.
        training: settings to record in ``TRAINING.json``, which also gets the content hash.
    Returns:
        The directory.
    """
    from diffusers import StableDiffusionXLPipeline

    directory = Path(directory)
    tokenizer = load_tokenizer(tinysd_dir() / "tokenizer")
    pipe = StableDiffusionXLPipeline(
        vae=load_vae(),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=build_scheduler(),
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )
    pipe.save_pretrained(str(directory), safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):  # our own vocabulary files, not transformers' rewrite
        shutil.rmtree(directory / name)
        write_tokenizer(directory / name)
    weights = "diffusion_pytorch_model.safetensors"
    shutil.copyfile(tinysd_dir() / "vae" / weights, directory / "vae" / weights)
    if training is not None:
        record = dict(training, sha256=content_hash(directory))
        (directory / TRAINING_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return directory


__all__ = [
    "TIME_IDS", "UNET_CONFIG", "TEXT_CONFIG", "TEXT_CONFIG_2", "SCHEDULER_CONFIG",
    "build_models", "build_scheduler", "encode", "time_ids", "load_vae", "save_pipeline", "content_hash",
]  # fmt: skip
