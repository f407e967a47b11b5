"""Stable Diffusion 1.x/2.x-class UNets (SD-v1.5 is the reference): ``UNet2DConditionModel`` with
text cross-attention and no added embedding (``addition_embed_type`` unset). SD-2.x shapes
(linear projections, 1024-wide text), inpainting (9 input channels) and class-embedded variants
are the same family; a model that mixes anything into the time embedding (a class embedding,
``timestep_cond``) cannot use the per-ResNet scheduler time cache, which says so when asked."""

from __future__ import annotations

from bfq.families.family import TIMESTEP_ONLY, Family, unet_like

SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD15_N_PARAMS = 859_520_964
SD15_N_LINEAR_CONV_WEIGHTS = 859_077_120


class SD15(Family):
    name = "sd15"
    title = "SD-v1.5"
    model_class = "UNet2DConditionModel"
    pipeline_class = "StableDiffusionPipeline"
    hub_repo = SD15_REPO
    random_name = "sd15-random"
    tiny_name = "tiny-sd"
    tiny_package = "bfq.tinysd"
    time_features = TIMESTEP_ONLY
    default_steps = 50  # the paper's PNDM-50
    pipeline_kwargs = {"safety_checker": None}

    def matches(self, class_name: str, config: dict) -> bool:
        return unet_like(class_name, config) and config.get("addition_embed_type") is None

    def config(self) -> dict:
        """The public SD-v1.5 ``unet/config.json`` (diffusers ``UNet2DConditionModel``)."""
        return {
            "_class_name": "UNet2DConditionModel",
            "act_fn": "silu",
            "attention_head_dim": 8,
            "block_out_channels": [320, 640, 1280, 1280],
            "center_input_sample": False,
            "cross_attention_dim": 768,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "downsample_padding": 1,
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "in_channels": 4,
            "layers_per_block": 2,
            "mid_block_scale_factor": 1,
            "norm_eps": 1e-05,
            "norm_num_groups": 32,
            "out_channels": 4,
            "sample_size": 64,
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        }

    def scheduler_config(self) -> dict:
        """The public SD-v1.5 ``scheduler/scheduler_config.json`` (PNDM)."""
        return {
            "_class_name": "PNDMScheduler",
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "clip_sample": False,
            "num_train_timesteps": 1000,
            "set_alpha_to_one": False,
            "skip_prk_steps": True,
            "steps_offset": 1,
            "trained_betas": None,
        }


FAMILY = SD15()
