"""The model card `bfq push` writes: Hub metadata (library, tags, base model, license), bits per
block, average bits, size against fp16, the loading snippet and an optional preview."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from bfq._io import display, sha256_file
from bfq.download import _offline
from bfq.families import FAMILIES, FamilyError, family_for_config

LICENSE = "apache-2.0"  # this project's license: the bundled tiny-sd and the built-in models carry it
PREVIEW_FILE = "preview.png"
CARD_FILE = "README.md"
_SD_PROMPTS = ("a photo of an astronaut riding a horse on mars", "a cozy wooden cabin in a snowy forest, oil painting")
_TINYSD_PROMPTS = ("a handwritten digit three", "a handwritten digit seven")
_TINY = tuple(f.tiny_name for f in FAMILIES)  # the bundled tiny pipelines, trained on the same digits

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(?:/[\w.-]+)?", re.ASCII)  # a Hub repo id; anything else from a file is not linked
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]()<>|~&])")  # what opens inline Markdown or HTML mid-line
_BLOCK = re.compile(r"^(down_blocks\.\d+|up_blocks\.\d+|mid_block|conv_in|conv_out|"
                    r"pos_embed|caption_projection|transformer_blocks\.\d+|adaln_single|proj_out)(?:\.|$)")
_FIRST_LAST = {"conv_in": "conv_in/out", "conv_out": "conv_in/out", "pos_embed": "pos_embed/proj_out",
               "proj_out": "pos_embed/proj_out"}  # the first and last layers, one row
_BLOCK_RANK = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2, "conv_in/out": 3,  # a UNet's
               "caption_projection": 0, "adaln_single": 1, "transformer_blocks": 2, "pos_embed/proj_out": 3}  # a DiT's


def block_bits(summary: dict) -> list[dict]:
    """Bits per block: a UNet's down_blocks.N, mid_block, up_blocks.N, conv_in/out; a diffusion
    transformer's caption_projection, adaln_single, transformer_blocks.N, pos_embed/proj_out; other.

    Each row: block, layers, weights, widths ({bits: layer count}), avg_bits (log2 of the level
    count, weighted by weights: the paper's accounting without the time features)."""
    rows: dict[str, dict] = {}
    for layer in summary["layers"]:
        match = _BLOCK.match(layer["name"])
        block = match.group(1) if match else "other"
        block = _FIRST_LAST.get(block, block)
        row = rows.setdefault(block, {"block": block, "layers": 0, "weights": 0, "widths": {}, "_ideal": 0.0})
        size = math.prod(layer["shape"])
        row["layers"] += 1
        row["weights"] += size
        row["widths"][layer["bits"]] = row["widths"].get(layer["bits"], 0) + 1
        row["_ideal"] += math.log2(layer["num_levels"]) * size

    def order(name: str):
        kind, _, index = name.partition(".")
        rank = _BLOCK_RANK.get(kind, 4)
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
        info["pipeline"] = source.get("name") if source.get("name") in _TINY else None
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


def _family(path: Path):
    """The file's model family (read from its header); SD-v1.5's for a model of none."""
    from bfq.families import sd15
    from bfq.format import open_bfq

    with open_bfq(path) as f:
        model = f.header.model
    try:
        return family_for_config(model["config"], model["class_name"])
    except FamilyError:
        return sd15.FAMILY


def _sampled_steps(summary: dict) -> int:
    """The step count a scheduler-mode file samples (one cached timestep a step), else diffusers' 50."""
    cache = summary["time_cache"]
    return cache["timesteps"] if cache and cache["mode"] == "scheduler" else 50


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
    files: list[dict] | None = None,
    diffusers: bool = False,
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
        files: every .bfq in the repo, this one included, as :func:`file_entry` rows (a row whose
            avg_bits is None: a file the card knows only the size of); default: this file alone.
            More than one and the card lists them all (one repo, several quantizations) and
            records them in a hidden line that :func:`card_files` reads back on the next push.
    """
    import yaml

    from bfq.format.inspect import summarize

    path = Path(path)
    summary = summary or summarize(path)
    filename = filename or path.name
    repo_id = repo_id or "USER/NAME"
    base = dict(base if base is not None else base_model_info(summary["model"]["source"], token=token))
    for key in ("base_model", "pipeline"):  # from the file: used in YAML, links and code only as a repo id
        if base.get(key) and base[key] not in _TINY and not _REPO_ID.fullmatch(str(base[key])):
            base[key] = None
    avg = summary["avg_bits"]
    files = sorted(files or [file_entry(filename, summary, sha256_file(path))], key=lambda f: f["file"])
    name_file = name_file or len(files) > 1

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
    family = _family(path)
    meta["tags"] = ["bfq", "quantization", "quantized", f"{round(avg)}-bit", "bitsfusion", family.hub_tag, "diffusers"]
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)

    spec = f"{repo_id}/{filename}" if name_file else repo_id
    rev = f', revision="{revision}"' if revision and revision != "main" else ""
    rev_cli = f" --revision {revision}" if rev else ""
    if base.get("pipeline") in _TINY:
        base_arg, base_cli, base_note = "", "", f"the bundled {base['pipeline']} pipeline"
        prompt = _TINYSD_PROMPTS[1]
    elif base.get("pipeline"):
        base_arg, base_cli, base_note = "", "", f"`{base['pipeline']}`"
        prompt = _SD_PROMPTS[0]
    else:
        base_arg = ', base="BASE_PIPELINE"'
        base_cli, base_note = " --base BASE_PIPELINE", f"`BASE_PIPELINE`: the diffusers pipeline (directory or Hub id) this {family.model_noun} was quantized from"
        prompt = _SD_PROMPTS[0]
    source = summary["model"]["source"] or {}
    quantized_from = (
        f"[{base['base_model']}](https://huggingface.co/{base['base_model']})" if base.get("base_model")
        else f"{base['pipeline']}, the small digit model bundled with bfq" if base.get("pipeline") in _TINY
        else _md(source.get("name", f"a {family.title} model"))
    )  # fmt: skip
    title = repo_id.split("/")[-1]
    scheduler_cache = bool(summary["time_cache"]) and summary["time_cache"]["mode"] == "scheduler"
    steps_arg = f", num_inference_steps={_sampled_steps(summary)}" if scheduler_cache else ""

    lines = [
        "---",
        front.rstrip("\n"),
        "---",
        "",
        f"# {title}",
        "",
        f"The {family.model_noun} of {quantized_from} quantized to **{avg:.2f} bits per weight** with "
        "bfq (BitsFusion, Sui et al., NeurIPS 2024), stored in "
        f"`{filename}`: a checksummed, memory-mappable `.bfq` container "
        f"({_fmt_bytes(summary['file_bytes'])}), written by {_md(summary['producer'])}.",
        "",
        "## Use it",
        "",
        *(_diffusers_snippet(repo_id, revision, prompt, steps_arg, family) if diffusers else []),
        "With the `bfq` Python package (plus torch and diffusers) installed, a whole pipeline"
        + (f" (the file named: this repo holds {len(files)} quantizations, listed below)" if len(files) > 1 else "")
        + ":",
        "",
        "```python",
        "import bfq",
        "",
        f'pipe = bfq.load_pipeline("{spec}"{rev}{base_arg})  # a {family.pipeline_class}: float16 on CUDA, '
        f"float32 on the CPU (the {family.model_noun} in bf16 where the CPU has native bf16)",
        f'image = pipe("{prompt}"{steps_arg}).images[0]',
        'image.save("image.png")',
        "```",
        "",
        f"`load_pipeline` takes the VAE, text encoder and tokenizer from {base_note}"
        + (" and the scheduler the time-feature cache was made for (it samples only that step count)." if scheduler_cache else ".")
        + f" The {family.model_noun} alone, for a pipeline of your own (its `{family.component}`):",
        "",
        "```python",
        "import bfq",
        "",
        f'{family.component} = bfq.load_{family.component}("{spec}"{rev})  # a diffusers {family.model_class}: float32 on the CPU, '
        'float16 with device="cuda"',
        "```",
        "",
        "From the command line:",
        "",
        "```bash",
        f'bfq generate {spec}{rev_cli}{base_cli} --prompt "{prompt}" -o grid.png',
        f"bfq inspect {spec}{rev_cli}",
        "```",
        "",
    ]
    if len(files) > 1:
        lines += _files_table(files, summary["fp16_bytes"])
    lines += [
        "## Recipe" + (f" of `{filename}`" if len(files) > 1 else ""),
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
    lines += ["", _files_record(files), ""]
    return "\n".join(lines)


def _diffusers_snippet(repo_id, revision, prompt: str, steps_arg: str, family) -> list[str]:
    rev = f", revision={revision!r}" if revision else ""
    return [
        f"This repo is also a diffusers pipeline ({family.pipeline_class}) whose `{family.component}/` holds the same "
        "model in bfq's diffusers layout: plain diffusers loads it once `bfq` is imported (it registers the `bfq` "
        "quantization backend).",
        "",
        "```python",
        "import bfq  # registers the \"bfq\" quantization backend with diffusers",
        "from diffusers import DiffusionPipeline",
        "",
        f'pipe = DiffusionPipeline.from_pretrained("{repo_id}"{rev})  # the {family.model_noun} stays at ~2 bits per '
        "weight in memory",
        f'image = pipe("{prompt}"{steps_arg}).images[0]',
        'image.save("image.png")',
        "```",
        "",
    ]


def file_entry(filename: str, summary: dict, sha256: str) -> dict:
    """What the card records of one .bfq of the repo (what its Files table shows)."""
    return {"file": filename, "sha256": sha256, "bytes": summary["file_bytes"], "avg_bits": round(summary["avg_bits"], 4),
            "recipe": summary["recipe_name"] or "custom"}  # fmt: skip


def _files_table(files: list[dict], fp16_bytes: int | None) -> list[str]:
    lines = ["## Files", "", "| file | avg bits per weight | size | recipe |", "|---|---:|---:|---|"]
    for f in files:
        bits = f"{f['avg_bits']:.4f}" if f.get("avg_bits") is not None else "? (not pushed with `bfq push`)"
        name = display(f["file"]).replace("`", "'").replace("|", "\\|")  # a code span in a table cell
        lines.append(f"| `{name}` | {bits} | {_fmt_bytes(f['bytes'])} | {_md(f.get('recipe') or '?')} |")
    note = f" (the UNet in fp16: {_fmt_bytes(fp16_bytes)})" if fp16_bytes else ""
    return lines + ["", f"Pass any of these file names to `load_pipeline` or `bfq.load_unet` as above{note}.", ""]


_RECORD = re.compile(r"^<!-- bfq-files: (\[.*\]) -->$", re.M)
_RECORD_UNSAFE = re.compile(r'[^A-Za-z0-9._/:,\[\]{}"\\-]')


def _files_record(files: list[dict]) -> str:
    """A hidden line listing the repo's .bfq files, for the next push to keep them on the card
    (JSON whose strings keep only letters, digits and ``._-/:`` as they are, the rest \\u-escaped, so
    a name from a file can neither end the HTML comment nor show as Markdown)."""
    text = json.dumps(files, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return "<!-- bfq-files: " + _RECORD_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text) + " -->"


def card_files(card: str) -> dict[str, dict]:
    """{file: entry} recorded by :func:`_files_record` in a card; {} when there is none or it is not
    ours to read (a card edited by hand is not trusted further than its well-formed entries)."""
    match = _RECORD.search(card)
    try:
        rows = json.loads(match.group(1)) if match else []
    except ValueError:
        return {}
    keys = {"file": str, "sha256": str, "bytes": int, "avg_bits": (int, float), "recipe": str}
    return {r["file"]: r for r in rows if isinstance(r, dict) and all(isinstance(r.get(k), t) for k, t in keys.items())}


