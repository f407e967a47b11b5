"""Format constants of the .bfq container, version 1 (FORMAT.md is normative).

Everything the writer chooses and the reader checks is defined here and nowhere else.
"""

from __future__ import annotations

import math
from fractions import Fraction

MAGIC = b"\x89BFQ\r\n\x1a\n"  # non-ASCII first byte, CRLF, ^Z, LF: text-mode transfers break it
VERSION = 1  # bumped only for changes an old reader cannot skip (see FORMAT.md, "Versioning")
PREAMBLE_SIZE = 24  # magic (8) + version u32 + header crc32 u32 + header length u64
ALIGNMENT = 64  # data section and every block start on a multiple of this

MAX_HEADER_BYTES = 64 * 1024 * 1024
MAX_JSON_DEPTH = 32  # the top-level object is level 1; every `{` and `[` opens one
MAX_JSON_VALUES = 1 << 19  # objects, arrays, strings, numbers, literals; member names do not count
MAX_NDIM = 8
MAX_DIM = 1 << 40
MAX_ELEMENTS = 1 << 48
MAX_BLOCKS = 1_000_000  # scales + codes + dense tensors + time-cache tables

TOP_LEVEL_KEYS = frozenset({"producer", "model", "metadata", "layers", "tensors", "time_cache", "recipe"})
MODEL_KEYS = frozenset({"class_name", "config", "source"})
# model.source, closed per kind: key -> (JSON type, required); "kind" itself is required
SOURCE_KINDS = {
    "hub": {"repo": (str, True), "revision": (str, False), "subfolder": (str, False)},
    "file": {"sha256": (str, True), "name": (str, False)},
    "builtin": {"name": (str, True), "seed": (int, False)},
}
SHA256_PATTERN = r"[0-9a-f]{64}"
# recipe keys a reader interprets (the rest of the recipe is free-form)
RECIPE_INTEGER_KEYS = ("n_weights_total", "n_params_total")
RECIPE_NUMBER_KEYS = ("avg_bits",)

TIME_CACHE_MODES = ("scheduler", "grid")
# model.config keys whose non-null value mixes conditioning into the time embedding (FORMAT.md §2.3),
# by the kind of cache: per-ResNet features (scheduler mode's "features") hold what the timestep alone
# gives, so any such key makes them wrong; the time embedding alone (scheduler mode's "embedding",
# §2.3.1, and grid mode) is taken before conditioning is added, and only time_cond_proj_dim, which
# conditions the time MLP itself, rules it out
CONDITIONED_TIME_KEYS = {
    "features": ("addition_embed_type", "class_embed_type", "num_class_embeds", "time_cond_proj_dim"),
    "embedding": ("time_cond_proj_dim",),
}
TIME_CACHE_KEYS = {  # scheduler mode holds exactly one of features (per ResNet) and embedding (v1.2, §2.3.1)
    "scheduler": frozenset({"mode", "timesteps", "features", "embedding"}),
    "grid": frozenset({"mode", "timesteps", "embedding"}),
}

PACKING_SCHEME = "radix-fraction-v1"
MAX_WORD_BITS = 64

LEVEL_SETS = ("balanced", "plain")
MIN_BITS, MAX_BITS = 1, 8

# dtype name -> (itemsize, numpy dtype string); bf16 is carried as raw little-endian uint16
DENSE_DTYPES = {"f32": (4, "<f4"), "f16": (2, "<f2"), "bf16": (2, "<u2")}
SCALE_DTYPES = ("f16", "f32")


# The DiT model kind (FORMAT.md §2.3.2): model.class_name values whose time path is adaLN-single.
ADALN_CLASSES = ("PixArtTransformer2DModel",)
ADALN_MODULE = "adaln_single"  # everything a scheduler-mode `features` cache replaces
ADALN_TIME_MLP = "adaln_single.emb.timestep_embedder"  # what an `embedding` cache replaces
ADALN_FEATURES = {"adaln_single.linear": 6, "adaln_single.emb": 1}  # feature key -> its width in multiples of D
SIZE_CONDITION_SAMPLE_SIZE = 128  # a DiT config with use_additional_conditions absent or null: size conditions iff sample_size is 128


def is_adaln_class(class_name: str | None) -> bool:
    """True for a `model.class_name` of the DiT kind (FORMAT.md §2.3.2)."""
    return class_name in ADALN_CLASSES


def uses_size_conditions(config: dict) -> bool:
    """Whether a DiT config embeds the image size and aspect ratio into its timestep embedding
    (FORMAT.md §2.3.2): `use_additional_conditions` when it is a boolean; when absent or null, whether
    `sample_size` (absent: 128, diffusers' default) is 128."""
    flag = config.get("use_additional_conditions")
    if flag is not None:
        return bool(flag)
    return config.get("sample_size", SIZE_CONDITION_SAMPLE_SIZE) == SIZE_CONDITION_SAMPLE_SIZE


def replaced_by_time_cache(name: str, mode: str, per_resnet: bool = True, class_name: str | None = None) -> bool:
    """True for the state-dict names a time cache of `mode` replaces, which a file with that cache
    MUST NOT hold. UNets: `time_embedding.*` (both modes) and every `time_emb_proj` (scheduler mode with
    per-ResNet `features`; not with a scheduler-mode `embedding`, §2.3.1). The DiT kind (`class_name`
    in ADALN_CLASSES, §2.3.2): `adaln_single.*` with `features` (`per_resnet`), else the timestep MLP
    `adaln_single.emb.timestep_embedder.*`."""
    parts = name.split(".")
    if is_adaln_class(class_name):
        if mode == "scheduler" and per_resnet:
            return parts[0] == ADALN_MODULE
        return name.startswith(ADALN_TIME_MLP + ".")
    return parts[0] == "time_embedding" or (mode == "scheduler" and per_resnet and "time_emb_proj" in parts)


def num_levels(bits: int, levels: str) -> int:
    """Number of code levels L for an n-bit layer: 2^n + 1 (balanced) or 2^n (plain)."""
    return (1 << bits) + (1 if levels == "balanced" else 0)


def level_offset(bits: int) -> int:
    """Digit d stored for integer level q is d = q + 2^(n-1) for both level sets."""
    return 1 << (bits - 1)


def bits_per_level_ideal(bits: int, levels: str) -> float:
    """log2(L): the paper's accounting of an n-bit layer (1.585 for balanced 1-bit)."""
    return math.log2(num_levels(bits, levels))


def word_bits_for(levels_count: int, digits: int) -> int:
    """Smallest k with L^g <= 2^k."""
    return (levels_count**digits - 1).bit_length()


def fits_fast_path(levels_count: int, word_bits: int) -> bool:
    """True when (2^k - 1) * L fits in 64 bits, so decoding needs no 128-bit arithmetic."""
    return ((1 << word_bits) - 1) * levels_count < (1 << 64)


def is_legal_packing(levels_count: int, digits: int, word_bits: int) -> bool:
    return (
        2 <= levels_count <= 257
        and 1 <= digits <= 64
        and 1 <= word_bits <= MAX_WORD_BITS
        and levels_count**digits <= (1 << word_bits)
    )


def choose_packing(levels_count: int) -> tuple[int, int]:
    """The writer's (g, k): fewest bits per digit, then the most digits per word, on the fast path."""
    best = None
    for g in range(1, 65):
        k = word_bits_for(levels_count, g)
        if k > MAX_WORD_BITS:
            break
        if not fits_fast_path(levels_count, k):
            continue
        key = (Fraction(k, g), -g)
        if best is None or key < best[0]:
            best = (key, g, k)
    return best[1], best[2]
