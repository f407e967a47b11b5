"""How much memory a loaded model holds, from a .bfq summary (torch-free: `bfq inspect` uses it).

Packed runtime: the code streams and scales as stored, the dense tensors in the compute dtype, the
time-cache tables (fp16 buffers) and one workspace of decoded weights (the largest layer, or
``workspace_bytes`` when that is smaller: bigger layers are then computed in blocks of output
channels). Dense runtime: every weight decoded into the compute dtype, plus the same dense tensors
and time cache. Python objects and allocator slack are not counted.
"""

from __future__ import annotations

import math

DEFAULT_WORKSPACE_BYTES = 32 << 20
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def resident_bytes(summary: dict, runtime: str, dtype: str = "float32",
                   workspace_bytes: int = DEFAULT_WORKSPACE_BYTES) -> int:  # fmt: skip
    """Bytes of parameters and buffers of the model in `summary` (:func:`bfq.format.inspect.summarize`)
    loaded with `runtime` ("packed" or "dense") in compute `dtype`."""
    item = ITEMSIZE[dtype]
    cache = summary["time_cache"]
    common = summary["dense_values"] * item + (2 * cache["values"] if cache else 0)
    if runtime == "dense":
        return common + summary["quantized_weights"] * item
    if runtime != "packed":
        raise ValueError(f"runtime must be 'packed' or 'dense', got {runtime!r}")
    largest = max((math.prod(layer["shape"]) for layer in summary["layers"]), default=0)
    return common + summary["bytes"]["layers"] + min(largest * item, workspace_bytes)


def resident_report(summary: dict) -> dict[str, int]:
    """``{"packed (fp32)": bytes, "dense fp32": bytes, "dense fp16": bytes}``."""
    return {
        "packed (fp32 compute)": resident_bytes(summary, "packed"),
        "dense fp32": resident_bytes(summary, "dense"),
        "dense fp16": resident_bytes(summary, "dense", "float16"),
    }

