"""Plots of analyses and allocations (need matplotlib: ``pip install 'bfq[plot]'``)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from bfq._io import atomic_path


# the first and last layers of a UNet (conv_in/conv_out) and of a diffusion transformer (patch embedding, proj_out)
FIRST_LAST = ("conv_in.weight", "conv_out.weight", "pos_embed.proj.weight", "proj_out.weight")


def _block_of(name: str) -> str:
    parts = name.split(".")
    if parts[0] in ("down_blocks", "up_blocks"):
        return f"{parts[0][:-7]}{parts[1]}"  # down0, up2
    if parts[0] == "transformer_blocks":
        return f"b{parts[1]}"  # a DiT's block
    if parts[0] == "mid_block":
        return "mid"
    if parts[0] == "caption_projection":
        return "caption"
    return parts[0].replace(".weight", "")


def _is_dit(names) -> bool:
    return any(n.startswith("transformer_blocks.") for n in names)


def layer_kind(name: str) -> str:
    """A coarse layer type for plots: resnet conv, shortcut, sampler, self-attn, cross-attn q/out,
    cross-attn k/v, ff, proj, caption proj, time proj, first/last."""
    if name in FIRST_LAST:
        return "first/last"
    if "time_emb_proj" in name or name.startswith("adaln_single."):
        return "time proj"
    if name.startswith("caption_projection."):
        return "caption proj"
    if "conv_shortcut" in name:
        return "shortcut"
    if "samplers" in name:
        return "sampler"
    if ".attn1." in name:
        return "self-attn"
    if ".attn2." in name:
        return "cross-attn k/v" if (".to_k." in name or ".to_v." in name) else "cross-attn q/out"
    if ".ff." in name:
        return "ff"
    if "proj_in" in name or "proj_out" in name:
        return "proj"
    return "resnet conv"


KIND_COLORS = {
    "resnet conv": "#4c72b0", "shortcut": "#dd8452", "sampler": "#8c8c8c", "self-attn": "#55a868",
    "cross-attn q/out": "#c44e52", "cross-attn k/v": "#8172b3", "ff": "#937860", "proj": "#da8bc3",
    "time proj": "#ccb974", "first/last": "#222222", "caption proj": "#64b5cd",
}  # fmt: skip


def unet_order(names) -> list[str]:
    """``names`` reordered along the model's data flow: conv_in, down blocks, mid block, up blocks,
    conv_out (diffusers registers ``mid_block`` after ``up_blocks``); a diffusion transformer's
    patch embedding, caption projection, time projection, blocks, proj_out; stable within a block."""
    blocks = ("down_blocks", "up_blocks", "transformer_blocks")

    def key(item):
        i, n = item
        b = n.split(".")[0]
        rank = {"conv_in": 0, "time_embedding": 0, "pos_embed": 0, "caption_projection": 0, "adaln_single": 0,
                "down_blocks": 1, "transformer_blocks": 1, "mid_block": 2, "up_blocks": 3}.get(b, 4)  # fmt: skip
        sub = int(n.split(".")[1]) if b in blocks else 0
        return (rank, sub, i)

    return [n for _, n in sorted(enumerate(names), key=key)]


def require_matplotlib():
    """Import matplotlib with the Agg backend, or raise ImportError saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'bfq[plot]' (or pip install matplotlib)") from None
    return matplotlib


def plot_allocation(alloc, path, *, title: str | None = None) -> Path:
    """Bits per layer across the UNet (down, mid, up) or a diffusion transformer's blocks, coloured
    by layer type, with log10 layer sizes underneath: the paper's App. H table as a picture. ``alloc`` may be a :class:`bfq.pipeline.allocate.Allocation`
    or ``{"bits": {...}, "n_weights": {...}}``. Needs matplotlib."""
    matplotlib = require_matplotlib()

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    is_mapping = isinstance(alloc, Mapping)
    bits = alloc["bits"] if is_mapping else alloc.bits
    counts = alloc["n_weights"] if is_mapping else alloc.n_weights
    names = unet_order(list(bits))
    x = np.arange(len(names))
    kinds = [layer_kind(n) for n in names]
    fig_w = min(max(8.0, 0.09 * len(names) + 3), 40.0)
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(fig_w, 5.2), sharex=True, height_ratios=(3, 1))
    ax.bar(x, [bits[n] for n in names], width=0.85, color=[KIND_COLORS[k] for k in kinds])
    ax2.bar(x, [math.log10(counts[n]) for n in names], width=0.85, color=[KIND_COLORS[k] for k in kinds])
    blocks = [_block_of(n) for n in names]
    start = 0
    for i in range(1, len(names) + 1):
        if i == len(names) or blocks[i] != blocks[start]:
            if blocks[start] not in ("conv_in", "conv_out", "pos_embed", "proj_out"):
                numbered = blocks[start].startswith(("down", "up", "b")) and blocks[start][-1].isdigit()
                shade = 0.06 if numbered and int(blocks[start].lstrip("downupb")) % 2 else 0.0
                shade = 0.12 if blocks[start] == "mid" else shade
                for a in (ax, ax2):
                    a.axvspan(start - 0.5, i - 0.5, color="k", alpha=shade, lw=0)
                ax.text((start + i - 1) / 2, 8.35, blocks[start], ha="center", va="bottom", fontsize=8)
            start = i
    ax.set_ylim(0, 9)
    ax.set_yticks(range(0, 9))
    ax.set_ylabel("bits")
    ax2.set_ylabel("log10 N")
    ax2.set_xlim(-0.7, len(names) - 0.3)
    ax2.set_xticks([])
    ax2.set_xlabel("layers in model order (patch embedding → blocks → proj_out)" if _is_dit(names)
                   else "layers in UNet order (down → mid → up)")  # fmt: skip
    used = [k for k in KIND_COLORS if k in set(kinds)]
    handles = [plt.Rectangle((0, 0), 1, 1, color=KIND_COLORS[k]) for k in used]
    fig.legend(handles, used, ncol=len(used), fontsize=7, loc="lower center", frameon=False, handlelength=1.0)
    if title is None and not is_mapping:
        title = f"{alloc.name}: {alloc.avg_bits:.4f} average bits ({alloc.method} allocation)"
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return save_figure(fig, path)


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Write a matplotlib figure atomically (PNG at 110 dpi by the suffix) and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return Path(path)
