"""Dequantize output channels of a packed layer (FORMAT.md §2.1, §4) on any torch device.

Two decoders produce the same bits:

* CPU: the numba kernels of :mod:`bfq.format.pack`, multi-threaded (as many threads as torch
  uses), writing straight into the caller's tensor;
* every other device (CUDA, MPS, XPU, ...): :func:`decode_torch`, plain integer tensor operations on
  the code words where they live, no numba and no host round trip. It also runs on the CPU, where
  tests hold it to the numba path bit for bit.

Both compute ``float32(scale[c]) * float32(q)`` with one binary32 multiply and round that to the
target dtype, which is what FORMAT.md defines and what the dense loader produces.

:func:`dequantize` picks the decoder by device; ``torch.ops.bfq.dequantize`` is the same function
registered as a torch custom op, so ``torch.compile`` treats a layer's decode as one opaque call.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from bfq.format import pack
from bfq.format.constants import level_offset

_NUMPY_VIEW = {torch.float32: (torch.float32, "float32"), torch.float16: (torch.int16, "float16"),
               torch.bfloat16: (torch.int16, "bfloat16")}  # fmt: skip
_SCALE_BITS = {torch.int16: torch.float16, torch.int32: torch.float32}
_SERIAL_BELOW = 1 << 16  # elements: smaller decodes skip numba's parallel launch
_LOW32 = 0xFFFFFFFF
# numba's workqueue threading layer (bfq's default) must not run two parallel kernels at once:
# forwards running in several Python threads take turns decoding.
_PARALLEL = threading.Lock()


def scale_values(scale_bits: torch.Tensor) -> torch.Tensor:
    """The stored scales as float32: ``scale_bits`` holds the f16 (int16) or f32 (int32) bit patterns,
    so that ``module.to(dtype)`` never rounds them."""
    return scale_bits.view(_SCALE_BITS[scale_bits.dtype]).float()


def dequantize(codes: torch.Tensor, scale_bits: torch.Tensor, shape: list[int], bits: int, num_levels: int,
               digits_per_word: int, word_bits: int, c0: int, c1: int, dtype: torch.dtype,
               out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Channels ``c0..c1-1`` of a layer, dequantized into ``dtype``: a ``[c1 - c0, *shape[1:]]``
    tensor on the device of ``codes`` (written into ``out`` when given, a contiguous tensor of that
    many elements).

    Args:
        codes: the layer's code stream, the container's little-endian u64 cells viewed as int64.
        scale_bits: its per-channel scales as stored (int16 = f16 bits, int32 = f32 bits).
        shape, bits, num_levels, digits_per_word, word_bits: the layer's header fields (L = num_levels).
    """
    count = (c1 - c0) * _per_channel(shape)
    if out is None:
        out = torch.empty(count, dtype=dtype, device=codes.device)
    elif out.numel() != count or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} tensor of {count} elements")
    if codes.device.type == "cpu":
        _decode_numba(codes, scale_bits, shape, bits, num_levels, digits_per_word, word_bits, c0, c1, out)
    else:
        out.view(-1).copy_(decode_torch(codes, scale_bits, shape, bits, num_levels, digits_per_word, word_bits, c0, c1,
                                        dtype).view(-1))  # fmt: skip
    return out.view(c1 - c0, *shape[1:])


def _per_channel(shape) -> int:
    return int(np.prod(shape[1:], dtype=np.int64))


def _levels_name(bits: int, num_levels: int) -> str:
    return "balanced" if num_levels == (1 << bits) + 1 else "plain"


def _decode_numba(codes, scale_bits, shape, bits, num_levels, g, k, c0, c1, out) -> None:
    import numba

    view_as, name = _NUMPY_VIEW[out.dtype]
    stream = codes.numpy().view(np.uint64)
    scales = scale_bits.numpy().view(np.float16 if scale_bits.dtype == torch.int16 else np.float32)
    target = out.view(view_as).numpy()
    count = target.size
    args = (stream, tuple(shape), scales, bits, _levels_name(bits, num_levels), g, k, name, target)
    if count < _SERIAL_BELOW:
        pack.unpack_dequantize(*args, parallel=False, channels=(c0, c1))
        return
    with _PARALLEL:
        numba.set_num_threads(max(1, min(numba.config.NUMBA_NUM_THREADS, torch.get_num_threads())))
        pack.unpack_dequantize(*args, parallel=True, channels=(c0, c1))


