"""What the two stages optimize: timestep sampling, the frozen float teacher, block-output hooks
for feature distillation, teacher samples for prompts-only data, and :class:`StageLoss`."""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bfq.families import family_of
from bfq.pipeline.finetune.config import _STAGE_TAG, T_SAMPLINGS, FinetuneConfig
from bfq.pipeline.finetune.data import _seed
from bfq.quant.nn import QUANT_MODULES, QuantLinear


def sample_timesteps(n: int, num_train_timesteps: int, rng: np.random.Generator, method: str = "beta",
                     alpha: float = 3.0, beta: float = 1.0) -> torch.Tensor:  # fmt: skip
    """``n`` integer timesteps in ``0..T-1``: ``min(T-1, floor(T*u))`` with ``u ~ Beta(alpha, beta)``
    (BitsFusion's quantization-error-aware sampling; mean ``T*alpha/(alpha+beta)``) or uniform."""
    T = int(num_train_timesteps)
    if method == "uniform":
        return torch.from_numpy(rng.integers(0, T, size=n)).long()
    if method != "beta":
        raise ValueError(f"t_sampling must be one of {T_SAMPLINGS}, got {method!r}")
    u = rng.beta(alpha, beta, size=n)
    return torch.from_numpy(np.minimum(T - 1, np.floor(T * u))).long()


def is_frozen_time_layer(name: str, module: nn.Module, family=None) -> bool:
    """True for the time layers kept in floating point and frozen: those the model's family puts on
    the time path (a UNet's ``time_embedding.*`` and every ``time_emb_proj``; a PixArt transformer's
    ``adaln_single.*``) that are not quantized layers (``name`` is the module's name; ``family``
    default: SD's)."""
    if isinstance(module, QUANT_MODULES):
        return False
    if family is None:
        from bfq.families import sd15

        family = sd15.FAMILY
    return family.is_time_layer(name)


