"""Trust at the edges (issue 13): outputs never destroy what the user did not mean to replace, every
user mistake is one line and exit status 2 before the heavy work, the scheduler time cache is not a
trap, one set of defaults, and the commands say what they do. Real files, real tiny-sd, real CLI."""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from bfq_cli.main import main
import click
from click.testing import CliRunner

from bfq.pipeline.quantize import quantize
from tests.helpers import tiny_unet
from tests.test_allocate import synthetic

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_error(result, *fragments) -> str:
    """Exit status 2, exactly one `bfq: error:` line (no traceback), containing every fragment."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("bfq: error: ")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    """tiny-sd quantized with uniform-2: a scheduler-mode time cache for tiny-sd's 20 steps."""
    path = tmp_path_factory.mktemp("tiny") / "tiny.bfq"
    quantize("tiny-sd", path, recipe="uniform-2", steps=20, progress=False)
    return path


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "unet"
    tiny_unet(seed=5).save_pretrained(path)
    return path


@pytest.fixture
def sens_file(tmp_path):
    path = tmp_path / "sens.json"
    path.write_text(json.dumps(synthetic()))
    return path


# -- 1. -o never destroys what the user did not mean to replace ---------------------------------------------


def test_output_inside_the_model_being_read_is_refused(unet_dir):
    weights = unet_dir / "diffusion_pytorch_model.safetensors"
    before = weights.read_bytes()
    r = _cli("quantize", unet_dir, "--recipe", "uniform-2", "--time-cache", "grid", "-o", weights)
    _one_line_error(r, "must end in .bfq")
    r = _cli("quantize", unet_dir, "--recipe", "uniform-2", "--time-cache", "grid", "-o", unet_dir / "x.bfq", "--force")
    _one_line_error(r, "inside MODEL", "which this command reads")
    assert weights.read_bytes() == before and not (unet_dir / "x.bfq").exists()


def test_an_input_is_never_an_output(sens_file):
    before = sens_file.read_bytes()
    _one_line_error(_cli("allocate", sens_file, "--bits", "1.99", "-o", sens_file), "the same file as SENSITIVITY")
    _one_line_error(_cli("allocate", sens_file, "--bits", "1.99", "-o", sens_file, "--force"), "the same file as SENSITIVITY")
    assert sens_file.read_bytes() == before
    plot = sens_file.with_name("p.png")
    _one_line_error(_cli("allocate", sens_file, "--bits", "3", "-o", sens_file.with_name("r.json"), "--plot", sens_file.with_name("r.json")),
                    "must end in .png")  # fmt: skip
    assert not plot.exists()


def test_an_unrelated_file_is_replaced_only_with_force(sens_file, tmp_path):
    important = tmp_path / "important.json"
    important.write_text('{"my": "notes"}\n')
    _one_line_error(_cli("allocate", sens_file, "--bits", "3", "-o", important), "exists and is not a bfq recipe", "--force")
    assert important.read_text() == '{"my": "notes"}\n'
    assert _cli("allocate", sens_file, "--bits", "3", "-o", important, "--force").exit_code == 0
    assert json.loads(important.read_text())["format"] == "bfq-recipe"
    assert _cli("allocate", sens_file, "--bits", "2.5", "-o", important).exit_code == 0  # a recipe by a recipe: fine


