"""Time-feature cache (BitsFusion §4.1): replace the UNet's time MLPs by pre-computed features.

Two modes:

* **scheduler** (the paper): for each ``ResnetBlock2D`` with a ``time_emb_proj``, store
  ``F[t] = time_emb_proj(silu(time_embedding(time_proj(t))))`` in fp16 for exactly the sampler's
  timesteps. :func:`install_scheduler_cache` deletes ``time_embedding`` and every ``time_emb_proj``
  (no weights remain) and makes each resnet read its row for the current timestep. Other timesteps
  raise ``ValueError``. This needs time features that depend on the timestep alone (the model's
  family says so, :mod:`bfq.families`); class embeddings and ``timestep_cond`` are refused. For a
  family whose time features also depend on the conditioning (SDXL adds
  ``add_embedding(text_embeds, time_ids)`` before the resnets) the scheduler cache holds the timestep
  MLP's output ``time_embedding(time_proj(t))`` only, one fp16 row per sampler timestep
  (:func:`compute_embedding_table`, :func:`install_embedding_cache`, FORMAT.md §2.3.1): it
  replaces ``time_embedding`` and the ``time_emb_proj`` layers and ``add_embedding`` run live.
* **grid** (any sampler): keep the time-embedding MLP itself, its Linear weights in fp16
  (:func:`time_mlp_weights`), and the ``time_emb_proj`` layers (quantized by the recipe), so the
  model computes ``time_embedding(time_proj(t))`` at every timestep, fractional ones included
  (diffusers' Euler family). The MLP costs about what a table of every training timestep
  did (SD-v1.5: 2.05 M fp16 weights against 1000 x 1280 = 1.28 M values; tiny-sd: 20,480 against
  128,000) and needs nothing installed. Files written by bfq 0.1 carry a grid *table* instead
  (FORMAT.md §2.3): :func:`install_grid_cache` serves it, interpolating linearly between integer
  timesteps (0.61 % mean / 1.40 % max relative error of the embedding at half steps on tiny-sd,
  against 0.011 % / 0.019 % for the fp16 MLP); :func:`compute_grid_table` makes one.

Diffusion transformers with adaLN-single (PixArt; the family's ``time_modulation``): the scheduler
cache holds, per step, ``adaln_single``'s two outputs, the 6 x width modulation vector
``linear(silu(emb(t)))`` every block reads and the embedded timestep ``emb(t)`` the final layer reads
(FORMAT.md §2.3.2), and replaces all of ``adaln_single``; a model with size conditions caches the
timestep MLP ``adaln_single.emb.timestep_embedder`` only (the ``embedding`` kind, as SDXL's); grid
mode keeps that MLP in fp16 as for UNets.

It is one cohesive module: computing, installing and counting a cache are one mechanism for every
family, dispatched on the family's time path, so they live together.

Mechanism: a forward pre-hook on the UNet records the exact timestep(s) of each call (float64, one per
batch element, broadcast like diffusers' ``get_time_embed``), so fp16 casts inside the UNet never
round them. ``time_embedding`` is replaced by a weight-free module: in scheduler mode it returns an
empty ``[B, 0]`` placeholder (any unexpected consumer of the embedding fails loudly instead of
computing garbage), in grid mode the interpolated table rows. Features are stored as persistent
buffers, so an installed UNet's state dict holds them: ``time_embedding.table`` (grid) or
``<resnet>.time_emb_proj.features`` (scheduler; the timesteps themselves are not in the state dict,
pass them to ``install_scheduler_cache`` again).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from bfq.errors import InputError
from bfq.families import family_of
from bfq.format.constants import ADALN_FEATURES
from bfq.quant.time_modules import (
    _CachedAdaLNSingle,
    _CachedTimeEmbedding,
    _CachedTimeFeatures,
    _GridTimeEmbedding,
    _TimeEmbeddingPlaceholder,
    _TimeState,
    unique_timesteps,
)

MODES = ("scheduler", "grid")
DEFAULT_STEPS = 50  # sampler steps a scheduler cache is made for by default: the paper's PNDM-50


# --------------------------------------------------------------------------------------- helpers


def resnets_with_time_proj(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(module name, resnet)`` for every ``ResnetBlock2D`` that has a ``time_emb_proj``, module order."""
    from diffusers.models.resnet import ResnetBlock2D

    return [
        (name, m)
        for name, m in unet.named_modules()
        if isinstance(m, ResnetBlock2D) and getattr(m, "time_emb_proj", None) is not None
    ]


