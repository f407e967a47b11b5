"""`bfq`: a thin Click layer over the bfq library.

Exit codes: 0 success; 2 a mistake the user can fix (a bad option value, a bad or missing file, an
output that would replace something it should not, a Hub failure, a stdout that cannot be
written), printed as one line ``bfq: error: ...`` on stderr, and caught before the heavy work
wherever it can be; 130 interrupted (Ctrl-C). Set BFQ_DEBUG=1 to see the traceback of a user error instead.
"""

from __future__ import annotations

import errno
import json
import os
import sys

import click

from bfq import BfqFormatError, UserError, __version__
from bfq._io import display

USER_ERRORS = (UserError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells expect


def describe(exc: BaseException) -> str:
    """One line for a user error raised by the library, safe to print (bfq._io.display: a
    message may quote a file's text)."""
    if isinstance(exc, BfqFormatError):
        return f"invalid .bfq file: {display(exc)}"
    if isinstance(exc, OSError) and not isinstance(exc, UserError) and exc.filename:
        return display(f"{exc.filename}: {exc.strerror}")
    if isinstance(exc, MemoryError):
        return "out of memory: this machine could not give bfq the memory the command needs"
    return display(" ".join(str(exc).split()))


class BfqGroup(click.Group):
    """Reports every user error the same way: ``bfq: error: ONE LINE`` on stderr, exit status 2;
    Ctrl-C exits 130 without a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Exception as exc:
            if not isinstance(exc, (*USER_ERRORS, MemoryError)) or os.environ.get("BFQ_DEBUG"):
                raise
            raise click.ClickException(describe(exc)) from None

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as e:
            message = " ".join(e.format_message().split())
            if isinstance(e, click.UsageError) and e.ctx is not None:
                message += f" (see '{e.ctx.command_path} --help')"
            click.echo(f"bfq: error: {message}", err=True)
            sys.exit(EXIT_USER_ERROR)
        except click.Abort as e:
            interrupted = isinstance(e.__cause__ or e.__context__, KeyboardInterrupt)
            click.echo("bfq: interrupted" if interrupted else "bfq: aborted", err=True)
            sys.exit(EXIT_INTERRUPTED if interrupted else 1)
        except KeyboardInterrupt:
            click.echo("bfq: interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except OSError as e:
            if not _stdout_failed(e):
                raise
            click.echo(f"bfq: error: cannot write to standard output: {e.strerror}", err=True)
            sys.exit(EXIT_USER_ERROR)
        sys.exit(rv if isinstance(rv, int) else 0)


def _stdout_failed(exc: OSError) -> bool:
    """Whether ``exc`` is a failed write to stdout (a full disk, a closed pipe): every file bfq writes
    reports its path, so an error without one from these causes is the terminal's. The unwritten
    output is dropped, so that the interpreter's exit does not fail on it again."""
    if isinstance(exc, UserError) or exc.filename is not None:
        return False
    if exc.errno not in (errno.ENOSPC, errno.EPIPE, errno.EIO, errno.EFBIG, errno.EDQUOT):
        return False
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file (a test runner's buffer)
        pass
    return True


@click.group(cls=BfqGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bfq")
def main():
    """bfq: ~2-bit BitsFusion quantization of Stable Diffusion UNets, in .bfq files.

    \b
    Typical use:
      bfq quantize tiny-sd --bits 1.99 -o tiny.bfq   # quantize the bundled model
      bfq inspect tiny.bfq                           # what is inside, and how big
      bfq verify tiny.bfq                            # check every checksum, decode everything

    \b
    Exit status: 0 done; 2 a mistake to fix, told in one line 'bfq: error: ...'
    on stderr before the heavy work; 130 interrupted (Ctrl-C).
    Outputs: the suffix must say what is written; an input or a file of another
    kind is never replaced (--force replaces the latter); folders are created.
    """


@main.command("inspect")
@click.argument("file")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (keys: file_bytes, avg_bits, bits_on_disk, layers, ...).")
@click.option("--all", "show_all", is_flag=True, help="List every layer (default: the first 40).")
@click.option("--revision", help="Hub revision (branch, tag or commit) when FILE is a repo id (user/name).")
def inspect_cmd(file, as_json, show_all, revision):
    """Show the model, per-layer bits and sizes, and totals of a .bfq FILE (or Hub repo id user/name).

    avg_bits is the BitsFusion paper's accounting (log2 of the level count per quantized weight,
    plus the stored bits of every weight kept in floating point and of every cached time feature,
    over every linear/conv weight of the original UNet); bits_on_disk is what the file actually
    spends on codes, scales, floating-point weights and time features (FORMAT.md §2.4). "memory"
    is what the loaded UNet holds in each runtime (bfq.load_unet(..., runtime=...)).
    """
    from bfq.format.inspect import format_summary, summarize
    from bfq.runtime.memory import resident_report

    summary = summarize(_local_file(file, revision))
    summary["resident_bytes"] = resident_report(summary)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(format_summary(summary, max_rows=None if show_all else 40))
        click.echo("memory      " + ", ".join(f"{k} {v / 1e6:,.1f} MB" for k, v in summary["resident_bytes"].items()))


@main.command("verify")
@click.argument("file")
@click.option("--build", is_flag=True, help="Also build the model: the diffusers class from the header's config, every tensor loaded into it (packed runtime, CPU).")
def verify_cmd(file, build):
    """Check that a .bfq FILE, or a folder in the diffusers layout (FORMAT.md appendix A), follows
    the format (FORMAT.md): every checksum, every field, every tensor decoded; with --build, also
    that its model builds.

    Prints one 'ok' line per check and exits 0; otherwise prints one line naming the problem and
    exits 2. Without --build the model's class and config are not tried (a file can follow the
    format and still describe a model diffusers cannot build).
    """
    from bfq.format import open_bfq
    from bfq.format.diffusers_layout import open_layout

    path = file if os.path.isdir(file) else _local_file(file)
    with (open_layout(path) if os.path.isdir(path) else open_bfq(path)) as bfq:
        bfq.verify_all()
        n = len(bfq.layers)
        class_name = bfq.header.model["class_name"]
    click.echo(f"ok: {file}: the format (FORMAT.md): {n} layers, every checksum and tensor verified")
    if not build:
        click.echo(f"not checked: that {class_name} builds from the file's config (add --build)")
        return
    import bfq as library

    try:
        unet = library.load_unet(path, runtime="packed", device="cpu")
    except BfqFormatError as exc:
        raise click.ClickException(f"{file}: the format is sound but the model does not build: {exc}") from None
    del unet
    click.echo(f"ok: {file}: the model builds: {class_name} from the header's config, every layer and tensor loaded into it")


def _local_file(path: str, revision: str | None = None) -> str:
    """`path` itself when it exists; a Hub repo id ("user/name[/file.bfq]") is downloaded (cached)."""
    if os.path.exists(path):
        return path
    from bfq.download import resolve

    return resolve(path, revision=revision)


def _register_optional_commands():
    """Commands that live in their own modules (they import torch lazily inside)."""
    import importlib

    for module, attr in (
        ("bfq_cli.quantize_cmd", "quantize_cmd"),
        ("bfq_cli.generate_cmd", "generate_cmd"),
        ("bfq_cli.eval_cmd", "eval_cmd"),
        ("bfq_cli.analyze_cmd", "analyze_cmd"),
        ("bfq_cli.allocate_cmd", "allocate_cmd"),
        ("bfq_cli.finetune_cmd", "finetune_cmd"),
        ("bfq_cli.push_cmd", "push_cmd"),
        ("bfq_cli.convert_cmd", "convert_cmd"),
    ):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        main.add_command(getattr(mod, attr))


_register_optional_commands()

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
