"""The packed runtime (bfq.runtime.packed, bfq.runtime.decode): a UNet whose quantized layers keep
their code words computes what the dense loader's UNet computes, behaves as a diffusers model
(.to, state_dict, pipelines, offload hooks, torch.compile, LoRA) and holds far less memory."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import bfq
from bfq import BfqFormatError
from bfq.format import pack
from bfq.format.constants import choose_packing, is_legal_packing, num_levels, word_bits_for
from bfq.runtime.decode import decode_torch, dequantize
from bfq.runtime.packed import PackedConv2d, PackedLinear, PackedWeightError, packed_layers, resident_bytes
from tests import reference
from tests.helpers import layer_weights, tiny_inputs, tiny_unet

SHAPE = [7, 3, 3, 3]  # 7 channels of 27 weights: words straddle channels for every (g, k) below


def _packings(levels_count: int) -> list[tuple[int, int]]:
    """The writer's (g, k) plus other legal ones: one digit a word, an odd g, and 64-bit words."""
    out = {choose_packing(levels_count), (1, word_bits_for(levels_count, 1)), (3, word_bits_for(levels_count, 3))}
    g64 = max(g for g in range(1, 65) if levels_count**g <= 1 << 64)
    out.add((g64, 64))
    return sorted(p for p in out if is_legal_packing(levels_count, *p))


def _stream(bits: int, levels: str, g: int, k: int, seed: int = 0):
    """Random codes packed by the big-int reference writer (it covers the non-fast-path (g, k) too)."""
    L = num_levels(bits, levels)
    q = np.random.default_rng(seed).integers(0, L, size=int(np.prod(SHAPE))) - (1 << (bits - 1))
    stream = np.array(reference.pack(q.tolist(), bits, levels, g, k), dtype=np.uint64)
    return torch.from_numpy(stream.view(np.int64)), L


@pytest.mark.parametrize("levels", ["balanced", "plain"])
@pytest.mark.parametrize("bits", range(1, 9))
def test_torch_decoder_matches_numba_bit_for_bit(bits, levels):
    rng = np.random.default_rng(bits)
    for g, k in _packings(num_levels(bits, levels)):
        codes, L = _stream(bits, levels, g, k, seed=g * 100 + k)
        for scale_dtype, bits_dtype in ((np.float16, np.int16), (np.float32, np.int32)):
            scales = (rng.standard_normal(SHAPE[0]) * 0.05).astype(scale_dtype)
            scale_bits = torch.from_numpy(scales.view(bits_dtype))
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                for c0, c1 in ((0, 7), (1, 6), (3, 4)):
                    a = dequantize(codes, scale_bits, SHAPE, bits, L, g, k, c0, c1, dtype)  # numba on the CPU
                    b = decode_torch(codes, scale_bits, SHAPE, bits, L, g, k, c0, c1, dtype)
                    assert a.dtype == b.dtype == dtype and a.shape == b.shape == (c1 - c0, *SHAPE[1:])
                    assert torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)), (g, k, dtype, c0)


def test_decoded_values_are_the_format_definition():
    """float32(scale) * float32(q), one binary32 multiply, then rounded: checked from the codes."""
    bits, levels = 2, "balanced"
    g, k = choose_packing(5)
    codes, L = _stream(bits, levels, g, k)
    q = pack.unpack_codes(codes.numpy().view(np.uint64), int(np.prod(SHAPE)), bits, levels, g, k).reshape(SHAPE[0], -1)
    scales = np.linspace(-0.3, 0.7, SHAPE[0]).astype(np.float32)
    expected = torch.from_numpy(scales[:, None] * q.astype(np.float32))
    got = dequantize(codes, torch.from_numpy(scales.view(np.int32)), SHAPE, bits, L, g, k, 0, SHAPE[0], torch.float32)
    assert torch.equal(got.view(SHAPE[0], -1), expected)
    half = dequantize(codes, torch.from_numpy(scales.view(np.int32)), SHAPE, bits, L, g, k, 0, SHAPE[0], torch.float16)
    assert torch.equal(half.view(SHAPE[0], -1), expected.half())


