"""bfq.pipeline.analyze: per-layer sensitivity (proxy and image modes), resume, determinism, the time-step
error analysis, CLI, and the path `bfq quantize --bits` takes (recipe_for_budget), end to end against
`bfq inspect`."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from bfq.pipeline import analyze as an
from bfq.pipeline.analyze.measure import _Context
from bfq.pipeline.quantize import recipe_for_budget
from bfq.pipeline.sensitivity import SensitivityError, load_sensitivity
from tests.helpers import tiny_unet

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "spec" / "sensitivity.schema.json").read_text())
FAST = dict(bits=(1, 2), n_prompts=2, n_timesteps=2, steps=4, progress=False)  # ~140 entries, a few seconds


@pytest.fixture(scope="module")
def unet():
    return tiny_unet(seed=1)


@pytest.fixture(scope="module")
def full(unet, tmp_path_factory):
    path = tmp_path_factory.mktemp("sens") / "sens.json"
    sens = an.analyze(unet, out=path, **FAST)
    return path, sens


@pytest.fixture(scope="module")
def small_pipeline(tmp_path_factory):
    """A tiny StableDiffusionPipeline directory (random weights): UNet 8x8, VAE without downsampling,
    a 1-layer CLIP text encoder with tiny-sd's word tokenizer, DDIM scheduler."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from bfq.tinysd.build import load_tokenizer, write_tokenizer

    path = tmp_path_factory.mktemp("pipe")
    tok = load_tokenizer(write_tokenizer(path / "tok"))
    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))  # fmt: skip
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=8)  # fmt: skip
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)  # fmt: skip
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=tiny_unet(seed=2, cross_attention_dim=16),
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)  # fmt: skip
    pipe.save_pretrained(path / "pipe")
    return path / "pipe"


def _errors(sens):
    return {n: e["errors"] for n, e in sens["layers"].items() if "errors" in e}


def test_full_analysis_structure(unet, full):
    path, sens = full
    jsonschema.validate(json.loads(path.read_text()), SCHEMA)
    assert load_sensitivity(path) == json.loads(path.read_text())
    assert sens["complete"] and sens["format"] == "bfq-sensitivity" and sens["version"] == 1
    from bfq.quant.recipe import linear_conv_weights, quantizable_layers

    assert list(sens["layers"]) == list(quantizable_layers(unet))
    assert sens["layers"]["conv_in.weight"] == {"n_weights": unet.conv_in.weight.numel(), "fixed_bits": 8}
    assert sens["accounting"]["n_weights_total"] == sum(linear_conv_weights(unet).values())
    errs = _errors(sens)
    assert all(set(e) == {"1", "2"} for e in errs.values())
    # more bits, less error, for nearly every layer
    better = [e["2"]["mse"] < e["1"]["mse"] for e in errs.values()]
    assert np.mean(better) > 0.9
    s = sens["settings"]
    assert s["conditioning"] == "random" and s["mode"] == "proxy" and s["bits"] == [1, 2]
    assert "entries     142/142 (complete)" in an.format_sensitivity(sens)


def test_model_is_restored(unet, full):
    before = an.model_fingerprint(unet)
    flags = [p.requires_grad for p in unet.parameters()]
    an.analyze(unet, max_entries=3, **FAST)
    assert an.model_fingerprint(unet) == before
    assert [p.requires_grad for p in unet.parameters()] == flags
    assert full[1]["model"]["fingerprint"] == before["fingerprint"]


def test_entry_equals_error_of_the_exported_fake_quantized_model(unet, full):
    """An entry's mse is the error of the UNet with that one layer as `bfq quantize` builds it."""
    from bfq.quant.nn import quantize_unet

    name = "down_blocks.1.resnets.0.conv1.weight"
    settings = full[1]["settings"]
    ctx = _Context(unet, settings, None, torch.device("cpu"), 64)
    ctx.build_proxy()
    q = quantize_unet(copy.deepcopy(unet), {name: 1}, progress=False)
    ctx.unet = q
    metrics = ctx.proxy_metrics(ctx.proxy_outputs())
    assert metrics["mse"] == pytest.approx(full[1]["layers"][name]["errors"]["1"]["mse"], rel=1e-6)


