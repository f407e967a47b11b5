#!/usr/bin/env python3
"""Write the golden `.bfq` v1 files of spec/vectors/ and their decoded values (expected.json).

This generator follows FORMAT.md byte for byte and is independent of the implementation under
test: it uses only the Python standard library (no numpy, no `bfq` import), packs code streams
with exact big-integer arithmetic, and derives every expected float through `struct`
round-trips ('f' for binary32, 'e' for binary16; bfloat16 by round-to-nearest-even on the
binary32 bit pattern). The tests run it with `python -I -S` (no site-packages at all) and
compare its output byte for byte with the committed files.

    python spec/gen_vectors.py [--out DIR]      # default: spec/vectors next to this script

Conventions of expected.json (one entry per file under "files"):

* layers[name]: shape, bits, levels, packing, scale_dtype, scale_bits (the stored bit patterns),
  codes (the integer levels q, flat, C order), float32_bits / float16_bits / bfloat16_bits (the
  dequantized weight float32(scale[c]) * q, as the target format's bit pattern) and float32
  (the same values as numbers; non-finite ones as the strings "inf" / "-inf").
* tensors[name] and time_cache.tables[name]: dtype, shape, bits (u32 for f32, u16 for f16 and
  bf16) and values (the decoded numbers).
* worked_example.bfq is FORMAT.md section 4.1 exactly: one layer "weight" of shape [1, 4]
  (one output channel), ternary, g = 3, k = 5, q = [1, -1, 0, 1], one f16 scale 0.5, so its
  code block is the single cell `D7 02 00 00 00 00 00 00`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import sys
import zlib

MAGIC = b"\x89BFQ\r\n\x1a\n"
VERSION = 1
ALIGN = 64
SCHEME = "radix-fraction-v1"
MODEL = {"class_name": "UNet2DConditionModel", "config": {"sample_size": 8, "in_channels": 4}}
PRODUCER = "spec/gen_vectors.py"

# FORMAT.md section 4, "Writer's choice": L -> (g, k); recomputed and checked below.
DEFAULT_PACKING = {
    3: (29, 46), 5: (24, 56), 9: (17, 54), 17: (11, 45), 33: (11, 56), 65: (9, 55), 129: (7, 50), 257: (6, 49),
    2: (63, 63), 4: (31, 62), 8: (20, 60), 16: (15, 60), 32: (11, 55), 64: (9, 54), 128: (8, 56), 256: (7, 56),
}


# ------------------------------------------------------------------------------------------
# Code streams (FORMAT.md section 4), exact integer arithmetic


def num_levels(bits: int, levels: str) -> int:
    return 2**bits + (1 if levels == "balanced" else 0)


def min_word_bits(L: int, g: int) -> int:
    """Smallest k with L^g <= 2^k."""
    k = 0
    while L**g > 2**k:
        k += 1
    return k


def legal(L: int, g: int, k: int) -> bool:
    return 2 <= L <= 257 and 1 <= g <= 64 and 1 <= k <= 64 and L**g <= 2**k


def writer_choice(L: int) -> tuple[int, int]:
    """Fewest bits per digit k/g, then the largest g, among words with (2^k - 1) * L < 2^64."""
    best = None
    for g in range(1, 65):
        k = min_word_bits(L, g)
        if k > 64 or (2**k - 1) * L >= 2**64:
            continue
        if best is None or k * best[0] < best[1] * g or (k * best[0] == best[1] * g and g > best[0]):
            best = (g, k)
    return best


def encode_word(digits: list[int], L: int, k: int) -> int:
    """v = ceil(W * 2^k / L^g) with W = sum d_i * L^(g-1-i)."""
    W = 0
    for d in digits:
        assert 0 <= d < L
        W = W * L + d
    g = len(digits)
    v = -((-W * 2**k) // L**g)
    assert 0 <= v < 2**k
    return v


def decode_word(v: int, L: int, g: int, k: int) -> list[int]:
    """The section 4 loop: x = v * L; d = x >> k; v = x mod 2^k."""
    out = []
    for _ in range(g):
        x = v * L
        out.append(x >> k)
        v = x % 2**k
    return out


def pack_stream(digits: list[int], L: int, g: int, k: int) -> bytes:
    n_words = -(-len(digits) // g)
    acc = 0
    for j in range(n_words):
        word = digits[j * g : (j + 1) * g]
        word = word + [0] * (g - len(word))
        v = encode_word(word, L, k)
        assert decode_word(v, L, g, k) == word
        acc |= v << (j * k)
    n_cells = -(-(n_words * k) // 64)
    return acc.to_bytes(8 * n_cells, "little")


# ------------------------------------------------------------------------------------------
# Floating point through struct round-trips


def f32_bits_of(x: float) -> int:
    """Round a double to binary32 (nearest-even; overflow gives infinity) and return its bits."""
    try:
        return struct.unpack("<I", struct.pack("<f", x))[0]
    except OverflowError:
        return 0xFF800000 if x < 0 else 0x7F800000


def f16_bits_of(x: float) -> int:
    try:
        return struct.unpack("<H", struct.pack("<e", x))[0]
    except OverflowError:
        return 0xFC00 if x < 0 else 0x7C00


def f32_value(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def f16_value(bits: int) -> float:
    return struct.unpack("<e", struct.pack("<H", bits))[0]


def bf16_value(bits: int) -> float:
    return f32_value(bits << 16)


def bf16_bits_of_f32_bits(u: int) -> int:
    """binary32 bits -> bfloat16 bits, round to nearest even (inputs here are never NaN)."""
    assert (u & 0x7F800000) != 0x7F800000 or (u & 0x7FFFFF) == 0
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF


DTYPES = {  # name -> (itemsize, struct code of the bit pattern, bits -> value)
    "f32": (4, "I", f32_value),
    "f16": (2, "H", f16_value),
    "bf16": (2, "H", bf16_value),
}


def number(x: float):
    if math.isnan(x):
        return "nan"
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


# ------------------------------------------------------------------------------------------
# Deterministic pseudo-random numbers (splitmix64), independent of the Python version


class Rng:
    def __init__(self, seed: int):
        self.state = seed & (2**64 - 1)

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & (2**64 - 1)
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        return self.next() % n

    def f16_bits(self, lo_exp: int = 10, hi_exp: int = 20) -> int:
        """A finite normal binary16 of either sign with biased exponent in [lo_exp, hi_exp]."""
        return (self.below(2) << 15) | ((lo_exp + self.below(hi_exp - lo_exp + 1)) << 10) | self.below(1024)

    def f32_bits(self, lo_exp: int = 117, hi_exp: int = 133) -> int:
        return (self.below(2) << 31) | ((lo_exp + self.below(hi_exp - lo_exp + 1)) << 23) | self.below(1 << 23)

    def codes(self, n: int, bits: int, levels: str) -> list[int]:
        """n codes q with the extreme levels first and last (when n allows), the rest random."""
        L = num_levels(bits, levels)
        off = 2 ** (bits - 1)
        q = [self.below(L) - off for _ in range(n)]
        if n >= 2:
            q[0], q[-1] = -off, L - 1 - off
        return q


# ------------------------------------------------------------------------------------------
# File model: a header with block placeholders, filled in when the blocks are placed


class Block:
    def __init__(self, label: str, data: bytes, entry: dict):
        assert data, "blocks are never empty"
        self.label, self.data, self.entry = label, data, entry


class Vector:
    def __init__(self, filename: str, description: str, *, model=None, metadata=None, producer=PRODUCER):
        self.filename = filename
        self.description = description
        self.header: dict = {"producer": producer, "model": model or MODEL}
        if metadata is not None:
            self.header["metadata"] = metadata
        self.header["layers"] = []
        self.header["tensors"] = []
        self.blocks: list[Block] = []
        self.expected: dict = {"description": description, "layers": {}, "tensors": {}, "time_cache": None}

    # -- content ---------------------------------------------------------------------------

    def layer(self, name, shape, bits, levels, codes, scale_dtype, scale_bits, packing=None):
        L = num_levels(bits, levels)
        g, k = packing or DEFAULT_PACKING[L]
        assert legal(L, g, k), (name, L, g, k)
        size = math.prod(shape)
        assert len(codes) == size and len(scale_bits) == shape[0] and 2 <= len(shape) <= 8
        off = 2 ** (bits - 1)
        assert all(-off <= q < L - off for q in codes)
        stream = pack_stream([q + off for q in codes], L, g, k)
        assert len(stream) == 8 * -(-(-(-size // g) * k) // 64)
        itemsize, code, to_value = DTYPES[scale_dtype]
        scales = b"".join(struct.pack("<" + code, b) for b in scale_bits)
        scales_entry = {"dtype": scale_dtype}
        codes_entry: dict = {}
        self.header["layers"].append(
            {
                "name": name,
                "shape": list(shape),
                "bits": bits,
                "levels": levels,
                "packing": {"scheme": SCHEME, "digits_per_word": g, "word_bits": k},
                "scales": scales_entry,
                "codes": codes_entry,
            }
        )
        self.blocks.append(Block(f"{name}/scales", scales, scales_entry))
        self.blocks.append(Block(f"{name}/codes", stream, codes_entry))
        per_channel = size // shape[0]
        f32, f16, bf16, vals = [], [], [], []
        for i, q in enumerate(codes):
            s = to_value(scale_bits[i // per_channel])
            assert math.isfinite(s)
            b32 = f32_bits_of(s * q)  # s * q is exact in a double: <= 24 + 9 significant bits
            v32 = f32_value(b32)
            f32.append(b32)
            f16.append(f16_bits_of(v32))
            bf16.append(bf16_bits_of_f32_bits(b32))
            vals.append(number(v32))
        self.expected["layers"][name] = {
            "shape": list(shape),
            "bits": bits,
            "levels": levels,
            "packing": [g, k],
            "scale_dtype": scale_dtype,
            "scale_bits": list(scale_bits),
            "codes": list(codes),
            "float32_bits": f32,
            "float16_bits": f16,
            "bfloat16_bits": bf16,
            "float32": vals,
        }

    def _dense(self, label, dtype, shape, bits, entry):
        itemsize, code, to_value = DTYPES[dtype]
        assert len(bits) == math.prod(shape) and 1 <= len(shape) <= 8
        data = b"".join(struct.pack("<" + code, b) for b in bits)
        entry.update({"dtype": dtype, "shape": list(shape)})
        self.blocks.append(Block(label, data, entry))
        return {"dtype": dtype, "shape": list(shape), "bits": list(bits), "values": [number(to_value(b)) for b in bits]}

    def tensor(self, name, dtype, shape, bits):
        entry = {"name": name}
        self.header["tensors"].append(entry)
        self.expected["tensors"][name] = self._dense(f"tensor/{name}", dtype, shape, bits, entry)

    def time_cache(self, mode, timesteps, tables):
        """tables: {name: (dtype, shape, bits)}; grid mode, and scheduler mode's `embedding` (FORMAT.md
        2.3.1, 2.3.2), take the single name "time_embedding"."""
        cache: dict = {"mode": mode, "timesteps": list(timesteps)}
        exp = {"mode": mode, "timesteps": [float(t) for t in timesteps], "tables": {}}
        if mode == "scheduler" and set(tables) != {"time_embedding"}:
            cache["features"] = {}
            for name, (dtype, shape, bits) in tables.items():
                entry = cache["features"][name] = {}
                exp["tables"][name] = self._dense(f"time/{name}", dtype, shape, bits, entry)
        else:
            ((name, (dtype, shape, bits)),) = tables.items()
            assert name == "time_embedding"
            entry = cache["embedding"] = {}
            exp["tables"][name] = self._dense("time/time_embedding", dtype, shape, bits, entry)
        self.header["time_cache"] = cache
        self.expected["time_cache"] = exp

    # -- serialisation ---------------------------------------------------------------------

    def build(self, order=None, header_keys=None, pad_header_to_alignment=False, indent=None, literals=()) -> bytes:
        """order: block labels in their physical order (default: as added). header_keys: the
        top-level key order. pad_header_to_alignment: grow metadata["pad"] until 24 + N is a
        multiple of 64, so the data section follows the header with no padding at all. indent:
        whitespace between JSON tokens. literals: (placeholder string, JSON text) pairs written
        verbatim in place of the placeholder's quoted text (numbers JSON writes differently)."""
        blocks = self.blocks
        if order is not None:
            by_label = {b.label: b for b in blocks}
            assert sorted(order) == sorted(by_label)
            blocks = [by_label[label] for label in order]
        data = bytearray()
        for b in blocks:
            data += b"\0" * (-len(data) % ALIGN)
            b.entry.update({"offset": len(data), "length": len(b.data), "crc32": zlib.crc32(b.data)})
            data += b.data
        header = self.header
        if header_keys is not None:
            assert sorted(header_keys) == sorted(header)
            header = {key: header[key] for key in header_keys}

        def render() -> bytes:
            raw = dump_json(header, indent)
            for placeholder, text in literals:
                assert raw.count(dump_json(placeholder)) == 1, placeholder
                raw = raw.replace(dump_json(placeholder), text.encode("utf-8"))
            return raw

        raw = render()
        if pad_header_to_alignment:
            header["metadata"]["pad"] = "." * (-(24 + len(raw)) % ALIGN)
            raw = render()
            assert (24 + len(raw)) % ALIGN == 0
        pre = MAGIC + struct.pack("<IIQ", VERSION, zlib.crc32(raw), len(raw))
        out = pre + raw
        out += b"\0" * (-len(out) % ALIGN)
        return bytes(out + data)