def test_an_existing_non_bfq_is_not_replaced_by_quantize(unet_dir, tmp_path):
    out = tmp_path / "model.bfq"
    out.write_text("not a bfq file")
    args = ["quantize", unet_dir, "--recipe", "uniform-2", "--time-cache", "grid", "--quiet", "-o", out]
    _one_line_error(_cli(*args), "exists and is not a .bfq file", "--force")
    assert out.read_text() == "not a bfq file"
    assert _cli(*args, "--force").exit_code == 0
    first = out.read_bytes()
    assert first.startswith(b"\x89BFQ") and _cli(*args).exit_code == 0  # a .bfq by a .bfq: no --force needed


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_bfq_files_get_the_mode_the_umask_gives(unet_dir, tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = quantize(str(unet_dir), tmp_path / "m.bfq", recipe="uniform-2", time_cache="grid", progress=False).path
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode


def test_suffixes_are_checked_before_any_work(tiny_file, tmp_path):
    for out, message in ((tmp_path / "out", "got no suffix"), (tmp_path / "x.bfq", "got '.bfq'")):
        _one_line_error(_cli("generate", tiny_file, "--prompt", "x", "-o", out), "must end in .png", message)
    _one_line_error(_cli("eval", tiny_file, "--grid", tmp_path / "g.txt"), "must end in .png")
    _one_line_error(_cli("analyze", "tiny-sd", "--timestep-table", tmp_path / "t.csv"), "must end in .json")
    assert not list(tmp_path.iterdir())


# -- 2. one line and exit status 2 for every user error, before the heavy work --------------------------------


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--steps", "0"], ["--steps", "0 is not in the range 1<=x"]),
        (["--steps", "-1"], ["--steps", "-1 is not in the range 1<=x"]),
        (["--cfg", "nan"], ["--cfg", "'nan' is not a finite number"]),
        (["--cfg", "inf"], ["--cfg", "'inf' is not a finite number"]),
        (["--device", "tpu"], ["--device", "'tpu' is not a device"]),
        (["--device", f"cuda:{torch.cuda.device_count()}"], ["--device", "cuda"]),
        (["--steps", "7"], ["20 steps only", "cannot sample 7 steps", "--steps 20", "--time-cache grid"]),
    ],
)
def test_generate_mistakes_are_one_line(tiny_file, tmp_path, args, fragments):
    out = tmp_path / "g.png"
    _one_line_error(_cli("generate", tiny_file, "--prompt", "x", "-o", out, *args), *fragments)
    assert not out.exists()


def test_quantize_step_counts_are_checked(tmp_path):
    _one_line_error(_cli("quantize", "tiny-sd", "--bits", "1.99", "--steps", "0", "-o", tmp_path / "a.bfq"), "--steps")
    _one_line_error(_cli("quantize", "tiny-sd", "--recipe", "uniform-2", "--steps", "100000", "-o", tmp_path / "a.bfq"),
                    "1..1000", "100000")  # fmt: skip
    _one_line_error(_cli("quantize", "tiny-sd", "--bits", "nan", "-o", tmp_path / "a.bfq"), "--bits", "not a finite number")
    assert not (tmp_path / "a.bfq").exists()


def test_binary_files_where_json_is_expected(tiny_file, tmp_path):
    _one_line_error(_cli("quantize", "tiny-sd", "--recipe", tiny_file, "-o", tmp_path / "a.bfq"), "not a text (JSON) file")
    _one_line_error(_cli("quantize", "tiny-sd", "--bits", "1.99", "--sensitivity", tiny_file, "-o", tmp_path / "a.bfq"),
                    "not a text (JSON) file")  # fmt: skip
    _one_line_error(_cli("allocate", tiny_file, "--bits", "1.99"), "not a text (JSON) file")


def test_a_finetune_config_of_the_wrong_type(tmp_path):
    config = tmp_path / "ft.json"
    config.write_text('{"lr": "fast"}')
    r = _cli("finetune", "tiny-sd", "--recipe", "uniform-2", "--finetune-config", config, "-o", tmp_path / "a.bfq")
    _one_line_error(r, "lr must be a finite number", "'fast'")


def test_outputs_that_cannot_be_written(tiny_file, unet_dir, tmp_path):
    nested = tiny_file.parent / "tiny.bfq" / "x.bfq"
    _one_line_error(_cli("quantize", unet_dir, "--recipe", "uniform-2", "--time-cache", "grid", "-o", nested),
                    f"cannot write {nested}: {tiny_file} is a file, not a folder")  # fmt: skip
    if sys.platform == "linux":  # a folder that takes no new files, even for root
        _one_line_error(_cli("generate", tiny_file, "--prompt", "x", "-o", "/proc/bfq-test.png"),
                        "cannot write /proc/bfq-test.png", "cannot create files in /proc")  # fmt: skip


