"""bfq as a diffusers backend: the diffusers layout (FORMAT.md appendix A), `bfq convert`, and
``import bfq`` + plain ``DiffusionPipeline.from_pretrained`` on a bfq folder (real diffusers, tiny-sd)."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from bfq_cli.main import main
from click.testing import CliRunner

import bfq
from bfq.format.diffusers_layout import WEIGHTS_NAME, read_layout
from bfq.runtime.packed import packed_layers

ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT / "spec" / "vectors"
GOLDEN = ROOT / "spec" / "diffusers" / "time_scheduler"
PROMPT = ["a handwritten digit seven"]


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# ------------------------------------------------------------------------- the layout


@pytest.mark.parametrize("vector", sorted(p.name for p in VECTORS.glob("*.bfq")))
def test_bfq_to_folder_and_back_is_bit_exact(vector, tmp_path):
    result = _cli("convert", VECTORS / vector, "-o", tmp_path / "dir")
    assert result.exit_code == 0, result.output
    component = "transformer" if vector.startswith("pixart") else "unet"  # Appendix A: DiT files in transformer/
    assert (tmp_path / "dir" / component / WEIGHTS_NAME).is_file()
    result = _cli("convert", tmp_path / "dir", "-o", tmp_path / "back.bfq")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "back.bfq").read_bytes() == (VECTORS / vector).read_bytes()


def test_golden_folder_is_the_time_scheduler_vector(tmp_path):
    """spec/diffusers/time_scheduler/ is what the writer makes of spec/vectors/time_scheduler.bfq,
    and it holds that file's bytes; the safetensors library reads it with the documented names."""
    from safetensors import safe_open

    assert _cli("convert", VECTORS / "time_scheduler.bfq", "-o", tmp_path).exit_code == 0
    for name in ("config.json", WEIGHTS_NAME):
        assert (tmp_path / "unet" / name).read_bytes() == (GOLDEN / "unet" / name).read_bytes()
    assert bytes(read_layout(GOLDEN)) == (VECTORS / "time_scheduler.bfq").read_bytes()
    config = json.loads((GOLDEN / "unet" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bfq"
    assert config["quantization_config"]["time_cache"] == "scheduler"
    with safe_open(GOLDEN / "unet" / WEIGHTS_NAME, "pt") as f:
        assert set(f.keys()) == {
            "down_blocks.0.resnets.0.conv1.weight.bfq_codes", "down_blocks.0.resnets.0.conv1.weight.bfq_scales",
            "down_blocks.0.resnets.0.conv1.bias", "bfq_time_cache.down_blocks.0.resnets.0",
            "bfq_time_cache.mid_block.resnets.0", "bfq_time_cache.up_blocks.1.resnets.2"}  # fmt: skip
        assert f.get_tensor("down_blocks.0.resnets.0.conv1.weight.bfq_scales").dtype == torch.float16
        assert f.metadata()["bfq_layout"] == "1"


def test_golden_folder_of_the_dit_kind_is_the_pixart_vector(tmp_path):
    """spec/diffusers/pixart_scheduler/ is spec/vectors/pixart_scheduler.bfq in the layout: component
    folder transformer/ (FORMAT.md appendix A, §2.3.2), the adaLN-single tables under their keys."""
    from safetensors import safe_open

    golden = GOLDEN.parent / "pixart_scheduler"
    assert _cli("convert", VECTORS / "pixart_scheduler.bfq", "-o", tmp_path).exit_code == 0
    for name in ("config.json", WEIGHTS_NAME):
        assert (tmp_path / "transformer" / name).read_bytes() == (golden / "transformer" / name).read_bytes()
    assert bytes(read_layout(golden)) == (VECTORS / "pixart_scheduler.bfq").read_bytes()
    with safe_open(golden / "transformer" / WEIGHTS_NAME, "pt") as f:
        assert {"bfq_time_cache.adaln_single.linear", "bfq_time_cache.adaln_single.emb"} <= set(f.keys())


def _rewrite(folder: Path, edit) -> None:
    """Apply ``edit`` to the safetensors header of ``folder``'s weights file (data untouched)."""
    path = folder / "unet" / WEIGHTS_NAME
    data = path.read_bytes()
    (n,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


@pytest.mark.parametrize("edit, message", [
    (lambda h: h.pop("down_blocks.0.resnets.0.conv1.bias"), "is missing"),
    (lambda h: h.update(extra={"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}), "does not describe: extra"),
    (lambda h: h["down_blocks.0.resnets.0.conv1.bias"].update(dtype="F16"), "the header says F32"),
    (lambda h: h["__metadata__"].pop("bfq_header"), "no bfq layout 1 metadata"),
])  # fmt: skip
def test_a_malformed_folder_is_one_format_error(tmp_path, edit, message):
    assert _cli("convert", VECTORS / "time_scheduler.bfq", "-o", tmp_path / "dir").exit_code == 0
    _rewrite(tmp_path / "dir", edit)
    with pytest.raises(bfq.BfqFormatError, match=message):
        read_layout(tmp_path / "dir")
    for args in (("verify", tmp_path / "dir"), ("convert", tmp_path / "dir", "-o", tmp_path / "x.bfq")):
        result = _cli(*args)
        assert result.exit_code == 2 and "bfq: error:" in result.output and message.split(":")[0] in result.output
    assert not (tmp_path / "x.bfq").exists()


def test_a_changed_block_fails_verify(tmp_path):
    assert _cli("convert", VECTORS / "time_scheduler.bfq", "-o", tmp_path / "dir").exit_code == 0
    path = tmp_path / "dir" / "unet" / WEIGHTS_NAME
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(data)
    result = _cli("verify", tmp_path / "dir")
    assert result.exit_code == 2 and "crc32" in result.output


def test_convert_never_replaces_what_it_should_not(tmp_path):
    assert _cli("convert", VECTORS / "dense.bfq", "-o", tmp_path / "dir").exit_code == 0
    before = (tmp_path / "dir" / "unet" / WEIGHTS_NAME).read_bytes()
    result = _cli("convert", VECTORS / "time_grid.bfq", "-o", tmp_path / "dir")
    assert result.exit_code == 2 and "already exists" in result.output
    assert (tmp_path / "dir" / "unet" / WEIGHTS_NAME).read_bytes() == before
    (tmp_path / "keep.bfq").write_bytes(b"mine")
    result = _cli("convert", tmp_path / "dir", "-o", tmp_path / "keep.bfq")
    assert result.exit_code == 2 and "--force" in result.output and (tmp_path / "keep.bfq").read_bytes() == b"mine"
    result = _cli("convert", tmp_path / "dir", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "FILE.bfq" in result.output


# ------------------------------------------------------------------------- registration


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize("order", ["bfq first", "diffusers first"])
def test_import_bfq_registers_the_backend_either_way(order):
    first, second = ("import bfq", "import diffusers.quantizers.auto as a") if order == "bfq first" else (
        "import diffusers.quantizers.auto as a", "import bfq")  # fmt: skip
    code = (f"import sys; {first}; {second}; import diffusers.quantizers.auto as a; "
            "from bfq.diffusers.quantizer import BfqQuantizer, BfqConfig; "
            "assert a.AUTO_QUANTIZER_MAPPING['bfq'] is BfqQuantizer; "
            "assert a.AUTO_QUANTIZATION_CONFIG_MAPPING['bfq'] is BfqConfig; assert bfq.BfqConfig is BfqConfig; "
            "assert not {'numba', 'bfq.runtime.load'} & set(sys.modules)")  # registering stays light: no numba, no loader  # fmt: skip
    result = _python(code)
    assert result.returncode == 0, result.stderr


def test_another_diffusers_version_fails_registration_with_one_clear_message(monkeypatch):
    import diffusers

    import bfq.diffusers as integration

    monkeypatch.setattr(diffusers, "__version__", "0.36.0")
    with pytest.raises(integration.DiffusersVersionError, match=r"diffusers 0.36.0 is outside the range bfq supports \(>=0.42,<0.43\)"):
        integration.register()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        integration.register_or_warn()
    assert len(caught) == 1 and "use bfq.load_unet instead" in str(caught[0].message)
    monkeypatch.setattr(diffusers, "__version__", "0.42.1")
    from diffusers.quantizers.base import DiffusersQuantizer

    monkeypatch.delattr(DiffusersQuantizer, "maybe_update_loaded_keys")
    with pytest.raises(integration.DiffusersVersionError, match="has no maybe_update_loaded_keys"):
        integration.register()


# ------------------------------------------------------------------------- tiny-sd through diffusers


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny-sd quantized (uniform 2-bit, scheduler cache for 4 steps) as a .bfq, and a pipeline
    folder with the other components copied and the unet in the diffusers layout."""
    from bfq.pipeline.quantize import quantize
    from bfq.tinysd import pipeline_dir

    root = tmp_path_factory.mktemp("native")
    path = quantize("tiny-sd", root / "tiny.bfq", recipe="uniform-2", steps=4, progress=False).path
    pipe = root / "pipe"
    shutil.copytree(pipeline_dir(), pipe, ignore=shutil.ignore_patterns("unet", "TRAINING.json"))
    assert _cli("convert", path, "-o", pipe).exit_code == 0
    return Path(path), pipe


def _images(pipe, steps=4):
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
                output_type="np").images  # fmt: skip


@pytest.fixture(scope="module")
def reference(tiny):
    return _images(bfq.load_pipeline(str(tiny[0]), device="cpu", runtime="packed", compute="fp32"))  # diffusers loads float32


def test_from_pretrained_builds_the_packed_runtime_and_generates_the_same_images(tiny, reference):
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    pipe = DiffusionPipeline.from_pretrained(tiny[1])
    assert type(pipe.unet) is UNet2DConditionModel and len(packed_layers(pipe.unet)) == 119
    assert pipe.unet.hf_quantizer.quantization_config.quant_method == "bfq"
    assert np.array_equal(_images(pipe), reference)
    unet = UNet2DConditionModel.from_pretrained(tiny[1], subfolder="unet")
    assert {n: m.codes for n, m in packed_layers(unet)}.keys() == {n for n, _ in packed_layers(pipe.unet)}


def test_save_pretrained_round_trip_is_bit_exact(tiny, tmp_path):
    """The model's own save_pretrained, diffusers' ModelMixin.save_pretrained (the quantizer's
    state dict) and the pipeline's: each writes a folder holding the original .bfq's bytes."""
    from diffusers import DiffusionPipeline, ModelMixin, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny[1], subfolder="unet")
    unet.save_pretrained(tmp_path / "own")
    ModelMixin.save_pretrained(unet, tmp_path / "diffusers")
    pipe = DiffusionPipeline.from_pretrained(tiny[1])
    pipe.save_pretrained(tmp_path / "pipe")
    original = tiny[0].read_bytes()
    for folder in ("own", "diffusers", "pipe"):
        assert bytes(read_layout(tmp_path / folder)) == original, folder
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "diffusers")
    assert len(packed_layers(reloaded)) == 119
    # a model from bfq.load_unet saves the same folder
    bfq.load_unet(tiny[0]).save_pretrained(tmp_path / "loaded")
    assert bytes(read_layout(tmp_path / "loaded")) == original


def test_offloading_keeps_the_packed_layers(tiny, reference):
    """enable_model_cpu_offload on the whole pipeline; group offloading (leaf and block level) and
    enable_sequential_cpu_offload's per-module
    hooks (accelerate.cpu_offload, which rebuilds every parameter with ``cls(t, requires_grad=...)``
    and moves it to meta and back) on the bfq UNet. (With transformers 5 the whole-pipeline
    sequential offload fails in the CLIP text encoder's Embedding, with or without bfq.)"""
    from accelerate import cpu_offload
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny[1])
    pipe.enable_model_cpu_offload(device="cpu")
    assert np.array_equal(_images(pipe), reference)
    pipe = DiffusionPipeline.from_pretrained(tiny[1])
    cpu_offload(pipe.unet, execution_device=torch.device("cpu"), offload_buffers=len(pipe.unet._parameters) > 0)
    assert any(p.is_meta for p in pipe.unet.parameters())  # really offloaded between forwards
    assert np.array_equal(_images(pipe), reference)
    assert len(packed_layers(pipe.unet)) == 119
    for offload_type in ("leaf_level", "block_level"):  # diffusers' group offloading
        pipe = DiffusionPipeline.from_pretrained(tiny[1])
        cpu = torch.device("cpu")
        pipe.unet.enable_group_offload(onload_device=cpu, offload_device=cpu, offload_type=offload_type,
                                       **({"num_blocks_per_group": 1} if offload_type == "block_level" else {}))  # fmt: skip
        assert np.array_equal(_images(pipe), reference), offload_type


def test_to_dtype_and_dequantize(tiny):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny[1], subfolder="unet")
    dense = bfq.load_unet(tiny[0], runtime="dense")
    sample = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ehs = torch.randn(1, 7, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    t = bfq.format.open_bfq(tiny[0]).header.time_cache.timesteps[0]
    with torch.no_grad():
        expected = dense(sample, t, ehs).sample
        assert torch.equal(unet(sample, t, ehs).sample, expected)
        assert torch.equal(unet.to("cpu")(sample, t, ehs).sample, expected)
        with pytest.raises(ValueError, match="Casting a quantized model to a new `dtype` is unsupported"):
            unet.to(torch.bfloat16)  # diffusers' rule for every quantized model: torch_dtype= at load instead
        half = UNet2DConditionModel.from_pretrained(tiny[1], subfolder="unet", torch_dtype=torch.bfloat16)
        assert {m._compute.dtype for _, m in packed_layers(half)} == {torch.bfloat16}
        assert half(sample.bfloat16(), t, ehs.bfloat16()).sample.dtype == torch.bfloat16
        unet.dequantize()
        assert not packed_layers(unet) and not hasattr(unet, "hf_quantizer")
        assert torch.equal(unet(sample, t, ehs).sample, expected)


def test_lora_through_load_lora_weights_equals_the_bfq_pipeline(tiny, tmp_path):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from bfq.tinysd import pipeline_dir

    unet = UNet2DConditionModel.from_pretrained(pipeline_dir(), subfolder="unet")
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_v", "conv1"]))
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(unet))
    pipes = [DiffusionPipeline.from_pretrained(tiny[1]), bfq.load_pipeline(str(tiny[0]), device="cpu", runtime="packed", compute="fp32")]
    images = []
    for pipe in pipes:
        pipe.load_lora_weights(tmp_path / "lora")
        images.append(_images(pipe))
    assert np.array_equal(images[0], images[1])
    assert len(packed_layers(pipes[0].unet)) == 119


def test_torch_compile_has_no_graph_break(tiny):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny[1], subfolder="unet")
    t = bfq.format.open_bfq(tiny[0]).header.time_cache.timesteps[0]
    sample = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ehs = torch.randn(1, 7, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(unet, backend=backend, fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(sample, t, ehs).sample, unet(sample, t, ehs).sample)
    ops = [str(n.target) for n in graphs[-1].graph.nodes if n.op == "call_function"]
    assert any("bfq.dequantize" in op for op in ops)


def test_quantizing_on_load_equals_bfq_quantize_and_saves_the_layout(tiny, tmp_path):
    """quantization_config=bfq.BfqConfig(...) on a float model (alone, or through
    PipelineQuantizationConfig) quantizes as `bfq quantize` does (same codes and scales) and keeps
    the model packed; save_pretrained writes a bfq folder that loads back packed."""
    from diffusers import DiffusionPipeline, PipelineQuantizationConfig, UNet2DConditionModel

    from bfq.tinysd import pipeline_dir

    config = bfq.BfqConfig(recipe="uniform-2", steps=4)
    unet = UNet2DConditionModel.from_pretrained(pipeline_dir(), subfolder="unet", quantization_config=config)
    expected = bfq.load_unet(tiny[0])
    assert unet.hf_quantizer.quantization_config.time_cache == "scheduler"
    ours = {n: (m.codes, m.scale_bits) for n, m in packed_layers(unet)}
    theirs = {n: (m.codes, m.scale_bits) for n, m in packed_layers(expected)}
    assert ours.keys() == theirs.keys() and len(ours) == 119
    assert all(torch.equal(ours[n][0], theirs[n][0]) and torch.equal(ours[n][1], theirs[n][1]) for n in ours)
    unet.save_pretrained(tmp_path / "unet")
    saved = json.loads((tmp_path / "unet" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "bfq" and saved["layer_bits"] == {"2": 117, "8": 2}
    assert len(packed_layers(UNet2DConditionModel.from_pretrained(tmp_path / "unet"))) == 119
    mapping = PipelineQuantizationConfig(quant_mapping={"unet": bfq.BfqConfig(recipe="uniform-2", steps=4)})
    pipe = DiffusionPipeline.from_pretrained(pipeline_dir(), quantization_config=mapping)
    pipe.save_pretrained(tmp_path / "pipe")
    assert bytes(read_layout(tmp_path / "pipe")) == bytes(read_layout(tmp_path / "unet"))


@pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")
def test_push_then_from_pretrained_in_a_fresh_process_generates_the_bfq_images(tiny, reference, tmp_path, monkeypatch):
    """`bfq push` (by default the diffusers pipeline) of tiny-sd's .bfq to the local Hub; a fresh
    Python process that runs plain diffusers + `import bfq` on the repo id, offline from the Hub cache
    the second time, generates the images `bfq.load_pipeline` makes from the .bfq (the same prompt,
    seed and steps)."""
    from tests.hub_server import FakeHub, point_client_at

    token = "hf_TestTokenMustNeverLeak0123456789"
    with FakeHub(token=token) as server:
        point_client_at(monkeypatch, server.url, tmp_path / "hf-home", token=token)
        result = _cli("push", tiny[0], "--repo", "user/tiny-diffusers")
        assert result.exit_code == 0, result.output
        card = server.file("user/tiny-diffusers", "README.md").decode()
        assert 'pipe = DiffusionPipeline.from_pretrained("user/tiny-diffusers")' in card and "import bfq" in card
        code = ("import sys, bfq, torch, numpy as np\n"
                "from diffusers import DiffusionPipeline\n"
                "pipe = DiffusionPipeline.from_pretrained('user/tiny-diffusers')\n"
                "from bfq.runtime.packed import packed_layers\n"
                "assert len(packed_layers(pipe.unet)) == 119\n"
                f"images = pipe({PROMPT!r}, num_inference_steps=4, guidance_scale=3.0, generator=torch.Generator().manual_seed(0), output_type='np').images\n"
                "np.save(sys.argv[1], images)\n")  # fmt: skip
        for offline, out in (("0", tmp_path / "online.npy"), ("1", tmp_path / "offline.npy")):
            env = {**__import__("os").environ, "HF_HUB_OFFLINE": offline, "OMP_NUM_THREADS": "1"}
            run = subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT, env=env, capture_output=True, text=True)
            assert run.returncode == 0, run.stderr[-3000:]
            assert np.array_equal(np.load(out), reference), offline


def test_dense_runtime_and_verify_build_of_a_folder(tiny):
    """BfqConfig(runtime="dense") when quantizing on load, when loading a saved folder (the caller's
    runtime over the folder's saved config), and bfq.load_unet(folder, runtime="dense") decode every
    layer once and compute what the packed model computes; `bfq verify --build` builds a folder."""
    from diffusers import UNet2DConditionModel

    from bfq.tinysd import pipeline_dir

    dense = UNet2DConditionModel.from_pretrained(pipeline_dir(), subfolder="unet",
                                                 quantization_config=bfq.BfqConfig(recipe="uniform-2", steps=4, runtime="dense"))  # fmt: skip
    from_folder = bfq.load_unet(tiny[1], runtime="dense")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "the model's quantization_config will be used" warning
        saved = UNet2DConditionModel.from_pretrained(tiny[1], subfolder="unet", quantization_config=bfq.BfqConfig(runtime="dense"))
    packed = bfq.load_unet(tiny[0])
    assert not packed_layers(dense) and not packed_layers(from_folder) and not packed_layers(saved)
    t = bfq.format.open_bfq(tiny[0]).header.time_cache.timesteps[0]
    sample = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ehs = torch.randn(1, 7, packed.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = packed(sample, t, ehs).sample
        assert torch.equal(dense(sample, t, ehs).sample, expected)
        assert torch.equal(from_folder(sample, t, ehs).sample, expected)
        assert torch.equal(saved(sample, t, ehs).sample, expected)
    result = _cli("verify", tiny[1], "--build")
    assert result.exit_code == 0 and "ok:" in result.output and "not checked" not in result.output, result.output


def test_runtimes_of_the_config_are_the_loaders():
    from bfq.diffusers.quantizer import RUNTIMES
    from bfq.runtime.load import RUNTIMES as LOADER_RUNTIMES

    assert RUNTIMES == LOADER_RUNTIMES
    with pytest.raises(ValueError, match="runtime must be one of auto, packed, dense"):
        bfq.BfqConfig(runtime="fast")
