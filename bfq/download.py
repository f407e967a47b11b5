"""Fetch .bfq files and diffusers UNets from the Hugging Face Hub, and the one-line errors every
Hub operation raises.

Repo ids ("user/name", optionally "user/name/path/model.bfq") resolve to files in the Hugging Face
cache through huggingface_hub's public API, so the cache, revision pinning, offline mode
(`HF_HUB_OFFLINE=1`) and the endpoint (`HF_ENDPOINT`) are huggingface_hub's. Every failure is a
one-line `HubError` (downloads: `HubDownloadError`, also a `FileNotFoundError`) that never contains
the token.

This module sits below both `bfq.runtime` (which loads by repo id) and `bfq.hub` (which publishes),
and imports huggingface_hub lazily.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlsplit

from bfq.errors import InputError, UserError

_NAME = r"[A-Za-z0-9][\w.-]*"
_REPO_FILE = re.compile(rf"^(?P<repo>{_NAME}/{_NAME})(?:/(?P<file>[\w./-]+\.bfq))?$")


class HubError(UserError, RuntimeError):
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
    (branch, tag or commit) must have been fetched before. An unreachable Hub is found out with one
    connection attempt (:func:`unreachable`), not after huggingface_hub's retries.

    Raises:
        HubDownloadError: one line saying why (not found, no access, offline and not cached, ...).
    """
    from huggingface_hub import hf_hub_download

    repo, filename = parse_repo_id(spec)
    at = f" (revision {revision})" if revision else ""
    why = unreachable()
    try:
        if filename is None:
            filename = _single_bfq(repo, revision, why)
        return hf_hub_download(repo, filename, revision=revision, local_files_only=why is not None)
    except HubError:
        raise
    except Exception as exc:
        if why is not None:
            raise not_cached(spec + at, why) from None
        after = "not in the local Hugging Face cache either" if _is_unreachable(exc) else ""
        raise _fail(HubDownloadError, f"cannot get {spec}{at} from {_endpoint()}", exc, None, after) from None


PROBE_SECONDS = 3.0


def unreachable() -> str | None:
    """Why the Hub endpoint (``HF_ENDPOINT``, through the proxy when one is set) cannot be reached
    now, found with one TCP connection of at most PROBE_SECONDS; None when it can, or in offline mode
    (huggingface_hub then never tries the network)."""
    if _offline():
        return None
    import urllib.request

    endpoint = _endpoint()
    url = urlsplit(endpoint)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        url = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=PROBE_SECONDS):
            return None
    except OSError as e:
        return f"cannot connect to {endpoint} ({e.strerror or type(e).__name__})"


OFFLINE_HINT = "when working offline, set HF_HUB_OFFLINE=1 so that bfq answers from the cache without trying the network"


def not_cached(what: str, why: str) -> HubDownloadError:
    """The error for a Hub file or model that cannot be fetched (``why``) and is not in the cache."""
    hint = "" if _offline() else f" ({OFFLINE_HINT})"
    message = f"cannot get {what}: {why}, and it is not in the local Hugging Face cache; fetch it once online{hint}"
    return HubDownloadError(_scrub(message, _current_token()))


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _single_bfq(repo: str, revision: str | None, why: str | None = None) -> str:
    from huggingface_hub import HfApi

    files = None
    if why is None:
        try:
            files = [f for f in HfApi().list_repo_files(repo, revision=revision) if f.endswith(".bfq")]
        except Exception as exc:
            if not _is_unreachable(exc):
                raise
            why = "offline mode is on (HF_HUB_OFFLINE=1)" if _offline() else explain(exc)
    if files is None:
        files = _cached_bfq_files(repo, revision)
        if files is None:
            raise not_cached(repo + (f" (revision {revision})" if revision else ""), why)
    if len(files) != 1:
        found = ", ".join(files) if files else "none"
        raise InputError(f"{repo}: expected exactly one .bfq file (found {found}); name it as {repo}/FILE.bfq")
    return files[0]