def dump_json(obj, indent=None) -> bytes:
    separators = (",", ":") if indent is None else (",", ": ")
    return json.dumps(obj, separators=separators, indent=indent, ensure_ascii=False, allow_nan=False).encode("utf-8")


# ------------------------------------------------------------------------------------------
# The vectors


def worked_example() -> Vector:
    v = Vector("worked_example.bfq", "FORMAT.md 4.1: ternary, g=3, k=5, q=[1,-1,0,1], shape [1,4], f16 scale 0.5")
    v.layer("weight", [1, 4], 1, "balanced", [1, -1, 0, 1], "f16", [f16_bits_of(0.5)], packing=(3, 5))
    assert pack_stream([2, 0, 1, 2], 3, 3, 5) == bytes.fromhex("d702000000000000")
    return v


def balanced(bits: int) -> Vector:
    rng = Rng(1000 + bits)
    v = Vector(
        f"balanced_{bits}bit.bfq",
        f"{bits}-bit balanced (L={num_levels(bits, 'balanced')}), the writer's default packing; "
        "a [5, 23] layer with f16 scales (size 115, not a multiple of g: words straddle channels) "
        "and a [3, 2, 3, 3] layer with f32 scales",
    )
    v.layer(
        "down_blocks.0.attentions.0.proj_in.weight", [5, 23], bits, "balanced",
        rng.codes(115, bits, "balanced"), "f16", [rng.f16_bits() for _ in range(5)],
    )
    v.layer(
        "down_blocks.0.resnets.0.conv1.weight", [3, 2, 3, 3], bits, "balanced",
        rng.codes(54, bits, "balanced"), "f32", [rng.f32_bits() for _ in range(3)],
    )
    return v


