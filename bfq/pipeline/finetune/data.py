"""Conditioning batches for :func:`bfq.pipeline.finetune.finetune`.

A *batch* is a dict of CPU or device tensors:

* ``"encoder_hidden_states"`` ``[B, S, D]`` (required): the text embeddings the UNet is conditioned on;
* ``"uncond_hidden_states"`` ``[S, D]``, ``[1, S, D]`` or ``[B, S, D]`` (optional): the embedding of
  the empty prompt, which replaces a sample's text with probability ``uncond_prob`` (CFG-aware
  training); :func:`bfq.pipeline.finetune.finetune` also takes it once for all batches;
* ``"latents"`` ``[B, C, H, W]`` (optional): clean latents ``x_0`` (already multiplied by the VAE's
  ``scaling_factor``). Without them the trainer samples ``x_0`` from the teacher for the prompts
  (prompts-only mode), then noises it like any other latent;
* for a model whose family needs ``added_cond_kwargs`` (SDXL): ``"text_embeds"`` ``[B, P]`` and
  ``"time_ids"`` ``[B, n]`` (required), ``"uncond_text_embeds"`` ``[P]`` (optional, default zeros:
  what SDXL's pipeline uses for the empty prompt); for a PixArt transformer
  ``"encoder_attention_mask"`` ``[B, S]`` and ``"uncond_encoder_attention_mask"`` ``[S]`` (the T5
  padding mask the pipeline passes to cross-attention; ``resolution``/``aspect_ratio`` too for a
  model with size conditions).

Any iterable of such dicts works. The sources here are *indexed*: ``source.batch(i)`` is a pure
function of ``i`` and the source's seed, so a resumed run (or rank ``r`` of ``world`` processes)
reads exactly the batches it would have read without interruption, without replaying the ones
before:

* :func:`tinysd_digits`: the bundled tiny-sd's digits, encoded by its VAE, with its captions (or by
  tiny-sdxl's, with both its text encoders);
* :func:`image_caption_folder`: ``NAME.png|jpg|... + NAME.txt`` pairs, encoded once by a pipeline's
  VAE and text encoder on the training device (cached in the work directory,
  :mod:`bfq.pipeline.finetune.encoding`);
* :func:`prompt_batches`: prompts alone (a list, or a text file with one prompt a line), encoded by
  the text encoder(s) the pipeline's model family uses (SDXL: both, and the size conditions; PixArt: T5);
* :class:`TensorBatches`: tensors already in memory.

:func:`make_source` turns a ``--data`` string (``tiny-sd-digits``, ``folder:PATH``,
``prompts:FILE``) into one of them.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from bfq.families import FAMILIES
from bfq.pipeline.finetune.encoding import (
    EncodedFolder,
    encode_folder,
    encode_images,
    encode_text,
    folder_pairs,
    image_resolution,
    load_text_encoder,
    load_vae,
)

DATA_KINDS = ("tiny-sd-digits", "folder:PATH", "prompts:FILE")
TINY_MODELS = tuple(f.tiny_name for f in FAMILIES)  # the bundled models whose built-in data is tiny-sd's digits


def _seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (numpy SeedSequence): independent streams per index."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1, np.uint64)[0] >> 1)


class IndexedBatches(abc.ABC):
    """Base of the sources: ``batch(i)`` is deterministic; iteration yields ``batch(0), batch(1), ...``
    without end. Subclasses set ``n`` (examples), ``batch_size`` and ``seed`` and implement ``_make``."""

    n: int
    batch_size: int
    seed: int

    def __init__(self):
        self._perm: tuple[int, torch.Tensor] | None = None

    def indices(self, i: int) -> torch.Tensor:
        """The example indices of batch ``i``: epochs of a seeded permutation, read in order."""
        if i < 0:
            raise ValueError(f"batch index must be >= 0, got {i}")
        start = i * self.batch_size
        out = []
        while len(out) < self.batch_size:
            epoch, offset = divmod(start + len(out), self.n)
            perm = self._permutation(epoch)
            out.extend(perm[offset : offset + self.batch_size - len(out)].tolist())
        return torch.tensor(out, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(_seed(self.seed, 1, epoch))
            self._perm = (epoch, torch.randperm(self.n, generator=gen))
        return self._perm[1]

    def generator(self, i: int) -> torch.Generator:
        """A CPU generator for batch ``i``'s own random draws (posterior samples, caption choices)."""
        return torch.Generator().manual_seed(_seed(self.seed, 2, i))

    def batch(self, i: int) -> dict:
        return self._make(i, self.indices(i))

    @abc.abstractmethod
    def _make(self, i: int, idx: torch.Tensor) -> dict:
        """Batch ``i`` made of the examples ``idx``."""

    def __iter__(self) -> Iterator[dict]:
        i = 0
        while True:
            yield self.batch(i)
            i += 1


