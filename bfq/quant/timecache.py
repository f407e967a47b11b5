"""Time-feature cache (BitsFusion §4.1): replace the UNet's time MLPs by pre-computed features.

Two modes:

* **scheduler** (the paper): for each ``ResnetBlock2D`` with a ``time_emb_proj``, store
  ``F[t] = time_emb_proj(silu(time_embedding(time_proj(t))))`` in fp16 for exactly the sampler's
  timesteps. :func:`install_scheduler_cache` deletes ``time_embedding`` and every ``time_emb_proj``
  (no weights remain) and makes each resnet read its row for the current timestep. Other timesteps
  raise ``ValueError``. Models whose time embedding is mixed with anything else before the resnets
  (class embeddings, ``add_embedding``, ``timestep_cond``) are refused.
* **grid**: store ``E[t] = time_embedding(time_proj(t))`` in fp16 for ``t = 0 .. N-1`` (the scheduler's
  ``num_train_timesteps``). :func:`install_grid_cache` deletes only ``time_embedding``; the
  ``time_emb_proj`` layers stay (and are quantized by the recipe), so any scheduler works. Fractional
  timesteps are linearly interpolated between the two neighbouring rows (exact at integers).

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
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from bfq.errors import InputError

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


def time_layer_names(unet: nn.Module) -> list[str]:
    """State-dict weight names of the time MLP (``time_embedding.*`` Linear layers, e.g. ``linear_1``,
    ``linear_2``) and of every resnet's ``time_emb_proj``, in module order."""
    names = []
    for name, m in unet.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        if name.startswith("time_embedding.") or name.endswith(".time_emb_proj") or name == "time_emb_proj":
            names.append(f"{name}.weight")
    return names


def time_feature_dims(unet: nn.Module) -> dict[str, int]:
    """``{resnet name: D}`` where D is the width of that resnet's cached feature (scheduler mode)."""
    out = {}
    for name, r in resnets_with_time_proj(unet):
        proj = r.time_emb_proj
        out[name] = proj.features.shape[1] if isinstance(proj, _CachedTimeFeatures) else proj.out_features
    return out


def time_embedding_dim(unet: nn.Module) -> int:
    """Width of ``time_embedding``'s output (1280 for SD-v1.5)."""
    te = unet.time_embedding
    if isinstance(te, _GridTimeEmbedding):
        return te.table.shape[1]
    return te.linear_2.out_features


def n_time_features(unet: nn.Module, mode: str, n_timesteps: int) -> int:
    """N_tf, the number of cached fp16 values: ``n_timesteps · ΣD`` (scheduler; 20,160·50 for SD-v1.5
    at 50 steps) or ``n_timesteps · D_te`` (grid; n_timesteps = num_train_timesteps)."""
    _check_mode(mode)
    if mode == "scheduler":
        return n_timesteps * sum(time_feature_dims(unet).values())
    return n_timesteps * time_embedding_dim(unet)


def unique_timesteps(timesteps: Iterable | torch.Tensor | np.ndarray) -> list[float]:
    """The distinct timesteps in first-seen order, as Python floats (PNDM's 51 steps give 50)."""
    if isinstance(timesteps, (torch.Tensor, np.ndarray)):
        timesteps = np.asarray(torch.as_tensor(timesteps).detach().cpu().double()).reshape(-1).tolist()
    out, seen = [], set()
    for t in timesteps:
        t = float(t)
        if not np.isfinite(t):
            raise ValueError(f"timesteps must be finite, got {t}")
        if t not in seen:
            seen.add(t)
            out.append(t)
    if not out:
        raise ValueError("no timesteps given")
    return out


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
    te = getattr(unet, "time_embedding", None)
    if isinstance(te, _GridTimeEmbedding):
        return "grid"
    if isinstance(te, _TimeEmbeddingPlaceholder):
        return "scheduler"
    return None


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"time cache mode must be one of {MODES}, got {mode!r}")