def trainable_parameters(unet: nn.Module, train_dense: bool = True) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` the fine-tuning trains, in ``named_parameters`` order: the latent
    weights and scales of every quantized layer, plus (``train_dense``) every other parameter
    except the frozen time layers."""
    frozen, quant = set(), set()
    family = family_of(unet)
    for name, module in unet.named_modules():
        own = [f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False)]
        if is_frozen_time_layer(name, module, family):
            frozen.update(own)
        elif isinstance(module, QUANT_MODULES):
            quant.update(own)
    return [(n, p) for n, p in unet.named_parameters() if n not in frozen and (train_dense or n in quant)]


@torch.no_grad()
def float_teacher(student: nn.Module) -> nn.Module:
    """A frozen float copy of a *freshly initialized* quantized UNet: every :mod:`bfq.quant.nn` layer
    becomes a plain ``nn.Linear``/``nn.Conv2d`` with the latent weight (which is the original
    weight until training changes it), everything else is copied."""
    teacher = copy.deepcopy(student)
    for name, module in list(teacher.named_modules()):
        if not isinstance(module, QUANT_MODULES):
            continue
        if isinstance(module, QuantLinear):
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        else:
            plain = nn.Conv2d(
                module.in_channels, module.out_channels, module.kernel_size, stride=module.stride, padding=module.padding,
                dilation=module.dilation, groups=module.groups, bias=module.bias is not None,
                padding_mode=module.padding_mode, device="meta",
            )  # fmt: skip
        plain.weight, plain.bias = module.weight, module.bias
        parent, _, child = name.rpartition(".")
        setattr(teacher.get_submodule(parent) if parent else teacher, child, plain)
    return teacher.eval().requires_grad_(False)


def noise_scheduler_from(scheduler_or_config=None):
    """A ``DDPMScheduler`` (for ``add_noise``) from a scheduler, a scheduler config, or None
    (SD-v1.5's scaled-linear 1000-step schedule)."""
    from diffusers import DDPMScheduler

    from bfq.pipeline.models import sd15_scheduler_config

    if scheduler_or_config is None:
        cfg = sd15_scheduler_config()
    elif hasattr(scheduler_or_config, "config"):
        cfg = scheduler_or_config.config
    else:
        cfg = scheduler_or_config
    return DDPMScheduler.from_config(dict(cfg))


class _FeatureHooks:
    """Collects the hidden-state output of every block the model's family names for feature
    distillation (a UNet's ``down_blocks[i]`` and ``up_blocks[i]``, a PixArt transformer's
    ``transformer_blocks[i]``), but only inside :meth:`collecting`: any other forward (an
    evaluation, teacher sampling, a checkpoint recomputation) retains nothing."""

    def __init__(self, unet: nn.Module):
        self.outputs: list[torch.Tensor] = []
        self.active = False
        family = family_of(unet)
        blocks = family.feature_modules(unet)
        if not blocks:
            raise ValueError(f"feature distillation needs the blocks of a {family.title} model, and this one has none")
        self.handles = [b.register_forward_hook(self._hook) for b in blocks]

    def _hook(self, module, args, output):
        if self.active:
            self.outputs.append(output[0] if isinstance(output, (tuple, list)) else output)

    @contextlib.contextmanager
    def collecting(self):
        """Collect the block outputs of the forwards run inside this block (earlier ones are dropped)."""
        self.outputs, self.active = [], True
        try:
            yield
        finally:
            self.active = False

    def take(self) -> list[torch.Tensor]:
        out, self.outputs = self.outputs, []
        return out

    def remove(self):
        for h in self.handles:
            h.remove()
        self.outputs, self.active = [], False


@torch.no_grad()
def teacher_samples(teacher, ehs, uncond, scheduler_config, *, steps: int, cfg: float, generator,
                    sample_shape, added: dict | None = None, uncond_added: dict | None = None) -> torch.Tensor:  # fmt: skip
    """Clean latents ``x_0`` sampled by ``teacher`` (DDIM, eta 0, classifier-free guidance ``cfg``)
    for the text embeddings ``ehs`` ``[B, S, D]`` and ``added``, the family's other conditioning
    tensors as a flat dict (SDXL: ``text_embeds``, ``time_ids``; PixArt: ``encoder_attention_mask``),
    with ``uncond_added`` the unconditional branch's where they depend on the prompt; initial noise
    from ``generator`` (CPU)."""
    from diffusers import DDIMScheduler

    device = ehs.device
    sched = DDIMScheduler.from_config(dict(scheduler_config), clip_sample=False)
    sched.set_timesteps(steps)
    z = torch.randn((ehs.shape[0], *sample_shape), generator=generator).to(device) * sched.init_noise_sigma
    flat = {"encoder_hidden_states": torch.cat([uncond.expand_as(ehs), ehs])}
    flat.update({k: torch.cat([(uncond_added or {}).get(k, v).expand_as(v), v]) for k, v in (added or {}).items()})
    family = family_of(teacher)
    kwargs = family.model_kwargs(flat)
    for t in sched.timesteps:
        eps = family.forward(teacher, torch.cat([z, z]), t.to(device), kwargs).float()
        e_u, e_c = eps.chunk(2)
        z = sched.step(e_u + cfg * (e_c - e_u), t, z, eta=0.0).prev_sample
    return z


class StageLoss:
    """The loss of one stage for micro-batch ``index``: Stage I distills the teacher's noise
    prediction (plus ``feat_weight`` x the block outputs), Stage II predicts the noise (or v).
    Every random draw comes from generators seeded by ``(seed, stage, index)``."""

    def __init__(self, cfg: FinetuneConfig, student: nn.Module, teacher: nn.Module | None, scheduler, uncond, acc):
        self.cfg, self.teacher, self.student, self.acc = cfg, teacher, student, acc
        self.sched_config = dict(noise_scheduler_from(scheduler).config)
        self.noise_sched = noise_scheduler_from(self.sched_config)
        self.T = int(self.noise_sched.config.num_train_timesteps)
        self.prediction = self.noise_sched.config.prediction_type
        self.uncond = uncond
        self.family = family_of(student)
        self.required = self.family.required_cond_keys(dict(student.config))
        use_feat = cfg.stage == "distill" and cfg.feat_weight > 0
        self.hooks = (_FeatureHooks(student), _FeatureHooks(teacher)) if use_feat else None

    def remove_hooks(self) -> None:
        if self.hooks:
            for h in self.hooks:
                h.remove()

    def _collecting(self, which: int):
        """Feature hooks of the student (0) or the teacher (1) collecting, if feature distillation is on."""
        return self.hooks[which].collecting() if self.hooks else contextlib.nullcontext()

    def __call__(self, model: nn.Module, batch: dict, index: int) -> tuple[torch.Tensor, dict]:
        cfg, dev = self.cfg, self.acc.device
        tag = _STAGE_TAG[cfg.stage]
        rng = np.random.default_rng(_seed(cfg.seed, tag, index, 0))
        gen = torch.Generator().manual_seed(_seed(cfg.seed, tag, index, 1))
        ehs = batch["encoder_hidden_states"].to(dev, torch.float32)
        b = ehs.shape[0]
        uncond = batch.get("uncond_hidden_states", self.uncond)
        if uncond is None and (cfg.uncond_prob > 0 or "latents" not in batch):
            raise ValueError("no unconditional embedding: give batches an 'uncond_hidden_states' or pass uncond_hidden_states=")
        if uncond is not None:
            uncond = uncond.to(dev, torch.float32)
            uncond = uncond[None] if uncond.dim() == ehs.dim() - 1 else uncond
        added, uncond_added = self._added(batch, dev)
        x0 = batch.get("latents")
        if x0 is None:
            x0 = self._teacher_x0(ehs, uncond, gen, added, uncond_added)
        x0 = x0.to(dev, torch.float32)
        noise = torch.randn(x0.shape, generator=gen).to(dev)
        t = sample_timesteps(b, self.T, rng, cfg.t_sampling, cfg.beta_alpha, cfg.beta_beta).to(dev)
        drop = torch.from_numpy(rng.random(b) < cfg.uncond_prob).to(dev)
        if bool(drop.any()):
            ehs = torch.where(drop[:, None, None], uncond.expand_as(ehs), ehs)
        zt = self.noise_sched.add_noise(x0, noise, t)
        flat = {"encoder_hidden_states": ehs, **added}
        if bool(drop.any()):
            for k, u in uncond_added.items():
                v = flat[k]
                flat[k] = torch.where(drop.view(-1, *[1] * (v.dim() - 1)), u.expand_as(v), v)
        kwargs = self.family.model_kwargs(flat)
        with self._collecting(0), self.acc.autocast():
            pred = self.family.forward(model, zt, t, kwargs).float()
        if cfg.stage == "noise":
            target = noise if self.prediction == "epsilon" else self.noise_sched.get_velocity(x0, noise, t)
            loss = F.mse_loss(pred, target)
            return loss, {"loss_noise": loss.detach()}
        with torch.no_grad(), self._collecting(1), self.acc.autocast():
            target = self.family.forward(self.teacher, zt, t, kwargs).float()
        l_noise = F.mse_loss(pred, target)
        parts = {"loss_noise": l_noise.detach()}
        loss = l_noise
        if self.hooks:
            fs, ft = self.hooks[0].take(), self.hooks[1].take()
            l_feat = sum(F.mse_loss(a.float(), c.float()) for a, c in zip(fs, ft))
            loss = loss + cfg.feat_weight * l_feat
            parts["loss_feat"] = l_feat.detach()
        return loss, parts

    def _added(self, batch: dict, dev) -> tuple[dict, dict]:
        """The batch's conditioning besides the text, flat (SDXL: ``text_embeds``, ``time_ids``;
        PixArt: ``encoder_attention_mask``, and the size conditions of a model that uses them), and the
        unconditional values that CFG dropout puts in for those that depend on the prompt
        (``uncond_<key>`` of the batch, default zeros: what SDXL's pipeline uses for the empty prompt)."""
        missing = [k for k in self.required if k not in batch]
        if missing:
            raise ValueError(f"this {self.family.title} model needs {', '.join(missing)} in every batch "
                             "(its added_cond_kwargs); the batch has only " + ", ".join(sorted(batch)))  # fmt: skip
        keys = dict.fromkeys(self.family.added_cond_keys + self.family.prompt_cond_keys)
        added = {k: batch[k].to(dev, torch.float32) for k in keys if k in batch}
        uncond = {}
        for k in self.family.prompt_cond_keys:
            if k in added:
                u = batch.get(f"uncond_{k}", torch.zeros_like(added[k][:1]))
                uncond[k] = u.to(dev, torch.float32).reshape(1, *added[k].shape[1:])
        return added, uncond

    def _teacher_x0(self, ehs, uncond, gen, added=None, uncond_added=None):
        if self.teacher is None:
            raise ValueError("batches without latents need a teacher to sample them from (prompts-only mode)")
        c = self.student.config
        shape = (c.in_channels, c.sample_size, c.sample_size)
        with self.acc.autocast():
            return teacher_samples(self.teacher, ehs, uncond, self.sched_config, steps=self.cfg.sample_steps,
                                   cfg=self.cfg.sample_cfg, generator=gen, sample_shape=shape, added=added,
                                   uncond_added=uncond_added)  # fmt: skip
