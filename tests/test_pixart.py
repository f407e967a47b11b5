"""PixArt (diffusion transformers with adaLN-single): the exact time cache, random and lazy builds,
the DiT model kind of the format (FORMAT.md §2.3.2), quantize -> export -> load, packed = dense."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers import PixArtTransformer2DModel

from bfq.families.pixart import FAMILY, pixart_test_config
from bfq.quant import timecache as tc

torch.set_num_threads(1)

STEPS = 5


def tiny_pixart(seed: int = 0, **overrides) -> PixArtTransformer2DModel:
    """A seeded tiny PixArtTransformer2DModel whose every weight matters (N(0, 0.1^2), norms ~1)."""
    torch.manual_seed(seed)
    model = PixArtTransformer2DModel.from_config(pixart_test_config(**overrides))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _timesteps() -> list[float]:
    return tc.scheduler_timesteps(FAMILY.scheduler(), STEPS)


def _run(model, x, t, cond):
    with torch.no_grad():
        return model(x, timestep=torch.full((x.shape[0],), float(t)), return_dict=False, **cond)[0]


def _fp16_hook(captured: dict):
    """Round what the hooked module returns to fp16, where the cache stores it, and keep it."""

    def hook(mod, args, out):
        rounded = tuple(o.half().to(o.dtype) for o in out) if isinstance(out, tuple) else out.half().to(out.dtype)
        captured["out"] = rounded
        return rounded

    return hook


CACHE_CASES = {
    "sigma (learned variance)": {},
    "size conditions (embedding cache)": {"use_additional_conditions": True},
    "out_channels 4": {"out_channels": 4},
}


@pytest.mark.parametrize("overrides", CACHE_CASES.values(), ids=CACHE_CASES.keys())
def test_cached_model_equals_the_float_time_path_at_every_step(overrides):
    """At every cached step the cached rows are the float time path's outputs rounded to fp16 (to 1 fp16
    ulp: the cache computes them in one batch of T, a forward in a batch of B, and BLAS may round the
    two differently), and the model's output equals that of the float model whose time path is
    rounded to fp16 (rtol 1e-4 against the output's scale), far closer than to another step's output."""
    model, ts = tiny_pixart(1, **overrides), _timesteps()
    cfg = dict(model.config)
    ref, captured = copy.deepcopy(model), {}
    cache = tc.build_cache(model, "scheduler", FAMILY.scheduler(), STEPS)
    sized = "use_additional_conditions" in overrides
    assert set(cache["tables"]) == ({"time_embedding"} if sized else {"adaln_single.linear", "adaln_single.emb"})
    if sized:
        ref.adaln_single.emb.timestep_embedder.register_forward_hook(_fp16_hook(captured))
        tc.install_embedding_cache(model, cache["timesteps"], cache["tables"]["time_embedding"])
        assert [k for k in model.state_dict() if "timestep_embedder" in k] == ["adaln_single.emb.timestep_embedder.table"]
        assert "adaln_single.linear.weight" in model.state_dict()  # the size embedders and linear stay
    else:
        ref.adaln_single.register_forward_hook(_fp16_hook(captured))
        tc.install_scheduler_cache(model, cache["timesteps"], cache["tables"])
        assert [k for k in model.state_dict() if k.startswith("adaln_single")] == [
            "adaln_single.linear.features", "adaln_single.emb.features"]  # fmt: skip
    assert tc.time_cache_mode(model) == "scheduler"
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    cond = FAMILY.conditioning(cfg, 2, seq_len=6, generator=torch.Generator().manual_seed(3))
    outputs = []
    for j, t in enumerate(ts):
        got, want = _run(model, x, t, cond), _run(ref, x, t, cond)
        rows = captured["out"] if isinstance(captured["out"], tuple) else (captured["out"],)
        for table, row in zip(cache["tables"].values(), rows):
            stored = torch.from_numpy(np.asarray(table[j])).float()
            ulp = torch.finfo(torch.float16).eps * row[0].abs().clamp(min=2**-14)
            assert ((stored - row[0]).abs() <= ulp).all()
        scale = want.abs().max()
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * float(scale))
        outputs.append(got)
    gaps = [float((a - b).abs().max()) for a, b in zip(outputs, outputs[1:])]
    assert min(gaps) > 1e-2 * float(outputs[0].abs().max())  # a wrong row would be caught


def test_embedding_cache_is_exact_for_every_image_size():
    """With size conditions only the timestep MLP is cached: any resolution and aspect ratio gives the
    float path's output (the size embedders run live), bit for bit."""
    model = tiny_pixart(2, use_additional_conditions=True)
    ref, captured = copy.deepcopy(model), {}
    ref.adaln_single.emb.timestep_embedder.register_forward_hook(_fp16_hook(captured))
    ts = _timesteps()
    tc.install_embedding_cache(model, ts, tc.compute_embedding_table(model, ts))
    for h, w in [(8, 8), (6, 10), (12, 4)]:
        x = torch.randn(1, 4, h, w)
        cond = FAMILY.conditioning(dict(model.config), 1, height=h, width=w, seq_len=3)
        torch.testing.assert_close(_run(model, x, ts[2], cond), _run(ref, x, ts[2], cond), rtol=0, atol=0)


def test_unknown_timestep_is_refused():
    model = tiny_pixart(3)
    ts = _timesteps()
    tc.install_scheduler_cache(model, ts, tc.compute_scheduler_features(model, ts))
    x = torch.randn(2, 4, 8, 8)
    cond = FAMILY.conditioning(dict(model.config), 2, seq_len=3)
    with pytest.raises(ValueError, match="not in the time-feature cache"):
        _run(model, x, ts[0] + 0.5, cond)
    with pytest.raises(ValueError, match="not in the time-feature cache"):  # the sample passed by keyword
        with torch.no_grad():
            model(hidden_states=x, timestep=torch.tensor([ts[0], 3.0]), **cond)


def test_features_refused_with_size_conditions_and_validated():
    sized = tiny_pixart(4, use_additional_conditions=True)
    with pytest.raises(ValueError, match="size conditions"):
        tc.compute_scheduler_features(sized, [999])
    model, ts = tiny_pixart(4), _timesteps()
    feats = tc.compute_scheduler_features(model, ts)
    assert {k: tuple(v.shape) for k, v in feats.items()} == {"adaln_single.linear": (STEPS, 288),
                                                              "adaln_single.emb": (STEPS, 48)}  # fmt: skip
    assert tc.n_time_features(model, "scheduler", STEPS) == STEPS * 7 * 48
    with pytest.raises(ValueError, match="missing"):
        tc.install_scheduler_cache(copy.deepcopy(model), ts, {"adaln_single.linear": feats["adaln_single.linear"]})
    with pytest.raises(ValueError, match="shape"):
        tc.install_scheduler_cache(copy.deepcopy(model), ts[:-1], feats)
    with pytest.raises(ValueError, match="grid time tables"):
        tc.install_grid_cache(copy.deepcopy(model), np.zeros((1000, 48), np.float16))


def test_grid_mode_keeps_the_timestep_mlp_and_the_recipe_skips_it():
    from bfq.quant.recipe import quantizable_layers

    model = tiny_pixart(5)
    weights = tc.time_mlp_weights(model)
    assert sorted(weights) == ["adaln_single.emb.timestep_embedder.linear_1.weight",
                               "adaln_single.emb.timestep_embedder.linear_2.weight"]  # fmt: skip
    assert tc.n_time_features(model, "grid", 1000) == 256 * 48 + 48 * 48
    grid = quantizable_layers(model, "grid")
    sched = quantizable_layers(model, "scheduler")
    assert "adaln_single.linear.weight" in grid and not any(n.startswith("adaln_single") for n in sched)
    assert not any("timestep_embedder" in n for n in grid)
    assert {"pos_embed.proj.weight", "caption_projection.linear_1.weight", "proj_out.weight"} <= set(sched)


def test_random_pixart_is_built_lazily_with_its_buffers_and_tables():
    """pixart-random's per-parameter streams: scale_shift_table ~ N(0, 1)/sqrt(width), the sin-cos
    pos_embed buffer computed (not zeros); lazy, full and one-stream builds agree with diffusers' buffer."""
    from bfq.families.build import build_random_unet
    from bfq.families.lazy import full_unet, lazy_unet, materialized, random_source

    cfg = pixart_test_config()
    lazy, full = lazy_unet(cfg, random_source(cfg, 0)), full_unet(cfg, random_source(cfg, 0))
    plain = PixArtTransformer2DModel.from_config(cfg)
    for m in (lazy, full, build_random_unet(cfg, 0)):
        assert torch.equal(m.pos_embed.pos_embed, plain.pos_embed.pos_embed) and m.pos_embed.pos_embed.abs().sum() > 0
    assert lazy.transformer_blocks[0].attn1.to_q.weight.is_meta
    big = random_source(FAMILY.config(), 0)("transformer_blocks.3.scale_shift_table")
    assert big.shape == (6, 1152) and abs(float(big.std()) * 1152**0.5 - 1) < 0.05
    x = torch.randn(2, 4, 8, 8)
    cond = FAMILY.conditioning(cfg, 2, seq_len=4)
    with materialized(lazy):
        torch.testing.assert_close(_run(lazy, x, 10, cond), _run(full, x, 10, cond), rtol=0, atol=0)


# ------------------------------------------------------------------------- quantize, export, load


def _pipeline_folder(root, model) -> str:
    """A diffusers PixArt pipeline folder holding ``model`` (component ``transformer``) and its scheduler."""
    import json

    model.save_pretrained(root / "transformer")
    FAMILY.scheduler().save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "PixArtSigmaPipeline", "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
        "transformer": ["diffusers", "PixArtTransformer2DModel"]}))  # fmt: skip
    return str(root)


