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


def _empty_unet(config: dict):
    unet = build_meta_unet(config)
    if any(True for _ in unet.buffers()):
        raise RuntimeError("this UNet has buffers; a meta-device build would lose them")
    return unet.to_empty(device="cpu")


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
        else:
            raise RuntimeError(f"no random-init rule for {type(module).__name__} parameters")
    return unet.to(dtype).eval() if dtype != torch.float32 else unet.eval()
