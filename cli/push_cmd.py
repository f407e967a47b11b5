"""`bfq push`."""

from __future__ import annotations

import click
from bfq_cli.options import runtime_option
from bfq_cli.params import Device


@click.command("push")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--repo", "repo_id", required=True, help="Hub repo id, user/name (created if needed).")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--revision", help="Branch to push to (created from main if needed). Default: main.")
@click.option("--filename", help="Name of the file in the repo (default: FILE's name).")
@click.option("-m", "--message", "commit_message", help="Commit message.")
@click.option("--preview", is_flag=True, help="Generate a small image grid with the model and show it on the model card.")
@click.option("--preview-prompt", "preview_prompts", multiple=True, help="Prompt of the preview (repeat for several; implies --preview).")
@click.option("--preview-steps", type=click.IntRange(1, 1000), help="Sampler steps of the preview (default: the steps a scheduler-mode time cache was made for, the only ones it can sample; else 50).")
@click.option("--base", help="Pipeline (directory or Hub id) whose VAE, text encoders, tokenizers and model_index.json the published "
                                "pipeline copies (and the preview uses). Default: the model's source, as `bfq generate` finds it.")  # fmt: skip
@click.option("--device", type=Device(), help="Device of the preview generation: cpu, cuda, cuda:N or mps (default: cuda when available).")
@click.option("--diffusers", "as_diffusers", is_flag=True,
              help="Require the diffusers pipeline (the default when the base is found): fail, before any upload, if the base "
                   "pipeline cannot be found.")  # fmt: skip
@click.option("--bfq-only", is_flag=True, help="Publish the .bfq and its card alone, not the diffusers pipeline.")
@runtime_option
def push_cmd(file, repo_id, private, revision, filename, commit_message, preview, preview_prompts, preview_steps, base, device,
             as_diffusers, bfq_only, runtime):  # fmt: skip
    """Publish a .bfq FILE on the Hugging Face Hub as a diffusers pipeline, with a generated model card.

    The repo gets unet/ in bfq's diffusers layout (FORMAT.md appendix A), the scheduler the file's
    time cache was made for, the base pipeline's other components and model_index.json (copied from
    --base, else from the file's source), and the .bfq beside them: `import bfq` +
    DiffusionPipeline.from_pretrained(REPO) loads it. When the file's base cannot be found, only
    the .bfq and its card are pushed and a note says what to pass (--base); --diffusers makes that
    an error, --bfq-only pushes the .bfq alone on purpose.

    The card carries the Hub metadata (library bfq, quantization tags, base_model with
    base_model_relation: quantized, the base's license where known), the bits per block, the
    average bits and the size against fp16, and the exact loading snippet. A repo may hold several
    .bfq files (one per quantization): the card lists them all and its snippet names the file.
    Pushing the same file again uploads nothing and says so. Every argument is checked before the
    first Hub call: a failing command creates nothing on the Hub.

    The token comes from huggingface_hub's usual sources (HF_TOKEN, or `hf auth login`) and is
    never printed. HF_ENDPOINT selects another Hub; HF_HUB_DISABLE_XET=1 uploads through plain LFS.

    \b
    Example:
      bfq push tiny.bfq --repo you/tiny-sd-2bit --preview
    """
    from bfq.hub import push

    if as_diffusers and bfq_only:
        raise click.UsageError("--diffusers and --bfq-only contradict each other: give one")
    _refuse_preview_options_without_preview(preview or bool(preview_prompts), not bfq_only)
    if preview_steps is not None:  # refuse a step count the file cannot sample before any upload
        from bfq.runtime.generate import file_sampler

        file_sampler(file).check_steps(preview_steps)
    result = push(file, repo_id, private=private, revision=revision, preview=preview or bool(preview_prompts),
                  commit_message=commit_message, filename=filename, preview_prompts=list(preview_prompts) or None,
                  preview_base=base, preview_steps=preview_steps, preview_device=device,
                  preview_runtime=runtime, diffusers=True if as_diffusers else False if bfq_only else None)  # fmt: skip
    where = result["repo_url"]
    sent = ", ".join(f"{u['path']} ({u['bytes']:,} bytes)" for u in result["uploaded"])
    if result["up_to_date"]:
        click.echo(f"up to date: {where} already has {', '.join(result['skipped'])}; nothing uploaded, no commit")
    elif result["file"] in result["skipped"]:
        click.echo(f"unchanged: {where} already has this {result['file']}, not uploaded; updated {sent}")
    else:
        click.echo(f"pushed to {where}: {sent}")
        if result["skipped"]:
            click.echo(f"unchanged, not uploaded: {', '.join(result['skipped'])}")
    click.echo(f"commit {result['commit_url']}")
    rev = f", revision={result['revision']!r}" if result["revision"] != "main" else ""
    click.echo(f"load it: bfq.load_unet({result['load']!r}{rev})")
    if result["note"]:
        click.echo(f"note: {result['note']}", err=True)
    if result["pipeline"]:
        click.echo(f"or: import bfq; DiffusionPipeline.from_pretrained({result['repo_id']!r}{rev})")


def _refuse_preview_options_without_preview(preview: bool, pipeline: bool = False) -> None:
    """--preview-steps, --base, --device and --runtime only shape the preview (--base also the
    published pipeline, unless --bfq-only): refused without one."""
    context = click.get_current_context()
    options = ("preview_steps", "device", "runtime") if pipeline else ("preview_steps", "base", "device", "runtime")
    given = [f"--{name.replace('_', '-')}" for name in options
             if context.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]  # fmt: skip
    if given and not preview:
        raise click.UsageError(f"{', '.join(given)} only apply to the preview image grid: add --preview (or drop them)")
