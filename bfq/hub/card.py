"""The model card `bfq push` writes: Hub metadata (library, tags, base model, license), bits per
block, average bits, size against fp16, the loading snippet and an optional preview."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from bfq._io import display
from bfq.download import _offline

LICENSE = "apache-2.0"  # this project's license: the bundled tiny-sd and the built-in models carry it
PREVIEW_FILE = "preview.png"
CARD_FILE = "README.md"
_SD_PROMPTS = ("a photo of an astronaut riding a horse on mars", "a cozy wooden cabin in a snowy forest, oil painting")
_TINYSD_PROMPTS = ("a handwritten digit three", "a handwritten digit seven")

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(?:/[\w.-]+)?", re.ASCII)  # a Hub repo id; anything else from a file is not linked
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]()<>|~&])")  # what opens inline Markdown or HTML mid-line
_BLOCK = re.compile(r"^(down_blocks\.\d+|up_blocks\.\d+|mid_block|conv_in|conv_out)(?:\.|$)")


def block_bits(summary: dict) -> list[dict]:
    """Bits per UNet block: down_blocks.N, mid_block, up_blocks.N, conv_in/out, other.

    Each row: block, layers, weights, widths ({bits: layer count}), avg_bits (log2 of the level
    count, weighted by weights: the paper's accounting without the time features)."""
    rows: dict[str, dict] = {}
    for layer in summary["layers"]:
        match = _BLOCK.match(layer["name"])
        block = match.group(1) if match else "other"
        block = "conv_in/out" if block in ("conv_in", "conv_out") else block
        row = rows.setdefault(block, {"block": block, "layers": 0, "weights": 0, "widths": {}, "_ideal": 0.0})
        size = math.prod(layer["shape"])
        row["layers"] += 1
        row["weights"] += size
        row["widths"][layer["bits"]] = row["widths"].get(layer["bits"], 0) + 1
        row["_ideal"] += math.log2(layer["num_levels"]) * size

    def order(name: str):
        kind, _, index = name.partition(".")
        rank = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2, "conv_in/out": 3}.get(kind, 4)
        return rank, int(index) if index.isdigit() else 0

    out = []
    for name in sorted(rows, key=order):
        row = rows[name]
        row["widths"] = dict(sorted(row["widths"].items()))
        row["avg_bits"] = row.pop("_ideal") / row["weights"] if row["weights"] else 0.0
        out.append(row)
    return out


def base_model_info(source: dict | None, *, token: str | bool | None = None, lookup: bool = True) -> dict:
    """{'base_model': repo or None, 'license': ..., 'license_name'/'license_link' (for 'other'),
    'pipeline': how the card's snippet gets the VAE and text encoder} for a .bfq's model.source.

    The license of a Hub base is read from its model card metadata when `lookup` is on and the
    client is online; on any failure it is left out (None) rather than guessed."""
    source = source or {}
    info: dict = {"base_model": None, "license": None, "pipeline": None}
    if source.get("kind") == "builtin":
        info["license"] = LICENSE
        info["pipeline"] = "tiny-sd" if source.get("name") == "tiny-sd" else None
    elif source.get("kind") == "hub" and source.get("repo"):
        info["base_model"] = info["pipeline"] = source["repo"]
        if lookup and not _offline():
            info.update(_hub_license(source["repo"], source.get("revision"), token))
    return info


def _hub_license(repo: str, revision: str | None, token) -> dict:
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    card = None
    for rev in dict.fromkeys([revision, None]):  # the pinned revision, else the default branch
        try:
            card = api.model_info(repo, revision=rev).card_data
            break
        except Exception:
            continue
    if card is None or not card.get("license"):
        return {}
    out = {"license": card.get("license")}
    for key in ("license_name", "license_link"):
        if card.get(key):
            out[key] = card.get(key)
    return out