@pytest.fixture(scope="module")
def quantized_files(tmp_path_factory):
    from bfq.pipeline.quantize import quantize

    root = tmp_path_factory.mktemp("pixart")
    out = {}
    for label, overrides, mode in [("scheduler", {}, "scheduler"), ("grid", {}, "grid"),
                                   ("sized", {"use_additional_conditions": True}, "scheduler")]:  # fmt: skip
        folder = _pipeline_folder(root / f"pipe-{label}", tiny_pixart(6, **overrides))
        out[label] = quantize(folder, root / f"{label}.bfq", recipe="uniform-2", time_cache=mode, steps=STEPS,
                              progress=False).path  # fmt: skip
    return out


def test_files_hold_the_cache_the_model_kind_specifies(quantized_files):
    from bfq.format import open_bfq

    with open_bfq(quantized_files["scheduler"]) as f:
        assert f.header.model["class_name"] == "PixArtTransformer2DModel"
        assert {k: t.shape for k, t in f.header.time_cache.tables.items()} == {
            "adaln_single.linear": (STEPS, 288), "adaln_single.emb": (STEPS, 48)}  # fmt: skip
        assert not any(n.startswith("adaln_single") for n in [*f.layers, *f.tensors])
        assert "scale_shift_table" in f.tensors and "pos_embed.pos_embed" not in f.tensors  # a computed buffer
    with open_bfq(quantized_files["sized"]) as f:
        assert set(f.header.time_cache.tables) == {"time_embedding"} and f.header.time_cache.tables["time_embedding"].shape == (STEPS, 48)
        assert "adaln_single.linear.weight" in f.layers and "adaln_single.emb.resolution_embedder.linear_1.weight" in f.layers
        assert not any("timestep_embedder" in n for n in [*f.layers, *f.tensors])
    with open_bfq(quantized_files["grid"]) as f:
        assert f.header.time_cache is None and "adaln_single.linear.weight" in f.layers
        assert f.tensors["adaln_single.emb.timestep_embedder.linear_1.weight"].dtype == "f16"


