"""Hugging Face Hub access: download .bfq files by repo id (huggingface_hub does caching,
revision pinning and offline mode)."""

from __future__ import annotations

import re

from bfq.errors import BfqFormatError

_REPO_FILE = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)(?:/(?P<file>[\w./-]+\.bfq))?$")


def parse_repo_id(spec: str) -> tuple[str, str | None]:
    """'user/name' or 'user/name/path/model.bfq' -> (repo id, file or None)."""
    match = _REPO_FILE.match(spec)
    if not match:
        raise FileNotFoundError(f"{spec!r} is neither a local file nor a Hub repo id like 'user/name'")
    return match["repo"], match["file"]


def download_bfq(spec: str, *, revision: str | None = None) -> str:
    """Local path of the .bfq named by `spec` (repo id, optionally with a file path), downloading it
    into the Hugging Face cache when needed. A repo with exactly one .bfq file needs no file name."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo, filename = parse_repo_id(spec)
    try:
        if filename is None:
            files = [f for f in HfApi().list_repo_files(repo, revision=revision) if f.endswith(".bfq")]
            if len(files) != 1:
                found = ", ".join(files) if files else "none"
                raise BfqFormatError(f"{repo}: expected exactly one .bfq file (found {found}); name it as {repo}/FILE.bfq")
            filename = files[0]
        return hf_hub_download(repo, filename, revision=revision)
    except LocalEntryNotFoundError as exc:
        raise FileNotFoundError(f"{spec}: not in the local cache and the Hub cannot be reached ({exc})") from None
    except HfHubHTTPError as exc:
        raise FileNotFoundError(f"{spec}: the Hub refused the download ({exc})") from None
