"""Two-stage fine-tuning (bfq.pipeline.finetune): loss, resume after a kill, two processes, export.

This file is also the worker the multi-process tests start:
``python tests/test_finetune.py train RUN_DIR STEPS SLEEP`` and
``accelerate launch --num_processes 2 --cpu tests/test_finetune.py ddp OUT_DIR``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":  # worker mode: make `tests.helpers` and `bfq` importable
    sys.path.insert(0, str(ROOT))

import numpy as np
import pytest
import torch

from bfq.pipeline.export import export_finetuned
from bfq.pipeline.finetune import (
    FinetuneConfig,
    finetune,
    float_teacher,
    load_config,
    sample_timesteps,
    trainable_parameters,
)
from bfq.pipeline.finetune.data import TensorBatches
from bfq.quant.nn import iter_quantized, quantize_unet
from bfq.quant.quantizer import code_range
from bfq.quant.recipe import uniform_recipe
from tests.helpers import layer_weights, tiny_unet

N_EXAMPLES, SEQ, DIM = 64, 5, 16


def make_setup(time_cache: str = "scheduler", seed: int = 1):
    """(student, teacher, source): a 2-bit tiny UNet, its float copy and random conditioning data.

    The scales are set with plain torch ops (max|w| / top code) rather than the numba scale
    initialization, so that every process computes exactly the same starting point.
    """
    student = tiny_unet(seed=seed, cross_attention_dim=DIM)
    quantize_unet(student, uniform_recipe(student, 2, time_cache=time_cache).bits, init=None, progress=False)
    with torch.no_grad():
        for _, m in iter_quantized(student):
            top = code_range(m.bits, m.levels)[1]
            m.scale.copy_(m.weight.reshape(m.weight.shape[0], -1).abs().amax(1) / top)
    teacher = float_teacher(student)
    g = torch.Generator().manual_seed(0)
    ehs = torch.randn(N_EXAMPLES, SEQ, DIM, generator=g)
    uncond = torch.randn(SEQ, DIM, generator=g)
    latents = torch.randn(N_EXAMPLES, 4, 8, 8, generator=g)
    return student, teacher, TensorBatches(ehs, uncond, latents, batch_size=8, seed=0)


def fast_config(**kw) -> FinetuneConfig:
    base = dict(steps=12, lr=1e-3, log_every=1, progress=False, t_sampling="uniform")
    return FinetuneConfig(**{**base, **kw})


def state(unet) -> dict:
    return {k: v.detach().cpu().clone() for k, v in unet.state_dict().items()}


def read_log(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]


@torch.no_grad()
def distill_error(student, teacher, seed: int = 5) -> float:
    """MSE between student and teacher noise predictions on a fixed held-out batch."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 4, 8, 8, generator=g)
    c = torch.randn(16, SEQ, DIM, generator=g)
    t = torch.randint(0, 1000, (16,), generator=g)
    return float((student(x, t, c).sample - teacher(x, t, c).sample).pow(2).mean())


# ------------------------------------------------------------------------------------ units


def test_timestep_sampling_beta_and_uniform():
    rng = np.random.default_rng(0)
    t = sample_timesteps(20000, 1000, rng, "beta", 3.0, 1.0)
    assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) <= 999
    assert abs(float(t.float().mean()) - 749.5) < 10  # mean T*a/(a+b)
    assert float((t < 250).float().mean()) == pytest.approx(0.25**3, abs=0.005)  # P(u < 1/4) = 1/64
    u = sample_timesteps(20000, 1000, rng, "uniform")
    assert abs(float(u.float().mean()) - 499.5) < 10
    with pytest.raises(ValueError):
        sample_timesteps(4, 1000, rng, "normal")