def plain() -> Vector:
    rng = Rng(2000)
    v = Vector("plain.bfq", "plain level sets (L = 2^n) for n = 1..8, default packing, f16 scales")
    for bits in range(1, 9):
        shape = [3, 17 + 3 * bits]
        v.layer(f"plain{bits}.weight", shape, bits, "plain", rng.codes(math.prod(shape), bits, "plain"), "f16",
                [rng.f16_bits() for _ in range(3)])
    return v


PACKINGS = [
    # (name, bits, levels, (g, k), shape): legal packings the writer does not choose
    ("g1_k2_ternary", 1, "balanced", (1, 2), [2, 5]),
    ("g2_k5", 2, "balanced", (2, 5), [3, 3]),
    ("loose_k10_g3", 2, "balanced", (3, 10), [2, 7]),  # k above the minimum 7
    ("g1_k9_L257", 8, "balanced", (1, 9), [2, 3]),
    ("g8_k64_plain8_wide", 8, "plain", (8, 64), [2, 13]),
    ("g7_k57_L257_wide", 8, "balanced", (7, 57), [3, 10]),  # (2^57 - 1) * 257 >= 2^64
    ("g40_k64_ternary_wide", 1, "balanced", (40, 64), [2, 45]),
    ("g27_k63_L5_wide", 2, "balanced", (27, 63), [3, 19]),
    ("g64_k64_binary_wide", 1, "plain", (64, 64), [2, 70]),
    ("g1_k64_L9_wide", 3, "balanced", (1, 64), [2, 3]),
    ("g32_k64_L4_wide", 2, "plain", (32, 64), [5, 9]),
    ("g39_k62_ternary_fast", 1, "balanced", (39, 62), [1, 80]),  # largest k on the fast path for L=3
]