def test_missing_output_folders_are_created_by_every_command(tiny_file, sens_file, tmp_path):
    assert _cli("allocate", sens_file, "--bits", "3", "-o", tmp_path / "a" / "b" / "r.json").exit_code == 0
    assert (tmp_path / "a" / "b" / "r.json").is_file()
    r = _cli("eval", tiny_file, "--n-per-digit", "1", "--cfg", "3", "--quiet", "--grid", tmp_path / "c" / "d" / "g.png")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "c" / "d" / "g.png").is_file()


@pytest.mark.skipif(not hasattr(__import__("resource"), "RLIMIT_FSIZE") if sys.platform != "win32" else True, reason="POSIX only")
def test_a_full_disk_is_one_line_and_the_old_file_survives(tiny_file, tmp_path):
    """RLIMIT_FSIZE makes the write fail like a full disk does (EFBIG instead of ENOSPC)."""
    out = tmp_path / "kept.bfq"
    shutil.copy(tiny_file, out)
    before = out.read_bytes()
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))\n"
        "from bfq_cli.main import main\n"
        "main(sys.argv[1:])\n"
    )
    args = ["quantize", "tiny-sd", "--recipe", "uniform-4", "--quiet", "-o", str(out)]
    child = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert child.returncode == 2, child.stderr
    assert "Traceback" not in child.stderr
    assert re.search(rf"^bfq: error: cannot write {re.escape(str(out))}: File too large$", child.stderr, re.M), child.stderr
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["kept.bfq"]  # no temporary file left


def test_two_runs_never_share_a_work_directory(unet_dir, tmp_path):
    work = tmp_path / "work"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom bfq._io import locked_dir\n"
         "with locked_dir(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(60)\n", str(work)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        out = tmp_path / "a.bfq"
        r = _cli("quantize", unet_dir, "--recipe", "uniform-2", "--time-cache", "grid", "--work-dir", work, "-o", out)
        _one_line_error(r, f"the work directory {work} is in use by bfq (pid {holder.pid} on host {socket.gethostname()}",
                        "another --work-dir")  # fmt: skip
        assert not out.exists() and sorted(p.name for p in work.iterdir()) == ["bfq.lock"]
    finally:
        holder.kill()
        holder.wait()
    r = _cli("quantize", unet_dir, "--recipe", "uniform-2", "--time-cache", "grid", "--work-dir", work, "--quiet", "-o", tmp_path / "a.bfq")
    assert r.exit_code == 0, r.output  # the lock died with its holder


def test_ctrl_c_exits_130_without_a_traceback(tmp_path):
    child = subprocess.Popen([sys.executable, "-m", "bfq_cli.main", "eval", "tiny-sd", "--n-per-digit", "50"],
                             stderr=subprocess.PIPE, text=True, cwd=tmp_path)  # fmt: skip
    try:
        seen = ""
        while "eval:" not in seen:  # the progress bar: sampling has started
            char = child.stderr.read(1)
            assert char, f"no progress bar: {seen}"
            seen += char
        child.send_signal(signal.SIGINT)
        rest = child.communicate(timeout=60)[1]
    finally:
        child.kill()
    assert child.returncode == 130, seen + rest
    assert "Traceback" not in rest and rest.rstrip().splitlines()[-1] == "bfq: interrupted"


# -- 3. the scheduler time cache is not a trap ------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline_file(tmp_path_factory):
    """A file quantized from a local copy of tiny-sd's pipeline: a 50-step PNDM time cache."""
    from bfq.tinysd import pipeline_dir

    root = tmp_path_factory.mktemp("pipe")
    shutil.copytree(pipeline_dir(), root / "mypipe")
    return quantize(str(root / "mypipe"), root / "p50.bfq", recipe="uniform-4", progress=False).path


def test_eval_samples_the_steps_the_file_was_made_for(pipeline_file):
    r = _cli("eval", pipeline_file, "--n-per-digit", "1", "--cfg", "3", "--json", "--quiet")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["settings"]["steps"] == 50
    _one_line_error(_cli("eval", pipeline_file, "--steps", "20", "--quiet"), "PNDMScheduler at 50 steps only", "--steps 50",
                    "--time-cache grid")  # fmt: skip


