"""bfq.format.pack (the numba kernels behind it) against the pure-Python reference in tests/reference.py."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import reference as ref
import torch

from bfq.format import _kernels, pack
from bfq.format.constants import LEVEL_SETS, choose_packing, fits_fast_path, num_levels

ALL = [(bits, levels) for levels in LEVEL_SETS for bits in range(1, 9)]
CHUNK = _kernels.CHUNK_WORDS


@pytest.fixture
def one_thread():
    """Tiny kernels in a loop: one numba thread avoids waking (possibly busy) worker threads per call.
    The multi-chunk tests below run with every thread."""
    old = numba.get_num_threads()
    numba.set_num_threads(1)
    yield
    numba.set_num_threads(old)


def random_codes(rng, n: int, bits: int, levels: str) -> np.ndarray:
    lo, hi = ref.code_range(bits, levels)
    q = rng.integers(lo, hi + 1, n)
    if n >= 2:
        q[0], q[-1] = lo, hi
    return q


def cells(stream_list) -> np.ndarray:
    return np.array(stream_list, dtype=np.uint64)


def ref_dequant_f32(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32(scale[c]) * float32(q), in float32."""
    per = q.size // scales.size
    with np.errstate(over="ignore"):
        return (np.repeat(scales.astype(np.float32), per) * q.reshape(-1).astype(np.float32)).astype(np.float32)


def ref_bf16_bits(f32: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(f32)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def ref_f16_bits(f32: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return f32.astype(np.float16).view(np.uint16)


def check_dequantize(stream, q, shape, scales, bits, levels, g, k):
    f32_ref = ref_dequant_f32(q, scales)
    got = pack.unpack_dequantize(stream, shape, scales, bits, levels, g, k, "float32")
    assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), f32_ref.view(np.uint32))
    got = pack.unpack_dequantize(stream, shape, scales, bits, levels, g, k, "float16")
    assert got.dtype == np.uint16 and np.array_equal(got, ref_f16_bits(f32_ref))
    got = pack.unpack_dequantize(stream, shape, scales, bits, levels, g, k, "bfloat16")
    assert got.dtype == np.uint16 and np.array_equal(got, ref_bf16_bits(f32_ref))


# ----------------------------------------------------------------------------------------------
# The reference itself


def test_reference_reproduces_format_worked_example():
    assert ref.encode_word([2, 0, 1], 3, 5) == 23 and ref.encode_word([2, 0, 0], 3, 5) == 22
    assert ref.pack([1, -1, 0, 1], 1, "balanced", 3, 5) == [0x2D7]
    assert ref.unpack([0x2D7], 4, 1, "balanced", 3, 5) == [1, -1, 0, 1]


