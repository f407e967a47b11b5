"""Lazy UNets: every Linear/Conv2d weight stays on the meta device and is read from a *weight
source* (a function ``name -> float32 tensor``) only while it is used, so that converting a model
holds one layer's float weights at a time instead of the whole float model (SDXL: 10.3 GB in fp32).

Everything else (biases, norms) is small and materialized. A forward inside :func:`materialized`
fills each weight just before its module runs and drops it after; :func:`weight_of` gives one
weight; the quantizer and the writer then stream layer by layer (bfq.pipeline.export).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from bfq.families.build import build_empty, build_meta_unet

WeightSource = Callable[[str], torch.Tensor]
_SOURCE_ATTR = "_bfq_weight_source"


def random_source(config: dict, seed: int = 0) -> WeightSource:
    """Seeded random parameters of ``config``'s model, each drawn from its own stream (numpy
    ``SFC64`` keyed by ``(seed, crc32(name))``), so that any parameter can be made alone, in any
    order, with the same values: Linear/Conv2d weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    norm weights 1 and biases 0, PixArt's ``scale_shift_table`` ~ N(0, 1)/sqrt(width) (as diffusers
    initializes it; as :func:`bfq.families.build.build_random_unet`, whose single stream in module
    order cannot be read out of order)."""
    meta = build_meta_unet(config)
    shapes = dict(meta.named_parameters())
    owner = {f"{m}.{p}" if m else p: mod for m, mod in meta.named_modules() for p, _ in mod.named_parameters(recurse=False)}

    def source(name: str) -> torch.Tensor:
        mod, shape = owner[name], tuple(shapes[name].shape)
        if isinstance(mod, (nn.GroupNorm, nn.LayerNorm)):
            return torch.full(shape, 1.0 if name.endswith("weight") else 0.0)
        rng = np.random.Generator(np.random.SFC64([seed, zlib.crc32(name.encode())]))
        if name.rpartition(".")[2] == "scale_shift_table":
            return torch.from_numpy(rng.standard_normal(shape, dtype=np.float32) / np.float32(math.sqrt(shape[-1])))
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            raise RuntimeError(f"no random-init rule for {type(mod).__name__} parameters")
        bound = 1.0 / math.sqrt(mod.weight[0].numel())
        arr = rng.random(math.prod(shape), dtype=np.float32).reshape(shape)
        arr *= 2.0 * bound
        arr -= bound
        return torch.from_numpy(arr)

    return source


def _weight_modules(unet: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    return ((n, m) for n, m in unet.named_modules() if type(m) in (nn.Linear, nn.Conv2d))


def lazy_unet(config: dict, source: WeightSource) -> nn.Module:
    """``config``'s model with its Linear/Conv2d weights on the meta device (read from ``source``
    on use) and every other parameter materialized from ``source``; in eval mode, no gradients."""
    unet = build_empty(config)  # buffers (PixArt's pos_embed) computed, not lost on the meta device
    lazy = {id(m) for _, m in _weight_modules(unet)}
    for mname, mod in unet.named_modules():
        for pname, p in list(mod.named_parameters(recurse=False)):
            if id(mod) in lazy and pname == "weight":
                p.requires_grad_(False)
                continue
            full = f"{mname}.{pname}" if mname else pname
            mod._parameters[pname] = nn.Parameter(source(full).to(p.dtype), requires_grad=False)
    setattr(unet, _SOURCE_ATTR, source)
    return unet.eval()


def is_lazy(unet: nn.Module) -> bool:
    return getattr(unet, _SOURCE_ATTR, None) is not None


def weight_of(unet: nn.Module, name: str) -> torch.Tensor:
    """The float weight ``name`` (``"...conv1.weight"``): read from the source for a lazy UNet's
    meta weights, else the parameter itself (not a copy)."""
    w = unet.get_parameter(name)
    if w.device.type == "meta" and is_lazy(unet):
        return getattr(unet, _SOURCE_ATTR)(name).to(w.dtype)
    return w


@contextmanager
def filled(unet: nn.Module, keep: Callable[[str], bool]):
    """Within the block, the lazy weights of the modules whose names pass ``keep`` are in memory
    (for code that reads weights directly, e.g. copies of the small time layers)."""
    swapped = []
    if is_lazy(unet):
        for name, mod in _weight_modules(unet):
            if keep(name) and mod.weight.device.type == "meta":
                swapped.append((mod, mod.weight))
                mod._parameters["weight"] = nn.Parameter(weight_of(unet, f"{name}.weight"), requires_grad=False)
    try:
        yield unet
    finally:
        for mod, meta_w in swapped:
            mod._parameters["weight"] = meta_w


class _LazyLayer(torch.autograd.Function):
    """A Linear/Conv2d (no bias) whose backward reads the weight again instead of keeping it, so
    that a backward through a lazy UNet holds one layer's weight at a time (inputs need no grad)."""

    @staticmethod
    def forward(ctx, x, mod, read):
        ctx.mod, ctx.read, ctx.shape = mod, read, x.shape
        w = read()
        if isinstance(mod, nn.Conv2d):
            return torch.nn.functional.conv2d(x, w, None, mod.stride, mod.padding, mod.dilation, mod.groups)
        return torch.nn.functional.linear(x, w)

    @staticmethod
    def backward(ctx, gy):
        mod, w = ctx.mod, ctx.read()
        if isinstance(mod, nn.Conv2d):
            gx = torch.nn.grad.conv2d_input(ctx.shape, w, gy, mod.stride, mod.padding, mod.dilation, mod.groups)
        else:
            gx = gy @ w
        return gx, None, None