def test_siblings_step_ranges_origins_and_recipes_are_checked_up_front(tiny_file, unet_dir, tmp_path):
    from bfq.tinysd import pipeline_dir

    grid = quantize(str(unet_dir), tmp_path / "grid.bfq", recipe="uniform-2", time_cache="grid", progress=False).path
    _one_line_error(_cli("generate", grid, "--base", pipeline_dir(), "--steps", "5000", "--prompt", "x", "-o", tmp_path / "g.png"),
                    "sampler steps must be an integer in 1..1000", "5000")  # fmt: skip
    _one_line_error(_cli("eval", "tiny-sd", "--steps", "5000", "--quiet"), "1..1000")
    _one_line_error(_cli("eval", grid, "--quiet"), "was not made from tiny-sd", "cross_attention_dim")
    _one_line_error(_cli("analyze", "tiny-sd", "--timestep-table", tmp_path / "t.json", "--timestep-recipe", tiny_file),
                    "not a text (JSON) file")  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.bfq"]


# -- 4. one set of defaults -------------------------------------------------------------------------------------


def test_allocate_and_quantize_default_to_the_same_allocator(sens_file):
    from bfq_cli.allocate_cmd import allocate_cmd
    from bfq_cli.quantize_cmd import quantize_cmd

    from bfq.pipeline.allocate import DEFAULT_ALLOCATOR
    from bfq.pipeline.quantize import recipe_for_budget

    defaults = {
        "bfq allocate --method": next(p.default for p in allocate_cmd.params if p.name == "method"),
        "bfq quantize --allocator": next(p.default for p in quantize_cmd.params if p.name == "allocator"),
        "quantize()": inspect.signature(quantize).parameters["allocator"].default,
        "recipe_for_budget()": inspect.signature(recipe_for_budget).parameters["method"].default,
    }
    assert set(defaults.values()) == {DEFAULT_ALLOCATOR}, defaults
    r = _cli("allocate", sens_file, "--bits", "2.5", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["method"] == DEFAULT_ALLOCATOR


def test_finetune_defaults_are_what_its_help_says():
    from bfq_cli.options import finetune_settings

    help_text = _cli("finetune", "--help").output
    assert "then Stage II" not in help_text and "--stage2-steps N" in help_text
    s1, s2, c1, c2 = finetune_settings({}, default_stage1_steps=1000)
    assert (s1, s2, c1.stage_lr, c2.stage_lr) == (1000, 0, 1e-4, 1e-5)


# -- 5. say what is happening -----------------------------------------------------------------------------------


def test_quantize_summary_has_no_empty_table(unet_dir, tmp_path):
    r = _cli("quantize", unet_dir, "--recipe", "uniform-2", "--time-cache", "grid", "--quiet", "-o", tmp_path / "a.bfq")
    assert r.exit_code == 0, r.output
    assert "--all" not in r.output and not re.search(r"^layer\s+shape", r.output, re.M)
    assert "avg bits" in r.output and "wrote" in r.output


def test_eval_shows_progress_and_labels_its_grid(tiny_file, tmp_path):
    from PIL import Image

    from bfq.tinysd.evaluate import LABEL_BAND

    grid = tmp_path / "g.png"
    r = _cli("eval", tiny_file, "--n-per-digit", "1", "--cfg", "1.5", "--cfg", "5", "--grid", grid)
    assert r.exit_code == 0, r.output
    assert re.search(r"eval: 100%.*30/30", r.stderr), r.stderr  # 3 scales (with the default 3) x 10 digits
    assert "eval:" not in _cli("eval", tiny_file, "--n-per-digit", "1", "--cfg", "3", "--quiet").stderr
    pixels = np.asarray(Image.open(grid).convert("L"))
    band, blocks = pixels[:LABEL_BAND], pixels[LABEL_BAND:]
    third = pixels.shape[1] // 3  # three blocks of equal width, "cfg 1.5", "cfg 3", "cfg 5" above them
    labels = [band[:, i * third : (i + 1) * third - 8] for i in range(3)]
    assert all((label < 100).any() for label in labels) and blocks.shape[0] > 10 * 16
    assert not np.array_equal(labels[0], labels[1]) and not np.array_equal(labels[1], labels[2])


def test_generate_grid_has_gutters_and_a_quiet_terminal(tiny_file, tmp_path):
    from PIL import Image

    from bfq.runtime.generate import GUTTER, GUTTER_COLOR

    out = tmp_path / "made" / "here" / "g.png"  # missing folders are created, as by quantize
    child = subprocess.run([sys.executable, "-m", "bfq_cli.main", "generate", str(tiny_file), "--prompt", "a handwritten digit one",
                            "--prompt", "a handwritten digit two", "-n", "2", "--quiet", "-o", str(out)],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert child.returncode == 0, child.stderr
    assert child.stderr == "", child.stderr  # no diffusers/transformers warnings nor progress bars
    image = np.asarray(Image.open(out).convert("RGB"))
    tile = 128  # tiny-sd's 16 px enlarged
    assert image.shape == (2 * tile + GUTTER, 2 * tile + GUTTER, 3)
    assert (image[:, tile : tile + GUTTER] == GUTTER_COLOR).all() and (image[tile : tile + GUTTER] == GUTTER_COLOR).all()


def test_fine_tuning_records_name_no_local_path(tmp_path):
    """(The analysis behind --bits is recorded by name only: test_quantize_load.py checks the header.)"""
    from bfq.pipeline.finetune import FinetuneConfig
    from bfq.pipeline.quantize import _public

    record = _public(FinetuneConfig(data=f"folder:{tmp_path}/images", eval_prompts=f"{tmp_path}/p.txt"))
    assert (record["data"], record["eval_prompts"], record["lr"]) == ("folder:images", "p.txt", 1e-4)
    assert str(tmp_path) not in json.dumps(record)


def test_an_unreachable_hub_fails_fast_and_suggests_offline_mode(tmp_path, monkeypatch):
    from tests.hub_server import free_port, point_client_at

    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    point_client_at(monkeypatch, endpoint, tmp_path / "hf-home", no_retry_sleep=False)
    for args in (["inspect", "user/model"], ["quantize", "user/model", "--recipe", "uniform-2", "-o", tmp_path / "a.bfq"]):
        start = time.monotonic()
        _one_line_error(_cli(*args), f"cannot connect to {endpoint}", "HF_HUB_OFFLINE=1")
        assert time.monotonic() - start < 5  # huggingface_hub's five retries took 24 s


# -- 6. options refuse, never ignore; every value's real range at parse time (issue 18) ---------------------


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["quantize", "tiny-sd", "--recipe", "uniform-4", "--bits", "1.99"], ["--bits and --recipe are alternatives"]),
        (["quantize", "tiny-sd", "--recipe", "uniform-4", "--allocator", "paper"], ["--allocator has no effect with --recipe"]),
        (["quantize", "tiny-sd", "--recipe", "uniform-4", "--lr", "1e-3"], ["--lr has no effect without fine-tuning"]),
        (["quantize", "tiny-sd", "--recipe", "uniform-4", "--time-proj-bits", "3"], ["--time-proj-bits applies to --time-cache grid"]),
        (["quantize", "tiny-sd", "--recipe", "uniform-4", "--time-cache", "grid", "--steps", "10"], ["--steps sets the steps of a scheduler-mode"]),
        (["finetune", "tiny-sd", "--recipe", "uniform-4", "--bits", "1.99"], ["--bits and --recipe"]),
        (["quantize", ".", "--recipe", "uniform-4", "--revision", "v1"], ["--revision applies to Hub models only"]),
        (["quantize", "tiny-sd", "--bits", "0.5"], ["--bits", "0.5 is not in the range x>1"]),
        (["quantize", "tiny-sd", "--recipe", "uniform-4", "--finetune-seed", "-1", "--stage1-steps", "1"], ["--finetune-seed", "-1"]),
        (["quantize", "tiny-sd", "--recipe", "uniform-4", "--batch-size", str(2**31), "--stage1-steps", "1"], ["--batch-size"]),
        (["analyze", "tiny-sd", "--timestep-table", "t.json", "--mode", "image"], ["--mode applies to the sensitivity analysis only"]),
        (["analyze", "tiny-sd", "-o", "s.json", "--timestep-recipe", "uniform-3"], ["--timestep-recipe applies to the time-step analysis"]),
        (["analyze", "tiny-sd", "-o", "s.json", "--finetune-lr", "1e-3"], ["--finetune-lr has no effect without --finetune-steps"]),
        (["analyze", "tiny-sd", "-o", "s.json", "--mode", "local", "--finetune-steps", "2"], ["--finetune-steps does not apply to --mode local"]),
        (["analyze", "tiny-sd", "-o", "s.json", "--seed", str(2**32)], ["--seed", "4294967296 is not in the range 0<=x<=4294967295"]),
        (["analyze", "tiny-sd", "-o", "s.json", "--threads", "100000"], ["--threads", "100000 is not in the range"]),
        (["eval", "tiny-sd", "--seed", str(2**64)], ["--seed"]),
        (["eval", "tiny-sd", "--n-per-digit", str(2**40)], ["--n-per-digit"]),
    ],
)
def test_unused_and_out_of_range_options_are_refused_at_parse_time(tmp_path, args, fragments):
    if args[0] in ("quantize", "finetune"):
        args = [*args, "-o", tmp_path / "a.bfq"]
    start = time.monotonic()
    _one_line_error(_cli(*args), *fragments)
    assert time.monotonic() - start < 5 and not list(tmp_path.iterdir())  # before any model is loaded


