"""Issue 14, defects 5 and 6, end to end through a .bfq file.

5: every weight stored in a file is counted, in `avg_bits` and `bits_on_disk`, by `bfq inspect` and
   by the recipe summary the quantizer writes (FORMAT.md §2.4).
6: grid mode keeps the time MLP, so the time embedding is exact at fractional timesteps; files
   with grid tables (bfq 0.1) still load, and every table keeps its stored precision on load.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import tiny_inputs, tiny_unet

import bfq
from bfq.format import open_bfq
from bfq.format.inspect import summarize as inspect
from bfq.pipeline.export import export_finetuned
from bfq.pipeline.quantize import quantize
from bfq.quant.nn import iter_quantized, quantize_unet
from bfq.quant.recipe import linear_conv_weights, uniform_recipe
from bfq.quant.timecache import compute_grid_table

torch.set_num_threads(1)


def _student(recipe_mode: str, seed: int = 5):
    unet = tiny_unet(seed=seed)
    quantize_unet(unet, uniform_recipe(unet, 2, time_cache=recipe_mode).bits, progress=False)
    return unet


def _independent_accounting(path, n_w: int) -> tuple[float, float]:
    """avg_bits and bits_on_disk from FORMAT.md §2.4, computed here from the file's own entries."""
    with open_bfq(path) as f:
        ideal = sum(math.log2(layer.num_levels) * layer.size for layer in f.layers.values())
        disk = sum(8 * layer.nbytes for layer in f.layers.values())
        floats = sum(8 * t.block.length for n, t in f.tensors.items() if n.endswith(".weight") and len(t.shape) >= 2)
        cache = f.header.time_cache
        floats += sum(8 * t.block.length for t in cache.tables.values()) if cache else 0
    return (ideal + floats) / n_w, (disk + floats) / n_w


def _recipe(path) -> dict:
    with open_bfq(path) as f:
        return f.header.recipe


def test_grid_export_of_a_scheduler_recipe_counts_the_dense_time_projections(tmp_path):
    """Defect 5: the 8 time_emb_proj layers stay float32 in the file; both figures count them."""
    student = _student("scheduler")
    out = export_finetuned(student, tmp_path / "g.bfq", time_cache="grid", progress=False)
    weights = linear_conv_weights(student)
    proj = {n: c for n, c in weights.items() if "time_emb_proj" in n}
    mlp = {n: c for n, c in weights.items() if n.startswith("time_embedding.")}
    with open_bfq(out) as f:
        assert {f.tensors[n].dtype for n in proj} == {"f32"} and {f.tensors[n].dtype for n in mlp} == {"f16"}
        quantized = {n: layer for n, layer in f.layers.items()}
    assert set(quantized) | set(proj) | set(mlp) == set(weights)
    n_w = sum(weights.values())
    paper = sum(math.log2(layer.num_levels) * layer.size for layer in quantized.values())
    want_avg = (paper + 32 * sum(proj.values()) + 16 * sum(mlp.values())) / n_w
    summary = inspect(out)
    recipe = _recipe(out)
    assert recipe["n_dense_weights"] == sum(proj.values())
    assert recipe["avg_bits"] == pytest.approx(want_avg, rel=1e-12)
    assert summary["avg_bits"] == pytest.approx(want_avg, rel=1e-12)
    assert summary["n_weights_total"] == n_w
    want_disk = (sum(8 * layer.nbytes for layer in quantized.values()) + 32 * sum(proj.values()) + 16 * sum(mlp.values())) / n_w
    assert summary["bits_on_disk"] == pytest.approx(want_disk, rel=1e-12)


@pytest.mark.parametrize("time_cache, dense_dtype", [(None, "f32"), ("grid", "f16"), ("scheduler", "f32")])
def test_export_accounting_matches_the_file(tmp_path, time_cache, dense_dtype):
    from diffusers import DDIMScheduler

    student = _student("grid" if time_cache != "scheduler" else "scheduler")
    out = export_finetuned(student, tmp_path / "e.bfq", time_cache=time_cache, scheduler=DDIMScheduler(), steps=5,
                           dense_dtype=dense_dtype, progress=False)  # fmt: skip
    n_w = sum(linear_conv_weights(student).values())
    avg, disk = _independent_accounting(out, n_w)
    summary = inspect(out)
    assert _recipe(out)["avg_bits"] == pytest.approx(avg, rel=1e-12) == summary["avg_bits"]
    assert summary["bits_on_disk"] == pytest.approx(disk, rel=1e-12)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    from diffusers import DDIMScheduler

    path = tmp_path_factory.mktemp("pipe")
    tiny_unet(seed=4).save_pretrained(path / "unet")
    DDIMScheduler(num_train_timesteps=1000).save_pretrained(path / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "scheduler": ["diffusers", "DDIMScheduler"]}  # fmt: skip
    (path / "model_index.json").write_text(json.dumps(index))
    return path


@pytest.mark.parametrize("mode", ["grid", "scheduler"])
def test_quantizer_summary_matches_the_file(pipeline_dir, tmp_path, mode):
    result = quantize(str(pipeline_dir), tmp_path / "q.bfq", recipe="uniform-3", time_cache=mode, steps=4, progress=False)
    avg, disk = _independent_accounting(result.path, result.summary["n_weights_total"])
    assert result.summary["avg_bits"] == pytest.approx(avg, rel=1e-12) == inspect(result.path)["avg_bits"]
    assert inspect(result.path)["bits_on_disk"] == pytest.approx(disk, rel=1e-12)


# ---------------------------------------------------------------------------------- defect 6


