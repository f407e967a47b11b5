"""bfq.quant.timecache: scheduler and grid time-feature caches on tiny diffusers UNets."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler
from helpers import tiny_inputs, tiny_unet
from torch import nn

from bfq.quant.nn import quantize_unet
from bfq.quant.timecache import (
    compute_grid_table,
    compute_scheduler_features,
    install_grid_cache,
    install_scheduler_cache,
    n_time_features,
    resnets_with_time_proj,
    scheduler_timesteps,
    time_cache_mode,
    time_feature_dims,
    time_layer_names,
    time_mlp_weights,
    unique_timesteps,
)

torch.set_num_threads(1)


def fp16_time_reference(unet):
    """A copy of ``unet`` whose time path is computed as usual but rounded to fp16 where the cache
    stores values: after every time_emb_proj (scheduler) / after time_embedding (grid)."""
    ref = copy.deepcopy(unet)

    def hook(mod, inp, out):
        return out.half().to(out.dtype)

    return ref, hook


def run(unet, sample, t, ehs):
    with torch.no_grad():
        return unet(sample, t, encoder_hidden_states=ehs).sample


@pytest.fixture(scope="module")
def pndm_timesteps():
    sched = PNDMScheduler(num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1)
    return scheduler_timesteps(sched, 10)


def test_unique_timesteps(pndm_timesteps):
    sched = PNDMScheduler(num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1)
    sched.set_timesteps(50)
    assert len(sched.timesteps) == 51 and len(unique_timesteps(sched.timesteps)) == 50
    assert unique_timesteps([3, 1, 3, 2.5]) == [3.0, 1.0, 2.5]
    with pytest.raises(ValueError):
        unique_timesteps([1.0, float("nan")])
    assert len(pndm_timesteps) == 10


def test_scheduler_cache_matches_time_path(pndm_timesteps):
    unet = tiny_unet(seed=0)
    ref, hook = fp16_time_reference(unet)
    for _, r in resnets_with_time_proj(ref):
        r.time_emb_proj.register_forward_hook(hook)
    feats = compute_scheduler_features(unet, pndm_timesteps)
    assert set(feats) == {n for n, _ in resnets_with_time_proj(unet)}
    dims = time_feature_dims(unet)
    assert all(feats[k].dtype == torch.float16 and feats[k].shape == (10, d) for k, d in dims.items())
    install_scheduler_cache(unet, pndm_timesteps, {k: v.numpy() for k, v in feats.items()})
    assert time_cache_mode(unet) == "scheduler"
    names = [k for k in unet.state_dict() if "time_embedding" in k or k.endswith("time_emb_proj.weight")]
    assert names == [] and time_layer_names(unet) == []
    for batch, t in [(1, pndm_timesteps[0]), (2, pndm_timesteps[3]), (3, torch.tensor(pndm_timesteps[-1])),
                     (3, torch.tensor([pndm_timesteps[1], pndm_timesteps[5], pndm_timesteps[1]])),
                     (2, torch.tensor([int(pndm_timesteps[2])], dtype=torch.int64))]:  # fmt: skip
        sample, ehs = tiny_inputs(unet, batch=batch, seed=batch)
        out, want = run(unet, sample, t, ehs), run(ref, sample, t, ehs)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        plain = run(tiny_unet(seed=0), sample, t, ehs)
        torch.testing.assert_close(out, plain, rtol=2e-2, atol=2e-2)  # fp16 precision of the features


def test_scheduler_cache_rejects_unknown_timesteps(pndm_timesteps):
    unet = tiny_unet(seed=0)
    install_scheduler_cache(unet, pndm_timesteps, compute_scheduler_features(unet, pndm_timesteps))
    sample, ehs = tiny_inputs(unet, batch=2)
    with pytest.raises(ValueError, match="not in the time-feature cache.*cached timesteps"):
        run(unet, sample, 500, ehs)
    with pytest.raises(ValueError, match="not in the time-feature cache"):
        run(unet, sample, torch.tensor([pndm_timesteps[0], pndm_timesteps[0] + 0.5]), ehs)


def test_scheduler_cache_fp16_unet_and_state_dict(pndm_timesteps):
    unet = tiny_unet(seed=3)
    feats = compute_scheduler_features(unet, pndm_timesteps)
    sample, ehs = tiny_inputs(unet, batch=2)
    t = pndm_timesteps[4]
    want = run(unet, sample, t, ehs)
    install_scheduler_cache(unet, pndm_timesteps, feats)
    sd = unet.state_dict()
    assert any(k.endswith("time_emb_proj.features") for k in sd)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    other = tiny_unet(seed=4)
    zeros = {k: torch.zeros_like(v) for k, v in feats.items()}
    install_scheduler_cache(other, pndm_timesteps, zeros)
    other.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    torch.testing.assert_close(run(other, sample, t, ehs), run(unet, sample, t, ehs), rtol=0, atol=0)
    half = unet.half()
    out = run(half, sample.half(), t, ehs.half())
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), want, rtol=5e-2, atol=5e-2)


def test_scheduler_mode_refuses_extra_embeddings(pndm_timesteps):
    unet = tiny_unet(seed=0, num_class_embeds=3)
    with pytest.raises(ValueError, match="class_embedding"):
        compute_scheduler_features(unet, pndm_timesteps)
    with pytest.raises(ValueError, match="class_embedding"):
        install_scheduler_cache(unet, pndm_timesteps, {})
    cond = tiny_unet(seed=0, time_cond_proj_dim=4)
    with pytest.raises(ValueError, match="timestep_cond"):
        compute_scheduler_features(cond, pndm_timesteps)
    unet = tiny_unet(seed=0)
    install_scheduler_cache(unet, pndm_timesteps, compute_scheduler_features(unet, pndm_timesteps))
    with pytest.raises(ValueError, match="already installed"):
        install_scheduler_cache(unet, pndm_timesteps, {})


def test_scheduler_cache_validates_features(pndm_timesteps):
    unet = tiny_unet(seed=0)
    feats = compute_scheduler_features(unet, pndm_timesteps)
    with pytest.raises(ValueError, match="missing"):
        install_scheduler_cache(unet, pndm_timesteps, dict(list(feats.items())[1:]))
    with pytest.raises(ValueError, match="shape"):
        install_scheduler_cache(unet, pndm_timesteps[:-1], feats)
    assert time_cache_mode(unet) is None  # nothing changed


def test_scheduler_mode_with_scale_shift_and_time_act():
    kw = dict(resnet_time_scale_shift="scale_shift", time_embedding_act_fn="silu")
    unet = tiny_unet(seed=5, **kw)
    ts = [999, 500.5, 1]
    ref, hook = fp16_time_reference(unet)
    for _, r in resnets_with_time_proj(ref):
        r.time_emb_proj.register_forward_hook(hook)
    install_scheduler_cache(unet, ts, compute_scheduler_features(unet, ts))
    sample, ehs = tiny_inputs(unet, batch=3)
    t = torch.tensor([500.5, 1.0, 999.0])
    torch.testing.assert_close(run(unet, sample, t, ehs), run(ref, sample, t, ehs), rtol=1e-5, atol=1e-5)


def test_grid_cache_matches_time_path():
    unet = tiny_unet(seed=1)
    ref, hook = fp16_time_reference(unet)
    ref.time_embedding.register_forward_hook(hook)
    table = compute_grid_table(unet, 1000)
    assert table.shape == (1000, 32) and table.dtype == torch.float16
    install_grid_cache(unet, table)
    assert time_cache_mode(unet) == "grid"
    assert [k for k in unet.state_dict() if k.startswith("time_embedding.")] == ["time_embedding.table"]
    assert len(time_layer_names(unet)) == len(resnets_with_time_proj(unet))  # time_emb_proj stay
    for batch, t in [(1, 0), (2, 999), (3, torch.tensor([10, 500, 981])), (2, torch.tensor(37.0))]:
        sample, ehs = tiny_inputs(unet, batch=batch, seed=batch)
        torch.testing.assert_close(run(unet, sample, t, ehs), run(ref, sample, t, ehs), rtol=1e-5, atol=1e-5)


def test_grid_cache_interpolates_exact_fractional_timesteps():
    unet = tiny_unet(seed=2)
    table = compute_grid_table(unet, 1000).float()
    install_grid_cache(unet, table.numpy())
    captured = []
    unet.time_embedding.register_forward_hook(lambda m, i, o: captured.append(o))
    sample, ehs = tiny_inputs(unet, batch=2)
    t = torch.tensor([998.7, 500.3])  # float32, as Euler schedulers produce; fp16 would round 998.7
    run(unet, sample, t, ehs)
    x = t.double()
    want = torch.stack([table[int(v)] * (1 - (v - int(v))) + table[int(v) + 1] * (v - int(v)) for v in x.tolist()])
    torch.testing.assert_close(captured[-1], want.float(), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="outside the cached grid"):
        run(unet, sample, 1000.5, ehs)
    with pytest.raises(ValueError, match="outside the cached grid"):
        run(unet, sample, -1, ehs)


def test_grid_table_compiles_without_graph_breaks():
    """A bfq 0.1 grid table under torch.compile(fullgraph=True): the range check runs inside the
    graph (an assert) instead of breaking it; outputs equal eager ones at fractional timesteps."""
    unet = tiny_unet(seed=2)
    install_grid_cache(unet, compute_grid_table(unet, 1000))
    sample, ehs = tiny_inputs(unet, batch=2)
    torch._dynamo.reset()
    compiled = torch.compile(unet, backend="eager", fullgraph=True)
    for t in (torch.tensor(998.7), torch.tensor(12.25)):
        assert torch.equal(run(compiled, sample, t, ehs), run(unet, sample, t, ehs))
    with pytest.raises(RuntimeError, match="outside the cached grid"):
        run(compiled, sample, torch.tensor(1000.5), ehs)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside diffusers' Euler
def test_grid_cache_works_with_any_scheduler_and_quantized_time_proj():
    unet = tiny_unet(seed=6)
    plain = tiny_unet(seed=6)
    install_grid_cache(unet, compute_grid_table(unet))
    euler = EulerDiscreteScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    euler.set_timesteps(7)
    ddim = DDIMScheduler(num_train_timesteps=1000)
    ddim.set_timesteps(13)
    sample, ehs = tiny_inputs(unet, batch=2)
    for t in list(euler.timesteps[:3]) + list(ddim.timesteps[:3]):  # integer-valued: table rows
        torch.testing.assert_close(run(unet, sample, t, ehs), run(plain, sample, t, ehs), rtol=2e-2, atol=2e-2)
    frac = EulerDiscreteScheduler(num_train_timesteps=1000)  # linspace spacing: fractional timesteps
    frac.set_timesteps(7)
    assert any(float(t) != int(t) for t in frac.timesteps)
    for t in frac.timesteps[:3]:
        assert torch.isfinite(run(unet, sample, t, ehs)).all()
    names = [n for n in time_layer_names(unet) if "time_emb_proj" in n]
    quantize_unet(unet, {n: 8 for n in names}, progress=False)
    out = run(unet, sample, ddim.timesteps[0], ehs)
    assert torch.isfinite(out).all()


def test_grid_mode_allows_class_embeddings():
    unet = tiny_unet(seed=0, num_class_embeds=3)
    ref, hook = fp16_time_reference(unet)
    ref.time_embedding.register_forward_hook(hook)
    install_grid_cache(unet, compute_grid_table(unet, 100))
    sample, ehs = tiny_inputs(unet, batch=2)
    labels = torch.tensor([0, 2])
    with torch.no_grad():
        out = unet(sample, 42, ehs, class_labels=labels).sample
        want = ref(sample, 42, ehs, class_labels=labels).sample
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_accounting_helpers():
    unet = tiny_unet()
    names = time_layer_names(unet)
    assert names[:2] == ["time_embedding.linear_1.weight", "time_embedding.linear_2.weight"]
    assert len(names) == 2 + 8 and all(n.endswith("time_emb_proj.weight") for n in names[2:])
    dims = time_feature_dims(unet)
    assert list(dims.values()) == [8, 16, 16, 16, 8, 8, 16, 16]  # down0, down1, up0 x2, up1 x2, mid x2
    assert n_time_features(unet, "scheduler", 50) == 50 * sum(dims.values())
    assert n_time_features(unet, "grid", 1000) == 8 * 32 + 32 * 32  # the time MLP's weights (fp16 in the file)
    assert [n for n, _ in time_mlp_weights(unet).items()] == names[:2]
    assert all(w.dtype == torch.float16 for w in time_mlp_weights(unet).values())
    with pytest.raises(ValueError):
        n_time_features(unet, "both", 1)
    assert np.isclose(sum(dims.values()), sum(r.time_emb_proj.out_features for _, r in resnets_with_time_proj(unet)))


def test_no_timestep_cache_consumer_is_silently_wrong():
    """The scheduler placeholder embedding is [B, 0]: anything but the cached resnets fails loudly."""
    unet = tiny_unet(seed=0)
    install_scheduler_cache(unet, [5], compute_scheduler_features(unet, [5]))
    unet.down_blocks[0].resnets[0].time_emb_proj = nn.Linear(32, 8)  # an uncached consumer
    sample, ehs = tiny_inputs(unet, batch=1)
    with pytest.raises(RuntimeError):
        run(unet, sample, 5, ehs)


def test_install_on_meta_model_then_assign(pndm_timesteps):
    """A loader builds the UNet on the meta device, installs the cache, then assigns weights."""
    from diffusers import UNet2DConditionModel
    from helpers import tiny_unet_config

    src = tiny_unet(seed=7)
    feats = compute_scheduler_features(src, pndm_timesteps)
    table = compute_grid_table(src)
    for mode in ("scheduler", "grid"):
        with torch.device("meta"):
            model = UNet2DConditionModel.from_config(tiny_unet_config())
        if mode == "scheduler":
            install_scheduler_cache(model, pndm_timesteps, feats)
        else:
            install_grid_cache(model, table)
        state = {k: v for k, v in src.state_dict().items() if k in model.state_dict()}
        missing = [k for k, v in model.state_dict().items() if v.is_meta and k not in state]
        assert missing == []
        model.load_state_dict(state, strict=False, assign=True)
        ref = copy.deepcopy(src)
        if mode == "scheduler":
            install_scheduler_cache(ref, pndm_timesteps, feats)
        else:
            install_grid_cache(ref, table)
        sample, ehs = tiny_inputs(src, batch=2)
        t = pndm_timesteps[2]
        assert torch.equal(run(model.eval(), sample, t, ehs), run(ref, sample, t, ehs))


# FORMAT.md §2.3: a loader keeps each table's stored values; a row is cast only where it is used
_NOT_FP16 = [1 + 2**-20, 70000.0, -3.0e-8, 0.1]  # rounds in fp16 / overflows / underflows / inexact


def _pattern(rows: int, cols: int, dtype) -> torch.Tensor:
    return torch.tensor(_NOT_FP16).repeat(rows * cols)[: rows * cols].reshape(rows, cols).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_install_keeps_the_stored_precision(dtype):
    unet = tiny_unet(seed=8)
    grid = _pattern(1000, 32, dtype)
    feats = {name: _pattern(2, d, dtype) for name, d in time_feature_dims(unet).items()}
    inputs = [grid] if dtype == torch.bfloat16 else [grid, grid.numpy()]  # torch and numpy tables
    for table in inputs:
        stored = install_grid_cache(copy.deepcopy(unet), table).time_embedding.table
        assert stored.dtype == dtype and torch.equal(stored, grid)
    cached = install_scheduler_cache(copy.deepcopy(unet), [10, 20], feats)
    for name, r in resnets_with_time_proj(cached):
        assert r.time_emb_proj.features.dtype == dtype and torch.equal(r.time_emb_proj.features, feats[name])
    if dtype == torch.bfloat16:  # 70000 survives in bf16 storage (fp16 storage would make it inf)
        assert torch.isfinite(stored).all() and float(stored.float().max()) > 65504


def test_install_refuses_integer_tables():
    unet = tiny_unet(seed=8)
    with pytest.raises(ValueError, match="floating-point"):
        install_grid_cache(unet, np.zeros((1000, 32), np.uint16))  # e.g. bf16 bit patterns not converted
    with pytest.raises(ValueError, match="floating-point"):
        install_scheduler_cache(unet, [1], {n: np.zeros((1, d), np.int16) for n, d in time_feature_dims(unet).items()})


def test_kept_precision_reaches_the_output():
    """An f32 table gives a float32 UNet the f32 embedding, not its fp16 rounding."""
    unet = tiny_unet(seed=9)
    exact = compute_grid_table(unet).float() + 2**-20  # not representable in fp16 near 1
    a, b = copy.deepcopy(unet), copy.deepcopy(unet)
    install_grid_cache(a, exact)
    install_grid_cache(b, exact.half())
    captured = []
    for m in (a, b):
        m.time_embedding.register_forward_hook(lambda mod, i, o: captured.append(o))
    sample, ehs = tiny_inputs(unet, batch=1)
    run(a, sample, 7, ehs)
    run(b, sample, 7, ehs)
    assert torch.equal(captured[0][0], exact[7]) and not torch.equal(captured[1][0], exact[7])
