"""Every pipeline stage on a PixArt diffusion transformer (issue 22), through the family seam: which
layers a recipe covers, the conditioning (T5 features and their mask, as PixArtSigmaPipeline computes
them), `bfq analyze`/`allocate`, the fine-tuning batches and losses (feature distillation on the
transformer blocks, the noise prediction of a learned-variance model), and generation of the float
model. On a small random PixArt pipeline built here (:func:`make_pixart_pipeline`)."""

from __future__ import annotations

import json

import pytest
import torch
from bfq_cli.main import main
from click.testing import CliRunner

from bfq.families import family_of, pixart
from bfq.quant import recipe as recipes

torch.set_num_threads(1)
FAMILY = pixart.FAMILY


def make_pixart_pipeline(root, seed: int = 0, **overrides):
    """A PixArtSigmaPipeline folder: the 2-block test transformer (``pixart_test_config(**overrides)``:
    a learned variance, 8 output channels), a random 1-layer T5 encoder 24 wide, a T5 tokenizer of
    a few words and every letter and digit, tiny-sd's VAE, PixArt-Σ's scheduler."""
    from diffusers import AutoencoderKL, PixArtSigmaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    from bfq.tinysd import pipeline_dir

    words = "a handwritten digit zero one two three four five six seven eight nine the number".split()
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [("\u2581" + w, -1.0) for w in words]
    pieces += [(c, -10.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)
    torch.manual_seed(seed)
    config = pixart.pixart_test_config(**overrides)
    text = T5Config(vocab_size=len(tokenizer), d_model=config["caption_channels"], d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, feed_forward_proj="gated-gelu",
                    is_encoder_decoder=False, use_cache=False)  # fmt: skip
    pipe = PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=T5EncoderModel(text).eval(),
                               vae=AutoencoderKL.from_pretrained(pipeline_dir() / "vae"),
                               transformer=PixArtTransformer2DModel.from_config(config), scheduler=FAMILY.scheduler())  # fmt: skip
    pipe.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return make_pixart_pipeline(tmp_path_factory.mktemp("pixart") / "pipe")


@pytest.fixture(scope="module")
def transformer(pipe_dir):
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel.from_pretrained(pipe_dir, subfolder="transformer").eval()


def _prompts():
    return ["a handwritten digit seven", "three", "the number 4"]


# ------------------------------------------------------------------------------------ layers


def test_recipes_cover_attention_feed_forward_patch_caption_and_final_layers(transformer):
    """A recipe covers every Linear/Conv2d but the time path: self- and cross-attention, feed-forward,
    caption_projection, the patch embedding and proj_out (those two at 8 bits, as a UNet's
    conv_in/conv_out); the scheduler cache replaces all of adaln_single."""
    layers = recipes.quantizable_layers(transformer, "scheduler")
    blocks = [n for n in layers if n.startswith("transformer_blocks.0.")]
    assert [n.removeprefix("transformer_blocks.0.") for n in blocks] == [
        f"attn{a}.{p}.weight" for a in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")
    ] + ["ff.net.0.proj.weight", "ff.net.2.weight"]
    others = [n for n in layers if not n.startswith("transformer_blocks.")]
    assert others == ["pos_embed.proj.weight", "proj_out.weight", "caption_projection.linear_1.weight",
                      "caption_projection.linear_2.weight"]  # fmt: skip  (diffusers registers them in this order)
    assert not any(n.startswith("adaln_single.") for n in layers)
    assert set(recipes.linear_conv_weights(transformer)) - set(layers) == {
        n for n in recipes.linear_conv_weights(transformer) if n.startswith("adaln_single.")
    }
    plan = recipes.resolve_recipe("uniform-2", transformer, "scheduler")
    assert {n for n, b in plan.bits.items() if b == 8} == {"pos_embed.proj.weight", "proj_out.weight"}
    assert "pos_embed.proj/proj_out 8-bit" in plan.notes
    # grid mode keeps adaln_single's projection to the 6 x width modulation: the time projection of a DiT
    grid = recipes.resolve_recipe("uniform-2", transformer, "grid", time_proj_bits=4)
    assert recipes.time_projections(transformer, "grid") == ["adaln_single.linear.weight"]
    assert set(grid.bits) - set(plan.bits) == {"adaln_single.linear.weight"} and grid.bits["adaln_single.linear.weight"] == 4