class TensorBatches(IndexedBatches):
    """Batches drawn from tensors in memory.

    Args:
        encoder_hidden_states: ``[N, S, D]`` text embeddings, one per example.
        uncond_hidden_states: ``[S, D]`` (or ``[1, S, D]``) empty-prompt embedding.
        latents: ``[N, C, H, W]`` clean latents, or None (prompts-only mode).
        latents_std: ``[N, C, H, W]`` posterior standard deviations: each batch then draws
            ``latents + std * noise`` (a VAE posterior sample), as Stable Diffusion trains.
        added: ``{"text_embeds": [N, P], "time_ids": [N, n]}`` for models that need them (SDXL), and
            ``"uncond_text_embeds"`` ``[P]`` for the empty prompt; None for SD-v1.5-class models.
        batch_size: examples per batch.
        seed: seeds the example order and the posterior samples.
    """

    def __init__(self, encoder_hidden_states, uncond_hidden_states, latents=None, latents_std=None, *,
                 batch_size: int = 16, seed: int = 0, added: dict | None = None):  # fmt: skip
        super().__init__()
        self.added = {k: torch.as_tensor(v) for k, v in (added or {}).items()}
        self.ehs = torch.as_tensor(encoder_hidden_states)
        self.uncond = torch.as_tensor(uncond_hidden_states).reshape(self.ehs.shape[1:])
        self.latents = None if latents is None else torch.as_tensor(latents)
        self.latents_std = None if latents_std is None else torch.as_tensor(latents_std)
        if self.latents is not None and len(self.latents) != len(self.ehs):
            raise ValueError(f"{len(self.latents)} latents for {len(self.ehs)} text embeddings")
        _check_sizes(len(self.ehs), batch_size)
        self.n, self.batch_size, self.seed = len(self.ehs), int(batch_size), int(seed)

    def _make(self, i, idx):
        out = {"encoder_hidden_states": self.ehs[idx], "uncond_hidden_states": self.uncond}
        out.update({k: v if k.startswith("uncond_") else v[idx] for k, v in self.added.items()})
        if self.latents is not None:
            z = self.latents[idx]
            if self.latents_std is not None:
                z = z + self.latents_std[idx] * torch.randn(z.shape, generator=self.generator(i), dtype=z.dtype)
            out["latents"] = z
        return out


def _check_sizes(n: int, batch_size: int) -> None:
    if n < 1:
        raise ValueError("no examples")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


# ----------------------------------------------------------------------------------- tiny-sd


class DigitBatches(IndexedBatches):
    """The tiny-sd training set: 1,797 digits (VAE posterior samples) with captions drawn from
    tiny-sd's templates, like :mod:`bfq.tinysd.train`. Built by :func:`tinysd_digits`."""

    def __init__(self, mean, std, labels, captions: list[str], caption_table, uncond, *, batch_size: int, seed: int,
                 added: dict | None = None):  # fmt: skip
        super().__init__()
        _check_sizes(len(mean), batch_size)
        self.mean, self.std, self.labels = mean, std, torch.as_tensor(labels)
        self.captions, self.table, self.uncond = captions, caption_table, uncond
        self.added = added or {}  # SDXL: text_embeds/time_ids per caption, uncond_text_embeds
        self.n_templates = len(captions) // 10
        self.n, self.batch_size, self.seed = len(mean), int(batch_size), int(seed)

    def _make(self, i, idx):
        gen = self.generator(i)
        z = self.mean[idx] + self.std[idx] * torch.randn(self.mean[idx].shape, generator=gen)
        template = torch.randint(0, self.n_templates, (len(idx),), generator=gen)
        rows = self.labels[idx] * self.n_templates + template
        out = {"encoder_hidden_states": self.table[rows], "uncond_hidden_states": self.uncond, "latents": z}
        out.update({k: v if k.startswith("uncond_") else v[rows] for k, v in self.added.items()})
        return out

    def caption(self, i: int) -> list[str]:
        """The captions of batch ``i`` (for inspection)."""
        gen = self.generator(i)
        idx = self.indices(i)
        torch.randn(self.mean[idx].shape, generator=gen)
        template = torch.randint(0, self.n_templates, (len(idx),), generator=gen)
        return [self.captions[int(r)] for r in self.labels[idx] * self.n_templates + template]


