"""Load a .bfq file as a ready diffusers model.

The model is built from the stored config on the meta device (no random fp32 weights are ever
materialized), each quantized layer is decoded straight into its final tensor in the target
dtype, the cached time features are installed, and the result drops into
`StableDiffusionPipeline.from_pretrained(base, unet=unet)`.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from bfq.errors import BfqFormatError
from bfq.format import BfqFile, open_bfq

_DECODE_AS = {torch.float32: ("float32", torch.float32), torch.float16: ("float16", torch.int16), torch.bfloat16: ("bfloat16", torch.int16)}


def load_unet(
    source: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float16,
    verify: bool = True,
    revision: str | None = None,
) -> nn.Module:
    """Build the diffusers model stored in a .bfq file.

    Args:
        source: a local .bfq path, or a Hub repo id ("user/name", optionally with a file name
            "user/name/model.bfq") fetched through huggingface_hub.
        device: where the returned model lives.
        dtype: torch.float16 (default), torch.bfloat16 or torch.float32.
        verify: also check each code block's CRC-32 while decoding (cheap; on by default); scales,
            dense tensors and time tables are checked either way (FORMAT.md §3.1).
        revision: Hub revision (branch, tag or commit) when `source` is a repo id.

    Raises:
        BfqFormatError: the file is not a valid .bfq, or does not fit the model its config builds.
    """
    if dtype not in _DECODE_AS:
        raise ValueError(f"dtype must be one of {list(_DECODE_AS)}, got {dtype}")
    path = _resolve(source, revision)
    with open_bfq(path, verify=verify) as bfq:
        model = _empty_model(bfq)
        _install_time_cache(model, bfq, dtype)
        tensors = _decode_all(bfq, dtype)
    _assign(model, tensors)
    return model.to(device).eval()


def _resolve(source, revision) -> str:
    if os.path.exists(source):
        return os.fspath(source)
    from bfq.download import download_bfq

    return download_bfq(str(source), revision=revision)


def _empty_model(bfq: BfqFile) -> nn.Module:
    import diffusers
    from diffusers import ModelMixin

    class_name = bfq.header.model["class_name"]
    cls = getattr(diffusers, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, ModelMixin)):
        raise BfqFormatError(f"model.class_name: {class_name!r} is not a diffusers model class")
    config = {k: v for k, v in bfq.header.model["config"].items() if not k.startswith("_")}
    try:
        with torch.device("meta"):
            return cls.from_config(config)
    except Exception as exc:  # diffusers raises many types for a config it cannot build
        raise BfqFormatError(f"model.config: cannot build {class_name} from it ({exc})") from None


def _install_time_cache(model: nn.Module, bfq: BfqFile, dtype: torch.dtype) -> None:
    cache = bfq.header.time_cache
    if cache is None:
        return
    from bfq.quant import timecache

    tables = {name: _as_torch(bfq.read_time_table(name), table.dtype) for name, table in cache.tables.items()}
    try:
        if cache.mode == "scheduler":
            timecache.install_scheduler_cache(model, list(cache.timesteps), tables)
        else:
            timecache.install_grid_cache(model, tables["time_embedding"])
    except (KeyError, AttributeError, ValueError) as exc:
        raise BfqFormatError(f"time_cache: does not fit the model ({exc})") from None


def _decode_all(bfq: BfqFile, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    decode_as, view_as = _DECODE_AS[dtype]
    out = {name: torch.empty(layer.shape, dtype=dtype) for name, layer in bfq.layers.items()}
    bfq.decode_layers({name: t.view(view_as).numpy() for name, t in out.items()}, decode_as)
    for name, dense in bfq.tensors.items():
        out[name] = _as_torch(bfq.read_tensor(name), dense.dtype).to(dtype)
    return out


def _as_torch(array: np.ndarray, stored: str) -> torch.Tensor:
    """A dense block as a tensor of its stored type (a copy); bf16 arrives as uint16 bit patterns."""
    if stored == "bf16":
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(array))


def _assign(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    expected = {name: t for name, t in model.state_dict(keep_vars=True).items()}
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise BfqFormatError(f"tensors: {len(unknown)} name(s) not in the model: {', '.join(unknown[:5])}")
    missing = sorted(name for name, t in expected.items() if name not in tensors and t.is_meta)
    if missing:
        raise BfqFormatError(f"tensors: the file lacks {len(missing)} tensor(s) of the model: {', '.join(missing[:5])}")
    for name, tensor in tensors.items():
        if tuple(expected[name].shape) != tuple(tensor.shape):
            raise BfqFormatError(f"{name}: shape {list(tensor.shape)} does not match the model's {list(expected[name].shape)}")
    model.load_state_dict(tensors, strict=False, assign=True)
    for param in model.parameters():
        param.requires_grad_(False)
