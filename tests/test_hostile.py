"""Hostile .bfq files (issue 17), all generated here: headers accepted or refused in time and memory
linear in their length (FORMAT.md §5), every text bfq prints from a file escaped for display
(bfq._io.display: inspect, error lines, the Hub card), and one `bfq: error:` line when memory
runs out."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import yaml
from bfq_cli.main import main
from click.testing import CliRunner

from bfq import BfqFormatError
from bfq._io import display
from bfq.format import BfqWriter, open_bfq
from bfq.format.constants import MAX_JSON_VALUES
from bfq.format.header import parse_header

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
# FORMAT.md §5's bound, as bfq's target: <= 2 s and <= 4x extra memory for a 64 MiB header. The
# tests run at 8 MiB, where linear time is ~0.25 s: 2 s leaves 8x for a loaded CI machine, and a
# quadratic pre-scan (issue 17: 9.4 s for 40 KB) or 120 bytes per header byte still fail.
SECONDS = 2.0
MEMORY_FACTOR = 4


def _bench():
    spec = importlib.util.spec_from_file_location("header_bench", ROOT / "bench" / "header_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BENCH = _bench()


def _file(tmp_path: Path, raw: bytes, name: str = "h.bfq") -> Path:
    path = tmp_path / name
    path.write_bytes(BENCH.bfq_bytes(raw))
    return path


def _open_cost(path: Path) -> tuple[str | None, float, int]:
    """(BfqFormatError message or None, seconds untraced, tracemalloc peak of a second open)."""
    def run():
        try:
            with open_bfq(path):
                return None
        except BfqFormatError as exc:
            return str(exc)

    start = time.perf_counter()
    outcome = run()
    seconds = time.perf_counter() - start
    tracemalloc.start()
    try:
        run()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return outcome, seconds, peak


# ----------------------------------------------------------------------------------------------
# Defect 1: the nesting pre-scan was quadratic on escaped quotes in an unterminated string


def test_unterminated_string_of_escaped_quotes_is_refused_in_linear_time(tmp_path):
    raw = b'{"a":"' + b'\\"' * 30_000 + b"}"  # issue 17: 20,000 pairs took 9.4 s
    start = time.perf_counter()
    with pytest.raises(BfqFormatError, match="not valid"):
        parse_header(raw)
    assert time.perf_counter() - start < SECONDS / 4
    outcome, seconds, peak = _open_cost(_file(tmp_path, BENCH.header("unterminated_escapes", 8 * MiB)))
    assert outcome and "Unterminated string" in outcome
    assert seconds < SECONDS and peak < MEMORY_FACTOR * 8 * MiB


# ----------------------------------------------------------------------------------------------
# Defect 2: ~120 bytes of memory per header byte on long strings


@pytest.mark.parametrize("kind", ["long_string", "escapes", "short_strings", "numbers", "nesting", "deep"])
def test_an_8_mib_header_costs_linear_time_and_at_most_4x_memory(tmp_path, kind):
    size = 8 * MiB
    outcome, seconds, peak = _open_cost(_file(tmp_path, BENCH.header(kind, size)))
    if kind in ("long_string", "escapes"):
        assert outcome is None  # valid, and accepted
    else:  # more values than FORMAT.md §5 allows, or too deep: refused before json builds objects
        assert outcome and ("JSON values" in outcome or "nesting" in outcome), outcome
    assert seconds < SECONDS, seconds
    assert peak < MEMORY_FACTOR * size, f"{peak / size:.1f}x the header size"


def test_a_long_string_is_read_once_not_copied_around(tmp_path):
    """Decoding the header and the string it holds: about 2 bytes per header byte."""
    size = 8 * MiB
    outcome, _, peak = _open_cost(_file(tmp_path, BENCH.header("long_string", size)))
    assert outcome is None and peak < 2.5 * size, f"{peak / size:.2f}x"


def test_the_value_limit_bounds_the_objects_built(tmp_path):
    """2^19 empty objects (the most FORMAT.md §5 allows; 4 MiB of `{}` would be 1.4 million) and a
    string: a fixed cost of about 40 MiB for the objects, on top of the 2x of the string."""
    size = 4 * MiB
    outcome, seconds, peak = _open_cost(_file(tmp_path, BENCH.header("at_value_limit", size)))
    assert outcome is None and seconds < SECONDS
    assert peak < 2 * size + 48 * MiB, f"{peak / MiB:.0f} MiB"


def _values_header(n: int) -> bytes:
    """A valid bfq header with exactly n JSON values (model.config.x holds n - 8 of them)."""
    filler = b",".join([b"[]", b"{}", b'""', b"0"] * ((n - 8) // 4) + [b"0"] * ((n - 8) % 4))
    raw = (b'{"producer":"p","model":{"class_name":"U","config":{"x":[' + filler
           + b"]}},\"layers\":[],\"tensors\":[]}")  # fmt: skip
    return raw  # values: top, producer, model, class_name, config, x, layers, tensors = 8 + fillers


@pytest.mark.parametrize("chunk", [7, 1 << 16])
def test_the_value_limit_is_exact(monkeypatch, chunk):
    """FORMAT.md §5: 2^19 values accepted, one more refused, however the pre-scan cuts the bytes;
    empty containers and strings holding brackets, commas and escaped quotes counted right."""
    from bfq.format import strict_json

    monkeypatch.setattr(strict_json, "_CHUNK", chunk)
    for small in (b'{"a":[[],{},"],[{\\"\\\\",{"b":[0, 1 ,{ }, [ ] ]}],"c":"\\\\"}', b'{"a":[ ]}', b"{}",
                  b'{"":"\\\\\\"[]", "x" : [ {"y": [[[] ] ]} , "\\\\" ,[]]}'):
        scan = strict_json._Scan()
        data = np.frombuffer(small, np.uint8)
        for start in range(0, len(data), chunk):
            scan.feed(data[start : start + chunk])
        assert scan.values == _count(parse_header(small)) and scan.depth == 0 and not scan.in_string, small
    if chunk > 7:
        header = parse_header(_values_header(MAX_JSON_VALUES))
        assert _count(header) == MAX_JSON_VALUES
        with pytest.raises(BfqFormatError, match=f"more than {MAX_JSON_VALUES} JSON values"):
            parse_header(_values_header(MAX_JSON_VALUES + 1))


def _count(value) -> int:
    if isinstance(value, dict):
        return 1 + sum(_count(v) for v in value.values())
    if isinstance(value, list):
        return 1 + sum(_count(v) for v in value)
    return 1


def test_nesting_limit_across_chunk_boundaries(monkeypatch):
    from bfq.format import strict_json

    monkeypatch.setattr(strict_json, "_CHUNK", 5)
    deep = b'{"a":"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[","b":' + b"[" * 31 + b"]" * 31 + b"}"
    assert parse_header(deep)["a"].startswith("[[[")
    with pytest.raises(BfqFormatError, match="nesting deeper than 32"):
        parse_header(b'{"a":"\\\\",' + b'"b":' + b"[" * 32 + b"]" * 32 + b"}")


# ----------------------------------------------------------------------------------------------
# Defect 3: a file's text printed raw let it forge lines of bfq's own reports

FORGED = "bfq 0.1.0\r\nfile        forged.bfq  (1 bytes)\x1b[2K\u202e\u2028\x85\tend"
UNSAFE = ("\r", "\n", "\x1b", "\u202e", "\u2028", "\x85", "\t")


def test_display_rule():
    assert display(FORGED) == "bfq 0.1.0\\r\\nfile        forged.bfq  (1 bytes)\\x1b[2K\\u202e\\u2028\\x85\\tend"
    assert display(display(FORGED)) == display(FORGED)  # idempotent: safe to apply at every layer
    assert display("é 😀 a\\b") == "é 😀 a\\b"  # printable text, backslashes included, is kept
    assert display("\U000e0001\ufeff\u200b\ue000\udfff") == "\\U000e0001\\ufeff\\u200b\\ue000\\udfff"
    assert display("x" * 100, 10) == "x" * 10 + "..."
    assert all(c.isprintable() for c in display("".join(map(chr, range(0x3000)))))


def _forging_file(path: Path) -> Path:
    model = {"class_name": "UNet2DConditionModel\nfake", "config": {},
             "source": {"kind": "hub", "repo": "evil/x\n---\nlicense: mit\nbase_model: [x](javascript:alert(1))"}}
    with BfqWriter(path, model=model, producer=FORGED) as w:
        w.add_layer("down_blocks.0.a\r\nfake layer line|`x`", np.zeros((2, 3), np.int16), np.ones(2, np.float32), 2)
        w.add_tensor("t\x1b]0;title\x07", np.ones(3, np.float32))
        w.set_recipe({"name": "r\n| injected | row |", "n_weights_total": 6})
    return path


def test_inspect_escapes_every_text_from_the_file(tmp_path):
    path = _forging_file(tmp_path / "forge.bfq")
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert not any(c in result.output.replace("\n", "") for c in UNSAFE)
    lines = result.output.splitlines()
    assert [line.split()[0] for line in lines[:4]] == ["file", "producer", "model", "recipe"]
    assert lines[1] == "producer    " + display(FORGED)
    assert "down_blocks.0.a\\r\\nfake layer line|`x`" in result.output
    assert sum(line.startswith("file ") for line in lines) == 1
    as_json = CliRunner().invoke(main, ["inspect", str(path), "--json"])
    assert json.loads(as_json.output)["producer"] == FORGED  # JSON keeps the text, escaped by JSON itself


def test_error_lines_quote_file_text_escaped(tmp_path):
    entry = b'{"name":"a\\r\\nb\\u001b[31m","dtype":"f32","shape":[1],"offset":0,"length":4,"crc32":0}'
    raw = BENCH.header("long_string", 4096).replace(b'"tensors":[]', b'"tensors":[' + entry + b"," + entry + b"]")
    with pytest.raises(BfqFormatError, match=r"tensors\[1\]\.name: duplicate name") as info:
        open_bfq(_file(tmp_path, raw))
    assert "a\\r\\nb\\x1b[31m" in str(info.value) and not any(c in str(info.value) for c in UNSAFE)
    # a time-cache feature key is part of the path of its block, quoted when its CRC fails
    path = tmp_path / "s.bfq"
    with BfqWriter(path, model={"class_name": "U", "config": {}}) as w:
        w.set_time_cache("scheduler", [1, 2], {"down\r\nbfq: ok": np.ones((2, 2), np.float16)})
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    result = CliRunner().invoke(main, ["verify", str(path)])
    assert result.exit_code == 2 and len(result.output.splitlines()) == 1
    assert "features.down\\r\\nbfq: ok.crc32" in result.output
    # the strict JSON layer quotes keys and numbers through the same rule
    with pytest.raises(BfqFormatError, match=r"duplicate key 'k\\u202e'"):
        parse_header('{"k\u202e":1,"k\\u202e":2}'.encode())


def test_hub_card_escapes_markdown_and_yaml(tmp_path):
    from bfq.hub import card

    path = _forging_file(tmp_path / "forge.bfq")
    base = card.base_model_info({"kind": "hub", "repo": "evil/x\n---\nlicense: mit"}, lookup=False)
    text = card.model_card(path, repo_id="me/model", base=base)
    front = yaml.safe_load(text.split("---\n")[1])
    assert "license" not in front and "base_model" not in front  # an invalid repo id is not a base model
    assert "javascript" not in text and "| injected | row |" not in text
    assert "Recipe r\\\\n\\| injected \\| row \\|;" in text  # display's \\n, its backslash escaped for Markdown
    assert "written by bfq 0.1.0\\\\r\\\\nfile" in text
    assert not any(c in text.replace("\n", "") for c in UNSAFE)


# ----------------------------------------------------------------------------------------------
# Out of memory anyway: one line, no traceback


def test_out_of_memory_is_one_error_line(tmp_path, monkeypatch):
    path = _file(tmp_path, BENCH.header("long_string", 4096))
    from bfq.format import reader

    def no_memory(raw):
        raise MemoryError

    monkeypatch.setattr(reader, "parse_header", no_memory)
    result = CliRunner().invoke(main, ["verify", str(path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.splitlines() == ["bfq: error: out of memory: this machine could not give bfq the memory the command needs"]


@pytest.mark.slow  # a fresh interpreter (~5 s); test_out_of_memory_is_one_error_line covers the CLI path
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS as a memory limit is Linux's")
def test_out_of_memory_under_a_real_limit(tmp_path):
    """`bfq inspect` of a valid file with a 16 MiB header, in a process allowed 20 MiB more
    address space than it has after its imports: the header maps, its decoding does not fit."""
    path = _file(tmp_path, BENCH.header("long_string", 16 * MiB))
    code = textwrap.dedent(f"""
        import resource, sys
        import bfq.format.inspect, bfq.format.reader, bfq.runtime.memory, numpy
        from bfq_cli.main import main
        with open("/proc/self/status") as f:
            size = next(int(line.split()[1]) for line in f if line.startswith("VmSize:")) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (size + 20 * 2**20, resource.RLIM_INFINITY))
        main(["inspect", {str(path)!r}])
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    env.pop("BFQ_DEBUG", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.splitlines() == ["bfq: error: out of memory: this machine could not give bfq the memory the command needs"]


# ----------------------------------------------------------------------------------------------
# Free-text metadata that reaches diffusers (the sampler a scheduler cache was made for)


@pytest.mark.parametrize("scheduler, steps", [
    ("{not json", "20"),
    ('{"class_name": "StableDiffusionPipeline", "config": {}}', "20"),  # not a scheduler class
    ('{"class_name": "DDIMScheduler", "config": []}', "20"),
    ('{"class_name": "DDIMScheduler", "config": {}}', "1e999"),
    ('{"class_name": "DDIMScheduler", "config": {}}', "99999999999"),
    ('{"class_name": "DDIMScheduler", "config": {"num_train_timesteps": "\\u001b[31mred"}}', "20"),
    ('[' * 100_000, "20"),
])  # fmt: skip
def test_metadata_sampler_is_one_input_error(scheduler, steps):
    from bfq.errors import InputError
    from bfq.runtime.generate import cached_sampler

    with pytest.raises(InputError) as caught:
        cached_sampler({"scheduler": scheduler, "num_inference_steps": steps})
    assert not any(c in str(caught.value) for c in UNSAFE)


def test_metadata_sampler_of_a_real_scheduler_builds():
    from bfq.runtime.generate import cached_sampler

    scheduler, steps = cached_sampler({"scheduler": '{"class_name": "DDIMScheduler", "config": {}}', "num_inference_steps": "7"})
    assert type(scheduler).__name__ == "DDIMScheduler" and steps == 7