def test_resume_after_kill_is_deterministic(unet, full, tmp_path, monkeypatch):
    path = tmp_path / "s.json"
    calls = {"n": 0}
    original = _Context.proxy_metrics

    def dies_after_five(self, out):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt("simulated kill")
        return original(self, out)

    monkeypatch.setattr(_Context, "proxy_metrics", dies_after_five)
    with pytest.raises(KeyboardInterrupt):
        an.analyze(unet, out=path, **FAST)
    partial = load_sensitivity(path)  # the file on disk is whole and valid
    assert sum(len(e) for e in _errors(partial).values()) == 5 and not partial["complete"]
    monkeypatch.setattr(_Context, "proxy_metrics", original)
    resumed = an.analyze(unet, out=path, max_entries=7, **FAST)  # the run picks up where it died
    assert resumed["timing"]["entries"] == 12 and not resumed["complete"]
    got = _errors(resumed)
    want = _errors(full[1])
    flat = [(n, b) for n, e in got.items() for b in e]
    assert len(flat) == 12 and flat == [(n, b) for n, e in want.items() for b in e][:12]  # layer-major order
    assert all(got[n][b] == want[n][b] for n, b in flat)  # same numbers as one uninterrupted run


def test_finished_file_is_returned_without_running(unet, full, tmp_path, monkeypatch):
    path = tmp_path / "s.json"
    path.write_text(full[0].read_text())
    monkeypatch.setattr(_Context, "build_proxy", lambda self: (_ for _ in ()).throw(AssertionError("reran")))
    assert _errors(an.analyze(unet, out=path, **FAST)) == _errors(full[1])


def test_existing_file_from_other_settings_or_model_is_refused(unet, full, tmp_path):
    path = tmp_path / "s.json"
    path.write_text(full[0].read_text())
    before = path.read_bytes()
    with pytest.raises(SensitivityError, match=r"other settings \(differ: seed\)"):
        an.analyze(unet, out=path, **{**FAST, "seed": 1})
    with pytest.raises(SensitivityError, match="another model"):
        an.analyze(tiny_unet(seed=5), out=path, **FAST)
    path2 = tmp_path / "junk.json"
    path2.write_text("{}")
    with pytest.raises(SensitivityError, match="not a sensitivity file"):
        an.analyze(unet, out=path2, **FAST)
    assert path.read_bytes() == before and path2.read_text() == "{}"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mode="image"), "image mode needs a diffusers pipeline"),
        (dict(mode="fast"), "mode must be one of"),
        (dict(bits=(0, 1)), "bits"),
        (dict(bits=(1, 1)), "distinct"),
        (dict(n_timesteps=9, steps=4), "cannot exceed"),
        (dict(time_cache="nope"), "time_cache"),
    ],
)
def test_bad_settings_write_nothing(unet, tmp_path, kwargs, message):
    path = tmp_path / "s.json"
    with pytest.raises(SensitivityError, match=message):
        an.analyze(unet, out=path, **{**FAST, **kwargs})
    assert not path.exists()


def test_finetune_runs_and_is_recorded(unet):
    a = an.analyze(unet, max_entries=2, **FAST)
    b = an.analyze(unet, max_entries=2, finetune_steps=3, finetune_lr=1e-3, **FAST)
    assert b["settings"]["finetune_steps"] == 3 and b["settings"]["finetune_lr"] == 1e-3
    ea, eb = _errors(a), _errors(b)
    name = next(n for n in eb if eb[n])
    assert np.isfinite(eb[name]["1"]["mse"]) and eb[name]["1"]["mse"] != ea[name]["1"]["mse"]
    assert an.model_fingerprint(unet)["fingerprint"] == a["model"]["fingerprint"]


