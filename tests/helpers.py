"""Shared test helpers: small seeded diffusers UNets (importable by every test module)."""

from __future__ import annotations

import torch


def tiny_unet_config(cross_attention_dim: int = 16, **overrides) -> dict:
    """A 2-level UNet2DConditionModel config: cross-attention, conv shortcuts, down/up samplers."""
    cfg = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
    )
    cfg.update(overrides)
    return cfg


def tiny_unet(seed: int = 0, cross_attention_dim: int = 16, dtype=torch.float32, **overrides):
    """A seeded random tiny UNet2DConditionModel (eval mode, CPU). Weights are re-drawn from
    N(0, 0.3^2) (biases N(0, 0.1^2)) so that every layer, incl. zero-initialised ones, matters."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config(cross_attention_dim, **overrides))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            std = 0.1 if name.endswith("bias") else 0.3
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))
    if dtype != torch.float32:
        unet = unet.to(dtype)
    return unet.eval()


def tiny_inputs(unet, batch: int = 2, seed: int = 0, seq: int = 5):
    """(sample, encoder_hidden_states) for ``unet``, seeded."""
    gen = torch.Generator().manual_seed(seed)
    cfg = unet.config
    size = cfg.sample_size
    sample = torch.randn(batch, cfg.in_channels, size, size, generator=gen)
    ehs = torch.randn(batch, seq, cfg.cross_attention_dim, generator=gen)
    dtype = next(unet.parameters()).dtype
    return sample.to(dtype), ehs.to(dtype)


def layer_weights(unet) -> dict:
    """``{"<module>.weight": weight}`` of every Linear/Conv2d of ``unet``, dense or packed (a packed
    layer's ``weight`` is its dequantized weight)."""
    return {f"{name}.weight": m.weight.detach() for name, m in unet.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}  # fmt: skip
