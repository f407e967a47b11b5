"""``BfqConfig`` and ``BfqQuantizer``: the diffusers side of a bfq diffusers folder (FORMAT.md appendix A).

Loading: diffusers builds the model on the meta device from ``config.json``; the quantizer takes
the weights file diffusers found (``maybe_update_loaded_keys``), rebuilds the .bfq it holds, checks
it like any .bfq and fills the model exactly as :func:`bfq.load_unet` does (packed layers, time
cache, dense tensors). diffusers' own per-tensor loading is then told there is nothing left to do.
Saving: the model gives back its .bfq bytes, written as the same layout.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch
from diffusers.quantizers.base import DiffusersQuantizer
from diffusers.quantizers.quantization_config import QuantizationConfigMixin

from bfq.errors import UserError
from bfq.format.diffusers_layout import HEADER_KEY, LAYOUT_KEY, LAYOUT_VERSION, layout_to_bfq_bytes, tensor_entries

RUNTIMES = ("auto", "packed", "dense")  # bfq.runtime.load's, imported only when a model loads (keeps registration light)


class BfqMethod(str, enum.Enum):  # diffusers reads quant_method.value
    BFQ = "bfq"


@dataclass
class BfqConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a bfq model.

    Args:
        bits, recipe: quantizing a float model on load (``from_pretrained(fp_repo, subfolder="unet",
            quantization_config=BfqConfig(bits=2))``): a target average bit-width (the default
            allocator, from the cached sensitivity analysis) or a recipe (a name such as
            ``"uniform-2"`` or a recipe file), exactly as ``bfq quantize``; bfq's initialization
            only, no fine-tuning. Ignored when the folder is already a bfq model.
        time_cache: when quantizing, "scheduler" (default; needs the pipeline's scheduler next to
            the model folder), "grid" or "none". In a saved config: the file's mode.
        steps: when quantizing with a scheduler time cache, the sampler steps it is made for.
        runtime: "packed" (weights stay ~2-bit in memory), "dense" (decoded once) or "auto"
            (packed on the CPU, dense on accelerators), as in :func:`bfq.load_unet`.
        layout, format_version, avg_bits, layer_bits: what a saved folder's config.json says
            about its file (informative; FORMAT.md appendix A).
    """

    quant_method: BfqMethod = BfqMethod.BFQ
    bits: float | None = None
    recipe: str | None = None
    steps: int | None = None
    runtime: str = "auto"
    layout: int | None = LAYOUT_VERSION
    format_version: int | None = 1
    time_cache: str | None = None
    avg_bits: float | None = None
    layer_bits: dict = field(default_factory=dict)

    def __post_init__(self):
        self.quant_method = BfqMethod.BFQ
        if self.runtime not in RUNTIMES:
            raise ValueError(f"BfqConfig: runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")

    def to_dict(self) -> dict:  # quantizing options are not kept: a saved folder is a quantized model
        return {"quant_method": "bfq", "runtime": self.runtime, "layout": self.layout, "format_version": self.format_version,
                "time_cache": self.time_cache, "avg_bits": self.avg_bits, "layer_bits": dict(self.layer_bits)}  # fmt: skip

    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        known = {k: v for k, v in config_dict.items() if k in cls.__dataclass_fields__}
        config = cls(**known)
        return (config, kwargs) if return_unused_kwargs else config


