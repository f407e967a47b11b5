"""Settings of a fine-tuning stage: :class:`FinetuneConfig` and JSON config files."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import typing
from dataclasses import dataclass

STAGES = ("distill", "noise")
T_SAMPLINGS = ("beta", "uniform")
MIXED_PRECISIONS = ("no", "bf16", "fp16")
_STAGE_TAG = {"distill": 1, "noise": 2}
# The learning rate of a stage when none is given: the measured best on tiny-sd (README, Results);
# Stage II's noise-prediction gradient is far noisier than Stage I's distillation gradient.
STAGE_LR = {"distill": 1e-4, "noise": 1e-5}
# Fields that do not change the training trajectory: a resumed run may change them.
_FREE_FIELDS = {"steps", "checkpoint_every", "keep_checkpoints", "log_every", "eval_every", "eval_clip", "eval_prompts",
                "tensorboard", "progress", "gradient_checkpointing", "cpu"}  # fmt: skip


@dataclass
class FinetuneConfig:
    """Settings of one fine-tuning stage (defaults: the paper's, BITSFUSION.md §6.3, except the
    learning rate).

    Attributes:
        stage: "distill" (Stage I) or "noise" (Stage II).
        steps: optimizer steps.
        lr: AdamW's constant learning rate; None (the default) is the stage's, ``STAGE_LR`` (1e-4 for
            Stage I, 1e-5 for Stage II: the measured best; the paper's 1e-5 is tuned for batch 1024);
            :attr:`stage_lr` is the value used.
        weight_decay, adam_betas, adam_eps: AdamW.
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
            evaluation of models other than tiny-sd is then the CLIP score (:func:`bfq.pipeline.finetune.evaluation.clip_eval_fn`).
        tensorboard: also log to TensorBoard (``run_dir/tensorboard``) when it is installed.
        progress: show a progress bar with loss and throughput.
        cpu: run on the CPU even when an accelerator is present.
        act_bits: 8: fake-quantize the inputs of the quantized layers whose codes fit int8, as
            ``compute="int8"`` quantizes them at inference (straight-through); None: off.
    """

    stage: str = "distill"
    steps: int = 1000
    lr: float | None = None
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
    act_bits: int | None = None

    def __post_init__(self):
        if isinstance(self.adam_betas, (list, tuple)):
            self.adam_betas = tuple(self.adam_betas)

    @property
    def stage_lr(self) -> float:
        """The learning rate used: ``lr``, or the stage's default."""
        return self.lr if self.lr is not None else STAGE_LR.get(self.stage, STAGE_LR["distill"])

    def validate(self) -> FinetuneConfig:
        """Raise ``ValueError`` naming the first bad field; returns ``self``."""
        _check_types(self)
        checks = [
            (self.stage in STAGES, f"stage must be one of {STAGES}"),
            (self.t_sampling in T_SAMPLINGS, f"t_sampling must be one of {T_SAMPLINGS}"),
            (self.mixed_precision in MIXED_PRECISIONS, f"mixed_precision must be one of {MIXED_PRECISIONS}"),
            (self.steps >= 0, "steps must be >= 0"),
            (self.lr is None or self.lr > 0, "lr must be > 0 or null (the stage's default)"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1"),
            (0.0 <= self.uncond_prob <= 1.0, "uncond_prob must be in [0, 1]"),
            (self.feat_weight >= 0, "feat_weight must be >= 0"),
            (self.beta_alpha > 0 and self.beta_beta > 0, "beta_alpha and beta_beta must be > 0"),
            (len(self.adam_betas) == 2, "adam_betas must be two numbers"),
            (self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm must be > 0 or null"),
            (min(self.checkpoint_every, self.log_every, self.eval_every) >= 0, "*_every must be >= 0"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
            (self.sample_steps >= 1, "sample_steps must be >= 1"),
            (self.act_bits in (None, 8), "act_bits must be 8 (the int8 runtime's activations) or null"),
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
        d = {k: v for k, v in self.to_dict().items() if k not in _FREE_FIELDS} | {"lr": self.stage_lr}
        if d["act_bits"] is None:  # a field added later: runs without it keep their key (and resume)
            del d["act_bits"]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_types(config: FinetuneConfig) -> None:
    """Raise ``ValueError`` for a field whose value is not of its declared type (a config file's
    ``"lr": "fast"``), or a float field that is not finite."""
    hints = typing.get_type_hints(FinetuneConfig)
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        hint = hints[field.name]
        allowed = (hint,) if typing.get_origin(hint) is tuple else (typing.get_args(hint) or (hint,))
        if value is None and type(None) in allowed:
            continue
        if typing.get_origin(hint) is tuple:
            ok, what = isinstance(value, tuple) and all(_finite(v) for v in value), "a list of numbers"
        elif float in allowed:
            ok, what = _finite(value), "a finite number"
        elif int in allowed:
            ok, what = isinstance(value, int) and not isinstance(value, bool), "an integer"
        else:
            kind = next(t for t in allowed if t is not type(None))
            ok, what = isinstance(value, kind), {str: "a string", bool: "true or false"}.get(kind, kind.__name__)
        if not ok:
            raise ValueError(f"finetune config: {field.name} must be {what}" + (" or null" if type(None) in allowed else "")
                             + f", got {value!r}")  # fmt: skip


def load_config(path: str | os.PathLike, **overrides) -> tuple[FinetuneConfig, FinetuneConfig]:
    """``(stage1, stage2)`` configs from a JSON file.

    The file holds :class:`FinetuneConfig` fields shared by both stages, plus optional ``"stage1"``
    and ``"stage2"`` objects with per-stage fields; ``overrides`` (e.g. from command-line options)
    apply to both, after the file::

        {"lr": 1e-5, "batch_size": 64, "stage1": {"feat_weight": 0.01}, "stage2": {"lr": 5e-6}}
    """
    from bfq._io import read_json_file

    raw = read_json_file(path, ValueError, "finetune config")
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a finetune config is a JSON object")
    per_stage = [raw.pop("stage1", {}) or {}, raw.pop("stage2", {}) or {}]
    stages = ("distill", "noise")
    return tuple(  # type: ignore[return-value]
        FinetuneConfig.from_dict({**raw, **extra, **overrides, "stage": stage}) for extra, stage in zip(per_stage, stages)
    )
