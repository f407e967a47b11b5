"""Writer/reader round trips, atomic writes, the lean import and the inspect/verify commands."""

import json
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from bfq_cli.main import main
from click.testing import CliRunner

from bfq import BfqFormatError
from bfq.format import BfqWriter, open_bfq

MODEL = {"class_name": "UNet2DConditionModel", "config": {"sample_size": 8}, "source": {"kind": "builtin", "name": "test"}}


def _write_sample(path, seed=0):
    rng = np.random.default_rng(seed)
    expected = {}
    with BfqWriter(path, model=MODEL, metadata={"note": "sample"}) as w:
        for bits, levels, shape in [(1, "balanced", (6, 4, 3, 3)), (2, "balanced", (5, 7)), (3, "plain", (4, 33)), (8, "balanced", (3, 2, 1, 1))]:
            L = (1 << bits) + (levels == "balanced")
            q = rng.integers(0, L, shape) - (1 << (bits - 1))
            s = (rng.random(shape[0]) + 0.01).astype(np.float32)
            name = f"layer{bits}{levels}.weight"
            w.add_layer(name, q, s, bits, levels=levels, scale_dtype="f32" if bits == 3 else "f16")
            expected[name] = (q, s.astype(np.float32 if bits == 3 else np.float16))
        w.add_tensor("bias", np.arange(5, dtype=np.float32))
        w.add_tensor("norm", np.ones((2, 3), dtype=np.float16))
        w.set_time_cache("scheduler", [981, 501.5, 1], {"down_blocks.0.resnets.0": rng.random((3, 6)).astype(np.float16)})
        w.set_recipe({"name": "test", "avg_bits": 2.0, "n_weights_total": 1000, "n_params_total": 1200})
    return expected


def test_round_trip(tmp_path):
    path = tmp_path / "m.bfq"
    expected = _write_sample(path)
    with open_bfq(path) as f:
        assert f.header.model == MODEL
        assert f.header.metadata == {"note": "sample"}
        for name, (q, s) in expected.items():
            assert np.array_equal(f.read_codes(name), q)
            ref = s.astype(np.float32)[(slice(None),) + (None,) * (q.ndim - 1)] * q.astype(np.float32)
            assert np.array_equal(f.decode_layer(name, "float32"), ref)
            assert np.array_equal(f.decode_layer(name, "float16"), ref.astype(np.float16).view(np.uint16))
        assert np.array_equal(f.read_tensor("bias"), np.arange(5, dtype=np.float32))
        assert f.header.time_cache.timesteps == (981.0, 501.5, 1.0)
        assert f.read_time_table("down_blocks.0.resnets.0").shape == (3, 6)
        f.verify_all()


def test_layout_is_aligned_and_tight(tmp_path):
    path = tmp_path / "m.bfq"
    _write_sample(path)
    with open_bfq(path) as f:
        blocks = sorted(f.header.blocks(), key=lambda b: b.offset)
        assert f.data_start % 64 == 0
        assert all(b.offset % 64 == 0 for b in blocks)
        assert f.data_start + blocks[-1].offset + blocks[-1].length == path.stat().st_size


def test_writer_rejects_bad_input(tmp_path):
    with BfqWriter(tmp_path / "x.bfq", model=MODEL) as w:
        with pytest.raises(ValueError, match="outside"):
            w.add_layer("a", np.array([[2, 0]]), np.ones(1), 1)
        with pytest.raises(ValueError, match="finite"):
            w.add_layer("b", np.array([[1, 0]]), np.array([np.inf]), 1)
        with pytest.raises(ValueError, match="finite"):
            w.add_layer("c", np.array([[1, 0]]), np.array([1e6]), 1, scale_dtype="f16")  # overflows fp16
        with pytest.raises(ValueError, match="scales"):
            w.add_layer("d", np.zeros((3, 2), int), np.ones(2), 1)
        w.add_layer("e", np.zeros((1, 2), int), np.ones(1), 1)
        with pytest.raises(ValueError, match="duplicate"):
            w.add_tensor("e", np.zeros(2, np.float32))


def test_failed_write_leaves_previous_file_intact(tmp_path):
    path = tmp_path / "m.bfq"
    _write_sample(path, seed=1)
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        with BfqWriter(path, model=MODEL) as w:
            w.add_tensor("x", np.zeros(1000, np.float32))
            raise RuntimeError("interrupted")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bfq"]  # no temporary files left


