"""Model families (bfq.families) and SDXL end to end on a small random SDXL-structured UNet and pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from bfq_cli.main import main
from click.testing import CliRunner
from torch import nn

import bfq
from bfq import BfqFormatError
from bfq.families import FamilyError, family_for_config, family_for_name, family_of, pixart, sd15, sdxl, supported
from bfq.families.build import build_meta_unet, build_random_unet
from bfq.families.lazy import is_lazy
from bfq.format import open_bfq
from bfq.pipeline.models import ModelError, resolve_model
from bfq.quant import recipe as recipes
from bfq.quant import timecache

torch.set_num_threads(1)
SUPPORTED = "SD-v1.5 (sd15), SDXL (sdxl), PixArt-Σ (pixart)"


def make_sdxl_pipeline(root, seed: int = 0):
    """A StableDiffusionXLPipeline directory: the small SDXL UNet, two random 1-layer CLIP text
    encoders (the second with projection: the pooled text_embeds), tiny-sd's tokenizer and VAE."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from bfq.tinysd import pipeline_dir

    tiny = pipeline_dir()
    torch.manual_seed(seed)
    cfg = dict(vocab_size=114, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
               max_position_embeddings=77, bos_token_id=112, eos_token_id=113, pad_token_id=113)  # fmt: skip
    tok = CLIPTokenizer.from_pretrained(tiny / "tokenizer")
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL.from_pretrained(tiny / "vae"), text_encoder=CLIPTextModel(CLIPTextConfig(**cfg)).eval(),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**cfg, projection_dim=16)).eval(),
        tokenizer=tok, tokenizer_2=tok, unet=build_random_unet(sdxl.sdxl_test_config(), seed=seed),
        scheduler=sdxl.FAMILY.scheduler(), add_watermarker=False,
    )  # fmt: skip
    pipe.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def sdxl_pipe(tmp_path_factory):
    return make_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "pipe")


# ------------------------------------------------------------------------------------ the seam


def sd2_config() -> dict:
    """SD-2.1's UNet config: linear projections, 1024-wide text, per-level head dims."""
    return {**sd15.FAMILY.config(), "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
            "use_linear_projection": True, "sample_size": 96}  # fmt: skip


def refiner_config() -> dict:
    """SDXL refiner's: 5 time ids (with the aesthetic score), 1280-wide text, 4 levels."""
    return {**sdxl.FAMILY.config(), "cross_attention_dim": 1280, "projection_class_embeddings_input_dim": 2560,
            "block_out_channels": [384, 768, 1536, 1536], "attention_head_dim": [6, 12, 24, 24],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "transformer_layers_per_block": 4}  # fmt: skip


def test_families_recognize_their_configs_and_refuse_others():
    assert supported() == SUPPORTED
    for config, family in ((sd15.FAMILY.config(), sd15.FAMILY), (sd2_config(), sd15.FAMILY),
                           ({**sd15.FAMILY.config(), "in_channels": 9}, sd15.FAMILY),  # inpainting
                           (sdxl.FAMILY.config(), sdxl.FAMILY), (refiner_config(), sdxl.FAMILY),
                           (sdxl.sdxl_test_config(), sdxl.FAMILY)):  # fmt: skip
        assert family_for_config(config) is family
    assert sdxl.time_ids_layout(sdxl.FAMILY.config()) == (6, 1280)
    assert sdxl.time_ids_layout(refiner_config()) == (5, 1280)
    for name, family in (("sd15", sd15.FAMILY), ("tiny-sd", sd15.FAMILY), ("sdxl-random", sdxl.FAMILY),
                         ("tiny-sdxl", sdxl.FAMILY), ("sdxl", sdxl.FAMILY), ("pixart-random", pixart.FAMILY),
                         ("tiny-pixart", pixart.FAMILY)):  # fmt: skip
        assert family_for_name(name) is family
    for config, class_name in (({**sd15.FAMILY.config(), "addition_embed_type": "text"}, None),  # DeepFloyd IF
                               ({**sd15.FAMILY.config(), "addition_embed_type": "image_hint"}, None),  # Kandinsky
                               (sd15.FAMILY.config(), "UNet2DModel"), ({}, "SD3Transformer2DModel")):  # fmt: skip
        with pytest.raises(FamilyError, match=r"not a model family bfq supports; supported: SD-v1\.5 \(sd15\), SDXL"):
            family_for_config(config, class_name)
    with pytest.raises(FamilyError, match="families: SD-v1.5"):
        family_for_name("sd3")
    with pytest.raises(FamilyError, match="not a diffusers model"):
        family_of(nn.Linear(2, 2))


