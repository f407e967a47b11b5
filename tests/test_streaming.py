"""Converting layer by layer (issue 19): lazy UNets (bfq.families.lazy), quantize_and_export, and the
local analysis mode, on small models (the memory figures for sdxl-random are in the README)."""

from __future__ import annotations

import hashlib
import json
import weakref
from pathlib import Path

import jsonschema
import pytest
import torch

from bfq.families import sdxl
from bfq.families.lazy import filled, full_unet, is_lazy, lazy_unet, materialized, random_source, weight_of
from bfq.format import open_bfq
from bfq.pipeline.analyze import analyze
from bfq.pipeline.export import quantize_and_export
from bfq.pipeline.quantize import default_analysis_mode, quantize
from bfq.quant import recipe as recipes

torch.set_num_threads(1)


class CountingSource:
    """A weight source that tracks how many of the tensors it returned are alive at once."""

    def __init__(self, source):
        self.source, self.live, self.max_live, self.calls = source, weakref.WeakSet(), 0, 0

    def __call__(self, name):
        t = self.source(name)
        self.calls += 1
        self.live.add(t)
        self.max_live = max(self.max_live, len(self.live))
        return t


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_lazy_unet_has_the_same_weights_and_outputs_as_the_full_one():
    cfg = sdxl.sdxl_test_config()
    src = random_source(cfg, 3)
    lazy, full = lazy_unet(cfg, src), full_unet(cfg, src)
    assert is_lazy(lazy) and not is_lazy(full)
    big = [n for n, p in lazy.named_parameters() if p.dim() > 1]
    assert big and all(lazy.get_parameter(n).device.type == "meta" for n in big)
    assert all(torch.equal(weight_of(lazy, n), p) for n, p in full.named_parameters())
    other = random_source(cfg, 4)("conv_in.weight")
    assert not torch.equal(other, full.conv_in.weight)
    cond = sdxl.FAMILY.conditioning(dict(full.config), 2)
    x = torch.randn(2, cfg["in_channels"], cfg["sample_size"], cfg["sample_size"])
    t = torch.tensor([10, 500])
    with torch.no_grad(), materialized(lazy):
        y_lazy = sdxl.FAMILY.forward(lazy, x, t, cond)
    y_full = sdxl.FAMILY.forward(full, x, t, cond)
    assert torch.equal(y_lazy, y_full)
    assert all(lazy.get_parameter(n).device.type == "meta" for n in big)  # dropped again after the forward
    with filled(lazy, lambda n: "time_emb" in n):
        assert lazy.time_embedding.linear_1.weight.device.type == "cpu"
        assert lazy.conv_in.weight.device.type == "meta"
    assert lazy.time_embedding.linear_1.weight.device.type == "meta"


def test_quantize_and_export_of_a_lazy_unet_holds_one_layer_and_writes_the_same_file(tmp_path):
    cfg = sdxl.sdxl_test_config()
    counting = CountingSource(random_source(cfg, 1))
    lazy = lazy_unet(cfg, counting)
    full = full_unet(cfg, random_source(cfg, 1))
    plan = recipes.resolve_recipe("uniform-2", full, "grid", None, None)
    counting.calls = counting.max_live = 0
    quantize_and_export(lazy, tmp_path / "lazy.bfq", plan.bits, progress=False)
    quantize_and_export(full, tmp_path / "full.bfq", plan.bits, progress=False)
    n_weights = sum(1 for _, m in full.named_modules() if type(m) in (torch.nn.Linear, torch.nn.Conv2d))
    assert counting.calls == n_weights  # each float weight read once
    assert counting.max_live <= 2  # never more than the layer at hand (and the one being released)
    assert _sha(tmp_path / "lazy.bfq") == _sha(tmp_path / "full.bfq")
    with open_bfq(tmp_path / "lazy.bfq") as f:
        assert len(f.layers) == len(plan.bits)


def test_streaming_quantize_writes_what_the_whole_model_path_writes(tmp_path):
    a = quantize("tiny-sd", tmp_path / "a.bfq", recipe="uniform-2", progress=False)
    b = quantize("tiny-sd", tmp_path / "b.bfq", recipe="uniform-2", progress=False, work_dir=tmp_path / "w")
    assert "quantize_export" in a.seconds and "initialize" in b.seconds  # the two paths did run
    assert _sha(a.path) == _sha(b.path)


def test_local_analysis_is_the_same_on_a_lazy_and_a_full_unet_and_is_cheap():
    cfg = sdxl.sdxl_test_config()
    lazy, full = lazy_unet(cfg, random_source(cfg, 2)), full_unet(cfg, random_source(cfg, 2))
    a = analyze(lazy, mode="local", progress=False, n_prompts=2, steps=2, n_timesteps=2)
    b = analyze(full, mode="local", progress=False, n_prompts=2, steps=2, n_timesteps=2)
    assert a["complete"] and a["settings"]["mode"] == "local"
    schema = json.loads((Path(__file__).resolve().parents[1] / "spec" / "sensitivity.schema.json").read_text())
    jsonschema.validate(json.loads(json.dumps(a)), schema)
    assert a["model"]["fingerprint"] == b["model"]["fingerprint"]
    assert list(a["layers"]) == list(b["layers"])
    for name, entry in a["layers"].items():  # lazy backward rereads weights; gradients kept in bf16: ~3 digits
        for bits, metrics in entry.get("errors", {}).items():
            assert metrics == pytest.approx(b["layers"][name]["errors"][bits], rel=1e-2, abs=1e-12)
    entries = [e["errors"] for e in a["layers"].values() if "errors" in e]
    assert all(0 < e["3"]["layer_err"] < e["2"]["layer_err"] < e["1"]["layer_err"] for e in entries)
    # the projected error is a random estimate per layer: fewer bits give more error on the whole
    assert sum(e["3"]["mse"] for e in entries) < sum(e["2"]["mse"] for e in entries) < sum(e["1"]["mse"] for e in entries)
    assert sum(e["3"]["mse"] < e["1"]["mse"] for e in entries) >= 0.9 * len(entries)
    attn2_kv = [e["errors"]["1"]["guidance_err"] for n, e in a["layers"].items() if "attn2.to_k" in n or "attn2.to_v" in n]
    assert attn2_kv and all(g > 0 for g in attn2_kv)  # the text embeddings differ between cond and uncond
    with pytest.raises(Exception, match="local mode"):
        analyze(lazy, mode="proxy", progress=False)


def test_default_analysis_mode():
    cfg = sdxl.sdxl_test_config()
    assert default_analysis_mode(full_unet(cfg, random_source(cfg, 0))) == "proxy"  # small: the full proxy
    assert default_analysis_mode(lazy_unet(cfg, random_source(cfg, 0))) == "local"
    big = lazy_unet(sdxl.FAMILY.config(), random_source(sdxl.FAMILY.config(), 0))
    del big._bfq_weight_source  # a large model, as if loaded whole
    expected = "proxy" if torch.cuda.is_available() else "local"
    assert default_analysis_mode(big) == expected
