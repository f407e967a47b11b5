"""Options shared by `bfq quantize` and `bfq finetune`, and `run_quantize`, what both run."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import click
from bfq_cli.params import SEED, Count, Finite, check_recipe_file, text_file_problem
from bfq_cli.paths import Output, check_outputs, force_option, model_paths

from bfq.pipeline.allocate import DEFAULT_ALLOCATOR, METHODS

TIME_CACHE_HELP = (
    "scheduler: store each ResNet's time features for exactly the sampler's timesteps (the paper's; "
    "smallest, tied to --steps); grid: keep the time-embedding MLP (weights in fp16) and the time "
    "projections as quantized layers, so the time embedding is computed at any timestep, fractional "
    "ones too (any sampler works, Euler included)."
)

runtime_option = click.option(
    "--runtime", type=click.Choice(["auto", "packed", "dense"]), default="auto", show_default=True,
    help="How the quantized UNet runs: packed (weights stay ~2 bits per weight in memory and are decoded at every "
         "forward; on a CPU about as fast as dense), dense (decoded once, 16-32 bits per weight) or auto "
         "(packed on the CPU, dense on accelerators).",
)  # fmt: skip

compute_option = click.option(
    "--compute", type=click.Choice(["auto", "fp32", "bf16", "int8"]), default="auto", show_default=True,
    help="The quantized UNet's compute dtype: auto is bf16 on a CPU with native bf16 (AVX-512 BF16 or AMX; "
         "about half the fp32 time, same tiny-sd scores, see README), fp16 on CUDA, fp32 elsewhere. The VAE and "
         "text encoder stay fp32 on a CPU. int8 (never chosen by auto): 8-bit activations on the int8 codes "
         "(W1.99A8), packed runtime on an x86 CPU with VNNI or AMX: tiny-sd scores unchanged (alignment equal, FD "
         "within 0.7%, 3 seeds), SD-v1.5 forward 0.30x / 0.375x the dense fp32 time at 256 / 512 px (bf16 0.57x / "
         "0.58x), but the int8 weights stay in memory (1.05 GB for SD-v1.5, packed bf16 0.21 GB); see README.",
)  # fmt: skip


def check_int8_option(compute: str, runtime: str) -> None:
    """``--compute int8`` where it cannot run is a usage error, before anything loads."""
    if compute != "int8":
        return
    from bfq.runtime.int8 import cpu_int8_problem

    problem = cpu_int8_problem() or (runtime == "dense" and "it needs the packed runtime (--runtime packed or auto)")
    if problem:
        raise click.BadParameter(f"int8: {problem}; use bf16 or fp32", param_hint="--compute")

_QUANTIZE_OPTIONS = (
    click.option("-o", "--out", required=True, type=Output("bfq"), help="Output .bfq file (written atomically; missing folders are created)."),
    click.option("--bits", type=Finite(1, min_open=True), help="Average bits per weight by the paper's accounting, e.g. 1.99 (above 1; what a model allows is checked once its layers are known): bits per layer come from a sensitivity analysis (one per model and settings, cached and shared with `bfq analyze`) and an allocator."),
    click.option("--allocator", type=click.Choice(METHODS), default=DEFAULT_ALLOCATOR, show_default=True, help="With --bits: the knapsack on error + alignment drop (optimal-align), on error alone (optimal), the paper's Alg. 1, or layer size alone (see `bfq allocate --help`)."),
    click.option("--sensitivity", type=click.Path(exists=True, dir_okay=False), help="With --bits: a sensitivity file from `bfq analyze` (default: the cached analysis of this model, run if missing)."),
    click.option("--recipe", help="A built-in recipe (uniform-1..uniform-8, bitsfusion-sd15) or a recipe JSON file; overrides --bits."),
    click.option("--init", type=click.Choice(["alternating", "minmax"]), default="alternating", show_default=True, help="Scale initialization."),
    click.option("--levels", type=click.Choice(["balanced", "plain"]), default=None, help="Level set (default: the recipe's, balanced 2^n+1)."),
    click.option("--time-cache", type=click.Choice(["scheduler", "grid"]), default="scheduler", show_default=True, help=TIME_CACHE_HELP),
    click.option("--steps", type=Count(1), default=None, help="Sampler steps the scheduler cache is made for, at most the scheduler's training timesteps (default 50; tiny-sd, tiny-sdxl and tiny-pixart: their evaluation's 20; pixart, pixart-random: PixArt-Σ's 20)."),
    click.option("--time-proj-bits", type=click.IntRange(1, 8), default=None, help="Bits of the time projections in grid mode (default 4)."),
    click.option("--scale-dtype", type=click.Choice(["f16", "f32"]), default="f16", show_default=True),
    click.option("--dense-dtype", type=click.Choice(["f32", "f16"]), default="f32", show_default=True, help="Precision of biases and norms."),
    click.option("--work-dir", type=click.Path(file_okay=False), help="Keep intermediate results (initialized scales, fine-tuning checkpoints and log.jsonl) here; a rerun with the same settings resumes; one run at a time (locked) [default when fine-tuning: OUT with .work instead of .bfq]."),
    click.option("--revision", help="Hub revision (branch, tag or commit) for Hub models."),
    click.option("--subfolder", help="The UNet's folder inside MODEL (a Hub repo or a local folder), as diffusers' subfolder= (e.g. unet)."),
    click.option("--allow-pickle", is_flag=True, help="Allow pickle-based checkpoints (.ckpt/.bin). Only for files you trust."),
    click.option("--quiet", is_flag=True, help="No progress bars."),
    force_option,
)

# (option name, FinetuneConfig field, click kwargs). Defaults are None: an option that is not given
# leaves the config file's value (or FinetuneConfig's default) alone.
_CONFIG_OPTIONS = (
    ("--data", "data", dict(help="Training data: tiny-sd-digits (the default of tiny-sd, tiny-sdxl and tiny-pixart), folder:PATH (images + .txt captions, "
                                 "encoded by the model's VAE and text encoder) or prompts:FILE (one prompt a line; "
                                 "latents are teacher samples).")),
    ("--lr", "lr", dict(type=Finite(0, min_open=True), help="AdamW learning rate, constant [default: 1e-4 for Stage I, 1e-5 for Stage II, the measured best on tiny-sd].")),
    ("--batch-size", "batch_size", dict(type=Count(1), help="Examples per micro-batch and process [default: 16].")),
    ("--grad-accum", "grad_accum", dict(type=Count(1), help="Micro-batches per optimizer step [default: 1].")),
    ("--t-sampling", "t_sampling", dict(type=click.Choice(["beta", "uniform"]),
                                        help="Timestep sampling: Beta(3,1) over the training timesteps (paper) or uniform [default: beta].")),
    ("--feat-weight", "feat_weight", dict(type=Finite(0), help="Stage I feature-distillation weight lambda; 0 turns it off [default: 0.01].")),
    ("--uncond-prob", "uncond_prob", dict(type=Finite(0, 1), help="Probability of training on the empty prompt [default: 0.1].")),
    ("--mixed-precision", "mixed_precision", dict(type=click.Choice(["no", "bf16", "fp16"]), help="Autocast precision [default: no].")),
    ("--gradient-checkpointing/--no-gradient-checkpointing", "gradient_checkpointing", dict(default=None, help="Recompute activations to save memory.")),
    ("--checkpoint-every", "checkpoint_every", dict(type=Count(0), help="Save a resumable checkpoint every N steps (and at the end; 0: only at the end) [default: 500].")),
    ("--eval-every", "eval_every", dict(type=Count(0), help="Evaluate samples every N steps (tiny-sd metric for tiny-sd, tiny-sdxl and tiny-pixart, or CLIP score with --eval-clip) [default: 0, off].")),
    ("--eval-clip", "eval_clip", dict(type=click.Path(exists=True, file_okay=False),
                                      help="Local CLIP model directory: evaluate other models than tiny-sd by CLIP score (with --eval-prompts).")),
    ("--eval-prompts", "eval_prompts", dict(type=click.Path(exists=True, dir_okay=False), help="Prompt file (one a line) for --eval-clip.")),
    ("--log-every", "log_every", dict(type=Count(0), help="Steps between JSON log lines [default: 10].")),
    ("--finetune-seed", "seed", dict(type=SEED, help="Seed of the training draws [default: 0].")),
    ("--tensorboard", "tensorboard", dict(is_flag=True, default=None, help="Also log to TensorBoard (if installed).")),
    ("--cpu", "cpu", dict(is_flag=True, default=None, help="Train on the CPU even if a GPU is present.")),
    ("--act-bits", "act_bits", dict(type=click.Choice(["8"]), callback=lambda ctx, param, value: value and int(value),
                                    help="8: train with the inputs of the quantized layers fake-quantized to 8 bits as "
                                         "`--compute int8` runs them (per tensor, dynamic; straight-through) "
                                         "[default: off].")),
)
_STEP_OPTIONS = (
    ("--stage1-steps", dict(type=Count(0), default=None, help="Stage I (distillation) optimizer steps [default: 0 for quantize, 1000 for finetune].")),
    ("--stage2-steps", dict(type=Count(0), default=None, help="Stage II (noise-prediction) optimizer steps [default: 0: Stage II helps only at a large effective batch, see README].")),
    ("--finetune-config", dict(type=click.Path(exists=True, dir_okay=False),
                               help='JSON file of fine-tuning settings; "stage1"/"stage2" objects hold per-stage ones. Options override it.')),
)


def given(ctx: click.Context, name: str) -> bool:
    """Whether the option ``name`` was given (on the command line or through the environment)."""
    from click.core import ParameterSource

    return ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)


def refuse_unused(ctx: click.Context, rules) -> None:
    """Options refuse, never ignore: ``rules`` are ``(name, unused, why)``; an option given where it
    would have no effect (``unused`` true) is a usage error, "OPTION WHY"."""
    for name, unused, why in rules:
        if unused and given(ctx, name):
            param = next(p for p in ctx.command.params if p.name == name)
            raise click.UsageError(f"{max(param.opts, key=len)} {why}", ctx)


def _param_name(option: str) -> str:
    return option.split("/")[0].lstrip("-").replace("-", "_")


def finetune_options(f):
    """Click decorator adding the fine-tuning options (``--stage1-steps``, ``--stage2-steps``,
    ``--finetune-config``, ``--lr``, ...). The command receives them as keyword arguments; pass
    them to :func:`finetune_settings`."""
    for option, _, kwargs in reversed(_CONFIG_OPTIONS):
        f = click.option(option, **kwargs)(f)
    for option, kwargs in reversed(_STEP_OPTIONS):
        f = click.option(option, **kwargs)(f)
    return f


def finetune_settings(params: dict, *, default_stage1_steps: int = 0, quiet: bool = False):
    """``(stage1_steps, stage2_steps, stage1_config, stage2_config)`` from the options of
    :func:`finetune_options` (a dict that may hold other keys too; they are ignored)."""
    from bfq.pipeline.finetune import FinetuneConfig, load_config

    overrides = {field: params.get(_param_name(o)) for o, field, _ in _CONFIG_OPTIONS}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if quiet:
        overrides["progress"] = False
    try:
        if params.get("finetune_config"):
            c1, c2 = load_config(params["finetune_config"], **overrides)
        else:
            c1 = FinetuneConfig.from_dict({**overrides, "stage": "distill"})
            c2 = c1.replace(stage="noise")
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--finetune-config / fine-tuning options") from None
    s1 = params.get("stage1_steps")
    s2 = params.get("stage2_steps")
    return (default_stage1_steps if s1 is None else s1), (0 if s2 is None else s2), c1, c2


def quantize_options(f):
    """Click decorator adding every option of `bfq quantize` (fine-tuning ones included)."""
    f = finetune_options(f)
    for option in reversed(_QUANTIZE_OPTIONS):
        f = option(f)
    return f


def run_quantize(model: str, params: dict, *, default_stage1_steps: int = 0) -> None:
    """Run bfq.pipeline.quantize.quantize with the options of :func:`quantize_options` and print the summary."""
    from bfq.format.inspect import format_summary, summarize
    from bfq.pipeline.quantize import default_steps, quantize

    if params["bits"] is None and params["recipe"] is None:
        raise click.UsageError("give --bits B (e.g. 1.99) or --recipe NAME_OR_FILE")
    s1, s2, c1, c2 = finetune_settings(params, default_stage1_steps=default_stage1_steps, quiet=params["quiet"])
    _refuse_unused_options(model, params, training=bool(s1 or s2))
    _check_files(model, params, (c1, c2) if s1 or s2 else ())
    work_dir = params["work_dir"]
    if work_dir is None and (s1 or s2):  # training resumes from checkpoints kept there
        work_dir = str(Path(params["out"]).with_suffix(".work"))
    steps = params["steps"] if params["steps"] is not None else default_steps(model)
    try:
        result = quantize(
            model, params["out"], bits=params["bits"], recipe=params["recipe"], init=params["init"],
            levels=params["levels"], time_cache=params["time_cache"], steps=steps,
            time_proj_bits=params["time_proj_bits"], scale_dtype=params["scale_dtype"],
            dense_dtype=params["dense_dtype"], work_dir=work_dir, revision=params["revision"],
            subfolder=params["subfolder"], allow_pickle=params["allow_pickle"], progress=not params["quiet"],
            allocator=params["allocator"], sensitivity=params["sensitivity"], stage1_steps=s1, stage2_steps=s2,
            finetune_config=c1, finetune_stage2_config=c2, log=functools.partial(click.echo, err=True),
        )  # fmt: skip
    except ValueError as exc:
        if type(exc) is not ValueError:  # BfqFormatError, RecipeError, ModelError: the group reports them
            raise
        raise click.ClickException(str(exc)) from None
    if result.path is None:  # a non-main rank under accelerate launch
        return
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(format_summary(summarize(result.path), max_rows=0))
    click.echo("time        " + ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items()))
    if s1 or s2:
        click.echo(f"log         {Path(work_dir) / 'finetune'}")
    click.echo(f"wrote       {result.path}")


def _refuse_unused_options(model: str, params: dict, *, training: bool) -> None:
    recipe, grid = params["recipe"] is not None, params["time_cache"] == "grid"
    no_training = "has no effect without fine-tuning: add --stage1-steps N or --stage2-steps N"
    rules = [
        ("bits", recipe, "and --recipe are alternatives (the recipe fixes every layer's bits): give one"),
        ("allocator", recipe, "has no effect with --recipe (the recipe fixes every layer's bits): give --bits instead"),
        ("sensitivity", recipe, "has no effect with --recipe (the recipe fixes every layer's bits): give --bits instead"),
        ("time_proj_bits", not grid, "applies to --time-cache grid only (the scheduler cache stores the time projections' features)"),
        ("steps", grid, "sets the steps of a scheduler-mode time cache; a --time-cache grid file samples any step count"),
        ("finetune_config", not training, no_training),
        ("revision", os.path.exists(model), "applies to Hub models only (MODEL is a local path)"),
    ]
    rules += [(_param_name(option), not training, no_training) for option, _, _ in _CONFIG_OPTIONS]
    refuse_unused(click.get_current_context(), rules)


def _check_files(model: str, params: dict, configs) -> None:
    """Every file the run will read is read or checked now, and the output policy applied
    (cli/paths.py), so that a mistake is one line before the model is even loaded."""
    from bfq.pipeline.sensitivity import load_sensitivity

    recipe = params["recipe"]
    if recipe is not None:
        check_recipe_file(recipe, "--recipe")
    if params["sensitivity"] is not None:
        load_sensitivity(params["sensitivity"])
    data = {c.data for c in configs if c.data}
    for spec in data:
        kind, _, path = spec.partition(":")
        if kind == "folder" and not os.path.isdir(path):
            raise click.BadParameter(f"{spec}: no such folder", param_hint="--data")
        if kind == "prompts" and text_file_problem(path):
            raise click.BadParameter(f"{spec}: {text_file_problem(path)}", param_hint="--data")
        if kind == "prompts":
            from bfq.pipeline.finetune.data import read_prompts

            try:
                read_prompts(path)
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint="--data") from None
    for prompts in {c.eval_prompts for c in configs if c.eval_prompts}:
        if text_file_problem(prompts):
            raise click.BadParameter(text_file_problem(prompts), param_hint="--eval-prompts")
    reads = {"MODEL": model_paths(model), "--recipe": recipe, "--sensitivity": params["sensitivity"],
             "--finetune-config": params["finetune_config"], "--data": [d.partition(":")[2] for d in data],
             "--eval-prompts": [c.eval_prompts for c in configs], "--eval-clip": [c.eval_clip for c in configs]}  # fmt: skip
    check_outputs(click.get_current_context(), reads)