def packings() -> Vector:
    rng = Rng(3000)
    v = Vector(
        "packings.bfq",
        "legal non-default packings: small g, loose k, and wide words where (2^k - 1) * L >= 2^64 "
        "(decoding needs products wider than 64 bits)",
    )
    for name, bits, levels, (g, k), shape in PACKINGS:
        n = math.prod(shape)
        v.layer(f"{name}.weight", shape, bits, levels, rng.codes(n, bits, levels), "f16",
                [rng.f16_bits() for _ in range(shape[0])], packing=(g, k))
    return v


# f32 scales, as bit patterns, chosen for the edge cases of float32(scale) * q:
F32_SCALES = [
    0x3E3C9555,  # * 3: the float32 product rounds onto a float16 tie; rounding the exact product
    0x3ED8E667,  #   straight to float16 would give a different value (double rounding matters)
    0x3E04D249,  # * 7: same
    0x3EA58AAB,  # * -3: same
    0x3F800001,  # 1 + 2^-23: 24 significant bits, so scale * 3 is rounded in float32
    0x007FFFFF,  # largest subnormal: scale * q becomes normal and is rounded
    0x00000001,  # smallest subnormal, 2^-149
    0x80000000,  # -0.0: products are -0.0 for q >= 0 and +0.0 for q < 0
    0x00000000,  # +0.0: products are -0.0 for q < 0
    0x469C4000,  # 20000.0: |scale * q| > 65504 overflows to infinity in float16
    0x7F61B1E6,  # 3e38: scale * q overflows to infinity already in float32
    0xBFC00000,  # -1.5
]
F16_SCALES = [
    0x0001,  # 2^-24, smallest subnormal
    0x03FF,  # largest subnormal
    0x0400,  # smallest normal
    0x7BFF,  # 65504: * 2 overflows in float16
    0x8000,  # -0.0
    0x0000,  # +0.0
    0xB555,  # -0.333
    0x3C00,  # 1.0
]