def test_allocate_options_of_other_methods_are_refused(sens_file):
    _one_line_error(_cli("allocate", sens_file, "--bits", "2.5", "--eta", "0.5"), "--eta applies to --method paper and size-only")
    _one_line_error(_cli("allocate", sens_file, "--bits", "2.5", "--method", "paper", "--align-weight", "2"), "--align-weight")
    _one_line_error(_cli("allocate", sens_file, "--bits", "2.5", "--no-refine"), "--no-refine applies to --method paper")
    assert _cli("allocate", sens_file, "--bits", "2.5", "--eta", "0.5", "--compare").exit_code == 0  # compare uses it


def test_every_integer_option_is_bounded():
    """Seeds, counts and threads have a maximum (2**64 seeds ended in a traceback after loading)."""
    for name, command in main.commands.items():
        for param in command.params:
            if isinstance(param.type, click.IntRange) or param.type is click.INT:
                assert isinstance(param.type, click.IntRange) and None not in (param.type.min, param.type.max), (name, param.name)


def test_an_impossible_budget_is_refused_before_any_analysis(tmp_path, monkeypatch):
    import bfq.pipeline.quantize as q
    from bfq.errors import RecipeError

    def no_analysis(*args, **kwargs):
        raise AssertionError("the sensitivity analysis ran")

    monkeypatch.setattr(q, "recipe_for_budget", no_analysis)
    monkeypatch.setenv("BFQ_CACHE_DIR", str(tmp_path / "cache"))
    for bits, fragment in ((1.2, "from 1.6"), (9, "to 7.")):
        with pytest.raises(RecipeError, match=rf"a budget of {bits:g} bits per weight is impossible.*{re.escape(fragment)}"):
            quantize("tiny-sd", tmp_path / "a.bfq", bits=bits, progress=False)
    _one_line_error(_cli("quantize", "tiny-sd", "--bits", "9", "--quiet", "-o", tmp_path / "a.bfq"), "impossible", "every layer at 8 bits")
    with pytest.raises(RecipeError, match="not both"):  # Python callers too: a recipe and a budget conflict
        quantize("tiny-sd", tmp_path / "a.bfq", bits=1.99, recipe="uniform-4", progress=False)
    assert not (tmp_path / "a.bfq").exists() and not (tmp_path / "cache").exists()