def _adaln(unet: nn.Module) -> bool:
    """True for a model whose time path is adaLN-single (its family says so)."""
    return family_of(unet).time_modulation == "adaln-single"


def _time_mlp_path(unet: nn.Module) -> str:
    return family_of(unet).time_mlp_module


def time_layer_names(unet: nn.Module) -> list[str]:
    """State-dict weight names of the time MLP (``time_embedding.*`` Linear layers, e.g. ``linear_1``,
    ``linear_2``) and of every resnet's ``time_emb_proj``, in module order; for adaLN-single, every
    Linear of ``adaln_single``."""
    family = family_of(unet)
    names = []
    for name, m in unet.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        if family.time_modulation == "adaln-single":
            keep = family.is_time_layer(name)
        else:
            keep = name.startswith("time_embedding.") or name.endswith(".time_emb_proj") or name == "time_emb_proj"
        if keep:
            names.append(f"{name}.weight")
    return names


def time_feature_dims(unet: nn.Module) -> dict[str, int]:
    """``{resnet name: D}`` where D is the width of that resnet's cached feature (scheduler mode);
    adaLN-single: ``{"adaln_single.linear": 6 x width, "adaln_single.emb": width}``."""
    if _adaln(unet):
        width = int(unet.config.num_attention_heads) * int(unet.config.attention_head_dim)
        return {key: times * width for key, times in ADALN_FEATURES.items()}
    out = {}
    for name, r in resnets_with_time_proj(unet):
        proj = r.time_emb_proj
        out[name] = proj.features.shape[1] if isinstance(proj, _CachedTimeFeatures) else proj.out_features
    return out


def per_resnet_cache(unet: nn.Module) -> bool:
    """True when a scheduler cache of ``unet`` holds per-ResNet features (its family's time features
    depend on the timestep alone), False when it holds ``time_embedding``'s output only."""
    return family_of(unet).per_resnet_time_cache(dict(unet.config))


def time_embedding_dim(unet: nn.Module) -> int:
    """Width of the timestep MLP's output (1280 for SD-v1.5 and SDXL; PixArt: its width, 1152)."""
    te = unet.get_submodule(_time_mlp_path(unet))
    if isinstance(te, (_GridTimeEmbedding, _CachedTimeEmbedding)):
        return te.table.shape[1]
    return te.linear_2.out_features


def time_mlp_weight_names(unet: nn.Module) -> list[str]:
    """State-dict names of the time MLP's Linear weights (``time_embedding.linear_1.weight``, ...;
    PixArt: ``adaln_single.emb.timestep_embedder.linear_1.weight``, ...)."""
    prefix = _time_mlp_path(unet) + "."
    return [n for n in time_layer_names(unet) if n.startswith(prefix)]


def n_time_features(unet: nn.Module, mode: str, n_timesteps: int) -> int:
    """N_tf, the number of fp16 values standing for the removed time layers in the accounting:
    ``n_timesteps · ΣD`` cached features (scheduler; 20,160·50 for SD-v1.5 at 50 steps; SDXL-class:
    ``n_timesteps · D_te``, 1280·50) or the time MLP's weights (grid: 2,048,000 for SD-v1.5;
    ``n_timesteps`` is not used). On a UNet with its time layers."""
    _check_mode(mode)
    if mode == "scheduler" and not per_resnet_cache(unet):
        return n_timesteps * time_embedding_dim(unet)
    if mode == "scheduler":
        return n_timesteps * sum(time_feature_dims(unet).values())
    return sum(unet.get_parameter(n).numel() for n in time_mlp_weight_names(unet))


