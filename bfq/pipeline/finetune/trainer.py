"""Stage 4: two-stage quantization-aware fine-tuning (BitsFusion §4.2; BITSFUSION.md §6).

* **Stage I** (``stage="distill"``): the student (a UNet whose layers are :mod:`bfq.nn` modules) and
  the frozen full-precision teacher see the same noisy latent ``z_t``, timestep ``t`` and text
  embedding ``c``; ``c`` is the empty-prompt embedding with probability ``uncond_prob`` (0.1), so the
  student learns the unconditional branch classifier-free guidance needs. Loss:
  ``MSE(eps_student, eps_teacher) + feat_weight * sum_k MSE(F_student_k, F_teacher_k)`` over the
  hidden-state outputs of every ``down_blocks[k]`` and ``up_blocks[k]`` (``feat_weight`` = 0.01).
* **Stage II** (``stage="noise"``): the plain denoising loss ``MSE(eps_student, eps)`` (or the
  velocity for v-prediction schedulers) with the same 10% text dropout.

Both stages draw ``t = min(T-1, floor(T*u))`` with ``u ~ Beta(3, 1)`` over the scheduler's
``num_train_timesteps`` T (``t_sampling="uniform"`` for the ablation), noise clean latents with a
``DDPMScheduler`` built from the pipeline's scheduler config, and train the latent weights and the
scales (LSQ straight-through estimator) plus, with ``train_dense``, biases and norms, with AdamW at a
constant learning rate (1e-5). The time layers (``time_embedding`` and every ``time_emb_proj`` that
is not a quantized layer) stay in floating point and frozen, so training covers every t in 0..T-1
through the normal time path and the time cache computed at export is exactly the untrained one.

The loop runs through Hugging Face accelerate: one CPU, one GPU (``mixed_precision`` "bf16"/"fp16",
``gradient_checkpointing``), or many processes under ``accelerate launch`` (DDP; every rank reads
different batches, gradients are averaged, so all ranks keep identical parameters), with gradient
accumulation. Every random draw of micro-batch ``i`` (timesteps, noise, text dropout, teacher
samples) comes from a generator seeded by ``(seed, stage, i)``, and indexed batch sources
(:mod:`bfq.finetune_data`) compute batch ``i`` directly; so a run resumed from a checkpoint
(student state incl. scales, AdamW state, step, torch RNG states, grad-scaler state) continues
exactly as if it had not stopped.

Python entry points: :func:`finetune` (any ``UNet2DConditionModel``, any iterable of conditioning
batches), :func:`run_finetune_stages` (both stages for a resolved model, what ``bfq quantize
--stage1-steps/--stage2-steps`` calls), :func:`bfq.export.export_finetuned` (a trained student to ``.bfq``); the whole
``bfq quantize``/``bfq finetune`` pipeline is :func:`bfq.quantize.quantize`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bfq.finetune_data import _seed
from bfq.nn import QUANT_MODULES, QuantLinear, iter_quantized

STAGES = ("distill", "noise")
T_SAMPLINGS = ("beta", "uniform")
MIXED_PRECISIONS = ("no", "bf16", "fp16")
_STAGE_TAG = {"distill": 1, "noise": 2}
# Fields that do not change the training trajectory: a resumed run may change them.
_FREE_FIELDS = {"steps", "checkpoint_every", "keep_checkpoints", "log_every", "eval_every", "eval_clip", "eval_prompts",
                "tensorboard", "progress", "gradient_checkpointing", "cpu"}  # fmt: skip


@dataclass
class FinetuneConfig:
    """Settings of one fine-tuning stage (defaults: the paper's, BITSFUSION.md §6.3).

    Attributes:
        stage: "distill" (Stage I) or "noise" (Stage II).
        steps: optimizer steps.
        lr, weight_decay, adam_betas, adam_eps: AdamW, constant learning rate.
        max_grad_norm: gradient clipping (None: off).
        batch_size: examples per micro-batch and process (used by the built-in data sources).
        grad_accum: micro-batches per optimizer step.
        uncond_prob: probability of replacing a sample's text by the empty-prompt embedding.
        feat_weight: lambda of the feature-distillation term (Stage I; 0 turns it off).
        t_sampling: "beta" (``Beta(beta_alpha, beta_beta)``, the paper's 3, 1) or "uniform".
        train_dense: also train biases and norms (kept in floating point); else only the
            quantized layers' latent weights and scales.
        mixed_precision: "no", "bf16" or "fp16" (accelerate autocast; master weights stay fp32).
        gradient_checkpointing: recompute activations in the backward pass (saves memory).
        seed: seeds every random draw (with the stage and the micro-batch index).
        checkpoint_every: save a checkpoint every N steps into the run directory (0: only at the end; there is always one at the end).
        keep_checkpoints: how many checkpoints to keep.
        log_every: steps between log lines (JSON lines in ``run_dir/log.jsonl``).
        eval_every: steps between evaluations by ``eval_fn`` (0: off); also at start and end.
        sample_steps, sample_cfg: DDIM steps and guidance scale of the teacher samples that stand in
            for latents when a batch has none (prompts-only data).
        data: the data source for the command line and :func:`run_finetune_stages`
            (``tiny-sd-digits``, ``folder:PATH``, ``prompts:FILE``; None: the model's built-in data).
        eval_clip, eval_prompts: a local CLIP model directory and a prompt file: the periodic
            evaluation of models other than tiny-sd is then the CLIP score (:func:`bfq.finetune_eval.clip_eval_fn`).
        tensorboard: also log to TensorBoard (``run_dir/tensorboard``) when it is installed.
        progress: show a progress bar with loss and throughput.
        cpu: run on the CPU even when an accelerator is present.
    """

    stage: str = "distill"
    steps: int = 1000
    lr: float = 1e-5
    weight_decay: float = 1e-2
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    batch_size: int = 16
    grad_accum: int = 1
    uncond_prob: float = 0.1
    feat_weight: float = 0.01
    t_sampling: str = "beta"
    beta_alpha: float = 3.0
    beta_beta: float = 1.0
    train_dense: bool = True
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    eval_every: int = 0
    sample_steps: int = 20
    sample_cfg: float = 7.5
    data: str | None = None
    eval_clip: str | None = None
    eval_prompts: str | None = None
    tensorboard: bool = False
    progress: bool = True
    cpu: bool = False

    def __post_init__(self):
        self.adam_betas = tuple(float(b) for b in self.adam_betas)

    def validate(self) -> FinetuneConfig:
        """Raise ``ValueError`` naming the first bad field; returns ``self``."""
        checks = [
            (self.stage in STAGES, f"stage must be one of {STAGES}"),
            (self.t_sampling in T_SAMPLINGS, f"t_sampling must be one of {T_SAMPLINGS}"),
            (self.mixed_precision in MIXED_PRECISIONS, f"mixed_precision must be one of {MIXED_PRECISIONS}"),
            (self.steps >= 0, "steps must be >= 0"),
            (self.lr > 0, "lr must be > 0"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1"),
            (0.0 <= self.uncond_prob <= 1.0, "uncond_prob must be in [0, 1]"),
            (self.feat_weight >= 0, "feat_weight must be >= 0"),
            (self.beta_alpha > 0 and self.beta_beta > 0, "beta_alpha and beta_beta must be > 0"),
            (len(self.adam_betas) == 2, "adam_betas must be two numbers"),
            (self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm must be > 0 or null"),
            (min(self.checkpoint_every, self.log_every, self.eval_every) >= 0, "*_every must be >= 0"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
            (self.sample_steps >= 1, "sample_steps must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"finetune config: {message}")
        return self

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["adam_betas"] = list(self.adam_betas)
        return out

    @classmethod
    def from_dict(cls, values: dict) -> FinetuneConfig:
        """Build from a dict; unknown keys raise ``ValueError``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"finetune config: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**values).validate()

    def replace(self, **changes) -> FinetuneConfig:
        return dataclasses.replace(self, **changes).validate()

    def key(self) -> str:
        """Hash of the fields that change the training trajectory."""
        d = {k: v for k, v in self.to_dict().items() if k not in _FREE_FIELDS}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def load_config(path: str | os.PathLike, **overrides) -> tuple[FinetuneConfig, FinetuneConfig]:
    """``(stage1, stage2)`` configs from a JSON file.

    The file holds :class:`FinetuneConfig` fields shared by both stages, plus optional ``"stage1"``
    and ``"stage2"`` objects with per-stage fields; ``overrides`` (e.g. from command-line options)
    apply to both, after the file::

        {"lr": 1e-5, "batch_size": 64, "stage1": {"feat_weight": 0.01}, "stage2": {"lr": 5e-6}}
    """
    from bfq._json import read_json_file

    raw = read_json_file(path, ValueError, "finetune config")
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a finetune config is a JSON object")
    per_stage = [raw.pop("stage1", {}) or {}, raw.pop("stage2", {}) or {}]
    stages = ("distill", "noise")
    return tuple(  # type: ignore[return-value]
        FinetuneConfig.from_dict({**raw, **extra, **overrides, "stage": stage}) for extra, stage in zip(per_stage, stages)
    )


# ------------------------------------------------------------------------------------ helpers


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


def is_frozen_time_layer(name: str, module: nn.Module) -> bool:
    """True for the time layers kept in floating point and frozen: ``time_embedding.*`` and every
    ``time_emb_proj`` that is not a quantized layer (``name`` is the module's name)."""
    if name == "time_embedding" or name.startswith("time_embedding."):
        return True
    return name.rsplit(".", 1)[-1] == "time_emb_proj" and not isinstance(module, QUANT_MODULES)


def trainable_parameters(unet: nn.Module, train_dense: bool = True) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` the fine-tuning trains, in ``named_parameters`` order: the latent
    weights and scales of every quantized layer, plus (``train_dense``) every other parameter
    except the frozen time layers."""
    frozen, quant = set(), set()
    for name, module in unet.named_modules():
        own = [f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False)]
        if is_frozen_time_layer(name, module):
            frozen.update(own)
        elif isinstance(module, QUANT_MODULES):
            quant.update(own)
    return [(n, p) for n, p in unet.named_parameters() if n not in frozen and (train_dense or n in quant)]


@torch.no_grad()
def float_teacher(student: nn.Module) -> nn.Module:
    """A frozen float copy of a *freshly initialized* quantized UNet: every :mod:`bfq.nn` layer
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

    from bfq.models import sd15_scheduler_config

    if scheduler_or_config is None:
        cfg = sd15_scheduler_config()
    elif hasattr(scheduler_or_config, "config"):
        cfg = scheduler_or_config.config
    else:
        cfg = scheduler_or_config
    return DDPMScheduler.from_config(dict(cfg))


class _FeatureHooks:
    """Collects the hidden-state output of every ``down_blocks[i]`` and ``up_blocks[i]``."""

    def __init__(self, unet: nn.Module):
        self.outputs: list[torch.Tensor] = []
        blocks = list(getattr(unet, "down_blocks", [])) + list(getattr(unet, "up_blocks", []))
        if not blocks:
            raise ValueError("feature distillation needs a UNet with down_blocks/up_blocks")
        self.handles = [b.register_forward_hook(self._hook) for b in blocks]

    def _hook(self, module, args, output):
        self.outputs.append(output[0] if isinstance(output, (tuple, list)) else output)

    def take(self) -> list[torch.Tensor]:
        out, self.outputs = self.outputs, []
        return out

    def remove(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def teacher_samples(teacher, ehs, uncond, scheduler_config, *, steps: int, cfg: float, generator,
                    sample_shape) -> torch.Tensor:  # fmt: skip
    """Clean latents ``x_0`` sampled by ``teacher`` (DDIM, eta 0, classifier-free guidance ``cfg``)
    for the text embeddings ``ehs`` ``[B, S, D]``; initial noise from ``generator`` (CPU)."""
    from diffusers import DDIMScheduler

    device = ehs.device
    sched = DDIMScheduler.from_config(dict(scheduler_config), clip_sample=False)
    sched.set_timesteps(steps)
    z = torch.randn((ehs.shape[0], *sample_shape), generator=generator).to(device) * sched.init_noise_sigma
    cond = torch.cat([uncond.expand_as(ehs), ehs])
    for t in sched.timesteps:
        eps = teacher(torch.cat([z, z]), t.to(device), cond).sample.float()
        e_u, e_c = eps.chunk(2)
        z = sched.step(e_u + cfg * (e_c - e_u), t, z, eta=0.0).prev_sample
    return z


# -------------------------------------------------------------------------------- checkpoints


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint directory of a run, or None."""
    ckpts = Path(run_dir) / "checkpoints"
    pointer = ckpts / "latest"
    if pointer.is_file():
        target = ckpts / pointer.read_text().strip()
        if (target / "trainer.json").is_file():
            return target
    done = sorted(p for p in ckpts.glob("step-*") if (p / "trainer.json").is_file()) if ckpts.is_dir() else []
    return done[-1] if done else None


def save_student(unet: nn.Module, path: Path) -> None:
    """The full state dict (latent weights, scales, dense tensors) as safetensors, atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in unet.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, path)


def load_student(unet: nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(path))
    with torch.no_grad():
        missing, unexpected = unet.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: does not fit the student (missing {missing[:3]}, unexpected {unexpected[:3]})")


def _bits_of(unet: nn.Module) -> dict[str, list]:
    return {name: [m.bits, m.levels, m.scale_dtype] for name, m in iter_quantized(unet)}


# ------------------------------------------------------------------------------------ trainer


@dataclass
class _Stream:
    """Micro-batch ``k`` of this rank = item ``k * world + rank`` of the source."""

    batches: Iterable
    world: int
    rank: int
    _it: object = None
    _next: int = 0  # index of the item _it yields next

    def get(self, k: int) -> dict:
        g = k * self.world + self.rank
        if hasattr(self.batches, "batch"):
            return self.batches.batch(g)
        if self._it is None or g < self._next:
            self._it, self._next = iter(self.batches), 0
        while True:
            try:
                item = next(self._it)
            except StopIteration:
                if iter(self.batches) is self.batches or self._next == 0:
                    raise _DataExhausted from None
                self._it = iter(self.batches)  # a re-iterable (list, dataset): next epoch
                item = next(self._it)
            self._next += 1
            if self._next - 1 == g:
                return item


class _DataExhausted(Exception):
    pass


def _use_cpu(requested: bool = False) -> bool:
    """Train on the CPU: when asked to (``cpu``, ``ACCELERATE_USE_CPU``) or when no accelerator exists.

    accelerate only sets up multi-process CPU training (gloo) when told it runs on the CPU, so a
    machine without a GPU must say so for ``accelerate launch --multi_gpu --num_processes N`` to
    give N ranks instead of N independent runs.
    """
    if requested or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return True
    xpu = getattr(torch, "xpu", None)
    mps = getattr(torch.backends, "mps", None)
    has_other = (xpu is not None and xpu.is_available()) or (mps is not None and mps.is_available())
    return not (torch.cuda.is_available() or has_other)


def _partial_state(cpu: bool = False):
    from accelerate.state import PartialState

    return PartialState(cpu=_use_cpu(cpu))


def is_main_process(cpu: bool = False) -> bool:
    """True on the process that should write files (rank 0 under ``accelerate launch``; always True
    in a single process)."""
    return _partial_state(cpu).is_main_process


def _make_accelerator(cfg: FinetuneConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, PartialState

    kwargs = dict(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum, cpu=_use_cpu(cfg.cpu))
    try:
        return Accelerator(**kwargs)
    except ValueError as exc:
        # One process running stages with different precision settings: accelerate keeps one global
        # state per process; reset it (never under a distributed launch).
        if "already been initialized" not in str(exc) or PartialState().num_processes > 1:
            raise
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
        return Accelerator(**kwargs)


class _Trainer:
    def __init__(self, student, teacher, batches, cfg: FinetuneConfig, *, uncond, scheduler, run_dir, eval_fn, log):
        self.cfg, self.eval_fn, self.log_fn = cfg, eval_fn, log or (lambda line: None)
        self.student, self.teacher, self.batches = student, teacher, batches
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.sched_config = dict(noise_scheduler_from(scheduler).config)
        self.noise_sched = noise_scheduler_from(self.sched_config)
        self.T = int(self.noise_sched.config.num_train_timesteps)
        self.prediction = self.noise_sched.config.prediction_type
        self.uncond = uncond

    # ------------------------------------------------------------------ setup
    def setup(self):
        cfg, student = self.cfg, self.student
        acc = self.acc = _make_accelerator(cfg)
        self.device, self.rank, self.world = acc.device, acc.process_index, acc.num_processes
        self.main = acc.is_main_process
        self.named = trainable_parameters(student, cfg.train_dense)
        self.saved_flags = {n: p.requires_grad for n, p in student.named_parameters()}
        keep = {n for n, _ in self.named}
        for n, p in student.named_parameters():
            p.requires_grad_(n in keep)
        student.to(self.device)
        if self.teacher is not None:
            self.teacher.to(self.device).eval().requires_grad_(False)
        self.had_gc = bool(getattr(student, "is_gradient_checkpointing", False))
        if cfg.gradient_checkpointing and hasattr(student, "enable_gradient_checkpointing"):
            student.enable_gradient_checkpointing()
        params = [p for _, p in self.named]
        self.params = params
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps,
                                     weight_decay=cfg.weight_decay)  # fmt: skip
        self.start = self._resume()
        self.model, self.opt = acc.prepare(student, self.opt)
        if self._scaler_state is not None and acc.scaler is not None:
            acc.scaler.load_state_dict(self._scaler_state)
        use_feat = cfg.stage == "distill" and cfg.feat_weight > 0
        self.hooks = (_FeatureHooks(student), _FeatureHooks(self.teacher)) if use_feat else None
        self.stream = _Stream(self.batches, self.world, self.rank)
        self.tb = self._tensorboard()

    def _tensorboard(self):
        if not (self.cfg.tensorboard and self.main and self.run_dir is not None):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            warnings.warn("tensorboard is not installed (pip install tensorboard): logging to JSON lines only", stacklevel=3)
            return None
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    def _resume(self) -> int:
        """Load the newest checkpoint of the run directory (if any); returns the step to start at."""
        self._scaler_state = None
        if self.run_dir is None:
            return 0
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.acc.wait_for_everyone()
        self._check_run_config()
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            return 0
        info = json.loads((ckpt / "trainer.json").read_text())
        if info["bits"] != _bits_of(self.student):
            raise ValueError(f"{ckpt}: the checkpoint's quantized layers differ from the student's (another recipe?)")
        if info["world_size"] != self.world:
            warnings.warn(f"resuming a {info['world_size']}-process run on {self.world}: the data order will differ",
                          stacklevel=3)
        load_student(self.student, ckpt / "model.safetensors")
        self.opt.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=self.device, weights_only=True))
        if (ckpt / "scaler.pt").is_file():
            self._scaler_state = torch.load(ckpt / "scaler.pt", weights_only=True)
        rng = self.run_dir / "checkpoints" / "rng" / f"{ckpt.name}-rank{self.rank}.pt"
        if rng.is_file():
            states = torch.load(rng, weights_only=True)
            torch.set_rng_state(states["cpu"])
            if "cuda" in states and torch.cuda.is_available():
                torch.cuda.set_rng_state(states["cuda"])
        self.log_fn(f"resumed from {ckpt} (step {info['step']})")
        return int(info["step"])

    def _check_run_config(self):
        path = self.run_dir / "config.json"
        mine = self.cfg.to_dict()
        if path.is_file():
            old = json.loads(path.read_text())
            diff = [k for k in mine if k not in _FREE_FIELDS and old.get(k) != mine[k]]
            if diff and latest_checkpoint(self.run_dir) is not None:
                k = diff[0]
                raise ValueError(
                    f"{self.run_dir} holds a run with other settings ({k}: {old.get(k)!r} there, {mine[k]!r} now); "
                    "use another run directory, or remove that one to start over"
                )
        self.acc.wait_for_everyone()
        if self.main:
            _atomic_write(path, json.dumps(mine, indent=2) + "\n")

    # ------------------------------------------------------------------- loss
    def loss(self, batch: dict, index: int) -> tuple[torch.Tensor, dict]:
        cfg, dev = self.cfg, self.device
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
        x0 = batch.get("latents")
        if x0 is None:
            x0 = self._teacher_x0(ehs, uncond, gen)
        x0 = x0.to(dev, torch.float32)
        noise = torch.randn(x0.shape, generator=gen).to(dev)
        t = sample_timesteps(b, self.T, rng, cfg.t_sampling, cfg.beta_alpha, cfg.beta_beta).to(dev)
        drop = torch.from_numpy(rng.random(b) < cfg.uncond_prob).to(dev)
        if bool(drop.any()):
            ehs = torch.where(drop[:, None, None], uncond.expand_as(ehs), ehs)
        zt = self.noise_sched.add_noise(x0, noise, t)
        if self.hooks:
            self.hooks[0].take()
        with self.acc.autocast():
            pred = self.model(zt, t, ehs).sample.float()
        if cfg.stage == "noise":
            target = noise if self.prediction == "epsilon" else self.noise_sched.get_velocity(x0, noise, t)
            loss = F.mse_loss(pred, target)
            return loss, {"loss_noise": loss.detach()}
        with torch.no_grad(), self.acc.autocast():
            if self.hooks:
                self.hooks[1].take()
            target = self.teacher(zt, t, ehs).sample.float()
        l_noise = F.mse_loss(pred, target)
        parts = {"loss_noise": l_noise.detach()}
        loss = l_noise
        if self.hooks:
            fs, ft = self.hooks[0].take(), self.hooks[1].take()
            l_feat = sum(F.mse_loss(a.float(), c.float()) for a, c in zip(fs, ft))
            loss = loss + cfg.feat_weight * l_feat
            parts["loss_feat"] = l_feat.detach()
        return loss, parts

    def _teacher_x0(self, ehs, uncond, gen):
        if self.teacher is None:
            raise ValueError("batches without latents need a teacher to sample them from (prompts-only mode)")
        c = self.student.config
        shape = (c.in_channels, c.sample_size, c.sample_size)
        with self.acc.autocast():
            return teacher_samples(self.teacher, ehs, uncond, self.sched_config, steps=self.cfg.sample_steps,
                                   cfg=self.cfg.sample_cfg, generator=gen, sample_shape=shape)  # fmt: skip

    # -------------------------------------------------------------------- run
    def run(self) -> nn.Module:
        self.setup()
        cfg, acc = self.cfg, self.acc
        try:
            if self.start == 0 and cfg.eval_every:
                self._evaluate(0)
            self._loop()
        finally:
            self._teardown()
        return self.student

    def _loop(self):
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.acc
        bar = tqdm(total=cfg.steps, initial=self.start, desc=f"finetune {cfg.stage}", unit="step",
                   disable=not (cfg.progress and self.main), dynamic_ncols=True)  # fmt: skip
        sums, n_sum, samples, t_log = {}, 0, 0, time.perf_counter()
        self.model.train()
        step = self.start
        try:
            for step in range(self.start, cfg.steps):
                for k in range(cfg.grad_accum):
                    micro = step * cfg.grad_accum + k
                    try:
                        batch = self.stream.get(micro)
                    except _DataExhausted:
                        self.log_fn(f"the data ran out after {micro} micro-batches: stopping at step {step}")
                        self.save_checkpoint(step)
                        return
                    with acc.accumulate(self.model):
                        loss, parts = self.loss(batch, micro * self.world + self.rank)
                        acc.backward(loss)
                        if acc.sync_gradients and cfg.max_grad_norm:
                            acc.clip_grad_norm_(self.params, cfg.max_grad_norm)
                        self.opt.step()
                        self.opt.zero_grad(set_to_none=True)
                    for key, v in {"loss": loss.detach(), **parts}.items():
                        sums[key] = sums.get(key, 0.0) + v.float()
                    n_sum += 1
                    samples += batch["encoder_hidden_states"].shape[0] * self.world
                done = step + 1
                if cfg.log_every and (done % cfg.log_every == 0 or done == cfg.steps):
                    dt = time.perf_counter() - t_log
                    row = self._log_row(done, sums, n_sum, samples, dt)
                    bar.set_postfix(loss=f"{row['loss']:.4g}", samples_s=f"{row['samples_per_s']:.1f}")
                    sums, n_sum, samples, t_log = {}, 0, 0, time.perf_counter()
                bar.update(1)
                if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                    self.save_checkpoint(done)
                if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
                    self._evaluate(done)
            if self.start < cfg.steps:
                self.save_checkpoint(cfg.steps)
        finally:
            bar.close()

    def _log_row(self, step, sums, n, samples, dt) -> dict:
        means = {k: float(self.acc.reduce(v.reshape(1).to(self.device), "mean")) / n for k, v in sorted(sums.items())}
        row = {"stage": self.cfg.stage, "step": step, **means, "lr": self.cfg.lr,
               "samples_per_s": samples / max(dt, 1e-9), "time": round(time.time(), 3)}  # fmt: skip
        if self.main:
            self._write_log(row)
            if self.tb is not None:
                for k, v in means.items():
                    self.tb.add_scalar(f"{self.cfg.stage}/{k}", v, step)
        return row

    def _write_log(self, row: dict):
        if self.run_dir is not None and self.main:
            with open(self.run_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def _evaluate(self, step: int):
        if self.eval_fn is None:
            return
        if self.main:
            was_training = self.student.training
            self.student.eval()
            start = time.perf_counter()
            with torch.no_grad():
                result = self.eval_fn(self.student)
            self.student.train(was_training)
            row = {"stage": self.cfg.stage, "step": step, "eval": result, "eval_seconds": round(time.perf_counter() - start, 1)}
            self._write_log(row)
            numbers = ", ".join(f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, (int, float)))
            self.log_fn(f"eval at step {step}: {numbers}")
            if self.tb is not None:
                for k, v in result.items():
                    if isinstance(v, (int, float)):
                        self.tb.add_scalar(f"{self.cfg.stage}/eval_{k}", v, step)
        self.acc.wait_for_everyone()

    def save_checkpoint(self, step: int):
        if self.run_dir is None:
            return
        acc, ckpts = self.acc, self.run_dir / "checkpoints"
        name = f"step-{step:08d}"
        rng_dir = ckpts / "rng"
        if self.main:
            rng_dir.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        states = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and self.device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(self.device)
        tmp = rng_dir / f"{name}-rank{self.rank}.pt.tmp"
        torch.save(states, tmp)
        os.replace(tmp, rng_dir / f"{name}-rank{self.rank}.pt")
        if self.main:
            work = ckpts / f".tmp-{name}"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            save_student(self.student, work / "model.safetensors")
            torch.save(self.opt.state_dict(), work / "optimizer.pt")
            if acc.scaler is not None:
                torch.save(acc.scaler.state_dict(), work / "scaler.pt")
            info = {"step": step, "stage": self.cfg.stage, "world_size": self.world, "grad_accum": self.cfg.grad_accum,
                    "micro_batches_per_rank": step * self.cfg.grad_accum, "config_key": self.cfg.key(),
                    "bits": _bits_of(self.student), "time": round(time.time(), 3)}  # fmt: skip
            (work / "trainer.json").write_text(json.dumps(info, indent=1) + "\n")
            final = ckpts / name
            shutil.rmtree(final, ignore_errors=True)
            os.replace(work, final)
            _atomic_write(ckpts / "latest", name + "\n")
            self._prune(ckpts)
        acc.wait_for_everyone()

    def _prune(self, ckpts: Path):
        done = sorted(p for p in ckpts.glob("step-*") if p.is_dir())
        for old in done[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
            for f in (ckpts / "rng").glob(f"{old.name}-rank*.pt"):
                f.unlink(missing_ok=True)

    def _teardown(self):
        if self.hooks:
            for h in self.hooks:
                h.remove()
        if self.tb is not None:
            self.tb.close()
        if self.model is not None:
            self.acc.unwrap_model(self.model, keep_fp32_wrapper=False)  # drops accelerate's autocast wrapper
        student = self.student
        if self.cfg.gradient_checkpointing and not self.had_gc and hasattr(student, "disable_gradient_checkpointing"):
            student.disable_gradient_checkpointing()
        for n, p in student.named_parameters():
            p.requires_grad_(self.saved_flags.get(n, p.requires_grad))
        student.eval()
        self.opt = self.model = None
        self.acc.free_memory()


def finetune(
    student: nn.Module,
    teacher: nn.Module | None,
    batches: Iterable[dict],
    config: FinetuneConfig | None = None,
    *,
    uncond_hidden_states: torch.Tensor | None = None,
    noise_scheduler=None,
    run_dir: str | os.PathLike | None = None,
    eval_fn: Callable[[nn.Module], dict] | None = None,
    log: Callable[[str], None] | None = None,
) -> nn.Module:
    """Fine-tune a quantized UNet in place (one stage); returns it, in eval mode, on the training device.

    Args:
        student: a ``UNet2DConditionModel`` (or any UNet with its call signature and
            ``down_blocks``/``up_blocks``) whose layers were swapped by :func:`bfq.nn.quantize_unet`;
            no time cache installed (the time layers stay and are frozen).
        teacher: the full-precision UNet (frozen, eval); needed by Stage I and by batches without
            latents. :func:`float_teacher` makes one from a freshly initialized student.
        batches: any iterable of dicts with ``encoder_hidden_states`` ``[B, S, D]`` and optionally
            ``uncond_hidden_states`` and ``latents`` (see :mod:`bfq.finetune_data`). Sources with a
            ``batch(i)`` method are read by index (exact resume, no replay); other iterables are
            replayed and skipped on resume, restarted at their end when re-iterable, and end the
            training when they are exhausted iterators. Under several processes, rank ``r`` of
            ``world`` reads items ``r, r + world, ...``.
        config: :class:`FinetuneConfig` (stage, steps, lr, ...); default: Stage I, 1000 steps.
        uncond_hidden_states: the empty-prompt embedding ``[S, D]`` for batches that carry none.
        noise_scheduler: the pipeline's scheduler or its config (betas, ``num_train_timesteps``,
            ``prediction_type``); default SD-v1.5's. ``add_noise`` uses a ``DDPMScheduler`` from it.
        run_dir: where checkpoints, ``config.json`` and ``log.jsonl`` go; a run with a checkpoint
            there resumes from it (same data order, optimizer state and random draws). None: no
            checkpoints, no log file.
        eval_fn: ``eval_fn(student) -> dict`` of metrics, called on the main process every
            ``config.eval_every`` steps, at the start and at the end (e.g. :func:`bfq.finetune_eval.tinysd_eval_fn`).
        log: receives one line of text per notable event (resume, evaluation).

    Example:
        >>> teacher = float_teacher(student)                       # before any training
        >>> batches = [{"encoder_hidden_states": c, "uncond_hidden_states": u, "latents": x0}]
        >>> finetune(student, teacher, batches, FinetuneConfig(steps=100, lr=1e-5), run_dir="run")
        >>> bfq.export.export_finetuned(student, "out.bfq", time_cache="grid")
    """
    cfg = (config or FinetuneConfig()).validate()
    from bfq.timecache import time_cache_mode

    if time_cache_mode(student) is not None:
        raise ValueError("fine-tune before installing a time cache: training needs the float time layers")
    if cfg.stage == "distill" and teacher is None:
        raise ValueError("Stage I (distill) needs the full-precision teacher")
    trainer = _Trainer(student, teacher, batches, cfg, uncond=uncond_hidden_states, scheduler=noise_scheduler,
                       run_dir=run_dir, eval_fn=eval_fn, log=log)  # fmt: skip
    return trainer.run()


# ------------------------------------------------------------------------------------- stages


def _student_key(resolved_model, student: nn.Module) -> str:
    """Hash of the source model and the student's initial quantized state (bits and scales)."""
    h = hashlib.sha256(json.dumps(getattr(resolved_model, "source", None) or {}, sort_keys=True, default=str).encode())
    for name, m in iter_quantized(student):
        h.update(f"{name} {m.bits} {m.levels} {m.scale_dtype}".encode())
        h.update(m.scale.detach().to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


def run_finetune_stages(
    resolved_model,
    student_unet: nn.Module,
    *,
    stage1_steps: int,
    stage2_steps: int,
    config: FinetuneConfig | None = None,
    stage2_config: FinetuneConfig | None = None,
    work_dir: str | os.PathLike | None = None,
    progress: bool = True,
    teacher: nn.Module | None = None,
    batches: Iterable[dict] | None = None,
    eval_fn: Callable | None = None,
    log: Callable[[str], None] | None = None,
) -> nn.Module:
    """Stage I then Stage II on a freshly initialized quantized UNet, in place; returns it.

    This is the step ``bfq quantize --stage1-steps N --stage2-steps M`` runs between the scale
    initialization and the export.

    Args:
        resolved_model: the :class:`bfq.models.ResolvedModel` the student was made from (its
            scheduler sets the noise schedule, ``name``/``base_dir`` pick the data, ``source`` keys
            the run directories).
        student_unet: the UNet after :func:`bfq.nn.quantize_unet`, not yet trained (its latent
            weights are still the float weights: the teacher is copied from it).
        stage1_steps, stage2_steps: optimizer steps of each stage (0 skips a stage).
        config: settings of Stage I and, unless ``stage2_config`` is given, Stage II (``stage`` and
            ``steps`` are set here). ``config.data`` picks the data (default: tiny-sd's digits for
            tiny-sd; other models need ``folder:PATH`` or ``prompts:FILE``, or ``batches``).
        work_dir: checkpoints go to ``work_dir/finetune/stage{1,2}-<key>`` (the key hashes the
            model, the recipe, the initial scales and the training settings), so a killed run
            resumes and a finished stage is not run again. None: no checkpoints.
        progress: progress bars (also needs ``config.progress``).
        teacher: the float UNet (default: :func:`float_teacher` of ``student_unet``).
        batches: conditioning batches for both stages (default: from ``config.data``).
        eval_fn: periodic evaluation (default: :func:`bfq.finetune_eval.default_eval_fn`; used when ``eval_every`` > 0).
        log: receives progress notes.
    """
    if stage1_steps < 0 or stage2_steps < 0:
        raise ValueError("stage steps must be >= 0")
    if not (stage1_steps or stage2_steps):
        return student_unet
    base = config or FinetuneConfig()
    c1 = base.replace(stage="distill", steps=stage1_steps, progress=base.progress and progress)
    base2 = stage2_config or base
    c2 = base2.replace(stage="noise", steps=stage2_steps, progress=base2.progress and progress)
    if teacher is None:
        teacher = float_teacher(student_unet)
    scheduler = getattr(resolved_model, "scheduler", None)
    if eval_fn is None and (c1.eval_every or c2.eval_every):
        from bfq.finetune_eval import default_eval_fn

        eval_fn = default_eval_fn(resolved_model, base)
        if eval_fn is None and log:
            log("no evaluation for this model (tiny-sd metric, or eval_clip + eval_prompts): eval_every is ignored")
    sources = {}

    def source_for(cfg: FinetuneConfig):
        if batches is not None:
            return batches
        from bfq.finetune_data import make_source

        key = (cfg.data, cfg.batch_size, cfg.seed)
        if key not in sources:
            sources[key] = make_source(cfg.data, model_name=getattr(resolved_model, "name", ""),
                                       pipeline_dir=getattr(resolved_model, "base_dir", None),
                                       batch_size=cfg.batch_size, seed=cfg.seed)  # fmt: skip
        return sources[key]

    root = Path(work_dir) / "finetune" if work_dir is not None else None
    k1 = hashlib.sha256(f"{_student_key(resolved_model, student_unet)} {c1.key()}".encode()).hexdigest()[:16]
    k2 = hashlib.sha256(f"{k1} {stage1_steps} {c2.key()}".encode()).hexdigest()[:16]
    for cfg, key, n in ((c1, k1, stage1_steps), (c2, k2, stage2_steps)):
        if n:
            run_dir = root / f"stage{1 if cfg.stage == 'distill' else 2}-{key}" if root is not None else None
            finetune(student_unet, teacher, source_for(cfg), cfg, noise_scheduler=scheduler, run_dir=run_dir,
                     eval_fn=eval_fn, log=log)  # fmt: skip
    return student_unet
