"""Stage 4: two-stage quantization-aware fine-tuning (BitsFusion §4.2; BITSFUSION.md §6).

* **Stage I** (``stage="distill"``): the student (a UNet whose layers are :mod:`bfq.quant.nn` modules) and
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
constant learning rate (by default 1e-4 in Stage I, 1e-5 in Stage II: ``STAGE_LR``). The time layers (``time_embedding`` and every ``time_emb_proj`` that
is not a quantized layer) stay in floating point and frozen, so training covers every t in 0..T-1
through the normal time path and the time cache computed at export is exactly the untrained one.

The loop runs through Hugging Face accelerate: one CPU, one GPU (``mixed_precision`` "bf16"/"fp16",
``gradient_checkpointing``), or many processes under ``accelerate launch`` (DDP; every rank reads
different batches, gradients are averaged, so all ranks keep identical parameters), with gradient
accumulation. Every random draw of micro-batch ``i`` (timesteps, noise, text dropout, teacher
samples) comes from a generator seeded by ``(seed, stage, i)``, and indexed batch sources
(:mod:`bfq.pipeline.finetune.data`) compute batch ``i`` directly; so a run resumed from a checkpoint
(student state incl. scales, AdamW state, step, torch RNG states, grad-scaler state) continues
exactly as if it had not stopped.

Python entry points: :func:`finetune` (any ``UNet2DConditionModel``, any iterable of conditioning
batches), :func:`run_finetune_stages` (both stages for a resolved model, what ``bfq quantize
--stage1-steps/--stage2-steps`` calls), :func:`bfq.pipeline.export.export_finetuned` (a trained student to ``.bfq``); the whole
``bfq quantize``/``bfq finetune`` pipeline is :func:`bfq.pipeline.quantize.quantize`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bfq.pipeline.finetune.checkpoint import Checkpoints
from bfq.pipeline.finetune.config import FinetuneConfig
from bfq.pipeline.finetune.log import RunLog
from bfq.pipeline.finetune.losses import StageLoss, trainable_parameters
from bfq.quant.nn import set_act_bits


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
        self.scheduler, self.uncond = scheduler, uncond
        self.model = self.loss = self.log = None

    def setup(self):
        cfg, student = self.cfg, self.student
        acc = self.acc = _make_accelerator(cfg)
        self.main = acc.is_main_process
        self.named = trainable_parameters(student, cfg.train_dense)
        self.saved_flags = {n: p.requires_grad for n, p in student.named_parameters()}
        keep = {n for n, _ in self.named}
        for n, p in student.named_parameters():
            p.requires_grad_(n in keep)
        student.to(acc.device)
        if self.teacher is not None:
            self.teacher.to(acc.device).eval().requires_grad_(False)
        self.act_layers = set_act_bits(student, cfg.act_bits)  # fake-quantized activations (None: off)
        if cfg.act_bits:
            self.log_fn(f"activations: {cfg.act_bits}-bit fake quantization at the inputs of {self.act_layers} layers")
        self.had_gc = bool(getattr(student, "is_gradient_checkpointing", False))
        if cfg.gradient_checkpointing and hasattr(student, "enable_gradient_checkpointing"):
            student.enable_gradient_checkpointing()
        self.params = [p for _, p in self.named]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.stage_lr, betas=cfg.adam_betas, eps=cfg.adam_eps,
                                     weight_decay=cfg.weight_decay)  # fmt: skip
        self.checkpoints = Checkpoints(acc, self.run_dir, cfg) if self.run_dir is not None else None
        self.start, scaler_state = self.checkpoints.resume(student, self.opt, self.log_fn) if self.checkpoints else (0, None)
        self.model, self.opt = acc.prepare(student, self.opt)
        if scaler_state is not None and acc.scaler is not None:
            acc.scaler.load_state_dict(scaler_state)
        self.loss = StageLoss(cfg, student, self.teacher, self.scheduler, self.uncond, acc)
        self.stream = _Stream(self.batches, acc.num_processes, acc.process_index)
        self.log = RunLog(acc, self.run_dir, cfg)

    def run(self) -> nn.Module:
        try:
            self.setup()
            if self.start == 0 and self.cfg.eval_every:
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
        try:
            for step in range(self.start, cfg.steps):
                for k in range(cfg.grad_accum):
                    micro = step * cfg.grad_accum + k
                    try:
                        batch = self.stream.get(micro)
                    except _DataExhausted:
                        self.log_fn(f"the data ran out after {micro} micro-batches: stopping at step {step}")
                        self._save(step)
                        return
                    with acc.accumulate(self.model):
                        loss, parts = self.loss(self.model, batch, micro * acc.num_processes + acc.process_index)
                        acc.backward(loss)
                        if acc.sync_gradients and cfg.max_grad_norm:
                            acc.clip_grad_norm_(self.params, cfg.max_grad_norm)
                        self.opt.step()
                        self.opt.zero_grad(set_to_none=True)
                    for key, v in {"loss": loss.detach(), **parts}.items():
                        sums[key] = sums.get(key, 0.0) + v.float()
                    n_sum += 1
                    samples += batch["encoder_hidden_states"].shape[0] * acc.num_processes
                done = step + 1
                if cfg.log_every and (done % cfg.log_every == 0 or done == cfg.steps):
                    row = self.log.losses(done, sums, n_sum, samples, time.perf_counter() - t_log)
                    bar.set_postfix(loss=f"{row['loss']:.4g}", samples_s=f"{row['samples_per_s']:.1f}")
                    sums, n_sum, samples, t_log = {}, 0, 0, time.perf_counter()
                bar.update(1)
                if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                    self._save(done)
                if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
                    self._evaluate(done)
            if self.start < cfg.steps:
                self._save(cfg.steps)
        finally:
            bar.close()

    def _save(self, step: int):
        if self.checkpoints is not None:
            self.checkpoints.save(step, self.student, self.opt)

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
            self.log.evaluation(step, result, time.perf_counter() - start)
            numbers = ", ".join(f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, (int, float)))
            self.log_fn(f"eval at step {step}: {numbers}")
        self.acc.wait_for_everyone()

    def _teardown(self):
        if self.loss is not None:
            self.loss.remove_hooks()
        if self.log is not None:
            self.log.close()
        if self.model is not None:
            self.acc.unwrap_model(self.model, keep_fp32_wrapper=False)  # drops accelerate's autocast wrapper
        student = self.student
        set_act_bits(student, None)
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
            ``down_blocks``/``up_blocks``) whose layers were swapped by :func:`bfq.quant.nn.quantize_unet`;
            no time cache installed (the time layers stay and are frozen).
        teacher: the full-precision UNet (frozen, eval); needed by Stage I and by batches without
            latents. :func:`float_teacher` makes one from a freshly initialized student.
        batches: any iterable of dicts with ``encoder_hidden_states`` ``[B, S, D]`` and optionally
            ``uncond_hidden_states`` and ``latents`` (see :mod:`bfq.pipeline.finetune.data`). Sources with a
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
            ``config.eval_every`` steps, at the start and at the end (e.g. :func:`bfq.pipeline.finetune.evaluation.tinysd_eval_fn`).
        log: receives one line of text per notable event (resume, evaluation).

    Example:
        >>> teacher = float_teacher(student)                       # before any training
        >>> batches = [{"encoder_hidden_states": c, "uncond_hidden_states": u, "latents": x0}]
        >>> finetune(student, teacher, batches, FinetuneConfig(steps=100, lr=1e-5), run_dir="run")
        >>> bfq.pipeline.export.export_finetuned(student, "out.bfq", time_cache="grid")
    """
    cfg = (config or FinetuneConfig()).validate()
    from bfq.quant.timecache import time_cache_mode

    if time_cache_mode(student) is not None:
        raise ValueError("fine-tune before installing a time cache: training needs the float time layers")
    if cfg.stage == "distill" and teacher is None:
        raise ValueError("Stage I (distill) needs the full-precision teacher")
    trainer = _Trainer(student, teacher, batches, cfg, uncond=uncond_hidden_states, scheduler=noise_scheduler,
                       run_dir=run_dir, eval_fn=eval_fn, log=log)  # fmt: skip
    return trainer.run()