# ----------------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny UNet quantized with every bit-width 1..8 (balanced and plain levels), grid time cache."""
    from bfq.pipeline.quantize import quantize
    from bfq.quant.recipe import quantizable_layers

    root = tmp_path_factory.mktemp("packed")
    unet_dir = root / "unet"
    tiny_unet(seed=5).save_pretrained(unet_dir)
    names = list(quantizable_layers(tiny_unet(seed=5), "grid"))
    out = {}
    for levels in ("balanced", "plain"):
        recipe = root / f"{levels}.json"
        bits = {name: 1 + i % 8 for i, name in enumerate(names)}
        recipe.write_text(json.dumps({"format": "bfq-recipe", "version": 1, "name": "mixed", "levels": levels, "bits": bits}))
        out[levels] = quantize(str(unet_dir), root / f"{levels}.bfq", recipe=str(recipe), time_cache="grid",
                               progress=False).path  # fmt: skip
    return out


def _run(unet, t=37):
    sample, ehs = tiny_inputs(unet, seq=5)
    dtype = unet.conv_in.bias.dtype
    with torch.no_grad():
        return unet(sample.to(dtype), t, ehs.to(dtype)).sample


@pytest.mark.parametrize("levels", ["balanced", "plain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_packed_outputs_equal_dense_bit_for_bit(files, levels, dtype):
    dense = bfq.load_unet(files[levels], runtime="dense", dtype=dtype)
    packed = bfq.load_unet(files[levels], runtime="packed", dtype=dtype)
    with bfq.format.open_bfq(files[levels]) as f:
        quantized = {name[: -len(".weight")] for name in f.layers}
    assert {name for name, _ in packed_layers(packed)} == quantized and not packed_layers(dense)
    assert torch.equal(_run(packed), _run(dense))
    for name, w in layer_weights(packed).items():
        assert torch.equal(w, layer_weights(dense)[name]), name


def test_blocked_layers_agree_within_float_rounding(files):
    dense = bfq.load_unet(files["balanced"], runtime="dense")
    blocked = bfq.load_unet(files["balanced"], runtime="packed", workspace_bytes=256)  # every layer in blocks
    assert any(len(m._blocks()) > 1 for _, m in packed_layers(blocked))
    a, b = _run(dense), _run(blocked)
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()


def test_dtype_changes_compute_dtype_never_codes(files):
    packed = bfq.load_unet(files["balanced"], runtime="packed")
    before = {k: v.clone() for k, v in packed.state_dict().items() if k.endswith(("codes", "scale_bits"))}
    packed.to(torch.float16)
    assert torch.equal(_run(packed), _run(bfq.load_unet(files["balanced"], runtime="dense", dtype=torch.float16)))
    packed.to(torch.float32)
    after = packed.state_dict()
    assert all(torch.equal(after[k], v) and after[k].dtype == v.dtype for k, v in before.items())
    dense = bfq.load_unet(files["balanced"], runtime="dense")
    assert all(torch.equal(w, layer_weights(dense)[n]) for n, w in layer_weights(packed).items())  # not rounded


def test_state_dict_holds_codes_and_round_trips(files):
    packed = bfq.load_unet(files["balanced"], runtime="packed")
    state = packed.state_dict()
    quantized = {f"{name}.weight" for name, _ in packed_layers(packed)}
    assert not quantized & set(state)  # no silently dequantized weights
    assert all(f"{n[:-7]}.codes" in state and state[f"{n[:-7]}.codes"].dtype == torch.int64 for n in quantized)
    other = bfq.load_unet(files["balanced"], runtime="packed")
    for _, layer in packed_layers(other):
        layer.codes.zero_()
    assert not torch.equal(_run(other), _run(packed))
    other.load_state_dict(state)
    assert torch.equal(_run(other), _run(packed))


def test_weight_is_a_read_only_view(files):
    packed = bfq.load_unet(files["balanced"], runtime="packed")
    layer = packed.conv_in
    assert isinstance(layer, PackedConv2d) and layer.weight.shape == (8, 4, 3, 3)
    with pytest.raises(PackedWeightError, match="LoRA"):
        layer.weight.data += 1
    with pytest.raises(PackedWeightError):
        layer.weight = torch.nn.Parameter(torch.zeros(8, 4, 3, 3))
    # constructing a packed class like its torch class (what PEFT does for adapters) gives the plain layer
    plain = PackedConv2d(4, 2, 3)
    assert type(plain) is torch.nn.Conv2d and type(PackedLinear(3, 2)) is torch.nn.Linear


def _no_grad_add(weight):
    with torch.no_grad():
        weight.add_(1)


@pytest.mark.parametrize("edit", [
    lambda w: w.mul_(2), torch.nn.init.zeros_, torch.nn.init.kaiming_uniform_, lambda w: w.data.copy_(torch.ones_like(w)),
    _no_grad_add, lambda w: w.__setitem__(0, 1.0), lambda w: w.__iadd__(1), lambda w: w[1].zero_(),
    lambda w: w.detach().fill_(0), lambda w: w.unbind(0)[0].sub_(1), lambda w: torch.mul(w, 2, out=w),
    lambda w: torch._foreach_mul_([w], 2.0),
], ids=["mul_", "init.zeros_", "init.kaiming", "data.copy_", "no_grad add_", "setitem", "+=", "slice", "detach",
        "unbind", "out=", "foreach"])  # fmt: skip
def test_in_place_edits_of_the_weight_are_refused_not_lost(files, edit):
    """module.weight is decoded from the codes at each access: an edit would vanish, so it is refused."""
    packed = bfq.load_unet(files["balanced"], runtime="packed")
    before = _run(packed)
    with pytest.raises(PackedWeightError, match="runtime='dense'"):
        edit(packed.conv_in.weight)
    assert torch.equal(_run(packed), before)
    fresh = packed.conv_in.weight * 2  # results that are new tensors are the user's to change
    fresh.mul_(3)
    copy = packed.conv_in.weight.clone()
    copy.zero_()
    assert type(copy) is torch.Tensor and not copy.any() and packed.conv_in.weight.requires_grad_(False) is not None


def test_memory_mapped_codes_equal_read_codes(files):
    mapped = bfq.load_unet(files["balanced"], runtime="packed", mmap=True)
    read = bfq.load_unet(files["balanced"], runtime="packed")
    assert torch.equal(_run(mapped), _run(read))


def test_resident_memory_is_codes_scales_dense_tensors_and_one_workspace(files):
    packed = bfq.load_unet(files["balanced"], runtime="packed")
    dense = bfq.load_unet(files["balanced"], runtime="dense")
    _run(packed)
    layers = packed_layers(packed)
    stored = sum(m.codes.numel() * 8 + m.scale_bits.numel() * m.scale_bits.element_size() for _, m in layers)
    others = resident_bytes(dense) - 4 * sum(m.weight_shape[0] * m.per_channel for _, m in layers)
    workspace = max(m.weight_shape[0] * m.per_channel for _, m in layers) * 4
    assert resident_bytes(packed) == stored + others + workspace
    assert resident_bytes(packed) < resident_bytes(dense)


def test_gradients_flow_through_packed_layers(files):
    """Training an adapter on a packed model: the input gradient equals the dense model's (the
    weights autograd keeps are not the shared workspace)."""
    dense = bfq.load_unet(files["balanced"], runtime="dense")
    packed = bfq.load_unet(files["balanced"], runtime="packed", workspace_bytes=4096)
    grads = []
    for unet in (dense, packed):
        sample, ehs = tiny_inputs(unet, seq=5)
        sample.requires_grad_(True)
        unet(sample, 37, ehs).sample.pow(2).sum().backward()
        grads.append(sample.grad)
    assert (grads[0] - grads[1]).abs().max() <= 1e-5 * grads[0].abs().max()


def test_corrupt_codes_are_refused_like_the_dense_loader(files, tmp_path):
    data = bytearray(files["balanced"].read_bytes())
    data[-3] ^= 0xFF  # inside the last block
    bad = tmp_path / "bad.bfq"
    bad.write_bytes(bytes(data))
    for runtime in ("packed", "dense"):
        with pytest.raises(BfqFormatError, match="crc32"):
            bfq.load_unet(bad, runtime=runtime)


def test_unknown_runtime_or_missing_device_is_one_clear_error(files):
    with pytest.raises(ValueError, match="runtime must be one of"):
        bfq.load_unet(files["balanced"], runtime="fast")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no cuda device"):
            bfq.load_unet(files["balanced"], device="cuda")
    with pytest.raises(ValueError, match="is not a device"):
        bfq.load_unet(files["balanced"], device="tpu")


@pytest.fixture(scope="module")
def scheduler_file(tmp_path_factory):
    """The tiny UNet in a pipeline folder with a DDIM scheduler, quantized with the default
    (scheduler) time cache for 4 steps: the cache lookup is data-dependent."""
    from diffusers import DDIMScheduler

    from bfq.pipeline.quantize import quantize

    root = tmp_path_factory.mktemp("sched")
    tiny_unet(seed=5).save_pretrained(root / "pipe" / "unet")
    DDIMScheduler(num_train_timesteps=1000).save_pretrained(root / "pipe" / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "scheduler": ["diffusers", "DDIMScheduler"]}  # fmt: skip
    (root / "pipe" / "model_index.json").write_text(json.dumps(index))
    path = quantize(str(root / "pipe"), root / "sched.bfq", recipe="uniform-2", steps=4, progress=False).path
    with bfq.format.open_bfq(path) as f:
        assert f.header.time_cache.mode == "scheduler"
        timesteps = [torch.tensor(int(t)) for t in f.header.time_cache.timesteps]
    return path, timesteps


def _compile_cases(files, scheduler_file):
    return {"grid": (files["balanced"], [torch.tensor(37), torch.tensor(981), torch.tensor(500)]), "scheduler": scheduler_file}


@pytest.mark.parametrize("cache", ["grid", "scheduler"])
def test_torch_compile_traces_the_decode_as_one_op(files, scheduler_file, cache):
    """torch.compile(unet, fullgraph=True), as diffusers' docs write it, on both time-cache modes:
    Dynamo captures the whole UNet in one graph (fullgraph fails on any graph break) that serves
    every timestep without recompiling, each packed layer's decode as the opaque bfq::dequantize op
    (one per block), the scheduler cache's lookup as tensor ops with an assert inside the graph; the
    compiled model computes the eager one's outputs and refuses an uncached timestep. The inductor
    backend is covered by the slow test below and by bench/packed_bench.py."""
    path, timesteps = _compile_cases(files, scheduler_file)[cache]
    packed = bfq.load_unet(path, runtime="packed")
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(packed, backend=recording_backend, fullgraph=True)
    for t in timesteps:
        assert torch.equal(_run(compiled, t), _run(packed, t))
    # one graph for every timestep; the scheduler cache's forward pre-hook (it records the timestep
    # and finds its cache rows) is a frame of its own to Dynamo, which calls module hooks outside
    assert len(graphs) == (2 if cache == "scheduler" else 1)
    ops = [str(n.target) for n in graphs[-1].graph.nodes if n.op == "call_function"]
    assert sum("bfq.dequantize" in op for op in ops) == sum(len(m._blocks()) for _, m in packed_layers(packed))
    if cache == "scheduler":
        with pytest.raises(RuntimeError, match="not in the time-feature cache; cached timesteps: \\[.*\\]"):
            _run(compiled, timesteps[0] + 1)


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["grid", "scheduler"])
def test_torch_compile_inductor_matches_eager(files, scheduler_file, cache):
    path, timesteps = _compile_cases(files, scheduler_file)[cache]
    packed = bfq.load_unet(path, runtime="packed")
    torch._dynamo.reset()
    compiled = torch.compile(packed, fullgraph=True)
    for t in timesteps[:2]:
        assert torch.allclose(_run(compiled, t), _run(packed, t), rtol=1e-5, atol=1e-5)
    if cache == "scheduler":
        with pytest.raises(RuntimeError, match="not in the time-feature cache"):
            _run(compiled, timesteps[0] + 1)


# ------------------------------------------------------------------------- tiny-sd pipelines


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """tiny-sd quantized (uniform 2-bit, scheduler cache for 4 steps) and a LoRA adapter made for it."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from bfq.pipeline.quantize import quantize
    from bfq.tinysd import pipeline_dir

    root = tmp_path_factory.mktemp("tinysd")
    path = quantize("tiny-sd", root / "tiny.bfq", recipe="uniform-2", steps=4, progress=False).path
    unet = UNet2DConditionModel.from_pretrained(pipeline_dir(), subfolder="unet")
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "proj_in"]))  # fmt: skip
    StableDiffusionPipeline.save_lora_weights(root / "lora", unet_lora_layers=get_peft_model_state_dict(unet))
    return path, root / "lora"


def _pipeline(path, runtime):
    from bfq.runtime.generate import file_sampler, load_pipeline

    return load_pipeline(str(path), device="cpu", runtime=runtime), file_sampler(str(path)).steps


def _unet_output(pipe, steps):
    unet = pipe.unet
    c = unet.config
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=gen)
    ehs = torch.randn(2, 7, c.cross_attention_dim, generator=gen)
    pipe.scheduler.set_timesteps(steps)
    with torch.no_grad():
        return unet(sample, pipe.scheduler.timesteps[0], ehs).sample


def test_packed_unet_in_a_pipeline_and_under_offload_hooks(tiny_sd):
    from accelerate import cpu_offload_with_hook
    from accelerate.hooks import remove_hook_from_module

    images = {}
    for runtime in ("packed", "dense"):
        pipe, steps = _pipeline(tiny_sd[0], runtime)
        if runtime == "packed":
            assert packed_layers(pipe.unet)
            _, hook = cpu_offload_with_hook(pipe.unet, execution_device=torch.device("cpu"))  # enable_model_cpu_offload's hook
        result = pipe(["a handwritten digit seven"], num_inference_steps=steps, guidance_scale=3.0,
                      generator=torch.Generator().manual_seed(0), output_type="np")  # fmt: skip
        images[runtime] = result.images
        if runtime == "packed":
            hook.offload()
            remove_hook_from_module(pipe.unet)
    assert np.array_equal(images["packed"], images["dense"])


def test_lora_on_a_packed_unet_equals_dense_and_fusing_is_refused(tiny_sd):
    path, lora = tiny_sd
    outputs = {}
    for runtime in ("packed", "dense"):
        pipe, steps = _pipeline(path, runtime)
        plain = _unet_output(pipe, steps)
        pipe.load_lora_weights(lora)
        outputs[runtime] = _unet_output(pipe, steps)
        assert (outputs[runtime] - plain).abs().max() > 1e-3  # the adapter does something
        if runtime == "packed":
            assert any(type(m).__name__ == "Conv2d" and "lora" in n for n, m in pipe.unet.named_modules())
            with pytest.raises(PackedWeightError, match="LoRA"):
                pipe.fuse_lora()
        else:
            pipe.fuse_lora()
    a, b = outputs["packed"], outputs["dense"]
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()


def test_inspect_reports_the_memory_each_runtime_holds(files):
    from bfq_cli.main import main
    from click.testing import CliRunner

    result = CliRunner().invoke(main, ["inspect", str(files["balanced"]), "--json"])
    assert result.exit_code == 0, result.output
    reported = json.loads(result.output)["resident_bytes"]
    packed = bfq.load_unet(files["balanced"], runtime="packed")
    _run(packed)  # the workspace exists after a forward
    assert reported["packed (fp32 compute)"] == resident_bytes(packed)
    assert reported["dense fp32"] == resident_bytes(bfq.load_unet(files["balanced"], runtime="dense"))
    assert reported["dense fp16"] == resident_bytes(bfq.load_unet(files["balanced"], runtime="dense", dtype=torch.float16))
    text = CliRunner().invoke(main, ["inspect", str(files["balanced"])]).output
    assert "memory" in text and "packed" in text


def test_generate_and_eval_are_identical_in_both_runtimes(tiny_sd, tmp_path):
    from bfq_cli.main import main
    from click.testing import CliRunner
    from PIL import Image

    path = str(tiny_sd[0])
    images, scores = {}, {}
    for runtime in ("packed", "dense"):
        out = tmp_path / f"{runtime}.png"
        r = CliRunner().invoke(main, ["generate", path, "--prompt", "a handwritten digit three", "-n", "2", "--cfg", "3",
                                      "--seed", "0", "--device", "cpu", "--runtime", runtime, "-o", str(out)])  # fmt: skip
        assert r.exit_code == 0, r.output
        images[runtime] = np.asarray(Image.open(out))
        r = CliRunner().invoke(main, ["eval", path, "--n-per-digit", "1", "--cfg", "3", "--steps", "4", "--json",
                                      "--runtime", runtime])  # fmt: skip
        assert r.exit_code == 0, r.output
        scores[runtime] = {k: v for k, v in json.loads(r.stdout).items() if k not in ("seconds", "time", "runtime")}
    assert np.array_equal(images["packed"], images["dense"])
    assert scores["packed"] == scores["dense"]


def test_forwards_in_several_threads_each_get_their_own_workspace(files):
    from concurrent.futures import ThreadPoolExecutor

    packed = bfq.load_unet(files["balanced"], runtime="packed", workspace_bytes=2048)
    expected = _run(packed)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: _run(packed), range(8)))
    assert all(torch.equal(r, expected) for r in results)
