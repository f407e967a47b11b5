"""`bfq allocate`: bits per layer for an exact budget, from a sensitivity analysis."""

from __future__ import annotations

import json

import click
from bfq_cli.params import Count, Finite
from bfq_cli.options import refuse_unused
from bfq_cli.paths import Output, check_outputs, force_option, model_paths

from bfq.pipeline.allocate import DEFAULT_ALIGN_WEIGHT, DEFAULT_ALLOCATOR, METHODS

METHOD_HELP = (
    "paper: BitsFusion Alg. 1 (size-aware score, threshold bisected to the budget, alignment refinement); "
    "optimal: least summed measured error within the budget (knapsack DP); optimal-align: the same knapsack on "
    "error + alignment drop (align_drop, or guidance_err in proxy mode), each normalised; size-only: bits by "
    "layer size alone."
)


@click.command("allocate")
@click.argument("sensitivity", type=click.Path(exists=True, dir_okay=False))
@click.option("--bits", "budget", type=Finite(0, min_open=True), required=True, help="Average bits per weight by the paper's accounting, e.g. 1.99 (never exceeded).")
@click.option("-o", "--out", type=Output("recipe"), default=None, help="Recipe JSON to write (for `bfq quantize --recipe`).")
@click.option("--method", type=click.Choice(METHODS), default=DEFAULT_ALLOCATOR, show_default=True, help=METHOD_HELP)
@click.option("--align-weight", type=Finite(0, min_open=True), default=DEFAULT_ALIGN_WEIGHT, show_default=True, help="optimal-align: weight of the normalised alignment drop against the normalised error.")
@click.option("--eta", type=Finite(0), default=0.3, show_default=True, help="Size factor of S = M * N^-eta (paper and size-only).")
@click.option("--no-refine", is_flag=True, help="Paper method: skip the +1/+1/+1-bit alignment refinement.")
@click.option("--metric", default="mse", show_default=True, help="Error metric the allocation uses (paper, optimal, optimal-align).")
@click.option("--n-time-features", type=Count(0), default=None, help="N_tf of the accounting (default: the analysis's; set it when exporting with another --steps).")
@click.option("--model", default=None, help="Check that the analysis was made for MODEL (same layers and weights).")
@click.option("--plot", type=Output("plot"), default=None, help="Plot bits per layer across the UNet here (.png, .pdf or .svg).")
@click.option("--compare", is_flag=True, help="Also report the other methods at the same budget.")
@click.option("--json", "as_json", is_flag=True, help="Print the allocation summary as JSON.")
@force_option
def allocate_cmd(sensitivity, budget, out, method, align_weight, eta, no_refine, metric, n_time_features, model, plot, compare,
                 as_json, force):  # fmt: skip
    """Choose bits per layer so the average bits meet BITS without exceeding it.

    The average reported is the paper's accounting, the number `bfq inspect` reports for a file
    exported with the recipe (same N_w, same N_tf). Nothing is written when the budget cannot be met.

    \b
    Examples:
      bfq allocate sens.json --bits 1.99 -o recipe.json --plot bits.png
      bfq allocate sens.json --bits 1.99 --method paper --compare
      bfq quantize tiny-sd --recipe recipe.json -o tiny.bfq
    """
    from bfq.pipeline.allocate import allocate
    from bfq.pipeline.plots import plot_allocation, require_matplotlib
    from bfq.pipeline.sensitivity import check_model, load_sensitivity

    ctx = click.get_current_context()
    if not compare:  # --compare runs every method, each with the options it takes
        refuse_unused(ctx, [
            ("eta", method not in ("paper", "size-only"), "applies to --method paper and size-only only"),
            ("align_weight", method != "optimal-align", "applies to --method optimal-align only"),
            ("no_refine", method != "paper", "applies to --method paper only"),
            ("metric", method == "size-only", "has no effect with --method size-only (bits by layer size alone)"),
        ])  # fmt: skip
    check_outputs(ctx, {"SENSITIVITY": sensitivity, "--model": model_paths(model) if model else None})
    if plot is not None:
        try:
            require_matplotlib()
        except ImportError as e:
            raise click.ClickException(str(e)) from None
    sens = load_sensitivity(sensitivity)
    if model is not None:
        from bfq.pipeline.analyze import model_fingerprint
        from bfq.pipeline.models import resolve_model

        resolved = resolve_model(model)
        check_model(sens, model_fingerprint(resolved.unet, resolved.source), where=f"sensitivity file {sensitivity}")

    def run(m):
        kwargs = {"n_time_features": n_time_features}
        if m in ("paper", "size-only"):
            kwargs["eta"] = eta
        if m != "size-only":
            kwargs["metric"] = metric
        if m == "optimal-align":
            kwargs["align_weight"] = align_weight
        if m == "paper" and no_refine:
            kwargs["align_metric"] = None
        return allocate(sens, budget, m, **kwargs)

    alloc = run(method)
    others = []
    if compare:
        from bfq.pipeline.sensitivity import SensitivityError

        for m in METHODS:
            if m != method:
                try:
                    others.append(run(m))
                except SensitivityError as e:
                    others.append((m, str(e)))
    if out is not None:
        alloc.save(out)
    if plot is not None:
        plot_allocation(alloc, plot)
    if as_json:
        summary = alloc.summary()
        if compare:
            summary["compare"] = [o.summary() if not isinstance(o, tuple) else {"method": o[0], "error": o[1]} for o in others]
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(_report(alloc))
        for o in others:
            if isinstance(o, tuple):
                click.echo(f"compare     {o[0]:<13}  cannot meet the budget: {o[1]}")
            else:
                click.echo(f"compare     {_one_line(o)}")
    if out is not None and not as_json:
        click.echo(f"wrote       {out}")
    if plot is not None and not as_json:
        click.echo(f"plot        {plot}")


