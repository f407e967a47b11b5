"""spec/: golden files (decoded exactly), the header's JSON Schema, and invalid files (each rejected
with BfqFormatError, naming the field, in bounded time). FORMAT.md is normative."""

from __future__ import annotations

import importlib.util
import json
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from bfq import BfqFormatError
from bfq.format import BfqWriter, open_bfq
from bfq.format.constants import (
    LEVEL_SETS,
    choose_packing,
    is_legal_packing,
    num_levels,
)

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "spec"
VECTORS = SPEC / "vectors"
INVALID = SPEC / "invalid"
GOLDEN = json.loads((VECTORS / "expected.json").read_text("utf-8"))["files"]
INVALID_EXPECTED = json.loads((INVALID / "expected.json").read_text("utf-8"))
SCHEMA = json.loads((SPEC / "header.schema.json").read_text("utf-8"))
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
MODEL = {"class_name": "UNet2DConditionModel", "config": {"sample_size": 8}}


def _load_module(name: str):
    spec = importlib.util.spec_from_file_location(name, SPEC / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def header_of(path: Path) -> dict:
    data = path.read_bytes()
    (n,) = struct.unpack_from("<Q", data, 16)
    return json.loads(data[24 : 24 + n])


# ----------------------------------------------------------------------------------------------
# Generators: stdlib only, reproducible byte for byte


def _run_generator(script: str, *args: str) -> None:
    # -I -S: isolated, no site-packages at all, so the generator cannot import numpy or bfq
    subprocess.run([sys.executable, "-I", "-S", str(SPEC / script), *args], check=True, timeout=60)


def _same_tree(generated: Path, committed: Path) -> None:
    names = sorted(p.name for p in generated.iterdir())
    assert names == sorted(p.name for p in committed.iterdir() if p.is_file())
    for name in names:
        assert (generated / name).read_bytes() == (committed / name).read_bytes(), name


def test_gen_vectors_reproduces_committed_files(tmp_path):
    _run_generator("gen_vectors.py", "--out", str(tmp_path))
    _same_tree(tmp_path, VECTORS)


def test_gen_invalid_reproduces_committed_files(tmp_path):
    _run_generator("gen_invalid.py", "--vectors", str(VECTORS), "--out", str(tmp_path))
    _same_tree(tmp_path, INVALID)


def test_generator_packing_table_matches_format_and_writer():
    gen = _load_module("gen_vectors")
    for levels in LEVEL_SETS:
        for bits in range(1, 9):
            L = num_levels(bits, levels)
            assert gen.DEFAULT_PACKING[L] == gen.writer_choice(L) == choose_packing(L)


# ----------------------------------------------------------------------------------------------
# Golden files


def test_every_golden_file_is_described():
    assert sorted(GOLDEN) == sorted(p.name for p in VECTORS.glob("*.bfq"))


def test_worked_example_is_format_section_4_1():
    path = VECTORS / "worked_example.bfq"
    with open_bfq(path) as f:
        layer = f.layers["weight"]
        assert (layer.shape, layer.bits, layer.levels) == ((1, 4), 1, "balanced")
        assert (layer.digits_per_word, layer.word_bits) == (3, 5)
        start = f.data_start + layer.codes.offset
        assert path.read_bytes()[start : start + layer.codes.length] == bytes.fromhex("D702000000000000")
        assert f.read_codes("weight").tolist() == [[1, -1, 0, 1]]
        assert f.decode_layer("weight", "float32").tolist() == [[0.5, -0.5, 0.0, 0.5]]


def _bits(array: np.ndarray) -> list[int]:
    view = {4: np.uint32, 2: np.uint16}[array.dtype.itemsize]
    return np.ascontiguousarray(array).view(view).ravel().tolist()


def _check_dense(array: np.ndarray, exp: dict) -> None:
    assert array.dtype == {"f32": np.float32, "f16": np.float16, "bf16": np.uint16}[exp["dtype"]]
    assert list(array.shape) == exp["shape"]
    assert _bits(array) == exp["bits"]


@pytest.mark.parametrize("name", sorted(GOLDEN))
@pytest.mark.parametrize("verify", [True, False])
def test_golden_file_decodes_exactly(name, verify):
    exp = GOLDEN[name]
    path = VECTORS / name
    assert path.stat().st_size == exp["size"]
    with open_bfq(path, verify=verify) as f:
        f.verify_all()
        assert sorted(f.layers) == sorted(exp["layers"])
        for lname, e in exp["layers"].items():
            layer = f.layers[lname]
            assert list(layer.shape) == e["shape"] and (layer.bits, layer.levels) == (e["bits"], e["levels"])
            assert [layer.digits_per_word, layer.word_bits] == e["packing"] and layer.scale_dtype == e["scale_dtype"]
            assert _bits(f.read_scales(lname)) == e["scale_bits"]
            codes = f.read_codes(lname)
            assert codes.dtype == np.int16 and list(codes.shape) == e["shape"]
            assert codes.ravel().tolist() == e["codes"]
            f32 = f.decode_layer(lname, "float32")
            assert f32.dtype == np.float32 and list(f32.shape) == e["shape"]
            assert _bits(f32) == e["float32_bits"]
            assert f.decode_layer(lname, "float16").ravel().tolist() == e["float16_bits"]
            assert f.decode_layer(lname, "bfloat16").ravel().tolist() == e["bfloat16_bits"]
        assert sorted(f.tensors) == sorted(exp["tensors"])
        for tname, e in exp["tensors"].items():
            _check_dense(f.read_tensor(tname), e)
        cache = exp["time_cache"]
        if cache is None:
            assert f.header.time_cache is None
        else:
            tc = f.header.time_cache
            assert tc.mode == cache["mode"] and list(tc.timesteps) == cache["timesteps"]
            assert sorted(tc.tables) == sorted(cache["tables"])
            for tname, e in cache["tables"].items():
                _check_dense(f.read_time_table(tname), e)


def test_golden_float_expectations_agree_with_numpy():
    """expected.json's float16/bfloat16 bits are the float32 bits rounded to nearest even
    (struct in the generator; numpy and torch here)."""
    import torch

    for exp in GOLDEN.values():
        for e in exp["layers"].values():
            f32 = np.array(e["float32_bits"], dtype=np.uint32).view(np.float32)
            with np.errstate(over="ignore"):
                assert f32.astype(np.float16).view(np.uint16).tolist() == e["float16_bits"]
            bf16 = torch.from_numpy(f32.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            assert bf16.tolist() == e["bfloat16_bits"]


def test_scale_edge_cases_are_in_the_vectors():
    """The double-rounding traps: float16(float32(s * q)) differs from float16(s * q)."""
    e = GOLDEN["scales.bfq"]["layers"]["f32_scales.weight"]
    scales = np.array(e["scale_bits"], dtype=np.uint32).view(np.float32).astype(np.float64)
    q = np.array(e["codes"], dtype=np.float64).reshape(e["shape"])
    exact = scales[:, None] * q
    with np.errstate(over="ignore"):
        direct = exact.astype(np.float16).view(np.uint16).ravel()
    assert (direct != np.array(e["float16_bits"], dtype=np.uint16)).sum() >= 4
    assert 0x7F800000 in e["float32_bits"] and 0x7C00 in e["float16_bits"]  # overflow in f32 and in f16


def test_brackets_inside_strings_do_not_count_towards_nesting(tmp_path):
    deep = 0
    for _ in range(29):
        deep = [deep]
    model = {"class_name": "UNet2DConditionModel", "config": {"deep": deep}}
    with BfqWriter(tmp_path / "m.bfq", model=model, metadata={"brackets": '[{"' * 40 + "\\"}) as w:
        w.add_tensor("t", np.ones(3, np.float32))
    with open_bfq(tmp_path / "m.bfq") as f:
        f.verify_all()


# ----------------------------------------------------------------------------------------------
# JSON Schema


def test_schema_is_valid_draft_2020_12():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_schema_accepts_golden_headers(name):
    VALIDATOR.validate(header_of(VECTORS / name))


def _writer_files(tmp_path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    combos = [(b, lv) for lv in LEVEL_SETS for b in range(1, 9)]
    for i, (bits, levels) in enumerate(combos):
        path = tmp_path / f"w{i}.bfq"
        source = [None, {"kind": "hub", "repo": "x/y", "revision": "main"}, {"kind": "file", "sha256": "00" * 32},
                  {"kind": "builtin", "name": "tiny"}][i % 4]
        model = dict(MODEL, **({"source": source} if source else {}))
        shape = [(3, 5), (2, 3, 3, 3), (1, 1), (4, 1, 1, 1, 1, 1, 1, 2)][i % 4]
        L = num_levels(bits, levels)
        q = rng.integers(0, L, shape) - (1 << (bits - 1))
        with BfqWriter(path, model=model, metadata={"i": str(i)} if i % 2 else None) as w:
            w.add_layer(f"layer{i}.weight", q, rng.random(shape[0]) + 0.1, bits, levels=levels,
                        scale_dtype=("f16", "f32")[i % 2])
            w.add_tensor("bias", rng.random(3).astype(np.float32))
            w.add_tensor("norm", rng.random((2, 2)).astype(np.float16))
            w.add_tensor("emb", rng.integers(0, 2**15, (2, 3)).astype(np.uint16), dtype="bf16")
            w.add_tensor("scalar", np.float32(1.5))
            if i % 3 == 0:
                w.set_time_cache("scheduler", [999, 500.5, 1], {"down_blocks.0.resnets.0": rng.random((3, 4)).astype(np.float16),
                                                                "mid_block.resnets.0": rng.random((3, 2)).astype(np.float32)})
            elif i % 3 == 1:
                w.set_time_cache("grid", range(5), {"time_embedding": rng.integers(0, 2**15, (5, 4)).astype(np.uint16)},
                                 dtype="bf16")
            if i % 4 == 1:
                w.set_recipe({"avg_bits": 2.1, "n_weights_total": 100, "name": "r"})
        paths.append(path)
    return paths


def test_schema_accepts_writer_headers(tmp_path):
    for path in _writer_files(tmp_path):
        header = header_of(path)
        VALIDATOR.validate(header)
        with open_bfq(path) as f:
            f.verify_all()


# Invalid files whose broken rule the schema expresses (the rest: JSON syntax, layout, lengths,
# CRCs, shape products, name uniqueness, grid order and table rows are checks beyond JSON Schema).
SCHEMA_REJECTS = """
unknown_top_level_key missing_producer missing_tensors missing_model_class_name missing_codes_crc32 model_not_object
model_source_not_object metadata_not_strings layers_not_array layer_not_object layer_name_not_string layer_unknown_field
packing_unknown_field bits_bool offset_string bits_0 bits_9 levels_unknown packing_scheme_unknown packing_illegal_L_pow_g
packing_k65 packing_k0 packing_g0 packing_g65 shape_zero_dim shape_negative_dim shape_dim_over_2_40 shape_9_dims
shape_layer_1_dim shape_not_list dense_shape_0_dims scales_dtype_bf16 dense_dtype_unknown time_table_dtype_unknown
crc32_over_32_bits crc32_negative recipe_not_object recipe_avg_bits_string time_mode_unknown time_scheduler_table_1d
time_grid_from_1 time_grid_fraction time_duplicate_timesteps time_empty_timesteps time_timestep_bool time_timestep_string
time_grid_features_key time_table_with_name time_cache_not_object offset_negative offset_unaligned time_cache_null
recipe_null model_unknown_field model_class_name_empty model_source_kind_unknown model_source_unknown_field
model_source_revision_null model_source_hub_without_repo model_source_sha256_uppercase model_source_seed_float
recipe_avg_bits_bool recipe_n_weights_total_float recipe_n_weights_total_zero recipe_n_params_total_string
time_scheduler_features_empty time_scheduler_feature_key_empty time_scheduler_keeps_time_emb_proj
time_grid_keeps_time_embedding time_duplicate_negative_zero time_scheduler_with_addition_embed_type
time_scheduler_with_class_embed_type time_scheduler_with_num_class_embeds time_grid_with_time_cond_proj_dim
model_source_hub_repo_empty model_source_builtin_name_empty pixart_scheduler_keeps_adaln_linear
pixart_scheduler_keeps_timestep_embedder pixart_embedding_keeps_timestep_embedder pixart_features_with_size_conditions
pixart_features_with_default_size_conditions pixart_use_additional_conditions_string pixart_features_key_unknown
pixart_grid_cache
""".split()


@pytest.mark.parametrize("name", SCHEMA_REJECTS)
def test_schema_rejects_invalid_headers(name):
    assert not VALIDATOR.is_valid(header_of(INVALID / f"{name}.bfq"))


def test_schema_packing_rule_is_l_pow_g_at_most_2_pow_k():
    for levels in LEVEL_SETS:
        for bits in range(1, 9):
            L = num_levels(bits, levels)
            # exhaustively, reading the schema's groups {word_bits in [a, b] -> digits_per_word <= G}
            groups = [(e["properties"]["word_bits"]["minimum"], e["properties"]["word_bits"]["maximum"],
                       e["properties"]["digits_per_word"]["maximum"]) for e in SCHEMA["$defs"][f"packing_L{L}"]["anyOf"]]
            for g in range(1, 65):
                for k in range(1, 65):
                    in_schema = any(a <= k <= b and g <= G for a, b, G in groups)
                    assert in_schema == is_legal_packing(L, g, k), (L, g, k)
            # and at the boundary through the validator itself
            sub = jsonschema.Draft202012Validator({"$ref": f"#/$defs/packing_L{L}", "$defs": SCHEMA["$defs"]})
            for g in (1, 2, 7, 40, 64):
                min_k = (L**g - 1).bit_length()
                for k in {min_k - 1, min_k, 64} - {0}:
                    packing = {"scheme": "radix-fraction-v1", "digits_per_word": g, "word_bits": k}
                    assert sub.is_valid(packing) == is_legal_packing(L, g, k), (L, g, k)
            g0 = choose_packing(L)[0]
            for g, k in [(g0, choose_packing(L)[1]), (g0, choose_packing(L)[1] - 1), (1, 64), (64, 64)]:
                # and through the whole header schema (the bits/levels -> packing dispatch)
                layer = {"name": "w", "shape": [1, 1], "bits": bits, "levels": levels,
                         "packing": {"scheme": "radix-fraction-v1", "digits_per_word": g, "word_bits": k},
                         "scales": {"dtype": "f16", "offset": 0, "length": 2, "crc32": 0},
                         "codes": {"offset": 64, "length": 8, "crc32": 0}}
                header = {"producer": "p", "model": MODEL, "layers": [layer], "tensors": []}
                assert VALIDATOR.is_valid(header) == is_legal_packing(L, g, k), (L, g, k)


# ----------------------------------------------------------------------------------------------
# Invalid files


def test_every_invalid_file_is_described():
    described = set(INVALID_EXPECTED["files"]) | set(INVALID_EXPECTED["known_bugs"])
    assert described == {p.name for p in INVALID.glob("*.bfq")}
    assert not set(INVALID_EXPECTED["files"]) & set(INVALID_EXPECTED["known_bugs"])


def _read_every_block(f) -> None:
    """What a loader reads before using a file's values (FORMAT.md §3.1), code CRCs aside."""
    for name in f.layers:
        f.read_scales(name)
        f.read_stream(name)
    for name in f.tensors:
        f.read_tensor(name)
    for name in f.header.time_cache.tables if f.header.time_cache else ():
        f.read_time_table(name)


def _expect_rejected(path: Path, stage: str, message: str) -> None:
    start = time.perf_counter()
    pattern = re.escape(message)
    if stage == "open":
        with pytest.raises(BfqFormatError, match=pattern):
            open_bfq(path)
    else:
        assert stage in ("read", "verify"), stage
        for verify in (True, False):  # verify=False defers only what FORMAT.md §3.1 lets a reader defer
            with open_bfq(path, verify=verify) as f:
                if stage == "read":
                    with pytest.raises(BfqFormatError, match=pattern):
                        _read_every_block(f)
                with pytest.raises(BfqFormatError, match=pattern):
                    f.verify_all()
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("name", sorted(INVALID_EXPECTED["files"]))
def test_invalid_file_is_rejected(name):
    e = INVALID_EXPECTED["files"][name]
    _expect_rejected(INVALID / name, e["stage"], e["message"])


def test_crc_mismatch_is_found_when_the_block_is_decoded():
    with open_bfq(INVALID / "crc_mismatch_codes.bfq") as f:  # open does not read block data
        with pytest.raises(BfqFormatError, match=r"layers\[0\]\.codes\.crc32"):
            f.read_codes("weight")
        with pytest.raises(BfqFormatError, match=r"layers\[0\]\.codes\.crc32"):
            f.decode_layer("weight", "float16")
    with open_bfq(INVALID / "crc_mismatch_tensor.bfq") as f:
        with pytest.raises(BfqFormatError, match=r"tensors\[0\]\.crc32"):
            f.read_tensor("conv_in.bias")
    with open_bfq(INVALID / "crc_mismatch_codes.bfq", verify=False) as f:  # unchecked decode still works
        assert f.read_codes("weight").shape == (1, 4)


def test_error_type_is_a_value_error():
    assert issubclass(BfqFormatError, ValueError)


def test_format_md_packing_table_matches_the_writer():
    rows = [line.split("|")[1:-1] for line in (ROOT / "FORMAT.md").read_text("utf-8").splitlines()
            if re.match(r"^\| [1-8] \| \d+ \| \d+ \| \d+ \| [\d.]+ \|", line)]
    assert len(rows) == 8
    for cells in rows:
        n, L_bal, g_bal, k_bal, _, _, _, L_pl, g_pl, k_pl, _ = (c.strip() for c in cells)
        assert int(L_bal) == num_levels(int(n), "balanced") and int(L_pl) == num_levels(int(n), "plain")
        assert choose_packing(int(L_bal)) == (int(g_bal), int(k_bal))
        assert choose_packing(int(L_pl)) == (int(g_pl), int(k_pl))


# ----------------------------------------------------------------------------------------------
# The writer must never produce a file the reader rejects, even after a refused call


def _writer_after(tmp_path, action) -> Path:
    path = tmp_path / "w.bfq"
    with BfqWriter(path, model=MODEL) as w:
        w.add_tensor("x", np.ones(3, np.float32))
        try:
            action(w)
        except ValueError:
            pass
        w.add_tensor("y", np.ones(5, np.float32))
    return path


def test_writer_survives_a_refused_empty_tensor(tmp_path):
    path = _writer_after(tmp_path, lambda w: w.add_tensor("empty", np.zeros(0, np.float32)))
    with open_bfq(path) as f:
        f.verify_all()


def test_writer_survives_a_refused_time_cache_mode(tmp_path):
    path = _writer_after(tmp_path, lambda w: w.set_time_cache("linear", [0, 1], {"t": np.ones((2, 2), np.float16)}))
    with open_bfq(path) as f:
        f.verify_all()


def test_writer_grid_time_cache_with_an_extra_table(tmp_path):
    path = tmp_path / "g.bfq"
    try:
        with BfqWriter(path, model=MODEL) as w:
            w.set_time_cache("grid", [0, 1], {"time_embedding": np.ones((2, 2), np.float16),
                                              "extra": np.ones((2, 2), np.float16)})
    except ValueError:
        return  # refusing the call is fine
    with open_bfq(path) as f:
        f.verify_all()


# ----------------------------------------------------------------------------------------------
# FORMAT.md v1.1 decisions, at their boundaries


def _parse(text: str) -> dict:
    from bfq.format.header import parse_header

    return parse_header(text.encode("utf-8"))


def test_integer_literals_overflow_exactly_where_binary64_does():
    edge = 2**1024 - 2**970  # the midpoint between the largest binary64 and 2^1024: rounds (to even) to 2^1024
    assert _parse(f'{{"x":{edge - 1}}}')["x"] == edge - 1  # exact value kept; rounds to the largest binary64
    for text in (str(edge), "-" + str(edge), "1" + "0" * 400, "1.8e308", "-1e999"):
        with pytest.raises(BfqFormatError, match="non-finite"):
            _parse(f'{{"x":{text}}}')
    assert _parse('{"x":1e-400,"y":9007199254740993}') == {"x": 0.0, "y": 9007199254740993}


def test_json_text_rules():
    assert _parse('{ "a" : [ 1 , {"b":"\\ud83d\\ude00"} ] }') == {"a": [1, {"b": "\U0001F600"}]}  # a valid pair
    for text, message in [('{"a":1} ', "must end with '}'"), ('{"a":1}\n', "must end with '}'"),
                          ('{"a":"\\udc00\\ud800"}', "unpaired surrogate"), ('{"\\ud800":1}', "unpaired surrogate"),
                          ('{"a":1,"\\u0061":2}', "duplicate key 'a'"), ('{"a":1,}', "not valid"),
                          ('{"a":01}', "not valid"), ('{"a":"\\x41"}', "not valid"), ('{"a":NaN}', "NaN")]:
        with pytest.raises(BfqFormatError, match=re.escape(message)):
            _parse(text)
    assert _parse('{"a":"\\\\ud800"}') == {"a": "\\ud800"}  # an escaped backslash, not a surrogate


def test_a_noncanonical_word_opens_and_decodes_and_only_verification_rejects_it():
    """FORMAT.md §3.1, check 4: canonical form may be deferred; the word still decodes to valid digits."""
    path = INVALID / "word_not_rounded_up.bfq"
    for verify in (True, False):
        with open_bfq(path, verify=verify) as f, open_bfq(VECTORS / "packings.bfq") as good:
            name = next(n for n in f.layers if n.startswith("loose"))
            assert np.array_equal(f.read_codes(name), good.read_codes(name))
            with pytest.raises(BfqFormatError, match="not canonically encoded"):
                f.verify_all()



# ----------------------------------------------------------------------------------------------
# FORMAT.md v1.2: one normative sentence per former two-reading place, and bfq follows each


def test_crc32_parameters_and_check_value():
    """§3: CRC-32/ISO-HDLC as a generic engine states it gives zlib's crc32, check value 0xCBF43926."""
    import zlib

    def generic_crc32(data: bytes) -> int:  # reflected 0x04C11DB7, register 0xFFFFFFFF, xorout 0xFFFFFFFF
        register = 0xFFFFFFFF
        for byte in data:
            register ^= byte
            for _ in range(8):
                register = (register >> 1) ^ (0xEDB88320 if register & 1 else 0)
        return register ^ 0xFFFFFFFF

    from bfq.format.header import _crc32

    assert generic_crc32(b"123456789") == zlib.crc32(b"123456789") == _crc32(b"123456789") == 0xCBF43926
    data = bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8))
    assert generic_crc32(data) == _crc32(data)
    assert "0xCBF43926" in (ROOT / "FORMAT.md").read_text("utf-8")


def test_float_byte_order_and_bf16(tmp_path):
    """§1: floats little-endian; bf16 is the upper half of a binary32."""
    path = tmp_path / "f.bfq"
    with BfqWriter(path, model=MODEL) as w:
        w.add_tensor("a", np.array([1.5, -2.0], np.float32))
        w.add_tensor("b", np.array([1.5, -2.0], np.float16))
        w.add_tensor("c", (np.array([1.5, -2.0], np.float32).view(np.uint32) >> 16).astype(np.uint16), dtype="bf16")
    data = path.read_bytes()
    with open_bfq(path) as f:
        blocks = {name: data[f.data_start + t.block.offset:][: t.block.length] for name, t in f.tensors.items()}
        assert blocks["a"] == bytes.fromhex("0000c03f000000c0") and blocks["b"] == bytes.fromhex("003e00c0")
        assert blocks["c"] == bytes.fromhex("c03f00c0")
        upper = f.read_tensor("c").astype(np.uint32) << 16
        assert upper.view(np.float32).tolist() == [1.5, -2.0]


def test_first_checks_in_their_order(tmp_path):
    """§1: length against 24, magic, version, header_length limit, header_length against the file."""
    magic = b"\x89BFQ\r\n\x1a\n"
    cases = [(magic[:6], "file:"), (b"PK" + bytes(30), "magic"),
             (magic + struct.pack("<IIQ", 2, 0, 2**64 - 1), "version"),
             (magic + struct.pack("<IIQ", 1, 0, 2**64 - 1), "exceeds"),
             (magic + struct.pack("<IIQ", 1, 0, 100), "runs past the end")]
    for i, (data, message) in enumerate(cases):
        (tmp_path / f"{i}.bfq").write_bytes(data)
        with pytest.raises(BfqFormatError, match=message):
            open_bfq(tmp_path / f"{i}.bfq")


def test_numbers_compare_under_ieee_equality(tmp_path):
    """§2 types: -0.0 == 0, so a grid timestep -0.0 is 0 (and [0, -0.0] are duplicates: spec/invalid)."""
    path = tmp_path / "g.bfq"
    with BfqWriter(path, model=MODEL) as w:
        w.set_time_cache("grid", [-0.0, 1.0], {"time_embedding": np.ones((2, 3), np.float16)})
    assert b'"timesteps":[-0.0,1.0]' in path.read_bytes()
    with open_bfq(path) as f:
        assert f.header.time_cache.timesteps == (0.0, 1.0)


def test_float_overflow_edge():
    """§2's example: ...158e308 rounds down to the largest binary64, ...159e308 to infinity."""
    assert _parse('{"x":1.7976931348623158e308}')["x"] == sys.float_info.max
    with pytest.raises(BfqFormatError, match="non-finite"):
        _parse('{"x":1.7976931348623159e308}')


def test_deferrable_failures_do_not_stop_reading():
    """§3.1: a file that fails only check 4 (code CRC, canonical words, the last word's included)
    opens and reads every block with verify=False; only verification rejects it."""
    deferred = [name for name, e in INVALID_EXPECTED["files"].items() if e["stage"] == "verify"]
    assert {"word_not_rounded_up.bfq", "last_word_not_rounded_up.bfq", "crc_mismatch_codes.bfq"} <= set(deferred)
    for name in deferred:
        with open_bfq(INVALID / name, verify=False) as f:
            _read_every_block(f)
            for layer in f.layers:
                f.read_codes(layer)


def test_writer_refuses_a_time_cache_that_depends_on_conditioning(tmp_path):
    """§2.3: bfq refuses to write what it refuses to read."""
    path = tmp_path / "sdxl.bfq"
    model = {"class_name": "UNet2DConditionModel", "config": {"addition_embed_type": "text_time"}}
    with pytest.raises(BfqFormatError, match="depends on conditioning"), BfqWriter(path, model=model) as w:
        w.set_time_cache("scheduler", [1, 2], {"down_blocks.0.resnets.0": np.ones((2, 3), np.float16)})
    assert not path.exists()
    with BfqWriter(path, model=model) as w:  # the timestep-only grid table stays allowed, as does null
        w.set_time_cache("grid", [0, 1], {"time_embedding": np.ones((2, 3), np.float16)})
    model["config"] = {"addition_embed_type": None, "class_embed_type": None}
    with BfqWriter(path, model=model) as w:
        w.set_time_cache("scheduler", [1, 2], {"down_blocks.0.resnets.0": np.ones((2, 3), np.float16)})
    with open_bfq(path) as f:
        assert f.header.time_cache.mode == "scheduler"


def test_runtime_timesteps_match_listed_values_exactly():
    """§2.3: a float32 runtime timestep is widened to binary64 and matched by IEEE equality."""
    import torch

    from bfq.quant.time_modules import _TimeState

    listed = [float(np.float32(946.42105)), 0.0]
    state = _TimeState(listed)
    sample = torch.zeros(1, 4, 8, 8)
    for t, row in [(torch.tensor(946.42105, dtype=torch.float32), 0), (torch.tensor(-0.0), 1), (0, 1)]:
        state.pre_hook(None, (sample, t), {})
        assert state.rows(torch.device("cpu")).tolist() == [row]
    with pytest.raises(ValueError, match="not in the time-feature cache"):
        state.pre_hook(None, (sample, torch.tensor(946.42105, dtype=torch.float64)), {})


def test_accounting_for_embedding_tables_and_no_weights(tmp_path):
    """§2.4: a 2-D `*.weight` counts (an embedding table too), a 1-D one not; N_w = 0: no figures."""
    from bfq.format.inspect import summarize

    path = tmp_path / "a.bfq"
    with BfqWriter(path, model=MODEL) as w:
        w.add_tensor("class_embedding.weight", np.ones((10, 4), np.float32))
        w.add_tensor("norm.weight", np.ones(4, np.float32))
    summary = summarize(path)
    assert summary["dense_weights"] == 40 and summary["avg_bits"] == 32.0
    with BfqWriter(path, model=MODEL) as w:
        w.add_tensor("norm.weight", np.ones(4, np.float32))
    summary = summarize(path)
    assert summary["n_weights_total"] == 0 and summary["avg_bits"] is None and summary["bits_on_disk"] is None


PIXART = "PixArtTransformer2DModel"


@pytest.mark.parametrize("config, sized", [
    ({"use_additional_conditions": True, "sample_size": 64}, True), ({"use_additional_conditions": False, "sample_size": 128}, False),
    ({"sample_size": 128}, True), ({"use_additional_conditions": None, "sample_size": 128.0}, True), ({}, True),
    ({"sample_size": 64}, False), ({"use_additional_conditions": None, "sample_size": 32}, False),
])  # fmt: skip
def test_dit_size_conditions_are_what_the_text_says(config, sized, tmp_path):
    """§2.3.2: size conditions iff use_additional_conditions is true, or absent/null and sample_size is 128 or
    absent; with them a features cache is refused and an embedding cache written; either way the class's
    own rule (diffusers) agrees."""
    import torch
    from diffusers import PixArtTransformer2DModel

    from bfq.families.pixart import pixart_test_config
    from bfq.format.constants import uses_size_conditions

    assert uses_size_conditions(config) == sized
    built = {**pixart_test_config(), "sample_size": 128, **config}  # sample_size absent: diffusers' 128
    if "use_additional_conditions" not in config:
        del built["use_additional_conditions"]
    with torch.device("meta"):
        assert PixArtTransformer2DModel.from_config(built).use_additional_conditions == uses_size_conditions(built)
    model = {"class_name": PIXART, "config": config}
    features = {"adaln_single.linear": np.ones((2, 12), np.float16), "adaln_single.emb": np.ones((2, 2), np.float16)}
    path = tmp_path / "p.bfq"
    if sized:
        with pytest.raises(BfqFormatError, match="embeds the image size"), BfqWriter(path, model=model) as w:
            w.set_time_cache("scheduler", [1, 2], features)
        assert not path.exists()
    else:
        with BfqWriter(path, model=model) as w:
            w.set_time_cache("scheduler", [1, 2], features)
    with BfqWriter(path, model=model) as w:  # the timestep MLP's output: exact for every size
        w.add_tensor("adaln_single.linear.weight", np.ones((12, 2), np.float32))
        w.set_time_cache("scheduler", [1, 2], {"time_embedding": np.ones((2, 2), np.float16)})
    with open_bfq(path) as f:
        assert set(f.header.time_cache.tables) == {"time_embedding"}


def test_dit_golden_files_hold_what_the_text_says():
    with open_bfq(VECTORS / "pixart_scheduler.bfq") as f:
        tables = f.header.time_cache.tables
        assert f.header.model["class_name"] == PIXART and sorted(tables) == ["adaln_single.emb", "adaln_single.linear"]
        assert tables["adaln_single.linear"].shape[1] == 6 * tables["adaln_single.emb"].shape[1]
    with open_bfq(VECTORS / "pixart_embedding.bfq") as f:
        assert set(f.header.time_cache.tables) == {"time_embedding"} and "adaln_single.linear.weight" in f.layers
