"""The log of a fine-tuning run: JSON lines in ``run_dir/log.jsonl`` (loss means reduced over the
ranks, samples/s, evaluations) and, optionally, TensorBoard. Only the main process writes."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

from bfq.pipeline.finetune.config import FinetuneConfig


class RunLog:
    def __init__(self, acc, run_dir: Path | None, cfg: FinetuneConfig):
        self.acc, self.run_dir, self.cfg = acc, run_dir, cfg
        self.main = acc.is_main_process
        self.tb = self._tensorboard()

    def _tensorboard(self):
        if not (self.cfg.tensorboard and self.main and self.run_dir is not None):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            warnings.warn("tensorboard is not installed (pip install tensorboard): logging to JSON lines only", stacklevel=4)
            return None
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    def losses(self, step: int, sums: dict, n: int, samples: int, dt: float) -> dict:
        """Log the mean of each summed loss over ``n`` micro-batches (and the ranks); returns the row."""
        means = {k: float(self.acc.reduce(v.reshape(1).to(self.acc.device), "mean")) / n for k, v in sorted(sums.items())}
        row = {"stage": self.cfg.stage, "step": step, **means, "lr": self.cfg.stage_lr,
               "samples_per_s": samples / max(dt, 1e-9), "time": round(time.time(), 3)}  # fmt: skip
        self.write(row)
        self._scalars(step, means)
        return row

    def evaluation(self, step: int, result: dict, seconds: float) -> None:
        self.write({"stage": self.cfg.stage, "step": step, "eval": result, "eval_seconds": round(seconds, 1)})
        self._scalars(step, {f"eval_{k}": v for k, v in result.items() if isinstance(v, (int, float))})

    def write(self, row: dict) -> None:
        if self.run_dir is not None and self.main:
            with open(self.run_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def _scalars(self, step: int, values: dict) -> None:
        if self.tb is not None and self.main:
            for k, v in values.items():
                self.tb.add_scalar(f"{self.cfg.stage}/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
