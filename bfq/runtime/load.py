"""Load a .bfq file as a ready diffusers model.

The model is built from the stored config on the meta device (no random fp32 weights are ever
materialized), the cached time features are installed, and each quantized layer becomes either

* ``runtime="packed"``: a :mod:`bfq.runtime.packed` layer that keeps its code words (about 2 bits
  per weight in memory) and decodes them at every forward, or
* ``runtime="dense"``: an ordinary layer whose weight is decoded once into the target dtype.

Either way the result drops into its family's pipeline (``StableDiffusionPipeline``,
``StableDiffusionXLPipeline``: ``.from_pretrained(base, unet=unet)``; ``PixArtSigmaPipeline``:
``transformer=model``) and computes the same numbers (FORMAT.md §2.1 fixes every dequantized weight to the bit).
"""

from __future__ import annotations

import functools
import os
import warnings

import numpy as np
import torch
from torch import nn

from bfq.errors import BfqFormatError, UserError
from bfq.families import FamilyError, family_for_config
from bfq.format import BfqFile, open_bfq
from bfq.format.diffusers_layout import open_layout
from bfq.runtime.memory import DEFAULT_WORKSPACE_BYTES
from bfq.format.constants import MAGIC, PREAMBLE_SIZE, VERSION
from bfq.format.header import _PREAMBLE, _crc32, align_up, check_layout, validate_header
from bfq.format.strict_json import parse_header
from bfq.runtime.packed import PACKED_TYPES, Workspace, packed_layers

RUNTIMES = ("auto", "packed", "dense")
COMPUTES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # --compute names
_DECODE_AS = {torch.float32: ("float32", torch.float32), torch.float16: ("float16", torch.int16), torch.bfloat16: ("bfloat16", torch.int16)}
_SCALE_BITS_AS = {"f16": np.int16, "f32": np.int32}
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


class DiffusersSaveError(UserError, NotImplementedError):
    """``save_pretrained`` on a bfq model that cannot give back the bytes it was loaded with."""


def load_unet(
    source: str | os.PathLike,
    *,
    runtime: str = "auto",
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    verify: bool = True,
    revision: str | None = None,
    mmap: bool = False,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
) -> nn.Module:
    """Build the diffusers model stored in a .bfq file.

    Args:
        source: a local .bfq path, a folder in the diffusers layout (FORMAT.md appendix A), or a Hub repo id ("user/name", optionally with a file name
            "user/name/model.bfq") fetched through huggingface_hub.
        runtime: "packed" (weights stay ~2-bit in memory and are decoded at every forward),
            "dense" (decoded once into ``dtype``) or "auto" (default: packed on the CPU, where it
            costs little time and saves most of the memory; dense on accelerators, where the
            packed runtime's speed is not measured yet). See :func:`resolve_runtime`.
        device: where the returned model lives ("cpu", "cuda", "cuda:1", "mps", ...).
        dtype: compute dtype: torch.float32, torch.float16 or torch.bfloat16. Default: float16 on a
            CUDA device, float32 elsewhere (what CPUs compute in).
        verify: also check each code block's CRC-32 while reading (cheap; on by default); scales,
            dense tensors and time tables are checked either way (FORMAT.md §3.1).
        revision: Hub revision (branch, tag or commit) when `source` is a repo id.
        mmap: packed runtime only: keep the code words memory-mapped from the file instead of
            reading them into memory (pages are loaded on first use and can be evicted by the OS).
        workspace_bytes: packed runtime only: the largest block of decoded weights; bigger layers are
            computed in blocks of output channels.

    Raises:
        BfqFormatError: the file is not a valid .bfq, or does not fit the model its config builds.
        ValueError: an unknown runtime or dtype, or a device this machine does not have.
    """
    device = check_device(device)
    runtime = resolve_runtime(runtime, device)
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    if dtype not in _DECODE_AS:
        raise ValueError(f"dtype must be one of {list(_DECODE_AS)}, got {dtype}")
    path = _resolve(source, revision)
    bfq = open_layout(path, verify=verify) if os.path.isdir(path) else open_bfq(path, verify=verify)
    try:
        model = build_into(_empty_model(bfq), bfq, runtime, dtype, mmap=mmap, workspace=Workspace(workspace_bytes))
    finally:
        bfq.close()  # a memory map stays open while packed layers still view it
    model = model.to(device).eval()
    if device.type == "cpu" and dtype == torch.bfloat16:
        _bf16_cpu_boundary(model)
    return model


