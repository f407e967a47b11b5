"""Attention for a bf16 UNet on one CPU thread: blocks of query rows whose scores stay in cache.

torch's CPU flash-attention kernel runs SD's self-attention (4096 tokens of head size 40 at
512x512) slower in bf16 than in float32 (about 1.0 s against 0.9 s per layer, one thread), and
there that attention is 40% of a bf16 forward. Per head, in blocks of query rows sized so that
their scores (about 2 MB) stay in cache, plain bf16 ``mm`` → ``softmax`` → ``mm`` takes about half
that time (bench/cpu_speed_bench.py). On several threads these small products scale poorly, so
there, and for anything but plain attention (masks, extra norms), diffusers' own processor runs.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import nn

_SCORES_PER_BLOCK = 1 << 20  # bf16 scores of one block of query rows: 2 MB


def blocked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ/√d)·v for ``[batch, heads, tokens, d]`` tensors, one head and one block of
    query rows at a time (no mask, no dropout); the result is contiguous ``[batch, tokens, heads·d]``."""
    batch, heads, tokens, dim = query.shape
    rows = max(64, _SCORES_PER_BLOCK // key.shape[2])
    query = query * dim**-0.5
    out = query.new_empty(batch, tokens, heads, dim)
    for b in range(batch):
        for h in range(heads):
            q, k_t, v, o = query[b, h], key[b, h].t(), value[b, h], out[b, :, h]
            for r in range(0, tokens, rows):
                o[r : r + rows] = torch.mm(torch.mm(q[r : r + rows], k_t).softmax(-1), v)
    return out.view(batch, tokens, heads * dim)


class CpuBlockedAttnProcessor(AttnProcessor2_0):
    """diffusers' ``AttnProcessor2_0`` with :func:`blocked_attention` for plain bf16 attention on one
    CPU thread (what SD-style UNets run); every other case goes to ``AttnProcessor2_0`` itself."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if args or kwargs or not _plain(attn, hidden_states, attention_mask):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        hidden_states = attn.to_out[0](blocked_attention(query, key, value))
        return attn.to_out[1](hidden_states)


def _plain(attn, hidden_states: torch.Tensor, attention_mask) -> bool:
    return (
        hidden_states.device.type == "cpu" and hidden_states.dtype == torch.bfloat16 and hidden_states.ndim == 3
        and torch.get_num_threads() == 1 and attention_mask is None and not torch.compiler.is_compiling()
        and attn.spatial_norm is None and attn.group_norm is None and not attn.norm_cross
        and attn.norm_q is None and attn.norm_k is None and not attn.residual_connection
        and attn.rescale_output_factor == 1
    )  # fmt: skip


def use_blocked_attention(model: nn.Module) -> None:
    """Give every attention of ``model`` that runs diffusers' default processor the blocked one."""
    processors = getattr(model, "attn_processors", None)
    if not processors or not any(type(p) is AttnProcessor2_0 for p in processors.values()):
        return
    model.set_attn_processor({name: CpuBlockedAttnProcessor() if type(p) is AttnProcessor2_0 else p
                              for name, p in processors.items()})  # fmt: skip
