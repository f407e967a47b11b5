"""Model resolution: turn a name or path into a float32 UNet, its scheduler and a source record.

Accepted inputs of :func:`resolve_model`:

* ``tiny-sd``: the bundled trained pipeline (:func:`bfq.tinysd.pipeline_dir`);
* ``sd15-random``: an SD-v1.5-shaped UNet with random weights (:func:`build_sd15_random`), no download;
* ``sd15``: ``stable-diffusion-v1-5/stable-diffusion-v1-5`` from the Hub (UNet + scheduler only);
  any other ``owner/name`` that is not a local path is treated as a Hub repo id too, in the forms a
  diffusers user passes: a pipeline repo (``model_index.json`` + ``unet/``), a UNet repo
  (``config.json`` + weights at the top), either with ``subfolder=`` naming the UNet's folder, at
  any ``revision``; only the files needed are downloaded (the UNet, the scheduler);
* a local diffusers pipeline directory (``model_index.json`` + ``unet/``);
* a bare UNet directory (``config.json`` + weights), or a folder holding one (``subfolder=``);
* a single-file checkpoint: ``.safetensors`` (original-SD layout through diffusers'
  ``from_single_file``, or a diffusers-layout SD-v1.5 state dict). Pickle-based files (``.ckpt``,
  ``.bin``, ``.pt``, ``.pth``) are refused unless ``allow_pickle=True``; even then they are read
  with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bfq._io import sha256_file
from bfq.errors import InputError

SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD15_N_PARAMS = 859_520_964
SD15_N_LINEAR_CONV_WEIGHTS = 859_077_120
BUILTIN_MODELS = ("tiny-sd", "sd15-random", "sd15")
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelError(InputError):
    """A model name or path cannot be resolved or loaded (message says why and what to do)."""


@dataclass
class ResolvedModel:
    """What :func:`resolve_model` returns.

    Attributes:
        unet: a float32 ``UNet2DConditionModel`` in eval mode, on CPU.
        scheduler: the pipeline's scheduler, or None (bare UNet directory, single file).
        source: for the .bfq header: ``{"kind": "hub", "repo", "revision"}``,
            ``{"kind": "file", "name", "sha256"}`` or ``{"kind": "builtin", "name", ...}``.
        base_dir: the diffusers pipeline directory (for ``bfq generate``), or None.
        name: the name or path that was resolved.
    """

    unet: Any
    scheduler: Any
    source: dict
    base_dir: Path | None = None
    name: str = ""


def sd15_config() -> dict:
    """The public SD-v1.5 ``unet/config.json`` (diffusers ``UNet2DConditionModel``), as a new dict."""
    return {
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False,
        "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": 4,
        "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    }


def sd15_scheduler_config() -> dict:
    """The public SD-v1.5 ``scheduler/scheduler_config.json`` (PNDM)."""
    return {
        "_class_name": "PNDMScheduler",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
    }


def sd15_scheduler():
    """A ``PNDMScheduler`` with the SD-v1.5 configuration."""
    from diffusers import PNDMScheduler

    return PNDMScheduler.from_config(sd15_scheduler_config())


def build_meta_unet(config: dict):
    """A ``UNet2DConditionModel`` on the meta device (shapes only, no memory): for layer lists and
    accounting, e.g. ``quantizable_layers(build_meta_unet(sd15_config()))``."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def _empty_unet(config: dict):
    unet = build_meta_unet(config)
    if any(True for _ in unet.buffers()):
        raise RuntimeError("this UNet has buffers; a meta-device build would lose them")
    return unet.to_empty(device="cpu")