def scales() -> Vector:
    v = Vector("scales.bfq", "scale edge cases: f32 scales with 24 significant bits, subnormals, signed zeros, overflow to "
               "infinity (float16 and float32) and double-rounding traps; f16 subnormal/max/signed-zero scales")
    L4 = num_levels(4, "balanced")
    codes = [d - 8 for _ in F32_SCALES for d in range(L4)]  # every level in every channel
    v.layer("f32_scales.weight", [len(F32_SCALES), L4], 4, "balanced", codes, "f32", F32_SCALES)
    L3 = num_levels(3, "balanced")
    codes = [d - 4 for _ in F16_SCALES for d in range(L3)]
    v.layer("f16_scales.weight", [len(F16_SCALES), 1, L3], 3, "balanced", codes, "f16", F16_SCALES)
    return v


def dense() -> Vector:
    v = Vector("dense.bfq", "dense tensors in f32, f16 and bf16 (scalar [1], 8 dimensions, subnormals, signed zeros, "
               "extremes); no quantized layers")
    v.tensor("conv_in.bias", "f32", [6], [0x3F800000, 0x80000000, 0x00000001, 0x7F7FFFFF, 0xFF7FFFFF, 0x3EAAAAAB])
    v.tensor("conv_norm_out.weight", "f16", [2, 3], [0x3C00, 0x8000, 0x0001, 0x7BFF, 0xFBFF, 0x3555])
    v.tensor("time_proj.scale", "f32", [1], [0x40490FDB])
    v.tensor("mid_block.attentions.0.norm.bias", "bf16", [2, 2, 2],
             [0x3F80, 0x8000, 0x0001, 0x7F7F, 0xFF7F, 0x3EAB, 0xC2F7, 0x0080])
    v.tensor("eight.dims", "f16", [1, 1, 1, 1, 1, 1, 2, 1], [0x4248, 0xC248])
    return v


