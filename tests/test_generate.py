"""`bfq generate` as a complete generation command and `bfq.load_pipeline` (issue 18): size, negative
prompt, sampler (what a time cache allows), seed or a printed random one, batch and grid, progress
with the time per step, peak memory, --quiet, float models and base pipelines by the names `bfq
quantize` takes, and a file's local source pipeline found again. Real tiny-sd, real CLI."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bfq_cli.main import main
from click.testing import CliRunner
from PIL import Image

import bfq
from bfq.pipeline.quantize import quantize
from bfq.runtime.generate import GUTTER
from bfq.tinysd import pipeline_dir
from tests.test_edges import _one_line_error

DIGIT = "a handwritten digit seven"


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """tiny-sd at uniform-2: a scheduler cache (PNDM, 20 steps); its UNet alone in a folder, grid cache
    (no pipeline recorded); and a copy of the pipeline folder, scheduler cache (PNDM, 10 steps)."""
    root = tmp_path_factory.mktemp("gen")
    sched = quantize("tiny-sd", root / "tiny.bfq", recipe="uniform-2", progress=False).path
    shutil.copytree(pipeline_dir() / "unet", root / "tinyunet")
    grid = quantize(str(root / "tinyunet"), root / "grid.bfq", recipe="uniform-2", time_cache="grid", progress=False).path
    shutil.copytree(pipeline_dir(), root / "mypipe")
    local = quantize(str(root / "mypipe"), root / "local.bfq", recipe="uniform-2", steps=10, progress=False).path
    return sched, grid, local


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_size_negative_prompt_sampler_batch_seed_and_what_it_took(files, tmp_path):
    out = tmp_path / "g.png"
    seed = 2**64 - 1  # the largest seed torch takes
    r = _cli("generate", files[0], "--prompt", DIGIT, "--prompt", "a handwritten digit two", "--negative-prompt", "a digit one",
             "--width", 24, "--height", 32, "--batch", 2, "--sampler", "euler", "--seed", seed, "--cfg", 3, "--quiet", "-o", out)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert r.stderr == ""  # --quiet: no progress bars
    assert re.search(rf"^seed +{seed}$", r.stdout, re.M) and f"wrote       {out}" in r.stdout
    assert re.search(r"^peak memory process RSS \d+\.\d\d GB$", r.stdout, re.M), r.stdout
    w, h = 24 * 5, 32 * 5  # 24 x 32 px images, enlarged 128 // 24 = 5 times
    assert _pixels(out).shape == (2 * h + GUTTER, 2 * w + GUTTER, 3)
    plain = tmp_path / "plain.png"
    r = _cli("generate", files[0], "--prompt", DIGIT, "--prompt", "a handwritten digit two", "--width", 24, "--height", 32,
             "--batch", 2, "--sampler", "euler", "--seed", seed, "--cfg", 3, "--quiet", "-o", plain)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert not np.array_equal(_pixels(out), _pixels(plain))  # the negative prompt was used


def test_a_random_seed_is_printed_and_makes_the_same_images_again(files, tmp_path):
    r = _cli("generate", files[0], "--prompt", DIGIT, "--quiet", "-o", tmp_path / "a.png")
    assert r.exit_code == 0, r.output
    seed = int(re.search(r"^seed +(\d+) +\(random; --seed \1 makes these images again\)$", r.stdout, re.M).group(1))
    again = _cli("generate", files[0], "--prompt", DIGIT, "--quiet", "--seed", seed, "-o", tmp_path / "b.png")
    other = _cli("generate", files[0], "--prompt", DIGIT, "--quiet", "--seed", seed + 1, "-o", tmp_path / "c.png")
    assert again.exit_code == 0 and other.exit_code == 0 and "(random" not in again.stdout
    assert np.array_equal(_pixels(tmp_path / "a.png"), _pixels(tmp_path / "b.png"))
    assert not np.array_equal(_pixels(tmp_path / "a.png"), _pixels(tmp_path / "c.png"))


def test_a_scheduler_cache_takes_the_samplers_that_visit_its_timesteps(files, tmp_path):
    line = _one_line_error(_cli("generate", files[0], "--prompt", "x", "--sampler", "dpm++", "-o", tmp_path / "g.png"),
                           "PNDMScheduler at 20 steps only", "sampler dpm++", "--time-cache grid")  # fmt: skip
    assert "Samplers that fit: ddim, pndm, euler, euler-a, lms, heun;" in line
    for sampler in ("ddim", "heun"):  # heun visits every cached timestep twice
        r = _cli("generate", files[0], "--prompt", DIGIT, "--sampler", sampler, "--seed", 0, "--quiet", "-o", tmp_path / f"{sampler}.png")
        assert r.exit_code == 0, r.output
    # a grid cache takes any sampler; its base pipeline named as `bfq quantize` names models
    r = _cli("generate", files[1], "--base", "tiny-sd", "--prompt", DIGIT, "--sampler", "dpm++", "--steps", 7, "--quiet",
             "-o", tmp_path / "grid.png")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert not list(tmp_path.glob("g.png"))


def test_progress_bars_show_the_time_per_step(files, tmp_path):
    child = subprocess.run([sys.executable, "-m", "bfq_cli.main", "generate", str(files[0]), "--prompt", "a", "--prompt", "b",
                            "--seed", "1", "-o", str(tmp_path / "g.png")], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert child.returncode == 0, child.stderr
    assert re.search(r"prompt 1/2: 100%.*20/20 \[.*\d+\.\d+s/step\]", child.stderr), child.stderr
    assert re.search(r"prompt 2/2: 100%.*20/20", child.stderr), child.stderr
    assert "Warning" not in child.stderr and "peak memory" in child.stdout


def test_float_models_by_the_names_quantize_takes(files, tmp_path):
    out = tmp_path / "float.png"
    r = _cli("generate", "tiny-sd", "--prompt", DIGIT, "--seed", 3, "--quiet", "-o", out)
    assert r.exit_code == 0, r.output
    quantized = tmp_path / "q.png"
    assert _cli("generate", files[0], "--prompt", DIGIT, "--seed", 3, "--quiet", "-o", quantized).exit_code == 0
    assert _pixels(out).shape == _pixels(quantized).shape and not np.array_equal(_pixels(out), _pixels(quantized))
    r = _cli("generate", pipeline_dir(), "--prompt", DIGIT, "--seed", 3, "--quiet", "-o", tmp_path / "dir.png")
    assert r.exit_code == 0 and np.array_equal(_pixels(out), _pixels(tmp_path / "dir.png"))  # the same model by folder
    _one_line_error(_cli("generate", "tiny-sd", "--prompt", "x", "--runtime", "packed"), "--runtime applies to a .bfq file only")
    _one_line_error(_cli("generate", "sd15-random", "--prompt", "x"), "sd15-random is a UNet alone", "--base")
    _one_line_error(_cli("generate", files[1], "--prompt", "x", "--base", "sd15-random"), "sd15-random is a UNet alone")


def test_a_file_finds_its_local_source_pipeline_again(files, tmp_path, monkeypatch):
    local = files[2]
    monkeypatch.chdir(tmp_path)  # the folder is found next to the file, not only in the current folder
    r = _cli("generate", local, "--prompt", DIGIT, "--quiet", "--seed", 0, "-o", tmp_path / "a.png")
    assert r.exit_code == 0, r.output
    moved = local.parent / "elsewhere"
    (local.parent / "mypipe").rename(moved)
    try:
        _one_line_error(_cli("generate", local, "--prompt", "x", "-o", tmp_path / "b.png"),
                        "made from a local model named 'mypipe'", "pass --base DIR")  # fmt: skip
        shutil.copytree(pipeline_dir(), tmp_path / "mypipe")  # same name in the current folder, another UNet
        weights = tmp_path / "mypipe" / "unet" / "diffusion_pytorch_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-1] + b" ")
        _one_line_error(_cli("generate", local, "--prompt", "x", "-o", tmp_path / "b.png"), "has that name but another UNet",
                        f"pass --base {tmp_path / 'mypipe'}")  # fmt: skip
        r = _cli("generate", local, "--base", moved, "--prompt", DIGIT, "--quiet", "--seed", 0, "-o", tmp_path / "c.png")
        assert r.exit_code == 0 and np.array_equal(_pixels(tmp_path / "a.png"), _pixels(tmp_path / "c.png"))
    finally:
        moved.rename(local.parent / "mypipe")


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--width", "20"], ["--width", "20 is not a multiple of 8"]),
        (["--height", "0"], ["--height"]),
        (["--seed", str(2**64)], ["--seed", "18446744073709551616 is not in the range 0<=x<=18446744073709551615"]),
        (["--batch", "0"], ["--batch"]),
        (["--negative-prompt", "x", "--cfg", "1"], ["--negative-prompt needs --cfg above 1"]),
        (["--sampler", "k-dpm"], ["--sampler", "'k-dpm' is not one of"]),
        (["--revision", "main"], ["--revision applies to a Hub repo id only"]),
    ],
)
def test_generate_values_are_checked_at_parse_time(files, tmp_path, args, fragments):
    _one_line_error(_cli("generate", files[0], "--prompt", "x", "-o", tmp_path / "g.png", *args), *fragments)
    assert not list(tmp_path.iterdir())


def test_load_pipeline_is_one_line(files):
    pipe = bfq.load_pipeline(files[0])
    assert type(pipe).__name__ == "StableDiffusionPipeline" and type(pipe.scheduler).__name__ == "PNDMScheduler"
    assert any(type(m).__module__ == "bfq.runtime.packed" for m in pipe.unet.modules())  # packed on the CPU
    image = pipe(DIGIT, num_inference_steps=20, guidance_scale=3, output_type="np").images[0]
    assert image.shape == (16, 16, 3) and np.isfinite(image).all()
    assert "load_pipeline" in bfq.__all__ and Path(bfq.__file__).parent.joinpath("runtime", "generate.py").is_file()