@torch.no_grad()
def build_random_unet(config: dict, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``UNet2DConditionModel`` from ``config`` with PyTorch-default-like random weights, built fast.

    The model is constructed on the meta device (no default initialisation) and every parameter is
    then filled in module order from one numpy ``SFC64(seed)`` stream (~5x faster than torch's CPU
    generator): Linear/Conv2d weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (the bound of
    PyTorch's default kaiming-uniform init), norm weights 1 and biases 0. Values are drawn in float32
    and then cast, so every ``dtype`` holds the same numbers (rounded).
    """
    from torch import nn

    unet = _empty_unet(config)
    rng = np.random.Generator(np.random.SFC64(seed))
    for module in unet.modules():
        own = dict(module.named_parameters(recurse=False))
        if not own:
            continue
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            bound = 1.0 / math.sqrt(module.weight[0].numel())
            for p in own.values():
                arr = p.detach().numpy()
                rng.random(out=arr.reshape(-1), dtype=np.float32)
                arr *= 2.0 * bound
                arr -= bound
        elif isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
            for name, p in own.items():
                p.fill_(1.0 if name == "weight" else 0.0)
        else:
            raise RuntimeError(f"no random-init rule for {type(module).__name__} parameters")
    return unet.to(dtype).eval() if dtype != torch.float32 else unet.eval()


def build_sd15_random(seed: int = 0, dtype: torch.dtype = torch.float32):
    """An SD-v1.5-shaped ``UNet2DConditionModel`` (859,520,964 parameters) with random weights.

    See :func:`build_random_unet` for the initialisation (takes a few seconds on 2 CPU cores
    instead of ~20 s for diffusers' default init).
    """
    return build_random_unet(sd15_config(), seed=seed, dtype=dtype)


# ---------------------------------------------------------------------------------- resolution


def _sha256_files(paths: list[Path]) -> str:
    """sha256 of one file; for several, sha256 over the lines ``"<name> <sha256>\\n"`` (sorted)."""
    paths = sorted(paths)
    if len(paths) == 1:
        return sha256_file(paths[0])
    return hashlib.sha256("".join(f"{p.name} {sha256_file(p)}\n" for p in paths).encode()).hexdigest()


def _weight_files(unet_dir: Path, allow_pickle: bool) -> list[Path]:
    safe = sorted(unet_dir.glob("*.safetensors"))
    if safe:
        return [p for p in safe if ".fp16." not in p.name] or safe
    pickled = sorted(p for p in unet_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled and not allow_pickle:
        raise ModelError(
            f"{unet_dir} holds only pickle weights ({pickled[0].name}); loading them can run arbitrary code. "
            "Convert them to safetensors, or pass allow_pickle=True (--allow-pickle) if you trust the file"
        )
    if not pickled:
        raise ModelError(f"{unet_dir} has no UNet weights (*.safetensors)")
    return pickled


def _load_unet_dir(unet_dir: Path, allow_pickle: bool):
    from diffusers import UNet2DConditionModel

    cfg_path = unet_dir / "config.json"
    try:
        cls_name = json.loads(cfg_path.read_text()).get("_class_name", "UNet2DConditionModel")
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {cfg_path}: {e}") from None
    if cls_name != "UNet2DConditionModel":
        raise ModelError(f"{cfg_path}: _class_name is {cls_name!r}; only UNet2DConditionModel is supported")
    files = _weight_files(unet_dir, allow_pickle)
    use_safetensors = files[0].suffix == ".safetensors"
    variant = "fp16" if all(".fp16." in p.name for p in files) else None
    try:
        unet = UNet2DConditionModel.from_pretrained(
            unet_dir, use_safetensors=use_safetensors, variant=variant, local_files_only=True
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"cannot load the UNet in {unet_dir}: {e}") from None
    return unet.float().eval(), files


def _load_scheduler(pipe_dir: Path):
    import diffusers
    from diffusers import SchedulerMixin

    try:
        entry = json.loads((pipe_dir / "model_index.json").read_text()).get("scheduler")
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {pipe_dir / 'model_index.json'}: {e}") from None
    if not entry or entry[-1] is None or not (pipe_dir / "scheduler").is_dir():
        return None
    cls = getattr(diffusers, str(entry[-1]), None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ModelError(f"{pipe_dir}/model_index.json: unknown scheduler class {entry[-1]!r}")
    return cls.from_pretrained(pipe_dir, subfolder="scheduler")


def _resolve_pipeline(pipe_dir: Path, allow_pickle: bool):
    unet, files = _load_unet_dir(pipe_dir / "unet", allow_pickle)
    return unet, _load_scheduler(pipe_dir), files


def _resolve_hub(repo: str, revision: str | None, subfolder: str | None, allow_pickle: bool, cache_dir) -> ResolvedModel:
    from bfq.download import HubError, fetch_unet

    try:
        local, unet_dir, pipe_dir = fetch_unet(repo, revision=revision, subfolder=subfolder, cache_dir=cache_dir,
                                               pickles=PICKLE_SUFFIXES, allow_pickle=allow_pickle)  # fmt: skip
    except (HubError, InputError) as e:
        raise ModelError(str(e)) from None
    unet, _ = _load_unet_dir(local / unet_dir, allow_pickle)
    scheduler = _load_scheduler(local / pipe_dir) if pipe_dir is not None else None
    source = {"kind": "hub", "repo": repo, "revision": local.name, **({"subfolder": subfolder} if subfolder else {})}
    base = local / pipe_dir if pipe_dir is not None else None
    return ResolvedModel(unet, scheduler, source, base_dir=base, name=repo)


def _read_checkpoint(path: Path, allow_pickle: bool) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:  # safetensors raises its own error types
            raise ModelError(f"{path}: not a readable safetensors file ({e})") from None
    if not allow_pickle:
        raise ModelError(
            f"{path.name} is a pickle-based checkpoint; loading it can run arbitrary code. Convert it to "
            ".safetensors, or pass allow_pickle=True (--allow-pickle) if you trust the file"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelError(f"{path}: cannot read the checkpoint ({e})") from None
    if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):
        ckpt = ckpt["state_dict"]
    if not isinstance(ckpt, dict):
        raise ModelError(f"{path}: the checkpoint is not a state dict")
    return ckpt


def _unet_from_checkpoint(ckpt: dict, path: Path):
    from diffusers import UNet2DConditionModel

    if "conv_in.weight" in ckpt and any(k.startswith("down_blocks.") for k in ckpt):
        unet = _empty_unet(sd15_config())
        try:
            unet.load_state_dict({k: v.float() for k, v in ckpt.items()}, strict=True)
        except RuntimeError as e:
            raise ModelError(
                f"{path.name}: a diffusers-layout UNet state dict that is not SD-v1.5-shaped; put it in a "
                f"directory next to its config.json instead ({str(e)[:200]})"
            ) from None
        return unet.eval()
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    try:
        kind = infer_diffusers_model_type(ckpt)
    except Exception:
        kind = None
    try:
        if kind == "v1":  # SD-v1.x: use the bundled config, so no Hub access is needed
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "config.json").write_text(json.dumps(sd15_config()))
                unet = UNet2DConditionModel.from_single_file(ckpt, config=tmp)
        else:
            unet = UNet2DConditionModel.from_single_file(ckpt)
    except Exception as e:
        raise ModelError(f"{path.name}: diffusers cannot load a UNet from this checkpoint ({e})") from None
    return unet.float().eval()


def _resolve_local_subfolder(path: Path, subfolder: str, allow_pickle: bool, name: str) -> ResolvedModel:
    unet_dir = path / subfolder
    if not (unet_dir / "config.json").is_file():
        raise ModelError(f"{unet_dir} has no config.json: --subfolder must name the UNet's folder inside {path}")
    unet, files = _load_unet_dir(unet_dir, allow_pickle)
    pipeline = (path / "model_index.json").is_file()
    source = {"kind": "file", "name": path.name, "sha256": _sha256_files(files)}
    return ResolvedModel(unet, _load_scheduler(path) if pipeline else None, source, base_dir=path if pipeline else None, name=name)


def resolve_model(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    allow_pickle: bool = False,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
) -> ResolvedModel:
    """Resolve a model name or path (see the module docstring) to a :class:`ResolvedModel`.

    Args:
        name_or_path: "tiny-sd", "sd15-random", "sd15", a Hub repo id, or a local path.
        revision: Hub revision (branch, tag or commit) for Hub models.
        subfolder: the UNet's folder inside a Hub repo or a local folder (as diffusers' ``subfolder=``).
        allow_pickle: allow pickle-based weights (.ckpt/.bin/.pt/.pth); off by default.
        seed: seed of "sd15-random".
        cache_dir: Hugging Face cache directory (default: huggingface_hub's).

    Raises:
        ModelError: unknown name, missing files, pickle weights without opt-in, or a Hub model that
            cannot be fetched (offline and not cached).
    """
    name = os.fspath(name_or_path)
    if name == "sd15-random":
        source = {"kind": "builtin", "name": name, "seed": seed}
        return ResolvedModel(build_sd15_random(seed), sd15_scheduler(), source, name=name)
    if name == "tiny-sd":
        try:
            from bfq.tinysd import pipeline_dir
        except ImportError as e:  # pragma: no cover - the package ships it
            raise ModelError(f"the bundled tiny-sd model is not available ({e})") from None
        base = Path(pipeline_dir())
        if not (base / "model_index.json").is_file():
            raise ModelError(f"the bundled tiny-sd pipeline is missing at {base}")
        unet, scheduler, _ = _resolve_pipeline(base, allow_pickle=False)
        return ResolvedModel(unet, scheduler, {"kind": "builtin", "name": name}, base_dir=base, name=name)
    if name == "sd15":
        return _resolve_hub(SD15_REPO, revision, subfolder, allow_pickle, cache_dir)
    path = Path(name).expanduser()
    if subfolder and path.is_dir():
        return _resolve_local_subfolder(path, subfolder, allow_pickle, name)
    if path.is_dir():
        if (path / "model_index.json").is_file() and (path / "unet").is_dir():
            unet, scheduler, files = _resolve_pipeline(path, allow_pickle)
            source = {"kind": "file", "name": path.name, "sha256": _sha256_files(files)}
            return ResolvedModel(unet, scheduler, source, base_dir=path, name=name)
        if (path / "config.json").is_file():
            unet, files = _load_unet_dir(path, allow_pickle)
            source = {"kind": "file", "name": path.name, "sha256": _sha256_files(files)}
            return ResolvedModel(unet, None, source, name=name)
        raise ModelError(
            f"{path} is neither a diffusers pipeline (model_index.json + unet/) nor a UNet directory (config.json)"
        )
    if path.is_file():
        if path.suffix not in (".safetensors", *PICKLE_SUFFIXES):
            raise ModelError(f"{path.name}: unsupported checkpoint type (use .safetensors, or a diffusers directory)")
        unet = _unet_from_checkpoint(_read_checkpoint(path, allow_pickle), path)
        source = {"kind": "file", "name": path.name, "sha256": _sha256_files([path])}
        return ResolvedModel(unet, None, source, name=name)
    if _REPO_ID.match(name) and not name.startswith((".", "~")):
        return _resolve_hub(name, revision, subfolder, allow_pickle, cache_dir)
    raise ModelError(
        f"unknown model {name!r}: use one of {', '.join(BUILTIN_MODELS)}, a Hub repo id, a diffusers "
        "pipeline or UNet directory, or a .safetensors checkpoint"
    )
