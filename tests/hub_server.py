"""A local fake of the Hugging Face Hub: the subset of the HTTP API that huggingface_hub 2.x uses to
create a repo and a branch, list and describe files, upload (preupload, LFS batch with the basic
and multipart transfers, verify), commit (NDJSON) and download (resolve, with ranges), plus auth
and failure injection. Stdlib only; binds 127.0.0.1 on a free port; stops itself after `lifetime`
seconds even if nobody calls `stop()`.

Not implemented: Xet storage (the client must run with HF_HUB_DISABLE_XET=1: the server answers the
Xet token route with 501), pull requests, tags created through the API, repo types other than model.

    with FakeHub(token="hf_...") as hub:
        hub.url                    # point huggingface_hub's endpoint here
        hub.fail("PUT", r"^/__lfs/", drop=True)      # cut every LFS upload mid-body
        hub.fail("POST", r"/commit/", status=500, times=1)
        hub.file("user/name", "model.bfq")          # bytes on the Hub (None if absent)
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".bfq", ".safetensors", ".bin", ".pt", ".ckpt", ".png", ".zip")
LFS_MIN_SIZE = 10 * 1024 * 1024
USER = "user"
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
BAD_CREDENTIALS = "Invalid credentials in Authorization header"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class Blob:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @property
    def git_oid(self) -> str:
        return git_blob_sha1(self.pointer if self.lfs else self.data)

    def entry(self, path: str) -> dict:
        out = {"type": "file", "oid": self.git_oid, "size": len(self.data), "path": path}
        if self.lfs:
            out["lfs"] = {"oid": self.sha256, "size": len(self.data), "pointerSize": len(self.pointer)}
        return out


@dataclass
class Commit:
    oid: str
    parent: str | None
    files: dict[str, Blob]
    message: str


@dataclass
class Repo:
    id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def resolve(self, rev: str) -> str | None:
        if rev in self.branches:
            return self.branches[rev]
        if re.fullmatch(r"[0-9a-f]{40}", rev) and rev in self.commits:
            return rev
        return None


@dataclass
class Rule:
    method: str
    pattern: re.Pattern
    status: int | None
    drop: bool
    remaining: int | None


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    authorization: str | None
    body_bytes: int


class _Reply(Exception):
    """Raised inside a handler to answer with an error."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class FakeHub:
    def __init__(self, token: str = "hf_fakehubtoken0123456789", *, lifetime: float = 120.0, multipart_threshold: int | None = None, chunk_size: int = 64 * 1024):
        self.token = token
        self.lifetime = lifetime
        self.multipart_threshold = multipart_threshold
        self.chunk_size = chunk_size
        self.repos: dict[str, Repo] = {}
        self.lfs_store: dict[str, bytes] = {}
        self.lfs_uploads: list[tuple[str, int]] = []  # (oid, bytes) of every completed LFS upload
        self.requests: list[Request] = []
        self._rules: list[Rule] = []
        self._parts: dict[str, dict[int, bytes]] = {}
        self._signatures: dict[str, str] = {}  # presigned upload URL signature -> oid
        self._lock = threading.RLock()
        self._counter = 0
        self._server: ThreadingHTTPServer | None = None
        self._timer: threading.Timer | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        self._timer = threading.Timer(self.lifetime, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if self._timer is not None and self._timer is not threading.current_thread():
            self._timer.cancel()
        if server is not None:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- test helpers -------------------------------------------------------------------------

    def fail(self, method: str, pattern: str, *, status: int | None = None, drop: bool = False, times: int | None = None) -> None:
        """Answer requests whose path (with query) matches `pattern` with `status`, or cut the
        connection mid-request (`drop`: half the body is read, then the socket is closed without an
        answer; for GET the headers and half the body are sent). `times`: how often (None: always)."""
        if (status is None) == (not drop):
            raise ValueError("give exactly one of status= and drop=True")
        with self._lock:
            self._rules.append(Rule(method.upper(), re.compile(pattern), status, drop, times))

    def clear_failures(self) -> None:
        with self._lock:
            self._rules.clear()

    def add_repo(self, repo_id: str, files: dict[str, bytes] | None = None, *, private: bool = False, branch: str = "main") -> str:
        """Create a repo (if needed) holding `files` on `branch`; returns the commit oid."""
        with self._lock:
            if repo_id not in self.repos:
                self._create(repo_id, private)
            return self._commit(self.repos[repo_id], branch, {p: self._blob(p, d) for p, d in (files or {}).items()}, [], "add files")

    def file(self, repo_id: str, path: str, revision: str = "main") -> bytes | None:
        with self._lock:
            repo = self.repos.get(repo_id)
            oid = repo.resolve(revision) if repo else None
            blob = repo.commits[oid].files.get(path) if oid else None
            return blob.data if blob else None

    def files(self, repo_id: str, revision: str = "main") -> list[str]:
        """The paths of every file of `repo_id` at `revision` (sorted)."""
        with self._lock:
            repo = self.repos[repo_id]
            return sorted(repo.commits[repo.resolve(revision)].files)

    def head(self, repo_id: str, branch: str = "main") -> str | None:
        with self._lock:
            repo = self.repos.get(repo_id)
            return repo.branches.get(branch) if repo else None

    def commits(self, repo_id: str) -> list[Commit]:
        with self._lock:
            return list(self.repos[repo_id].commits.values()) if repo_id in self.repos else []

    def is_lfs(self, repo_id: str, path: str, revision: str = "main") -> bool:
        with self._lock:
            repo = self.repos[repo_id]
            return repo.commits[repo.resolve(revision)].files[path].lfs

    def calls(self, method: str | None = None, pattern: str | None = None) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if (method is None or r.method == method) and (pattern is None or re.search(pattern, r.path))]

    # -- state (called with the lock held) ----------------------------------------------------

    def _create(self, repo_id: str, private: bool) -> Repo:
        repo = self.repos[repo_id] = Repo(repo_id, private)
        self._commit(repo, "main", {".gitattributes": Blob(GITATTRIBUTES, False)}, [], "initial commit")
        return repo

    @staticmethod
    def _blob(path: str, data: bytes, sample: bytes | None = None) -> Blob:
        sample = data[:512] if sample is None else sample
        lfs = len(data) > 0 and (path.endswith(LFS_SUFFIXES) or len(data) >= LFS_MIN_SIZE or b"\0" in sample)
        return Blob(data, lfs)

    def _commit(self, repo: Repo, branch: str, add: dict[str, Blob], delete: list[str], message: str) -> str:
        parent = repo.branches.get(branch)
        files = dict(repo.commits[parent].files) if parent else {}
        for path in delete:
            files = {p: b for p, b in files.items() if p != path and not p.startswith(path.rstrip("/") + "/")}
        files.update(add)
        self._counter += 1
        oid = hashlib.sha1(f"{repo.id}\0{parent}\0{message}\0{self._counter}\0{sorted((p, b.git_oid) for p, b in files.items())}".encode()).hexdigest()
        repo.commits[oid] = Commit(oid, parent, files, message)
        repo.branches[branch] = oid
        return oid

    def _rule_for(self, method: str, path: str) -> Rule | None:
        with self._lock:
            for rule in self._rules:
                if rule.method == method and rule.pattern.search(path) and (rule.remaining is None or rule.remaining > 0):
                    if rule.remaining is not None:
                        rule.remaining -= 1
                    return rule
        return None


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"
    timeout = 10  # idle keep-alive connections end by themselves

    def log_message(self, format, *args):  # quiet
        pass

    def do_GET(self):
        self._handle("GET")

    def do_HEAD(self):
        self._handle("HEAD")

    def do_POST(self):
        self._handle("POST")

    def do_PUT(self):
        self._handle("PUT")

    # -- plumbing ----------------------------------------------------------------------------

    def _handle(self, method: str) -> None:
        hub = self.hub
        rule = hub._rule_for(method, self.path)
        if rule is not None and rule.drop:
            return self._drop(method)
        body = self._read_body()
        with hub._lock:
            hub.requests.append(Request(method, self.path, self.headers.get("Authorization"), len(body)))
        try:
            if rule is not None:
                raise _Reply(rule.status, f"injected failure: HTTP {rule.status}")
            status, payload, headers = self._route(method, body)
        except _Reply as reply:
            headers = dict(reply.headers)
            headers["X-Error-Message"] = reply.message
            if reply.code:
                headers["X-Error-Code"] = reply.code
            status, payload = reply.status, {"error": reply.message}
        except Exception as exc:  # a bug in the fake: answer 500 rather than hang the client
            status, payload, headers = 500, {"error": f"fake hub bug: {type(exc).__name__}: {exc}"}, {}
        self._send(method, status, payload, headers)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _drop(self, method: str) -> None:
        """Cut the connection in the middle of the exchange, without an answer."""
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length // 2)
        elif self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.rfile.readline()
        if method == "GET":
            try:
                status, payload, headers = self._route(method, b"")
            except _Reply:
                status, payload, headers = 200, b"x" * 1000, {}
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            for k, v in headers.items():
                if k.lower() != "content-length":
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _send(self, method: str, status: int, payload, headers: dict) -> None:
        if isinstance(payload, (bytes, bytearray)):
            data = bytes(payload)
        else:
            data = json.dumps(payload).encode()
            headers.setdefault("Content-Type", "application/json")
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)

    # -- auth --------------------------------------------------------------------------------

    def _auth(self) -> bool:
        """True for the right token, False for none; 401 for a wrong one."""
        header = self.headers.get("Authorization")
        if header is None:
            return False
        if header != f"Bearer {self.hub.token}":
            raise _Reply(401, BAD_CREDENTIALS)
        return True

    def _write_auth(self) -> None:
        if not self._auth():
            raise _Reply(401, "You must be authenticated to do this (no token sent)")

    def _repo(self, repo_id: str, write: bool = False) -> Repo:
        authed = self._auth()
        if write and not authed:
            raise _Reply(401, "You must be authenticated to do this (no token sent)")
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            raise _Reply(404, "Repository not found", "RepoNotFound")
        if repo.private and not authed:
            raise _Reply(401, "Repository not found", "RepoNotFound")
        return repo

    @staticmethod
    def _rev(repo: Repo, rev: str) -> str:
        oid = repo.resolve(rev)
        if oid is None:
            raise _Reply(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return oid

    # -- routes ------------------------------------------------------------------------------

    def _route(self, method: str, body: bytes):
        split = urlsplit(self.path)
        parts = [unquote(p) for p in split.path.split("/")[1:]]
        query = parse_qs(split.query)
        hub = self.hub
        with hub._lock:
            if parts == ["api", "agent-harnesses"]:
                raise _Reply(404, "not here")
            if parts == ["api", "whoami-v2"] and method == "GET":
                self._write_auth()
                return 200, {"type": "user", "name": USER}, {}
            if parts == ["api", "validate-yaml"] and method == "POST":
                return self._validate_yaml(json.loads(body))
            if parts == ["api", "repos", "create"] and method == "POST":
                return self._create_repo(json.loads(body))
            if len(parts) >= 4 and parts[:2] == ["api", "models"]:
                return self._api_model(method, "/".join(parts[2:4]), parts[4:], body, query)
            if len(parts) >= 2 and parts[0] == "__lfs":
                return self._lfs_transfer(method, parts[1:], body, query)
            if len(parts) >= 2 and parts[1].endswith(".git"):
                return self._lfs_api(method, f"{parts[0]}/{parts[1][:-4]}", parts[2:], body)
            if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
                return self._resolve(method, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        raise _Reply(404, f"no route for {method} {split.path}")

    def _validate_yaml(self, payload: dict):
        import yaml

        content = payload.get("content", "")
        match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        try:
            meta = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as exc:
            return 400, {"errors": [{"message": f"invalid YAML: {exc}"}]}, {}
        if not isinstance(meta, dict):
            return 400, {"errors": [{"message": "metadata must be a mapping"}]}, {}
        return 200, {"warnings": []}, {}

    def _create_repo(self, payload: dict):
        self._write_auth()
        if payload.get("type", "model") not in (None, "model"):
            raise _Reply(400, "only model repos here")
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        url = f"{self.hub.url}/{repo_id}"
        if repo_id in self.hub.repos:
            return 409, {"error": "You already created this model repo", "url": url}, {}
        private = bool(payload.get("private")) or payload.get("visibility") == "private"
        self.hub._create(repo_id, private)
        return 200, {"url": url, "name": repo_id, "id": repo_id}, {}

    def _api_model(self, method: str, repo_id: str, rest: list[str], body: bytes, query: dict):
        write = method == "POST"
        repo = self._repo(repo_id, write=write)
        if method == "GET" and (not rest or rest[0] == "revision"):
            oid = self._rev(repo, rest[1] if rest else "main")
            files = repo.commits[oid].files
            return 200, {
                "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0], "sha": oid,
                "private": repo.private, "tags": [], "siblings": [{"rfilename": p} for p in sorted(files)],
                "cardData": _card_data(files.get("README.md")),
            }, {}  # fmt: skip
        kind, arg = rest[0], "/".join(rest[1:2])
        if method == "GET" and kind == "refs":
            return 200, {"branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": c} for b, c in repo.branches.items()], "tags": [], "converts": []}, {}
        if method == "GET" and kind == "tree":
            return self._tree(repo, self._rev(repo, arg), "/".join(rest[2:]), query)
        if method == "GET" and kind == "xet-write-token":
            raise _Reply(501, "Xet storage is not supported by this server")
        if method == "POST" and kind == "paths-info":
            oid = self._rev(repo, arg)
            form = parse_qs(body.decode())
            return 200, _paths_info(repo.commits[oid].files, form.get("paths", [])), {}
        if method == "POST" and kind == "preupload":
            oid = self._rev(repo, arg)
            files = repo.commits[oid].files
            out = []
            for f in json.loads(body)["files"]:
                sample = base64.b64decode(f["sample"])
                lfs = f["size"] > 0 and (f["path"].endswith(LFS_SUFFIXES) or f["size"] >= LFS_MIN_SIZE or b"\0" in sample)
                entry = {"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
                old = files.get(f["path"])
                if old is not None:
                    entry["oid"] = old.sha256 if old.lfs else git_blob_sha1(old.data)
                out.append(entry)
            return 200, {"files": out, "commitOid": oid}, {}
        if method == "POST" and kind == "commit":
            return self._commit(repo, arg, body, query)
        if method == "POST" and kind == "branch":
            payload = json.loads(body or b"{}")
            if arg in repo.branches:
                raise _Reply(409, "Reference already exists")
            repo.branches[arg] = self._rev(repo, payload.get("startingPoint") or "main")
            return 200, {}, {}
        raise _Reply(404, f"no route for {method} /api/models/{repo_id}/{'/'.join(rest)}")

    def _tree(self, repo: Repo, oid: str, under: str, query: dict):
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        prefix = under.rstrip("/") + "/" if under else ""
        files = {p: b for p, b in repo.commits[oid].files.items() if p.startswith(prefix)}
        if under and not files:
            raise _Reply(404, f"{under} does not exist", "EntryNotFound")
        entries, folders = [], set()
        for path in sorted(files):
            rest = path[len(prefix):]
            dirs = rest.split("/")[:-1]
            for i in range(len(dirs) if recursive else min(1, len(dirs))):
                folders.add(prefix + "/".join(dirs[: i + 1]))
            if recursive or not dirs:
                entries.append(files[path].entry(path))
        entries += [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "path": d} for d in sorted(folders)]
        return 200, entries, {}

    def _commit(self, repo: Repo, branch: str, body: bytes, query: dict):
        if "create_pr" in query:
            raise _Reply(400, "pull requests are not supported by this server")
        if branch not in repo.branches:
            raise _Reply(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _Reply(400, "the commit payload must start with a header line")
        header = lines[0]["value"]
        if header.get("parentCommit") and header["parentCommit"] != repo.branches[branch]:
            raise _Reply(412, "A commit has happened since. Please refresh and try again.")
        add, delete = {}, []
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                data = base64.b64decode(value["content"])
                add[value["path"]] = Blob(data, False)
            elif line["key"] == "lfsFile":
                data = self.hub.lfs_store.get(value["oid"])
                if data is None:
                    raise _Reply(422, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                add[value["path"]] = Blob(data, True)
            elif line["key"] in ("deletedFile", "deletedFolder"):
                delete.append(value["path"])
            else:
                raise _Reply(400, f"unknown commit operation {line['key']!r}")
        oid = self.hub._commit(repo, branch, add, delete, header.get("summary", ""))
        return 200, {"success": True, "commitOid": oid, "commitUrl": f"{self.hub.url}/{repo.id}/commit/{oid}", "hookOutput": "", "pullRequestUrl": None}, {}

    def _lfs_api(self, method: str, repo_id: str, rest: list[str], body: bytes):
        repo = self._repo(repo_id, write=True)
        hub = self.hub
        lfs_json = {"Content-Type": "application/vnd.git-lfs+json"}
        if rest == ["info", "lfs", "objects", "batch"] and method == "POST":
            payload = json.loads(body)
            if payload.get("operation") != "upload":
                raise _Reply(400, "only uploads here")
            objects, transfer = [], "basic"
            for obj in payload["objects"]:
                oid, size = obj["oid"], obj["size"]
                if oid in hub.lfs_store:
                    objects.append({"oid": oid, "size": size})
                    continue
                sig = secrets.token_hex(8)
                hub._signatures[sig] = oid
                verify = {"href": f"{hub.url}/{repo.id}.git/info/lfs/objects/verify", "header": {}}
                if hub.multipart_threshold is not None and size > hub.multipart_threshold and "multipart" in payload.get("transfers", []):
                    transfer = "multipart"
                    n = math.ceil(size / hub.chunk_size)
                    header = {"chunk_size": str(hub.chunk_size)}
                    header.update({str(i): f"{hub.url}/__lfs/{oid}/part/{i}?sig={sig}" for i in range(1, n + 1)})
                    upload = {"href": f"{hub.url}/__lfs/{oid}/complete?sig={sig}", "header": header}
                else:
                    upload = {"href": f"{hub.url}/__lfs/{oid}?sig={sig}&size={size}"}
                objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {"upload": upload, "verify": verify}})
            return 200, {"transfer": transfer, "objects": objects}, lfs_json
        if rest == ["info", "lfs", "objects", "verify"] and method == "POST":
            payload = json.loads(body)
            data = hub.lfs_store.get(payload["oid"])
            if data is None or len(data) != payload["size"]:
                raise _Reply(404, f"object {payload['oid']} not found")
            return 200, {"message": "ok"}, lfs_json
        raise _Reply(404, f"no LFS route {'/'.join(rest)}")

    def _lfs_transfer(self, method: str, rest: list[str], body: bytes, query: dict):
        """The presigned storage URLs: no Authorization header, a signature in the query."""
        hub = self.hub
        oid = rest[0]
        if hub._signatures.get(query.get("sig", [""])[0]) != oid:
            raise _Reply(403, "bad or missing signature")
        if method == "PUT" and len(rest) == 1:
            size = int(query["size"][0])
            return self._store(oid, body, size)
        if method == "PUT" and len(rest) == 3 and rest[1] == "part":
            hub._parts.setdefault(oid, {})[int(rest[2])] = body
            return 200, b"", {"ETag": f'"{hashlib.md5(body).hexdigest()}"'}
        if method == "POST" and rest[1:] == ["complete"]:
            payload = json.loads(body)
            parts = hub._parts.pop(oid, {})
            try:
                data = b"".join(parts[p["partNumber"]] for p in sorted(payload["parts"], key=lambda p: p["partNumber"]))
            except KeyError as exc:
                raise _Reply(400, f"part {exc} was never uploaded") from None
            for p in payload["parts"]:
                if p["etag"].strip('"') != hashlib.md5(parts[p["partNumber"]]).hexdigest():
                    raise _Reply(400, f"etag mismatch for part {p['partNumber']}")
            return self._store(oid, data, None)
        raise _Reply(404, "no such transfer route")

    def _store(self, oid: str, data: bytes, size: int | None):
        if hashlib.sha256(data).hexdigest() != oid or (size is not None and len(data) != size):
            raise _Reply(400, f"uploaded content does not match oid {oid} ({len(data)} bytes)")
        self.hub.lfs_store[oid] = data
        self.hub.lfs_uploads.append((oid, len(data)))
        return 200, b"", {"ETag": f'"{oid}"'}

    def _resolve(self, method: str, repo_id: str, rev: str, path: str):
        repo = self._repo(repo_id)
        oid = self._rev(repo, rev)
        blob = repo.commits[oid].files.get(path)
        if blob is None:
            raise _Reply(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": oid})
        headers = {"X-Repo-Commit": oid, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if blob.lfs:
            headers.update({"ETag": f'"{blob.sha256}"', "X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(len(blob.data))})
        else:
            headers["ETag"] = f'"{blob.git_oid}"'
        data, status = blob.data, 200
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "") or "")
        if match and method == "GET":
            start = int(match.group(1))
            stop = int(match.group(2)) + 1 if match.group(2) else len(data)
            if start >= len(data):
                raise _Reply(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{len(data)}"})
            headers["Content-Range"] = f"bytes {start}-{min(stop, len(data)) - 1}/{len(data)}"
            data, status = data[start:stop], 206
        headers["Content-Length"] = str(len(data))
        return status, data, headers


def _card_data(readme: Blob | None):
    import yaml

    if readme is None:
        return None
    match = re.match(r"^---\n(.*?)\n---\n", readme.data.decode("utf-8", "replace"), re.S)
    if not match:
        return None
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return None
    return meta if isinstance(meta, dict) else None


def _paths_info(files: dict[str, Blob], paths: list[str]) -> list[dict]:
    out = []
    for path in paths:
        path = path.strip("/")
        if path in files:
            out.append(files[path].entry(path))
        elif any(p.startswith(path + "/") for p in files):
            out.append({"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "path": path})
    return out


def free_port() -> int:
    """A port on 127.0.0.1 with nothing listening (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def point_client_at(monkeypatch, endpoint: str, home, *, offline: bool = False, disable_xet: bool = True, token: str | None = None, no_retry_sleep: bool = True) -> None:
    """Point this process's huggingface_hub at `endpoint`, with its home (cache, token file, xet
    cache) under `home`, through `monkeypatch` (undone after the test).

    huggingface_hub reads HF_ENDPOINT, HF_HOME, HF_HUB_OFFLINE and HF_HUB_DISABLE_XET once, at
    import, into `huggingface_hub.constants`; every call reads those constants again, so patching
    them (and the environment, for child processes) redirects an already-imported client. The
    token goes in HF_TOKEN, which huggingface_hub reads on every call. `no_retry_sleep` removes
    the exponential backoff's sleeps (the retries themselves still happen)."""
    import types
    from pathlib import Path

    from huggingface_hub import constants

    home = Path(home)
    endpoint = endpoint.rstrip("/")
    env = {"HF_ENDPOINT": endpoint, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1" if offline else "0",
           "HF_HUB_DISABLE_XET": "1" if disable_xet else "0", "HF_HUB_DISABLE_TELEMETRY": "1"}  # fmt: skip
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN_PATH", "HF_XET_CACHE", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(key, raising=False)
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)
    old_home = constants.HF_HOME
    for name in dir(constants):  # every path under the old home (cache, token, xet, assets, marker files)
        value = getattr(constants, name)
        if name.isupper() and isinstance(value, str) and value.startswith(old_home + "/"):
            monkeypatch.setattr(constants, name, str(home) + value[len(old_home):])
    for name, value in {
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_OFFLINE": offline,
        "HF_HUB_DISABLE_XET": disable_xet,
    }.items():
        monkeypatch.setattr(constants, name, value)
    from huggingface_hub import hf_api

    # the module-level functions (model_info, ... which diffusers' from_pretrained calls) are bound
    # to one HfApi made at import, whose endpoint was read then
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
    if no_retry_sleep:  # the request backoff (utils._http) and the download resume (file_download) sleep
        from huggingface_hub import file_download
        from huggingface_hub.utils import _http

        for module in (_http, file_download):
            monkeypatch.setattr(module, "time", types.SimpleNamespace(sleep=lambda seconds: None))