def test_sdxl_reference_shape_and_its_layers():
    """sdxl-random's shape is SDXL base 1.0's (2,567,463,684 parameters); its scheduler cache removes
    only the timestep MLP, so time_emb_proj and add_embedding are quantizable, unlike SD-v1.5's."""
    unet = build_meta_unet(sdxl.FAMILY.config())
    assert sum(p.numel() for p in unet.parameters()) == sdxl.SDXL_N_PARAMS
    counts = recipes.linear_conv_weights(unet)
    assert sum(counts.values()) == sdxl.SDXL_N_LINEAR_CONV_WEIGHTS and len(counts) == 794
    sched, grid = recipes.quantizable_layers(unet, "scheduler"), recipes.quantizable_layers(unet, "grid")
    assert list(sched) == list(grid) and len(sched) == 792
    assert not any(n.startswith("time_embedding.") for n in sched)
    assert "add_embedding.linear_1.weight" in sched and sum(n.endswith("time_emb_proj.weight") for n in sched) == 17
    sd = build_meta_unet(sd15.FAMILY.config())
    assert not any("time_emb_proj" in n for n in recipes.quantizable_layers(sd, "scheduler"))
    assert timecache.n_time_features(unet, "scheduler", 50) == 50 * 1280


def test_sdxl_conditioning_has_what_a_forward_needs():
    unet = build_random_unet(sdxl.sdxl_test_config(), seed=2)
    config = dict(unet.config)
    a = sdxl.FAMILY.conditioning(config, 3, seq_len=5)
    b = sdxl.FAMILY.conditioning(config, 3, seq_len=5, height=4, width=6, generator=torch.Generator().manual_seed(1))
    assert a["encoder_hidden_states"].shape == (3, 5, 32) and a["added_cond_kwargs"]["text_embeds"].shape == (3, 16)
    assert a["added_cond_kwargs"]["time_ids"].tolist() == [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 3
    assert b["added_cond_kwargs"]["time_ids"][0].tolist() == [32.0, 48.0, 0.0, 0.0, 32.0, 48.0]
    with torch.no_grad():
        out = unet(torch.randn(3, 4, 8, 8), 10, **a).sample
    assert out.shape == (3, 4, 8, 8) and torch.isfinite(out).all()
    assert set(sd15.FAMILY.conditioning(dict(sd15.FAMILY.config()), 2)) == {"encoder_hidden_states"}


def test_unknown_family_is_refused_up_front(tmp_path):
    """A UNet repo/folder of no supported family is refused before its weights are read (the weights
    file here is not even valid), in one line naming the families supported; the same for a .bfq."""
    unet_dir = tmp_path / "if-unet"
    unet_dir.mkdir()
    (unet_dir / "config.json").write_text(json.dumps({**sd15.FAMILY.config(), "addition_embed_type": "text"}))
    (unet_dir / "diffusion_pytorch_model.safetensors").write_bytes(b"not read")
    with pytest.raises(ModelError, match=f"supported: {SUPPORTED.replace('(', '.').replace(')', '.')}"):
        resolve_model(unet_dir)
    result = CliRunner().invoke(main, ["quantize", str(unet_dir), "--recipe", "uniform-2", "--time-cache", "grid",
                                       "-o", str(tmp_path / "x.bfq")])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and "bfq: error:" in result.output and SUPPORTED in result.output
    assert not (tmp_path / "x.bfq").exists()

    from bfq.format import BfqWriter

    with BfqWriter(tmp_path / "if.bfq", model={"class_name": "UNet2DConditionModel",
                                                "config": {**sd15.FAMILY.config(), "addition_embed_type": "text"}}):  # fmt: skip
        pass
    with pytest.raises(BfqFormatError, match="model: .*supported: SD-v1.5"):
        bfq.load_unet(tmp_path / "if.bfq")


def test_sdxl_random_too_big_for_the_machine_is_refused_in_one_line(monkeypatch, tmp_path):
    from bfq.pipeline import models

    monkeypatch.setattr(models, "_available_memory", lambda: 6e9)
    with pytest.raises(ModelError, match=r"sdxl-random: quantizing it needs about 15 GB .* 10\.3 GB\) .* 6\.0 GB available"):
        resolve_model("sdxl-random")
    # `bfq quantize` converts sdxl-random layer by layer (tests/test_streaming.py); a work directory
    # (initialized scales kept for a rerun) needs the whole float model and is refused up front
    args = ["quantize", "sdxl-random", "--bits", "1.99", "-o", str(tmp_path / "x.bfq"), "--work-dir", str(tmp_path / "w")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "15 GB of memory" in result.output
    assert "converts it layer by layer" in result.output and not (tmp_path / "x.bfq").exists()
    assert is_lazy(resolve_model("sdxl-random", lazy=True).unet)  # needs no memory check


def test_tiny_sdxl_resolves_lazily():
    """tiny-sdxl is a built-in name; until its bundle is in bfq/data it is one clear error."""
    family = family_for_name("tiny-sdxl")
    if (family.tiny_pipeline_dir() / "model_index.json").is_file():
        assert family_of(resolve_model("tiny-sdxl").unet) is sdxl.FAMILY
    else:
        with pytest.raises(ModelError, match="bundled tiny-sdxl pipeline is missing"):
            resolve_model("tiny-sdxl")


# ------------------------------------------------------------------------------ the time cache


@pytest.fixture(scope="module")
def cached_sdxl(tmp_path_factory):
    """A 2-bit SDXL-structured UNet (fake-quantized, float time layers) and its scheduler-cached file."""
    from bfq.pipeline.export import export_unet
    from bfq.quant.nn import quantize_unet

    unet = build_random_unet(sdxl.sdxl_test_config(), seed=3)
    plan = recipes.resolve_recipe("uniform-2", unet, "scheduler")
    cache = timecache.build_cache(unet, "scheduler", sdxl.FAMILY.scheduler(), 5)
    quantize_unet(unet, plan.bits, levels=plan.levels, progress=False)
    path = tmp_path_factory.mktemp("cache") / "xl.bfq"
    export_unet(unet, path, time_cache=cache, progress=False)
    return unet, cache["timesteps"], path


def test_sdxl_cache_file_holds_the_time_embedding_only(cached_sdxl):
    unet, steps, path = cached_sdxl
    with open_bfq(path) as f:
        raw = f.header.raw["time_cache"]
        names = set(f.layers) | set(f.tensors)
    assert raw["mode"] == "scheduler" and set(raw) == {"mode", "timesteps", "embedding"}
    assert raw["embedding"]["shape"] == [len(steps), 64]
    assert not any(n.startswith("time_embedding.") for n in names)
    assert sum(n.endswith("time_emb_proj.weight") for n in names) == len(timecache.resnets_with_time_proj(unet)) == 8 and "add_embedding.linear_2.weight" in names


@pytest.mark.parametrize("runtime", ["packed", "dense"])
def test_sdxl_cached_file_equals_the_float_time_path(cached_sdxl, runtime):
    """Two prompts (text_embeds) x two image sizes (time_ids), at every cached timestep: the loaded
    file's output equals the fake-quantized model with its float time MLP, whose only difference is
    the fp16 rounding of the cached embedding. A per-ResNet cache could not do that: the prompts and
    sizes move the model's output by far more than the tolerance."""
    unet, steps, path = cached_sdxl
    loaded = bfq.load_unet(path, runtime=runtime)
    config = dict(unet.config)
    rounded = unet.time_embedding.register_forward_hook(lambda m, args, out: out.half().float())
    try:
        outputs = {}
        for prompt_seed in (0, 1):
            for size in (8, 12):
                cond = sdxl.FAMILY.conditioning(config, 2, height=size, width=size, seq_len=6,
                                                generator=torch.Generator().manual_seed(prompt_seed))  # fmt: skip
                x = torch.randn(2, 4, size, size, generator=torch.Generator().manual_seed(size))
                for t in steps:
                    with torch.no_grad():
                        got, want = loaded(x, t, **cond).sample, unet(x, t, **cond).sample
                    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
                    outputs[prompt_seed, size, t] = want
    finally:
        rounded.remove()
    for t in steps:  # the conditioning matters: text and size each move the output
        assert (outputs[0, 8, t] - outputs[1, 8, t]).abs().max() > 1e-2
    with pytest.raises(ValueError, match="not in the time-feature cache"):
        with torch.no_grad():
            loaded(x, steps[0] + 1, **cond)


def test_sdxl_per_resnet_cache_is_refused():
    unet = build_random_unet(sdxl.sdxl_test_config(), seed=3)
    with pytest.raises(ValueError, match="per-ResNet time features refused: a SDXL model"):
        timecache.compute_scheduler_features(unet, [1.0, 2.0])


def test_scheduler_cache_with_features_and_embedding_is_invalid(cached_sdxl, tmp_path):
    from bfq.format.header import _parse_time_cache

    table = {"dtype": "f16", "shape": [1, 4], "offset": 0, "length": 8, "crc32": 0}
    obj = {"mode": "scheduler", "timesteps": [1], "features": {"down_blocks.0.resnets.0": table}, "embedding": table}
    with pytest.raises(BfqFormatError, match="exactly one"):
        _parse_time_cache(obj, "header.time_cache")
    assert not _parse_time_cache({k: v for k, v in obj.items() if k != "features"}, "t").per_resnet


# ----------------------------------------------------------------------------- end to end


def test_sdxl_end_to_end_uniform_and_bits(sdxl_pipe, tmp_path, monkeypatch):
    """bfq quantize (a uniform recipe, and --bits with the default allocator) -> inspect -> verify ->
    load packed and dense -> StableDiffusionXLPipeline: the same images from both runtimes."""
    monkeypatch.setenv("BFQ_CACHE_DIR", str(tmp_path / "cache"))
    runner = CliRunner()
    files = {}
    for label, args in (("uniform", ["--recipe", "uniform-2"]), ("bits", ["--bits", "2.5"])):
        files[label] = tmp_path / f"{label}.bfq"
        result = runner.invoke(main, ["quantize", str(sdxl_pipe), *args, "--steps", "4", "-o", str(files[label])])
        assert result.exit_code == 0, result.output
        for cmd in (["inspect"], ["verify"]):
            assert runner.invoke(main, [*cmd, str(files[label])]).exit_code == 0
    with open_bfq(files["bits"]) as f:
        bits = {layer.bits for layer in f.layers.values()}
        assert f.header.recipe["avg_bits"] <= 2.5 and len(bits) > 2
        assert json.loads(f.header.metadata["scheduler"])["class_name"] == "EulerDiscreteScheduler"

    from bfq.runtime.generate import load_pipeline

    images = {}
    for runtime in ("packed", "dense"):
        pipe = load_pipeline(str(files["bits"]), base=str(sdxl_pipe), runtime=runtime, device="cpu")
        steps = 4  # the file's cached step count
        assert type(pipe).__name__ == "StableDiffusionXLPipeline"
        images[runtime] = pipe(["a handwritten digit three", "a handwritten digit seven"], num_inference_steps=steps,
                               generator=torch.Generator().manual_seed(0), output_type="np").images  # fmt: skip
    assert images["packed"].shape == (2, 16, 16, 3) and images["packed"].std() > 0.01
    np.testing.assert_allclose(images["packed"], images["dense"], atol=1e-5)
    result = runner.invoke(main, ["generate", str(files["uniform"]), "--base", str(sdxl_pipe), "--prompt", "a digit",
                                  "-o", str(tmp_path / "grid.png")])  # fmt: skip
    assert result.exit_code == 0, result.output and (tmp_path / "grid.png").is_file()


def test_sdxl_two_stage_finetuning_with_added_conditioning(sdxl_pipe, tmp_path):
    """Stage I + II on an SDXL-class UNet from prompts (both text encoders, text_embeds and time_ids
    in every batch, CFG dropout of the pooled text too); the trained file differs from the initialized one."""
    (tmp_path / "prompts.txt").write_text("a handwritten digit three\na handwritten digit seven\n")
    config = {"data": f"prompts:{tmp_path / 'prompts.txt'}", "batch_size": 2, "sample_steps": 2, "uncond_prob": 0.5,
              "lr": 1e-2}  # fmt: skip
    (tmp_path / "ft.json").write_text(json.dumps(config))
    runner = CliRunner()
    common = ["quantize", str(sdxl_pipe), "--recipe", "uniform-2", "--steps", "4"]
    assert runner.invoke(main, [*common, "-o", str(tmp_path / "init.bfq")]).exit_code == 0
    result = runner.invoke(main, [*common, "--stage1-steps", "3", "--stage2-steps", "2", "--finetune-config",
                                  str(tmp_path / "ft.json"), "-o", str(tmp_path / "ft.bfq")])  # fmt: skip
    assert result.exit_code == 0, result.output
    with open_bfq(tmp_path / "init.bfq") as a, open_bfq(tmp_path / "ft.bfq") as b:
        assert json.loads(b.header.metadata["finetune"])["stage2_steps"] == 2
        changed = [n for n in a.layers if not np.array_equal(a.read_scales(n), b.read_scales(n))]
    assert len(changed) > 10

    from bfq.pipeline.finetune import FinetuneConfig, finetune
    from bfq.pipeline.finetune.losses import float_teacher
    from bfq.quant.nn import quantize_unet

    student = resolve_model(sdxl_pipe).unet
    quantize_unet(student, recipes.resolve_recipe("uniform-2", student).bits, progress=False)
    batch = {"encoder_hidden_states": torch.randn(2, 77, 32), "uncond_hidden_states": torch.zeros(77, 32),
             "latents": torch.randn(2, 4, 8, 8)}  # fmt: skip
    with pytest.raises(ValueError, match="needs text_embeds, time_ids in every batch"):
        finetune(student, float_teacher(student), [batch], FinetuneConfig(steps=1, batch_size=2, progress=False))


def test_sdxl_model_card(cached_sdxl):
    from bfq.hub.card import model_card

    card = model_card(cached_sdxl[2], repo_id="me/xl", base={"base_model": None, "license": None, "pipeline": None})
    assert "- stable-diffusion-xl\n" in card and "- stable-diffusion\n" not in card
    assert 'bfq.load_unet("me/xl")' in card and "--base BASE_PIPELINE" in card
