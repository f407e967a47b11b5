"""SDXL-class UNets (SDXL base 1.0 is the reference): ``UNet2DConditionModel`` with
``addition_embed_type == "text_time"``. Besides the text (``encoder_hidden_states``) a forward
needs ``added_cond_kwargs = {"text_embeds": [B, P], "time_ids": [B, n]}``: the pooled text
embedding of the second text encoder and the size conditions (original height and width, crop
top and left, target height and width, in pixels; the refiner has 5, with an aesthetic score).

``add_embedding(text_embeds, time_ids)`` is added to the time embedding before the ResNets, so
what each ``time_emb_proj`` sees depends on the prompt and the image size, not on the timestep
alone: a scheduler-mode time cache holds only the timestep MLP's output ``time_embedding(time_proj(t))``
and the ``time_emb_proj`` layers and ``add_embedding`` stay in the model (FORMAT.md §2.3.1).
"""

from __future__ import annotations

from bfq.families.family import TIMESTEP_AND_CONDITIONING, Family, unet_like

SDXL_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_N_PARAMS = 2_567_463_684
SDXL_N_LINEAR_CONV_WEIGHTS = 2_565_880_320
VAE_SCALE = 8  # pixels per latent cell: time_ids are in pixels


class SDXL(Family):
    name = "sdxl"
    title = "SDXL"
    model_class = "UNet2DConditionModel"
    pipeline_class = "StableDiffusionXLPipeline"
    hub_repo = SDXL_REPO
    random_name = "sdxl-random"
    random_per_layer = True
    tiny_name = "tiny-sdxl"
    tiny_package = "bfq.tinysdxl"
    time_features = TIMESTEP_AND_CONDITIONING
    default_steps = 50  # StableDiffusionXLPipeline's default
    pipeline_kwargs = {}
    hub_tag = "stable-diffusion-xl"
    added_cond_keys = ("text_embeds", "time_ids")
    prompt_cond_keys = ("text_embeds",)
    tiny_digit_analysis = False  # tiny-sdxl's published analysis used the generic prompts

    def matches(self, class_name: str, config: dict) -> bool:
        return unet_like(class_name, config) and config.get("addition_embed_type") == "text_time"

    def config(self) -> dict:
        """The public SDXL base 1.0 ``unet/config.json`` (2,567,463,684 parameters)."""
        return {
            "_class_name": "UNet2DConditionModel",
            "act_fn": "silu",
            "addition_embed_type": "text_time",
            "addition_embed_type_num_heads": 64,
            "addition_time_embed_dim": 256,
            "attention_head_dim": [5, 10, 20],
            "block_out_channels": [320, 640, 1280],
            "center_input_sample": False,
            "class_embed_type": None,
            "class_embeddings_concat": False,
            "conv_in_kernel": 3,
            "conv_out_kernel": 3,
            "cross_attention_dim": 2048,
            "cross_attention_norm": None,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "downsample_padding": 1,
            "dual_cross_attention": False,
            "encoder_hid_dim": None,
            "encoder_hid_dim_type": None,
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "in_channels": 4,
            "layers_per_block": 2,
            "mid_block_only_cross_attention": None,
            "mid_block_scale_factor": 1,
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "norm_eps": 1e-05,
            "norm_num_groups": 32,
            "num_attention_heads": None,
            "num_class_embeds": None,
            "only_cross_attention": False,
            "out_channels": 4,
            "projection_class_embeddings_input_dim": 2816,
            "resnet_out_scale_factor": 1.0,
            "resnet_skip_time_act": False,
            "resnet_time_scale_shift": "default",
            "sample_size": 128,
            "time_cond_proj_dim": None,
            "time_embedding_act_fn": None,
            "time_embedding_dim": None,
            "time_embedding_type": "positional",
            "timestep_post_act": None,
            "transformer_layers_per_block": [1, 2, 10],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "upcast_attention": None,
            "use_linear_projection": True,
        }

    def scheduler_config(self) -> dict:
        """The public SDXL base 1.0 ``scheduler/scheduler_config.json`` (Euler, leading spacing)."""
        return {
            "_class_name": "EulerDiscreteScheduler",
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "clip_sample": False,
            "interpolation_type": "linear",
            "num_train_timesteps": 1000,
            "prediction_type": "epsilon",
            "sample_max_value": 1.0,
            "set_alpha_to_one": False,
            "skip_prk_steps": True,
            "steps_offset": 1,
            "timestep_spacing": "leading",
            "trained_betas": None,
            "use_karras_sigmas": False,
        }

    def conditioning(self, config: dict, batch: int, *, height: int | None = None, width: int | None = None,
                     seq_len: int = 77, generator=None, dtype=None, device=None) -> dict:  # fmt: skip
        """Random text (``encoder_hidden_states``, ``text_embeds``) and the size conditions of an
        uncropped ``height`` x ``width`` latent (default: ``sample_size``) as ``time_ids``."""
        import torch

        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        out = super().conditioning(config, batch, seq_len=seq_len, generator=gen, dtype=dtype, device=device)
        text = torch.randn(batch, time_ids_layout(config)[1], generator=gen)
        time_ids = size_ids(config, batch, VAE_SCALE * int(height or config["sample_size"]),
                            VAE_SCALE * int(width or config["sample_size"]))  # fmt: skip
        out["added_cond_kwargs"] = {"text_embeds": text.to(device=device, dtype=dtype),
                                    "time_ids": time_ids.to(device=device, dtype=dtype)}  # fmt: skip
        return out

    def encode_prompts(self, base_dir, texts: list[str], config: dict, device=None) -> dict:
        """Both text encoders of the SDXL pipeline in ``base_dir`` (its own ``encode_prompt``; the
        empty prompt as the pipeline encodes it), with the size conditions of the pipeline's default image
        size (``sample_size`` times its VAE's scale)."""
        import torch
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(base_dir, unet=None, vae=None, local_files_only=True)
        with torch.no_grad():
            ehs, _, pooled, _ = pipe.encode_prompt(texts, device=device, do_classifier_free_guidance=False)
        if all(t == "" for t in texts) and pipe.config.get("force_zeros_for_empty_prompt", True):
            ehs, pooled = torch.zeros_like(ehs), torch.zeros_like(pooled)  # what the pipeline uses for CFG
        pixels = int(config["sample_size"]) * _vae_scale(base_dir)  # the pipeline's default image size
        size = size_ids(config, len(texts), pixels, pixels).to(device)
        return {"encoder_hidden_states": ehs.float(),
                "added_cond_kwargs": {"text_embeds": pooled.float(), "time_ids": size.float()}}  # fmt: skip