def test_config_file_stages_and_validation(tmp_path):
    path = tmp_path / "ft.json"
    path.write_text(json.dumps({"lr": 2e-5, "batch_size": 4, "stage1": {"feat_weight": 0.1}, "stage2": {"lr": 5e-6}}))
    c1, c2 = load_config(path, seed=7)
    assert (c1.stage, c1.lr, c1.feat_weight, c1.batch_size, c1.seed) == ("distill", 2e-5, 0.1, 4, 7)
    assert (c2.stage, c2.lr, c2.feat_weight, c2.seed) == ("noise", 5e-6, 0.01, 7)
    assert FinetuneConfig.from_dict(c1.to_dict()) == c1
    defaults = FinetuneConfig()
    assert (defaults.lr, defaults.uncond_prob, defaults.feat_weight, defaults.t_sampling) == (None, 0.1, 0.01, "beta")
    assert (defaults.stage_lr, defaults.replace(stage="noise").stage_lr, c1.stage_lr) == (1e-4, 1e-5, 2e-5)
    with pytest.raises(ValueError, match="lr must be a finite number or null, got 'fast'"):
        FinetuneConfig.from_dict({"lr": "fast"})
    with pytest.raises(ValueError, match="unknown key"):
        FinetuneConfig.from_dict({"learning_rate": 1.0})
    with pytest.raises(ValueError, match="t_sampling"):
        FinetuneConfig(t_sampling="gauss").validate()
    path.write_text('{"lr": 1e-5, "lr": 1e-3}')
    with pytest.raises(ValueError, match="duplicate key 'lr'"):
        load_config(path)
    with pytest.raises(ValueError, match="cannot read finetune config"):
        load_config(tmp_path / "missing.json")


def test_time_layers_frozen_and_unchanged():
    student, teacher, source = make_setup("grid")
    names = [n for n, _ in trainable_parameters(student)]
    assert not any(n.startswith("time_embedding.") for n in names)
    assert any(n.endswith("time_emb_proj.weight") for n in names)  # quantized in grid mode: trained
    assert any(n.endswith(".scale") for n in names) and "conv_norm_out.weight" in names
    only_quant = [n for n, _ in trainable_parameters(student, train_dense=False)]
    assert "conv_norm_out.weight" not in only_quant and "conv_in.scale" in only_quant
    before = state(student)
    finetune(student, teacher, source, fast_config(steps=2))
    after = state(student)
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("time_embedding."))
    assert not torch.equal(before["conv_in.scale"], after["conv_in.scale"])
    assert not torch.equal(before["conv_in.weight"], after["conv_in.weight"])
    assert all(p.requires_grad for p in student.parameters())  # flags restored


# ------------------------------------------------------------------------------- training


def test_stage1_loss_falls_on_tiny_unet(tmp_path):
    student, teacher, source = make_setup()
    before = distill_error(student, teacher)
    finetune(student, teacher, source, fast_config(steps=30, log_every=5), run_dir=tmp_path)
    after = distill_error(student, teacher)
    rows = [r for r in read_log(tmp_path) if "loss" in r]
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"]
    assert {"loss_noise", "loss_feat", "samples_per_s"} <= set(rows[0])
    assert after < 0.7 * before, (before, after)


def test_evaluation_retains_no_feature_activations(monkeypatch):
    """Issue 14 defect 1: forwards outside the loss (a 50-forward evaluation) must not leave block
    outputs in the feature-distillation hooks (they used to: 4 blocks x 50 = 200 tensors)."""
    from bfq.pipeline.finetune import losses

    hooks = []
    init = losses._FeatureHooks.__init__

    def tracking_init(self, unet):
        init(self, unet)
        hooks.append(self)

    monkeypatch.setattr(losses._FeatureHooks, "__init__", tracking_init)
    retained = []

    def eval_fn(unet):
        x, c = torch.randn(2, 4, 8, 8), torch.randn(2, SEQ, DIM)
        for _ in range(50):
            unet(x, 10, c)
        retained.append(sum(len(h.outputs) for h in hooks))
        return {"retained": retained[-1]}

    student, teacher, source = make_setup()
    finetune(student, teacher, source, fast_config(steps=2, eval_every=1), eval_fn=eval_fn)
    assert len(hooks) == 2 and len(retained) == 3  # student and teacher hooks; evaluations at steps 0, 1, 2
    assert retained == [0, 0, 0]