@pytest.mark.parametrize("label", ["scheduler", "grid", "sized"])
def test_packed_equals_dense_and_the_file_builds(quantized_files, label):
    import bfq
    from bfq.runtime.load import load_unet

    path = quantized_files[label]
    packed, dense = load_unet(path, runtime="packed"), bfq.load_transformer(path, runtime="dense")
    assert type(packed).__name__ == type(dense).__name__ == "PixArtTransformer2DModel"
    assert packed.pos_embed.pos_embed.abs().sum() > 0 and not packed.pos_embed.pos_embed.is_meta
    x = torch.randn(2, 4, 8, 8)
    cond = FAMILY.conditioning(dict(packed.config), 2, seq_len=4)
    for t in _timesteps()[::2]:
        torch.testing.assert_close(_run(packed, x, t, cond), _run(dense, x, t, cond), rtol=0, atol=0)
    if label != "grid":
        with pytest.raises(ValueError, match="not in the time-feature cache"):
            _run(packed, x, 1.5, cond)
    assert tc.time_cache_mode(packed) == (None if label == "grid" else "scheduler")


def test_loader_checks_the_cache_against_the_model(tmp_path):
    """§2.3.2: a features cache whose width D is not the model's width is refused (a check against the
    model, the header alone cannot make it); so are timesteps the file does not list."""
    from bfq import BfqFormatError
    from bfq.pipeline.export import export_unet
    from bfq.runtime.load import load_unet

    model, ts = tiny_pixart(7), _timesteps()
    narrow = {"adaln_single.linear": np.zeros((STEPS, 6 * 24), np.float16), "adaln_single.emb": np.zeros((STEPS, 24), np.float16)}
    path = export_unet(model, tmp_path / "narrow.bfq", time_cache={"mode": "scheduler", "timesteps": ts, "tables": narrow},
                       progress=False)  # fmt: skip
    with pytest.raises(BfqFormatError, match="time_cache: does not fit the model.*adaln_single"):
        load_unet(path)
    path = export_unet(model, tmp_path / "ok.bfq", time_cache=tc.build_cache(model, "scheduler", FAMILY.scheduler(), STEPS),
                       progress=False)  # fmt: skip
    loaded = load_unet(path, runtime="dense")
    x, cond = torch.randn(1, 4, 8, 8), FAMILY.conditioning(dict(model.config), 1, seq_len=2)
    ref = copy.deepcopy(model)
    tc.install_scheduler_cache(ref, ts, tc.compute_scheduler_features(model, ts))
    torch.testing.assert_close(_run(loaded, x, ts[3], cond), _run(ref, x, ts[3], cond), rtol=0, atol=0)