def _summary(values: Sequence[float], limit: int = 8) -> str:
    txt = ", ".join(f"{v:g}" for v in values[:limit])
    return f"[{txt}, ... ({len(values)} in all)]" if len(values) > limit else f"[{txt}]"


def _refuse_if_unsupported(unet: nn.Module, mode: str) -> None:
    if time_cache_mode(unet) is not None:
        raise ValueError(f"a {time_cache_mode(unet)} time cache is already installed on this UNet")
    te = getattr(unet, "time_embedding", None)
    if te is None or not hasattr(te, "linear_2"):
        raise ValueError("this UNet has no diffusers TimestepEmbedding `time_embedding` to cache")
    if getattr(te, "cond_proj", None) is not None:
        raise ValueError("time caching does not support `timestep_cond` (time_embedding.cond_proj)")
    if mode == "scheduler":
        extra = [n for n in ("class_embedding", "add_embedding") if getattr(unet, n, None) is not None]
        if extra:
            raise ValueError(
                f"scheduler time cache refused: this UNet adds {', '.join(extra)} to the time embedding "
                "before the resnets, so per-resnet features cannot be pre-computed; use the grid mode"
            )
        if not resnets_with_time_proj(unet):
            raise ValueError("this UNet has no ResnetBlock2D with time_emb_proj to cache")


# ------------------------------------------------------------------------------ runtime modules


class _TimeState:
    """Per-UNet state shared by the replaced modules: the exact timesteps of the current call."""

    def __init__(self, keys: Sequence[float] | None = None):
        self.t: torch.Tensor | None = None  # float64 [B], CPU
        self.keys = None if keys is None else torch.tensor(list(keys), dtype=torch.float64)
        self._rows: torch.Tensor | None = None
        self._rows_on: dict = {}

    def pre_hook(self, module, args, kwargs):
        sample = kwargs["sample"] if "sample" in kwargs else args[0]
        timestep = kwargs["timestep"] if "timestep" in kwargs else (args[1] if len(args) > 1 else None)
        if timestep is None:
            raise ValueError("the UNet was called without a timestep")
        t = torch.as_tensor(timestep).detach().to("cpu", torch.float64).reshape(-1)
        batch = sample.shape[0]
        if t.numel() not in (1, batch):
            raise ValueError(f"{t.numel()} timesteps for a batch of {batch}")
        self.t = t.expand(batch).contiguous()
        self._rows, self._rows_on = None, {}
        if self.keys is not None:
            match = self.t[:, None] == self.keys[None, :]
            found = match.any(1)
            if not bool(found.all()):
                missing = unique_timesteps(self.t[~found])
                raise ValueError(
                    f"timestep(s) {_summary(missing)} are not in the time-feature cache; "
                    f"cached timesteps: {_summary(self.keys.tolist())}. Rebuild the cache for this "
                    "scheduler and step count, or use the grid time cache"
                )
            self._rows = match.to(torch.int8).argmax(1)

    def current(self) -> torch.Tensor:
        if self.t is None:
            raise RuntimeError("time cache used outside a UNet forward call")
        return self.t

    def rows(self, device: torch.device) -> torch.Tensor:
        self.current()
        key = str(device)
        if key not in self._rows_on:
            self._rows_on[key] = self._rows.to(device)
        return self._rows_on[key]