def _lazy_forward(unet, name):
    def forward(mod, x):
        y = _LazyLayer.apply(x, mod, lambda: weight_of(unet, name))
        if mod.bias is None:
            return y
        return y + (mod.bias.view(1, -1, 1, 1) if isinstance(mod, nn.Conv2d) else mod.bias)

    return forward


@contextmanager
def materialized(unet: nn.Module, grad: bool = False):
    """Within the block, forwards of a lazy UNet work: each Linear/Conv2d's weight is read from the
    source just before the module runs and dropped again after it (one layer's weight at a time).
    ``grad=True``: backwards too (each weight read again in the backward, never kept by autograd).
    Does nothing for an ordinary UNet."""
    if not is_lazy(unet):
        yield unet
        return
    if grad:
        import types

        mods = [(m, f"{n}.weight") for n, m in _weight_modules(unet) if m.weight.device.type == "meta"]
        if any(isinstance(m, nn.Conv2d) and m.padding_mode != "zeros" for m, _ in mods):
            raise RuntimeError("lazy backward supports zero-padded convolutions only")
        for m, name in mods:
            m.forward = types.MethodType(_lazy_forward(unet, name), m)
        try:
            yield unet
        finally:
            for m, _ in mods:
                del m.forward
        return
    handles = []
    for name, mod in _weight_modules(unet):
        if mod.weight.device.type != "meta":
            continue
        meta_w = mod.weight

        def pre(module, args, _name=f"{name}.weight" if name else "weight", _meta=meta_w):
            module._parameters["weight"] = nn.Parameter(weight_of(unet, _name), requires_grad=False)

        def post(module, args, output, _meta=meta_w):
            module._parameters["weight"] = _meta

        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    try:
        yield unet
    finally:
        for h in handles:
            h.remove()


def full_unet(config: dict, source: WeightSource) -> nn.Module:
    """``config``'s model with every parameter read from ``source`` (the whole float model in memory)."""
    unet = lazy_unet(config, source)
    for name, mod in _weight_modules(unet):
        mod._parameters["weight"] = nn.Parameter(source(f"{name}.weight"), requires_grad=False)
    delattr(unet, _SOURCE_ATTR)
    return unet