def test_text_dropout_replaces_the_text_by_the_unconditional_embedding():
    """With uncond_prob = 1 the text embeddings never reach the UNet: changing them changes nothing."""
    runs = []
    for shift in (0.0, 1.0):
        student, teacher, source = make_setup()
        source.ehs = source.ehs + shift
        finetune(student, teacher, source, fast_config(steps=2, uncond_prob=1.0))
        runs.append(state(student))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    student, teacher, source = make_setup()
    source.ehs = source.ehs + 1.0
    finetune(student, teacher, source, fast_config(steps=2, uncond_prob=0.0))
    assert not all(torch.equal(runs[1][k], v) for k, v in state(student).items())


def test_stage2_prompts_only_and_cpu_bf16_checkpointing():
    student, teacher, source = make_setup()
    finetune(student, teacher, source, fast_config(steps=2, stage="noise"))
    prompts_only = TensorBatches(source.ehs, source.uncond, batch_size=4)  # no latents: teacher samples
    finetune(student, teacher, prompts_only, fast_config(steps=2, sample_steps=3, sample_cfg=3.0))
    before = state(student)
    finetune(student, teacher, source, fast_config(steps=2, mixed_precision="bf16", gradient_checkpointing=True))
    assert not student.is_gradient_checkpointing
    assert not all(torch.equal(before[k], v) for k, v in state(student).items())
    with torch.no_grad():  # accelerate's autocast wrapper is gone: fp32 again
        x, c = torch.randn(1, 4, 8, 8), torch.randn(1, SEQ, DIM)
        assert student(x, 10, c).sample.dtype == torch.float32
    with pytest.raises(ValueError, match="teacher"):
        finetune(student, None, source, fast_config(steps=1))


def test_plain_iterables_and_grad_accumulation_match_indexed_source():
    """A list of batches read in order gives the same result as the indexed source."""
    results = []
    for kind in ("indexed", "list"):
        student, teacher, source = make_setup()
        batches = source if kind == "indexed" else [source.batch(i) for i in range(3)]
        finetune(student, teacher, batches, fast_config(steps=3))
        results.append(state(student))
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_gradient_accumulation_averages_the_micro_batch_gradients(monkeypatch):
    """One step over 2 accumulated micro-batches sees the mean of the gradients two plain steps
    see on the same micro-batches (the weights do not move in between: lr 1e-12)."""
    seen = []
    adamw_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        seen.append([p.grad.clone() for group in self.param_groups for p in group["params"] if p.grad is not None])
        return adamw_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    frozen = dict(lr=1e-12, weight_decay=0.0, max_grad_norm=None)
    student, teacher, source = make_setup()
    finetune(student, teacher, source, fast_config(steps=2, **frozen))
    plain, seen[:] = list(seen), []
    student, teacher, source = make_setup()
    finetune(student, teacher, source, fast_config(steps=1, grad_accum=2, **frozen))
    assert len(plain) == 2 and len(seen) == 1 and len(seen[0]) == len(plain[0]) > 10
    for a, b, accumulated in zip(*plain, seen[0]):
        torch.testing.assert_close(accumulated, (a + b) / 2, rtol=1e-4, atol=1e-8)
    assert not torch.allclose(plain[0][0], plain[1][0])  # the two micro-batches differ


# ------------------------------------------------------------------------- resume after kill


