"""PixArt-class diffusion transformers (PixArt-Σ 512 is the reference): diffusers'
``PixArtTransformer2DModel`` (``PixArtSigmaPipeline``, ``PixArtAlphaPipeline``).

Every block is modulated by ``adaln_single(timestep)``: ``emb = timestep_embedder(time_proj(t))``
(plus, when ``use_additional_conditions``, embeddings of the image size and aspect ratio, as in
PixArt-α 1024), then ``linear(silu(emb))`` gives the 6 x width modulation vector every block
reads, and ``emb`` itself feeds the final layer. Without the size conditions both depend on the
timestep alone, so a scheduler time cache can hold them per step and drop ``adaln_single``
entirely; with them, only the timestep part ``timestep_embedder(time_proj(t))`` is cached and the
size embedders and ``adaln_single.linear`` stay (as SDXL's §2.3.1 cache).

A forward takes the patchified latent, T5 text features (``encoder_hidden_states`` [B, S,
caption_channels]), the timestep and ``added_cond_kwargs`` (``resolution``, ``aspect_ratio``: None
unless the model uses size conditions). PixArt-Σ predicts a variance too (``out_channels`` =
2 x ``in_channels``); :meth:`PixArt.forward` returns the noise prediction only, as the pipeline uses it.
"""

from __future__ import annotations

from bfq.families.family import TIMESTEP_ONLY, Family
from bfq.format.constants import ADALN_MODULE, ADALN_TIME_MLP, replaced_by_time_cache
# one definition, in the format (FORMAT.md §2.3.2): re-exported for the family's users
from bfq.format.constants import SIZE_CONDITION_SAMPLE_SIZE, uses_size_conditions  # noqa: F401

PIXART_REPO = "PixArt-alpha/PixArt-Sigma-XL-2-512-MS"
T5_MAX_LENGTH = 300  # PixArtSigmaPipeline's max_sequence_length (PixArt-α: 120)