# ------------------------------------------------------------------------------- conditioning


def test_prompts_are_conditioned_as_the_pipeline_conditions_them(pipe_dir, transformer):
    """T5 features and their attention mask from the pipeline's own encode_prompt; dropping the
    padding no prompt attends to leaves the transformer's output as it was (to rounding)."""
    from diffusers import PixArtSigmaPipeline

    config = dict(transformer.config)
    pipe = PixArtSigmaPipeline.from_pretrained(pipe_dir, transformer=None, vae=None)
    ehs, mask = pipe.encode_prompt(_prompts(), do_classifier_free_guidance=False, device="cpu", clean_caption=False)[:2]
    flat = FAMILY.flat_conditioning(FAMILY.encode_prompts(pipe_dir, _prompts(), config))
    assert set(flat) == {"encoder_hidden_states", "encoder_attention_mask"}  # no size conditions: nothing else
    torch.testing.assert_close(flat["encoder_hidden_states"], ehs.float())
    assert torch.equal(flat["encoder_attention_mask"], mask) and ehs.shape[1] == pixart.T5_MAX_LENGTH
    empty = FAMILY.flat_conditioning(FAMILY.encode_prompts(pipe_dir, [""], config))
    short, short_empty = FAMILY.drop_padding(flat, empty)
    n = int(mask.sum(1).max())
    assert short["encoder_hidden_states"].shape[1] == n < 20 and short_empty["encoder_attention_mask"].shape == (1, n)
    x, t = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 500, 999])
    with torch.no_grad():
        full = FAMILY.forward(transformer, x, t, FAMILY.model_kwargs(flat))
        cut = FAMILY.forward(transformer, x, t, FAMILY.model_kwargs(short))
    torch.testing.assert_close(cut, full, atol=1e-5, rtol=1e-5)


def test_forward_is_the_noise_prediction_of_a_learned_variance_model(transformer):
    cond = FAMILY.conditioning(dict(transformer.config), 2, seq_len=5)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        out = transformer(x, timestep=torch.tensor([7, 7]), **cond).sample
        eps = FAMILY.forward(transformer, x, torch.tensor(7), cond)  # a scalar timestep, as samplers pass it
    assert out.shape == (2, 8, 8, 8) and eps.shape == (2, 4, 8, 8)
    torch.testing.assert_close(eps, out[:, :4])


# ------------------------------------------------------------------------- analyze, allocate


@pytest.mark.parametrize("mode", ["proxy", "local"])
def test_analyze_and_allocate_a_pixart_pipeline(pipe_dir, tmp_path, mode):
    """`bfq analyze` measures every quantizable transformer layer with the pipeline's own text
    conditioning; `bfq allocate --bits 1.99` turns it into a recipe that fits the model."""
    from diffusers import PixArtTransformer2DModel

    sens, out = tmp_path / "sens.json", tmp_path / "recipe.json"
    runner = CliRunner()
    result = runner.invoke(main, ["analyze", str(pipe_dir), "--mode", mode, "--prompts", "2", "--steps", "4",
                                  "--timesteps", "2", "--cache-steps", "4", "--quiet", "-o", str(sens)])  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(sens.read_text())
    model = PixArtTransformer2DModel.from_pretrained(pipe_dir, subfolder="transformer")
    assert list(doc["layers"]) == list(recipes.quantizable_layers(model, "scheduler"))
    fixed = {n for n, e in doc["layers"].items() if "fixed_bits" in e}
    assert fixed == {"pos_embed.proj.weight", "proj_out.weight"} and doc["complete"]
    assert doc["settings"]["conditioning"] == "text_encoder" and doc["model"]["class_name"] == "PixArtTransformer2DModel"
    errors = {n: e["errors"] for n, e in doc["layers"].items() if "errors" in e}
    assert all(e["1"]["mse"] > e["3"]["mse"] >= 0 for e in errors.values())  # fewer bits, more error, every layer
    result = runner.invoke(main, ["allocate", str(sens), "--bits", "1.99", "-o", str(out), "--plot", str(tmp_path / "a.png")])
    assert result.exit_code == 0, result.output
    assert "(2 fixed at 8 bits)" in result.output and (tmp_path / "a.png").stat().st_size > 1000
    plan = recipes.resolve_recipe(str(out), model, "scheduler")
    assert set(plan.bits.values()) > {8} and plan.bits["proj_out.weight"] == 8


