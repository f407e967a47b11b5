"""Checkpoints of a fine-tuning run: the student (latent weights and scales), AdamW and grad-scaler
state, the step and per-rank RNG states, written atomically; resumed exactly."""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from bfq._io import atomic_path, write_text_atomic
from bfq.pipeline.finetune.config import _FREE_FIELDS, FinetuneConfig
from bfq.quant.nn import iter_quantized


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
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))


def load_student(unet: nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(path))
    with torch.no_grad():
        missing, unexpected = unet.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: does not fit the student (missing {missing[:3]}, unexpected {unexpected[:3]})")


def _bits_of(unet: nn.Module) -> dict[str, list]:
    return {name: [m.bits, m.levels, m.scale_dtype] for name, m in iter_quantized(unet)}


class Checkpoints:
    """The checkpoints of one run directory under accelerate: every rank saves its RNG state, the
    main process the rest; a resumed run continues exactly as if it had not stopped."""

    def __init__(self, acc, run_dir: Path, cfg: FinetuneConfig):
        self.acc, self.run_dir, self.cfg = acc, run_dir, cfg
        self.dir = run_dir / "checkpoints"

    def check_run_config(self) -> None:
        """Refuse to resume a run made with settings that change the training trajectory."""
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
        if self.acc.is_main_process:
            write_text_atomic(path, json.dumps(mine, indent=2) + "\n")

    def resume(self, student: nn.Module, opt, log_fn) -> tuple[int, dict | None]:
        """Load the newest checkpoint (if any) into ``student`` and ``opt``; returns the step to
        start at and the grad scaler's state (or None)."""
        if self.acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.acc.wait_for_everyone()
        self.check_run_config()
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            return 0, None
        info = json.loads((ckpt / "trainer.json").read_text())
        if info["bits"] != _bits_of(student):
            raise ValueError(f"{ckpt}: the checkpoint's quantized layers differ from the student's (another recipe?)")
        world = self.acc.num_processes
        if info["world_size"] != world:
            warnings.warn(f"resuming a {info['world_size']}-process run on {world}: the data order will differ", stacklevel=4)
        load_student(student, ckpt / "model.safetensors")
        opt.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=self.acc.device, weights_only=True))
        scaler = torch.load(ckpt / "scaler.pt", weights_only=True) if (ckpt / "scaler.pt").is_file() else None
        rng = self.dir / "rng" / f"{ckpt.name}-rank{self.acc.process_index}.pt"
        if rng.is_file():
            states = torch.load(rng, weights_only=True)
            torch.set_rng_state(states["cpu"])
            if "cuda" in states and torch.cuda.is_available():
                torch.cuda.set_rng_state(states["cuda"])
        log_fn(f"resumed from {ckpt} (step {info['step']})")
        return int(info["step"]), scaler

    def save(self, step: int, student: nn.Module, opt) -> None:
        acc, ckpts = self.acc, self.dir
        name = f"step-{step:08d}"
        rng_dir = ckpts / "rng"
        if acc.is_main_process:
            rng_dir.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        states = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and acc.device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(acc.device)
        with atomic_path(rng_dir / f"{name}-rank{acc.process_index}.pt") as tmp:
            torch.save(states, tmp)
        if acc.is_main_process:
            work = ckpts / f".tmp-{name}"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            save_student(student, work / "model.safetensors")
            torch.save(opt.state_dict(), work / "optimizer.pt")
            if acc.scaler is not None:
                torch.save(acc.scaler.state_dict(), work / "scaler.pt")
            cfg = self.cfg
            info = {"step": step, "stage": cfg.stage, "world_size": acc.num_processes, "grad_accum": cfg.grad_accum,
                    "micro_batches_per_rank": step * cfg.grad_accum, "config_key": cfg.key(),
                    "bits": _bits_of(student), "time": round(time.time(), 3)}  # fmt: skip
            (work / "trainer.json").write_text(json.dumps(info, indent=1) + "\n")
            final = ckpts / name
            shutil.rmtree(final, ignore_errors=True)
            os.replace(work, final)
            write_text_atomic(ckpts / "latest", name + "\n")
            self._prune()
        acc.wait_for_everyone()

    def _prune(self) -> None:
        done = sorted(p for p in self.dir.glob("step-*") if p.is_dir())
        for old in done[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
            for f in (self.dir / "rng").glob(f"{old.name}-rank*.pt"):
                f.unlink(missing_ok=True)