# -- 7. stdout that cannot be written; verify says what it checks (issue 18) -------------------------------------


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_stdout_is_one_line(tiny_file, unet_dir, tmp_path):
    for args in (["inspect", tiny_file], ["verify", tiny_file],
                 ["quantize", unet_dir, "--recipe", "uniform-2", "--time-cache", "grid", "--quiet", "-o", tmp_path / "a.bfq"]):  # fmt: skip
        with open("/dev/full", "w") as full:
            child = subprocess.run([sys.executable, "-m", "bfq_cli.main", *map(str, args)], stdout=full, stderr=subprocess.PIPE,
                                   text=True, timeout=300)  # fmt: skip
        assert child.returncode == 2, child.stderr
        assert "Traceback" not in child.stderr and "Exception ignored" not in child.stderr, child.stderr
        assert child.stderr.splitlines()[-1] == "bfq: error: cannot write to standard output: No space left on device"
    assert (tmp_path / "a.bfq").is_file()  # the file was written; only the summary was lost


def test_verify_says_what_it_checks_and_builds_the_model_on_request(tiny_file, tmp_path):
    from bfq.format.writer import BfqWriter

    r = _cli("verify", tiny_file)
    assert r.exit_code == 0 and "the format (FORMAT.md)" in r.output and "add --build" in r.output
    r = _cli("verify", tiny_file, "--build")
    assert r.exit_code == 0 and "ok" in r.output.splitlines()[1] and "the model builds: UNet2DConditionModel" in r.output
    for model, fragment in (
        ({"class_name": "UNet2DConditionModel", "config": {"block_out_channels": [32], "down_block_types": ["DownBlock2D"] * 2}},
         "cannot build UNet2DConditionModel"),
        ({"class_name": "NoSuchModel", "config": {}}, "'NoSuchModel' is not a diffusers model class"),
    ):  # fmt: skip
        path = tmp_path / f"{model['class_name']}.bfq"
        with BfqWriter(path, model=model) as w:
            w.add_tensor("bias", np.arange(5, dtype=np.float32))
        assert _cli("verify", path).exit_code == 0  # the format is sound
        _one_line_error(_cli("verify", path, "--build"), "the format is sound but the model does not build", fragment)


