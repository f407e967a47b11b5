"""Stage I then Stage II for a resolved model: what ``bfq quantize --stage1-steps N --stage2-steps M``
runs between the scale initialization and the export."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from bfq.pipeline.finetune.config import FinetuneConfig
from bfq.pipeline.finetune.losses import float_teacher
from bfq.pipeline.finetune.trainer import _partial_state, finetune
from bfq.quant.nn import iter_quantized


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
        resolved_model: the :class:`bfq.pipeline.models.ResolvedModel` the student was made from (its
            scheduler sets the noise schedule, ``name``/``base_dir`` pick the data, ``source`` keys
            the run directories).
        student_unet: the UNet after :func:`bfq.quant.nn.quantize_unet`, not yet trained (its latent
            weights are still the float weights: the teacher is copied from it).
        stage1_steps, stage2_steps: optimizer steps of each stage (0 skips a stage).
        config: settings of Stage I and, unless ``stage2_config`` is given, Stage II (``stage`` and
            ``steps`` are set here). ``config.data`` picks the data (default: tiny-sd's digits for
            tiny-sd; other models need ``folder:PATH`` or ``prompts:FILE``, or ``batches``).
        work_dir: checkpoints go to ``work_dir/finetune/stage{1,2}-<key>`` (the key hashes the
            model, the recipe, the initial scales and the training settings), so a killed run
            resumes and a finished stage is not run again; encoded folder data to
            ``work_dir/finetune/data/<key>``. None: no checkpoints, folder data encoded in memory.
        progress: progress bars (also needs ``config.progress``).
        teacher: the float UNet (default: :func:`float_teacher` of ``student_unet``).
        batches: conditioning batches for both stages (default: from ``config.data``).
        eval_fn: periodic evaluation (default: :func:`bfq.pipeline.finetune.evaluation.default_eval_fn`; used when ``eval_every`` > 0).
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
        from bfq.pipeline.finetune.evaluation import default_eval_fn

        eval_fn = default_eval_fn(resolved_model, base)
        if eval_fn is None and log:
            log("no evaluation for this model (tiny-sd metric, or eval_clip + eval_prompts): eval_every is ignored")
    sources = {}

    root = Path(work_dir) / "finetune" if work_dir is not None else None

    def source_for(cfg: FinetuneConfig):
        if batches is not None:
            return batches
        from bfq.pipeline.finetune.data import make_source

        key = (cfg.data, cfg.batch_size, cfg.seed)
        if key not in sources:
            state = _partial_state(cfg.cpu)
            with state.main_process_first():  # the main process encodes folder data; the others read its cache
                sources[key] = make_source(cfg.data, model_name=getattr(resolved_model, "name", ""),
                                           pipeline_dir=getattr(resolved_model, "base_dir", None),
                                           batch_size=cfg.batch_size, seed=cfg.seed, device=state.device,
                                           cache_dir=root / "data" if root is not None else None, log=log)  # fmt: skip
        return sources[key]

    k1 = hashlib.sha256(f"{_student_key(resolved_model, student_unet)} {c1.key()}".encode()).hexdigest()[:16]
    k2 = hashlib.sha256(f"{k1} {stage1_steps} {c2.key()}".encode()).hexdigest()[:16]
    for cfg, key, n in ((c1, k1, stage1_steps), (c2, k2, stage2_steps)):
        if n:
            run_dir = root / f"stage{1 if cfg.stage == 'distill' else 2}-{key}" if root is not None else None
            finetune(student_unet, teacher, source_for(cfg), cfg, noise_scheduler=scheduler, run_dir=run_dir,
                     eval_fn=eval_fn, log=log)  # fmt: skip
    return student_unet