def _one_line(a) -> str:
    err = "n/a (bit-widths above those analysed)" if a.predicted_error is None else f"{a.predicted_error:.6g}"
    return f"{a.method:<13}  {a.avg_bits:.6f} bits  summed {a.details['metric']} {err}  layers by bits {a.summary()['layers_by_bits']}"


def _report(a) -> str:
    s = a.summary()
    d = a.details
    fixed = len(d.get("fixed_layers", ()))
    lines = [
        f"recipe      {a.name}  ({a.method} allocation, {a.levels} levels, time cache {a.time_cache})",
        f"avg bits    {a.avg_bits:.6f} by the paper's accounting (budget {a.budget:g}; N_w {a.n_weights_total:,}, "
        f"N_tf {a.n_time_features:,}): what `bfq inspect` reports for the exported file",
        f"layers      {s['n_layers']} ({fixed} fixed at 8 bits); by bits: "
        + ", ".join(f"{b}-bit {n}" for b, n in s["layers_by_bits"].items()),
    ]
    if a.method in ("paper", "size-only"):
        extra = f", refinement by {d['align_metric']} on {d['refined_layers']} layers" if d.get("align_metric") else ""
        lines.append(f"threshold   S_o = {d['threshold']:.6g} (eta {d['eta']:g}, {d['bisection_steps']} bisection steps{extra})")
    if a.method in ("optimal", "optimal-align"):
        what = f"summed {d['metric']}"
        if d.get("align_metric"):
            what = f"{what} + {d['align_weight']:g} x summed {d['align_metric']} (each normalised)"
        lines.append(f"optimality  {what} {d['objective']:.6g}; Lagrangian lower bound {d['lower_bound']:.6g} "
                     f"(gap {100 * d['relative_gap']:.2f}%)")  # fmt: skip
        if d.get("align_metric"):
            lines.append(f"predicted   summed {d['metric']} {a.predicted_error:.6g}, summed {d['align_metric']} "
                         f"{d['predicted_align']:.6g} (drops below 0 counted as 0)")
    elif a.predicted_error is not None:
        lines.append(f"predicted   summed {d['metric']} {a.predicted_error:.6g}")
    if d.get("note"):
        lines.append(f"note        {d['note']}")
    return "\n".join(lines)