def _md(text, limit: int = 200) -> str:
    """Text from a .bfq file as literal Markdown in the middle of a line: bfq._io.display, then the
    characters that open inline Markdown backslash-escaped (a name cannot start a link, a table
    cell, HTML, emphasis or a code span)."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", display(text, limit))


def _fmt_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"


def model_card(
    path: str | os.PathLike,
    *,
    repo_id: str | None = None,
    filename: str | None = None,
    revision: str | None = None,
    name_file: bool = False,
    preview: dict | None = None,
    base: dict | None = None,
    token: str | bool | None = None,
    summary: dict | None = None,
) -> str:
    """The README.md (model card) for a .bfq file as it will sit in `repo_id`.

    YAML metadata (library_name bfq, tags, base_model + base_model_relation: quantized for a Hub
    base, the license carried from the base), the recipe summary (bits per block, average bits,
    size and ratio against fp16), the exact loading snippet, and the preview grid when `preview`
    ({'file', 'prompts', 'steps', 'seed', 'guidance'}) is given. Deterministic: the same file and
    arguments give the same text.

    Args:
        repo_id: the repo the card is for (default: a placeholder "USER/NAME").
        filename: the .bfq's path in the repo (default: the local file name).
        revision: branch the snippet should pin (None or "main": none).
        name_file: whether the snippet names the file ("user/name/file.bfq"), needed when the
            repo holds more than one .bfq.
        base: `base_model_info(...)` result; default: computed (may read the base's card).
        summary: `bfq.format.inspect.summarize(path)`, when already at hand.
    """
    import yaml

    from bfq.format.inspect import summarize

    path = Path(path)
    summary = summary or summarize(path)
    filename = filename or path.name
    repo_id = repo_id or "USER/NAME"
    base = dict(base if base is not None else base_model_info(summary["model"]["source"], token=token))
    for key in ("base_model", "pipeline"):  # from the file: used in YAML, links and code only as a repo id
        if base.get(key) and base[key] != "tiny-sd" and not _REPO_ID.fullmatch(str(base[key])):
            base[key] = None
    avg = summary["avg_bits"]

    meta: dict = {"library_name": "bfq"}
    if base.get("license"):
        meta["license"] = base["license"]
        for key in ("license_name", "license_link"):
            if base.get(key):
                meta[key] = base[key]
    if base.get("base_model"):
        meta["base_model"] = base["base_model"]
        meta["base_model_relation"] = "quantized"
    meta["pipeline_tag"] = "text-to-image"
    meta["tags"] = ["bfq", "quantization", "quantized", f"{round(avg)}-bit", "bitsfusion", "stable-diffusion", "diffusers"]
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)

    spec = f"{repo_id}/{filename}" if name_file else repo_id
    rev = f', revision="{revision}"' if revision and revision != "main" else ""
    rev_cli = f" --revision {revision}" if rev else ""
    if base.get("pipeline") == "tiny-sd":
        base_arg, base_cli, base_note = "", "", "the bundled tiny-sd pipeline"
        prompt = _TINYSD_PROMPTS[1]
    elif base.get("pipeline"):
        base_arg, base_cli, base_note = "", "", f"`{base['pipeline']}`"
        prompt = _SD_PROMPTS[0]
    else:
        base_arg = ', base="BASE_PIPELINE"'
        base_cli, base_note = " --base BASE_PIPELINE", "`BASE_PIPELINE`: the diffusers pipeline (directory or Hub id) this UNet was quantized from"
        prompt = _SD_PROMPTS[0]
    source = summary["model"]["source"] or {}
    quantized_from = (
        f"[{base['base_model']}](https://huggingface.co/{base['base_model']})" if base.get("base_model")
        else "tiny-sd, the small digit model bundled with bfq" if base.get("pipeline") == "tiny-sd"
        else _md(source.get("name", "a Stable Diffusion UNet"))
    )  # fmt: skip
    title = repo_id.split("/")[-1]

    lines = [
        "---",
        front.rstrip("\n"),
        "---",
        "",
        f"# {title}",
        "",
        f"The UNet of {quantized_from} quantized to **{avg:.2f} bits per weight** with "
        "bfq (BitsFusion, Sui et al., NeurIPS 2024), stored in "
        f"`{filename}`: a checksummed, memory-mappable `.bfq` container "
        f"({_fmt_bytes(summary['file_bytes'])}), written by {_md(summary['producer'])}.",
        "",
        "## Use it",
        "",
        "With the `bfq` Python package (plus torch and diffusers) installed:",
        "",
        "```python",
        "import bfq",
        "from bfq.runtime.generate import load_pipeline",
        "",
        f'unet = bfq.load_unet("{spec}"{rev})  # a diffusers UNet2DConditionModel (fp16)',
        f'pipe, steps = load_pipeline("{spec}"{rev}{base_arg})',
        f'image = pipe("{prompt}", num_inference_steps=steps or 50).images[0]',
        "```",
        "",
        f"`load_pipeline` takes the VAE, text encoder and tokenizer from {base_note}"
        + (" and the scheduler the time-feature cache was made for." if summary["time_cache"] and summary["time_cache"]["mode"] == "scheduler" else "."),
        "From the command line:",
        "",
        "```bash",
        f'bfq generate {spec}{rev_cli}{base_cli} --prompt "{prompt}" -o grid.png',
        f"bfq inspect {spec}{rev_cli}",
        "```",
        "",
        "## Recipe",
        "",
    ]
    recipe = _md(summary["recipe_name"] or "custom")
    cache = summary["time_cache"]
    lines.append(
        f"Recipe {recipe}; {summary['n_layers']} quantized layers ({summary['quantized_weights']:,} weights)"
        + (f"; time features cached ({cache['mode']} mode, {cache['timesteps']} timesteps)." if cache else ".")
    )
    lines += ["", "| block | layers | weights | bit-widths (layers) | avg bits |", "|---|---:|---:|---|---:|"]
    for row in block_bits(summary):
        widths = ", ".join(f"{b}-bit ×{n}" for b, n in row["widths"].items())
        lines.append(f"| {row['block']} | {row['layers']} | {row['weights']:,} | {widths} | {row['avg_bits']:.2f} |")
    lines += [
        "",
        f"- average bits per weight: **{avg:.4f}** (the paper's accounting: log2 of the level count per "
        f"quantized weight plus 16 bits per cached time feature, over {summary['n_weights_total']:,} weights)",
        f"- on disk: {summary['bits_on_disk']:.4f} bits per weight for codes, scales and time features",
    ]
    if summary["fp16_bytes"]:
        ratio = summary["ratio_vs_fp16"]
        how = f"{ratio:.2f}x smaller" if ratio >= 1 else f"{1 / ratio:.2f}x larger"
        lines.append(
            f"- size: {_fmt_bytes(summary['file_bytes'])} against {_fmt_bytes(summary['fp16_bytes'])} in fp16 ({how})"
        )
    else:
        lines.append(f"- size: {_fmt_bytes(summary['file_bytes'])}")
    if preview:
        lines += [
            "",
            "## Preview",
            "",
            f"![preview grid generated with this model]({preview['file']})",
            "",
            f"Generated with `bfq generate`: one row per prompt ({'; '.join(repr(p) for p in preview['prompts'])}), "
            f"{preview['steps'] or 'default'} steps, guidance {preview['guidance']}, seed {preview['seed']}.",
        ]
    lines.append("")
    return "\n".join(lines)