def scheduler_timesteps(scheduler, num_inference_steps: int) -> list[float]:
    """``unique_timesteps`` of a diffusers scheduler after ``set_timesteps(num_inference_steps)``
    (on a copy: the scheduler passed in is not changed).

    Raises:
        InputError: ``num_inference_steps`` is not in 1..num_train_timesteps.
    """
    n_train = int(scheduler.config.num_train_timesteps)
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= n_train:
        raise InputError(f"sampler steps must be an integer in 1..{n_train} (the scheduler's training timesteps), "
                         f"got {num_inference_steps!r}")  # fmt: skip
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(num_inference_steps)
    return unique_timesteps(sched.timesteps)


def check_cached_steps(cached: Sequence[float], scheduler, steps: int, cached_steps: int | None = None) -> None:
    """Raise :class:`InputError` unless every timestep ``scheduler`` visits in ``steps`` steps is in a
    scheduler-mode cache holding ``cached`` (made for ``cached_steps`` steps of that scheduler): the
    check that lets a command refuse a step count up front instead of failing mid-sampling."""
    missing = set(scheduler_timesteps(scheduler, steps)) - {float(t) for t in cached}
    if missing:
        made_for = f"{type(scheduler).__name__} at {cached_steps} steps" if cached_steps else f"{len(cached)} timesteps"
        use = f"use --steps {cached_steps}" if cached_steps else f"use the step count it was made for ({len(cached)})"
        raise InputError(
            f"this file's time cache (scheduler mode) holds the time features of {made_for} only, so it cannot sample "
            f"{steps} steps: {use}, or make a file for any step count with `bfq quantize ... --time-cache grid`"
        )


def time_cache_mode(unet: nn.Module) -> str | None:
    """"scheduler" or "grid" when a cache is installed, else None."""
    for m in unet.modules():
        if isinstance(m, _GridTimeEmbedding):
            return "grid"
        if isinstance(m, (_TimeEmbeddingPlaceholder, _CachedTimeEmbedding, _CachedAdaLNSingle)):
            return "scheduler"
    return None


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"time cache mode must be one of {MODES}, got {mode!r}")


def _refuse_if_unsupported(unet: nn.Module, mode: str) -> None:
    if time_cache_mode(unet) is not None:
        raise ValueError(f"a {time_cache_mode(unet)} time cache is already installed on this UNet")
    if _adaln(unet):
        if not isinstance(getattr(unet, "adaln_single", None), nn.Module):
            raise ValueError("this model has no adaln_single to cache")
        return
    te = getattr(unet, "time_embedding", None)
    if te is None or not hasattr(te, "linear_2"):
        raise ValueError("this UNet has no diffusers TimestepEmbedding `time_embedding` to cache")
    if getattr(te, "cond_proj", None) is not None:
        raise ValueError("time caching does not support `timestep_cond` (time_embedding.cond_proj)")
    if mode == "scheduler" and per_resnet_cache(unet):
        extra = [n for n in ("class_embedding", "add_embedding") if getattr(unet, n, None) is not None]
        if extra:
            raise ValueError(
                f"scheduler time cache refused: this UNet adds {', '.join(extra)} to the time embedding "
                "before the resnets, so per-resnet features cannot be pre-computed; use the grid mode"
            )
        if not resnets_with_time_proj(unet):
            raise ValueError("this UNet has no ResnetBlock2D with time_emb_proj to cache")


def _refuse_per_resnet_if_conditioned(unet: nn.Module) -> None:
    if not per_resnet_cache(unet):
        what = "per-ResNet time features" if not _adaln(unet) else "adaln_single features"
        raise ValueError(
            f"{what} refused: a {family_of(unet).title} model's time features depend on its "
            "conditioning too (size conditions); its scheduler cache holds the time embedding only (compute_embedding_table)"
        )