def test_diffusers_layout_loads_through_from_pretrained(quantized_files, tmp_path):
    """Appendix A: the component folder is transformer/; diffusers' own from_pretrained loads it (packed)."""
    import bfq  # noqa: F401  (registers the quantizer)
    from bfq.format import open_bfq
    from bfq.format.diffusers_layout import write_layout

    with open_bfq(quantized_files["scheduler"]) as f:
        folder = write_layout(f, tmp_path / "layout", FAMILY.component)
    assert folder.name == "transformer"
    model = PixArtTransformer2DModel.from_pretrained(tmp_path / "layout", subfolder="transformer")
    dense = bfq.load_transformer(quantized_files["scheduler"], runtime="dense")
    x, cond = torch.randn(2, 4, 8, 8), FAMILY.conditioning(dict(dense.config), 2, seq_len=3)
    torch.testing.assert_close(_run(model, x, _timesteps()[0], cond), _run(dense, x, _timesteps()[0], cond), rtol=0, atol=0)
    model.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "diffusion_pytorch_model.safetensors").read_bytes() == (
        folder / "diffusion_pytorch_model.safetensors").read_bytes()  # fmt: skip


def test_pixart_builtin_downloads_the_transformer_only(tmp_path, monkeypatch):
    """`pixart` (the family's Hub built-in) from the local fake Hub: a model-only repo (transformer/, as
    PixArt-Σ 512's, here with a legacy Transformer2DModel config); only transformer/ is downloaded and
    the family's DPM-Solver scheduler serves the scheduler cache."""
    import json

    from bfq_cli.main import main
    from click.testing import CliRunner

    from bfq.format import open_bfq
    from bfq.pipeline.models import resolve_model
    from tests.hub_server import FakeHub, point_client_at

    folder = tmp_path / "transformer"
    tiny_pixart(8).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["_class_name"] = "Transformer2DModel"  # older PixArt repos; diffusers loads them as PixArtTransformer2DModel
    files = {f"transformer/{p.name}": p.read_bytes() for p in folder.iterdir()}
    files["transformer/config.json"] = json.dumps(config).encode()
    files["text_encoder/model.safetensors"] = files["vae/diffusion_pytorch_model.safetensors"] = b"\0never" * 64
    with FakeHub() as hub:
        point_client_at(monkeypatch, hub.url, tmp_path / "hf-home")
        hub.add_repo(FAMILY.hub_repo, files)
        resolved = resolve_model("pixart")
        assert type(resolved.unet).__name__ == "PixArtTransformer2DModel" and resolved.family is FAMILY
        assert type(resolved.scheduler).__name__ == "DPMSolverMultistepScheduler"
        out = tmp_path / "p.bfq"
        r = CliRunner().invoke(main, ["quantize", "pixart", "--recipe", "uniform-2", "--steps", "4", "-o", str(out), "--quiet"])
        assert r.exit_code == 0, r.output
        got = {c.path.split("/resolve/", 1)[1].split("/", 1)[1] for c in hub.calls("GET", r"/resolve/")}
    assert got == {"transformer/config.json", "transformer/diffusion_pytorch_model.safetensors"}
    with open_bfq(out) as f:
        assert f.header.model["source"]["repo"] == FAMILY.hub_repo and f.header.model["class_name"] == "PixArtTransformer2DModel"
        assert len(f.header.time_cache.timesteps) == 4 and set(f.header.time_cache.tables) == {"adaln_single.linear", "adaln_single.emb"}


