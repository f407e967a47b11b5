"""What a model family is: the questions every stage asks instead of assuming SD-v1.5.

A family module (``sd15.py``, ``sdxl.py``, ...) subclasses :class:`Family` and answers them for the
diffusers models it covers. Importing a family does not import torch or diffusers.
"""

from __future__ import annotations

from pathlib import Path

from bfq.format.constants import replaced_by_time_cache

_DATA = Path(__file__).resolve().parent.parent / "data"

# What a model's time features (what each ResNet's time_emb_proj sees) depend on.
TIMESTEP_ONLY = "timestep"
TIMESTEP_AND_CONDITIONING = "timestep+conditioning"


class Family:
    """One model family. Class attributes say the facts; methods compute what depends on a config.

    Attributes:
        name: short name (``"sd15"``), also the built-in name of its reference model on the Hub.
        title: for messages (``"SD-v1.5"``).
        model_class, pipeline_class: the diffusers classes (names) of the model and its pipeline.
        hub_repo: the reference model's Hub repo (only its model and scheduler are downloaded).
        random_name: built-in name of a reference-shaped model with random weights (no download).
        tiny_name: built-in name of the bundled trained tiny pipeline; ``tiny_package`` is the bfq
            package that makes and evaluates it; its files are in ``bfq/data/<tiny_name>``.
        time_features: :data:`TIMESTEP_ONLY` or :data:`TIMESTEP_AND_CONDITIONING`.
        default_steps: sampler steps of the reference pipeline (what a scheduler time cache is made for).
        tiny_steps: sampler steps of the bundled tiny model's metric (``bfq.tinysd.evaluate``): what
            a time cache of ``tiny_name`` is made for by default.
        pipeline_kwargs: extra keyword arguments for ``pipeline_class.from_pretrained``.
        hub_tag: the Hub tag of the family on a model card.
        random_per_layer: ``random_name``'s weights come from one seeded stream per parameter
            (:func:`bfq.families.lazy.random_source`), so ``bfq quantize`` reads them layer by layer
            instead of holding the float model; False: one stream in module order
            (:func:`bfq.families.build.build_random_unet`, whose published figures depend on it).
        added_cond_keys: what a forward takes in ``added_cond_kwargs`` besides the text (SDXL:
            ``text_embeds``, ``time_ids``); empty when nothing.
        prompt_cond_keys: conditioning tensors besides ``encoder_hidden_states`` that depend on the
            prompt, which CFG-aware training swaps for the empty prompt's (SDXL: ``text_embeds``;
            PixArt: ``encoder_attention_mask``).
        component: the model's folder in a diffusers pipeline repo (``unet``; ``transformer`` for
            DiT families), where the diffusers layout (FORMAT.md appendix A) puts it.
        time_modulation: how the timestep reaches the blocks, what :mod:`bfq.quant.timecache`
            dispatches on: ``"resnet"`` (each ResNet's ``time_emb_proj`` reads the time embedding)
            or ``"adaln-single"`` (one ``adaln_single`` module modulates every block, FORMAT.md §2.3.2).
        time_proj_module, time_mlp_module: module paths of the sinusoidal timestep projection and of
            the timestep MLP (what grid mode keeps in fp16 and a scheduler ``embedding`` cache holds).
    """

    name: str
    title: str
    model_class: str
    pipeline_class: str
    hub_repo: str
    random_name: str
    tiny_name: str
    tiny_package: str
    time_features: str = TIMESTEP_ONLY
    default_steps: int = 50
    tiny_steps: int = 20
    pipeline_kwargs: dict = {}
    hub_tag: str = "stable-diffusion"
    added_cond_keys: tuple[str, ...] = ()
    prompt_cond_keys: tuple[str, ...] = ()
    component: str = "unet"
    model_noun: str = "UNet"  # what messages and model cards call the model
    tiny_digit_analysis: bool = True  # the tiny model's sensitivity analysis uses tiny-sd's digit prompts
    random_per_layer: bool = False
    # the time path (bfq.quant.timecache): how the timestep reaches the blocks, and where its modules are
    time_modulation: str = "resnet"  # "resnet": each ResNet's time_emb_proj; "adaln-single": one module for all blocks
    time_proj_module: str = "time_proj"  # sinusoidal projection of the timestep (no weights)
    time_mlp_module: str = "time_embedding"  # the timestep MLP: what grid mode keeps in fp16 and an `embedding` cache holds

    # ---- recognizing a model
    def matches(self, class_name: str, config: dict) -> bool:
        """True when a model of diffusers class ``class_name`` with ``config`` belongs to this family."""
        raise NotImplementedError

    def builtin_names(self) -> tuple[str, ...]:
        return (self.tiny_name, self.random_name, self.name)

    # ---- reference shapes
    def config(self) -> dict:
        """The reference model's ``config.json`` (a new dict): the shape of ``random_name``."""
        raise NotImplementedError

    def scheduler_config(self) -> dict:
        """The reference pipeline's ``scheduler_config.json`` (a new dict)."""
        raise NotImplementedError

    def scheduler(self):
        """The reference pipeline's scheduler (a diffusers scheduler object)."""
        import diffusers

        cfg = self.scheduler_config()
        return getattr(diffusers, cfg["_class_name"]).from_config(cfg)

    def tiny_pipeline_dir(self) -> Path:
        """The bundled tiny pipeline's directory (it may be absent from a checkout that lacks it)."""
        return _DATA / self.tiny_name

    # ---- time features
    def per_resnet_time_cache(self, config: dict) -> bool:
        """True when a scheduler-mode time cache may hold each ResNet's ``time_emb_proj`` output
        (FORMAT.md §2.3): only when the time features depend on the timestep alone. Otherwise it
        holds the timestep MLP's output only and the ``time_emb_proj`` layers stay (§2.3.1)."""
        return self.time_features == TIMESTEP_ONLY

    def replaced_by_time_cache(self, name: str, mode: str, config: dict) -> bool:
        """True for the weights (state-dict names) a time cache of ``mode`` replaces in a model with
        ``config``: those a file with that cache MUST NOT hold (FORMAT.md §2.3, §2.3.1) and a recipe
        does not cover. Every other Linear/Conv2d weight is quantizable."""
        return replaced_by_time_cache(name, mode, mode != "scheduler" or self.per_resnet_time_cache(config))

    def is_time_layer(self, module_name: str) -> bool:
        """True for the modules of the time path (the timestep MLP and what reads only its output):
        the small layers a time cache is computed from, filled first in a lazy model; fine-tuning
        keeps those that are not quantized float and frozen, so the cache made after it is exact."""
        return "time_emb" in module_name

    # ---- conditioning a forward needs
    def conditioning(self, config: dict, batch: int, *, height: int | None = None, width: int | None = None,
                     seq_len: int = 77, generator=None, dtype=None, device=None) -> dict:  # fmt: skip
        """Random example conditioning for a forward of ``batch`` samples of latent size
        ``height`` x ``width`` (default: the config's ``sample_size``): the keyword arguments the
        model takes besides the sample and the timestep (``encoder_hidden_states`` [B, S, D], and
        what the family adds). Drawn from ``generator`` (a CPU ``torch.Generator``; None: seed 0)."""
        import torch

        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        ehs = torch.randn(batch, seq_len, int(config["cross_attention_dim"]), generator=gen)
        return {"encoder_hidden_states": ehs.to(device=device, dtype=dtype)}

    def forward(self, model, sample, timestep, cond: dict):
        """``model``'s noise prediction (a tensor shaped like ``sample``) at ``timestep`` with ``cond``
        (what :meth:`conditioning` returns, or :meth:`model_kwargs` of a flat dict): the one place
        that knows the model's call signature."""
        return model(sample, timestep, **cond).sample

    # ---- conditioning as one flat dict of batch-first tensors (sliced, repeated, joined like one tensor)
    def flat_conditioning(self, kwargs: dict) -> dict:
        """``encoder_hidden_states`` and the family's other conditioning tensors (``added_cond_kwargs``
        unnested; None values dropped) of ``kwargs`` as :meth:`conditioning` returns them."""
        out = {k: v for k, v in kwargs.items() if k != "added_cond_kwargs" and v is not None}
        out.update({k: v for k, v in (kwargs.get("added_cond_kwargs") or {}).items() if v is not None})
        return out

    def model_kwargs(self, flat: dict) -> dict:
        """The forward's keyword arguments of a flat conditioning dict (the inverse of
        :meth:`flat_conditioning`: the ``added_cond_keys`` go into ``added_cond_kwargs``)."""
        added = {k: v for k, v in flat.items() if k in self.added_cond_keys}
        rest = {k: v for k, v in flat.items() if k not in self.added_cond_keys}
        return {**rest, **({"added_cond_kwargs": added} if added else {})}

    def drop_padding(self, *flats: dict) -> tuple[dict, ...]:
        """Flat conditioning dicts (:meth:`flat_conditioning`) without the text positions that are
        masked out in all of them (the same model outputs, less compute); unchanged without a mask."""
        return flats

    def required_cond_keys(self, config: dict) -> tuple[str, ...]:
        """Flat conditioning keys besides the text that every forward of a model with ``config`` needs."""
        return self.added_cond_keys

    def text_width(self, config: dict) -> int:
        """Width of the text features the model takes (``encoder_hidden_states``' last dimension)."""
        return int(config["cross_attention_dim"])

    # ---- structure the stages ask about
    def first_last_layers(self, config: dict) -> tuple[str, ...]:
        """The weights a recipe keeps at 8 bits, as the paper keeps a UNet's first and last layers."""
        return ("conv_in.weight", "conv_out.weight")

    def feature_modules(self, model) -> list:
        """The modules whose outputs Stage I's feature distillation matches (every down and up block)."""
        return list(getattr(model, "down_blocks", [])) + list(getattr(model, "up_blocks", []))

    def pipeline_from(self, base, model, **kwargs):
        """The family's diffusers pipeline from the pipeline folder or Hub repo ``base`` with ``model``
        as its :attr:`component` (``unet=``); ``kwargs`` go to ``from_pretrained``."""
        import diffusers

        return getattr(diffusers, self.pipeline_class).from_pretrained(
            base, **{self.component: model}, **self.pipeline_kwargs, **kwargs)  # fmt: skip

    def pipeline_call_kwargs(self, config: dict) -> dict:
        """Extra arguments for a call of ``pipeline_class`` around a model with ``config``."""
        return {}

    def encode_prompts(self, base_dir, texts: list[str], config: dict, device=None) -> dict:
        """The conditioning of ``texts`` by the text encoder(s) of the pipeline in ``base_dir``
        (float32, on ``device``), as :meth:`conditioning` returns it. Offline."""
        import torch
        from transformers import CLIPTextModel, CLIPTokenizer

        base = Path(base_dir)
        tok = CLIPTokenizer.from_pretrained(base / "tokenizer", local_files_only=True)
        enc = CLIPTextModel.from_pretrained(base / "text_encoder", local_files_only=True).to(device).eval()
        ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        with torch.no_grad():
            return {"encoder_hidden_states": enc(ids.input_ids.to(device))[0].float()}

    def __repr__(self) -> str:
        return f"<bfq model family {self.name} ({self.title})>"


def unet_like(class_name: str, config: dict) -> bool:
    """A diffusers ``UNet2DConditionModel`` config (the class every UNet family builds on)."""
    return class_name == "UNet2DConditionModel" and isinstance(config, dict)