def _embedding(unet, t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return unet.time_embedding(unet.time_proj(t).float())


def test_grid_mode_is_exact_at_fractional_timesteps(pipeline_dir, tmp_path):
    result = quantize(str(pipeline_dir), tmp_path / "g.bfq", recipe="uniform-2", time_cache="grid", progress=False)
    with open_bfq(result.path) as f:
        assert f.header.time_cache is None  # nothing interpolated: the time MLP itself is in the file
        assert {f.tensors[n].dtype for n in f.tensors if n.startswith("time_embedding.") and n.endswith(".weight")} == {"f16"}
    loaded = bfq.load_unet(result.path, dtype=torch.float32)
    from bfq.pipeline.models import resolve_model

    ref = resolve_model(str(pipeline_dir)).unet
    rounded = resolve_model(str(pipeline_dir)).unet  # the float model with its time MLP weights in fp16
    with torch.no_grad():
        for name, p in rounded.time_embedding.named_parameters():
            if name.endswith("weight"):
                p.copy_(p.half().float())
    t = torch.arange(0, 999, dtype=torch.float64) + torch.tensor([0.5, 0.25, 0.9]).repeat(333).double()
    got, want = _embedding(loaded, t), _embedding(ref, t)
    assert torch.equal(got, _embedding(rounded, t))  # the same function at every t
    rel = ((got - want).norm(dim=1) / want.norm(dim=1)).max().item()
    table = compute_grid_table(ref).float()  # what grid mode stored before: linear interpolation
    i0, frac = t.floor().long(), (t - t.floor()).float()[:, None]
    interp = table[i0] * (1 - frac) + table[i0 + 1] * frac
    rel_interp = ((interp - want).norm(dim=1) / want.norm(dim=1)).max().item()
    assert rel < 1e-3 and rel < rel_interp / 10, (rel, rel_interp)
    # and the whole UNet at a fractional timestep, against the fake-quantized float model
    quantize_unet(ref, result.recipe.bits, progress=False)
    sample, ehs = tiny_inputs(ref)
    with torch.no_grad():
        for step in (980.7, 500.5, 3.25):
            torch.testing.assert_close(loaded(sample, step, ehs).sample, ref(sample, step, ehs).sample, rtol=2e-3, atol=2e-3)


def _write_with_cache(unet, path, mode: str, timesteps, tables: dict, dtype: str = "f16"):
    """A file as bfq 0.1 wrote grid files, or with a scheduler cache: tables of any stored dtype."""
    from bfq.format import BfqWriter
    from bfq.format.constants import replaced_by_time_cache

    config = json.loads(json.dumps({k: v for k, v in dict(unet.config).items() if not k.startswith("_")}))
    quantized = dict(iter_quantized(unet))
    skip = set(quantized) | {n[: -len("weight")] + "scale" for n in quantized}
    with BfqWriter(path, model={"class_name": "UNet2DConditionModel", "config": config}) as w:
        for name, m in quantized.items():
            q, s = m.export_codes()
            w.add_layer(name, q.numpy(), s.detach().numpy(), m.bits, scale_dtype=m.scale_dtype)
        for name, tensor in unet.state_dict().items():
            if name not in skip and not replaced_by_time_cache(name, mode):
                w.add_tensor(name, tensor.detach().numpy())
        w.set_time_cache(mode, timesteps, tables, dtype=dtype)
    return path


def test_bfq_0_1_grid_files_still_load(tmp_path):
    """A version-1 grid table (as bfq 0.1 wrote it, timesteps as 0.0, 1.0, ...) is read and served."""
    unet = _student("grid", seed=6)
    table = compute_grid_table(unet, 1000)
    path = _write_with_cache(unet, tmp_path / "old.bfq", "grid", range(1000), {"time_embedding": table.numpy()})
    assert b'"timesteps":[0.0,1.0,' in path.read_bytes()
    loaded = bfq.load_unet(path, dtype=torch.float32)
    captured = []
    loaded.time_embedding.register_forward_hook(lambda m, i, o: captured.append(o))
    sample, ehs = tiny_inputs(loaded)
    with torch.no_grad():
        out = loaded(sample, torch.tensor([10.0, 10.5]), ehs).sample
    got = captured[-1]
    assert torch.equal(got[0], table[10].float())
    assert torch.allclose(got[1], (table[10].float() + table[11].float()) / 2)
    assert np.isfinite(out.numpy()).all()


@pytest.mark.parametrize("stored, torch_dtype", [("f32", torch.float32), ("bf16", torch.bfloat16)])
def test_load_keeps_time_tables_at_their_stored_precision(tmp_path, stored, torch_dtype):
    """FORMAT.md §2.3 (review item 31): bfq 0.1 rounded every table to fp16 (and read bf16 bit
    patterns as integers); an fp16 model keeps the stored table and casts a row where it is used."""
    from bfq.quant.timecache import compute_scheduler_features

    unet = _student("scheduler", seed=7)
    feats = compute_scheduler_features(unet, [999, 500.5])
    feats = {n: (f.float() * 3000 + 2**-12).to(torch_dtype) for n, f in feats.items()}  # beyond fp16 precision/range
    arrays = {n: f.view(torch.int16).numpy().view(np.uint16) if stored == "bf16" else f.numpy() for n, f in feats.items()}
    path = _write_with_cache(unet, tmp_path / "t.bfq", "scheduler", [999, 500.5], arrays, dtype=stored)
    loaded = bfq.load_unet(path, dtype=torch.float16)
    for name, module in loaded.named_modules():
        if name in feats:
            kept = module.time_emb_proj.features
            assert kept.dtype == torch_dtype and torch.equal(kept, feats[name]), name
