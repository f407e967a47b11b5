"""The diffusers layout of a .bfq (FORMAT.md appendix A): a component folder that diffusers loads
(``config.json`` + ``diffusion_pytorch_model.safetensors``) and that holds exactly the .bfq's
bytes, so that converting either way is lossless.

The safetensors file is written and read here with the standard library (its format is an 8-byte
length, a JSON header and a byte buffer), so this module needs no torch: the .bfq header travels
verbatim in the safetensors metadata, and every block of the .bfq is one tensor.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from bfq.errors import BfqFormatError, OutputError
from bfq.format.constants import MAGIC, PREAMBLE_SIZE, VERSION

if TYPE_CHECKING:
    from bfq.format.header import Block, Header

LAYOUT_VERSION = 1
QUANT_METHOD = "bfq"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
HEADER_KEY = "bfq_header"  # safetensors metadata: the .bfq header JSON, byte for byte (as UTF-8 text)
LAYOUT_KEY = "bfq_layout"  # safetensors metadata: LAYOUT_VERSION as a decimal string
CODES_SUFFIX = ".bfq_codes"  # "<layer>.bfq_codes": U8, the code block's bytes (u64 cells, little-endian)
SCALES_SUFFIX = ".bfq_scales"  # "<layer>.bfq_scales": F16/F32 [C], the per-channel scales
TIME_PREFIX = "bfq_time_cache."  # "bfq_time_cache.<table>": a time-cache table [T, D]
COMPONENTS = ("unet", "transformer")  # component folders a pipeline folder is searched for
_ST_DTYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16"}
_ST_ITEMSIZE = {"U8": 1, "F16": 2, "BF16": 2, "F32": 4}
_MAX_ST_HEADER = 100 * 1024 * 1024


def tensor_entries(header: Header) -> list[tuple[str, str, list[int], Block]]:
    """``(safetensors name, dtype, shape, block)`` for every block of ``header``, in file order:
    code blocks first (their lengths are multiples of 8), then 4-byte and 2-byte tensors, so every
    tensor starts at a multiple of its item size."""
    out = []
    for layer in header.layers.values():
        out.append((layer.name + CODES_SUFFIX, "U8", [layer.codes.length], layer.codes))
        out.append((layer.name + SCALES_SUFFIX, _ST_DTYPES[layer.scale_dtype], [layer.shape[0]], layer.scales))
    for tensor in header.tensors.values():
        out.append((tensor.name, _ST_DTYPES[tensor.dtype], list(tensor.shape), tensor.block))
    if header.time_cache is not None:
        for name, table in header.time_cache.tables.items():
            out.append((TIME_PREFIX + name, _ST_DTYPES[table.dtype], list(table.shape), table.block))
    return sorted(out, key=lambda e: -_ST_ITEMSIZE[e[1]] if e[1] != "U8" else -8)


def quantization_config(header: Header) -> dict:
    """The ``quantization_config`` entry of the component's config.json (informative: the header
    in the weights file is what a reader trusts)."""
    histogram: dict[str, int] = {}
    for layer in header.layers.values():
        histogram[str(layer.bits)] = histogram.get(str(layer.bits), 0) + 1
    cache = header.time_cache
    return {
        "quant_method": QUANT_METHOD,
        "layout": LAYOUT_VERSION,
        "format_version": VERSION,
        "time_cache": None if cache is None else cache.mode,
        "avg_bits": header.recipe.get("avg_bits"),
        "layer_bits": dict(sorted(histogram.items(), key=lambda kv: int(kv[0]))),
    }


def model_config(header: Header) -> dict:
    """The component's config.json: the model config of the header, its class and the quantization config."""
    config = {"_class_name": header.model["class_name"]}
    config.update({k: v for k, v in header.model["config"].items() if k != "_class_name"})
    config["quantization_config"] = quantization_config(header)
    return config