def time_scheduler() -> Vector:
    rng = Rng(4000)
    v = Vector("time_scheduler.bfq", "scheduler-mode time cache: T=4 timesteps (integers and a fraction, "
               "descending), per-ResNet tables in f16, f32 and bf16, beside a layer and a tensor")
    v.layer("down_blocks.0.resnets.0.conv1.weight", [4, 2, 3, 3], 2, "balanced", rng.codes(72, 2, "balanced"), "f16",
            [rng.f16_bits() for _ in range(4)])
    v.tensor("down_blocks.0.resnets.0.conv1.bias", "f32", [4], [rng.f32_bits() for _ in range(4)])
    v.time_cache("scheduler", [999, 666.5, 333, 0], {
        "down_blocks.0.resnets.0": ("f16", [4, 3], [rng.f16_bits() for _ in range(12)]),
        "mid_block.resnets.0": ("f32", [4, 5], [rng.f32_bits() for _ in range(20)]),
        "up_blocks.1.resnets.2": ("bf16", [4, 2], [rng.f32_bits() >> 16 for _ in range(8)]),
    })
    return v


def time_grid() -> Vector:
    rng = Rng(5000)
    v = Vector("time_grid.bfq", "grid-mode time cache: timesteps 0..5 (JSON integers), a [6, 4] f16 embedding table; "
               "the time_emb_proj layer stays quantized")
    v.layer("down_blocks.0.resnets.0.time_emb_proj.weight", [8, 4], 2, "balanced", rng.codes(32, 2, "balanced"),
            "f16", [rng.f16_bits() for _ in range(8)])
    v.time_cache("grid", list(range(6)), {"time_embedding": ("f16", [6, 4], [rng.f16_bits() for _ in range(24)])})
    return v


PIXART = {"class_name": "PixArtTransformer2DModel",
          "config": {"sample_size": 8, "num_attention_heads": 1, "attention_head_dim": 2, "num_layers": 1}}


def pixart_scheduler() -> Vector:
    rng = Rng(8000)
    v = Vector("pixart_scheduler.bfq", "FORMAT.md 2.3.2: a PixArtTransformer2DModel (width D = 2, no size conditions: "
               "use_additional_conditions false) with a scheduler cache of adaln_single's outputs, "
               "adaln_single.linear [3, 12] in f16 and adaln_single.emb [3, 2] in f32, beside a layer and a tensor",
               model={**PIXART, "config": {**PIXART["config"], "use_additional_conditions": False}})
    v.layer("transformer_blocks.0.attn1.to_q.weight", [2, 2], 2, "balanced", rng.codes(4, 2, "balanced"), "f16",
            [rng.f16_bits() for _ in range(2)])
    v.tensor("scale_shift_table", "f32", [2, 2], [rng.f32_bits() for _ in range(4)])
    v.time_cache("scheduler", [999, 499.5, 0], {
        "adaln_single.linear": ("f16", [3, 12], [rng.f16_bits() for _ in range(36)]),
        "adaln_single.emb": ("f32", [3, 2], [rng.f32_bits() for _ in range(6)]),
    })
    return v