# -- 8. a failed fine-tuning run leaves no work directory it created (issue 18) ---------------------------------


def test_a_failed_finetune_leaves_no_work_dir_it_created(tmp_path, monkeypatch):
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n# nothing\n")
    out = tmp_path / "ft.bfq"
    _one_line_error(_cli("finetune", "tiny-sd", "--recipe", "uniform-2", "--data", f"prompts:{empty}", "-o", out), "no prompts")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.txt"]

    def fails(resolved, unet, *, work_dir, checkpoint=False, **kwargs):
        if checkpoint:  # a run that got as far as a checkpoint
            step = Path(work_dir) / "finetune" / "stage1-x" / "checkpoints" / "step-1"
            step.mkdir(parents=True)
            (step / "trainer.json").write_text("{}")
        raise ValueError("the training data ran out")

    monkeypatch.setattr("bfq.pipeline.finetune.run_finetune_stages", fails)
    args = ["finetune", "tiny-sd", "--recipe", "uniform-2", "--stage1-steps", "1", "--quiet", "-o", out]
    _one_line_error(_cli(*args), "the training data ran out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.txt"]
    monkeypatch.setattr("bfq.pipeline.finetune.run_finetune_stages", lambda *a, **k: fails(*a, checkpoint=True, **k))
    _one_line_error(_cli(*args), "the training data ran out")
    assert (tmp_path / "ft.work" / "finetune" / "stage1-x").is_dir()  # resumable: kept
    monkeypatch.setattr("bfq.pipeline.finetune.run_finetune_stages", fails)
    _one_line_error(_cli(*args), "the training data ran out")
    assert (tmp_path / "ft.work" / "finetune" / "stage1-x").is_dir()  # an earlier run's: never removed