def test_image_mode_and_text_conditioning(small_pipeline):
    from bfq.pipeline.models import resolve_model

    r = resolve_model(str(small_pipeline))
    kw = dict(base_dir=r.base_dir, scheduler=r.scheduler, bits=(1,), n_prompts=3, steps=2, progress=False, max_entries=2)
    img = an.analyze(r.unet, mode="image", source=r.source, **kw)
    assert img["settings"]["conditioning"] == "text_encoder" and img["settings"]["align"] is None
    assert "CLIP" in img["settings"]["align_note"]
    entry = next(e for e in _errors(img).values() if e)["1"]
    assert set(entry) == {"mse", "psnr"} and entry["mse"] > 0
    assert entry["psnr"] == pytest.approx(10 * np.log10(255**2 / entry["mse"]))
    # as tiny-sd: digit prompts and the digit classifier's alignment drop
    tiny = an.analyze(r.unet, mode="image", source={"kind": "builtin", "name": "tiny-sd"}, **kw)
    assert tiny["settings"]["align"] == "digit-classifier"
    assert len(tiny["settings"]["prompts"]) == 3 and not set(tiny["settings"]["prompts"]) & set(an.DEFAULT_PROMPTS)
    assert set(next(e for e in _errors(tiny).values() if e)["1"]) == {"mse", "psnr", "align_drop"}
    prox = an.analyze(r.unet, source=r.source, n_timesteps=2, **kw)
    assert prox["settings"]["prompts"] and set(next(e for e in _errors(prox).values() if e)["1"]) == {
        "mse", "snr_db", "guidance_err"}  # fmt: skip


