"""`bfq push`: publish a .bfq file on the Hugging Face Hub with a generated model card.

The token comes from huggingface_hub (`HF_TOKEN` or `hf auth login`) and never appears in a
message; the upload transport (Xet when `hf_xet` is installed, plain LFS otherwise or with
`HF_HUB_DISABLE_XET=1`) is huggingface_hub's. Pushing an unchanged file uploads nothing.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

from bfq._io import sha256_file
from bfq.download import HubError, _chain, _fail, _first_line, _scrub, parse_repo_id
from bfq.hub.card import (
    _SD_PROMPTS,
    _TINY,
    _TINYSD_PROMPTS,
    CARD_FILE,
    PREVIEW_FILE,
    base_model_info,
    card_files,
    file_entry,
    model_card,
)


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _check_file(path: Path) -> None:
    """Refuse to publish a file that is not a sound .bfq: layout, header and every block checksum."""
    from bfq.format import open_bfq

    with open_bfq(path) as bfq:
        for block in bfq.header.blocks():
            bfq._bytes(block, check=True)  # CRC-32 of every block (cheap; decoding is not needed)


_FILE_PART = re.compile(r"[\w.-]+")
_BRANCH_PART = re.compile(r"[\w.-]+")


def check_arguments(path: Path, repo_id: str, filename: str | None, revision: str | None) -> tuple[str, str, str | None]:
    """(repo, file name in the repo, branch or None) for `push`'s arguments, or a HubError saying
    which one is wrong: everything the Hub would refuse is refused here, before the first Hub call,
    so a failed command creates nothing there."""
    try:
        repo, in_repo = parse_repo_id(repo_id)
    except FileNotFoundError:
        repo, in_repo = None, None
    if repo is None or in_repo is not None or len(repo.split("/")[1]) > 96:
        raise HubError(f"--repo {repo_id!r}: give a Hub repo id like 'user/name'")
    filename = path.name if filename is None else filename
    parts = filename.split("/")
    bad_part = any(not _FILE_PART.fullmatch(p) or p in (".", "..", ".git", ".cache") for p in parts)
    if not filename.endswith(".bfq") or parts[-1] == ".bfq" or bad_part:
        raise HubError(f"--filename {filename!r}: give a path inside the repo ending in .bfq, made of letters, digits, "
                       "'_', '-', '.' and '/' between folders (no '..', no leading '/')")  # fmt: skip
    branch = revision if revision and revision != "main" else None
    if branch is None:
        return repo, filename, None
    if re.fullmatch(r"[0-9a-fA-F]{40}", branch) or branch.startswith("refs/"):
        raise HubError(f"--revision {branch!r}: push needs a branch name (a commit or ref cannot be pushed to)")
    pieces = branch.split("/")
    if any(not _BRANCH_PART.fullmatch(p) or p.startswith(".") or p.endswith(".lock") for p in pieces) or ".." in branch:
        raise HubError(f"--revision {branch!r}: not a valid branch name (letters, digits, '_', '-', '.', '/' between parts)")
    return repo, filename, branch


def _same(remote, local_bytes: bytes | None = None, local_sha256: str | None = None) -> bool:
    if remote is None:
        return False
    if remote.lfs is not None:
        sha = local_sha256 or (hashlib.sha256(local_bytes).hexdigest() if local_bytes is not None else None)
        return sha is not None and remote.lfs.sha256 == sha
    return local_bytes is not None and remote.blob_id == _git_blob_sha1(local_bytes)


def make_preview(path, *, prompts=None, base=None, steps=None, num_images=2, seed=0, guidance=7.5, device=None,
                 runtime="auto") -> tuple[bytes, dict]:  # fmt: skip
    """PNG bytes of a small grid generated with the .bfq at `path`, and its caption data."""
    from bfq.format import open_bfq

    with open_bfq(path) as f:
        source = f.header.model.get("source") or {}
    if not prompts:
        prompts = _TINYSD_PROMPTS if source.get("name") in _TINY else _SD_PROMPTS
    prompts = list(prompts)
    try:
        from bfq.runtime.generate import generate

        with tempfile.TemporaryDirectory(prefix="bfq-preview-") as tmp:
            out = Path(tmp) / PREVIEW_FILE
            written = generate(os.fspath(path), prompts, base=base, out=out, steps=steps, num_images=num_images,
                               guidance=guidance, seed=seed, device=device, runtime=runtime)  # fmt: skip
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
    preview_runtime: str = "auto",
    diffusers: bool | None = None,
) -> dict:
    """Publish a .bfq file on the Hub with a generated model card (and optionally a preview grid).

    Creates the repo (model type; `private` applies on creation only) and, for a `revision` other
    than main, the branch; then uploads what differs from the remote: the .bfq (compared by its
    LFS sha256), README.md and preview.png. Re-pushing the same file with the same options uploads
    nothing and makes no commit. The token comes from `token` or huggingface_hub's usual sources
    (HF_TOKEN, `hf auth login`); it never appears in the result nor in errors.

    Returns:
        dict: repo_id, revision, repo_url, file (its path in the repo), commit_url, commit_oid, uploaded (list of {path, bytes}),
        skipped (paths already identical on the Hub), up_to_date (nothing was committed), load (the
        id to pass to `bfq.load_unet`), pipeline (the repo is a diffusers pipeline), note (why it
        is not, when the default could not find the base pipeline; else None).

    By default the repo is also a diffusers pipeline repo (FORMAT.md appendix A): ``unet/`` in the
    diffusers layout of this file, the file's scheduler, and every other component of the base
    pipeline (``preview_base``, else the file's source, found as ``bfq.load_pipeline`` finds it: a
    local folder or a Hub repo) copied with its ``model_index.json``, so that ``import bfq`` +
    ``DiffusionPipeline.from_pretrained(repo)`` loads it; the card's first snippet is then that plain
    diffusers one. When no base pipeline is found the .bfq and its card are pushed alone and
    ``note`` says so; ``diffusers=True`` makes that a HubError instead (before any Hub write), and
    ``diffusers=False`` pushes the .bfq and its card alone.

    Raises:
        HubError: one line naming the stage that failed (preview, repo creation, upload, commit)
            and whether anything was committed.
        BfqFormatError / FileNotFoundError: `path` is not a sound .bfq file.
    """
    from huggingface_hub import CommitOperationAdd, HfApi, get_token
    from huggingface_hub.hf_api import RepoFile

    from bfq.format.inspect import summarize

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    repo, filename, branch = check_arguments(path, repo_id, filename, revision)
    _check_file(path)
    summary = summarize(path)
    token = token or get_token()
    if not token:
        raise HubError("no Hugging Face token: log in with `hf auth login` or set HF_TOKEN (a token with write access)")

    # the base pipeline is found (or refused) before the preview, the heavy part
    pipeline_base, note = _pipeline_base(path, preview_base, diffusers, token) if diffusers is not False else (None, None)
    preview_png, preview_info = (None, None)
    if preview:
        preview_png, preview_info = make_preview(path, prompts=preview_prompts, base=preview_base, steps=preview_steps, device=preview_device,
                                                 runtime=preview_runtime)

    local_sha = sha256_file(path)
    layout, _tmp = _diffusers_files(path, pipeline_base) if pipeline_base else ([], None)  # _tmp: removed when push returns
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

    files = [file_entry(filename, summary, local_sha)] + _other_files(api, repo, revision, remote, filename)
    name_file = len(files) > 1 or "/" in filename
    base = base_model_info(summary["model"]["source"], token=token)
    card = model_card(path, repo_id=repo, filename=filename, revision=branch, name_file=name_file, preview=preview_info,
                      base=base, summary=summary, files=files, diffusers=bool(layout)).encode()  # fmt: skip

    wanted = [(filename, None, local_sha, path.stat().st_size, path), (CARD_FILE, card, None, len(card), None)]
    if preview_png is not None:
        wanted.append((PREVIEW_FILE, preview_png, None, len(preview_png), None))
    wanted += [(name, None, sha256_file(local), local.stat().st_size, local) for name, local in layout]
    ops, uploaded, skipped = [], [], []
    for name, data, sha, size, local in wanted:
        local_bytes = data if data is not None or size > 10_000_000 else local.read_bytes()  # small: compared by git blob
        if _same(remote.get(name), local_bytes, sha):
            skipped.append(name)
            continue
        ops.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(local) if data is None else data))
        uploaded.append({"path": name, "bytes": size})
    load = f"{repo}/{filename}" if name_file else repo
    result = {
        "repo_id": repo,
        "revision": branch or "main",
        "repo_url": f"{api.endpoint}/{repo}" + (f"/tree/{branch}" if branch else ""),
        "load": load,
        "file": filename,
        "sha256": local_sha,
        "uploaded": uploaded,
        "skipped": skipped,
        "pipeline": bool(layout),
        "note": note,
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


def _pipeline_base(path: Path, base: str | None, required: bool | None, token: str) -> tuple[Path | None, str | None]:
    """The local folder of the base pipeline (VAE, text encoders, tokenizers, model_index.json) that a
    pipeline repo of ``path`` copies: ``base``, else the file's source as ``bfq.load_pipeline`` finds
    it; a Hub base is downloaded (without the components the file replaces). (None, note) when the
    file's own base cannot be found and the pipeline is not ``required``; a HubError when ``base``
    was given or the pipeline is required. Hub reads only: nothing is created on the Hub."""
    from bfq.errors import InputError
    from bfq.runtime.generate import base_pipeline_for, file_sampler

    given = base is not None
    if not given:
        try:
            base = base_pipeline_for(file_sampler(str(path)).source, path)
        except InputError as exc:
            if required:
                raise HubError(f"--diffusers needs the base pipeline: {_first_line(str(exc))}") from None
            return None, _not_a_pipeline(_first_line(str(exc)).split(": pass --base")[0])
    found = _base_folder(path, base, token)
    if found is not None:
        return found, None
    if given or required:
        asked = "--base" if given else "--diffusers: the base"
        raise HubError(f"{asked} {base!r} is not a diffusers pipeline (no model_index.json found)")
    return None, _not_a_pipeline(f"its base {base!r} is not a diffusers pipeline (no model_index.json found)")


def _not_a_pipeline(why: str) -> str:
    return (f"the repo is not a diffusers pipeline, only the .bfq and its card were pushed: {why}; "
            "pass --base DIR_OR_REPO (its VAE and text encoder) to publish the pipeline too")  # fmt: skip


def _base_folder(path: Path, base: str, token: str) -> Path | None:
    """``base`` as a local pipeline folder (a Hub repo: downloaded without the file's own
    components), or None when it has no model_index.json. Hub failures other than "no such repo or
    file" are one-line HubErrors."""
    if Path(base).is_dir():
        return Path(base) if (Path(base) / "model_index.json").is_file() else None
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, HFValidationError, RepositoryNotFoundError

    try:
        hf_hub_download(base, "model_index.json", token=token)
    except GatedRepoError as exc:
        raise _fail(HubError, f"reading the base pipeline {base}", exc, token, "nothing was uploaded") from None
    except (EntryNotFoundError, RepositoryNotFoundError, HFValidationError):
        return None
    except Exception as exc:
        raise _fail(HubError, f"reading the base pipeline {base}", exc, token, "nothing was uploaded") from None
    ignore = [f"{c}/*" for c in _own_components(path)]
    ignore += ["*.bin", "*.ckpt", "*.msgpack", "*.onnx", "*.onnx_data", "*.h5", "*.pb", "*.md"]
    try:
        return Path(snapshot_download(base, ignore_patterns=ignore, token=token))
    except Exception as exc:
        raise _fail(HubError, f"downloading the base pipeline {base}", exc, token, "nothing was uploaded") from None


