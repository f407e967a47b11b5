"""8-bit activations (W1.99A8): the one definition of how an activation is quantized, shared by the
int8 runtime (:mod:`bfq.runtime.int8`, which multiplies the result with int8 weights) and
fine-tuning's fake quantization (``act_bits=8``, :mod:`bfq.quant.nn`), so that training sees what
inference computes.

Per tensor, dynamic, asymmetric uint8 — what torch's oneDNN int8 kernels take (one scale and zero
point per input tensor, computed from that tensor at every call):

    lo, hi = min(x.min(), 0), max(x.max(), 0)
    s      = (hi - lo) / 255            (1 when x is all zeros)
    zp     = clamp(round(-lo / s), 0, 255)
    q      = clamp(round(x / s) + zp, 0, 255)      x_hat = (q - zp) * s

Which layers take int8 activations: those whose weight codes fit int8 (:func:`fits_int8`).
"""

from __future__ import annotations

import torch

from bfq.quant.quantizer import code_range

ACT_BITS = (8,)  # what --act-bits accepts: the int8 kernels' width


def fits_int8(bits: int, levels: str) -> bool:
    """Whether every code of a ``bits``-bit layer with ``levels`` is an int8 value (balanced up to 7
    bits, plain up to 8): such a layer is exactly an int8 matrix times per-channel scales."""
    lo, hi = code_range(bits, levels)
    return -128 <= lo and hi <= 127


def flat(x: torch.Tensor) -> torch.Tensor:
    """``x``'s elements as a 1-D view in memory order (contiguous or channels-last, as activations
    are), else a contiguous copy: a whole-tensor reduction over a strided 4-D view is many times slower."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).reshape(-1)
    return x.reshape(-1)


def act_qparams(x: torch.Tensor) -> tuple[float, int]:
    """``(scale, zero_point)`` of ``x``'s per-tensor uint8 quantization (the module docstring)."""
    lo, hi = torch.aminmax(flat(x.detach()))
    return range_qparams(float(lo), float(hi))


def range_qparams(lo: float, hi: float) -> tuple[float, int]:
    """``(scale, zero_point)`` for values in ``[lo, hi]`` (widened to include 0)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255 if hi > lo else 1.0
    return scale, int(min(max(round(-lo / scale), 0), 255))


def quantize_uint8(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """``clamp(round(x / scale) + zero_point, 0, 255)`` as uint8, computed in float32, same layout."""
    q = x.to(torch.float32, memory_format=torch.preserve_format).mul(1.0 / scale).round_().add_(zero_point)
    return q.clamp_(0, 255).to(torch.uint8)


class _FakeQuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        scale, zp = act_qparams(x)
        return ((quantize_uint8(x, scale, zp).to(torch.float32) - zp) * scale).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad  # straight through: the range is the tensor's own, so nothing is clipped


def fake_quantize(x: torch.Tensor) -> torch.Tensor:
    """``x`` through the 8-bit quantization and back (x_hat), with a straight-through gradient."""
    return _FakeQuantSTE.apply(x)