def tinysd_digits(pipeline_dir: str | os.PathLike | None = None, *, batch_size: int = 64, seed: int = 0) -> DigitBatches:
    """tiny-sd's own training data: every digit image encoded by the bundled VAE, each with a
    caption drawn from tiny-sd's templates (``"the number 7"``, ``"seven"``, ...).

    For an SDXL-class pipeline (tiny-sdxl) the captions are encoded by its model family
    (both text encoders, the pooled ``text_embeds``, the ``time_ids`` of its default image size)
    and the empty prompt as its pipeline encodes it for classifier-free guidance.

    Args:
        pipeline_dir: the pipeline whose VAE and text encoder(s) encode the data (default: the
            bundled tiny-sd).
        batch_size: examples per batch.
        seed: seeds the order, the posterior samples and the caption choices.
    """
    from bfq.tinysd import pipeline_dir as bundled
    from bfq.tinysd.data import DIGIT_TEMPLATES, DIGIT_WORDS, load_digits_images

    base = Path(pipeline_dir or bundled())
    size = image_resolution(base)
    ink, labels = load_digits_images(size)
    images = torch.from_numpy(1.0 - ink)[:, None].repeat(1, 3, 1, 1) * 2 - 1  # dark ink on white, [-1, 1]
    mean, std = encode_images(load_vae(base), images)
    captions = [t.format(w=DIGIT_WORDS[d], n=str(d)) for d in range(10) for t in DIGIT_TEMPLATES]
    family, config = _pipeline_family(base)
    if _family_encodes(family):
        table, uncond, added = _family_encoded(family, base, captions, config)
        return DigitBatches(mean, std, labels, captions, table, uncond, batch_size=batch_size, seed=seed, added=added)
    tokenizer, encoder = load_text_encoder(base)
    table = encode_text(tokenizer, encoder, captions + [""])
    return DigitBatches(mean, std, labels, captions, table[:-1], table[-1], batch_size=batch_size, seed=seed)


# ------------------------------------------------------------------------------ folders, prompts


class FolderBatches(IndexedBatches):
    """Image-caption pairs, encoded once (:func:`bfq.pipeline.finetune.encoding.encode_folder`): batch
    ``i`` is a VAE posterior sample of each example (noise from the batch's own generator) and its
    text embedding. See :func:`image_caption_folder`."""

    def __init__(self, encoded: EncodedFolder, *, batch_size: int, seed: int):
        super().__init__()
        _check_sizes(len(encoded.mean), batch_size)
        self.encoded, self.uncond = encoded, encoded.uncond
        self.n, self.batch_size, self.seed = len(encoded.mean), int(batch_size), int(seed)

    def _make(self, i, idx):
        rows = idx.numpy()
        mean = torch.from_numpy(np.asarray(self.encoded.mean[rows]))
        std = torch.from_numpy(np.asarray(self.encoded.std[rows]))
        z = mean + std * torch.randn(mean.shape, generator=self.generator(i))
        ehs = torch.from_numpy(np.asarray(self.encoded.ehs[rows]))
        return {"encoder_hidden_states": ehs, "uncond_hidden_states": self.uncond, "latents": z}


