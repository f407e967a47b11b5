"""int8 activations on the 2-bit weights (W1.99A8, ``compute="int8"``): an option for x86 CPUs.

A BitsFusion layer's weight is an integer code times a per-output-channel scale; when every code
fits int8 (:func:`bfq.quant.activations.fits_int8`) the layer is exactly an int8 matrix with those
scales. :func:`convert` turns each such packed layer of a loaded model into an :class:`Int8Linear` /
:class:`Int8Conv2d` that holds the codes as a oneDNN-prepacked int8 weight (decoded once, at load:
prepacking costs about as much as one GEMM, so it cannot be redone at every forward) and, at every
forward, quantizes its input to uint8 (per tensor, dynamic: :mod:`bfq.quant.activations`) and calls
torch's oneDNN int8 kernels (``onednn::qlinear_pointwise``, ``onednn::qconv2d_pointwise``, VNNI),
which apply the activation and weight scales after the integer GEMM and return floats. Every other
layer, and everything that is not a weight layer (norms, attention's own products), computes in
the model's float dtype. The codes and scales stay, so ``state_dict``, ``weight`` and
``save_pretrained`` are the packed runtime's.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from bfq.format import pack
from bfq.quant.activations import act_qparams, fits_int8, flat, quantize_uint8, range_qparams
from bfq.runtime.decode import scale_values
from bfq.runtime.packed import PackedConv2d, PackedLayer, PackedLinear, packed_layers

INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_int8_problem() -> str | None:
    """Why this machine cannot run ``compute="int8"``, or None: it needs torch's oneDNN int8 kernels
    and a CPU with an int8 dot-product instruction (AVX-512 VNNI, AVX-VNNI or AMX), read from
    /proc/cpuinfo; without one the kernels are emulated and slower than bf16."""
    onednn = getattr(torch.ops, "onednn", None)
    if not (torch.backends.mkldnn.is_available() and hasattr(onednn, "qlinear_pointwise")):
        return f"torch {torch.__version__} has no oneDNN int8 kernels"
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    if not any(flag in flags for flag in INT8_FLAGS):
        return "this CPU has no int8 dot-product instructions (AVX-512 VNNI, AVX-VNNI or AMX)"
    return None


def int8_codes(layer: PackedLayer) -> torch.Tensor:
    """The layer's codes, centered (FORMAT.md §2.1: digit minus 2^(bits-1)), as an int8 weight."""
    levels = "balanced" if layer.num_levels == (1 << layer.bits) + 1 else "plain"
    stream = layer.codes.numpy().view(np.uint64)
    q = pack.unpack_codes(stream, math.prod(layer.weight_shape), layer.bits, levels, layer.digits_per_word, layer.word_bits)
    return torch.from_numpy(q.astype(np.int8)).view(layer.weight_shape)


def eligible(layer: PackedLayer) -> bool:
    """Codes that fit int8, on the CPU, and (convolutions) zero padding given as numbers."""
    levels = "balanced" if layer.num_levels == (1 << layer.bits) + 1 else "plain"
    if not fits_int8(layer.bits, levels) or layer.codes.device.type != "cpu":
        return False
    return isinstance(layer, PackedLinear) or (layer.padding_mode == "zeros" and not isinstance(layer.padding, str))


class Int8Layer:
    """What :class:`Int8Linear` and :class:`Int8Conv2d` share: the prepacked weight and its scales."""

    act_range: tuple[float, float] | None = None  # a calibrated (min, max) of the input; None: each input's own

    @classmethod
    def from_packed(cls, layer: PackedLayer) -> Int8Layer:
        new = cls.__new__(cls)
        new.__dict__.update(layer.__dict__)
        new._buffers = dict(layer._buffers)
        scales = scale_values(layer.scale_bits)
        new.register_buffer("w_scale", scales, persistent=False)
        new.register_buffer("w_zero_point", torch.zeros(len(scales), dtype=torch.int64), persistent=False)
        new.register_buffer("w_int8", new._prepack(int8_codes(layer)), persistent=False)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise RuntimeError("compute='int8' runs on the CPU only: load the model with another compute for this device")
        if torch.is_grad_enabled() and x.requires_grad:  # the int8 kernels have no backward: train on the float path
            return super().forward(x)
        return self._int8_forward(*quantize_input(x, self.act_range), x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, int8 activations"


class Int8Linear(Int8Layer, PackedLinear):
    def _prepack(self, codes):
        return torch.ops.onednn.qlinear_prepack(codes, None)

    def _int8_forward(self, xq, scale, zero_point, dtype):
        bias = None if self.bias is None else self.bias.to(dtype)
        out = torch.ops.onednn.qlinear_pointwise(xq.reshape(-1, xq.shape[-1]), scale, zero_point, self.w_int8, self.w_scale,
                                                 self.w_zero_point, bias, 1.0, 0, dtype, "none", [], "")  # fmt: skip
        return out.view(*xq.shape[:-1], out.shape[-1])


class Int8Conv2d(Int8Layer, PackedConv2d):
    def _prepack(self, codes):
        return torch.ops.onednn.qconv_prepack(codes, self.w_scale, 1.0, 0, list(self.stride), list(self.padding),
                                              list(self.dilation), self.groups, None)  # fmt: skip

    def _int8_forward(self, xq, scale, zero_point, dtype):
        bias = None if self.bias is None else self.bias.to(dtype)
        return torch.ops.onednn.qconv2d_pointwise(xq, scale, zero_point, self.w_int8, self.w_scale, self.w_zero_point, bias,
                                                  list(self.stride), list(self.padding), list(self.dilation), self.groups,
                                                  1.0, 0, dtype, "none", [], "")  # fmt: skip


INT8_TYPES = {PackedLinear: Int8Linear, PackedConv2d: Int8Conv2d}


def convert(model: torch.nn.Module) -> dict[str, int]:
    """Turn every eligible packed layer of ``model`` (:func:`eligible`) into its int8 twin, in place;
    returns how many layers became int8 and how many stay on the float path."""
    counts = {"int8": 0, "float": 0}
    for name, layer in packed_layers(model):
        int8_type = INT8_TYPES.get(type(layer))
        if int8_type is None or not eligible(layer):
            counts["float"] += 1
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, int8_type.from_packed(layer))
        counts["int8"] += 1
    return counts


def quantize_input(x: torch.Tensor, act_range: tuple[float, float] | None = None) -> tuple[torch.Tensor, float, int]:
    """``(q, scale, zero_point)``: :func:`bfq.quant.activations.quantize_uint8` of ``x`` with its own
    range (or ``act_range``, clamping what falls outside), bit for bit, in one numba pass over the float32 values (torch's elementwise chain makes
    six passes and costs about as much as a 640-wide int8 GEMM); same layout as ``x``."""
    scale, zero_point = act_qparams(x) if act_range is None else range_qparams(*act_range)
    src = flat(x)
    if src.data_ptr() != x.data_ptr():  # a layout flat() had to copy: keep the torch path
        return quantize_uint8(x, scale, zero_point), scale, zero_point
    out = torch.empty_like(x, dtype=torch.uint8, memory_format=torch.preserve_format)
    _quantize(src.to(torch.float32).numpy(), np.float32(1.0 / scale), np.float32(zero_point), flat(out).numpy())
    return out, scale, zero_point


@numba.njit(nogil=True, cache=True)
def _quantize(src, inv_scale, zero_point, out):
    for i in range(src.size):
        v = np.rint(src[i] * inv_scale) + zero_point
        out[i] = np.uint8(min(max(v, np.float32(0)), np.float32(255)))
