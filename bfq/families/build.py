"""Building a family's model without a checkpoint: shapes only (meta device) or random weights."""

from __future__ import annotations

import math

import numpy as np
import torch

from bfq.families import family_for_config


def model_class(config: dict):
    """The diffusers class of ``config``'s family (:class:`bfq.families.FamilyError` for none)."""
    import diffusers

    return getattr(diffusers, family_for_config(config).model_class)


def build_meta_unet(config: dict):
    """A model of ``config``'s family on the meta device (shapes only, no memory): for layer lists and
    accounting, e.g. ``quantizable_layers(build_meta_unet(sd15_config()))``."""
    with torch.device("meta"):
        return model_class(config).from_config(config)


def n_params(config: dict) -> int:
    """Parameters of a model built from ``config`` (counted on the meta device)."""
    return sum(math.prod(p.shape) for p in build_meta_unet(config).parameters())


def build_empty(config: dict):
    """A model of ``config``'s family whose parameters are on the meta device (no memory) and whose
    buffers are computed by its constructor on the CPU (PixArt's sin-cos ``pos_embed``: a meta build
    would lose them, and zeros would be silently wrong)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return model_class(config).from_config(config)


def _empty_unet(config: dict):
    """``config``'s model with uninitialized CPU parameters and its computed buffers."""
    model = build_empty(config)
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and p.is_meta:
                module._parameters[name] = torch.nn.Parameter(torch.empty_like(p, device="cpu"), requires_grad=p.requires_grad)
    return model


@torch.no_grad()
def build_random_unet(config: dict, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A model of ``config``'s family with PyTorch-default-like random weights, built fast.

    The model is constructed on the meta device (no default initialisation) and every parameter is
    then filled in module order from one numpy ``SFC64(seed)`` stream (~5x faster than torch's CPU
    generator): Linear/Conv2d weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (the bound of
    PyTorch's default kaiming-uniform init), norm weights 1 and biases 0. Values are drawn in float32
    and then cast, so every ``dtype`` holds the same numbers (rounded).
    """
    from torch import nn

    unet = _empty_unet(config)
    rng = np.random.Generator(np.random.SFC64(seed))
    for module in unet.modules():
        own = dict(module.named_parameters(recurse=False))
        if not own:
            continue
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            bound = 1.0 / math.sqrt(module.weight[0].numel())
            for p in own.values():
                arr = p.detach().numpy()
                rng.random(out=arr.reshape(-1), dtype=np.float32)
                arr *= 2.0 * bound
                arr -= bound
        elif isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
            for name, p in own.items():
                p.fill_(1.0 if name == "weight" else 0.0)
        elif set(own) == {"scale_shift_table"}:  # PixArt's modulation tables: randn / sqrt(width), as diffusers
            arr = own["scale_shift_table"].detach().numpy()
            arr[...] = rng.standard_normal(arr.shape, dtype=np.float32) / np.float32(math.sqrt(arr.shape[-1]))
        else:
            raise RuntimeError(f"no random-init rule for {type(module).__name__} parameters")
    return unet.to(dtype).eval() if dtype != torch.float32 else unet.eval()