def image_caption_folder(folder, pipeline_dir, *, batch_size: int = 16, seed: int = 0, resolution: int | None = None,
                         device="cpu", cache_dir=None, log=None) -> FolderBatches:  # fmt: skip
    """Batches from a folder of images with ``.txt`` captions (``cat.png`` + ``cat.txt``), every
    example encoded once before the first batch.

    Args:
        folder: the data folder.
        pipeline_dir: a Stable Diffusion pipeline directory whose VAE, tokenizer and text encoder
            encode the data.
        resolution: image size in pixels (default: what the pipeline's UNet was trained at).
        device: where the VAE and text encoder run (the training device).
        cache_dir: keep the encoded examples here (one subfolder per dataset; an interrupted
            encoding continues, a finished one is reused); None: in memory only.
        log: receives a line when an interrupted encoding continues.
    """
    pairs = folder_pairs(folder)
    size = resolution or image_resolution(pipeline_dir)
    encoded = encode_folder(pairs, pipeline_dir, size=size, device=device, cache_dir=cache_dir, log=log)
    return FolderBatches(encoded, batch_size=batch_size, seed=seed)


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Non-empty lines of a text file (one prompt a line; lines starting with ``#`` are skipped)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def prompt_batches(prompts, pipeline_dir, *, batch_size: int = 16, seed: int = 0, device="cpu") -> TensorBatches:
    """Prompts alone (a list, or a text file with one prompt a line): batches without latents, so
    the trainer draws ``x_0`` from the teacher (see :class:`bfq.pipeline.finetune.FinetuneConfig`
    ``sample_steps``/``sample_cfg``)."""
    if isinstance(prompts, (str, os.PathLike)):
        prompts = read_prompts(prompts)
    family, config = _pipeline_family(pipeline_dir)
    if _family_encodes(family):
        table, uncond, added = _family_encoded(family, pipeline_dir, list(prompts), config, device)
        return TensorBatches(table, uncond, batch_size=batch_size, seed=seed, added=added)
    tokenizer, encoder = load_text_encoder(pipeline_dir, device)
    table = encode_text(tokenizer, encoder, list(prompts) + [""])
    return TensorBatches(table[:-1], table[-1], batch_size=batch_size, seed=seed)


def _pipeline_family(pipeline_dir):
    """(family, model config) of a diffusers pipeline directory (its ``unet/`` or ``transformer/``)."""
    from bfq.families import pipeline_family

    return pipeline_family(pipeline_dir)


def _family_encodes(family) -> bool:
    """True for a family whose text conditioning is more than one CLIP encoder's last hidden state
    (SDXL: two encoders, pooled text and size ids; PixArt: T5 features and their attention mask):
    its pipeline's own ``encode_prompt`` encodes the captions (Family.encode_prompts)."""
    return bool(family.added_cond_keys or family.prompt_cond_keys)


def _family_encoded(family, base, texts: list[str], config: dict, device=None):
    """``(text features [N, S, D], empty prompt's [S, D], other tensors)`` of ``texts`` encoded by
    ``family`` with the pipeline in ``base`` (padding no text attends to dropped): the other tensors flat, one row per text (SDXL:
    ``text_embeds``, ``time_ids``; PixArt: ``encoder_attention_mask``), and for those that depend on
    the prompt the empty prompt's as ``uncond_<key>`` (CPU, float32 except masks)."""
    cond, uncond = family.drop_padding(family.flat_conditioning(family.encode_prompts(base, texts, config, device)),
                                       family.flat_conditioning(family.encode_prompts(base, [""], config, device)))
    table, empty = cond.pop("encoder_hidden_states").cpu(), uncond.pop("encoder_hidden_states")[0].cpu()
    added = {k: v.cpu() for k, v in cond.items()}
    added.update({f"uncond_{k}": uncond[k][0].cpu() for k in family.prompt_cond_keys if k in uncond})
    return table, empty, added


def make_source(spec: str | None, *, model_name: str = "", pipeline_dir=None, batch_size: int = 16, seed: int = 0,
                device="cpu", cache_dir=None, log=None) -> IndexedBatches:  # fmt: skip
    """A batch source from a ``--data`` string.

    Args:
        spec: ``"tiny-sd-digits"``, ``"folder:PATH"``, ``"prompts:FILE"``, or None for the model's
            built-in data (tiny-sd's digits for the bundled tiny models: tiny-sd, tiny-sdxl, tiny-pixart).
        model_name: the model's name (``bfq.pipeline.models.ResolvedModel.name``).
        pipeline_dir: the pipeline whose VAE/text encoder encode folder and prompt data.
        device: where the VAE and text encoder run.
        cache_dir, log: for folder data, as in :func:`image_caption_folder`.

    Raises:
        ValueError: an unknown spec, or a spec that needs a pipeline directory the model lacks.
    """
    if spec is None:
        if model_name not in TINY_MODELS:
            raise ValueError(
                f"no built-in training data for {model_name or 'this model'}: give data as "
                "folder:PATH (images + .txt captions) or prompts:FILE (one prompt a line)"
            )
        spec = "tiny-sd-digits"
    if pipeline_dir is None and model_name in TINY_MODELS:
        from bfq.families import family_for_name

        pipeline_dir = family_for_name(model_name).tiny_pipeline_dir()
    if spec == "tiny-sd-digits":
        return tinysd_digits(pipeline_dir if model_name != "tiny-sd" else None, batch_size=batch_size, seed=seed)
    kind, _, arg = spec.partition(":")
    if kind not in ("folder", "prompts") or not arg:
        raise ValueError(f"data must be one of {', '.join(DATA_KINDS)}, got {spec!r}")
    if pipeline_dir is None:
        raise ValueError(
            f"data {spec!r} needs the model's VAE and text encoder: give a diffusers pipeline directory "
            "(model_index.json + unet/ vae/ text_encoder/ tokenizer/) as the model"
        )
    if kind == "folder":
        if _family_encodes(_pipeline_family(pipeline_dir)[0]):
            raise ValueError(f"folder data is not supported yet for {_pipeline_family(pipeline_dir)[0].title} models "
                             "(their own text encoders and conditioning): use prompts:FILE")  # fmt: skip
        return image_caption_folder(arg, pipeline_dir, batch_size=batch_size, seed=seed, device=device,
                                    cache_dir=cache_dir, log=log)  # fmt: skip
    return prompt_batches(arg, pipeline_dir, batch_size=batch_size, seed=seed, device=device)