def test_allocation_plots_follow_the_transformer(transformer):
    from bfq.pipeline.plots import layer_kind, unet_order

    names = list(recipes.quantizable_layers(transformer, "grid"))
    order = unet_order(names)
    assert order[0] == "pos_embed.proj.weight" and order[-1] == "proj_out.weight"
    assert order.index("transformer_blocks.1.attn1.to_q.weight") > order.index("transformer_blocks.0.ff.net.2.weight")
    assert [layer_kind(n) for n in ("pos_embed.proj.weight", "proj_out.weight", "caption_projection.linear_1.weight",
                                    "adaln_single.linear.weight", "transformer_blocks.0.attn2.to_k.weight",
                                    "transformer_blocks.0.attn2.to_out.0.weight", "transformer_blocks.0.ff.net.2.weight")] == [
        "first/last", "first/last", "caption proj", "time proj", "cross-attn k/v", "cross-attn q/out", "ff"]  # fmt: skip
    assert layer_kind("down_blocks.0.attentions.0.proj_out.weight") == "proj"  # a UNet's, inside a block


# ------------------------------------------------------------------------------- fine-tuning


@pytest.fixture(scope="module")
def digits(pipe_dir):
    from bfq.pipeline.finetune.data import make_source

    return make_source(None, model_name="tiny-pixart", pipeline_dir=pipe_dir, batch_size=4, seed=1)


def test_digit_batches_carry_the_t5_mask_and_the_empty_prompts(digits, pipe_dir, transformer):
    batch = digits.batch(3)
    config = dict(transformer.config)
    cond, empty = FAMILY.drop_padding(FAMILY.flat_conditioning(FAMILY.encode_prompts(pipe_dir, digits.caption(3), config)),
                                      FAMILY.flat_conditioning(FAMILY.encode_prompts(pipe_dir, [""], config)))  # fmt: skip
    n = batch["encoder_hidden_states"].shape[1]  # the longest caption of the whole set decides
    assert n >= cond["encoder_hidden_states"].shape[1] and batch["latents"].shape == (4, 4, 8, 8)
    torch.testing.assert_close(batch["encoder_hidden_states"][:, : cond["encoder_hidden_states"].shape[1]],
                               cond["encoder_hidden_states"])  # fmt: skip
    assert torch.equal(batch["encoder_attention_mask"].sum(1), cond["encoder_attention_mask"].sum(1))
    assert int(batch["uncond_encoder_attention_mask"].sum()) == int(empty["encoder_attention_mask"].sum()) == 1  # "</s>"
    assert batch["uncond_hidden_states"].shape == (n, 24)


