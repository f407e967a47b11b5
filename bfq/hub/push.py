"""Hugging Face Hub: load .bfq files by repo id, publish them with `push` and a generated model card.

Everything goes through huggingface_hub's public API, so the cache, revision pinning, offline mode
(`HF_HUB_OFFLINE=1`), the endpoint (`HF_ENDPOINT`), the token (`HF_TOKEN` or `hf auth login`) and
the upload transport (Xet when `hf_xet` is installed, plain LFS otherwise or with
`HF_HUB_DISABLE_XET=1`) are huggingface_hub's. Every failure becomes a one-line `HubError`
(downloads: `HubDownloadError`, also a `FileNotFoundError`) that never contains the token.

This module imports huggingface_hub lazily: `import bfq.hub` stays cheap.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import tempfile
from pathlib import Path

from bfq.errors import BfqFormatError

LICENSE = "apache-2.0"  # this project's license: the bundled tiny-sd and the built-in models carry it
PREVIEW_FILE = "preview.png"
CARD_FILE = "README.md"
_SD_PROMPTS = ("a photo of an astronaut riding a horse on mars", "a cozy wooden cabin in a snowy forest, oil painting")
_TINYSD_PROMPTS = ("a handwritten digit three", "a handwritten digit seven")

_NAME = r"[A-Za-z0-9][\w.-]*"
_REPO_FILE = re.compile(rf"^(?P<repo>{_NAME}/{_NAME})(?:/(?P<file>[\w./-]+\.bfq))?$")


class HubError(RuntimeError):
    """A Hub operation failed. The message is one line, says what failed and what state was left,
    and never contains the token."""


class HubDownloadError(HubError, FileNotFoundError):
    """A .bfq named by a repo id could not be fetched (also a FileNotFoundError, so that callers
    treating 'no such model' uniformly keep working)."""


# -- repo ids ------------------------------------------------------------------------------------


def parse_repo_id(spec: str) -> tuple[str, str | None]:
    """'user/name' or 'user/name/path/model.bfq' -> (repo id, file or None).

    'dir/model.bfq' (one slash, ending in .bfq) is taken for a missing local file, not a repo.
    """
    match = _REPO_FILE.match(spec)
    if not match or (match["file"] is None and spec.endswith(".bfq")):
        raise FileNotFoundError(f"{spec!r} is neither a local file nor a Hub repo id like 'user/name'")
    return match["repo"], match["file"]


def is_repo_id(spec: str) -> bool:
    """Whether `spec` reads as a Hub repo id (optionally with a .bfq file path inside the repo)."""
    try:
        parse_repo_id(spec)
    except FileNotFoundError:
        return False
    return True


def resolve(spec: str | os.PathLike, *, revision: str | None = None) -> str:
    """A local path for `spec`: the path itself when it exists, else the file downloaded from the Hub."""
    if os.path.exists(spec):
        return os.fspath(spec)
    spec = os.fspath(spec)
    if not is_repo_id(spec):
        raise FileNotFoundError(f"no such file: {spec}")
    return download_bfq(spec, revision=revision)


# -- errors --------------------------------------------------------------------------------------


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while exc is not None and not any(exc is seen for seen in out):
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _first_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else ""


def _scrub(text: str, token: str | None) -> str:
    """One line, without the token (nor anything that looks like one)."""
    if token:
        text = text.replace(token, "***")
    text = re.sub(r"(?i)(bearer\s+)\S+", r"\1***", text)
    text = re.sub(r"\bhf_[A-Za-z0-9]{30,}\b", "hf_***", text)  # the shape of Hugging Face tokens
    return " ".join(text.split())


def _named(exc: BaseException, *names: str, module: str = "") -> bool:
    """Whether `exc` is an instance of a class called one of `names` (from `module`): classifies
    httpx2 / httpx / requests errors without importing whichever transport huggingface_hub uses."""
    return any(c.__name__ in names and c.__module__.startswith(module) for c in type(exc).__mro__)


def _is_connect(e) -> bool:
    return _named(e, "ConnectError") or _named(e, "ConnectionError", module="requests")


def _is_timeout(e) -> bool:
    return _named(e, "TimeoutException", "Timeout")


def _is_transport(e) -> bool:
    return _named(e, "TransportError") or _named(e, "RequestException", module="requests")


def _hf_errors():
    from huggingface_hub import errors

    remote = getattr(errors, "RemoteEntryNotFoundError", None) or errors.EntryNotFoundError  # 1.x / 0.x
    return errors, remote


def explain(exc: BaseException) -> str:
    """Why a huggingface_hub / HTTP call failed, as a short phrase (no token, one line)."""
    errors, remote_entry_not_found = _hf_errors()
    chain = _chain(exc)

    def first(test):
        return next((e for e in chain if test(e)), None)

    def of(kind):
        return lambda e: isinstance(e, kind)

    endpoint = _endpoint()
    if first(of(errors.OfflineModeIsEnabled)) is not None:
        return "offline mode is on (HF_HUB_OFFLINE=1)"
    http = first(of(errors.HfHubHTTPError))
    if http is not None:
        response = getattr(http, "response", None)
        status = response.status_code if response is not None else None
        detail = _first_line(getattr(http, "server_message", None) or "")
        detail = f": {detail}" if detail else ""
        if isinstance(http, errors.RevisionNotFoundError):
            return f"revision not found (HTTP {status})"
        if isinstance(http, remote_entry_not_found):
            return f"file not found in the repo (HTTP {status})"
        if status == 401 and "credentials" in detail.lower():
            return f"authentication failed (HTTP 401{detail}): log in again with `hf auth login` or set HF_TOKEN"
        if isinstance(http, errors.RepositoryNotFoundError):
            return (
                f"repository not found (HTTP {status}); if it is private, check that your token "
                "(HF_TOKEN or `hf auth login`) can read it"
            )
        if status == 401:
            return f"authentication failed (HTTP 401{detail}): log in with `hf auth login` or set HF_TOKEN"
        if status == 403:
            return f"permission denied (HTTP 403{detail}): the token cannot do this on this repo"
        if status is not None and status >= 500:
            return f"the Hub answered HTTP {status} (server error{detail}); try again later"
        return f"the Hub answered HTTP {status}{detail or ': ' + _first_line(str(http))}"
    connect = first(_is_connect)
    if connect is not None:
        why = _first_line(str(connect))
        return f"cannot connect to {endpoint}" + (f" ({why})" if why else "")
    if first(_is_timeout) is not None:
        return f"timed out talking to {endpoint}"
    transport = first(_is_transport)
    if transport is not None:
        return f"the connection to {endpoint} was interrupted ({type(transport).__name__})"
    connection = first(of(ConnectionError))  # e.g. from hf_xet, which does its own HTTP
    if connection is not None:
        return f"transfer failed ({_first_line(str(connection))})"
    if first(of(errors.LocalEntryNotFoundError)) is not None:
        return "not in the local Hugging Face cache, and the Hub could not be reached"
    validation = first(of(getattr(errors, "HFValidationError", ValueError)))
    if validation is not None:
        return _first_line(str(validation))
    if isinstance(exc, ValueError):
        return f"unexpected answer from the Hub: {_first_line(str(exc))}"
    return f"{type(exc).__name__}: {_first_line(str(exc))}"


def _fail(kind: type[HubError], what: str, exc: BaseException, token: str | None, after: str = "") -> HubError:
    message = f"{what}: {explain(exc)}" + (f"; {after}" if after else "")
    if _endpoint() != "https://huggingface.co" and any("xet" in str(e).lower() for e in _chain(exc)):
        message += " (if this endpoint does not support Xet storage, set HF_HUB_DISABLE_XET=1)"
    return kind(_scrub(message, token or _current_token()))


def _current_token() -> str | None:
    """The token huggingface_hub would send (to scrub it from messages); None if unavailable."""
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:
        return None


def _is_unreachable(exc: BaseException) -> bool:
    """Offline, no connection, or a server error: cases where the local cache may still answer."""
    errors, _ = _hf_errors()
    for e in _chain(exc):
        if isinstance(e, errors.HfHubHTTPError):  # before the transport test: in 0.x it is a requests error
            return e.response is not None and e.response.status_code >= 500
        if isinstance(e, ConnectionError) or _is_transport(e):  # OfflineModeIsEnabled is a ConnectionError
            return True
    return False


# -- download ------------------------------------------------------------------------------------


def download_bfq(spec: str, *, revision: str | None = None) -> str:
    """Local path of the .bfq named by `spec` (repo id, optionally with a file path), downloading it
    into the Hugging Face cache when needed. A repo with exactly one .bfq file needs no file name.

    Offline (`HF_HUB_OFFLINE=1`) or when the Hub cannot be reached, the cache answers: the revision
    (branch, tag or commit) must have been fetched before.

    Raises:
        HubDownloadError: one line saying why (not found, no access, offline and not cached, ...).
    """
    from huggingface_hub import hf_hub_download

    repo, filename = parse_repo_id(spec)
    at = f" (revision {revision})" if revision else ""
    try:
        if filename is None:
            filename = _single_bfq(repo, revision)
        return hf_hub_download(repo, filename, revision=revision)
    except HubError:
        raise
    except Exception as exc:
        after = "not in the local Hugging Face cache either" if _is_unreachable(exc) else ""
        raise _fail(HubDownloadError, f"cannot get {spec}{at} from {_endpoint()}", exc, None, after) from None


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _single_bfq(repo: str, revision: str | None) -> str:
    from huggingface_hub import HfApi

    try:
        files = [f for f in HfApi().list_repo_files(repo, revision=revision) if f.endswith(".bfq")]
    except Exception as exc:
        if not _is_unreachable(exc):
            raise
        files = _cached_bfq_files(repo, revision)
        if files is None:
            where = "offline mode is on (HF_HUB_OFFLINE=1)" if _offline() else explain(exc)
            at = f" (revision {revision})" if revision else ""
            message = f"cannot get {repo}{at}: {where}, and it is not in the local Hugging Face cache; fetch it once online"
            raise HubDownloadError(_scrub(message, _current_token())) from None
    if len(files) != 1:
        found = ", ".join(files) if files else "none"
        raise BfqFormatError(f"{repo}: expected exactly one .bfq file (found {found}); name it as {repo}/FILE.bfq")
    return files[0]


def _cached_bfq_files(repo: str, revision: str | None) -> list[str] | None:
    """The .bfq files of `revision` already in the local cache, or None when it was never fetched."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except Exception:
        return None
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.bfq"))