def load_transformer(source: str | os.PathLike, **kwargs) -> nn.Module:
    """:func:`load_unet` under the name a diffusion transformer's user looks for: both build the model
    class the file's header names (``PixArtTransformer2DModel`` for a PixArt file), with the same
    arguments (``runtime``, ``device``, ``dtype``, ...)."""
    return load_unet(source, **kwargs)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products natively (AVX-512 BF16 or AMX), where
    torch's oneDNN kernels run bf16 about twice as fast as fp32; elsewhere bf16 is emulated."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _bf16_cpu_boundary(model: nn.Module) -> None:
    """A bf16 model on the CPU: takes float inputs of any dtype (cast to bf16; the output comes back
    in the input's dtype, so it drops into a float32 pipeline) and computes with channels-last
    activations, oneDNN's fast layout for bf16 convolutions (measured 0.45x vs 0.59x of the dense
    fp32 forward of SD-v1.5 at 256x256 with contiguous activations, bench/packed_bench.py)."""
    model.bfq_compute = "bf16"  # what bfq.tinysd.evaluate keeps instead of scoring a float32 copy
    model.register_forward_pre_hook(_to_bf16, with_kwargs=True)
    model.register_forward_hook(_from_bf16, with_kwargs=True)


def _bf16(value, channels_last: bool = False):
    if isinstance(value, dict):  # SDXL's added_cond_kwargs
        return {k: _bf16(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        layout = torch.channels_last if channels_last and value.dim() == 4 else torch.preserve_format
        return value.to(torch.bfloat16, memory_format=layout)
    return value


def _to_bf16(module, args, kwargs):
    if module.dtype != torch.bfloat16 or module.device.type != "cpu":  # moved or cast since loading
        return None
    sample = args[0] if args else kwargs.get("sample")
    module._bfq_in_dtype = sample.dtype if isinstance(sample, torch.Tensor) else None
    args = tuple(_bf16(a, i == 0) for i, a in enumerate(args))
    return args, {k: _bf16(v, k == "sample") for k, v in kwargs.items()}


def _from_bf16(module, args, kwargs, output):
    dtype = module.__dict__.pop("_bfq_in_dtype", None)
    if dtype is None or dtype == torch.bfloat16:
        return output
    if isinstance(output, tuple):
        return (output[0].to(dtype).contiguous(), *output[1:])
    output.sample = output.sample.to(dtype).contiguous()
    return output


def keep_source(model: nn.Module, bfq: BfqFile, runtime: str) -> None:
    """Remember what ``model`` needs to give back its .bfq bytes (:func:`bfq_bytes`): the header, and
    the blocks its modules do not hold verbatim (dense tensors and time tables; every block for
    the dense runtime, whose layers hold decoded weights). A plain attribute: not a tensor of the model."""
    blocks = bfq.header.blocks()
    if runtime == "packed":
        coded = {b.path for layer in bfq.layers.values() for b in (layer.codes, layer.scales)}
        blocks = [b for b in blocks if b.path not in coded]
    header = bytes(bfq._mmap[PREAMBLE_SIZE : PREAMBLE_SIZE + bfq.header_length])
    object.__setattr__(model, "_bfq_source", (header, {b.path: bytes(bfq._bytes(b, check=True)) for b in blocks}))
    model.save_pretrained = functools.partial(save_layout, model)


def bfq_bytes(model: nn.Module) -> bytearray:
    """The .bfq file ``model`` was loaded from, byte for byte, rebuilt from its packed layers' code
    words and scales and the blocks it kept; every block's CRC-32 is checked against the header."""
    source = getattr(model, "_bfq_source", None)
    if source is None:
        raise DiffusersSaveError("this model was not loaded from a .bfq or a bfq diffusers folder")
    header_bytes, blocks = source[0], dict(source[1])
    header = validate_header(parse_header(header_bytes))
    modules = {f"{name}.weight": m for name, m in packed_layers(model)}
    for name, layer in header.layers.items():
        if name in modules:
            blocks[layer.codes.path] = modules[name].codes.detach().cpu().numpy().tobytes()
            blocks[layer.scales.path] = modules[name].scale_bits.detach().cpu().numpy().tobytes()
    data_start = align_up(PREAMBLE_SIZE + len(header_bytes))
    out = bytearray(data_start + check_layout(header.blocks()))
    _PREAMBLE.pack_into(out, 0, MAGIC, VERSION, _crc32(header_bytes), len(header_bytes))
    out[PREAMBLE_SIZE : PREAMBLE_SIZE + len(header_bytes)] = header_bytes
    for block in header.blocks():
        data = blocks.get(block.path)
        if data is None or len(data) != block.length or _crc32(data) != block.crc32:
            raise DiffusersSaveError(f"{block.path}: the model no longer holds the bytes it was loaded with")
        out[data_start + block.offset : data_start + block.offset + block.length] = data
    return out


def save_layout(model: nn.Module, save_directory: str | os.PathLike, **_ignored) -> None:
    """``model.save_pretrained`` of a bfq model: writes ``save_directory`` in the diffusers layout
    (FORMAT.md appendix A: config.json + diffusion_pytorch_model.safetensors), which diffusers loads
    back after ``import bfq``; the same bytes as the .bfq it came from."""
    from bfq.format.diffusers_layout import write_layout

    write_layout(BfqFile.from_bytes(bfq_bytes(model), "model"), save_directory, None, replace=True)


def compute_dtype(compute: str, device: str | torch.device) -> torch.dtype:
    """The UNet's compute dtype for a ``--compute`` name: fp32, bf16, fp16, or "auto": float16 on
    CUDA, bfloat16 on a CPU with native bf16 (:func:`cpu_has_native_bf16`: about half the fp32
    forward time of SD-v1.5, same scores on tiny-sd), float32 elsewhere."""
    if compute != "auto":
        if compute not in COMPUTES:
            raise ValueError(f"compute must be auto or one of {', '.join(COMPUTES)}, got {compute!r}")
        return COMPUTES[compute]
    device = torch.device(device)
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else torch.float32


def resolve_runtime(runtime: str, device: torch.device) -> str:
    """"packed" or "dense" for ``runtime`` ("auto": packed on the CPU, dense elsewhere)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "auto":
        return "packed" if torch.device(device).type == "cpu" else "dense"
    return runtime


def device_problem(name: str) -> str | None:
    """Why ``name`` is not a device this machine can run on, or None when it is."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        return f"{name!r} is not a device: use cpu, cuda, cuda:N or mps"
    if device.type == "cpu":
        return None
    backend = {"cuda": torch.cuda, "mps": getattr(torch.backends, "mps", None), "xpu": getattr(torch, "xpu", None)}[device.type]
    if backend is None or not backend.is_available():
        return f"{name}: this machine has no {device.type} device that torch {torch.__version__} can use; use cpu"
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if device.index is not None and device.index >= count:
        return f"{name}: this machine has {count} {device.type} device(s), numbered from 0"
    return None


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device, or a ValueError saying why this machine cannot run on it."""
    problem = device_problem(str(device))
    if problem:
        raise ValueError(f"device {problem}")
    return torch.device(device)


def _resolve(source, revision) -> str:
    if os.path.exists(source):
        return os.fspath(source)
    from bfq.download import download_bfq

    return download_bfq(str(source), revision=revision)


def build_into(model: nn.Module, bfq: BfqFile, runtime: str, dtype: torch.dtype, *, mmap: bool = False,
               workspace: Workspace | None = None) -> nn.Module:  # fmt: skip
    """Fill ``model`` (built from the file's config, on the meta device) from ``bfq``: time cache,
    packed or decoded layers, dense tensors; ``save_pretrained`` then writes the diffusers layout."""
    _install_time_cache(model, bfq, dtype)
    if runtime == "packed":
        _pack_layers(model, bfq, dtype, mmap=mmap, workspace=workspace or Workspace())
        tensors = _dense_tensors(bfq, dtype)
    else:
        tensors = {**_decode_all(bfq, dtype), **_dense_tensors(bfq, dtype)}
    _assign(model, tensors)
    keep_source(model, bfq, runtime)
    return model


def _empty_model(bfq: BfqFile) -> nn.Module:
    import diffusers
    from diffusers import ModelMixin

    class_name = bfq.header.model["class_name"]
    cls = getattr(diffusers, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, ModelMixin)):
        raise BfqFormatError(f"model.class_name: {class_name!r} is not a diffusers model class")
    config = {k: v for k, v in bfq.header.model["config"].items() if not k.startswith("_")}
    try:
        family = family_for_config(config, class_name)
    except FamilyError as exc:
        raise BfqFormatError(f"model: {exc}") from None
    if family.model_class != class_name:  # a legacy name (Transformer2DModel): the file must name the class it was built as
        raise BfqFormatError(f"model.class_name: {class_name!r}; a {family.title} file names {family.model_class!r}")
    try:
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (pos_embed) computed
            return cls.from_config(config)
    except Exception as exc:  # diffusers raises many types for a config it cannot build
        raise BfqFormatError(f"model.config: cannot build {class_name} from it ({exc})") from None


def _install_time_cache(model: nn.Module, bfq: BfqFile, dtype: torch.dtype) -> None:
    cache = bfq.header.time_cache
    if cache is None:
        return
    from bfq.quant import timecache

    tables = {name: _as_torch(bfq.read_time_table(name), table.dtype) for name, table in cache.tables.items()}
    try:
        if cache.mode == "scheduler" and not cache.per_resnet:
            timecache.install_embedding_cache(model, list(cache.timesteps), tables["time_embedding"])
        elif cache.mode == "scheduler":
            timecache.install_scheduler_cache(model, list(cache.timesteps), tables)
        else:
            timecache.install_grid_cache(model, tables["time_embedding"])
    except (KeyError, AttributeError, ValueError) as exc:
        raise BfqFormatError(f"time_cache: does not fit the model ({exc})") from None


def _decode_all(bfq: BfqFile, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    decode_as, view_as = _DECODE_AS[dtype]
    out = {name: torch.empty(layer.shape, dtype=dtype) for name, layer in bfq.layers.items()}
    bfq.decode_layers({name: t.view(view_as).numpy() for name, t in out.items()}, decode_as)
    return out


def _dense_tensors(bfq: BfqFile, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {}
    for name, dense in bfq.tensors.items():
        out[name] = _as_torch(bfq.read_tensor(name), dense.dtype).to(dtype)
    return out


def _pack_layers(model: nn.Module, bfq: BfqFile, dtype: torch.dtype, *, mmap: bool, workspace: Workspace) -> None:
    """Replace every quantized layer of ``model`` by a packed layer holding the file's code stream."""
    for name, layer in bfq.layers.items():
        module_name, _, leaf = name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            raise BfqFormatError(f"{name}: the model has no module {module_name!r}") from None
        packed_type = PACKED_TYPES.get(type(module))
        if leaf != "weight" or packed_type is None:
            raise BfqFormatError(f"{name}: quantized layers must be the weight of a Linear or Conv2d layer")
        if tuple(module.weight.shape) != tuple(layer.shape):
            raise BfqFormatError(f"{name}: shape {list(layer.shape)} does not match the model's {list(module.weight.shape)}")
        stream = bfq.read_stream(name)  # checks the stream's end (and its CRC when verifying)
        scales = bfq.read_scales(name).view(_SCALE_BITS_AS[layer.scale_dtype])
        packed = packed_type.from_module(
            module, codes=_tensor(stream.view(np.int64), copy=not mmap), scale_bits=torch.from_numpy(scales.copy()),
            bits=layer.bits, num_levels=layer.num_levels, digits_per_word=layer.digits_per_word,
            word_bits=layer.word_bits, workspace=workspace, dtype=dtype,
        )  # fmt: skip
        parent, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, packed)


def _tensor(array: np.ndarray, *, copy: bool) -> torch.Tensor:
    if copy:
        return torch.from_numpy(array.copy())
    with warnings.catch_warnings():  # a read-only memory map: the codes are never written
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)

def _as_torch(array: np.ndarray, stored: str) -> torch.Tensor:
    """A dense block as a tensor of its stored type (a copy); bf16 arrives as uint16 bit patterns."""
    if stored == "bf16":
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(array))


def _assign(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    expected = {name: t for name, t in model.state_dict(keep_vars=True).items()}
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise BfqFormatError(f"tensors: {len(unknown)} name(s) not in the model: {', '.join(unknown[:5])}")
    missing = sorted(name for name, t in expected.items() if name not in tensors and t.is_meta)
    if missing:
        raise BfqFormatError(f"tensors: the file lacks {len(missing)} tensor(s) of the model: {', '.join(missing[:5])}")
    for name, tensor in tensors.items():
        if tuple(expected[name].shape) != tuple(tensor.shape):
            raise BfqFormatError(f"{name}: shape {list(tensor.shape)} does not match the model's {list(expected[name].shape)}")
    model.load_state_dict(tensors, strict=False, assign=True)
    for param in model.parameters():
        param.requires_grad_(False)