class BfqQuantizer(DiffusersQuantizer):
    use_keep_in_fp32_modules = False
    requires_calibration = False

    def __init__(self, quantization_config: BfqConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.files: list[str] = []
        self.dtype = torch.float32

    def validate_environment(self, *args, device_map=None, **kwargs):
        if isinstance(device_map, dict) and len(set(device_map.values())) > 1:
            raise UserError("bfq models load onto one device: pass no device_map (or one device), then .to(device)")

    def update_torch_dtype(self, torch_dtype):
        self.dtype = torch_dtype or torch.float32
        return torch_dtype

    def maybe_update_loaded_keys(self, loaded_keys, checkpoint_files):
        self.files = list(checkpoint_files)
        return []  # the quantizer fills the whole model: nothing is "unexpected"

    def update_missing_keys(self, model, missing_keys, prefix):
        return []

    def maybe_update_state_dict(self, state_dict):
        return {}  # nothing left for diffusers' per-tensor loading

    def check_if_quantized_param(self, *args, **kwargs) -> bool:
        return False

    def _process_model_before_weight_loading(self, model, **kwargs):
        from bfq.format.reader import BfqFile
        from bfq.runtime.load import build_into, resolve_runtime

        if len(self.files) != 1 or not str(self.files[0]).endswith(".safetensors"):
            raise UserError(f"a bfq model is one diffusion_pytorch_model.safetensors file, got {self.files}")
        path = str(self.files[0])
        if self.pre_quantized:
            with open(path, "rb") as fh:
                bfq = BfqFile.from_bytes(layout_to_bfq_bytes(fh.read(), path), path)
        else:
            bfq = self._quantize(path)
        runtime = resolve_runtime(self.quantization_config.runtime, torch.device("cpu"))
        build_into(model, bfq, runtime, self.dtype)
        return model

    def _quantize(self, weights_file: str):
        """Quantize the float model whose weights are ``weights_file`` as ``bfq quantize`` does, into memory."""
        import os
        import tempfile

        from bfq.format.diffusers_layout import quantization_config
        from bfq.format.reader import BfqFile
        from bfq.pipeline.quantize import quantize

        cfg = self.quantization_config
        folder = os.path.dirname(weights_file)
        parent = os.path.dirname(folder)
        is_pipeline = os.path.isfile(os.path.join(parent, "model_index.json"))
        source, subfolder = (parent, os.path.basename(folder)) if is_pipeline else (folder, None)
        with tempfile.TemporaryDirectory(prefix="bfq-") as tmp:
            out = os.path.join(tmp, "model.bfq")
            quantize(source, out, bits=cfg.bits, recipe=cfg.recipe, time_cache=cfg.time_cache or "scheduler",
                     steps=cfg.steps, subfolder=subfolder, progress=False)  # fmt: skip
            with open(out, "rb") as fh:
                bfq = BfqFile.from_bytes(bytearray(fh.read()), out)
        for key, value in quantization_config(bfq.header).items():  # what the saved config.json will say
            if key in cfg.__dataclass_fields__:
                setattr(cfg, key, value)
        return bfq

    def _process_model_after_weight_loading(self, model, **kwargs):
        self.model = model
        return model

    def get_state_dict_and_metadata(self, state_dict, safe_serialization=False):
        from bfq.format.reader import BfqFile
        from bfq.runtime.load import bfq_bytes

        data = bfq_bytes(self.model)
        bfq = BfqFile.from_bytes(data, "model")
        tensors = {}
        dtypes = {"U8": torch.uint8, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
        for name, dtype, shape, block in tensor_entries(bfq.header):
            raw = bytearray(bfq._bytes(block, check=True))
            tensors[name] = torch.frombuffer(raw, dtype=dtypes[dtype]).reshape(shape) if raw else torch.empty(shape, dtype=dtypes[dtype])
        header = bytes(data[24 : 24 + bfq.header_length]).decode("utf-8")
        return tensors, {LAYOUT_KEY: str(LAYOUT_VERSION), HEADER_KEY: header}

    @property
    def is_serializable(self):
        return True

    @property
    def supports_safetensors_serialization(self):
        return True

    @property
    def is_trainable(self):
        return False

    @property
    def is_compileable(self) -> bool:
        return True

    def _dequantize(self, model):
        from bfq.runtime.packed import packed_layers
        from torch import nn

        for name, layer in packed_layers(model):
            plain = layer._plain.__new__(layer._plain)
            nn.Module.__init__(plain)
            for key, value in vars(layer).items():
                if key not in ("_buffers", "_parameters", "_modules", "workspace"):
                    object.__setattr__(plain, key, value)
            plain._parameters = {"weight": nn.Parameter(layer.dequantize().clone(), requires_grad=False), "bias": layer.bias}
            plain._buffers, plain._modules = {}, {}
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, plain)
        return model