def _worker_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    env.pop("WORLD_SIZE", None)
    return env


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    run_dir = tmp_path / "run"
    steps, every = 12, 3
    proc = subprocess.Popen(
        [sys.executable, __file__, "train", str(run_dir), str(steps), "0.25"],
        env=_worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while not (run_dir / "checkpoints" / "step-00000003" / "trainer.json").is_file():
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            assert time.time() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "checkpoints" / f"step-{steps:08d}").exists()  # it really was cut short
    notes = []
    student, teacher, source = make_setup()
    finetune(student, teacher, source, fast_config(steps=steps, checkpoint_every=every), run_dir=run_dir, log=notes.append)
    assert notes and notes[0].startswith("resumed from") and "step 0)" not in notes[0]
    reference, teacher, source = make_setup()
    finetune(reference, teacher, source, fast_config(steps=steps, checkpoint_every=every))
    got, want = state(student), state(reference)
    bad = [k for k in want if not torch.equal(got[k], want[k])]
    assert not bad, (notes, len(bad), bad[:3], float((got[bad[0]] - want[bad[0]]).abs().max()))
    # a finished run is not trained again: resuming it returns the final state
    again, teacher, source = make_setup()
    finetune(again, teacher, source, fast_config(steps=steps, checkpoint_every=every), run_dir=run_dir)
    assert all(torch.equal(state(again)[k], want[k]) for k in want)
    with pytest.raises(ValueError, match="other settings"):
        finetune(again, teacher, source, fast_config(steps=steps, lr=5e-4), run_dir=run_dir)