def pixart_embedding() -> Vector:
    rng = Rng(9000)
    v = Vector("pixart_embedding.bfq", "FORMAT.md 2.3.2: a PixArtTransformer2DModel with size conditions (sample_size "
               "128, use_additional_conditions absent) and a scheduler cache of the timestep MLP's output only "
               "(embedding, [2, 3] in bf16); adaln_single.linear stays quantized",
               model={"class_name": "PixArtTransformer2DModel",
                      "config": {"sample_size": 128, "num_attention_heads": 1, "attention_head_dim": 3}})
    v.layer("adaln_single.linear.weight", [18, 3], 1, "balanced", rng.codes(54, 1, "balanced"), "f16",
            [rng.f16_bits() for _ in range(18)])
    v.tensor("adaln_single.emb.resolution_embedder.linear_1.bias", "f32", [1], [rng.f32_bits()])
    v.time_cache("scheduler", [750, 250], {"time_embedding": ("bf16", [2, 3], [rng.f32_bits() >> 16 for _ in range(6)])})
    return v


def layout() -> Vector:
    rng = Rng(6000)
    v = Vector(
        "layout.bfq",
        "blocks stored in an order unrelated to the header's lists (a tensor first, codes before their "
        "scales, layers interleaved), blocks of exactly 64 and 128 bytes (no padding after them), no "
        "header padding (24 + N is a multiple of 64), top-level keys in a different order, non-ASCII "
        "metadata, a recipe and a model source; per-channel sizes 1 and 2, an 8-dimensional layer",
        model={**MODEL, "source": {"kind": "hub", "repo": "example/tiny-unet", "revision": "0123abcd"}},
        metadata={"note": "Grüße, 量子化 ✓ \"quoted\" \\ tab\t", "pad": ""},
    )
    v.layer("per_channel_1.weight", [7, 1], 2, "balanced", rng.codes(7, 2, "balanced"), "f32",
            [rng.f32_bits() for _ in range(7)])
    v.layer("per_channel_2.weight", [3, 2], 1, "balanced", rng.codes(6, 1, "balanced"), "f16",
            [rng.f16_bits() for _ in range(3)])
    v.layer("eight_dims.weight", [2, 2, 2, 2, 2, 2, 2, 2], 3, "plain", rng.codes(256, 3, "plain"), "f16",
            [rng.f16_bits() for _ in range(2)])
    v.tensor("bias64", "f32", [16], [rng.f32_bits() for _ in range(16)])  # exactly 64 bytes
    v.tensor("bias128", "f16", [8, 8], [rng.f16_bits() for _ in range(64)])  # exactly 128 bytes
    v.tensor("odd", "bf16", [3], [rng.f32_bits() >> 16 for _ in range(3)])
    v.header["recipe"] = {"avg_bits": 2.25, "n_weights_total": 269, "name": "layout-test"}
    order = [
        "tensor/bias64",
        "eight_dims.weight/codes",
        "per_channel_2.weight/scales",
        "tensor/bias128",
        "per_channel_1.weight/codes",
        "eight_dims.weight/scales",
        "tensor/odd",
        "per_channel_1.weight/scales",
        "per_channel_2.weight/codes",
    ]
    v.build_args = dict(
        order=order,
        header_keys=["layers", "model", "tensors", "recipe", "metadata", "producer"],
        pad_header_to_alignment=True,
    )
    return v


def empty() -> Vector:
    return Vector("empty.bfq", "no layers, no tensors, no time cache: no blocks, the file ends with the header padding")


def nesting32() -> Vector:
    """The header nests exactly 32 levels (the limit): top-level object, model, config, then 29 more."""
    deep: object = 1
    for i in range(29):
        deep = [deep] if i % 2 else {"n": deep}
    v = Vector("nesting32.bfq", "header JSON nested exactly 32 levels deep (the limit), inside model.config",
               model={"class_name": "UNet2DConditionModel", "config": {"deep": deep}})
    v.layer("w", [2, 2], 1, "balanced", [-1, 0, 1, 1], "f16", [0x3C00, 0xBC00])
    return v