def test_stage_losses_match_transformer_blocks_and_keep_the_time_path_frozen(digits, pipe_dir):
    """Stage I distills the noise prediction and every transformer block's output; Stage II's loss is
    on the noise channels of the learned-variance output; adaln_single stays float and frozen."""
    from diffusers import PixArtTransformer2DModel

    from bfq.pipeline.finetune import FinetuneConfig, finetune, float_teacher
    from bfq.pipeline.finetune.losses import StageLoss, _FeatureHooks, trainable_parameters
    from bfq.quant.nn import iter_quantized, quantize_unet

    student = PixArtTransformer2DModel.from_pretrained(pipe_dir, subfolder="transformer")
    quantize_unet(student, recipes.uniform_recipe(student, 2).bits, progress=False)
    teacher = float_teacher(student)
    assert not any(n.startswith("adaln_single.") for n, _ in trainable_parameters(student))
    hooks = _FeatureHooks(student)
    with hooks.collecting(), torch.no_grad():
        FAMILY.forward(student, torch.randn(2, 4, 8, 8), torch.tensor([3, 4]),
                       FAMILY.model_kwargs({k: v[:2] for k, v in digits.batch(0).items() if k in ("encoder_hidden_states",
                                                                                               "encoder_attention_mask")}))  # fmt: skip
    outputs = hooks.take()
    assert len(outputs) == 2 and all(o.shape == (2, 16, 48) for o in outputs)  # 2 blocks, 16 patches, width 48
    hooks.remove()

    class Acc:
        device = torch.device("cpu")

        @staticmethod
        def autocast():
            import contextlib

            return contextlib.nullcontext()

    stage1 = StageLoss(FinetuneConfig(stage="distill"), student, teacher, FAMILY.scheduler(), None, Acc())
    loss, parts = stage1(student, digits.batch(0), 0)
    assert set(parts) == {"loss_noise", "loss_feat"} and loss > 0
    stage2 = StageLoss(FinetuneConfig(stage="noise"), student, None, FAMILY.scheduler(), None, Acc())
    loss2, _ = stage2(student, digits.batch(0), 0)
    assert torch.isfinite(loss2)

    time_path = {n: p.clone() for n, p in student.named_parameters() if n.startswith("adaln_single.")}
    scales = {n: m.scale.clone() for n, m in iter_quantized(student)}
    finetune(student, teacher, digits, FinetuneConfig(stage="distill", steps=2, batch_size=4, lr=1e-2, progress=False))
    finetune(student, None, digits, FinetuneConfig(stage="noise", steps=2, batch_size=4, lr=1e-2, progress=False))
    assert all(torch.equal(p, time_path[n]) for n, p in student.named_parameters() if n in time_path)
    assert sum(not torch.equal(m.scale, scales[n]) for n, m in iter_quantized(student)) > 10
    assert family_of(student) is FAMILY


# ------------------------------------------------------------------------------- generation


