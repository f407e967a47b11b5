"""What a bf16 UNet on the CPU computes differently from diffusers' defaults, because it is faster
there (measured on the SD-v1.5 shape, bench/cpu_speed_bench.py); packed and dense alike, so the two
runtimes still give the same bits.

* Attention, on one or two threads: torch's CPU flash-attention kernel runs SD's self-attention (4096
  tokens of head size 40 at 512x512) slower in bf16 than in float32, and there that attention is
  40% of a bf16 forward. Per head, in blocks of query rows whose scores (2 MB) stay in cache
  (several heads at once when they are that small), plain bf16 ``bmm`` → ``softmax`` → ``bmm``
  takes about half that time. For anything but plain attention (masks, extra norms) diffusers'
  own processor runs.
* Convolutions over few output pixels (8x8 at batch 2: SD's lowest resolutions), on one thread,
  are bound by oneDNN reordering the weight at every call (a packed layer's weight is new at every
  call); im2col and one GEMM on the weight as it is take a third to a half of that time.

The attention is measured faster on one and two threads (two threads, quiet machine, packed bf16
of SD-v1.5 at 512x512: 4.91 s against 5.20 s with the flash kernel), the convolutions on one
thread only (two threads gave no usable timings when they were measured); on more threads
diffusers' and torch's own paths run.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

_SCORES_PER_BLOCK = 1 << 20  # bf16 scores of one block of query rows: 2 MB
_ATTENTION_MAX_THREADS = 2  # measured faster than torch's flash kernel on 1 and 2 threads
_IM2COL_ROWS = 128  # output pixels (batch x height x width) up to which a convolution is im2col + GEMM


def install(model: nn.Module) -> None:
    """Give ``model``'s plain attentions the blocked processor and its convolutions the im2col path
    (each steps aside at run time unless the input is bf16 on the CPU and torch runs one thread)."""
    try:
        from diffusers.models.attention_processor import AttnProcessor2_0
    except ImportError:  # another diffusers: its own attention it is
        AttnProcessor2_0 = None
    processors = getattr(model, "attn_processors", None)
    if AttnProcessor2_0 and processors and any(type(p) is AttnProcessor2_0 for p in processors.values()):
        model.set_attn_processor({name: CpuBlockedAttnProcessor() if type(p) is AttnProcessor2_0 else p
                                  for name, p in processors.items()})  # fmt: skip
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module._conv_forward = types.MethodType(_conv_forward, module)


# ---------------------------------------------------------------------------------- attention


def blocked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ/√d)·v for ``[batch, heads, tokens, d]`` tensors in blocks of about
    ``_SCORES_PER_BLOCK`` scores: blocks of query rows of one head, or several whole heads when
    they are small (no mask, no dropout); the result is contiguous ``[batch, tokens, heads·d]``."""
    batch, heads, tokens, dim = query.shape
    keys = key.shape[2]
    rows = min(tokens, max(64, _SCORES_PER_BLOCK // keys))
    group = max(1, _SCORES_PER_BLOCK // (tokens * keys)) if rows == tokens else 1
    q = (query * dim**-0.5).reshape(batch * heads, tokens, dim)
    k_t, v = key.reshape(batch * heads, keys, dim).transpose(1, 2), value.reshape(batch * heads, keys, dim)
    out = q.new_empty(batch * heads, tokens, dim)
    for i in range(0, batch * heads, group):
        j = i + group
        for r in range(0, tokens, rows):
            out[i:j, r : r + rows] = torch.bmm(torch.bmm(q[i:j, r : r + rows], k_t[i:j]).softmax(-1), v[i:j])
    return out.view(batch, heads, tokens, dim).transpose(1, 2).reshape(batch, tokens, heads * dim)


class CpuBlockedAttnProcessor:
    """diffusers' ``AttnProcessor2_0`` with :func:`blocked_attention` for plain bf16 attention on one
    CPU thread (what SD-style UNets run); every other case goes to ``AttnProcessor2_0`` itself."""

    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.default = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if args or kwargs or not _plain(attn, hidden_states, attention_mask):
            return self.default(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        hidden_states = attn.to_out[0](blocked_attention(query, key, value))
        return attn.to_out[1](hidden_states)


def _plain(attn, hidden_states: torch.Tensor, attention_mask) -> bool:
    return (
        _cpu_bf16(hidden_states) and hidden_states.ndim == 3 and torch.get_num_threads() <= _ATTENTION_MAX_THREADS
        and attention_mask is None and attn.spatial_norm is None and attn.group_norm is None
        and not attn.norm_cross and attn.norm_q is None and attn.norm_k is None
        and not attn.residual_connection and attn.rescale_output_factor == 1
    )  # fmt: skip


def _cpu_bf16(x: torch.Tensor) -> bool:
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and not torch.compiler.is_compiling()


# ------------------------------------------------------------------------------- convolution


def _conv_forward(self: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``nn.Conv2d._conv_forward``, through :func:`im2col_conv` for a bf16 CPU input with few output
    pixels on one thread."""
    if _cpu_bf16(x) and torch.get_num_threads() == 1 and _few_pixels(self, x):
        return im2col_conv(x, weight, bias, self.stride, self.padding)
    return type(self)._conv_forward(self, x, weight, bias)


def _few_pixels(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    if x.dim() != 4 or conv.groups != 1 or conv.dilation != (1, 1) or conv.padding_mode != "zeros" \
            or isinstance(conv.padding, str):  # fmt: skip
        return False
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    pixels = ((x.shape[2] + 2 * ph - kh) // sh + 1) * ((x.shape[3] + 2 * pw - kw) // sw + 1)
    return x.shape[0] * pixels <= _IM2COL_ROWS


def im2col_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding) -> torch.Tensor:
    """``F.conv2d`` without groups or dilation as im2col and one matrix product; the output is
    channels-last."""
    (sh, sw), (ph, pw) = stride, padding
    kh, kw = weight.shape[-2:]
    patches = F.pad(x, (pw, pw, ph, ph)).unfold(2, kh, sh).unfold(3, kw, sw)  # [B, C, Ho, Wo, kh, kw]
    batch, _, height, width = patches.shape[:4]
    cols = patches.permute(0, 2, 3, 1, 4, 5).reshape(batch * height * width, -1)  # rows in (C, kh, kw) order
    weight = weight.reshape(weight.shape[0], -1).t()
    out = torch.mm(cols, weight) if bias is None else torch.addmm(bias, cols, weight)
    return out.view(batch, height, width, -1).permute(0, 3, 1, 2)