# -- model card ----------------------------------------------------------------------------------

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
        summary: `bfq.inspect.summarize(path)`, when already at hand.
    """
    import yaml

    from bfq.inspect import summarize

    path = Path(path)
    summary = summary or summarize(path)
    filename = filename or path.name
    repo_id = repo_id or "USER/NAME"
    base = base if base is not None else base_model_info(summary["model"]["source"], token=token)
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
        else f"`{source.get('name', 'a Stable Diffusion UNet')}`"
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
        f"({_fmt_bytes(summary['file_bytes'])}), written by {summary['producer']}.",
        "",
        "## Use it",
        "",
        "With the `bfq` Python package (plus torch and diffusers) installed:",
        "",
        "```python",
        "import bfq",
        "from bfq.generate import load_pipeline",
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
    recipe = summary["recipe_name"] or "custom"
    cache = summary["time_cache"]
    lines.append(
        f"Recipe `{recipe}`; {summary['n_layers']} quantized layers ({summary['quantized_weights']:,} weights)"
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


# -- push ----------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _check_file(path: Path) -> None:
    """Refuse to publish a file that is not a sound .bfq: layout, header and every block checksum."""
    from bfq.container import open_bfq

    with open_bfq(path) as bfq:
        for block in bfq.header.blocks():
            bfq._bytes(block, check=True)  # CRC-32 of every block (cheap; decoding is not needed)


def _same(remote, local_bytes: bytes | None = None, local_sha256: str | None = None) -> bool:
    if remote is None:
        return False
    if remote.lfs is not None:
        sha = local_sha256 or (hashlib.sha256(local_bytes).hexdigest() if local_bytes is not None else None)
        return sha is not None and remote.lfs.sha256 == sha
    return local_bytes is not None and remote.blob_id == _git_blob_sha1(local_bytes)


def make_preview(path, *, prompts=None, base=None, steps=None, num_images=2, seed=0, guidance=7.5, device=None) -> tuple[bytes, dict]:
    """PNG bytes of a small grid generated with the .bfq at `path`, and its caption data."""
    from bfq.container import open_bfq

    with open_bfq(path) as f:
        source = f.header.model.get("source") or {}
    if not prompts:
        prompts = _TINYSD_PROMPTS if source.get("name") == "tiny-sd" else _SD_PROMPTS
    prompts = list(prompts)
    try:
        from bfq.generate import generate

        with tempfile.TemporaryDirectory(prefix="bfq-preview-") as tmp:
            out = Path(tmp) / PREVIEW_FILE
            written = generate(os.fspath(path), prompts, base=base, out=out, steps=steps, num_images=num_images,
                               guidance=guidance, seed=seed, device=device)  # fmt: skip
            data = Path(written).read_bytes()
    except Exception as exc:
        raise HubError(
            _scrub(f"preview: generating images with {Path(path).name} failed ({type(exc).__name__}: "
                   f"{_first_line(str(exc))}); nothing was uploaded", None)  # fmt: skip
        ) from None
    return data, {"file": PREVIEW_FILE, "prompts": prompts, "steps": steps, "seed": seed, "guidance": guidance}


def push(
    path: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    preview: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    filename: str | None = None,
    preview_prompts: list[str] | None = None,
    preview_base: str | None = None,
    preview_steps: int | None = None,
    preview_device: str | None = None,
) -> dict:
    """Publish a .bfq file on the Hub with a generated model card (and optionally a preview grid).

    Creates the repo (model type; `private` applies on creation only) and, for a `revision` other
    than main, the branch; then uploads what differs from the remote: the .bfq (compared by its
    LFS sha256), README.md and preview.png. Re-pushing the same file with the same options uploads
    nothing and makes no commit. The token comes from `token` or huggingface_hub's usual sources
    (HF_TOKEN, `hf auth login`); it never appears in the result nor in errors.

    Returns:
        dict: repo_id, revision, repo_url, commit_url, commit_oid, uploaded (list of {path, bytes}),
        skipped (paths already identical on the Hub), up_to_date (nothing was committed), load (the
        id to pass to `bfq.load_unet`).

    Raises:
        HubError: one line naming the stage that failed (preview, repo creation, upload, commit)
            and whether anything was committed.
        BfqFormatError / FileNotFoundError: `path` is not a sound .bfq file.
    """
    from huggingface_hub import CommitOperationAdd, HfApi, get_token
    from huggingface_hub.hf_api import RepoFile

    from bfq.inspect import summarize

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        repo, in_repo = parse_repo_id(repo_id)
    except FileNotFoundError:
        repo, in_repo = None, None
    if repo is None or in_repo is not None:
        raise HubError(f"--repo {repo_id!r}: give a Hub repo id like 'user/name'")
    filename = filename or path.name
    if not filename.endswith(".bfq"):
        raise HubError(f"the file's name in the repo must end in .bfq (got {filename!r})")
    branch = revision if revision and revision != "main" else None
    if branch and (re.fullmatch(r"[0-9a-fA-F]{40}", branch) or branch.startswith("refs/")):
        raise HubError(f"--revision {branch!r}: push needs a branch name (a commit or ref cannot be pushed to)")
    _check_file(path)
    summary = summarize(path)
    token = token or get_token()
    if not token:
        raise HubError("no Hugging Face token: log in with `hf auth login` or set HF_TOKEN (a token with write access)")

    preview_png, preview_info = (None, None)
    if preview:
        preview_png, preview_info = make_preview(path, prompts=preview_prompts, base=preview_base, steps=preview_steps, device=preview_device)

    local_sha = _sha256(path)
    api = HfApi(token=token)
    where = f"{repo}" + (f" (branch {branch})" if branch else "")
    stage = "create the repo"
    try:
        api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        if branch:
            stage = f"create branch {branch}"
            api.create_branch(repo, branch=branch, exist_ok=True)
        stage = "list the repo's files"
        remote = {f.path: f for f in api.list_repo_tree(repo, recursive=True, revision=revision) if isinstance(f, RepoFile)}
    except Exception as exc:
        raise _fail(HubError, f"push to {where}: cannot {stage}", exc, token, "nothing was uploaded") from None

    other_bfq = sorted(p for p in remote if p.endswith(".bfq") and p != filename)
    name_file = bool(other_bfq) or "/" in filename
    base = base_model_info(summary["model"]["source"], token=token)
    card = model_card(path, repo_id=repo, filename=filename, revision=branch, name_file=name_file, preview=preview_info,
                      base=base, summary=summary).encode()  # fmt: skip

    wanted = [(filename, None, local_sha, path.stat().st_size), (CARD_FILE, card, None, len(card))]
    if preview_png is not None:
        wanted.append((PREVIEW_FILE, preview_png, None, len(preview_png)))
    ops, uploaded, skipped = [], [], []
    for name, data, sha, size in wanted:
        if _same(remote.get(name), data, sha):
            skipped.append(name)
            continue
        ops.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path) if data is None else data))
        uploaded.append({"path": name, "bytes": size})
    load = f"{repo}/{filename}" if name_file else repo
    result = {
        "repo_id": repo,
        "revision": branch or "main",
        "repo_url": f"{api.endpoint}/{repo}" + (f"/tree/{branch}" if branch else ""),
        "load": load,
        "sha256": local_sha,
        "uploaded": uploaded,
        "skipped": skipped,
    }
    if not ops:
        try:
            sha = api.repo_info(repo, revision=revision).sha
        except Exception as exc:
            raise _fail(HubError, f"push to {where}: everything is already up to date, but reading the head commit failed", exc, token) from None
        return {**result, "up_to_date": True, "commit_oid": sha, "commit_url": f"{api.endpoint}/{repo}/commit/{sha}"}

    try:  # upload first (LFS or Xet, as huggingface_hub chooses): a failure here commits nothing
        api.preupload_lfs_files(repo, additions=ops, revision=revision)
    except Exception as exc:
        raise _fail(HubError, f"push to {where}: upload of {', '.join(u['path'] for u in uploaded)} failed", exc, token,
                    "nothing was committed") from None  # fmt: skip
    message = commit_message or f"bfq push: {filename} ({summary['avg_bits']:.2f} bits per weight)"
    try:
        info = api.create_commit(repo, operations=ops, commit_message=message, revision=revision)
    except Exception as exc:
        after = (
            "the commit was refused, nothing was committed"
            if _http_status(exc) is not None
            else f"the commit was not confirmed: check {result['repo_url']} before pushing again"
        )
        raise _fail(HubError, f"push to {where}: commit failed", exc, token, after) from None
    return {**result, "up_to_date": False, "commit_oid": info.oid, "commit_url": info.commit_url}


def _http_status(exc: BaseException) -> int | None:
    from huggingface_hub.errors import HfHubHTTPError

    for e in _chain(exc):
        if isinstance(e, HfHubHTTPError) and e.response is not None:
            return e.response.status_code
    return None


__all__ = [
    "HubError",
    "HubDownloadError",
    "parse_repo_id",
    "is_repo_id",
    "resolve",
    "download_bfq",
    "model_card",
    "block_bits",
    "base_model_info",
    "make_preview",
    "push",
    "explain",
]