def _own_components(path: Path) -> set[str]:
    """The pipeline components the file itself provides: its model's, and the scheduler it records."""
    from bfq.families import family_for_config
    from bfq.runtime.generate import file_sampler

    sampler = file_sampler(str(path))
    own = {family_for_config(sampler.config, sampler.class_name).component}
    return own | ({"scheduler"} if sampler.scheduler is not None else set())


def _diffusers_files(path: Path, base_dir: Path):
    """(path in the repo, local file) of a diffusers pipeline repo around ``path``: its component in
    the diffusers layout, its scheduler, and the other components and model_index.json of the base
    pipeline at ``base_dir``; and the temporary folder holding the first two (removed when it is
    garbage-collected)."""
    import tempfile

    from bfq.families import family_for_config
    from bfq.format import open_bfq
    from bfq.format.diffusers_layout import write_layout
    from bfq.runtime.generate import file_sampler

    sampler = file_sampler(str(path))
    component = family_for_config(sampler.config, sampler.class_name).component
    holder = tempfile.TemporaryDirectory(prefix="bfq-push-")
    tmp = Path(holder.name)
    with open_bfq(path) as bfq:
        write_layout(bfq, tmp, component)
    if sampler.scheduler is not None:  # the scheduler the time cache was made for
        sampler.scheduler.save_pretrained(tmp / "scheduler")
    own = _own_components(path)
    files = [(p.relative_to(tmp).as_posix(), p) for p in sorted(tmp.rglob("*")) if p.is_file()]
    for p in sorted(base_dir.rglob("*")):
        rel = p.relative_to(base_dir)
        if p.is_file() and len(rel.parts) > 1 and rel.parts[0] not in own and not rel.parts[0].startswith("."):
            files.append((rel.as_posix(), p))
    files.append(("model_index.json", base_dir / "model_index.json"))
    return files, holder


def _other_files(api, repo: str, revision: str | None, remote: dict, filename: str) -> list[dict]:
    """The repo's other .bfq files as the card lists them: what the current card recorded of each
    (kept only while the file on the Hub has the same sha256), else its size alone."""
    others = sorted(p for p in remote if p.endswith(".bfq") and p != filename)
    known = {}
    if others and CARD_FILE in remote:
        try:
            with open(api.hf_hub_download(repo, CARD_FILE, revision=revision), encoding="utf-8") as f:
                known = card_files(f.read())
        except Exception:  # an unreadable card costs the table its bits, not the push
            known = {}
    out = []
    for name in others:
        entry, lfs = known.get(name), remote[name].lfs
        same = entry is not None and lfs is not None and entry["sha256"] == lfs.sha256
        out.append(entry if same else {"file": name, "bytes": remote[name].size, "avg_bits": None, "recipe": None})
    return out


def _http_status(exc: BaseException) -> int | None:
    from huggingface_hub.errors import HfHubHTTPError

    for e in _chain(exc):
        if isinstance(e, HfHubHTTPError) and e.response is not None:
            return e.response.status_code
    return None
