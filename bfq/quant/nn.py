"""Quantized Linear/Conv2d modules for quantization-aware training and export.

:class:`QuantLinear` and :class:`QuantConv2d` subclass :class:`torch.nn.Linear` / :class:`torch.nn.Conv2d`
and keep their ``weight`` (the latent floating-point weight) and ``bias`` parameters, so the state-dict
keys of a quantized UNet are the original ones plus one ``<layer>.scale`` (float32 ``[out]``) per
quantized layer. Every forward fake-quantizes the weight:

    s_eff = round_scales(|scale|, scale_dtype)        # the value that will be stored (fp16 by default)
    q     = round(clamp(w / s_eff, lo, hi))           # == quantize_codes(w, s_eff, bits, levels)
    w_hat = (s_eff[:, None, ...] * q).to(weight dtype) # == dequantize(q, s_eff, weight dtype)

so the weight the module computes with is exactly what :meth:`export_codes` writes and a loader
rebuilds. Gradients (LSQ, Esser et al. 2020): ``round`` is a straight-through estimator, so
``d w_hat / d w`` is 1 inside the clamp range and 0 outside, and ``d w_hat / d s`` is ``q - w/s`` inside
and the clamp bound outside. The fp16 rounding of the scale is also straight-through. LSQ's gradient
scale ``1 / sqrt(N·Q_P)`` (N = weights per output channel, Q_P = the top code) is **off by default**
(``grad_scale=None``): with Adam/AdamW, which the BitsFusion recipe uses, a constant gradient factor
is normalised away. Pass ``grad_scale="lsq"`` or a float to turn it on.

Under ``unet.to(dtype)`` the scale parameter is cast like any other parameter; train in float32.

With ``act_bits = 8`` (:func:`set_act_bits`, fine-tuning's ``--act-bits 8``) a layer whose codes fit
int8 also fake-quantizes its input exactly as ``compute="int8"`` quantizes it at inference
(:mod:`bfq.quant.activations`: per tensor, dynamic, uint8; straight-through gradient).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from bfq.errors import RecipeError
from bfq.quant.activations import ACT_BITS, fake_quantize, fits_int8
from bfq.quant.quantizer import (
    check_bits,
    code_range,
    init_scales,
    quantize_codes,
    round_scales,
    scale_storage_dtype,
)

INITS = ("alternating", "minmax", None)


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _StoredScaleSTE(torch.autograd.Function):
    """Forward: the stored-precision scale; backward: identity."""

    @staticmethod
    def forward(ctx, s, scale_dtype):
        return round_scales(s, scale_dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GradScale(torch.autograd.Function):
    """Forward: identity (bit-exact); backward: gradient times ``factor``."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class _QuantMixin:
    """Shared state and fake-quantization of :class:`QuantLinear` and :class:`QuantConv2d`."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    act_bits: int | None = None  # 8: fake-quantize the input (set_act_bits)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize(x) if self.act_bits is not None and takes_int8_activations(self) else x

    def _setup(self, bits: int, levels: str, scale_dtype: str, grad_scale: str | float | None) -> None:
        check_bits(bits, levels)
        scale_storage_dtype(scale_dtype)  # validates
        if not (grad_scale is None or grad_scale == "lsq" or isinstance(grad_scale, (int, float))):
            raise ValueError(f"grad_scale must be None, 'lsq' or a number, got {grad_scale!r}")
        self.bits, self.levels, self.scale_dtype, self.grad_scale = bits, levels, scale_dtype, grad_scale

    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        bits: int,
        *,
        levels: str = "balanced",
        scale_dtype: str = "f16",
        init: str | None = "alternating",
        iters: int = 10,
        grad_scale: str | float | None = None,
    ):
        """Wrap ``module`` (same weight and bias Parameter objects, no copy) with scales from ``init``.

        ``init=None`` sets every scale to 1.0 (for loading a checkpoint's scales right after).
        """
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        new = cls._empty_like(module)
        new._setup(bits, levels, scale_dtype, grad_scale)
        new.weight, new.bias = module.weight, module.bias
        w = module.weight
        if init is None:
            s = torch.ones(w.shape[0], dtype=torch.float32, device=w.device)
        else:
            s = init_scales(w, bits, levels, method=init, iters=iters)
        new.scale = nn.Parameter(s, requires_grad=w.requires_grad)
        new.train(module.training)
        return new

    def _grad_factor(self) -> float | None:
        if self.grad_scale is None:
            return None
        if self.grad_scale == "lsq":
            n = self.weight[0].numel()
            return 1.0 / math.sqrt(n * code_range(self.bits, self.levels)[1])
        return float(self.grad_scale)

    def effective_scale(self) -> torch.Tensor:
        """Float32 ``[out]`` scale the forward uses: ``round_scales(|scale|)``, differentiable (STE)."""
        s = self.scale
        factor = self._grad_factor()
        if factor is not None:
            s = _GradScale.apply(s, factor)
        return _StoredScaleSTE.apply(s.to(torch.float32).abs(), self.scale_dtype)

    def fake_weight(self) -> torch.Tensor:
        """The fake-quantized weight, in the latent weight's dtype, differentiable (LSQ STE)."""
        w = self.weight
        s = self.effective_scale().reshape(w.shape[0], *([1] * (w.ndim - 1)))
        lo, hi = code_range(self.bits, self.levels)
        q = _RoundSTE.apply(torch.clamp(w.to(torch.float32) / s, lo, hi))
        return (s * q).to(w.dtype)

    @torch.no_grad()
    def export_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q, scales)``: integer codes (int8, or int16 for balanced 8-bit) in the weight's shape and
        the scales ``[out]`` in the stored dtype (float16 for "f16", float32 for "f32").

        ``dequantize(q, scales, weight.dtype)`` equals :meth:`fake_weight` bit for bit.
        """
        s = round_scales(self.scale, self.scale_dtype)
        q = quantize_codes(self.weight, s, self.bits, self.levels)
        return q, s.to(scale_storage_dtype(self.scale_dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}, levels={self.levels}, scale_dtype={self.scale_dtype}"


class QuantLinear(_QuantMixin, nn.Linear):
    """:class:`torch.nn.Linear` whose forward uses the fake-quantized weight. Build with ``from_float``."""

    @classmethod
    def _empty_like(cls, m: nn.Linear):
        return cls(m.in_features, m.out_features, bias=m.bias is not None, device="meta")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(self._input(input), self.fake_weight(), self.bias)


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """:class:`torch.nn.Conv2d` (any kernel, stride, padding, dilation, groups, padding mode) whose
    forward uses the fake-quantized weight. Build with ``from_float``."""

    @classmethod
    def _empty_like(cls, m: nn.Conv2d):
        return cls(
            m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
            dilation=m.dilation, groups=m.groups, bias=m.bias is not None, padding_mode=m.padding_mode,
            device="meta",
        )  # fmt: skip

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self._input(input), self.fake_weight(), self.bias)


QUANT_MODULES = (QuantLinear, QuantConv2d)


def takes_int8_activations(module: nn.Module) -> bool:
    """Whether the int8 runtime (bfq.runtime.int8) runs this quantized layer on int8 activations:
    codes that fit int8 and, for a convolution, zero padding given as numbers."""
    if not fits_int8(module.bits, module.levels):
        return False
    return isinstance(module, nn.Linear) or (module.padding_mode == "zeros" and not isinstance(module.padding, str))


def set_act_bits(unet: nn.Module, act_bits: int | None) -> int:
    """Fake-quantize the inputs of ``unet``'s quantized layers to ``act_bits`` (8) bits, as the int8
    runtime does, or stop (None); returns how many layers do."""
    if act_bits is not None and act_bits not in ACT_BITS:
        raise ValueError(f"act_bits must be one of {ACT_BITS} or None, got {act_bits!r}")
    count = 0
    for _, module in iter_quantized(unet):
        module.act_bits = act_bits
        count += act_bits is not None and takes_int8_activations(module)
    return count


def _summarize(names: list[str], limit: int = 5) -> str:
    head = ", ".join(names[:limit])
    return f"{head} (+{len(names) - limit} more)" if len(names) > limit else head


def quantize_unet(
    unet: nn.Module,
    recipe_bits: Mapping[str, int],
    *,
    levels: str = "balanced",
    init: str | None = "alternating",
    scale_dtype: str = "f16",
    progress: bool = True,
    iters: int = 10,
    grad_scale: str | float | None = None,
) -> nn.Module:
    """Swap every layer named in ``recipe_bits`` for a quantized module, in place; returns ``unet``.

    Args:
        unet: any module (a diffusers ``UNet2DConditionModel`` in practice).
        recipe_bits: ``{weight name: bits}``, names as in ``unet.state_dict()`` (e.g.
            ``"down_blocks.0.resnets.0.conv1.weight"``), each an ``nn.Linear``/``nn.Conv2d`` weight.
        levels: "balanced" or "plain".
        init: "alternating" (paper), "minmax", or None (scales 1.0, to be overwritten by a checkpoint).
        scale_dtype: "f16" or "f32", the precision the scales are stored (and computed) in.
        progress: show a tqdm bar (weights processed).
        iters, grad_scale: see :func:`bfq.quant.quantizer.init_scales` and :class:`QuantLinear`.

    Raises:
        RecipeError: a name is not a Linear/Conv2d weight of ``unet`` (or is already quantized).
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    targets, bad = [], []
    for name, bits in recipe_bits.items():
        mod = None
        if name.endswith(".weight"):
            try:
                mod = unet.get_submodule(name[: -len(".weight")])
            except AttributeError:
                mod = None
        if type(mod) not in (nn.Linear, nn.Conv2d):  # exact types: no re-quantizing Quant* modules
            bad.append(name)
        else:
            try:
                check_bits(bits, levels)
            except ValueError as e:
                raise RecipeError(f"{name}: {e}") from None
            targets.append((name[: -len(".weight")], mod, bits))
    if bad:
        raise RecipeError(
            f"{len(bad)} recipe layer(s) are not nn.Linear/nn.Conv2d weights of this model: {_summarize(bad)}"
        )
    from tqdm.auto import tqdm

    total = sum(m.weight.numel() for _, m, _ in targets)
    with tqdm(total=total, unit="w", unit_scale=True, desc="init scales", disable=not progress) as bar:
        for path, mod, bits in targets:
            cls = QuantLinear if isinstance(mod, nn.Linear) else QuantConv2d
            try:
                new = cls.from_float(
                    mod, bits, levels=levels, scale_dtype=scale_dtype, init=init, iters=iters, grad_scale=grad_scale
                )
            except ValueError as e:
                raise ValueError(f"{path}.weight: {e}") from e
            parent, _, child = path.rpartition(".")
            setattr(unet.get_submodule(parent) if parent else unet, child, new)
            bar.update(mod.weight.numel())
    return unet


def iter_quantized(unet: nn.Module) -> Iterator[tuple[str, QuantLinear | QuantConv2d]]:
    """Yield ``(weight name, module)`` for every quantized layer, in module order."""
    for name, mod in unet.named_modules():
        if isinstance(mod, QUANT_MODULES):
            yield f"{name}.weight", mod