class _TimeEmbeddingPlaceholder(nn.Module):
    """Scheduler mode's ``time_embedding``: no weights, returns an empty ``[B, 0]`` embedding."""

    def __init__(self, state: _TimeState):
        super().__init__()
        self._state = state

    def forward(self, sample: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if condition is not None:
            raise ValueError("timestep_cond is not supported with a time-feature cache")
        return sample[:, :0]


class _CachedTimeFeatures(nn.Module):
    """Scheduler mode's ``time_emb_proj``: returns the cached fp16 row of each batch element."""

    def __init__(self, state: _TimeState, features: torch.Tensor):
        super().__init__()
        self._state = state
        self.register_buffer("features", features)

    def forward(self, temb: torch.Tensor) -> torch.Tensor:
        rows = self._state.rows(self.features.device)
        if rows.shape[0] != temb.shape[0]:
            raise RuntimeError(f"time cache: batch {temb.shape[0]} but {rows.shape[0]} timesteps recorded")
        return self.features.index_select(0, rows).to(temb.dtype)

    def extra_repr(self) -> str:
        return f"timesteps={self.features.shape[0]}, dim={self.features.shape[1]}"


class _GridTimeEmbedding(nn.Module):
    """Grid mode's ``time_embedding``: rows of an fp16 table, linearly interpolated at fractional t."""

    def __init__(self, state: _TimeState, table: torch.Tensor):
        super().__init__()
        self._state = state
        self.register_buffer("table", table)

    def forward(self, sample: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if condition is not None:
            raise ValueError("timestep_cond is not supported with a time-feature cache")
        t = self._state.current()
        n = self.table.shape[0]
        if bool(((t < 0) | (t > n - 1)).any()):
            raise ValueError(f"timestep(s) {_summary(unique_timesteps(t))} outside the cached grid 0..{n - 1}")
        i0 = t.floor().clamp(max=max(n - 2, 0))
        frac = (t - i0).to(torch.float32)[:, None].to(self.table.device)
        i0 = i0.long().to(self.table.device)
        i1 = (i0 + 1).clamp(max=n - 1)
        lo, hi = self.table.index_select(0, i0).float(), self.table.index_select(0, i1).float()
        return (lo * (1 - frac) + hi * frac).to(sample.dtype)

    def extra_repr(self) -> str:
        return f"grid={self.table.shape[0]}, dim={self.table.shape[1]}"


# --------------------------------------------------------------------------- compute and install


def _float_copy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).float()


def _embeddings(unet: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """float32 ``time_embedding(time_proj(t))`` (t float64 [T]) computed on a float32 copy."""
    device = next(unet.time_embedding.parameters()).device
    t_emb = unet.time_proj(t.to(device)).to(torch.float32)
    return _float_copy(unet.time_embedding)(t_emb)


@torch.no_grad()
def compute_scheduler_features(unet: nn.Module, timesteps) -> dict[str, torch.Tensor]:
    """fp16 features ``{resnet name: [T, D]}`` for ``unique_timesteps(timesteps)``, in that order.

    Computed in float32 on copies of the time layers (the UNet is not changed), on its device.
    """
    _refuse_if_unsupported(unet, "scheduler")
    ts = torch.tensor(unique_timesteps(timesteps), dtype=torch.float64)
    emb = _embeddings(unet, ts)
    if getattr(unet, "time_embed_act", None) is not None:
        emb = unet.time_embed_act(emb)
    out = {}
    for name, r in resnets_with_time_proj(unet):
        x = emb if getattr(r, "skip_time_act", False) else r.nonlinearity(emb)
        out[name] = _float_copy(r.time_emb_proj)(x).to(torch.float16).cpu()
    return out


@torch.no_grad()
def compute_grid_table(unet: nn.Module, num_train_timesteps: int = 1000) -> torch.Tensor:
    """fp16 ``[num_train_timesteps, D_te]`` table of ``time_embedding(time_proj(t))``, t = 0..N-1."""
    _refuse_if_unsupported(unet, "grid")
    if num_train_timesteps < 1:
        raise ValueError("num_train_timesteps must be >= 1")
    ts = torch.arange(num_train_timesteps, dtype=torch.float64)
    return _embeddings(unet, ts).to(torch.float16).cpu()


def _buffer_device(unet: nn.Module) -> torch.device:
    """The UNet's device; CPU for a model built on the meta device (a loader assigns weights later)."""
    device = next(unet.parameters()).device
    return torch.device("cpu") if device.type == "meta" else device


def _install_state(unet: nn.Module, state: _TimeState) -> None:
    unet.register_forward_pre_hook(state.pre_hook, with_kwargs=True)


def build_cache(unet: nn.Module, mode: str | None, scheduler=None, steps: int = 50) -> dict | None:
    """The ``time_cache`` argument of :func:`bfq.pipeline.export.export_unet`, computed from ``unet``'s own
    (frozen, float) time layers: ``scheduler`` mode for ``scheduler``'s ``steps`` timesteps, or
    ``grid`` over its ``num_train_timesteps`` (1000 without a scheduler); None for no cache."""
    if mode is None or mode == "none":
        return None
    if mode == "scheduler":
        if scheduler is None:
            raise ValueError("the scheduler time cache needs the scheduler (its timesteps); use 'grid'")
        from bfq.quant.nn import iter_quantized

        quantized_proj = [n for n, _ in iter_quantized(unet) if n.endswith("time_emb_proj.weight")]
        if quantized_proj:
            raise ValueError(f"the scheduler time cache removes time_emb_proj, but {quantized_proj[0]} is quantized; use 'grid'")
        ts = scheduler_timesteps(scheduler, steps)
        tables = compute_scheduler_features(unet, ts)
        return {"mode": mode, "timesteps": ts, "tables": {k: v.numpy() for k, v in tables.items()}}
    if mode != "grid":
        raise ValueError(f"time cache mode must be 'scheduler', 'grid' or None, got {mode!r}")
    n_train = int(scheduler.config.num_train_timesteps) if scheduler is not None else 1000
    table = compute_grid_table(unet, n_train)
    return {"mode": mode, "timesteps": list(range(n_train)), "tables": {"time_embedding": table.numpy()}}


def install_scheduler_cache(unet: nn.Module, timesteps, features) -> nn.Module:
    """Delete ``time_embedding`` and every ``time_emb_proj``; serve ``features`` instead. In place.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (time layers still present).
        timesteps: the timesteps the features were computed for (duplicates are dropped the same
            way as in :func:`compute_scheduler_features`).
        features: ``{resnet name: [T, D]}`` (torch or numpy; stored as fp16 buffers on the UNet's device).

    Raises:
        ValueError: unsupported model, or features that do not match the resnets, T or D.
    """
    _refuse_if_unsupported(unet, "scheduler")
    ts = unique_timesteps(timesteps)
    resnets = resnets_with_time_proj(unet)
    names = [n for n, _ in resnets]
    missing, unknown = sorted(set(names) - set(features)), sorted(set(features) - set(names))
    if missing or unknown:
        raise ValueError(f"time features do not match the UNet: missing {missing[:5]}, unknown {unknown[:5]}")
    device = _buffer_device(unet)
    tensors = {}
    for name, r in resnets:
        f = features[name]
        f = f if isinstance(f, torch.Tensor) else torch.tensor(np.asarray(f))  # copies read-only arrays
        want = (len(ts), r.time_emb_proj.out_features)
        if tuple(f.shape) != want:
            raise ValueError(f"time features of {name}: shape {tuple(f.shape)}, expected {want}")
        tensors[name] = f.detach().to(device, torch.float16)
    state = _TimeState(ts)
    for name, r in resnets:
        r.time_emb_proj = _CachedTimeFeatures(state, tensors[name])
    unet.time_embedding = _TimeEmbeddingPlaceholder(state)
    _install_state(unet, state)
    return unet


def install_grid_cache(unet: nn.Module, table) -> nn.Module:
    """Replace ``time_embedding`` by a lookup in ``table`` (``[N, D_te]``, stored fp16). In place."""
    _refuse_if_unsupported(unet, "grid")
    tab = table if isinstance(table, torch.Tensor) else torch.tensor(np.asarray(table))
    want = time_embedding_dim(unet)
    if tab.ndim != 2 or tab.shape[1] != want or tab.shape[0] < 1:
        raise ValueError(f"time table has shape {tuple(tab.shape)}, expected [N, {want}]")
    device = _buffer_device(unet)
    state = _TimeState()
    unet.time_embedding = _GridTimeEmbedding(state, tab.detach().to(device, torch.float16))
    _install_state(unet, state)
    return unet
