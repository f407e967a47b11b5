"""bfq.pipeline.models: built-in configs, fast random SD-v1.5 build, and model resolution (offline)."""

from __future__ import annotations

import hashlib
import json
import time

import pytest
import torch
from diffusers import PNDMScheduler, UNet2DConditionModel
from helpers import tiny_unet, tiny_unet_config
from safetensors.torch import save_file
from torch import nn

from bfq.pipeline.models import (
    SD15_N_LINEAR_CONV_WEIGHTS,
    SD15_N_PARAMS,
    ModelError,
    build_meta_unet,
    build_random_unet,
    resolve_model,
    sd15_config,
    sd15_scheduler,
)

torch.set_num_threads(1)


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def make_pipeline_dir(root, unet, safe=True):
    unet.save_pretrained(root / "unet", safe_serialization=safe)
    PNDMScheduler(skip_prk_steps=True, steps_offset=1).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline",
        "scheduler": ["diffusers", "PNDMScheduler"],
        "unet": ["diffusers", "UNet2DConditionModel"],
    }))  # fmt: skip
    return root


def test_sd15_config_shapes():
    unet = build_meta_unet(sd15_config())
    assert sum(p.numel() for p in unet.parameters()) == SD15_N_PARAMS
    weights = sum(m.weight.numel() for m in unet.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    assert weights == SD15_N_LINEAR_CONV_WEIGHTS
    assert sd15_config() is not sd15_config() and sd15_config() == sd15_config()
    sched = sd15_scheduler()
    sched.set_timesteps(50)
    assert len(sched.timesteps) == 51 and int(sched.timesteps[0]) == 981


def test_build_random_unet_init():
    cfg = tiny_unet_config()
    a, b, c = build_random_unet(cfg, seed=0), build_random_unet(cfg, seed=0), build_random_unet(cfg, seed=1)
    assert same_weights(a, b) and not same_weights(a, c)
    for name, m in a.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            bound, w = 1 / m.weight[0].numel() ** 0.5, m.weight.detach()
            assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.8 * bound, name
            assert float(w.std()) == pytest.approx(bound / 3**0.5, rel=0.5)
        elif isinstance(m, (nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
            assert bool((m.weight == 1).all()) and bool((m.bias == 0).all())
    half = build_random_unet(cfg, seed=0, dtype=torch.float16)
    assert half.conv_in.weight.dtype == torch.float16
    assert torch.equal(half.conv_in.weight, a.conv_in.weight.half())
    sample = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.isfinite(a(sample, 10, torch.randn(1, 3, 16)).sample).all()


def test_local_pipeline_and_unet_dirs(tmp_path):
    unet = tiny_unet(seed=3)
    root = make_pipeline_dir(tmp_path / "pipe", unet)
    res = resolve_model(root)
    assert same_weights(res.unet, unet) and res.unet.dtype == torch.float32 and not res.unet.training
    assert isinstance(res.scheduler, PNDMScheduler) and res.base_dir == root
    weights = root / "unet" / "diffusion_pytorch_model.safetensors"
    assert res.source == {"kind": "file", "name": "pipe", "sha256": sha256(weights)}
    bare = resolve_model(str(root / "unet"))
    assert bare.scheduler is None and bare.base_dir is None and same_weights(bare.unet, unet)
    assert bare.source["sha256"] == sha256(weights)


def test_fp16_variant_dir(tmp_path):
    unet = tiny_unet(seed=5)
    unet.half().save_pretrained(tmp_path / "unet", variant="fp16")
    assert [p.name for p in (tmp_path / "unet").glob("*.safetensors")] == ["diffusion_pytorch_model.fp16.safetensors"]
    res = resolve_model(tmp_path / "unet")
    assert res.unet.dtype == torch.float32 and same_weights(res.unet.half(), unet)


def test_pickle_weights_need_opt_in(tmp_path):
    unet = tiny_unet(seed=4)
    root = make_pipeline_dir(tmp_path / "pipe", unet, safe=False)
    assert not list((root / "unet").glob("*.safetensors"))
    with pytest.raises(ModelError, match="pickle"):
        resolve_model(root)
    assert same_weights(resolve_model(root, allow_pickle=True).unet, unet)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": unet.state_dict()}, ckpt)
    with pytest.raises(ModelError, match="allow_pickle"):
        resolve_model(ckpt)
    with pytest.raises(ModelError, match="not SD-v1.5-shaped"):  # read safely, then refused: tiny shapes
        resolve_model(ckpt, allow_pickle=True)


def test_single_file_errors(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="safetensors"):
        resolve_model(junk)
    odd = tmp_path / "model.onnx"
    odd.write_bytes(b"x")
    with pytest.raises(ModelError, match="unsupported"):
        resolve_model(odd)
    other = tmp_path / "other.safetensors"
    save_file({"foo.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(ModelError, match="cannot load a UNet"):
        resolve_model(other)
    with pytest.raises(ModelError, match="unknown model"):
        resolve_model("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="neither a diffusers pipeline"):
        resolve_model(tmp_path / "empty")


def test_hub_offline_fails_fast(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    for name in ("sd15", "someone/some-model"):
        start = time.monotonic()
        with pytest.raises(ModelError, match="HF_HUB_OFFLINE is set.*not in the local Hugging Face cache"):
            resolve_model(name, cache_dir=tmp_path)
        assert time.monotonic() - start < 10


def test_tiny_sd_builtin():
    from bfq.tinysd import pipeline_dir

    if not (pipeline_dir() / "model_index.json").is_file():
        pytest.skip("bundled tiny-sd pipeline not built yet")
    res = resolve_model("tiny-sd")
    assert isinstance(res.unet, UNet2DConditionModel) and res.scheduler is not None
    assert res.source == {"kind": "builtin", "name": "tiny-sd"} and res.base_dir == pipeline_dir()


@pytest.mark.slow
def test_sd15_random_and_single_file(tmp_path):
    start = time.monotonic()
    res = resolve_model("sd15-random")
    print(f"build_sd15_random: {time.monotonic() - start:.1f} s")
    assert sum(p.numel() for p in res.unet.parameters()) == SD15_N_PARAMS
    assert res.source == {"kind": "builtin", "name": "sd15-random", "seed": 0}
    path = tmp_path / "sd15.safetensors"
    save_file({k: v.half() for k, v in res.unet.state_dict().items()}, path)
    again = resolve_model(path)
    assert torch.equal(again.unet.conv_in.weight, res.unet.conv_in.weight.half().float())
    assert again.source == {"kind": "file", "name": "sd15.safetensors", "sha256": sha256(path)}