def size_ids(config: dict, batch: int, height: int, width: int):
    """``time_ids`` ``[batch, n]`` (float32) of uncropped ``height`` x ``width``-pixel images:
    original size, crop corner (0, 0), target size; the refiner's 5 end with an aesthetic score of 6."""
    import torch

    ids = [height, width, 0, 0, height, width] if time_ids_layout(config)[0] == 6 else [height, width, 0, 0, 6.0]
    return torch.tensor(ids, dtype=torch.float32).repeat(batch, 1)


def _vae_scale(base_dir) -> int:
    """Pixels per latent cell of the pipeline in ``base_dir``, as ``StableDiffusionXLPipeline`` computes
    it (``2 ** (VAE levels - 1)``; SDXL's 8 when the pipeline has no VAE config)."""
    import json
    from pathlib import Path

    vae_config = Path(base_dir) / "vae" / "config.json"
    if not vae_config.is_file():
        return VAE_SCALE
    return 2 ** (len(json.loads(vae_config.read_text())["block_out_channels"]) - 1)


def time_ids_layout(config: dict) -> tuple[int, int]:
    """``(number of time ids, width of text_embeds)`` of an SDXL-class config:
    ``projection_class_embeddings_input_dim = text width + n × addition_time_embed_dim``, with n = 6
    (base models), or 5 (the refiner, whose pooled text is as wide as its cross-attention)."""
    total, per_id = int(config["projection_class_embeddings_input_dim"]), int(config["addition_time_embed_dim"])
    if total - 5 * per_id == int(config["cross_attention_dim"]):
        return 5, total - 5 * per_id
    if total - 6 * per_id <= 0:
        raise ValueError(f"projection_class_embeddings_input_dim {total} leaves no room for 6 time ids of {per_id}")
    return 6, total - 6 * per_id


def sdxl_test_config(**overrides) -> dict:
    """A small SDXL-structured ``UNet2DConditionModel`` config for tests and examples: the SDXL
    block layout (a plain first down block, cross-attention below it, two transformer layers in
    the last level, linear projections), ``text_time`` added embedding with 6 time ids, 8x8 latents."""
    cfg = {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [16, 32],
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "attention_head_dim": [2, 4],
        "transformer_layers_per_block": [1, 2],
        "use_linear_projection": True,
        "cross_attention_dim": 32,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 16 + 6 * 8,  # 16-wide pooled text + 6 time ids
    }
    cfg.update(overrides)
    return cfg


FAMILY = SDXL()