def accepted() -> Vector:
    """What FORMAT.md v1.1 explicitly accepts, in one file: grid timesteps written as 0.0, 1.0, 2.0
    (as bfq 0.1 wrote them), NaN and infinities in a time table, whitespace between JSON tokens,
    an integer beyond 2^53 and an underflowing number in model.config, an empty producer and an
    empty metadata key and value, a file source with its optional name."""
    rng = Rng(7000)
    config = {"sample_size": 8, "big": 2**53 + 1, "tiny": "@tiny@"}
    source = {"kind": "file", "name": "unet", "sha256": hashlib.sha256(b"unet").hexdigest()}
    v = Vector("accepted.bfq", "FORMAT.md v1.1 edge cases a reader accepts: grid timesteps as JSON floats, "
               "non-finite time-table values, whitespace between tokens, big and underflowing numbers, empty strings",
               model={"class_name": "UNet2DConditionModel", "config": config, "source": source},
               metadata={"": ""}, producer="")
    v.layer("down_blocks.0.resnets.0.time_emb_proj.weight", [2, 3], 1, "balanced", rng.codes(6, 1, "balanced"), "f16",
            [rng.f16_bits() for _ in range(2)])
    table = [0x7FC00000, 0x7F800000, 0xFF800000, 0x4788B800, 0x3F800008, 0x80000000]  # NaN, inf, -inf, 70000, 1+2^-20, -0
    v.time_cache("grid", [0.0, 1.0, 2.0], {"time_embedding": ("f32", [3, 2], table)})
    v.build_args = dict(indent=1, literals=[("@tiny@", "1e-400")])
    return v


def all_vectors() -> list[Vector]:
    return [worked_example(), *(balanced(n) for n in range(1, 9)), plain(), packings(), scales(), dense(),
            time_scheduler(), time_grid(), layout(), empty(), nesting32(), accepted(), pixart_scheduler(),
            pixart_embedding()]


def pretty(obj, indent: str = "") -> str:
    """JSON with one line per object member and every list of scalars on a single line."""
    if isinstance(obj, dict) and obj:
        inner = indent + " "
        items = [f"{inner}{json.dumps(k, ensure_ascii=False)}: {pretty(v, inner)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(obj, list) and any(isinstance(x, (dict, list)) for x in obj):
        inner = indent + " "
        return "[\n" + ",\n".join(inner + pretty(x, inner) for x in obj) + "\n" + indent + "]"
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def json_depth(obj) -> int:
    if isinstance(obj, dict):
        return 1 + max((json_depth(x) for x in obj.values()), default=0)
    if isinstance(obj, list):
        return 1 + max((json_depth(x) for x in obj), default=0)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vectors")
    if argv[:1] == ["--out"] and len(argv) == 2:
        out = argv[1]
    elif argv:
        print(__doc__.split("\n\n")[2], file=sys.stderr)
        return 2
    for L, packing in DEFAULT_PACKING.items():
        assert writer_choice(L) == packing, (L, writer_choice(L), packing)
    os.makedirs(out, exist_ok=True)
    expected = {
        "about": "Decoded values of the golden files; see spec/gen_vectors.py for the conventions.",
        "files": {},
    }
    for v in all_vectors():
        data = v.build(**getattr(v, "build_args", {}))
        if v.filename == "nesting32.bfq":
            assert json_depth(v.header) == 32
        with open(os.path.join(out, v.filename), "wb") as fh:
            fh.write(data)
        entry = dict(v.expected)
        entry["size"] = len(data)
        entry["sha256"] = hashlib.sha256(data).hexdigest()
        expected["files"][v.filename] = entry
    with open(os.path.join(out, "expected.json"), "w", encoding="utf-8", newline="\n") as fh:
        fh.write(pretty(expected) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
