"""The packed runtime: quantized layers that keep their code words and decode them at every forward.

A :class:`PackedLinear` / :class:`PackedConv2d` holds the layer's code stream exactly as the
container stores it (u64 cells, as an int64 buffer ``codes``), its per-channel scales as stored
(``scale_bits``: the f16 or f32 bit patterns, so ``.to(dtype)`` never rounds them) and its dense
bias. In ``forward`` it dequantizes into a :class:`Workspace` shared by every layer of the model
(layers run one after another) and calls ``F.linear`` / ``F.conv2d``. A layer larger than the
workspace is computed in blocks of output channels, so the largest SD-v1.5 convolutions (29.5 M
weights) never exist dense. Results equal the dense loader's: the decoded weights are the same
bits (FORMAT.md §2.1), and blocks only change the order of float additions in the output.

The layers are ordinary ``nn.Linear`` / ``nn.Conv2d`` subclasses, so a packed UNet is a normal
diffusers model: ``.to(device)`` moves the buffers, ``.to(dtype)`` changes the compute dtype (a
zero-size marker buffer follows it; codes and scale bits are integers and never change),
``state_dict()`` holds the codes, not dequantized weights, and PEFT LoRA adapters wrap the layers
like any Linear/Conv2d. ``weight`` is a read-only, dequantized view for code that inspects it;
writing into it in any way (assigning, ``mul_``, ``nn.init``, fusing a LoRA) raises :class:`PackedWeightError`.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

from bfq.runtime.decode import dequantize, dequantize_op
from bfq.runtime.memory import DEFAULT_WORKSPACE_BYTES


class PackedWeightError(RuntimeError):
    """Something tried to change the weights of a packed layer (e.g. fusing a LoRA into them)."""


class Workspace:
    """Scratch memory for decoded weights: one flat tensor per (device, dtype, thread), grown to the
    largest block a layer asks for, never beyond ``max_bytes`` (larger layers are split into
    blocks of output channels that fit)."""

    def __init__(self, max_bytes: int = DEFAULT_WORKSPACE_BYTES):
        if max_bytes < 1:
            raise ValueError(f"workspace size must be positive, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._buffers: dict[tuple, torch.Tensor] = {}

    def block_channels(self, per_channel: int, channels: int, dtype: torch.dtype) -> int:
        """How many output channels of ``per_channel`` weights one block holds (at least one)."""
        itemsize = torch.empty(0, dtype=dtype).element_size()
        return max(1, min(channels, self.max_bytes // (itemsize * per_channel)))

    def get(self, device: torch.device, dtype: torch.dtype, count: int) -> torch.Tensor:
        key = (device, dtype, threading.get_ident())
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < count:
            self._buffers[key] = buffer = torch.empty(count, dtype=dtype, device=device)
        return buffer[:count]

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def clear(self) -> None:
        self._buffers.clear()

    def __deepcopy__(self, memo):
        return Workspace(self.max_bytes)

    def __getstate__(self):
        return {"max_bytes": self.max_bytes, "_buffers": {}}


_EDIT_HINT = (
    "its 2-bit codes are what the forward computes with, so the change would be lost: load the model with "
    "runtime='dense' to edit its weights or fuse a LoRA (an unfused adapter applies at every forward), "
    "or .clone() the weight for a copy of your own"
)
_INPLACE_DUNDERS = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__",
                    "__ipow__", "__imatmul__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__"}  # fmt: skip
_HARMLESS_INPLACE = {"requires_grad_", "retain_grad", "share_memory_"}


def _writes(func, args, kwargs) -> bool:
    """Whether calling ``func`` changes the values of a ``_DecodedWeight`` among its arguments."""
    name = getattr(func, "__name__", "")
    if name in _HARMLESS_INPLACE:
        return False
    if name in _INPLACE_DUNDERS or (name.endswith("_") and not name.endswith("__")):
        return True
    out = (kwargs or {}).get("out")
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return any(isinstance(o, _DecodedWeight) for o in outs)


class _DecodedWeight(torch.Tensor):
    """The dequantized weight of a packed layer, handed to code that reads ``module.weight``: a new
    tensor decoded from the codes at each access, so a change made to it would silently be lost.
    Every in-place edit is refused (``mul_``, ``w[...] = ``, ``+=``, ``nn.init.*_``, ``copy_``, ``out=``,
    assigning to ``.data``, how PEFT fuses a LoRA), through it or any view of it (``.data``,
    ``.detach()``, slices); results that are new tensors are plain tensors anyone may change. The
    forward never reads ``weight``, so none of this costs it anything."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if _writes(func, args, kwargs):
            name = getattr(func, "__name__", func)
            raise PackedWeightError(f"cannot change the weight of a packed bfq layer in place ({name}): {_EDIT_HINT}")
        with torch._C.DisableTorchFunctionSubclass():
            return _mark_views(func(*args, **(kwargs or {})), args)

    @property
    def data(self):
        return torch.Tensor.data.__get__(self)

    @data.setter
    def data(self, value):
        raise PackedWeightError(
            f"cannot write into the weights of a packed bfq layer (fusing a LoRA, assigning .data): {_EDIT_HINT}"
        )