class PixArt(Family):
    name = "pixart"
    title = "PixArt-Σ"
    model_class = "PixArtTransformer2DModel"
    pipeline_class = "PixArtSigmaPipeline"
    hub_repo = PIXART_REPO
    random_name = "pixart-random"
    random_per_layer = True
    tiny_name = "tiny-pixart"
    tiny_package = "bfq.tinypixart"
    time_features = TIMESTEP_ONLY
    default_steps = 20  # PixArtSigmaPipeline's default
    pipeline_kwargs = {}
    hub_tag = "pixart"
    component = "transformer"
    model_noun = "diffusion transformer"
    added_cond_keys = ("resolution", "aspect_ratio")
    prompt_cond_keys = ("encoder_attention_mask",)
    time_modulation = "adaln-single"
    time_proj_module = "adaln_single.emb.time_proj"
    time_mlp_module = ADALN_TIME_MLP

    def matches(self, class_name: str, config: dict) -> bool:
        """``PixArtTransformer2DModel``, or a legacy ``Transformer2DModel`` config with adaLN-single
        (older PixArt repos), which diffusers loads as a ``PixArtTransformer2DModel``."""
        if not isinstance(config, dict):
            return False
        legacy = class_name == "Transformer2DModel" and config.get("norm_type") == "ada_norm_single"
        return class_name == "PixArtTransformer2DModel" or legacy

    def per_resnet_time_cache(self, config: dict) -> bool:
        """True when a scheduler cache may hold adaLN-single's outputs (no size conditions)."""
        return not uses_size_conditions(config)

    def replaced_by_time_cache(self, name: str, mode: str, config: dict) -> bool:
        """A scheduler cache without size conditions replaces all of ``adaln_single``; otherwise (size
        conditions, or grid mode, which keeps the timestep MLP as dense tensors) its timestep MLP."""
        return replaced_by_time_cache(name, mode, self.per_resnet_time_cache(config), self.model_class)

    def is_time_layer(self, module_name: str) -> bool:
        return module_name == ADALN_MODULE or module_name.startswith(ADALN_MODULE + ".")

    def drop_padding(self, *flats: dict) -> tuple[dict, ...]:
        """The T5 features and masks cut after the last position any of them attends to: masked keys
        add exactly nothing to cross-attention (their weight underflows to 0), so the outputs are
        the same and a 300-token pipeline prompt of a few words costs a few tokens."""
        masks = [f["encoder_attention_mask"] for f in flats if f.get("encoder_attention_mask") is not None]
        if len(masks) != len(flats):
            return flats
        keep = max(int(m.flatten(0, -2).any(0).nonzero().max()) + 1 if bool(m.any()) else 1 for m in masks)
        return tuple({**f, "encoder_hidden_states": f["encoder_hidden_states"][:, :keep],
                      "encoder_attention_mask": f["encoder_attention_mask"][:, :keep]} for f in flats)  # fmt: skip

    def required_cond_keys(self, config: dict) -> tuple[str, ...]:
        return self.added_cond_keys if uses_size_conditions(config) else ()

    def text_width(self, config: dict) -> int:
        return int(config.get("caption_channels") or config["cross_attention_dim"])

    def first_last_layers(self, config: dict) -> tuple[str, ...]:
        """The patch embedding (a convolution over the latent) and the final projection to the patches."""
        return ("pos_embed.proj.weight", "proj_out.weight")

    def feature_modules(self, model) -> list:
        """Every transformer block (a DiT has no down/up blocks: its blocks' outputs are the features)."""
        return list(model.transformer_blocks)

    def pipeline_from(self, base, model, **kwargs):
        """The PixArt pipeline of ``base`` (``PixArtSigmaPipeline``, or ``PixArtAlphaPipeline`` where its
        ``model_index.json`` says so) with ``model`` as its ``transformer``.

        Raises:
            ValueError: ``base`` is another kind of pipeline."""
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(base, transformer=model, **kwargs)
        if type(pipe).__name__ not in PIPELINE_CLASSES:
            raise ValueError(f"{base} is a {type(pipe).__name__}, not a PixArt pipeline ({' or '.join(PIPELINE_CLASSES)})")
        return pipe

    def pipeline_call_kwargs(self, config: dict) -> dict:
        """No resolution binning for a model whose ``sample_size`` the pipeline has no size bins for
        (its bins exist for 256-2048 pixel models only; a tiny model would be refused), and caption
        cleaning only where its libraries are installed (what the pipeline falls back to anyway,
        without a warning per prompt)."""
        from diffusers.utils import is_bs4_available, is_ftfy_available

        out = {"clean_caption": is_bs4_available() and is_ftfy_available()}
        if int(config.get("sample_size", 0)) not in RESOLUTION_BINS:
            out["use_resolution_binning"] = False
        return out

    def config(self) -> dict:
        """The public PixArt-Σ 512 ``transformer/config.json`` (about 0.6 B parameters)."""
        return {
            "_class_name": "PixArtTransformer2DModel",
            "activation_fn": "gelu-approximate",
            "attention_bias": True,
            "attention_head_dim": 72,
            "attention_type": "default",
            "caption_channels": 4096,
            "cross_attention_dim": 1152,
            "dropout": 0.0,
            "in_channels": 4,
            "interpolation_scale": None,
            "norm_elementwise_affine": False,
            "norm_eps": 1e-06,
            "norm_num_groups": 32,
            "norm_type": "ada_norm_single",
            "num_attention_heads": 16,
            "num_embeds_ada_norm": 1000,
            "num_layers": 28,
            "out_channels": 8,
            "patch_size": 2,
            "sample_size": 64,
            "upcast_attention": False,
            "use_additional_conditions": False,
        }

    def scheduler_config(self) -> dict:
        """PixArt-Σ's ``scheduler/scheduler_config.json`` (DPM-Solver++ multistep)."""
        return {
            "_class_name": "DPMSolverMultistepScheduler",
            "algorithm_type": "dpmsolver++",
            "beta_end": 0.02,
            "beta_schedule": "linear",
            "beta_start": 0.0001,
            "dynamic_thresholding_ratio": 0.995,
            "euler_at_final": False,
            "lambda_min_clipped": float("-inf"),
            "lower_order_final": True,
            "num_train_timesteps": 1000,
            "prediction_type": "epsilon",
            "sample_max_value": 1.0,
            "solver_order": 2,
            "solver_type": "midpoint",
            "steps_offset": 0,
            "thresholding": False,
            "timestep_spacing": "linspace",
            "trained_betas": None,
            "use_karras_sigmas": False,
            "use_lu_lambdas": False,
            "variance_type": None,
        }

    def conditioning(self, config: dict, batch: int, *, height: int | None = None, width: int | None = None,
                     seq_len: int = 77, generator=None, dtype=None, device=None) -> dict:  # fmt: skip
        """Random T5 features ``encoder_hidden_states`` [B, S, caption_channels] and, for a model with
        size conditions, the ``resolution`` and ``aspect_ratio`` of a ``height`` x ``width`` latent
        (default: ``sample_size``) in pixels, as PixArtAlphaPipeline passes them."""
        import torch

        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        width_in = int(config.get("caption_channels") or config["cross_attention_dim"])
        ehs = torch.randn(batch, seq_len, width_in, generator=gen).to(device=device, dtype=dtype)
        h = VAE_SCALE * int(height or config["sample_size"])
        w = VAE_SCALE * int(width or config["sample_size"])
        return {"encoder_hidden_states": ehs, "added_cond_kwargs": size_conditions(config, batch, h, w, dtype, device)}

    def forward(self, model, sample, timestep, cond: dict):
        """The noise prediction (the first ``in_channels`` channels when the model also predicts a variance)."""
        import torch

        t = torch.as_tensor(timestep, device=sample.device)
        t = t.expand(sample.shape[0]) if t.dim() == 0 else t  # the pipeline's t.expand(batch)
        out = model(sample, timestep=t, return_dict=False, **cond)[0]
        channels = sample.shape[1]
        return out[:, :channels] if out.shape[1] == 2 * channels else out

    def encode_prompts(self, base_dir, texts: list[str], config: dict, device=None) -> dict:
        """The T5 features of ``texts`` as the PixArt pipeline in ``base_dir`` computes them (its own
        ``encode_prompt``, its default sequence length), their attention mask (``encoder_attention_mask``
        [B, S], which the pipeline passes to the transformer's cross-attention) and the size conditions
        of its default image size."""
        import torch
        from diffusers import DiffusionPipeline

        from bfq._quiet import quiet_libraries

        with quiet_libraries():
            pipe = DiffusionPipeline.from_pretrained(base_dir, transformer=None, vae=None, local_files_only=True)
        with torch.no_grad():
            ehs, mask = pipe.encode_prompt(texts, do_classifier_free_guidance=False, device=device, clean_caption=False)[:2]
        pixels = int(config["sample_size"]) * VAE_SCALE
        return {"encoder_hidden_states": ehs.float(), "encoder_attention_mask": mask,
                "added_cond_kwargs": size_conditions(config, len(texts), pixels, pixels, torch.float32, device)}  # fmt: skip