# ---------------------------------------------------------------------------- plain torch


def decode_torch(codes: torch.Tensor, scale_bits: torch.Tensor, shape: list[int], bits: int, num_levels: int,
                 digits_per_word: int, word_bits: int, c0: int, c1: int, dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """:func:`dequantize` in plain torch integer operations, on the device of ``codes``.

    Word j occupies stream bits [j·k, (j+1)·k). The stream is read as 32-bit limbs held in int64
    (always non-negative, so shifts are logical), a word is assembled from at most three limbs, and
    each digit is ``(v·L) >> k`` with remainder ``(v·L) mod 2^k``: in one int64 product when it
    cannot overflow, else in two 32-bit limbs (any legal k ≤ 64 and L ≤ 257).
    """
    g, k, L = digits_per_word, word_bits, num_levels
    per = _per_channel(shape)
    e0, e1 = c0 * per, c1 * per
    w0, w1 = e0 // g, -(-e1 // g)
    lo, hi = _read_words(codes, w0, w1, k)
    digits = _digits(lo, hi, L, g, k)  # [words, g]
    q = digits.reshape(-1)[e0 - w0 * g : e1 - w0 * g].to(torch.int32) - level_offset(bits)
    scales = scale_values(scale_bits[c0:c1])
    values = q.view(c1 - c0, per).to(torch.float32) * scales[:, None]  # one binary32 multiply
    return values.to(dtype).view(c1 - c0, *shape[1:])


def _read_words(codes: torch.Tensor, w0: int, w1: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Words w0..w1-1 as (low, high) 32-bit halves in int64."""
    first_limb = (w0 * k) >> 5
    last_limb = ((w1 * k) >> 5) + 3
    limbs32 = codes.view(torch.int32)[first_limb : min(last_limb, 2 * codes.numel())]
    limbs = torch.zeros(last_limb - first_limb, dtype=torch.int64, device=codes.device)
    limbs[: limbs32.numel()] = limbs32.to(torch.int64) & _LOW32
    pos = torch.arange(w0, w1, dtype=torch.int64, device=codes.device) * k - first_limb * 32
    i, sh = pos >> 5, pos & 31
    a, b, c = limbs[i], limbs[i + 1], limbs[i + 2]
    low_bits = (1 << sh) - 1
    lo = (a >> sh) | ((b & low_bits) << (32 - sh))
    hi = (b >> sh) | ((c & low_bits) << (32 - sh))
    if k <= 32:
        return lo & ((1 << k) - 1), torch.zeros_like(hi)
    return lo, hi & ((1 << (k - 32)) - 1)


def _digits(lo: torch.Tensor, hi: torch.Tensor, L: int, g: int, k: int) -> torch.Tensor:
    digits = torch.empty((lo.numel(), g), dtype=torch.int16, device=lo.device)
    if ((1 << k) - 1) * L < (1 << 63):  # the whole product fits a signed 64-bit integer
        v, mask = (hi << 32) | lo, (1 << k) - 1
        for i in range(g):
            x = v * L
            digits[:, i] = x >> k
            v = x & mask
        return digits
    high_mask = (1 << (k - 32)) - 1  # here k > 32: L·2^k overflows 63 bits only for k > 55
    for i in range(g):
        lo_p = lo * L
        hi_p = hi * L + (lo_p >> 32)
        digits[:, i] = hi_p >> (k - 32)
        hi, lo = hi_p & high_mask, lo_p & _LOW32
    return digits


# ------------------------------------------------------------------------- custom op


@torch.library.custom_op("bfq::dequantize", mutates_args=())
def dequantize_op(codes: torch.Tensor, scale_bits: torch.Tensor, shape: list[int], bits: int, num_levels: int,
                  digits_per_word: int, word_bits: int, c0: int, c1: int, dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """:func:`dequantize` as an opaque torch operator (what a compiled packed layer calls)."""
    return dequantize(codes, scale_bits, shape, bits, num_levels, digits_per_word, word_bits, c0, c1, dtype)


@dequantize_op.register_fake
def _(codes, scale_bits, shape, bits, num_levels, digits_per_word, word_bits, c0, c1, dtype):
    return codes.new_empty((c1 - c0, *shape[1:]), dtype=dtype)