def _mark_views(result, args):
    """``result`` with every tensor that shares memory with a ``_DecodedWeight`` argument marked as one."""
    storages = {a.untyped_storage().data_ptr() for a in args if isinstance(a, _DecodedWeight)}
    if type(result) in (tuple, list):  # split, unbind, ...
        return type(result)(_mark_views(r, args) for r in result)
    if isinstance(result, torch.Tensor) and not isinstance(result, _DecodedWeight) and storages:
        if result.untyped_storage().data_ptr() in storages:
            return result.as_subclass(_DecodedWeight)
    return result


class PackedLayer:
    """What :class:`PackedLinear` and :class:`PackedConv2d` share (mixed into the torch class)."""

    _plain: type[nn.Module]
    _channel_dim: int

    def __new__(cls, *args, **kwargs):
        # PEFT builds a Conv2d adapter with type(base_layer)(in, out, kernel, ...): give it a plain layer.
        if args or kwargs:
            return cls._plain(*args, **kwargs)
        return super().__new__(cls)

    @classmethod
    def from_module(cls, module: nn.Module, *, codes: torch.Tensor, scale_bits: torch.Tensor, bits: int,
                    num_levels: int, digits_per_word: int, word_bits: int, workspace: Workspace,
                    dtype: torch.dtype) -> PackedLayer:  # fmt: skip
        """A packed layer with ``module``'s hyper-parameters (a Linear/Conv2d, e.g. on the meta
        device), the given code stream and scales, and ``module``'s bias (still to be filled)."""
        packed = cls.__new__(cls)
        nn.Module.__init__(packed)
        internals = set(vars(packed))
        for key, value in vars(module).items():
            if key not in internals:
                setattr(packed, key, value)
        packed.bias = module.bias
        packed.weight_shape = list(module.weight.shape)
        packed.per_channel = math.prod(packed.weight_shape[1:])
        packed.bits, packed.num_levels = bits, num_levels
        packed.digits_per_word, packed.word_bits = digits_per_word, word_bits
        packed.workspace = workspace
        packed.register_buffer("codes", codes)
        packed.register_buffer("scale_bits", scale_bits)
        packed.register_buffer("_compute", torch.empty(0, dtype=dtype, device=codes.device), persistent=False)
        return packed

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (a new tensor each time, read-only; see :class:`_DecodedWeight`)."""
        return self.dequantize().as_subclass(_DecodedWeight)

    def __setattr__(self, name, value):
        if name == "weight":
            raise PackedWeightError(f"cannot replace the weight of a packed bfq layer ({type(self).__name__})")
        super().__setattr__(name, value)

    def dequantize(self, c0: int = 0, c1: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Output channels c0..c1-1 (default: all) dequantized in the compute dtype."""
        c1 = self.weight_shape[0] if c1 is None else c1
        return dequantize(self.codes, self.scale_bits, self.weight_shape, self.bits, self.num_levels,
                          self.digits_per_word, self.word_bits, c0, c1, self._compute.dtype, out)  # fmt: skip

    def _blocks(self) -> list[tuple[int, int]]:
        channels = self.weight_shape[0]
        grouped = getattr(self, "groups", 1) != 1
        step = channels if grouped else self.workspace.block_channels(self.per_channel, channels, self._compute.dtype)
        return [(c, min(c + step, channels)) for c in range(0, channels, step)]

    def _block_weight(self, c0: int, c1: int, keep: bool) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return dequantize_op(self.codes, self.scale_bits, self.weight_shape, self.bits, self.num_levels,
                                 self.digits_per_word, self.word_bits, c0, c1, self._compute.dtype)  # fmt: skip
        if keep:  # autograd saves the weight for the backward pass: it must not be overwritten
            return self.dequantize(c0, c1)
        count = (c1 - c0) * self.per_channel
        return self.dequantize(c0, c1, out=self.workspace.get(self.codes.device, self._compute.dtype, count))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = torch.is_grad_enabled() and x.requires_grad
        blocks = self._blocks()
        outputs = []
        for c0, c1 in blocks:
            bias = None if self.bias is None else self.bias[c0:c1]
            outputs.append(self._apply_weight(x, self._block_weight(c0, c1, keep), bias))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=self._channel_dim)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}, levels={self.num_levels}, packed"


class PackedLinear(PackedLayer, nn.Linear):
    _plain = nn.Linear
    _channel_dim = -1

    def _apply_weight(self, x, weight, bias):
        return F.linear(x, weight, bias)


class PackedConv2d(PackedLayer, nn.Conv2d):
    _plain = nn.Conv2d
    _channel_dim = 1

    def _apply_weight(self, x, weight, bias):
        return self._conv_forward(x, weight, bias)


PACKED_TYPES = {nn.Linear: PackedLinear, nn.Conv2d: PackedConv2d}


def packed_layers(model: nn.Module):
    """``(name, module)`` for every packed layer of ``model``."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, PackedLayer)]


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model`` (codes, scales, dense tensors, time cache),
    plus its workspaces as allocated now."""
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    workspaces = {id(m.workspace): m.workspace for _, m in packed_layers(model)}
    return total + sum(w.nbytes() for w in workspaces.values())
