"""Summaries of .bfq files for `bfq inspect`: per-layer table and size accounting (torch-free)."""

from __future__ import annotations

import os

from bfq._io import display
from bfq.format.constants import bits_per_level_ideal
from bfq.format.header import Dense
from bfq.format.reader import BfqFile, open_bfq


def summarize(source: str | os.PathLike | BfqFile) -> dict:
    """Model, per-layer table and totals of a .bfq file.

    `avg_bits` is the paper's accounting (FORMAT.md §2.4); `bits_on_disk` counts the bytes the
    file actually spends on codes, scales, weights kept in floating point and cached time features,
    over the same N_w weights. Both count every weight in the file.
    """
    bfq = source if isinstance(source, BfqFile) else open_bfq(source)
    header = bfq.header
    recipe = header.recipe
    layers = []
    for layer in header.layers.values():
        layers.append(
            {
                "name": layer.name,
                "shape": list(layer.shape),
                "bits": layer.bits,
                "levels": layer.levels,
                "num_levels": layer.num_levels,
                "bytes": layer.nbytes,
                "bits_per_weight": 8 * layer.nbytes / layer.size,
            }
        )
    quantized_weights = sum(layer.size for layer in header.layers.values())
    dense_weights = [t for t in header.tensors.values() if is_weight(t)]
    n_dense_weights = sum(t.size for t in dense_weights)
    n_weights_total = recipe.get("n_weights_total") or quantized_weights + n_dense_weights
    cache = header.time_cache
    n_time_features = cache.num_values if cache else 0
    ideal_bits = sum(bits_per_level_ideal(l.bits, l.levels) * l.size for l in header.layers.values())
    cache_bytes = sum(t.block.length for t in cache.tables.values()) if cache else 0
    layer_bytes = sum(layer.nbytes for layer in header.layers.values())
    dense_bytes = sum(t.block.length for t in header.tensors.values())
    float_bits = 8 * (sum(t.block.length for t in dense_weights) + cache_bytes)  # stored width, both figures
    n_params_total = recipe.get("n_params_total")
    fp16_bytes = 2 * int(n_params_total) if n_params_total else None
    return {
        "file": str(bfq.path),
        "file_bytes": bfq.file_bytes,
        "producer": header.raw["producer"],
        "model": {
            "class_name": header.model["class_name"],
            "source": header.model.get("source"),
            "config_keys": len(header.model["config"]),
        },
        "recipe_name": recipe.get("name"),
        "time_cache": None
        if cache is None
        else {"mode": cache.mode, "timesteps": len(cache.timesteps), "values": n_time_features, "bytes": cache_bytes},
        "n_layers": len(layers),
        "n_tensors": len(header.tensors),
        "dense_values": sum(t.size for t in header.tensors.values()),
        "quantized_weights": quantized_weights,
        "dense_weights": n_dense_weights,
        "n_weights_total": n_weights_total,
        "avg_bits": (ideal_bits + float_bits) / n_weights_total if n_weights_total else None,
        "bits_on_disk": (8 * layer_bytes + float_bits) / n_weights_total if n_weights_total else None,
        "bytes": {"layers": layer_bytes, "dense": dense_bytes, "time_cache": cache_bytes},
        "fp16_bytes": fp16_bytes,
        "ratio_vs_fp16": fp16_bytes / bfq.file_bytes if fp16_bytes else None,
        "metadata": header.metadata,
        "layers": layers,
    }


def format_summary(summary: dict, *, max_rows: int | None = None) -> str:
    """Human-readable report: model, per-layer table (``max_rows`` rows; all for None, no table for
    0), totals. Every text taken from the file goes through `bfq._io.display`, so that a file
    cannot add or overwrite a line of its own report."""
    lines = [
        f"file        {display(summary['file'])}  ({summary['file_bytes']:,} bytes, {summary['file_bytes'] / 1e6:.2f} MB)",
        f"producer    {display(summary['producer'])}",
        f"model       {display(summary['model']['class_name'])}  source={_source(summary['model']['source'])}",
    ]
    if summary["recipe_name"]:
        lines.append(f"recipe      {display(summary['recipe_name'])}")
    cache = summary["time_cache"]
    if cache:
        lines.append(f"time cache  {cache['mode']}: {cache['timesteps']} timesteps, {cache['values']:,} values, {cache['bytes']:,} bytes")
    if max_rows != 0:
        lines += _layer_table(summary, max_rows)
    lines += [
        "",
        "bits        " + "  ".join(f"{b}-bit: {n}" for b, n in layer_bits_histogram(summary).items()),
        f"layers      {summary['n_layers']} quantized ({summary['quantized_weights']:,} weights), {summary['n_tensors']} dense tensors"
        + (f" ({summary['dense_weights']:,} weights kept in floating point)" if summary["dense_weights"] else ""),
    ]
    if summary["avg_bits"] is not None:
        lines += [
            f"avg bits    {summary['avg_bits']:.4f}  (paper's accounting over N_w = {summary['n_weights_total']:,} weights)",
            f"on disk     {summary['bits_on_disk']:.4f} bits/weight for codes + scales + float weights + time cache",
        ]
    if summary["ratio_vs_fp16"]:
        lines.append(f"vs fp16     {summary['fp16_bytes'] / 1e6:.1f} MB -> {summary['file_bytes'] / 1e6:.1f} MB ({summary['ratio_vs_fp16']:.2f}x smaller)")
    return "\n".join(lines)


def is_weight(tensor: Dense) -> bool:
    """A dense tensor the accounting counts as a weight (FORMAT.md §2.4): `*.weight`, >= 2 dims."""
    return tensor.name.endswith(".weight") and len(tensor.shape) >= 2


def _layer_table(summary: dict, max_rows: int | None) -> list[str]:
    rows = summary["layers"] if max_rows is None else summary["layers"][:max_rows]
    names = [display(r["name"]) for r in rows]
    width = max([len(name) for name in names] + [5])
    lines = ["", f"{'layer':<{width}}  {'shape':<18} {'bits':>4} {'levels':>6} {'bytes':>12} {'bits/w':>7}"]
    for name, r in zip(names, rows):
        shape = "x".join(map(str, r["shape"]))
        lines.append(f"{name:<{width}}  {shape:<18} {r['bits']:>4} {r['num_levels']:>6} {r['bytes']:>12,} {r['bits_per_weight']:>7.3f}")
    if len(rows) < len(summary["layers"]):
        lines.append(f"... {len(summary['layers']) - len(rows)} more layers (--all shows them)")
    return lines


def _source(source) -> str:
    if not source:
        return "unknown"
    return ",".join(f"{k}={display(v)}" for k, v in source.items())


def layer_bits_histogram(summary: dict) -> dict[int, int]:
    out: dict[int, int] = {}
    for r in summary["layers"]:
        out[r["bits"]] = out.get(r["bits"], 0) + 1
    return dict(sorted(out.items()))


__all__ = ["summarize", "format_summary", "layer_bits_histogram"]