def test_killed_write_leaves_previous_file_intact(tmp_path):
    path = tmp_path / "m.bfq"
    _write_sample(path, seed=2)
    before = path.read_bytes()
    script = textwrap.dedent(
        f"""
        import sys, time, numpy as np
        from bfq.format import BfqWriter
        w = BfqWriter({str(path)!r}, model={MODEL!r})
        for i in range(10_000):
            w.add_tensor(f"t{{i}}", np.zeros(4096, np.float32))
            if i == 10:
                print("writing", flush=True)
            time.sleep(0.001)
        w.close()
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert path.read_bytes() == before
    open_bfq(path).verify_all()


def test_import_does_not_load_torch():
    code = "import sys, bfq, bfq.format, bfq.format.inspect, bfq.format.pack; assert not {'torch', 'diffusers'} & set(sys.modules), sorted(m for m in sys.modules if m in ('torch','diffusers'))"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_inspect_json_and_text(tmp_path):
    path = tmp_path / "m.bfq"
    _write_sample(path)
    runner = CliRunner()
    result = runner.invoke(main, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["file_bytes"] == path.stat().st_size
    assert {"avg_bits", "bits_on_disk", "layers"} <= set(summary)
    assert len(summary["layers"]) == 4
    # paper accounting: sum(log2(L) * N) + 16 * N_tf over n_weights_total
    n = {1: 6 * 36, 2: 35, 3: 4 * 33, 8: 6}
    ideal = n[1] * np.log2(3) + n[2] * np.log2(5) + n[3] * 3 + n[8] * np.log2(257) + 16 * 18
    assert summary["avg_bits"] == pytest.approx(ideal / 1000)
    assert summary["ratio_vs_fp16"] == pytest.approx(2400 / path.stat().st_size)
    text = runner.invoke(main, ["inspect", str(path)]).output
    assert "layer1balanced.weight" in text and "avg bits" in text


def test_cli_verify(tmp_path):
    path = tmp_path / "m.bfq"
    _write_sample(path)
    runner = CliRunner()
    ok = runner.invoke(main, ["verify", str(path)])
    assert ok.exit_code == 0 and ok.output.startswith("ok")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # inside the last block
    bad = tmp_path / "bad.bfq"
    bad.write_bytes(bytes(data))
    result = runner.invoke(main, ["verify", str(bad)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "crc32" in lines[0] and "Traceback" not in result.output
    missing = runner.invoke(main, ["verify", str(tmp_path / "nope.bfq")])
    assert missing.exit_code == 2 and "no such file" in missing.output


def test_open_checks_before_reading_header(tmp_path):
    path = tmp_path / "m.bfq"
    _write_sample(path)
    data = path.read_bytes()
    (tmp_path / "t.bfq").write_bytes(data[:100])
    start = time.perf_counter()
    with pytest.raises(BfqFormatError, match="header_length"):
        open_bfq(tmp_path / "t.bfq")
    assert time.perf_counter() - start < 1


def test_decode_layers_in_threads_equals_decode_layer(tmp_path):
    path = tmp_path / "m.bfq"
    _write_sample(path)
    with open_bfq(path) as f:
        for dtype, np_dtype in (("float16", np.uint16), ("float32", np.float32), ("bfloat16", np.uint16)):
            outs = {name: np.empty(layer.shape, np_dtype) for name, layer in f.layers.items()}
            f.decode_layers(outs, dtype, threads=2)
            for name, out in outs.items():
                assert np.array_equal(out, f.decode_layer(name, dtype)), (name, dtype)


def test_inspect_file_without_layers():
    from pathlib import Path

    from bfq.format.inspect import format_summary, summarize

    spec = Path(__file__).resolve().parents[1] / "spec/vectors"
    summary = summarize(spec / "empty.bfq")
    assert summary["n_layers"] == 0 and summary["avg_bits"] is None
    assert "dense tensors" in format_summary(summary)
    # dense.bfq: no quantized layer, but conv_norm_out.weight [2, 3] (f16) is a weight (FORMAT.md §2.4)
    summary = summarize(spec / "dense.bfq")
    assert summary["dense_weights"] == summary["n_weights_total"] == 6
    assert summary["avg_bits"] == summary["bits_on_disk"] == 16.0
    assert "6 weights kept in floating point" in format_summary(summary)