# ------------------------------------------------------------------------------ two processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_through_accelerate_launch(tmp_path):
    from safetensors.torch import load_file

    # `accelerate launch --cpu --num_processes 2` starts one process unless mpirun is set up;
    # `--multi_gpu` starts two through torch.distributed.run, and bfq trains them on the CPU (gloo)
    # when no GPU is visible.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           __file__, "ddp", str(tmp_path)]  # fmt: skip
    env = dict(_worker_env(), CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    assert set(ranks[0]) == set(ranks[1])
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    info = json.loads((tmp_path / "result.json").read_text())
    assert info["world"] == 2
    assert info["after"] < 0.85 * info["before"], info
    rows = [r for r in read_log(tmp_path / "run") if "loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"]
    start, _ = make_setup()[:2]
    assert not all(torch.equal(ranks[0][k], v) for k, v in state(start).items())  # it did train


# ----------------------------------------------------------------------------------- export


@pytest.mark.parametrize("mode", ["grid", "scheduler"])
def test_export_after_finetune_reproduces_the_fake_quantized_model(tmp_path, mode):
    from diffusers import DDIMScheduler

    import bfq

    student, teacher, source = make_setup(mode)
    finetune(student, teacher, source, fast_config(steps=4))
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    out = export_finetuned(student, tmp_path / "ft.bfq", time_cache=mode, scheduler=scheduler, steps=10, progress=False)
    loaded = bfq.load_unet(out, dtype=torch.float32)
    weights = layer_weights(loaded)
    for name, module in iter_quantized(student):
        assert torch.equal(weights[name], module.fake_weight().detach()), name
    x, c = torch.randn(2, 4, 8, 8), torch.randn(2, SEQ, DIM)
    scheduler.set_timesteps(10)
    timesteps = [int(t) for t in scheduler.timesteps[:3]] + ([0, 999] if mode == "grid" else [])
    with torch.no_grad():
        for t in timesteps:
            torch.testing.assert_close(loaded(x, t, c).sample, student(x, t, c).sample, rtol=2e-3, atol=2e-3)


# ------------------------------------------------------------------------ data and command line


def test_data_sources_tiny_sd_folder_and_prompts(tmp_path):
    from PIL import Image

    from bfq.pipeline.finetune.data import make_source, tinysd_digits
    from bfq.tinysd import pipeline_dir

    digits = tinysd_digits(batch_size=6, seed=3)
    b = digits.batch(5)
    assert b["latents"].shape == (6, 4, 8, 8) and b["encoder_hidden_states"].shape == (6, 77, 64)
    assert torch.equal(digits.batch(5)["latents"], b["latents"])  # a pure function of the index
    assert len(set(digits.caption(5))) > 1
    seen = torch.cat([digits.indices(i) for i in range(len(digits.labels) // 6)])
    assert len(set(seen.tolist())) == len(seen)  # an epoch is a permutation
    for i, digit in enumerate((3, 7, 1)):
        arr = np.full((20, 24, 3), 255, np.uint8)
        arr[5:15, 8 + i : 12 + i] = 0
        Image.fromarray(arr).save(tmp_path / f"img{i}.png")
        (tmp_path / f"img{i}.txt").write_text(f"the number {digit}\n")
    (tmp_path / "no-caption.png").write_bytes((tmp_path / "img0.png").read_bytes())
    folder = make_source(f"folder:{tmp_path}", model_name="x", pipeline_dir=pipeline_dir(), batch_size=2)
    fb = folder.batch(0)
    assert folder.n == 3 and fb["latents"].shape == (2, 4, 8, 8) and fb["uncond_hidden_states"].shape == (77, 64)
    (tmp_path / "prompts.txt").write_text("# digits\nthe number 4\nnine\n\n")
    prompts = make_source(f"prompts:{tmp_path / 'prompts.txt'}", pipeline_dir=pipeline_dir(), batch_size=3)
    pb = prompts.batch(0)
    assert "latents" not in pb and pb["encoder_hidden_states"].shape == (3, 77, 64)
    with pytest.raises(ValueError, match="no built-in training data"):
        make_source(None, model_name="my-model")
    with pytest.raises(ValueError, match="pipeline directory"):
        make_source(f"folder:{tmp_path}", model_name="x")


def test_clip_eval_fn_with_a_local_clip_model(tmp_path):
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    from bfq.pipeline.finetune.evaluation import clip_eval_fn
    from bfq.pipeline.models import resolve_model
    from bfq.tinysd import pipeline_dir

    tok = CLIPTokenizer.from_pretrained(str(pipeline_dir() / "tokenizer"))
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    text = dict(small, vocab_size=len(tok), max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=dict(small, image_size=16, patch_size=8), projection_dim=8)).save_pretrained(tmp_path)
    image_proc = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    CLIPProcessor(image_processor=image_proc, tokenizer=tok).save_pretrained(tmp_path)
    fn = clip_eval_fn(pipeline_dir(), tmp_path, ["the number 3", "seven", "a handwritten digit one"], steps=2, cfg=3.0, batch_size=2)
    score = fn(resolve_model("tiny-sd").unet)["clip_score"]
    assert -1.0 <= score <= 1.0


def test_cli_finetune_tiny_sd_then_rerun_resumes(tmp_path):
    from bfq_cli.main import main
    from click.testing import CliRunner

    import bfq

    out = tmp_path / "ft.bfq"
    args = ["finetune", "tiny-sd", "--recipe", "uniform-2", "--stage1-steps", "2", "--stage2-steps", "1",
            "--batch-size", "4", "--log-every", "1", "--quiet", "-o", str(out)]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    logs = sorted((tmp_path / "ft.work" / "finetune").glob("stage*/log.jsonl"))
    assert [p.parent.name[:6] for p in logs] == ["stage1", "stage2"]
    lines = [len(p.read_text().splitlines()) for p in logs]
    assert lines == [2, 1]
    unet = bfq.load_unet(out, dtype=torch.float32)
    with torch.no_grad():
        y = unet(torch.randn(1, 4, 8, 8), 951, torch.randn(1, 77, 64)).sample
    assert torch.isfinite(y).all()
    result = CliRunner().invoke(main, args)  # both stages are complete: nothing is trained again
    assert result.exit_code == 0, result.output
    assert [len(p.read_text().splitlines()) for p in logs] == lines
    bad = CliRunner().invoke(main, args[:-2] + ["--t-sampling", "gauss", "-o", str(out)])
    assert bad.exit_code == 2


def test_cli_quantize_with_stage_steps_trains_before_the_export(tmp_path):
    from bfq_cli.main import main
    from click.testing import CliRunner

    import bfq
    from bfq.format import open_bfq

    base = ["quantize", "tiny-sd", "--recipe", "uniform-2", "--quiet", "--steps", "5"]
    plain, tuned = tmp_path / "plain.bfq", tmp_path / "tuned.bfq"
    assert CliRunner().invoke(main, base + ["-o", str(plain)]).exit_code == 0
    train = ["--stage1-steps", "2", "--stage2-steps", "1", "--batch-size", "4", "--lr", "1e-3", "--log-every", "1"]
    result = CliRunner().invoke(main, base + train + ["--work-dir", str(tmp_path / "w"), "-o", str(tuned)])
    assert result.exit_code == 0, result.output
    assert "finetune" in result.output and "log " in result.output
    logs = sorted((tmp_path / "w" / "finetune").glob("stage*/log.jsonl"))
    assert [len(p.read_text().splitlines()) for p in logs] == [2, 1]
    with open_bfq(tuned) as f:
        record = json.loads(f.header.metadata["finetune"])
    assert (record["stage1_steps"], record["stage2_steps"], record["config"]["lr"]) == (2, 1, 1e-3)
    a, b = bfq.load_unet(plain, dtype=torch.float32), bfq.load_unet(tuned, dtype=torch.float32)
    assert a.state_dict().keys() == b.state_dict().keys()
    changed = [k for k, v in a.state_dict().items() if not torch.equal(v, b.state_dict()[k])]
    assert any("attn" in k for k in changed) and any("resnets" in k for k in changed)


def test_finetune_options_decorator_for_other_commands(tmp_path):
    import click
    from bfq_cli.options import finetune_options, finetune_settings
    from click.testing import CliRunner

    @click.command()
    @finetune_options
    def cmd(**params):
        s1, s2, c1, c2 = finetune_settings(params)
        click.echo(json.dumps([s1, s2, c1.stage, c1.stage_lr, c2.stage, c2.stage_lr, c1.t_sampling, c1.batch_size]))

    cfg = tmp_path / "ft.json"
    cfg.write_text(json.dumps({"batch_size": 8, "stage2": {"lr": 2e-6}}))
    r = CliRunner().invoke(cmd, ["--stage1-steps", "5", "--t-sampling", "uniform", "--finetune-config", str(cfg)])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output) == [5, 0, "distill", 1e-4, "noise", 2e-6, "uniform", 8]
    assert json.loads(CliRunner().invoke(cmd, []).output)[:2] == [0, 0]


# ---------------------------------------------------------------------------------- workers


class _Sleep:
    """An eval_fn that only sleeps: slows a worker down so a test can kill it mid-run."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __call__(self, unet) -> dict:
        time.sleep(self.seconds)
        return {}


def _worker_train(run_dir: str, steps: str, sleep: str) -> None:
    student, teacher, source = make_setup()
    cfg = fast_config(steps=int(steps), checkpoint_every=3, eval_every=1)
    finetune(student, teacher, source, cfg, run_dir=run_dir, eval_fn=_Sleep(float(sleep)))


def _worker_ddp(out_dir: str) -> None:
    from accelerate.state import PartialState
    from safetensors.torch import save_file

    student, teacher, source = make_setup()
    before = distill_error(student, teacher)
    cfg = fast_config(steps=15, grad_accum=2, log_every=5, checkpoint_every=5)
    finetune(student, teacher, source, cfg, run_dir=Path(out_dir) / "run")
    state_ = PartialState()
    save_file(state(student), str(Path(out_dir) / f"rank{state_.process_index}.safetensors"))
    if state_.is_main_process:
        info = {"world": state_.num_processes, "before": before, "after": distill_error(student, teacher)}
        (Path(out_dir) / "result.json").write_text(json.dumps(info))


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode, *args = sys.argv[1:]
    {"train": _worker_train, "ddp": _worker_ddp}[mode](*args)

