#!/usr/bin/env python3
"""Write the invalid `.bfq` files of spec/invalid/ and expected.json, from the golden files.

Standard library only. Each file is a golden file (spec/vectors/) with one targeted edit; the
header CRC, header length and header padding are recomputed after header edits, and block CRCs
after block edits where the case says so, so that each file breaks exactly one rule of
FORMAT.md (as far as a single rule can be broken alone: an illegal packing, for instance,
also makes the derived code length meaningless, but the reader checks the packing first).

expected.json maps each file to:

* "stage" (FORMAT.md §3.1, when a reader must find it): "open" when `open_bfq` must reject it;
  "read" when the header and layout are valid and a check a reader MUST make before using a
  block fails (CRC-32 of scales, dense and time-table blocks, non-finite scale, the end of a
  code stream): `open_bfq` succeeds, reading the block raises even with `verify=False`, and so
  does `verify_all()`; "verify" when only a check a reader MAY defer fails (CRC-32 of a code
  block, a non-canonical word): `open_bfq` succeeds and `verify_all()` raises;
* "message": a substring of the `BfqFormatError` message (the field's name, and the rule);
* "rule": what is broken.

"known_bugs" lists files that FORMAT.md makes invalid but the reference reader accepts or
rejects with the wrong exception; the tests mark them xfail(strict=True) until the reader is
fixed (then the entry moves to "files").

    python spec/gen_invalid.py [--vectors DIR] [--out DIR]
"""

from __future__ import annotations

import copy
import json
import os
import struct
import sys
import zlib

MAGIC = b"\x89BFQ\r\n\x1a\n"
ALIGN = 64
HERE = os.path.dirname(os.path.abspath(__file__))


