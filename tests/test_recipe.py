"""bfq.quant.recipe: recipe format, built-ins (the paper's App. H table), validation and accounting."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import jsonschema
import pytest
from helpers import tiny_unet

from bfq.errors import RecipeError
from bfq.pipeline.models import SD15_N_LINEAR_CONV_WEIGHTS, build_meta_unet, sd15_config
from bfq.quant.recipe import (
    BUILTIN_RECIPES,
    Recipe,
    average_bits,
    bitsfusion_sd15,
    linear_conv_weights,
    quantizable_layers,
    resolve_recipe,
    summarize,
    validate,
)
from bfq.quant.timecache import n_time_features, time_layer_names

SCHEMA = json.loads((Path(__file__).resolve().parent.parent / "spec" / "recipe.schema.json").read_text())


@pytest.fixture(scope="module")
def sd15():
    return build_meta_unet(sd15_config())


@pytest.fixture(scope="module")
def tiny():
    return tiny_unet()


def test_builtins_match_schema_and_roundtrip(sd15, tiny, tmp_path):
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    for mode in ("scheduler", "grid"):
        for name in BUILTIN_RECIPES:
            unet = sd15 if name == "bitsfusion-sd15" else tiny
            recipe = resolve_recipe(name, unet, mode)
            obj = recipe.to_json()
            jsonschema.validate(obj, SCHEMA)
            path = recipe.save(tmp_path / f"{name}-{mode}.json")
            again = resolve_recipe(path, unet, mode)
            assert again == recipe and list(again.bits) == list(recipe.bits)


def test_schema_and_parser_agree_on_bad_recipes(tiny, tmp_path):
    good = resolve_recipe("uniform-2", tiny).to_json()
    bad_cases = [
        {**good, "format": "recipe"},
        {**good, "version": 2},
        {**good, "levels": "nf4"},
        {**good, "bits": {}},
        {**good, "bits": {**good["bits"], "conv_in.weight": 9}},
        {**good, "bits": {**good["bits"], "conv_in.weight": 0}},
        {**good, "bits": {**good["bits"], "conv_in.weight": "2"}},
        {**good, "bits": {**good["bits"], "conv_in.weight": True}},
        {**good, "extra": 1},
        {k: v for k, v in good.items() if k != "name"},
        {**good, "notes": 3},
    ]
    for obj in bad_cases:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(obj, SCHEMA)
        with pytest.raises(RecipeError):
            Recipe.from_json(obj)
    dup = tmp_path / "dup.json"
    dup.write_text('{"format": "bfq-recipe", "version": 1, "name": "d", "levels": "balanced", '
                   '"bits": {"conv_in.weight": 2, "conv_in.weight": 3}}')  # fmt: skip
    with pytest.raises(RecipeError, match="duplicate"):
        Recipe.load(dup)
    (tmp_path / "junk.json").write_text("{")
    with pytest.raises(RecipeError, match="invalid JSON"):
        resolve_recipe(tmp_path / "junk.json", tiny)
    with pytest.raises(RecipeError, match="unknown recipe"):
        resolve_recipe("uniform-9", tiny)


def test_quantizable_layers_modes(tiny, sd15):
    all_w = linear_conv_weights(tiny)
    sched, grid = quantizable_layers(tiny, "scheduler"), quantizable_layers(tiny, "grid")
    time = time_layer_names(tiny)
    assert set(sched) == set(all_w) - set(time)
    assert set(grid) == set(all_w) - {n for n in time if n.startswith("time_embedding.")}
    assert sum(all_w.values()) == sum(p.numel() for n, p in tiny.named_parameters() if n in all_w)
    assert len(quantizable_layers(sd15)) == 258 and len(quantizable_layers(sd15, "grid")) == 280
    assert sum(linear_conv_weights(sd15).values()) == SD15_N_LINEAR_CONV_WEIGHTS
    with pytest.raises(ValueError):
        quantizable_layers(tiny, "none")


def test_uniform_recipes(tiny):
    for n in (1, 3, 8):
        r = resolve_recipe(f"uniform-{n}", tiny, "grid")
        assert r.bits["conv_in.weight"] == 8 and r.bits["conv_out.weight"] == 8
        assert Counter(r.bits.values())[n] == len(r.bits) - (0 if n == 8 else 2)
    r = resolve_recipe("uniform-2", tiny, "grid", time_proj_bits=6, levels="plain")
    assert r.levels == "plain"
    assert all(b == 6 for k, b in r.bits.items() if k.endswith("time_emb_proj.weight"))


def test_bitsfusion_sd15_transcription(sd15):
    r = resolve_recipe("bitsfusion-sd15", sd15)
    counts = Counter(r.bits.values())
    assert dict(sorted(counts.items())) == {1: 66, 2: 59, 3: 67, 4: 45, 5: 9, 6: 7, 7: 3, 8: 2}
    assert list(r.bits) == list(quantizable_layers(sd15))  # model order, exactly the 258 layers
    # spot checks against BITSFUSION.md §3.4
    b = r.bits
    assert b["down_blocks.0.attentions.0.proj_in.weight"] == 6
    assert b["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"] == 7
    assert b["up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj.weight"] == 3
    assert b["mid_block.attentions.0.transformer_blocks.0.attn1.to_k.weight"] == 1
    assert b["down_blocks.1.resnets.0.conv_shortcut.weight"] == 7
    assert b["up_blocks.0.resnets.0.conv2.weight"] == 2
    assert b["up_blocks.2.upsamplers.0.conv.weight"] == 3 and b["down_blocks.2.downsamplers.0.conv.weight"] == 1
    # weight shares and parameter-weighted means by layer type (BITSFUSION.md §3.4 summary)
    n = quantizable_layers(sd15)
    inner = {k: v for k, v in b.items() if k not in ("conv_in.weight", "conv_out.weight")}
    tot = sum(n[k] for k in inner)
    share = {bb: sum(n[k] for k, v in inner.items() if v == bb) / tot for bb in (1, 2, 3, 4)}
    assert [round(100 * share[x], 1) for x in (1, 2, 3, 4)] == [60.5, 25.8, 9.7, 3.6]

    def mean(pred):
        ks = [k for k in inner if pred(k)]
        return round(sum(b[k] * n[k] for k in ks) / sum(n[k] for k in ks), 2)

    assert mean(lambda k: ".ff." in k) == 1.56
    assert mean(lambda k: "attn2.to_k" in k or "attn2.to_v" in k) == 3.45
    assert mean(lambda k: "conv_shortcut" in k) == 2.37
    assert mean(lambda k: "samplers" in k) == 1.68
    assert mean(lambda k: "proj_in" in k or "proj_out" in k) == 3.19


def test_bitsfusion_sd15_average_bits(sd15):
    r = resolve_recipe("bitsfusion-sd15", sd15)
    n_tf = n_time_features(sd15, "scheduler", 50)
    assert n_tf == 20160 * 50
    avg = average_bits(r.bits, quantizable_layers(sd15), "balanced", n_tf, SD15_N_LINEAR_CONV_WEIGHTS)
    assert avg == pytest.approx(1.9885, abs=5e-5) and f"{avg:.2f}" == "1.99"
    no_tf = average_bits(r.bits, quantizable_layers(sd15), "balanced", 0, SD15_N_LINEAR_CONV_WEIGHTS)
    assert no_tf == pytest.approx(1.9697, abs=5e-5)
    s = summarize(r, sd15, "scheduler", n_tf)
    assert s["avg_bits"] == avg and s["n_params_total"] == 859_520_964 and s["n_layers"] == 258


def test_average_bits_by_hand():
    bits = {"a": 1, "b": 2}
    n = {"a": 10, "b": 30}
    want = (math.log2(3) * 10 + math.log2(5) * 30 + 16 * 4) / 50
    assert average_bits(bits, n, "balanced", 4, 50) == pytest.approx(want)
    assert average_bits(bits, n, "plain", 0, 40) == pytest.approx((1 * 10 + 2 * 30) / 40)
    with pytest.raises(RecipeError):
        average_bits({"c": 1}, n, "balanced", 0, 40)


def test_validation_names_the_layers(tiny, sd15):
    with pytest.raises(RecipeError, match=r"unknown layers 185: down_blocks.0.attentions.1.proj_in.weight"):
        resolve_recipe("bitsfusion-sd15", tiny)  # an SD recipe on another model
    r = resolve_recipe("uniform-2", tiny)
    r.bits.pop("conv_out.weight")
    r.bits["down_blocks.0.resnets.0.time_emb_proj.weight"] = 2
    with pytest.raises(RecipeError) as e:
        validate(r, tiny, "scheduler")
    msg = str(e.value)
    assert "missing layers 1: conv_out.weight" in msg and "time_emb_proj" in msg and "removes" in msg
    r = resolve_recipe("uniform-2", tiny)
    r.bits["conv_in.weight"] = 9
    with pytest.raises(RecipeError, match="conv_in.weight"):
        validate(r, tiny)
    sched = resolve_recipe("uniform-2", tiny)
    with pytest.raises(RecipeError, match="grid mode keeps time_emb_proj"):
        validate(sched, tiny, "grid")
    with pytest.raises(ValueError, match="needs the UNet"):
        bitsfusion_sd15(None, time_cache="grid")


def test_recipe_file_fills_time_proj_in_grid_mode(sd15, tmp_path):
    path = bitsfusion_sd15().save(tmp_path / "paper.json")
    r = resolve_recipe(path, sd15, "grid", time_proj_bits=5)
    assert len(r.bits) == 280 and list(r.bits) == list(quantizable_layers(sd15, "grid"))
    assert Counter(v for k, v in r.bits.items() if "time_emb_proj" in k) == {5: 22}
    assert resolve_recipe(path, sd15, "grid").bits["mid_block.resnets.0.time_emb_proj.weight"] == 4