def test_timestep_errors_table_and_plot(unet, tmp_path):
    from bfq.quant.nn import quantize_unet
    from bfq.quant.recipe import resolve_recipe

    q = quantize_unet(copy.deepcopy(unet), resolve_recipe("uniform-2", unet).bits, progress=False)
    table = an.timestep_errors(unet, q, n_timesteps=6, n_prompts=2, steps=3)
    assert table["timesteps"] == [0, 200, 400, 599, 799, 999]
    assert all(v > 0 for v in table["eps_mse"]) and len(table["latent_err"]) == 6
    # the x0-error weighting (1-abar)/abar grows with t
    assert table["latent_err"][-1] / table["eps_mse"][-1] > table["latent_err"][0] / table["eps_mse"][0]
    assert "latent_err" in an.format_timestep_table(table)
    pytest.importorskip("matplotlib")
    png = an.plot_timestep_errors(table, tmp_path / "t.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


PIPE_OPTS = dict(bits=(1, 2), n_prompts=2, steps=3, n_timesteps=2)


@pytest.fixture(scope="module")
def pipe_cache(small_pipeline, tmp_path_factory):
    """recipe_for_budget on the small pipeline: runs (and caches) its analysis once for the module."""
    from bfq.pipeline.models import resolve_model

    cache = tmp_path_factory.mktemp("cache")
    r = resolve_model(str(small_pipeline))
    recipe, why = recipe_for_budget(r.unet, 4.0, resolved=r, n_time_features=1234, cache_dir=cache,
                                    analysis_options=PIPE_OPTS, progress=False)  # fmt: skip
    (path,) = cache.glob("sensitivity-*.json")
    from bfq.pipeline.analyze import analysis_cache_path

    assert analysis_cache_path(r.unet, resolved=r, cache_dir=cache, analysis_options=PIPE_OPTS) == path
    return r, cache, path, recipe, why


def _inspect_avg(path):
    from bfq.format.inspect import summarize

    return summarize(path)["avg_bits"]


def test_cli_analyze_allocate_quantize_inspect_agree(small_pipeline, pipe_cache, tmp_path):
    """The acceptance chain: the average bits `bfq allocate` prints is what `bfq inspect` reports."""
    from bfq_cli.main import main

    from bfq.pipeline.quantize import quantize

    runner = CliRunner()
    sens = tmp_path / "sens.json"
    sens.write_text(pipe_cache[2].read_text())  # same settings as the CLI call below: it resumes a finished file
    plot = ["--timestep-plot", str(tmp_path / "t.png")] if importlib.util.find_spec("matplotlib") else []
    r = runner.invoke(main, ["analyze", str(small_pipeline), "-o", str(sens), "--bits", "1,2", "--prompts", "2",
                             "--steps", "3", "--timesteps", "2", "--cache-steps", "10", "--quiet",
                             "--timestep-table", str(tmp_path / "t.json"), *plot])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "entries     142/142 (complete)" in r.output and (tmp_path / "t.png").is_file() == bool(plot)
    assert load_sensitivity(sens)["accounting"]["cache_steps"] == 10
    assert json.loads((tmp_path / "t.json").read_text())["recipe"] == "uniform-2"
    for method in ("paper", "optimal", "size-only"):
        recipe = tmp_path / f"{method}.json"
        budget = 4.0
        r = runner.invoke(main, ["allocate", str(sens), "--bits", str(budget), "--method", method, "-o", str(recipe),
                                 "--json", "--model", str(small_pipeline)])  # fmt: skip
        assert r.exit_code == 0, r.output
        reported = json.loads(r.output)["avg_bits"]
        assert reported <= budget
        out = tmp_path / f"{method}.bfq"
        quantize(str(small_pipeline), out, recipe=str(recipe), steps=10, progress=False)
        assert _inspect_avg(out) == reported  # exactly


def test_recipe_for_budget_caches_and_checks(pipe_cache, tmp_path, monkeypatch):
    from bfq.pipeline.allocate import DEFAULT_ALLOCATOR
    from bfq.quant.recipe import summarize

    r, cache, cached, recipe, why = pipe_cache
    kw = dict(resolved=r, n_time_features=1234, cache_dir=cache, analysis_options=PIPE_OPTS, progress=False)
    assert summarize(recipe, r.unet, "scheduler", 1234)["avg_bits"] <= 4.0
    assert f"{DEFAULT_ALLOCATOR} allocation for 4 bits" in why and "proxy mode" in why
    assert f"cached as {cached.name}" in why and str(cached.parent) not in why  # nothing local in a .bfq's note
    # a second call reuses the cache (running the model would fail now)
    monkeypatch.setattr(_Context, "build_proxy", lambda self: (_ for _ in ()).throw(AssertionError("reran")))
    again, _ = recipe_for_budget(r.unet, 4.0, **kw)
    assert again.bits == recipe.bits
    paper, why = recipe_for_budget(r.unet, 4.0, method="paper", **kw)
    assert "paper" in why and summarize(paper, r.unet, "scheduler", 1234)["avg_bits"] <= 4.0
    # given file from another model, NaN errors, impossible budget: clear errors
    doc = json.loads(cached.read_text())
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**doc, "model": {**doc["model"], "fingerprint": "0" * 64, "weights_sha256": "0" * 64}}))
    with pytest.raises(SensitivityError, match="another model: same layer names and shapes but different weights"):
        recipe_for_budget(r.unet, 4.0, sensitivity=other, n_time_features=1234)
    name = next(n for n, e in doc["layers"].items() if "errors" in e)
    doc["layers"][name]["errors"]["1"]["mse"] = float("nan")
    nan = tmp_path / "nan.json"
    nan.write_text(json.dumps(doc))
    with pytest.raises(SensitivityError, match="non-finite"):
        recipe_for_budget(r.unet, 4.0, sensitivity=nan, n_time_features=1234)
    with pytest.raises(SensitivityError, match="below what all-1-bit"):
        recipe_for_budget(r.unet, 0.5, **kw)
    with pytest.raises(SensitivityError, match="missing layers"):  # grid mode needs the time projections
        recipe_for_budget(r.unet, 4.0, sensitivity=cached, time_cache="grid", n_time_features=1234)