def align(x: int) -> int:
    return -(-x // ALIGN) * ALIGN


def dump_json(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


class Golden:
    """A golden file split into its parts."""

    def __init__(self, path: str):
        with open(path, "rb") as fh:
            self.file = fh.read()
        magic, version, crc, n = struct.unpack_from("<8sIIQ", self.file)
        assert magic == MAGIC and version == 1
        self.raw = self.file[24 : 24 + n]
        assert zlib.crc32(self.raw) == crc
        self.data_start = align(24 + n)
        self.data = self.file[self.data_start :]
        self.header = json.loads(self.raw)

    def h(self) -> dict:
        return copy.deepcopy(self.header)


def assemble(raw: bytes, data: bytes, *, magic=MAGIC, version=1, crc=None, length=None) -> bytes:
    """Preamble + header + zero padding + data, with the header CRC and length unless given."""
    pre = magic + struct.pack("<IIQ", version, zlib.crc32(raw) if crc is None else crc, len(raw) if length is None else length)
    out = pre + raw
    return out + b"\0" * (align(len(out)) - len(out)) + data


def block_bytes(g: Golden, entry: dict) -> bytes:
    return g.data[entry["offset"] : entry["offset"] + entry["length"]]


def patch(buf: bytes, pos: int, new: bytes) -> bytes:
    return buf[:pos] + new + buf[pos + len(new) :]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    vectors = os.path.join(HERE, "vectors")
    out = os.path.join(HERE, "invalid")
    args = list(argv)
    while args:
        flag = args.pop(0)
        if flag == "--vectors" and args:
            vectors = args.pop(0)
        elif flag == "--out" and args:
            out = args.pop(0)
        else:
            print(__doc__.rsplit("\n\n", 1)[1], file=sys.stderr)
            return 2

    def load(name: str) -> Golden:
        return Golden(os.path.join(vectors, name))

    W = load("worked_example.bfq")  # layer "weight" [1,4]: scales at 0 (2 bytes), codes at 64 (8 bytes)
    D = load("dense.bfq")
    S = load("time_scheduler.bfq")
    G = load("time_grid.bfq")
    B2 = load("balanced_2bit.bfq")
    P = load("packings.bfq")
    N32 = load("nesting32.bfq")
    E = load("empty.bfq")
    assert W.header["layers"][0]["scales"]["offset"] == 0 and W.header["layers"][0]["codes"]["offset"] == 64
    assert 24 + len(W.raw) < W.data_start - 1, "worked_example.bfq must have header padding"

    files: dict[str, tuple[bytes, str, str, str]] = {}
    known_bugs: dict[str, tuple[bytes, str, str, str]] = {}

    def add(name, data, stage, message, rule, *, bug=False):
        table = known_bugs if bug else files
        assert name not in files and name not in known_bugs, name
        table[name] = (data, stage, message, rule)

    def header_case(name, golden, edit, message, rule, stage="open", **kw):
        h = golden.h()
        edit(h)
        raw = dump_json(h).replace(b'"@64@"', b"6.4e1")  # a number JSON would write differently
        add(name, assemble(raw, golden.data), stage, message, rule, **kw)

    def raw_case(name, golden, old, new, message, rule, count=1):
        assert golden.raw.count(old) >= 1, (name, old)
        add(name, assemble(golden.raw.replace(old, new, count), golden.data), "open", message, rule)

    # -- preamble -------------------------------------------------------------------------
    add("magic_wrong.bfq", patch(W.file, 0, b"PK\x03\x04\x14\x00\x00\x00"), "open", "magic", "magic is not \\x89BFQ\\r\\n\\x1a\\n")
    add("magic_text_mode.bfq", W.file.replace(b"\r\n", b"\n"), "open", "line endings",
        "text-mode transfer turned CR LF into LF (the whole file, as a transfer would)")
    add("magic_7bit.bfq", patch(W.file, 0, bytes([W.file[0] & 0x7F])), "open", "magic", "7-bit transfer stripped the high bit")
    add("magic_ctrl_z_truncated.bfq", W.file[: W.file.index(b"\x1a")], "open", "file", "truncated at ^Z (6 bytes)")
    add("version_0.bfq", patch(W.file, 8, struct.pack("<I", 0)), "open", "version", "version 0")
    add("version_2.bfq", patch(W.file, 8, struct.pack("<I", 2)), "open", "version", "unknown version 2")
    add("version_big_endian.bfq", patch(W.file, 8, struct.pack(">I", 1)), "open", "version", "version written big-endian")
    add("header_length_past_eof.bfq", patch(W.file, 16, struct.pack("<Q", len(W.file))), "open", "header_length",
        "header_length runs past the end of the file")
    add("header_length_over_limit.bfq", patch(W.file, 16, struct.pack("<Q", 64 * 1024 * 1024 + 1)), "open",
        "header_length", "header_length claims 64 MiB + 1")
    add("header_length_u64_max.bfq", patch(W.file, 16, struct.pack("<Q", 2**64 - 1)), "open", "header_length",
        "header_length 2^64 - 1")
    add("header_length_short_by_one.bfq", patch(W.file, 16, struct.pack("<Q", len(W.raw) - 1)), "open", "header_crc32",
        "header_length one short (the CRC covers exactly N bytes)")
    add("header_crc_mismatch.bfq", patch(W.file, 12, struct.pack("<I", zlib.crc32(W.raw) ^ 1)), "open", "header_crc32",
        "stored header CRC off by one bit")
    add("header_flipped_byte.bfq", patch(W.file, 40, bytes([W.file[40] ^ 0x20])), "open", "header_crc32",
        "one header byte changed, CRC not updated")

    # -- header syntax (CRC recomputed) ---------------------------------------------------------
    add("header_empty.bfq", assemble(b"", W.data), "open", "must start with '{'", "header_length 0")
    add("header_leading_space.bfq", assemble(b" " + W.raw, W.data), "open", "must start with '{'",
        "valid JSON that does not start with '{'")
    add("header_bom.bfq", assemble(b"\xef\xbb\xbf" + W.raw, W.data), "open", "must start with '{'", "UTF-8 byte order mark")
    add("header_array.bfq", assemble(b"[" + W.raw + b"]", W.data), "open", "must start with '{'", "top level is an array")
    raw_case("header_invalid_utf8.bfq", W, b'"spec/gen_vectors.py"', b'"spec/gen\xffvectors.py"', "UTF-8",
             "byte 0xFF inside a string")
    raw_case("header_utf8_overlong.bfq", W, b'"spec/gen_vectors.py"', b'"spec\xc0\xafgen_vectors.py"', "UTF-8",
             "overlong UTF-8 encoding of '/'")
    raw_case("header_utf8_surrogate.bfq", W, b'"spec/gen_vectors.py"', b'"spec/\xed\xa0\x80gen_vectors.py"', "UTF-8",
             "UTF-8-encoded UTF-16 surrogate")
    add("header_truncated_json.bfq", assemble(W.raw[:-1], W.data), "open", "not valid", "closing brace missing")
    add("header_trailing_garbage.bfq", assemble(W.raw + b"x", W.data), "open", "not valid", "bytes after the JSON value")
    raw_case("header_control_char.bfq", W, b'"spec/gen_vectors.py"', b'"spec/gen\x01vectors.py"', "not valid",
             "unescaped control character in a string")
    h = N32.h()
    h["model"]["config"]["deep"] = [h["model"]["config"]["deep"]]
    add("header_nesting_33.bfq", assemble(dump_json(h), N32.data), "open", "nesting", "33 levels (limit 32)")
    h = W.h()
    h["model"]["config"]["deep"] = "@"
    add("header_nesting_10000.bfq", assemble(dump_json(h).replace(b'"@"', b"[" * 10000 + b"]" * 10000), W.data),
        "open", "nesting", "10000 levels (must not exhaust the stack)")
    raw_case("header_duplicate_top_key.bfq", W, b'{"producer":', b'{"producer":"x","producer":', "duplicate key 'producer'",
             "a top-level key twice")
    raw_case("header_duplicate_layer_key.bfq", W, b'"bits":1,', b'"bits":1,"bits":1,', "duplicate key 'bits'",
             "a key twice in a layer object, with the same value")
    raw_case("header_duplicate_escaped_key.bfq", W, b'"levels":"balanced",', b'"levels":"balanced","l\\u0065vels":"balanced",',
             "duplicate key 'levels'", "the same key once escaped")
    for label, literal, msg in [
        ("nan", b"NaN", "NaN"), ("infinity", b"Infinity", "Infinity"), ("neg_infinity", b"-Infinity", "-Infinity"),
        ("1e999", b"1e999", "non-finite"), ("neg_1e999", b"-1e999", "non-finite"),
    ]:
        raw_case(f"header_number_{label}.bfq", W, b'"config":{', b'"config":{"x":' + literal + b",", msg,
                 f"{literal.decode()} in model.config")

    # -- header fields --------------------------------------------------------------------
    def L0(h):
        return h["layers"][0]

    header_case("unknown_top_level_key.bfq", W, lambda h: h.update(extras={}), "unknown field", "top-level key 'extras'")
    header_case("missing_producer.bfq", W, lambda h: h.pop("producer"), "header.producer: missing", "producer absent")
    header_case("missing_tensors.bfq", W, lambda h: h.pop("tensors"), "header.tensors: missing", "tensors absent")
    header_case("missing_model_class_name.bfq", W, lambda h: h["model"].pop("class_name"), "class_name", "model.class_name absent")
    header_case("missing_codes_crc32.bfq", W, lambda h: L0(h)["codes"].pop("crc32"), "layers[0].codes.crc32: missing",
                "codes.crc32 absent")
    header_case("model_not_object.bfq", W, lambda h: h.update(model="UNet2DConditionModel"), "header.model", "model is a string")
    header_case("model_source_not_object.bfq", W, lambda h: h["model"].update(source="hub"), "source", "model.source is a string")
    header_case("metadata_not_strings.bfq", W, lambda h: h.update(metadata={"steps": 50}), "metadata",
                "a metadata value is a number")
    header_case("layers_not_array.bfq", W, lambda h: h.update(layers={}), "header.layers", "layers is an object")
    header_case("layer_not_object.bfq", W, lambda h: h["layers"].append("weight"), "layers[1]", "a layer entry is a string")
    header_case("layer_name_not_string.bfq", W, lambda h: L0(h).update(name=7), "layers[0].name", "name is a number")
    header_case("layer_unknown_field.bfq", W, lambda h: L0(h).update(zero_point=0), "unknown field", "extra layer key")
    header_case("packing_unknown_field.bfq", W, lambda h: L0(h)["packing"].update(order="lsb"), "unknown field",
                "extra packing key")
    header_case("bits_bool.bfq", W, lambda h: L0(h).update(bits=True), "layers[0].bits", "bits is true (a bool, not an int)")
    header_case("bits_float.bfq", W, lambda h: L0(h).update(bits=1.0), "layers[0].bits", "bits is 1.0")
    header_case("offset_string.bfq", W, lambda h: L0(h)["codes"].update(offset="64"), "layers[0].codes.offset",
                "offset is a string")
    header_case("bits_0.bfq", W, lambda h: L0(h).update(bits=0), "layers[0].bits", "bits 0")
    header_case("bits_9.bfq", W, lambda h: L0(h).update(bits=9), "layers[0].bits", "bits 9")
    header_case("levels_unknown.bfq", W, lambda h: L0(h).update(levels="symmetric"), "layers[0].levels", "unknown level set")
    header_case("packing_scheme_unknown.bfq", W, lambda h: L0(h)["packing"].update(scheme="radix-fraction-v2"),
                "layers[0].packing.scheme", "unknown packing scheme")
    header_case("packing_illegal_L_pow_g.bfq", W, lambda h: L0(h)["packing"].update(word_bits=4), "layers[0].packing",
                "g=3, k=4: 3^3 = 27 > 2^4")
    header_case("packing_k65.bfq", W, lambda h: L0(h)["packing"].update(word_bits=65), "layers[0].packing", "word_bits 65")
    header_case("packing_k0.bfq", W, lambda h: L0(h)["packing"].update(word_bits=0), "layers[0].packing", "word_bits 0")
    header_case("packing_g0.bfq", W, lambda h: L0(h)["packing"].update(digits_per_word=0), "layers[0].packing",
                "digits_per_word 0")
    header_case("packing_g65.bfq", W, lambda h: L0(h)["packing"].update(digits_per_word=65, word_bits=64),
                "layers[0].packing", "digits_per_word 65")
    header_case("shape_zero_dim.bfq", W, lambda h: L0(h).update(shape=[1, 0]), "layers[0].shape", "a dimension is 0")
    header_case("shape_negative_dim.bfq", W, lambda h: L0(h).update(shape=[1, -4]), "layers[0].shape", "a dimension is -4")
    header_case("shape_dim_over_2_40.bfq", W, lambda h: L0(h).update(shape=[1, 2**40 + 1]), "layers[0].shape",
                "a dimension of 2^40 + 1")
    header_case("shape_product_over_2_48.bfq", W, lambda h: L0(h).update(shape=[1, 2**24, 2**24 + 1]), "exceeds 2^48",
                "product 2^48 + 2^24")
    # 4 * 5 * 5581 * 8681 * 49477 * 384773 = 2^64 + 4: a reader multiplying in wrapping 64-bit
    # arithmetic would see 4 elements and accept the stored lengths
    header_case("shape_product_wraps_to_4.bfq", W, lambda h: L0(h).update(shape=[1, 4 * 5 * 5581, 8681 * 49477, 384773]),
                "exceeds 2^48", "product 2^64 + 4, which wraps to the real size 4 in 64 bits")
    header_case("shape_product_2_64.bfq", W, lambda h: L0(h).update(shape=[1, 2**32, 2**32]), "exceeds 2^48",
                "product 2^64, which wraps to 0 in 64 bits")
    header_case("shape_9_dims.bfq", W, lambda h: L0(h).update(shape=[1, 1, 1, 1, 1, 1, 1, 1, 4]), "9 dimensions",
                "9 dimensions (limit 8)")
    header_case("shape_layer_1_dim.bfq", W, lambda h: L0(h).update(shape=[4]), "1 dimensions", "a quantized layer needs 2")
    header_case("shape_not_list.bfq", W, lambda h: L0(h).update(shape="1x4"), "layers[0].shape", "shape is a string")
    header_case("shape_dim_float.bfq", W, lambda h: L0(h).update(shape=[1, 4.0]), "layers[0].shape", "dimension 4.0")
    header_case("dense_shape_0_dims.bfq", D, lambda h: h["tensors"][2].update(shape=[]), "tensors[2].shape",
                "a dense tensor with shape [] (a scalar is [1])")
    header_case("scales_length_wrong.bfq", W, lambda h: L0(h)["scales"].update(length=4), "layers[0].scales.length",
                "scales length 4 for one f16 scale")
    header_case("codes_length_wrong.bfq", W, lambda h: L0(h)["codes"].update(length=16), "layers[0].codes.length",
                "codes length 16 for 4 digits, g=3, k=5 (1 cell)")
    header_case("dense_length_wrong.bfq", D, lambda h: h["tensors"][0].update(length=23), "tensors[0].length",
                "f32 [6] stored in 23 bytes")
    header_case("scales_dtype_bf16.bfq", W, lambda h: L0(h)["scales"].update(dtype="bf16"), "layers[0].scales.dtype",
                "bf16 is not a scale dtype")
    header_case("dense_dtype_unknown.bfq", D, lambda h: h["tensors"][0].update(dtype="f64"), "tensors[0].dtype",
                "dtype f64")
    header_case("time_table_dtype_unknown.bfq", G, lambda h: h["time_cache"]["embedding"].update(dtype="fp16"), "dtype",
                "time-cache table dtype fp16")
    header_case("crc32_over_32_bits.bfq", W, lambda h: L0(h)["codes"].update(crc32=L0(W.header)["codes"]["crc32"] + 2**32),
                "layers[0].codes.crc32", "crc32 + 2^32")
    header_case("crc32_negative.bfq", W, lambda h: L0(h)["codes"].update(crc32=-1), "layers[0].codes.crc32", "crc32 -1")
    header_case("duplicate_layer_names.bfq", B2, lambda h: h["layers"][1].update(name=h["layers"][0]["name"]),
                "layers[1].name", "two layers with the same name")
    header_case("tensor_named_like_layer.bfq", S, lambda h: h["tensors"][0].update(name=h["layers"][0]["name"]),
                "tensors[0].name", "a tensor with a layer's name")
    header_case("duplicate_tensor_names.bfq", D, lambda h: h["tensors"][1].update(name=h["tensors"][0]["name"]),
                "tensors[1].name", "two tensors with the same name")
    header_case("recipe_not_object.bfq", W, lambda h: h.update(recipe=[2.0]), "header.recipe", "recipe is an array")
    header_case("recipe_avg_bits_string.bfq", W, lambda h: h.update(recipe={"avg_bits": "2"}), "recipe.avg_bits",
                "avg_bits is a string")

    # -- time cache -----------------------------------------------------------------------
    TC = "time_cache"
    header_case("time_mode_unknown.bfq", G, lambda h: h[TC].update(mode="linear"), "time_cache.mode", "mode 'linear'")
    header_case("time_grid_table_transposed.bfq", G, lambda h: h[TC]["embedding"].update(shape=[4, 6]), "must be [6, D]",
                "grid table [4, 6] for 6 timesteps (same length as [6, 4])")
    header_case("time_scheduler_table_1d.bfq", S, lambda h: h[TC]["features"]["down_blocks.0.resnets.0"].update(shape=[12]),
                "must be [4, D]", "scheduler table [12] instead of [4, 3]")
    header_case("time_scheduler_table_rows.bfq", S, lambda h: h[TC]["features"]["mid_block.resnets.0"].update(shape=[2, 10]),
                "must be [4, D]", "scheduler table [2, 10] for 4 timesteps")
    header_case("time_grid_from_1.bfq", G, lambda h: h[TC].update(timesteps=[1, 2, 3, 4, 5, 6]), "grid mode must cover",
                "grid timesteps 1..6")
    header_case("time_grid_unordered.bfq", G, lambda h: h[TC].update(timesteps=[0, 1, 2, 3, 5, 4]), "grid mode must cover",
                "grid timesteps out of order")
    header_case("time_grid_fraction.bfq", G, lambda h: h[TC].update(timesteps=[0, 1, 2, 3, 4, 4.5]), "grid mode must cover",
                "a fractional grid timestep")
    header_case("time_duplicate_timesteps.bfq", S, lambda h: h[TC].update(timesteps=[999, 666.5, 333, 333.0]),
                "duplicates", "333 twice")
    header_case("time_empty_timesteps.bfq", S, lambda h: h[TC].update(timesteps=[]), "time_cache.timesteps", "no timesteps")
    header_case("time_timestep_bool.bfq", S, lambda h: h[TC].update(timesteps=[999, 666.5, 333, False]),
                "time_cache.timesteps[3]", "a timestep is false")
    header_case("time_timestep_string.bfq", S, lambda h: h[TC].update(timesteps=["999", 666.5, 333, 0]),
                "time_cache.timesteps[0]", "a timestep is a string")
    header_case("time_grid_features_key.bfq", G, lambda h: h[TC].update(features=h[TC].pop("embedding")), "unknown field",
                "grid mode with the scheduler's 'features' key")
    header_case("time_table_with_name.bfq", G, lambda h: h[TC]["embedding"].update(name="time_embedding"), "unknown field",
                "a time-cache table with a name key")
    header_case("time_cache_not_object.bfq", G, lambda h: h.update(time_cache=[]), "time_cache", "time_cache is an array")

    # -- layout -----------------------------------------------------------------------------
    def layout_case(name, golden, edit, data, message, rule):
        h = golden.h()
        edit(h)
        add(name, assemble(dump_json(h), data), "open", message, rule)

    scales_w, codes_w = block_bytes(W, L0(W.header)["scales"]), block_bytes(W, L0(W.header)["codes"])
    layout_case("offset_unaligned.bfq", W, lambda h: L0(h)["codes"].update(offset=8),
                scales_w + b"\0" * 6 + codes_w, "layers[0].codes.offset", "codes block at offset 8 (bytes moved there)")
    layout_case("offset_negative.bfq", W, lambda h: L0(h)["codes"].update(offset=-64), W.data, "layers[0].codes.offset",
                "offset -64")
    t0 = D.header["tensors"][0]
    layout_case("blocks_overlap_aliased.bfq", D, lambda h: h["tensors"].append({**t0, "name": "alias"}), D.data,
                "overlaps", "a second tensor sharing the first one's bytes (valid CRC, valid length)")
    layout_case("blocks_overlap_partial.bfq", W, lambda h: L0(h)["codes"].update(offset=0),
                W.data[:64], "overlaps", "codes block placed over the scales block")
    layout_case("blocks_hole.bfq", W, lambda h: L0(h)["codes"].update(offset=128),
                W.data[:64] + b"\0" * 64 + W.data[64:], "leaves a hole", "64 zero bytes between two blocks")
    layout_case("blocks_first_not_at_0.bfq", W,
                lambda h: (L0(h)["scales"].update(offset=64), L0(h)["codes"].update(offset=128)),
                b"\0" * 64 + W.data, "leaves a hole", "the data section starts with 64 zero bytes")
    add("header_padding_nonzero_first.bfq", patch(W.file, 24 + len(W.raw), b"\x01"), "open", "header padding",
        "first header padding byte is 1")
    add("header_padding_nonzero_last.bfq", patch(W.file, W.data_start - 1, b"\x80"), "open", "header padding",
        "last header padding byte is 0x80")
    add("block_padding_nonzero_first.bfq", patch(W.file, W.data_start + 2, b"\x01"), "open", "padding before layers[0].codes",
        "first padding byte after the scales block is 1")
    add("block_padding_nonzero_last.bfq", patch(W.file, W.data_start + 63, b"\xff"), "open",
        "padding before layers[0].codes", "last padding byte before the codes block is 0xFF")
    add("trailing_zero_byte.bfq", W.file + b"\0", "open", "trailing bytes", "one zero byte after the last block")
    add("trailing_120_bytes.bfq", W.file + b"\0" * 56 + b"\0" * 64, "open", "trailing bytes", "120 zero bytes appended")
    add("trailing_block.bfq", W.file + b"\0" * 56 + codes_w, "open", "trailing bytes",
        "an unreferenced copy of the codes block appended at the next aligned offset")
    add("trailing_on_empty.bfq", E.file + b"\0" * 64, "open", "trailing bytes", "a file with no blocks, plus 64 bytes")
    for cut in (0, 8, 23):
        add(f"truncated_at_{cut}.bfq", W.file[:cut], "open", "file", f"file cut to {cut} bytes (inside the preamble)")
    for cut in (24, 100, 24 + len(W.raw) - 1):
        add(f"truncated_at_{cut}.bfq", W.file[:cut], "open", "header_length", f"file cut to {cut} bytes (inside the header)")
    for cut, where in [(24 + len(W.raw), "end of the header"), (W.data_start, "start of the data"),
                       (W.data_start + 1, "inside the scales block"), (W.data_start + 64, "start of the codes block"),
                       (len(W.file) - 1, "one byte short")]:
        add(f"truncated_at_{cut}.bfq", W.file[:cut], "open", "truncated", f"file cut to {cut} bytes ({where})")

    # -- data level: valid header and layout, checked on decode / verify_all -----------------
    def data_case(name, golden, entry, new_block, message, rule, fix_crc=True, stage="read"):
        """Replace a block's bytes; recompute its CRC in the header unless fix_crc is False."""
        h = golden.h()
        target = entry(h)
        assert len(new_block) == target["length"]
        if fix_crc:
            target["crc32"] = zlib.crc32(new_block)
        data = patch(golden.data, target["offset"], new_block)
        add(name, assemble(dump_json(h), data), stage, message, rule)

    def flip(b: bytes, i: int = 0, mask: int = 1) -> bytes:
        return patch(b, i, bytes([b[i] ^ mask]))

    data_case("crc_mismatch_codes.bfq", W, lambda h: L0(h)["codes"], flip(codes_w), "layers[0].codes.crc32",
              "one codes bit flipped, CRC not updated (a code block's CRC may be deferred to verify)", fix_crc=False,
              stage="verify")
    data_case("crc_mismatch_scales.bfq", W, lambda h: L0(h)["scales"], flip(scales_w, 1, 0x80), "layers[0].scales.crc32",
              "scale sign flipped, CRC not updated", fix_crc=False)
    data_case("crc_mismatch_tensor.bfq", D, lambda h: h["tensors"][0], flip(block_bytes(D, t0), 5), "tensors[0].crc32",
              "a tensor byte changed, CRC not updated", fix_crc=False)
    data_case("crc_mismatch_time_table.bfq", G, lambda h: h[TC]["embedding"],
              flip(block_bytes(G, G.header[TC]["embedding"]), 3), "time_cache.embedding.crc32",
              "a time-table byte changed, CRC not updated", fix_crc=False)
    feat = S.header[TC]["features"]["mid_block.resnets.0"]
    data_case("crc_mismatch_scheduler_table.bfq", S, lambda h: h[TC]["features"]["mid_block.resnets.0"],
              flip(block_bytes(S, feat), feat["length"] - 1), "time_cache.features.mid_block.resnets.0.crc32",
              "a scheduler table byte changed, CRC not updated", fix_crc=False)
    for label, bits in [("inf", 0x7C00), ("neg_inf", 0xFC00), ("nan", 0x7E00)]:
        data_case(f"scale_f16_{label}.bfq", W, lambda h: L0(h)["scales"], struct.pack("<H", bits), "scale of channel 0",
                  f"f16 scale {label} (CRC valid)")
    f32_layer = B2.header["layers"][1]
    assert f32_layer["scales"]["dtype"] == "f32"
    for label, bits in [("inf", 0x7F800000), ("nan", 0x7FC00001)]:
        new = patch(block_bytes(B2, f32_layer["scales"]), 8, struct.pack("<I", bits))
        data_case(f"scale_f32_{label}.bfq", B2, lambda h: h["layers"][1]["scales"], new, "scale of channel 2",
                  f"f32 scale of the last channel {label} (CRC valid)")
    # worked example: one cell 0x2D7, words in bits 0..9; bits 10..63 must be zero
    data_case("stream_padding_bit_10.bfq", W, lambda h: L0(h)["codes"], struct.pack("<Q", 0x2D7 | 1 << 10),
              "bits after the last word", "bit 10, the first after the last word, set (CRC valid)")
    data_case("stream_padding_bit_63.bfq", W, lambda h: L0(h)["codes"], struct.pack("<Q", 0x2D7 | 1 << 63),
              "bits after the last word", "bit 63 set (CRC valid)")
    wide = next(layer for layer in P.header["layers"] if layer["name"] == "g7_k57_L257_wide.weight")
    wide_i = P.header["layers"].index(wide)
    stream = block_bytes(P, wide["codes"])
    assert (len(stream) * 8) - (-(-30 // 7) * 57) > 0
    data_case("stream_padding_wide.bfq", P, lambda h: h["layers"][wide_i]["codes"], patch(stream, len(stream) - 1, b"\x80"),
              "bits after the last word", "last stream bit set in a wide (g=7, k=57) layer (CRC valid)")

    # -- code streams: canonical encoding (§4) ---------------------------------------------
    cell = 23 + (23 << 5)  # word 1 = digits [2, 0, 1] instead of the zero-completed [2, 0, 0]
    h = W.h()
    L0(h)["codes"]["crc32"] = zlib.crc32(struct.pack("<Q", cell))
    add("last_word_not_zero_completed.bfq", assemble(dump_json(h), patch(W.data, 64, struct.pack("<Q", cell))), "read",
        "completed with zero digits", "FORMAT.md 4: the last word is completed with zero digits; here its unused digits are [0, 1]")
    loose = next(layer for layer in P.header["layers"] if layer["name"] == "loose_k10_g3.weight")
    loose_i = P.header["layers"].index(loose)
    stream = bytearray(block_bytes(P, loose["codes"]))
    # L=5, g=3, k=10: 1024/125 > 8 values of v decode to each digit triple; v + 1 is not ceil(...)
    word0 = int.from_bytes(stream[:8], "little") & 0x3FF
    digits = [(word0 * 5 ** (i + 1) >> 10) % 5 for i in range(3)]
    assert word0 + 1 < 1024 and digits == [((word0 + 1) * 5 ** (i + 1) >> 10) % 5 for i in range(3)]
    stream[:8] = (int.from_bytes(stream[:8], "little") + 1).to_bytes(8, "little")
    h = P.h()
    h["layers"][loose_i]["codes"]["crc32"] = zlib.crc32(bytes(stream))
    add("word_not_rounded_up.bfq", assemble(dump_json(h), patch(P.data, loose["codes"]["offset"], bytes(stream))), "verify",
        "codes", "FORMAT.md 4: v = ceil(W 2^k / L^g); here word 0 holds v + 1, which decodes to the same digits")
    header_case("time_cache_null.bfq", W, lambda h: h.update(time_cache=None), "time_cache",
                "FORMAT.md 2: time_cache is an object or absent; null is neither")
    header_case("recipe_null.bfq", W, lambda h: h.update(recipe=None), "recipe",
                "FORMAT.md 2: recipe is an optional object; null is not an object")

    # -- FORMAT.md v1.1: rules made explicit ------------------------------------------------
    huge = b"1" + b"0" * 400  # a JSON integer literal beyond binary64's range
    raw_case("time_timestep_huge_int.bfq", S, b'"timesteps":[999,', b'"timesteps":[' + huge + b",", "non-finite",
             "FORMAT.md 2 (numbers): timestep 10^400, an integer literal that overflows binary64")
    add("recipe_avg_bits_huge_int.bfq", assemble(W.raw.replace(b'"tensors":[]', b'"tensors":[],"recipe":{"avg_bits":' + huge + b"}"),
        W.data), "open", "non-finite", "FORMAT.md 2 (numbers): avg_bits 10^400")
    raw_case("header_number_huge_int.bfq", W, b'"config":{', b'"config":{"x":' + huge + b",", "non-finite",
             "FORMAT.md 2 (numbers): a 401-digit integer inside model.config (the overflow rule covers integer literals everywhere)")
    add("header_trailing_whitespace.bfq", assemble(W.raw + b"\n", W.data), "open", "must end with '}'",
        "FORMAT.md 2 (JSON): a newline after the closing brace, inside N")
    raw_case("header_lone_surrogate.bfq", W, b'"spec/gen_vectors.py"', b'"spec/gen\\ud800vectors.py"', "unpaired surrogate",
             "FORMAT.md 2 (JSON): an escaped high surrogate with no low surrogate after it")
    raw_case("header_lone_low_surrogate_key.bfq", W, b'"config":{', b'"config":{"\\udc00":1,', "unpaired surrogate",
             "FORMAT.md 2 (JSON): an escaped low surrogate alone, in a key")
    header_case("offset_exponent.bfq", W, lambda h: L0(h)["codes"].update(offset="@64@"), "layers[0].codes.offset",
                "FORMAT.md 2 (integers): offset written 6.4e1 (integers are JSON integer literals)")
    header_case("model_unknown_field.bfq", W, lambda h: h["model"].update(dtype="fp16"), "unknown field",
                "FORMAT.md 2 (model): model is closed")
    header_case("model_class_name_empty.bfq", W, lambda h: h["model"].update(class_name=""), "header.model.class_name",
                "FORMAT.md 2 (model): class_name is empty")
    header_case("model_source_kind_unknown.bfq", W, lambda h: h["model"].update(source={"kind": "ftp", "url": "ftp://x"}),
                "header.model.source.kind", "FORMAT.md 2 (model): source kind 'ftp'")
    header_case("model_source_unknown_field.bfq", W,
                lambda h: h["model"].update(source={"kind": "hub", "repo": "a/b", "token": "hf_x"}), "unknown field",
                "FORMAT.md 2 (model): a hub source with a key it does not define")
    header_case("model_source_revision_null.bfq", W,
                lambda h: h["model"].update(source={"kind": "hub", "repo": "a/b", "revision": None}),
                "header.model.source.revision", "FORMAT.md 2 (model): revision null (optional keys are absent, never null)")
    header_case("model_source_hub_without_repo.bfq", W, lambda h: h["model"].update(source={"kind": "hub"}),
                "header.model.source.repo", "FORMAT.md 2 (model): a hub source without repo")
    header_case("model_source_sha256_uppercase.bfq", W,
                lambda h: h["model"].update(source={"kind": "file", "sha256": "AB" * 32}), "header.model.source.sha256",
                "FORMAT.md 2 (model): sha256 in upper case")
    header_case("model_source_seed_float.bfq", W,
                lambda h: h["model"].update(source={"kind": "builtin", "name": "sd15-random", "seed": 0.5}),
                "header.model.source.seed", "FORMAT.md 2 (model): builtin seed 0.5")
    header_case("recipe_avg_bits_bool.bfq", W, lambda h: h.update(recipe={"avg_bits": True}), "recipe.avg_bits",
                "FORMAT.md 2.4: avg_bits true (a boolean is not a number)")
    header_case("recipe_n_weights_total_float.bfq", W, lambda h: h.update(recipe={"n_weights_total": 100.5}),
                "recipe.n_weights_total", "FORMAT.md 2.4: n_weights_total 100.5")
    header_case("recipe_n_weights_total_zero.bfq", W, lambda h: h.update(recipe={"n_weights_total": 0}),
                "recipe.n_weights_total", "FORMAT.md 2.4: n_weights_total 0")
    header_case("recipe_n_params_total_string.bfq", W, lambda h: h.update(recipe={"n_params_total": "859M"}),
                "recipe.n_params_total", "FORMAT.md 2.4: n_params_total a string")
    header_case("time_scheduler_features_empty.bfq", S, lambda h: h[TC].update(features={}), "time_cache.features",
                "FORMAT.md 2.3: a scheduler cache with no table")
    header_case("time_scheduler_feature_key_empty.bfq", S,
                lambda h: h[TC]["features"].update({"": h[TC]["features"].pop("mid_block.resnets.0")}),
                "time_cache.features", "FORMAT.md 2.3: an empty feature key")
    raw_case("time_duplicate_after_rounding.bfq", S, b'"timesteps":[999,666.5,333,0]',
             b'"timesteps":[100000000000000000000,100000000000000000001,333,0]', "duplicates",
             "FORMAT.md 2.3: 10^20 and 10^20 + 1 are one binary64 value")
    header_case("time_scheduler_keeps_time_emb_proj.bfq", S,
                lambda h: h["tensors"][0].update(name="down_blocks.0.resnets.0.time_emb_proj.bias"), "tensors[0].name",
                "FORMAT.md 2.3: a scheduler-mode file holding a time_emb_proj tensor")
    header_case("time_grid_keeps_time_embedding.bfq", G, lambda h: h["layers"][0].update(name="time_embedding.linear_1.weight"),
                "layers[0].name", "FORMAT.md 2.3: a grid-mode file holding a time_embedding layer")
    # 499,999 layers and 2 tensors are 1,000,000 blocks; the time table is one more (§5 counts it)
    h = G.h()
    h["layers"], h["tensors"] = ["@L@"], ["@T@"]
    raw = dump_json(h).replace(b'"@L@"', b",".join([b"0"] * 499_999)).replace(b'"@T@"', b"0,0")
    add("blocks_over_limit_with_time_table.bfq", assemble(raw, G.data), "open", "more than 1000000",
        "FORMAT.md 5: 2 x 499,999 layers + 2 tensors + 1 time table = 1,000,001 blocks")

    # -- FORMAT.md v1.2: the last two-reading places settled ------------------------------------
    # §3.1/§4: the canonical form of every word, the last one included, is check 4 (deferrable)
    stream = bytearray(block_bytes(P, loose["codes"]))
    shift = (-(-14 // 3) - 1) * 10  # loose_k10_g3: [2, 7], g=3, k=10: 5 words in one cell, the last at bit 40
    assert loose["shape"] == [2, 7] and loose["packing"]["word_bits"] == 10
    cell = int.from_bytes(stream[:8], "little")
    last = (cell >> shift) & 0x3FF

    def radix5(v):
        out = []
        for _ in range(3):
            v *= 5
            out.append(v >> 10)
            v &= 0x3FF
        return out

    assert last + 1 < 1024 and radix5(last + 1) == radix5(last) and radix5(last)[2] == 0
    stream[:8] = (cell + (1 << shift)).to_bytes(8, "little")
    h = P.h()
    h["layers"][loose_i]["codes"]["crc32"] = zlib.crc32(bytes(stream))
    add("last_word_not_rounded_up.bfq", assemble(dump_json(h), patch(P.data, loose["codes"]["offset"], bytes(stream))),
        "verify", "not canonically encoded",
        "FORMAT.md 3.1/4 (v1.2): the last word holds v + 1, same digits, zero-completed; canonical form is check 4 for "
        "every word, the last one included, so only verification rejects it")
    # §2 types: numbers compare as binary64 under IEEE equality, -0.0 == 0
    raw_case("time_duplicate_negative_zero.bfq", S, b'"timesteps":[999,666.5,333,0]', b'"timesteps":[999,666.5,-0.0,0]',
             "duplicates", "FORMAT.md 2 (v1.2): -0.0 and 0 are one binary64 value under IEEE equality")
    # §2.3: a time cache holds features of the timestep alone
    for key, value in [("addition_embed_type", "text_time"), ("class_embed_type", "timestep"), ("num_class_embeds", 10)]:
        header_case(f"time_scheduler_with_{key}.bfq", S, lambda h, k=key, v=value: h["model"]["config"].update({k: v}),
                    "depends on conditioning",
                    f"FORMAT.md 2.3 (v1.2): a scheduler-mode cache on a model whose config has {key} = {value!r} "
                    "(the per-ResNet features would depend on conditioning)")
    header_case("time_grid_with_time_cond_proj_dim.bfq", G, lambda h: h["model"]["config"].update(time_cond_proj_dim=256),
                "depends on conditioning", "FORMAT.md 2.3 (v1.2): a grid table on a model whose time MLP takes a "
                "condition (time_cond_proj_dim)")
    # §2 model.source: required strings are non-empty
    header_case("model_source_hub_repo_empty.bfq", W, lambda h: h["model"].update(source={"kind": "hub", "repo": ""}),
                "header.model.source.repo", "FORMAT.md 2 (v1.2): a hub source with an empty repo")
    header_case("model_source_builtin_name_empty.bfq", W,
                lambda h: h["model"].update(source={"kind": "builtin", "name": ""}), "header.model.source.name",
                "FORMAT.md 2 (v1.2): a builtin source with an empty name")
    # §2.3.2: the DiT kind (PixArtTransformer2DModel) and its adaLN-single cache
    PX, PE = load("pixart_scheduler.bfq"), load("pixart_embedding.bfq")
    feats = lambda h: h[TC]["features"]  # noqa: E731
    header_case("pixart_scheduler_keeps_adaln_linear.bfq", PX,
                lambda h: h["layers"][0].update(name="adaln_single.linear.weight"), "layers[0].name",
                "FORMAT.md 2.3.2: a PixArt file holding adaln_single.linear.weight beside the features cache that replaces it")
    header_case("pixart_scheduler_keeps_timestep_embedder.bfq", PX,
                lambda h: h["tensors"][0].update(name="adaln_single.emb.timestep_embedder.linear_1.bias"), "tensors[0].name",
                "FORMAT.md 2.3.2: a PixArt features cache replaces all of adaln_single, its timestep MLP included")
    header_case("pixart_embedding_keeps_timestep_embedder.bfq", PE,
                lambda h: h["layers"][0].update(name="adaln_single.emb.timestep_embedder.linear_2.weight"),
                "layers[0].name", "FORMAT.md 2.3.2: a PixArt embedding cache beside the timestep MLP it replaces")
    header_case("pixart_features_with_size_conditions.bfq", PX,
                lambda h: h["model"]["config"].update(use_additional_conditions=True), "embeds the image size",
                "FORMAT.md 2.3.2: adaln_single features on a model with size conditions (use_additional_conditions true)")
    header_case("pixart_features_with_default_size_conditions.bfq", PX,
                lambda h: (h["model"]["config"].pop("use_additional_conditions"), h["model"]["config"].update(sample_size=128)),
                "embeds the image size", "FORMAT.md 2.3.2: adaln_single features on a model with size conditions "
                "(use_additional_conditions absent and sample_size 128)")
    header_case("pixart_use_additional_conditions_string.bfq", PX,
                lambda h: h["model"]["config"].update(use_additional_conditions="false"),
                "model.config.use_additional_conditions", "FORMAT.md 2.3.2: use_additional_conditions neither true, "
                "false nor null beside a time cache")
    header_case("pixart_features_key_unknown.bfq", PX,
                lambda h: feats(h).update({"adaln_single.norm": feats(h).pop("adaln_single.emb")}), "time_cache.features",
                "FORMAT.md 2.3.2: features keys other than exactly adaln_single.linear and adaln_single.emb "
                "(adaln_single.emb missing, an unknown key)")
    header_case("pixart_features_width_wrong.bfq", PX,  # the same 24 bytes: f32 [3, 2] read as f16 [3, 4]
                lambda h: feats(h)["adaln_single.emb"].update(dtype="f16", shape=[3, 4]),
                "time_cache.features.adaln_single.linear.shape",
                "FORMAT.md 2.3.2: adaln_single.linear is 12 wide, not 6 x 4 (the width of adaln_single.emb)")
    header_case("pixart_grid_cache.bfq", G, lambda h: h["model"].update(class_name="PixArtTransformer2DModel"),
                "time_cache.mode", "FORMAT.md 2.3.2: a grid-mode time cache in a PixArtTransformer2DModel file")
    # §5: at most 2^19 JSON values; W's header plus model.config.x = [0, 0, ...] makes one more
    def values(v):
        if isinstance(v, dict):
            return 1 + sum(values(x) for x in v.values())
        if isinstance(v, list):
            return 1 + sum(values(x) for x in v)
        return 1

    h = W.h()
    h["model"]["config"]["x"] = "@X@"
    zeros = (1 << 19) + 1 - values(h)  # the string "@X@" stands for the array itself
    raw = dump_json(h).replace(b'"@X@"', b"[" + b",".join([b"0"] * zeros) + b"]")
    add("header_values_over_limit.bfq", assemble(raw, W.data), "open", "more than 524288 JSON values",
        "FORMAT.md 5 (v1.2): 2^19 + 1 JSON values (a list of zeros in model.config)")

    # -- write -------------------------------------------------------------------------------
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):
        if name.endswith(".bfq"):
            os.remove(os.path.join(out, name))
    about = " ".join(" ".join(__doc__.split("\n\n")[2:5]).split())
    expected = {"about": about, "files": {}, "known_bugs": {}}
    for table, key in ((files, "files"), (known_bugs, "known_bugs")):
        for name, (data, stage, message, rule) in table.items():
            with open(os.path.join(out, name), "wb") as fh:
                fh.write(data)
            expected[key][name] = {"stage": stage, "message": message, "rule": rule}
    with open(os.path.join(out, "expected.json"), "w", encoding="utf-8", newline="\n") as fh:
        json.dump(expected, fh, indent=1, ensure_ascii=False)
        fh.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
