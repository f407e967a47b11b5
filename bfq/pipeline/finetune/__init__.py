"""Stage 4: two-stage quantization-aware fine-tuning (BitsFusion §4.2; BITSFUSION.md §6).

`config` (settings), `losses` (what each stage optimizes), `trainer` (the accelerate loop),
`checkpoint` (atomic, exactly resumable checkpoints), `data` (conditioning batches), `evaluation`
(periodic metrics) and `stages` (both stages for a resolved model). See `trainer` for the method.
"""

from bfq.pipeline.finetune.checkpoint import latest_checkpoint
from bfq.pipeline.finetune.config import (
    MIXED_PRECISIONS,
    STAGES,
    T_SAMPLINGS,
    FinetuneConfig,
    load_config,
)
from bfq.pipeline.finetune.losses import (
    float_teacher,
    is_frozen_time_layer,
    noise_scheduler_from,
    sample_timesteps,
    teacher_samples,
    trainable_parameters,
)
from bfq.pipeline.finetune.stages import run_finetune_stages
from bfq.pipeline.finetune.trainer import finetune, is_main_process

__all__ = [
    "MIXED_PRECISIONS", "STAGES", "T_SAMPLINGS", "FinetuneConfig", "finetune", "float_teacher", "is_frozen_time_layer",
    "is_main_process", "latest_checkpoint", "load_config", "noise_scheduler_from", "run_finetune_stages",
    "sample_timesteps", "teacher_samples", "trainable_parameters",
]