def test_inspect_and_verify_a_pixart_file(quantized_files):
    import json

    from bfq_cli.main import main
    from click.testing import CliRunner

    runner = CliRunner()
    r = runner.invoke(main, ["verify", "--build", str(quantized_files["scheduler"])])
    assert r.exit_code == 0 and "PixArtTransformer2DModel" in r.output, r.output
    r = runner.invoke(main, ["inspect", "--json", str(quantized_files["sized"])])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["model"]["class_name"] == "PixArtTransformer2DModel"


def test_quantize_on_load_through_diffusers(tmp_path):
    """``PixArtTransformer2DModel.from_pretrained(float folder, quantization_config=bfq.BfqConfig(...))``
    quantizes as `bfq quantize` does, with the pipeline's scheduler for the cache."""
    import bfq

    folder = _pipeline_folder(tmp_path / "pipe", tiny_pixart(9))
    model = PixArtTransformer2DModel.from_pretrained(folder, subfolder="transformer",
                                                     quantization_config=bfq.BfqConfig(recipe="uniform-2", steps=STEPS))  # fmt: skip
    assert tc.time_cache_mode(model) == "scheduler" and type(model.proj_out).__name__ == "PackedLinear"
    from bfq.pipeline.quantize import quantize

    path = quantize(folder, tmp_path / "same.bfq", recipe="uniform-2", steps=STEPS, progress=False).path
    dense = bfq.load_transformer(path, runtime="dense")
    x, cond = torch.randn(2, 4, 8, 8), FAMILY.conditioning(dict(dense.config), 2, seq_len=3)
    torch.testing.assert_close(_run(model, x, _timesteps()[1], cond), _run(dense, x, _timesteps()[1], cond), rtol=0, atol=0)