def write_layout(bfq, out_dir: str | os.PathLike, component: str | None, *, replace: bool = False) -> Path:
    """Write the open, validated BfqFile ``bfq`` as ``out_dir/component/`` (``out_dir`` itself when
    ``component`` is None), checking every block's CRC-32 on the way; returns the component folder.
    Refuses to write into a non-empty folder unless ``replace`` (then only its two files are replaced)."""
    folder = Path(out_dir) / component if component else Path(out_dir)
    if not replace and folder.exists() and any(folder.iterdir()):
        raise OutputError(f"{folder}: already exists and is not empty; choose another output folder")
    entries = tensor_entries(bfq.header)
    header_bytes = bytes(bfq._mmap[PREAMBLE_SIZE : PREAMBLE_SIZE + bfq.header_length])
    st_header, offset = {"__metadata__": {"format": "pt", LAYOUT_KEY: str(LAYOUT_VERSION), HEADER_KEY: header_bytes.decode("utf-8")}}, 0
    for name, dtype, shape, block in entries:
        st_header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + block.length]}
        offset += block.length
    raw = json.dumps(st_header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (WEIGHTS_NAME + ".partial")
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        for _, _, _, block in entries:
            fh.write(bfq._bytes(block, check=True))
    tmp.replace(folder / WEIGHTS_NAME)
    (folder / CONFIG_NAME).write_text(json.dumps(model_config(bfq.header), indent=2, sort_keys=False) + "\n")
    return folder


def component_folder(path: str | os.PathLike) -> Path:
    """The bfq component folder at ``path``: ``path`` itself when its config.json says
    ``quant_method: "bfq"``, else the one of ``path``'s component folders (``unet/``, ``transformer/``) that does."""
    path = Path(path)
    if _is_bfq_component(path):
        return path
    found = [path / c for c in COMPONENTS if _is_bfq_component(path / c)]
    if len(found) != 1:
        what = "none" if not found else ", ".join(f.name for f in found)
        raise BfqFormatError(f"{path}: not a bfq diffusers folder (a {CONFIG_NAME} with quantization_config.quant_method "
                             f"'bfq' here or in {'/'.join(COMPONENTS)}/; found {what})")  # fmt: skip
    return found[0]


def _is_bfq_component(folder: Path) -> bool:
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return False
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD and (folder / WEIGHTS_NAME).is_file()


def read_safetensors_header(data) -> tuple[dict, int]:
    """The JSON header of a safetensors file held in ``data`` and where its byte buffer starts."""
    if len(data) < 8:
        raise BfqFormatError(f"{WEIGHTS_NAME}: {len(data)} bytes is too short for a safetensors file")
    (n,) = struct.unpack_from("<Q", data, 0)
    if n > min(_MAX_ST_HEADER, len(data) - 8):
        raise BfqFormatError(f"{WEIGHTS_NAME}: header length {n} runs past the end of the file")
    try:
        header = json.loads(bytes(data[8 : 8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BfqFormatError(f"{WEIGHTS_NAME}: the header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise BfqFormatError(f"{WEIGHTS_NAME}: the header is not a JSON object")
    return header, 8 + n


def layout_to_bfq_bytes(data, name: str = WEIGHTS_NAME) -> bytearray:
    """The .bfq file that the diffusers-layout weights file ``data`` (its bytes) holds, byte for
    byte. Raises BfqFormatError when the file is not one (no bfq header, a missing, extra or
    mis-typed tensor, a bad header); the block checksums are checked by whoever opens the result."""
    from bfq.format.header import _PREAMBLE, align_up, check_layout, validate_header  # numba: only when used
    from bfq.format.strict_json import parse_header

    st, start = read_safetensors_header(data)
    meta = st.pop("__metadata__", None) or {}
    if meta.get(LAYOUT_KEY) != str(LAYOUT_VERSION) or not isinstance(meta.get(HEADER_KEY), str):
        raise BfqFormatError(f"{name}: no bfq layout {LAYOUT_VERSION} metadata ({LAYOUT_KEY}, {HEADER_KEY}): not a bfq weights file")
    header_bytes = meta[HEADER_KEY].encode("utf-8")
    header = validate_header(parse_header(header_bytes))
    entries = tensor_entries(header)
    unknown = sorted(set(st) - {e[0] for e in entries})
    if unknown:
        raise BfqFormatError(f"{name}: tensor(s) the bfq header does not describe: {', '.join(unknown[:5])}")
    data_start = align_up(PREAMBLE_SIZE + len(header_bytes))
    out = bytearray(data_start + check_layout(header.blocks()))
    _PREAMBLE.pack_into(out, 0, *_preamble(header_bytes))
    out[PREAMBLE_SIZE : PREAMBLE_SIZE + len(header_bytes)] = header_bytes
    for tensor_name, dtype, shape, block in entries:
        a, b = _tensor_range(st, tensor_name, dtype, shape, block.length, len(data) - start, name)
        out[data_start + block.offset : data_start + block.offset + block.length] = data[start + a : start + b]
    return out


def _preamble(header_bytes: bytes) -> tuple:
    from bfq.format.header import _crc32

    return MAGIC, VERSION, _crc32(header_bytes), len(header_bytes)


def _tensor_range(st: dict, tensor: str, dtype: str, shape: list[int], length: int, buffer_len: int, name: str) -> tuple[int, int]:
    entry = st.get(tensor)
    if not isinstance(entry, dict):
        raise BfqFormatError(f"{name}: tensor {tensor!r} is missing")
    if entry.get("dtype") != dtype or entry.get("shape") != shape:
        raise BfqFormatError(f"{name}: tensor {tensor!r} is {entry.get('dtype')} {entry.get('shape')}, the header says {dtype} {shape}")
    offsets = entry.get("data_offsets")
    ok = isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
    if not ok or not (0 <= offsets[0] and offsets[1] - offsets[0] == length and offsets[1] <= buffer_len):
        raise BfqFormatError(f"{name}: tensor {tensor!r}: data_offsets {offsets} do not hold its {length} bytes")
    return offsets[0], offsets[1]


def read_layout(path: str | os.PathLike) -> bytearray:
    """The .bfq bytes held by the bfq diffusers folder at ``path`` (see :func:`component_folder`)."""
    folder = component_folder(path)
    return layout_to_bfq_bytes((folder / WEIGHTS_NAME).read_bytes(), str(folder / WEIGHTS_NAME))


def open_layout(path: str | os.PathLike, *, verify: bool = True):
    """A BfqFile (in memory) for the bfq diffusers folder at ``path``."""
    from bfq.format.reader import BfqFile

    folder = component_folder(path)
    return BfqFile.from_bytes(read_layout(folder), str(folder / WEIGHTS_NAME), verify=verify)


__all__ = ["open_layout", "read_layout", "write_layout", "layout_to_bfq_bytes", "tensor_entries"]