PIPELINE_CLASSES = ("PixArtSigmaPipeline", "PixArtAlphaPipeline")
RESOLUTION_BINS = (32, 64, 128, 256)  # sample sizes PixArt pipelines have aspect-ratio bins for
VAE_SCALE = 8  # pixels per latent cell of PixArt's VAE (size conditions are in pixels)


def size_conditions(config: dict, batch: int, height: int, width: int, dtype=None, device=None) -> dict:
    """``added_cond_kwargs`` for ``height`` x ``width``-pixel images: ``resolution`` [B, 2] and
    ``aspect_ratio`` [B, 1] for a model with size conditions, else both None (as the pipelines pass them)."""
    import torch

    if not uses_size_conditions(config):
        return {"resolution": None, "aspect_ratio": None}
    resolution = torch.tensor([[height, width]], dtype=dtype, device=device).repeat(batch, 1)
    aspect = torch.tensor([[height / width]], dtype=dtype, device=device).repeat(batch, 1)
    return {"resolution": resolution, "aspect_ratio": aspect}


def pixart_test_config(**overrides) -> dict:
    """A small PixArt-structured ``PixArtTransformer2DModel`` config for tests and examples: 2 blocks,
    width 48 (2 heads of 24; size conditions need a multiple of 3), patch 2, 8x8 latents, 24-wide text features, a learned variance
    (``out_channels`` 8) as PixArt-Σ; ``use_additional_conditions=True`` makes it PixArt-α-1024-like."""
    cfg = {
        "_class_name": "PixArtTransformer2DModel",
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 8,
        "patch_size": 2,
        "num_layers": 2,
        "num_attention_heads": 2,
        "attention_head_dim": 24,
        "cross_attention_dim": 48,
        "caption_channels": 24,
        "norm_type": "ada_norm_single",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-06,
        "num_embeds_ada_norm": 1000,
        "use_additional_conditions": False,
    }
    cfg.update(overrides)
    return cfg


FAMILY = PixArt()