def _cached_bfq_files(repo: str, revision: str | None) -> list[str] | None:
    """The .bfq files of `revision` already in the local cache, or None when it was never fetched."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except Exception:
        return None
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.bfq"))




# -- diffusers UNets -----------------------------------------------------------------------------


def fetch_unet(repo: str, *, revision: str | None = None, subfolder: str | None = None, cache_dir=None,
               pickles: tuple[str, ...] = (), allow_pickle: bool = False) -> tuple[Path, str, str | None]:  # fmt: skip
    """Download what loading the UNet of a Hub repo needs, in the forms a diffusers user passes: a
    pipeline repo (``model_index.json`` + ``unet/``), a UNet repo (``config.json`` + weights at its
    top), either with ``subfolder`` naming the UNet's folder, at any ``revision``. Only the UNet's
    config and weights (safetensors; pickle-based ones, named by their ``pickles`` suffixes, only
    when there are none and ``allow_pickle``; the full-precision variant when an fp16 one sits beside it) and a pipeline's ``model_index.json``
    and scheduler are fetched. Offline or when the Hub cannot be reached, the cache answers.

    Returns ``(snapshot folder, UNet folder in it, pipeline folder in it or None)``.

    Raises:
        HubDownloadError: cannot be fetched (offline and not cached, not found, no access, ...).
        InputError: the repo holds no UNet where asked.
    """
    from huggingface_hub import snapshot_download

    why = unreachable()  # one connection attempt, not huggingface_hub's retries
    listing = _repo_listing(repo, revision, cache_dir, why)
    unet_dir, pipe_dir = _unet_layout(repo, listing, subfolder)
    wanted = _unet_files(repo, listing, unet_dir, pipe_dir, pickles, allow_pickle)
    try:
        local = snapshot_download(repo, revision=revision, allow_patterns=wanted, cache_dir=cache_dir, local_files_only=why is not None)
    except Exception as exc:  # huggingface_hub and its transport raise many types
        raise _unet_error(repo, revision, exc, why) from None
    return Path(local), unet_dir, pipe_dir


def _repo_listing(repo: str, revision: str | None, cache_dir, why: str | None) -> list[str]:
    """The repo's file paths at ``revision``: from the Hub, or from the local cache when offline or
    unreachable (``why``)."""
    from huggingface_hub import HfApi, snapshot_download

    try:
        if why is None and not _offline():
            return HfApi().list_repo_files(repo, revision=revision)
        local = Path(snapshot_download(repo, revision=revision, cache_dir=cache_dir, local_files_only=True))
    except Exception as exc:  # huggingface_hub and its transport raise many types
        raise _unet_error(repo, revision, exc, why) from None
    return sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())


def _unet_error(repo: str, revision: str | None, exc: BaseException, why: str | None) -> HubDownloadError:
    at = f" (revision {revision})" if revision else ""
    errors, _ = _hf_errors()
    if why is not None or _offline() or isinstance(exc, errors.LocalEntryNotFoundError):
        reason = "HF_HUB_OFFLINE is set" if _offline() else (why or "the Hub cannot be reached")
        hint = "" if _offline() else f" ({OFFLINE_HINT})"
        return HubDownloadError(_scrub(
            f"cannot get {repo!r}{at}: {reason} and it is not in the local Hugging Face cache. Download it once with "
            f"network access (e.g. `hf download {repo}`), or pass a local directory{hint}", _current_token()))  # fmt: skip
    return _fail(HubDownloadError, f"cannot download {repo!r}{at} from {_endpoint()}", exc, None)


def _unet_layout(repo: str, listing: list[str], subfolder: str | None) -> tuple[str, str | None]:
    """``(UNet folder, pipeline folder or None)`` inside the repo, as diffusers would read it."""
    files = set(listing)
    if subfolder:
        unet_dir = subfolder.strip("/")
        if f"{unet_dir}/config.json" not in files:
            raise InputError(f"{repo!r} has no {unet_dir}/config.json: --subfolder must name the UNet's folder")
        parent = unet_dir.rpartition("/")[0]
        return unet_dir, (parent if f"{parent}/model_index.json".lstrip("/") in files else None)
    if "config.json" in files:
        return "", None
    for component in ("unet", "transformer"):  # a pipeline repo, or only its model's folder (DiT: transformer/)
        if f"{component}/config.json" in files:
            return component, ("" if "model_index.json" in files else None)
    raise InputError(f"{repo!r} is neither a diffusers pipeline (model_index.json + unet/ or transformer/) nor a UNet (config.json "
                     "at its top); if the UNet is in a folder of the repo, name it with --subfolder")  # fmt: skip


def _unet_files(repo, listing, unet_dir: str, pipe_dir: str | None, pickles: tuple[str, ...], allow_pickle: bool) -> list[str]:
    prefix = f"{unet_dir}/" if unet_dir else ""
    own = [f for f in listing if f.startswith(prefix) and "/" not in f[len(prefix):]]
    safe = [f for f in own if f.endswith(".safetensors")]
    pickled = [f for f in own if pickles and f.endswith(pickles)]
    weights = [f for f in safe if ".fp16." not in f] or safe or (pickled if allow_pickle else [])
    if not weights:
        raise InputError(f"{repo!r}: {prefix or 'the top of the repo'} holds no UNet weights (*.safetensors)" + (
            f", only pickle ones ({pickled[0]}): loading them can run arbitrary code; pass --allow-pickle if you trust them"
            if pickled else ""))  # fmt: skip
    wanted = [f for f in own if f.endswith(".json")] + weights
    if pipe_dir is not None:
        top = f"{pipe_dir}/" if pipe_dir else ""
        wanted += [f for f in listing if f == f"{top}model_index.json" or f.startswith(f"{top}scheduler/")]
    return wanted