def test_reference_agrees_with_the_stdlib_vector_generator():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("gen_vectors", Path(__file__).parents[1] / "spec" / "gen_vectors.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    rng = np.random.default_rng(7)
    for L, g, k in [(3, 29, 46), (5, 24, 56), (257, 7, 57), (3, 40, 64), (2, 64, 64), (17, 3, 13)]:
        digits = rng.integers(0, L, 3 * g + 1).tolist()
        levels = "plain" if L & (L - 1) == 0 else "balanced"
        n = (L - 1).bit_length() - 1 if levels == "balanced" else L.bit_length() - 1
        q = [d - 2 ** (n - 1) for d in digits]
        stream = b"".join(c.to_bytes(8, "little") for c in ref.pack(q, n, levels, g, k))
        assert stream == gen.pack_stream(digits, L, g, k)


# ----------------------------------------------------------------------------------------------
# Every bit width and level set, writer's packing


@pytest.mark.parametrize("bits,levels", ALL)
def test_pack_unpack_match_reference(bits, levels, one_thread):
    rng = np.random.default_rng(bits * 10 + len(levels))
    L = num_levels(bits, levels)
    g, k = choose_packing(L)
    for n in sorted({1, 2, 3, g - 1, g, g + 1, 2 * g + 3, 4 * g, 4 * g + 1, 9 * g - 1, 1000} - {0}):
        q = random_codes(rng, n, bits, levels)
        stream, g2, k2 = pack.pack_codes(q, bits, levels)
        assert (g2, k2) == (g, k) and stream.dtype == np.uint64
        expected = ref.pack(q.tolist(), bits, levels, g, k)
        assert stream.tolist() == expected, n
        codes = pack.unpack_codes(cells(expected), n, bits, levels, g, k)
        assert codes.dtype == np.int16 and codes.tolist() == q.tolist()
        assert pack.padding_bits_set(stream, n, g, k) == 0


@pytest.mark.parametrize("bits,levels", ALL)
def test_unpack_dequantize_per_channel_sizes(bits, levels, one_thread):
    """Channel boundaries at every position in a word, including the four-word fast loop."""
    rng = np.random.default_rng(100 + bits)
    L = num_levels(bits, levels)
    g, k = choose_packing(L)
    for channels, per in [(7, 1), (5, 2), (4, 3), (3, g - 1), (3, g), (3, g + 1), (2, 4 * g), (3, 4 * g + 1),
                          (2, 9 * g + 5), (1, 700), (3, 1001)]:
        if per < 1:
            continue
        shape = (channels, per) if per % 2 else (channels, 2, per // 2)
        q = random_codes(rng, channels * per, bits, levels)
        stream = cells(ref.pack(q.tolist(), bits, levels, g, k))
        scales = (rng.standard_normal(channels) * 2.0 ** rng.integers(-12, 6, channels)).astype(np.float32)
        check_dequantize(stream, q, shape, scales, bits, levels, g, k)
        check_dequantize(stream, q, shape, scales.astype(np.float16), bits, levels, g, k)


def test_dequantize_rounding_edges(one_thread):
    """Scales with 24 significant bits, subnormals, signed zeros, f16/f32 overflow, and values where
    float16(float32(s*q)) != float16(s*q) (the product is rounded in float32 first)."""
    bits_pattern = [0x3E3C9555, 0x3E04D249, 0x3F800001, 0x007FFFFF, 0x00000001, 0x80000000, 0x00000000,
                    0x469C4000, 0x7F61B1E6, 0xBFC00000, 0x7F7FFFFF, 0x33800000]
    scales = np.array(bits_pattern, dtype=np.uint32).view(np.float32)
    for bits in (3, 4, 8):
        L = num_levels(bits, "balanced")
        q = np.tile(np.arange(L) - (1 << (bits - 1)), len(scales))
        g, k = choose_packing(L)
        stream = cells(ref.pack(q.tolist(), bits, "balanced", g, k))
        check_dequantize(stream, q, (len(scales), L), scales, bits, "balanced", g, k)


# ----------------------------------------------------------------------------------------------
# Many parallel chunks (all threads)


@pytest.mark.parametrize("bits,levels,packing,n", [
    (1, "balanced", (1, 2), CHUNK * 6 + 5),  # 7 chunks of one digit per word
    (8, "balanced", (1, 9), CHUNK * 3 + 1),
    (2, "balanced", None, CHUNK * 24 + 24 * 7 + 3),  # writer's packing, 2 chunks
    (1, "plain", (8, 8), CHUNK * 8 * 3 - 1),
])
def test_many_chunks(bits, levels, packing, n):
    rng = np.random.default_rng(n)
    L = num_levels(bits, levels)
    g, k = packing or choose_packing(L)
    q = random_codes(rng, n, bits, levels)
    expected = ref.pack(q.tolist(), bits, levels, g, k)
    stream, _, _ = pack.pack_codes(q, bits, levels, packing=(g, k))
    assert stream.tolist() == expected
    assert pack.unpack_codes(stream, n, bits, levels, g, k).tolist() == q.tolist()
    for channels in (1, 3, 1 if n % 7 else 7):
        if n % channels == 0:
            scales = rng.random(channels).astype(np.float32) + 0.5
            check_dequantize(stream, q, (channels, n // channels), scales, bits, levels, g, k)


@pytest.mark.parametrize("bits,levels,g,k", [(1, "balanced", 2, 64), (8, "balanced", 1, 64), (8, "balanced", 7, 57)])
def test_many_chunks_wide_packing(bits, levels, g, k):
    """(2^k - 1) * L >= 2^64: decoding needs products wider than 64 bits."""
    assert ref.is_wide(num_levels(bits, levels), k)
    n = 5 * ((CHUNK * g * 3 + 3 * g) // 5 + 1)  # 3 chunks and a bit; 5 channels that end mid-word
    rng = np.random.default_rng(g)
    q = random_codes(rng, n, bits, levels)
    stream = cells(ref.pack(q.tolist(), bits, levels, g, k))
    assert pack.unpack_codes(stream, n, bits, levels, g, k).tolist() == q.tolist()
    check_dequantize(stream, q, (1, n), np.array([0.25], np.float32), bits, levels, g, k)
    check_dequantize(stream, q, (5, n // 5), np.arange(1, 6, dtype=np.float32), bits, levels, g, k)


# ----------------------------------------------------------------------------------------------
# Every legal packing for small L, fast and wide


@pytest.mark.parametrize("bits,levels", [(1, "plain"), (1, "balanced"), (2, "plain"), (2, "balanced")])
def test_all_legal_packings_small_L(bits, levels, one_thread):
    L = num_levels(bits, levels)
    rng = np.random.default_rng(L)
    count = wide = 0
    for g, k in ref.legal_packings(L):
        n = 2 * g + 1 if g < 32 else g + 1
        q = random_codes(rng, n, bits, levels)
        expected = ref.pack(q.tolist(), bits, levels, g, k)
        stream = cells(expected)
        assert pack.unpack_codes(stream, n, bits, levels, g, k).tolist() == q.tolist(), (g, k)
        assert pack.padding_bits_set(stream, n, g, k) == 0
        scales = np.array([1.5], np.float32)
        got = pack.unpack_dequantize(stream, (1, n), scales, bits, levels, g, k, "float32")
        assert np.array_equal(got, ref_dequant_f32(q, scales)), (g, k)
        if fits_fast_path(L, k):
            assert pack.pack_codes(q, bits, levels, packing=(g, k))[0].tolist() == expected, (g, k)
        else:
            wide += 1
            with pytest.raises(ValueError, match="fast-path"):
                pack.pack_codes(q, bits, levels, packing=(g, k))
        count += 1
    assert count == sum(1 for _ in ref.legal_packings(L)) and wide > 0


def test_wide_packings_every_level_count(one_thread):
    """For every L, the widest legal words (k = 64) and the smallest g whose words are wide."""
    rng = np.random.default_rng(3)
    for bits, levels in ALL:
        L = num_levels(bits, levels)
        for g in range(1, 65):
            k = ref.min_word_bits(L, g)
            if k > 64:
                break
            for kk in sorted({k, 64}):
                if not ref.is_wide(L, kk):
                    continue
                n = 3 * g + 2
                q = random_codes(rng, n, bits, levels)
                stream = cells(ref.pack(q.tolist(), bits, levels, g, kk))
                assert pack.unpack_codes(stream, n, bits, levels, g, kk).tolist() == q.tolist(), (L, g, kk)
                got = pack.unpack_dequantize(stream, (1, n), np.ones(1, np.float32), bits, levels, g, kk, "float32")
                assert got.tolist() == q.astype(np.float32).tolist(), (L, g, kk)


# ----------------------------------------------------------------------------------------------
# Padding bits


def test_padding_bits_set_counts_only_bits_after_the_last_word(one_thread):
    for n, g, k in [(4, 3, 5), (1, 1, 2), (30, 7, 57), (63, 63, 63), (64, 64, 64), (65, 24, 56), (25, 24, 56)]:
        words_bits = -(-n // g) * k
        total = 64 * ref.n_cells(n, g, k)
        base = [0] * ref.n_cells(n, g, k)
        assert pack.padding_bits_set(cells(base), n, g, k) == 0
        for b in range(total):
            stream = list(base)
            stream[b // 64] |= 1 << (b % 64)
            expect = 1 if b >= words_bits else 0
            assert pack.padding_bits_set(cells(stream), n, g, k) == expect == ref.padding_bits(stream, n, g, k)
        full = [ref.M64] * len(base)
        assert pack.padding_bits_set(cells(full), n, g, k) == total - words_bits


# ----------------------------------------------------------------------------------------------
# out= and argument validation


def _layer(bits=2, levels="balanced", shape=(3, 10), seed=0):
    rng = np.random.default_rng(seed)
    q = random_codes(rng, int(np.prod(shape)), bits, levels).reshape(shape)
    stream, g, k = pack.pack_codes(q, bits, levels)
    scales = rng.random(shape[0]).astype(np.float32) + 0.5
    return q, stream, g, k, scales


def test_out_argument_is_filled_in_place(one_thread):
    q, stream, g, k, scales = _layer()
    f32_ref = ref_dequant_f32(q, scales)
    for dtype, out, expect in [
        ("float32", np.empty((3, 10), np.float32), f32_ref.reshape(3, 10)),
        ("float32", np.empty(30, np.float32), f32_ref),
        ("float32", np.empty((3, 10), np.uint32), f32_ref.view(np.uint32).reshape(3, 10)),
        ("float16", np.empty((3, 10), np.float16), f32_ref.astype(np.float16).reshape(3, 10)),
        ("float16", np.empty((3, 10), np.uint16), ref_f16_bits(f32_ref).reshape(3, 10)),
        ("bfloat16", np.empty((30,), np.uint16), ref_bf16_bits(f32_ref)),
        ("bfloat16", np.empty((3, 10), np.int16), ref_bf16_bits(f32_ref).view(np.int16).reshape(3, 10)),
    ]:
        got = pack.unpack_dequantize(stream, q.shape, scales, 2, "balanced", g, k, dtype, out)
        assert got is out and out.dtype == expect.dtype and np.array_equal(out.view(np.uint8), expect.view(np.uint8))
    torch_out = torch.empty((3, 10), dtype=torch.bfloat16)
    pack.unpack_dequantize(stream, q.shape, scales, 2, "balanced", g, k, "bfloat16", torch_out.view(torch.int16).numpy())
    assert torch.equal(torch_out, torch.from_numpy(f32_ref.reshape(3, 10)).to(torch.bfloat16))


def test_out_argument_rejects_wrong_arrays():
    q, stream, g, k, scales = _layer()
    for dtype, out in [
        ("float32", np.empty(29, np.float32)),
        ("float32", np.empty(31, np.float32)),
        ("float32", np.empty(30, np.float16)),
        ("float32", np.empty(30, np.float64)),
        ("float16", np.empty(30, np.float32)),
        ("bfloat16", np.empty(30, np.uint8)),
        ("float32", np.empty((3, 20), np.float32)[:, ::2]),
    ]:
        with pytest.raises(ValueError, match="out must be"):
            pack.unpack_dequantize(stream, q.shape, scales, 2, "balanced", g, k, dtype, out)


@pytest.mark.parametrize("make", [lambda: np.full((3, 10), 7, np.float32, order="F"),
                                  lambda: np.full((6, 10), 7, np.float32)[::2]])
def test_out_argument_non_contiguous_is_rejected(make):
    q, stream, g, k, scales = _layer()
    out = make()
    try:
        got = pack.unpack_dequantize(stream, q.shape, scales, 2, "balanced", g, k, "float32", out)
    except ValueError:
        return
    assert np.array_equal(got, ref_dequant_f32(q, scales).reshape(3, 10)), "returned out was never written"


def test_argument_validation():
    q, stream, g, k, scales = _layer()
    n = q.size
    with pytest.raises(ValueError, match="cells"):
        pack.unpack_codes(stream[:-1], n, 2, "balanced", g, k)
    with pytest.raises(ValueError, match="cells"):
        pack.unpack_codes(np.concatenate([stream, stream[:1]]), n, 2, "balanced", g, k)
    with pytest.raises(ValueError, match="cells"):
        pack.unpack_codes(stream, n + g * 3, 2, "balanced", g, k)
    with pytest.raises(TypeError, match="uint64"):
        pack.unpack_codes(stream.astype(np.int64), n, 2, "balanced", g, k)
    with pytest.raises(TypeError, match="uint64"):
        pack.unpack_codes(stream.reshape(1, -1), n, 2, "balanced", g, k)
    with pytest.raises(ValueError, match="illegal packing"):
        pack.unpack_codes(stream, n, 2, "balanced", g, k - 1)  # 5^24 > 2^55
    with pytest.raises(ValueError, match="illegal packing"):
        pack.unpack_codes(stream, n, 2, "balanced", 65, 64)
    with pytest.raises(ValueError, match="illegal packing"):
        pack.pack_codes(q, 2, "balanced", packing=(24, 55))
    with pytest.raises(ValueError, match="unknown output dtype"):
        pack.unpack_dequantize(stream, q.shape, scales, 2, "balanced", g, k, "float64")
    with pytest.raises(ValueError, match="scales shape"):
        pack.unpack_dequantize(stream, q.shape, scales[:2], 2, "balanced", g, k, "float32")
    with pytest.raises(ValueError, match="cells"):
        pack.unpack_dequantize(stream[:-1], q.shape, scales, 2, "balanced", g, k, "float32")
    with pytest.raises(TypeError, match="integers"):
        pack.pack_codes(q.astype(np.float32), 2, "balanced")
    for bits, levels in ALL:
        lo, hi = ref.code_range(bits, levels)
        for bad in (lo - 1, hi + 1):
            with pytest.raises(ValueError, match="outside"):
                pack.pack_codes(np.array([[0, bad]]), bits, levels)
        pack.pack_codes(np.array([[lo, hi]], dtype=np.int16), bits, levels)


def test_pack_accepts_any_integer_dtype_and_shape(one_thread):
    q = np.array([[[1, -1], [0, 1]], [[-1, -1], [1, 0]]])
    expected = ref.pack(q.ravel().tolist(), 1, "balanced", 29, 46)
    for dtype in (np.int8, np.int16, np.int32, np.int64):
        assert pack.pack_codes(q.astype(dtype), 1, "balanced")[0].tolist() == expected
    q8 = np.array([0, 1, 255, 254], dtype=np.uint8)  # plain 8-bit: q in [-128, 127]; uint8 255 is out of range
    with pytest.raises(ValueError, match="outside"):
        pack.pack_codes(q8, 8, "plain")
    assert pack.pack_codes(np.array([0, 127, -128]), 8, "plain")[0].tolist() == ref.pack([0, 127, -128], 8, "plain", 7, 56)


def test_empty_stream(one_thread):
    stream, g, k = pack.pack_codes(np.zeros((0, 4), np.int8), 2)
    assert stream.shape == (0,)
    assert pack.unpack_codes(stream, 0, 2, "balanced", g, k).shape == (0,)
    assert pack.padding_bits_set(stream, 0, g, k) == 0
