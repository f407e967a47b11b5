"""The weight-free modules a time cache installs in a UNet (see :mod:`bfq.quant.timecache`) and the
timestep bookkeeping they share: a forward pre-hook records the exact timestep(s) of each call."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn


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


def _summary(values: Sequence[float], limit: int = 8) -> str:
    txt = ", ".join(f"{v:g}" for v in values[:limit])
    return f"[{txt}, ... ({len(values)} in all)]" if len(values) > limit else f"[{txt}]"



class _TimeState:
    """Per-UNet state shared by the replaced modules: the exact timesteps of the current call."""

    def __init__(self, keys: Sequence[float] | None = None):
        self.t: torch.Tensor | None = None  # float64 [B], CPU
        self.keys = None if keys is None else torch.tensor(list(keys), dtype=torch.float64)
        self._cached = None if keys is None else _summary(list(keys))
        self._rows: torch.Tensor | None = None
        self._rows_on: dict = {}

    sample_arg, timestep_index = "sample", 1  # UNet2DConditionModel.forward(sample, timestep, ...)

    def bind(self, forward) -> None:
        """Read the sample and timestep arguments where ``forward`` (the model class's) takes them:
        ``PixArtTransformer2DModel.forward(hidden_states, encoder_hidden_states, timestep, ...)``."""
        names = list(inspect.signature(forward).parameters)[1:]  # without self
        self.sample_arg, self.timestep_index = names[0], names.index("timestep")

    def pre_hook(self, module, args, kwargs):
        sample = kwargs[self.sample_arg] if self.sample_arg in kwargs else args[0]
        i = self.timestep_index
        timestep = kwargs["timestep"] if "timestep" in kwargs else (args[i] if len(args) > i else None)
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
            if torch.compiler.is_compiling():  # no data-dependent branch: the graph checks it when it runs
                torch._assert_async(found.all(), self._missing_message("a timestep is"))
            elif not bool(found.all()):
                raise ValueError(self._missing_message(f"timestep(s) {_summary(unique_timesteps(self.t[~found]))} are"))
            self._rows = match.to(torch.int8).argmax(1)

    def _missing_message(self, what: str) -> str:
        return (f"{what} not in the time-feature cache; cached timesteps: {self._cached}. "
                "Rebuild the cache for this scheduler and step count, or use the grid time cache")  # fmt: skip

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


class _CachedTimeEmbedding(nn.Module):
    """Scheduler mode's ``time_embedding`` for models whose time features also depend on the
    conditioning (FORMAT.md §2.3.1): the cached fp16 row ``time_embedding(time_proj(t))`` of each
    batch element's timestep; what the model adds to it (SDXL's ``add_embedding``) runs live."""

    def __init__(self, state: _TimeState, table: torch.Tensor):
        super().__init__()
        self._state = state
        self.register_buffer("table", table)

    def forward(self, sample: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if condition is not None:
            raise ValueError("timestep_cond is not supported with a time-feature cache")
        rows = self._state.rows(self.table.device)
        if rows.shape[0] != sample.shape[0]:
            raise RuntimeError(f"time cache: batch {sample.shape[0]} but {rows.shape[0]} timesteps recorded")
        return self.table.index_select(0, rows).to(sample.dtype)

    def extra_repr(self) -> str:
        return f"timesteps={self.table.shape[0]}, dim={self.table.shape[1]}"


class _CachedAdaLNSingle(nn.Module):
    """Scheduler mode's ``adaln_single`` of a diffusion transformer without size conditions (FORMAT.md
    §2.3.2): the cached rows of its two outputs for each batch element's timestep, the modulation
    vector ``linear(silu(emb(t)))`` [B, 6D] and the embedded timestep ``emb(t)`` [B, D], cast to the
    model's hidden dtype. Its buffers ``linear.features`` and ``emb.features`` are named after the
    modules whose outputs they hold."""

    def __init__(self, state: _TimeState, linear: torch.Tensor, emb: torch.Tensor):
        super().__init__()
        self._state = state
        self.linear = _CachedTimeFeatures(state, linear)
        self.emb = _CachedTimeFeatures(state, emb)

    def forward(self, timestep, added_cond_kwargs=None, batch_size=None, hidden_dtype=None):
        batch = self._state.current().shape[0] if batch_size is None else batch_size
        like = self.emb.features.new_empty((batch, 0), dtype=hidden_dtype or torch.float32)
        return self.linear(like), self.emb(like)


class _GridTimeEmbedding(nn.Module):
    """Grid mode's ``time_embedding`` (bfq 0.1 files): rows of a table, linearly interpolated at fractional t."""

    def __init__(self, state: _TimeState, table: torch.Tensor):
        super().__init__()
        self._state = state
        self.register_buffer("table", table)

    def forward(self, sample: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if condition is not None:
            raise ValueError("timestep_cond is not supported with a time-feature cache")
        t = self._state.current()
        n = self.table.shape[0]
        outside = ((t < 0) | (t > n - 1)).any()
        if torch.compiler.is_compiling():  # no data-dependent branch: the graph checks it when it runs
            torch._assert_async(~outside, f"a timestep outside the cached grid 0..{n - 1}")
        elif bool(outside):
            raise ValueError(f"timestep(s) {_summary(unique_timesteps(t))} outside the cached grid 0..{n - 1}")
        i0 = t.floor().clamp(max=max(n - 2, 0))
        frac = (t - i0).to(torch.float32)[:, None].to(self.table.device)
        i0 = i0.long().to(self.table.device)
        i1 = (i0 + 1).clamp(max=n - 1)
        lo, hi = self.table.index_select(0, i0).float(), self.table.index_select(0, i1).float()
        return (lo * (1 - frac) + hi * frac).to(sample.dtype)

    def extra_repr(self) -> str:
        return f"grid={self.table.shape[0]}, dim={self.table.shape[1]}"