# --------------------------------------------------------------------------- compute and install


def _float_copy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).float()


def _embeddings(unet: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """float32 ``time_embedding(time_proj(t))`` (t float64 [T]) computed on a float32 copy (the
    family's modules: PixArt's ``adaln_single.emb.timestep_embedder(time_proj(t))``)."""
    family = family_of(unet)
    mlp = unet.get_submodule(family.time_mlp_module)
    device = next(mlp.parameters()).device
    t_emb = unet.get_submodule(family.time_proj_module)(t.to(device)).to(torch.float32)
    return _float_copy(mlp)(t_emb)


def _adaln_features(unet: nn.Module, ts: torch.Tensor) -> dict[str, torch.Tensor]:
    """fp16 adaLN-single outputs for timesteps ``ts``: the embedded timestep ``emb(t)`` [T, D] and the
    modulation vector ``linear(silu(emb(t)))`` [T, 6D], in float32 on copies."""
    emb = _embeddings(unet, ts)
    ada = unet.adaln_single
    linear = _float_copy(ada.linear)(ada.silu(emb))
    return {"adaln_single.linear": linear.to(torch.float16).cpu(), "adaln_single.emb": emb.to(torch.float16).cpu()}


@torch.no_grad()
def compute_scheduler_features(unet: nn.Module, timesteps) -> dict[str, torch.Tensor]:
    """fp16 features ``{resnet name: [T, D]}`` for ``unique_timesteps(timesteps)``, in that order.

    Computed in float32 on copies of the time layers (the UNet is not changed), on its device.
    """
    _refuse_if_unsupported(unet, "scheduler")
    _refuse_per_resnet_if_conditioned(unet)
    ts = torch.tensor(unique_timesteps(timesteps), dtype=torch.float64)
    if _adaln(unet):
        return _adaln_features(unet, ts)
    emb = _embeddings(unet, ts)
    if getattr(unet, "time_embed_act", None) is not None:
        emb = unet.time_embed_act(emb)
    out = {}
    for name, r in resnets_with_time_proj(unet):
        x = emb if getattr(r, "skip_time_act", False) else r.nonlinearity(emb)
        out[name] = _float_copy(r.time_emb_proj)(x).to(torch.float16).cpu()
    return out


@torch.no_grad()
def compute_embedding_table(unet: nn.Module, timesteps) -> torch.Tensor:
    """fp16 ``[T, D_te]`` rows ``time_embedding(time_proj(t))`` for ``unique_timesteps(timesteps)``:
    the scheduler cache of a model whose time features also depend on the conditioning (SDXL)."""
    _refuse_if_unsupported(unet, "scheduler")
    ts = torch.tensor(unique_timesteps(timesteps), dtype=torch.float64)
    return _embeddings(unet, ts).to(torch.float16).cpu()


@torch.no_grad()
def compute_grid_table(unet: nn.Module, num_train_timesteps: int = 1000) -> torch.Tensor:
    """fp16 ``[num_train_timesteps, D_te]`` table of ``time_embedding(time_proj(t))``, t = 0..N-1."""
    _refuse_if_unsupported(unet, "grid")
    if num_train_timesteps < 1:
        raise ValueError("num_train_timesteps must be >= 1")
    ts = torch.arange(num_train_timesteps, dtype=torch.float64)
    return _embeddings(unet, ts).to(torch.float16).cpu()


def _stored_table(table, what: str) -> torch.Tensor:
    """``table`` (torch or numpy) as a tensor of its own floating-point precision: a loader keeps
    the stored values (FORMAT.md §2.3); a row is cast to the model's dtype only where it is used."""
    tensor = table.detach().clone() if isinstance(table, torch.Tensor) else torch.from_numpy(np.array(table))  # a copy
    if not tensor.is_floating_point():
        raise ValueError(f"{what}: expected floating-point values, got {tensor.dtype}")
    return tensor


def _buffer_device(unet: nn.Module) -> torch.device:
    """The UNet's device; CPU for a model built on the meta device (a loader assigns weights later)."""
    device = next(unet.parameters()).device
    return torch.device("cpu") if device.type == "meta" else device


def _install_state(unet: nn.Module, state: _TimeState) -> None:
    state.bind(type(unet).forward)
    unet.register_forward_pre_hook(state.pre_hook, with_kwargs=True)


@torch.no_grad()
def time_mlp_weights(unet: nn.Module) -> dict[str, torch.Tensor]:
    """fp16 copies (CPU) of the time MLP's Linear weights, what grid mode stores in the file."""
    _refuse_if_unsupported(unet, "grid")
    return {n: unet.get_parameter(n).detach().to("cpu", torch.float16) for n in time_mlp_weight_names(unet)}


def build_cache(unet: nn.Module, mode: str | None, scheduler=None, steps: int = 50) -> dict | None:
    """The ``time_cache`` argument of :func:`bfq.pipeline.export.export_unet`, computed from ``unet``'s own
    (frozen, float) time layers: ``scheduler`` mode, a table per resnet for ``scheduler``'s ``steps``
    timesteps (or ``{"time_embedding": table}`` when the time features also depend on the
    conditioning: :func:`per_resnet_cache`); ``grid`` mode, ``{"mode": "mlp", "tables": time_mlp_weights(unet)}`` (the time MLP's
    weights, written as fp16 dense tensors under their own names); None for no cache."""
    if mode is None or mode == "none":
        return None
    if mode == "scheduler":
        if scheduler is None:
            raise ValueError("the scheduler time cache needs the scheduler (its timesteps); use 'grid'")
        from bfq.quant.nn import iter_quantized

        ts = scheduler_timesteps(scheduler, steps)
        if not per_resnet_cache(unet):
            return {"mode": mode, "timesteps": ts, "tables": {"time_embedding": compute_embedding_table(unet, ts).numpy()}}
        quantized_proj = [n for n, _ in iter_quantized(unet) if n.endswith("time_emb_proj.weight")
                          or family_of(unet).replaced_by_time_cache(n, mode, dict(unet.config))]
        if quantized_proj:
            raise ValueError(f"the scheduler time cache removes {quantized_proj[0]}, but it is quantized; use 'grid'")
        tables = compute_scheduler_features(unet, ts)
        return {"mode": mode, "timesteps": ts, "tables": {k: v.numpy() for k, v in tables.items()}}
    if mode != "grid":
        raise ValueError(f"time cache mode must be 'scheduler', 'grid' or None, got {mode!r}")
    return {"mode": "mlp", "tables": {k: v.numpy() for k, v in time_mlp_weights(unet).items()}}


def install_scheduler_cache(unet: nn.Module, timesteps, features) -> nn.Module:
    """Delete ``time_embedding`` and every ``time_emb_proj``; serve ``features`` instead. In place.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (time layers still present).
        timesteps: the timesteps the features were computed for (duplicates are dropped the same
            way as in :func:`compute_scheduler_features`).
        features: ``{resnet name: [T, D]}`` (floating-point torch or numpy arrays; kept in their own
            precision, as buffers on the UNet's device).

    Raises:
        ValueError: unsupported model, or features that do not match the resnets, T or D.
    """
    _refuse_if_unsupported(unet, "scheduler")
    _refuse_per_resnet_if_conditioned(unet)
    ts = unique_timesteps(timesteps)
    if _adaln(unet):
        return _install_adaln_cache(unet, ts, features)
    resnets = resnets_with_time_proj(unet)
    names = [n for n, _ in resnets]
    missing, unknown = sorted(set(names) - set(features)), sorted(set(features) - set(names))
    if missing or unknown:
        raise ValueError(f"time features do not match the UNet: missing {missing[:5]}, unknown {unknown[:5]}")
    device = _buffer_device(unet)
    tensors = {}
    for name, r in resnets:
        f = _stored_table(features[name], f"time features of {name}")
        want = (len(ts), r.time_emb_proj.out_features)
        if tuple(f.shape) != want:
            raise ValueError(f"time features of {name}: shape {tuple(f.shape)}, expected {want}")
        tensors[name] = f.to(device)
    state = _TimeState(ts)
    for name, r in resnets:
        r.time_emb_proj = _CachedTimeFeatures(state, tensors[name])
    unet.time_embedding = _TimeEmbeddingPlaceholder(state)
    _install_state(unet, state)
    return unet


def _install_adaln_cache(unet: nn.Module, ts: list[float], features) -> nn.Module:
    """Replace ``adaln_single`` by the cached rows of its two outputs (FORMAT.md §2.3.2)."""
    dims = time_feature_dims(unet)
    missing, unknown = sorted(set(dims) - set(features)), sorted(set(features) - set(dims))
    if missing or unknown:
        raise ValueError(f"time features do not match the model: missing {missing}, unknown {unknown[:5]}")
    device = _buffer_device(unet)
    tensors = {}
    for key, width in dims.items():
        f = _stored_table(features[key], f"time features of {key}")
        if tuple(f.shape) != (len(ts), width):
            raise ValueError(f"time features of {key}: shape {tuple(f.shape)}, expected {(len(ts), width)}")
        tensors[key] = f.to(device)
    state = _TimeState(ts)
    unet.adaln_single = _CachedAdaLNSingle(state, tensors["adaln_single.linear"], tensors["adaln_single.emb"])
    _install_state(unet, state)
    return unet


def install_embedding_cache(unet: nn.Module, timesteps, table) -> nn.Module:
    """Replace ``time_embedding`` by the cached rows ``table`` (``[T, D_te]``, kept in its own
    precision) for exactly ``timesteps``; ``time_emb_proj`` and what the model adds to the embedding
    stay. In place. For the families whose time features also depend on the conditioning (SDXL).

    Raises:
        ValueError: a model with per-ResNet scheduler caches, or a table that does not match T or D_te.
    """
    if per_resnet_cache(unet):
        raise ValueError("this model's scheduler time cache holds per-ResNet features, not the embedding")
    _refuse_if_unsupported(unet, "scheduler")
    ts = unique_timesteps(timesteps)
    tab = _stored_table(table, "time embedding table")
    want = (len(ts), time_embedding_dim(unet))
    if tuple(tab.shape) != want:
        raise ValueError(f"time embedding table: shape {tuple(tab.shape)}, expected {want}")
    state = _TimeState(ts)
    _set_module(unet, _time_mlp_path(unet), _CachedTimeEmbedding(state, tab.to(_buffer_device(unet))))
    _install_state(unet, state)
    return unet


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def install_grid_cache(unet: nn.Module, table) -> nn.Module:
    """Replace ``time_embedding`` by a lookup in ``table`` (``[N, D_te]``, floating point, kept in
    its own precision). In place. Reads version-1 grid files; bfq's grid mode now keeps the time MLP."""
    _refuse_if_unsupported(unet, "grid")
    if _adaln(unet):
        raise ValueError("grid time tables are not defined for adaLN-single models (FORMAT.md §2.3.2): grid mode keeps "
                         "the timestep MLP")  # fmt: skip
    tab = _stored_table(table, "time table")
    want = time_embedding_dim(unet)
    if tab.ndim != 2 or tab.shape[1] != want or tab.shape[0] < 1:
        raise ValueError(f"time table has shape {tuple(tab.shape)}, expected [N, {want}]")
    state = _TimeState()
    unet.time_embedding = _GridTimeEmbedding(state, tab.to(_buffer_device(unet)))
    _install_state(unet, state)
    return unet