def test_generate_with_the_float_transformer_through_the_cli(pipe_dir, tmp_path):
    """`bfq generate PIPELINE` builds a PixArtSigmaPipeline around the float transformer: negative
    prompt, sampler, size and seed as for a UNet pipeline; the same seed makes the same grid."""
    from PIL import Image

    runner = CliRunner()
    args = ["generate", str(pipe_dir), "--prompt", "a handwritten digit seven", "--prompt", "three", "--batch", "2",
            "--steps", "3", "--cfg", "3", "--negative-prompt", "blurry", "--sampler", "euler", "--seed", "5", "--quiet"]  # fmt: skip
    for name in ("a.png", "b.png"):
        result = runner.invoke(main, [*args, "-o", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert Image.open(tmp_path / "a.png").size == (2 * 128 + 4, 2 * 128 + 4)  # 16-pixel images, enlarged in the grid
    result = runner.invoke(main, ["generate", str(pipe_dir), "--prompt", "seven", "--width", "32", "--height", "24",
                                  "--steps", "2", "--seed", "1", "--quiet", "-o", str(tmp_path / "c.png")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "c.png").size == (32 * 5, 24 * 5)  # its own size (no resolution binning), enlarged


# ------------------------------------------------- quantize, fine-tune, export, load, generate


@pytest.fixture(scope="module")
def quantized(pipe_dir, tmp_path_factory):
    """`bfq quantize PIPELINE` of the test pipeline: initialized only, and with two steps of each
    fine-tuning stage on the digits (a scheduler cache for 4 DPM-Solver++ steps)."""
    root = tmp_path_factory.mktemp("pixart-q")
    runner = CliRunner()
    common = ["quantize", str(pipe_dir), "--recipe", "uniform-2", "--steps", "4", "--quiet"]
    made = runner.invoke(main, [*common, "-o", str(root / "init.bfq")])
    assert made.exit_code == 0, made.output
    made = runner.invoke(main, [*common, "--stage1-steps", "2", "--stage2-steps", "2", "--batch-size", "4", "--lr", "1e-2",
                                "--data", "tiny-sd-digits", "-o", str(root / "ft.bfq")])  # fmt: skip
    assert made.exit_code == 0, made.output
    return root / "init.bfq", root / "ft.bfq"


def test_quantize_fine_tune_and_export_a_pixart_pipeline(quantized):
    import numpy as np

    from bfq.format import open_bfq

    init, ft = quantized
    with open_bfq(init) as a, open_bfq(ft) as b:
        assert b.header.model["class_name"] == "PixArtTransformer2DModel"
        record = json.loads(b.header.metadata["finetune"])
        changed = [n for n in a.layers if not np.array_equal(a.read_scales(n), b.read_scales(n))]
        assert b.header.time_cache.mode == "scheduler" and len(b.header.time_cache.timesteps) == 4
        assert "pos_embed.proj.weight" in b.layers and not any(n.startswith("adaln_single.") for n in b.layers)
    assert record["stage1_steps"] == 2 and record["stage2_steps"] == 2 and len(changed) > 10
    result = CliRunner().invoke(main, ["verify", str(ft), "--build"])
    assert result.exit_code == 0, result.output


def test_a_packed_pixart_file_generates_the_dense_images_in_its_pipeline(quantized, pipe_dir):
    """bfq.load_pipeline gives a PixArtSigmaPipeline around the file's transformer; packed and dense
    runtimes give the same images, and they are images, not noise."""
    import numpy as np

    import bfq

    images = {}
    for runtime in ("packed", "dense"):
        pipe = bfq.load_pipeline(str(quantized[1]), base=str(pipe_dir), runtime=runtime, device="cpu", compute="fp32")
        assert type(pipe).__name__ == "PixArtSigmaPipeline"
        assert any(type(m).__name__.startswith("Packed") for m in pipe.transformer.modules()) == (runtime == "packed")
        images[runtime] = pipe(["a handwritten digit three", "seven"], num_inference_steps=4, guidance_scale=3.0,
                               generator=torch.Generator().manual_seed(0), output_type="np",
                               use_resolution_binning=False).images  # fmt: skip
    np.testing.assert_allclose(images["packed"], images["dense"], atol=1e-5)
    assert images["packed"].shape == (2, 16, 16, 3) and images["packed"].std() > 0.01


def test_generate_a_pixart_file_through_the_cli(quantized, pipe_dir, tmp_path):
    """`bfq generate FILE.bfq`: the steps its cache was made for by default, a sampler whose timesteps
    are cached, a negative prompt and a seed; a sampler that visits other timesteps is refused up front."""
    runner = CliRunner()
    out = tmp_path / "grid.png"
    args = ["generate", str(quantized[1]), "--base", str(pipe_dir), "--prompt", "seven", "--cfg", "3", "--seed", "2", "--quiet"]
    result = runner.invoke(main, [*args, "--negative-prompt", "blurry", "--batch", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file() and "seed        2" in result.output
    refused = runner.invoke(main, [*args, "--sampler", "ddim", "-o", str(tmp_path / "x.png")])
    assert refused.exit_code == 2 and "Samplers that fit: " in refused.output and "dpm++" in refused.output, refused.output
    assert not (tmp_path / "x.png").exists()


def test_model_card_names_the_transformer_its_pipeline_and_blocks(quantized):
    from bfq.hub import model_card

    card = model_card(quantized[1], repo_id="you/pixart-2bit", diffusers=True,
                      base={"base_model": None, "license": None, "pipeline": "you/pixart-base"})  # fmt: skip
    assert "The diffusion transformer of pipe quantized to" in card
    assert 'transformer = bfq.load_transformer("you/pixart-2bit")  # a diffusers PixArtTransformer2DModel' in card
    assert "pipeline (PixArtSigmaPipeline) whose `transformer/` holds" in card and "# a PixArtSigmaPipeline" in card
    assert "- pixart" in card and "UNet" not in card
    for block in ("transformer_blocks.0", "transformer_blocks.1", "caption_projection", "pos_embed/proj_out"):
        assert f"\n| {block} | " in card, block
    assert "\n| pos_embed/proj_out | 2 | 2,304 | 8-bit ×2 | 8.01 |\n" in card  # log2(257) bits


# ------------------------------------------------------------------------- the bundled tiny-pixart


def test_eval_tiny_pixart_and_a_file_made_from_it(tmp_path):
    """`bfq quantize tiny-pixart` caches its metric's 20 steps of its own sampler; `bfq eval` scores
    tiny-pixart and the file with tiny-pixart's pipeline (the file with the sampler it caches)."""
    from bfq.format import open_bfq
    from bfq.tinypixart import pipeline_dir

    runner = CliRunner()
    out = tmp_path / "t.bfq"
    made = runner.invoke(main, ["quantize", "tiny-pixart", "--recipe", "uniform-4", "--quiet", "-o", str(out)])
    assert made.exit_code == 0, made.output
    with open_bfq(out) as f:
        assert len(f.header.time_cache.timesteps) == 20 and "DPMSolverMultistepScheduler" in f.header.metadata["scheduler"]
    results = {}
    for model in ("tiny-pixart", str(out)):
        result = runner.invoke(main, ["eval", model, "--n-per-digit", "3", "--cfg", "3", "--quiet", "--json"])
        assert result.exit_code == 0, result.output
        results[model] = json.loads(result.stdout)
        assert results[model]["settings"]["base"] == str(pipeline_dir()) and results[model]["settings"]["steps"] == 20
    assert results["tiny-pixart"]["alignment"] >= 0.9 and results[str(out)]["alignment"] >= 0.5


def test_push_a_pixart_file_with_a_preview(quantized, pipe_dir, tmp_path, monkeypatch):
    """`bfq push --preview` of a PixArt file: a PixArtSigmaPipeline repo (transformer/ in bfq's
    diffusers layout, the file's scheduler, the base's T5 encoder, tokenizer and VAE), a preview grid
    made with the quantized transformer, and a card that shows it and loads the transformer."""
    from tests.hub_server import FakeHub, point_client_at

    repo = "user/pixart-2bit"
    with FakeHub(token="hf_test") as hub:
        point_client_at(monkeypatch, hub.url, tmp_path / "hf-home", token="hf_test")
        result = CliRunner().invoke(main, ["push", str(quantized[1]), "--repo", repo, "--base", str(pipe_dir),
                                           "--preview-prompt", "seven", "--preview-prompt", "two"])  # fmt: skip
        assert result.exit_code == 0, result.output
        files = set(hub.files(repo))
        card = hub.file(repo, "README.md").decode()
        assert json.loads(hub.file(repo, "model_index.json"))["_class_name"] == "PixArtSigmaPipeline"
        assert json.loads(hub.file(repo, "transformer/config.json"))["quantization_config"]["quant_method"] == "bfq"
    assert {"ft.bfq", "preview.png", "transformer/config.json", "text_encoder/config.json", "tokenizer/tokenizer.json",
            "vae/config.json", "scheduler/scheduler_config.json"} <= files and not any(f.startswith("unet/") for f in files)  # fmt: skip
    assert "![preview grid generated with this model](preview.png)" in card and "'seven'; 'two'" in card
    assert f'transformer = bfq.load_transformer("{repo}")' in card and "whose `transformer/` holds" in card
