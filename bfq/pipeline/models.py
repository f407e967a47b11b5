"""Model resolution: turn a name or path into a float32 UNet, its scheduler and a source record.

Accepted inputs of :func:`resolve_model` (the built-in names come from the model families,
:mod:`bfq.families`):

* ``tiny-sd`` / ``tiny-sdxl``: a family's bundled trained pipeline (``bfq/data/<name>``);
* ``sd15-random`` / ``sdxl-random``: a UNet of the family's reference shape with random weights
  (:func:`build_random_unet`; ``sdxl-random``: one seeded stream per parameter,
  :mod:`bfq.families.lazy`), no download; built lazily on request (``lazy=True``: weights read
  layer by layer), else refused up front when it cannot fit in memory;
* ``sd15`` / ``sdxl`` / ``pixart``: the family's reference repo from the Hub
  (``stable-diffusion-v1-5/stable-diffusion-v1-5``, ``stabilityai/stable-diffusion-xl-base-1.0``,
  ``PixArt-alpha/PixArt-Sigma-XL-2-512-MS``; model + scheduler only, the family's scheduler when the
  repo has none); any other ``owner/name`` that is not a local path is treated as a Hub repo id too, in the forms a
  diffusers user passes: a pipeline repo (``model_index.json`` + ``unet/``), a UNet repo
  (``config.json`` + weights at the top), either with ``subfolder=`` naming the UNet's folder, at
  any ``revision``; only the files needed are downloaded (the UNet, the scheduler);
* a local diffusers pipeline directory (``model_index.json`` + ``unet/``, or ``transformer/`` for a
  diffusion transformer such as PixArt);
* a bare UNet directory (``config.json`` + weights), or a folder holding one (``subfolder=``);
* a single-file checkpoint: ``.safetensors`` (original-SD layout through diffusers'
  ``from_single_file``, or a diffusers-layout SD-v1.5 or SDXL state dict). Pickle-based files (``.ckpt``,
  ``.bin``, ``.pt``, ``.pth``) are refused unless ``allow_pickle=True``; even then they are read
  with ``torch.load(weights_only=True)``.

Whatever the input, a UNet that no family covers is refused, naming the families supported.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bfq._io import sha256_file
from bfq.errors import InputError
from bfq.families import Family, FamilyError, builtin_models, family_for_config, family_for_name, sd15, sdxl
from bfq.families.lazy import full_unet, lazy_unet, random_source
from bfq.families.build import _empty_unet, build_meta_unet, build_random_unet, n_params  # noqa: F401 (public names)
from bfq.families.sd15 import SD15_N_LINEAR_CONV_WEIGHTS, SD15_N_PARAMS, SD15_REPO  # noqa: F401 (public names)

BUILTIN_MODELS = builtin_models()
# Peak memory of a command that holds a whole float32 model (fine-tuning, `bfq analyze`, a work
# directory's saved scales; `bfq quantize` otherwise converts layer by layer), in multiples of its
# float32 weights: measured 1.24 before streaming (sd15-random with a recipe: peak RSS 4.25 GB for
# 3.44 GB of weights), plus headroom for an analysis.
QUANTIZE_PEAK_FACTOR = 1.5
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

    @property
    def family(self) -> Family:
        """The model family of :attr:`unet` (:mod:`bfq.families`)."""
        return family_for_config(dict(self.unet.config), type(self.unet).__name__)


def sd15_config() -> dict:
    """The public SD-v1.5 ``unet/config.json`` (diffusers ``UNet2DConditionModel``), as a new dict."""
    return sd15.FAMILY.config()


def sdxl_config() -> dict:
    """The public SDXL base 1.0 ``unet/config.json``, as a new dict."""
    return sdxl.FAMILY.config()


def sd15_scheduler_config() -> dict:
    """The public SD-v1.5 ``scheduler/scheduler_config.json`` (PNDM)."""
    return sd15.FAMILY.scheduler_config()


def sd15_scheduler():
    """A ``PNDMScheduler`` with the SD-v1.5 configuration."""
    return sd15.FAMILY.scheduler()


def build_sd15_random(seed: int = 0, dtype: torch.dtype = torch.float32):
    """An SD-v1.5-shaped ``UNet2DConditionModel`` (859,520,964 parameters) with random weights.

    See :func:`build_random_unet` for the initialisation (takes a few seconds on 2 CPU cores
    instead of ~20 s for diffusers' default init).
    """
    return build_random_unet(sd15_config(), seed=seed, dtype=dtype)


def _available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (``MemAvailable``), or None if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory_for(family: Family, what: str) -> None:
    """Refuse, in one line and before anything is allocated, to build ``family``'s reference-shaped
    float32 model whole when that would need more memory than this machine has available, instead
    of swapping the machine to death (a lazy build, ``resolve_model(lazy=True)``, needs no check)."""
    n = n_params(family.config())
    need, have = QUANTIZE_PEAK_FACTOR * 4 * n, _available_memory()
    if have is not None and need > have:
        raise ModelError(
            f"{what}: quantizing it needs about {need / 1e9:.0f} GB of memory (its float32 {family.title} UNet alone is "
            f"{4 * n / 1e9:.1f} GB) and this machine has {have / 1e9:.1f} GB available; "
            + ("`bfq quantize` without fine-tuning or --work-dir converts it layer by layer, everything else needs "
               if family.random_per_layer else "use ") + "a machine with more memory"
        )


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
    import diffusers

    cfg_path = unet_dir / "config.json"
    try:
        config = json.loads(cfg_path.read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {cfg_path}: {e}") from None
    try:
        family = family_for_config(config)
    except FamilyError as e:
        raise ModelError(f"{cfg_path}: {e}") from None
    files = _weight_files(unet_dir, allow_pickle)
    use_safetensors = files[0].suffix == ".safetensors"
    variant = "fp16" if all(".fp16." in p.name for p in files) else None
    try:
        unet = getattr(diffusers, family.model_class).from_pretrained(
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


MODEL_COMPONENTS = ("unet", "transformer")  # a pipeline's model folder: UNet families, DiT families


def _component(pipe_dir: Path) -> Path | None:
    """The model folder of a diffusers pipeline directory (``unet/``, or ``transformer/`` for DiTs)."""
    return next((pipe_dir / c for c in MODEL_COMPONENTS if (pipe_dir / c).is_dir()), None)


def _resolve_pipeline(pipe_dir: Path, allow_pickle: bool):
    unet, files = _load_unet_dir(_component(pipe_dir) or pipe_dir / "unet", allow_pickle)
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


# diffusers' single-file model types whose UNet config bfq carries (no Hub access needed)
_SINGLE_FILE_CONFIGS = {"v1": sd15.FAMILY, "xl_base": sdxl.FAMILY}


def _unet_from_checkpoint(ckpt: dict, path: Path):
    from diffusers import UNet2DConditionModel

    if "conv_in.weight" in ckpt and any(k.startswith("down_blocks.") for k in ckpt):
        family = sdxl.FAMILY if "add_embedding.linear_1.weight" in ckpt else sd15.FAMILY
        unet = _empty_unet(family.config())
        try:
            unet.load_state_dict({k: v.float() for k, v in ckpt.items()}, strict=True)
        except RuntimeError as e:
            raise ModelError(
                f"{path.name}: a diffusers-layout UNet state dict that is not {family.title}-shaped; put it in a "
                f"directory next to its config.json instead ({str(e)[:200]})"
            ) from None
        return unet.eval()
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    try:
        kind = infer_diffusers_model_type(ckpt)
    except Exception:
        kind = None
    try:
        if kind in _SINGLE_FILE_CONFIGS:  # use the bundled config, so no Hub access is needed
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "config.json").write_text(json.dumps(_SINGLE_FILE_CONFIGS[kind].config()))
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


def _check_family(unet, what: str) -> None:
    try:
        family_for_config(dict(unet.config), type(unet).__name__)
    except FamilyError as e:
        raise ModelError(f"{what}: {e}") from None


def _random_unet(family: Family, name: str, seed: int, lazy: bool):
    if not family.random_per_layer:
        check_memory_for(family, name)
        return build_random_unet(family.config(), seed)
    source = random_source(family.config(), seed)
    if lazy:
        return lazy_unet(family.config(), source)
    check_memory_for(family, name)
    return full_unet(family.config(), source)


def _resolve_builtin(family: Family, name: str, revision, subfolder, allow_pickle, seed, cache_dir, lazy) -> ResolvedModel:
    if name == family.random_name:
        source = {"kind": "builtin", "name": name, "seed": seed}
        return ResolvedModel(_random_unet(family, name, seed, lazy), family.scheduler(), source, name=name)
    if name == family.tiny_name:
        base = family.tiny_pipeline_dir()
        if not (base / "model_index.json").is_file():
            raise ModelError(f"the bundled {name} pipeline is missing at {base} (this bfq was built without it)")
        unet, scheduler, _ = _resolve_pipeline(base, allow_pickle=False)
        return ResolvedModel(unet, scheduler, {"kind": "builtin", "name": name}, base_dir=base, name=name)
    resolved = _resolve_hub(family.hub_repo, revision, subfolder, allow_pickle, cache_dir)
    if resolved.scheduler is None:  # a model-only repo (PixArt-Σ 512: transformer/ alone): its family's sampler
        resolved.scheduler = family.scheduler()
    return resolved


def resolve_model(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    allow_pickle: bool = False,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    lazy: bool = False,
) -> ResolvedModel:
    """Resolve a model name or path (see the module docstring) to a :class:`ResolvedModel`.

    Args:
        name_or_path: a built-in name ("tiny-sd", "sd15-random", "sd15", "tiny-sdxl", "sdxl-random",
            "sdxl"), a Hub repo id, or a local path.
        revision: Hub revision (branch, tag or commit) for Hub models.
        subfolder: the UNet's folder inside a Hub repo or a local folder (as diffusers' ``subfolder=``).
        allow_pickle: allow pickle-based weights (.ckpt/.bin/.pt/.pth); off by default.
        seed: seed of "sd15-random" and "sdxl-random".
        cache_dir: Hugging Face cache directory (default: huggingface_hub's).
        lazy: where the model allows it (a family's random model with per-layer streams, e.g.
            "sdxl-random"), a lazy UNet (:mod:`bfq.families.lazy`: weights read layer by layer on
            use, never the whole float model in memory); other models load as usual.

    Raises:
        ModelError: unknown name, missing files, pickle weights without opt-in, a Hub model that
            cannot be fetched (offline and not cached), a model of no supported family, or a
            ``*-random`` model too large for this machine's memory.
    """
    name = os.fspath(name_or_path)
    if name in BUILTIN_MODELS:
        return _resolve_builtin(family_for_name(name), name, revision, subfolder, allow_pickle, seed, cache_dir, lazy)
    path = Path(name).expanduser()
    if subfolder and path.is_dir():
        return _resolve_local_subfolder(path, subfolder, allow_pickle, name)
    if path.is_dir():
        if (path / "model_index.json").is_file() and _component(path) is not None:
            unet, scheduler, files = _resolve_pipeline(path, allow_pickle)
            source = {"kind": "file", "name": path.name, "sha256": _sha256_files(files)}
            return ResolvedModel(unet, scheduler, source, base_dir=path, name=name)
        if (path / "config.json").is_file():
            unet, files = _load_unet_dir(path, allow_pickle)
            source = {"kind": "file", "name": path.name, "sha256": _sha256_files(files)}
            return ResolvedModel(unet, None, source, name=name)
        raise ModelError(
            f"{path} is neither a diffusers pipeline (model_index.json + unet/ or transformer/) nor a model directory "
            "(config.json)"
        )
    if path.is_file():
        if path.suffix not in (".safetensors", *PICKLE_SUFFIXES):
            raise ModelError(f"{path.name}: unsupported checkpoint type (use .safetensors, or a diffusers directory)")
        unet = _unet_from_checkpoint(_read_checkpoint(path, allow_pickle), path)
        _check_family(unet, path.name)
        source = {"kind": "file", "name": path.name, "sha256": _sha256_files([path])}
        return ResolvedModel(unet, None, source, name=name)
    if _REPO_ID.match(name) and not name.startswith((".", "~")):
        return _resolve_hub(name, revision, subfolder, allow_pickle, cache_dir)
    raise ModelError(
        f"unknown model {name!r}: use one of {', '.join(BUILTIN_MODELS)}, a Hub repo id, a diffusers "
        "pipeline or UNet directory, or a .safetensors checkpoint"
    )
