"""A loopback Hugging Face Hub for offline tests.

`LoopbackHub` is a small in-memory implementation of the Hub HTTP API, served by the standard library on
127.0.0.1 (random free port, daemon thread). It implements exactly what the real `huggingface_hub` client
(2.x) sends for the push / pull paths we use:

* ``POST /api/repos/create`` / ``DELETE /api/repos/delete`` (409 on an existing repo, which ``exist_ok`` accepts);
* ``POST /api/validate-yaml`` (called before a README.md is committed);
* ``POST /api/{type}s/{repo}/preupload/{rev}``: every file is answered ``uploadMode: "regular"``, so no
  LFS / Xet transfer is ever needed; ``oid`` is the git blob id of the current remote file, which lets the client
  skip unchanged files exactly as against the real Hub;
* ``POST /api/{type}s/{repo}/commit/{rev}``: the NDJSON commit (header / file (base64) / deletedFile /
  deletedFolder lines); every commit is a new immutable revision (40-hex oid) and moves the branch;
* ``GET /api/{type}s/{repo}[/revision/{rev}]`` (repo info with ``sha`` and ``siblings``),
  ``GET /api/{type}s/{repo}/tree/{rev}[/{path}]`` (``recursive``, cursor pagination through the ``Link`` header),
  ``POST /api/{type}s/{repo}/paths-info/{rev}``, ``GET /api/whoami-v2``;
* ``GET`` / ``HEAD`` ``/{repo}/resolve/{rev}/{path}`` with ``X-Repo-Commit``, ``ETag`` (git blob id) and
  ``Content-Length``; byte ranges for resumed downloads.

Errors carry the ``X-Error-Code`` header (``RepoNotFound`` / ``RevisionNotFound`` / ``EntryNotFound``) so the
client raises its own exception classes. A private repo is invisible (401 + ``RepoNotFound``) without a token;
any bearer token is accepted, and writes require one, as on the real Hub.

The `hub_server` pytest fixture starts a hub, points the client at it (``endpoint``, cache, token, offline /
telemetry / Xet switches), and shuts everything down after the test. Import it into a test module or conftest:
``from hub_server import hub_server``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socketserver
import sys
import threading
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

import pytest

# Repo type -> URL prefix of its web/resolve routes (models have none), and API plural -> repo type.
_RESOLVE_PREFIXES = {"datasets": "dataset", "spaces": "space"}
_API_PLURALS = {"models": "model", "datasets": "dataset", "spaces": "space"}
_WEB_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}

# What the real Hub puts in every new repo: an initial commit holding a .gitattributes with LFS rules.
_INITIAL_GITATTRIBUTES = (
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pt filter=lfs diff=lfs merge=lfs -text\n"
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
)

DEFAULT_TOKEN = "hf_loopback_test_token"


def git_blob_oid(data: bytes) -> str:
    """The git blob id of `data` (what the Hub uses as ETag and ``oid`` of a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class HubError(Exception):
    """An HTTP error answer: status, message and the Hub's ``X-Error-Code`` when the client needs one."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_code: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})  # additional JSON fields of the error body


@dataclass(frozen=True)
class Commit:
    """One immutable revision: its files (path -> blob oid) never change once created."""

    oid: str
    parent: str | None
    title: str
    description: str
    files: Mapping[str, str]
    date: str


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)


@dataclass(frozen=True)
class RequestRecord:
    """One request the hub received (path without query string, already percent-decoded)."""

    method: str
    path: str
    authorized: bool


class LoopbackHub:
    """In-memory Hub served on 127.0.0.1. Use `start()`/`stop()` or as a context manager.

    Args:
        page_size: entries per page of the tree listing (the real Hub uses 1000); small values exercise the
            client's pagination.
        require_token_for_writes: answer 401 to create / delete / preupload / commit without a bearer token.
        default_user: namespace given to repos created without one, and the `whoami` name.
        max_body_bytes: largest request body accepted (413 above it), so a runaway client cannot exhaust memory.
        request_timeout_s: socket timeout of each connection, so a stalled client never pins a handler thread.
    """

    def __init__(
        self,
        *,
        page_size: int = 1000,
        require_token_for_writes: bool = True,
        default_user: str = "test-user",
        max_body_bytes: int = 256 * 1024 * 1024,
        request_timeout_s: float = 10.0,
    ) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.page_size = page_size
        self.require_token_for_writes = require_token_for_writes
        self.default_user = default_user
        self.max_body_bytes = max_body_bytes
        self.request_timeout_s = request_timeout_s
        self.token = DEFAULT_TOKEN
        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], Repo] = {}
        self._blobs: dict[str, bytes] = {}
        self._commit_counter = 0
        self._requests: list[RequestRecord] = []
        self._internal_errors: list[str] = []
        self._server: _LoopbackServer | None = None
        self._thread: threading.Thread | None = None
        self.endpoint = ""

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> LoopbackHub:
        """Bind 127.0.0.1 on a free port and serve in a daemon thread. Returns self."""
        if self._server is not None:
            raise RuntimeError("LoopbackHub is already running")
        handler = type("_BoundHandler", (_HubRequestHandler,), {"hub": self, "timeout": self.request_timeout_s})
        server = _LoopbackServer(("127.0.0.1", 0), handler)
        server.hub = self
        self._server = server
        host, port = server.server_address[:2]
        self.endpoint = f"http://{host}:{port}"
        # poll_interval bounds how long `shutdown()` waits for the serving loop to notice.
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="loopback-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and close the socket (idempotent)."""
        server, thread = self._server, self._thread
        self._server, self._thread = None, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout)

    def __enter__(self) -> LoopbackHub:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ inspection helpers for tests

    @property
    def requests(self) -> list[RequestRecord]:
        """A copy of every request received so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    @property
    def internal_errors(self) -> list[str]:
        """Tracebacks of unexpected server-side exceptions (answered with HTTP 500)."""
        with self._lock:
            return list(self._internal_errors)

    def repo_exists(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._lock:
            return (repo_type, repo_id) in self._repos

    def is_private(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._lock:
            return self._get_repo(repo_type, repo_id).private

    def head(self, repo_id: str, branch: str = "main", repo_type: str = "model") -> str:
        """The commit oid the branch points at."""
        with self._lock:
            return self._resolve(self._get_repo(repo_type, repo_id), branch).oid

    def history(self, repo_id: str, branch: str = "main", repo_type: str = "model") -> list[str]:
        """Commit oids of the branch, newest first."""
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            oids: list[str] = []
            commit: Commit | None = self._resolve(repo, branch)
            while commit is not None:
                oids.append(commit.oid)
                commit = repo.commits[commit.parent] if commit.parent else None
            return oids

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """Contents of every file at `revision`."""
        with self._lock:
            commit = self._resolve(self._get_repo(repo_type, repo_id), revision)
            return {path: self._blobs[oid] for path, oid in commit.files.items()}

    # ------------------------------------------------------------------ server-side seeding (bypasses HTTP)

    def create_repo(self, repo_id: str, *, private: bool = False, repo_type: str = "model") -> None:
        """Create a repo directly (with the initial .gitattributes commit)."""
        with self._lock:
            self._create_repo(repo_type, repo_id, private)

    def commit_files(
        self,
        repo_id: str,
        files: Mapping[str, bytes],
        *,
        delete: tuple[str, ...] = (),
        message: str = "seed",
        branch: str = "main",
        repo_type: str = "model",
    ) -> str:
        """Commit files directly on the server (e.g. to plant files a client would never upload). Returns the oid."""
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            base = self._branch_head(repo, branch)
            new_files = dict(base.files)
            for path in delete:
                if new_files.pop(path, None) is None:
                    raise KeyError(f"{path!r} is not in {repo_id}@{branch}")
            for path, data in files.items():
                new_files[path] = self._store_blob(bytes(data))
            return self._add_commit(repo, branch, base.oid, message, "", new_files).oid

    # ------------------------------------------------------------------ state (call with the lock held)

    def _store_blob(self, data: bytes) -> str:
        oid = git_blob_oid(data)
        self._blobs[oid] = data
        return oid

    def _get_repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, f"Repository {repo_id!r} not found", error_code="RepoNotFound")
        return repo

    def _visible_repo(self, repo_type: str, repo_id: str, authorized: bool) -> Repo:
        repo = self._get_repo(repo_type, repo_id)
        if repo.private and not authorized:
            # Same answer as the real Hub: a private repo looks missing to anonymous callers.
            raise HubError(401, f"Repository {repo_id!r} not found", error_code="RepoNotFound")
        return repo

    def _create_repo(self, repo_type: str, repo_id: str, private: bool) -> Repo:
        if (repo_type, repo_id) in self._repos:
            # The client reads `url` from this 409 body when `exist_ok=True`.
            url = f"{self.endpoint}/{_WEB_PREFIX[repo_type]}{repo_id}"
            raise HubError(409, f"You already created this {repo_type} repo", extra={"url": url})
        repo = Repo(repo_id=repo_id, repo_type=repo_type, private=private, created_at=_now_iso())
        self._repos[(repo_type, repo_id)] = repo
        self._add_commit(
            repo, "main", None, "initial commit", "", {".gitattributes": self._store_blob(_INITIAL_GITATTRIBUTES)}
        )
        return repo

    def _add_commit(
        self, repo: Repo, branch: str, parent: str | None, title: str, description: str, files: dict[str, str]
    ) -> Commit:
        self._commit_counter += 1
        # The counter makes every commit unique, even two with identical trees, like a git commit timestamp.
        material = json.dumps([repo.repo_id, parent, title, sorted(files.items()), self._commit_counter])
        oid = hashlib.sha1(material.encode()).hexdigest()
        commit = Commit(oid, parent, title, description, MappingProxyType(dict(files)), _now_iso())
        repo.commits[oid] = commit
        repo.branches[branch] = oid
        return commit

    def _branch_head(self, repo: Repo, branch: str) -> Commit:
        oid = repo.branches.get(branch)
        if oid is None:
            if len(branch) == 40 and branch in repo.commits:
                raise HubError(400, f"Invalid rev id: {branch} is a commit, not a branch")
            raise HubError(404, f"Revision {branch!r} not found", error_code="RevisionNotFound")
        return repo.commits[oid]

    def _resolve(self, repo: Repo, revision: str) -> Commit:
        if revision in repo.branches:
            return repo.commits[repo.branches[revision]]
        if revision in repo.commits:
            return repo.commits[revision]
        lowered = revision.lower()
        if 7 <= len(lowered) < 40 and all(c in "0123456789abcdef" for c in lowered):
            matches = [oid for oid in repo.commits if oid.startswith(lowered)]
            if len(matches) == 1:
                return repo.commits[matches[0]]
        raise HubError(404, f"Invalid rev id: {revision}", error_code="RevisionNotFound")

    # ------------------------------------------------------------------ JSON views

    def _entry(self, commit: Commit, path: str, is_dir: bool) -> dict[str, Any]:
        if is_dir:
            prefix = path + "/"
            listing = sorted((p, o) for p, o in commit.files.items() if p.startswith(prefix))
            tree_oid = hashlib.sha1(json.dumps(listing).encode()).hexdigest()
            return {"type": "directory", "oid": tree_oid, "size": 0, "path": path}
        oid = commit.files[path]
        return {"type": "file", "oid": oid, "size": len(self._blobs[oid]), "path": path}

    def _repo_info(self, repo: Repo, commit: Commit, blobs: bool) -> dict[str, Any]:
        siblings = []
        for path in sorted(commit.files):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling["size"] = len(self._blobs[commit.files[path]])
                sibling["blobId"] = commit.files[path]
            siblings.append(sibling)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        }
        if repo.repo_type == "space":
            info["sdk"] = "static"
        return info


class _LoopbackServer(ThreadingHTTPServer):
    daemon_threads = True
    hub: LoopbackHub

    def server_bind(self) -> None:
        # HTTPServer.server_bind would call socket.getfqdn(), a reverse DNS lookup that can stall offline.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request: Any, client_address: Any) -> None:
        # An exception that escaped a handler: record it (the fixture fails the test) instead of printing it.
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return  # the client went away; not a server bug
        with self.hub._lock:
            self.hub._internal_errors.append(traceback.format_exc())


class _HubRequestHandler(BaseHTTPRequestHandler):
    """HTTP front of `LoopbackHub`: parses routes and maps `HubError` to Hub-style error answers."""

    hub: LoopbackHub  # set on the per-server subclass
    server_version = "LoopbackHub/1.0"
    # HTTP/1.0: one request per connection, so no keep-alive thread outlives the test.
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature from the base class
        pass  # keep test output clean; `hub.requests` records every request instead

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # ------------------------------------------------------------------ plumbing

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        raw_segments = [s for s in split.path.split("/") if s]
        self._segments = [unquote(s) for s in raw_segments]
        self._query = parse_qs(split.query, keep_blank_values=True)
        auth = self.headers.get("Authorization", "")
        self._token = auth[len("Bearer ") :].strip() if auth.startswith("Bearer ") else ""
        hub = self.hub
        with hub._lock:
            hub._requests.append(RequestRecord(method, "/" + "/".join(self._segments), bool(self._token)))
        try:
            self._route(method)
        except HubError as err:
            self._send_error(err, head=method == "HEAD")
        except (ConnectionError, TimeoutError):
            return  # the client hung up or stalled mid-request: nothing to answer
        except Exception as exc:  # a bug in this server: keep the traceback for the fixture to report
            with hub._lock:
                hub._internal_errors.append(traceback.format_exc())
            # 501, not 500: the client retries 5xx-with-backoff statuses for ~20 s; a server bug should fail fast.
            self._send_error(HubError(501, f"Internal error in LoopbackHub: {exc!r}"), head=method == "HEAD")

    def _param(self, name: str, default: str | None = None) -> str | None:
        values = self._query.get(name)
        return values[-1] if values else default

    def _flag(self, name: str) -> bool:
        return (self._param(name, "") or "").lower() in ("1", "true", "yes")

    def _read_body(self) -> bytes:
        limit = self.hub.max_body_bytes
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                total += size
                if total > limit:
                    raise HubError(413, f"Request body larger than {limit} bytes")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        if length > limit:
            raise HubError(413, f"Request body larger than {limit} bytes")
        return self.rfile.read(length) if length else b""

    def _json_body(self) -> Any:
        try:
            return json.loads(self._read_body() or b"{}")
        except json.JSONDecodeError as err:
            raise HubError(400, f"Invalid JSON body: {err}") from err

    def _require_token(self) -> None:
        if self.hub.require_token_for_writes and not self._token:
            raise HubError(401, "You must be authenticated to perform this action (send a bearer token)")

    def _send(
        self,
        status: int,
        body: bytes,
        *,
        content_type: str = "application/json",
        headers: Mapping[str, str] | None = None,
        head: bool = False,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        # For HEAD, `body` is what GET would send: its length is advertised but nothing is written.
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _send_json(self, payload: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers=headers)

    def _send_error(self, err: HubError, head: bool) -> None:
        headers = dict(err.headers)
        headers["X-Error-Message"] = err.message
        if err.error_code:
            headers["X-Error-Code"] = err.error_code
        body = json.dumps({**err.extra, "error": err.message}).encode()
        self._send(err.status, b"" if head else body, headers=headers, head=head)

    # ------------------------------------------------------------------ routing

    def _route(self, method: str) -> None:
        seg = self._segments
        if seg[:1] == ["api"]:
            self._route_api(method, seg[1:])
            return
        # /{datasets|spaces/}?{namespace}/{name}/resolve/{revision}/{path...}
        repo_type = "model"
        rest = seg
        if rest[:1] and rest[0] in _RESOLVE_PREFIXES:
            repo_type, rest = _RESOLVE_PREFIXES[rest[0]], rest[1:]
        if len(rest) >= 5 and rest[2] == "resolve" and method in ("GET", "HEAD"):
            self._resolve_file(repo_type, f"{rest[0]}/{rest[1]}", rest[3], "/".join(rest[4:]), head=method == "HEAD")
            return
        if len(rest) >= 4 and rest[1] == "resolve":
            # A canonical (namespace-less) repo id: this hub only has namespaced repos.
            raise HubError(404, f"Repository {rest[0]!r} not found", error_code="RepoNotFound")
        raise HubError(404, f"Not found: {method} {self.path}")

    def _route_api(self, method: str, seg: list[str]) -> None:
        hub = self.hub
        if seg == ["repos", "create"] and method == "POST":
            self._create_repo()
        elif seg == ["repos", "delete"] and method == "DELETE":
            self._delete_repo()
        elif seg == ["validate-yaml"] and method == "POST":
            self._read_body()
            self._send_json({"errors": [], "warnings": []})
        elif seg == ["whoami-v2"] and method == "GET":
            if not self._token:
                raise HubError(401, "Invalid credentials in Authorization header")
            self._send_json({"type": "user", "id": "0" * 24, "name": hub.default_user, "fullname": hub.default_user,
                             "orgs": [], "auth": {"type": "access_token", "accessToken": {"role": "write"}}})
        elif len(seg) >= 2 and seg[0] in _API_PLURALS:
            repo_type = _API_PLURALS[seg[0]]
            if len(seg) == 2:  # a canonical (namespace-less) id: this hub only has namespaced repos
                raise HubError(404, f"Repository {seg[1]!r} not found", error_code="RepoNotFound")
            repo_id, rest = f"{seg[1]}/{seg[2]}", seg[3:]
            with hub._lock:
                hub._get_repo(repo_type, repo_id)  # unknown repo -> RepoNotFound whatever the sub-route
            self._route_repo(method, repo_type, repo_id, rest)
        else:
            raise HubError(404, f"Not found: {method} {self.path}")

    def _route_repo(self, method: str, repo_type: str, repo_id: str, rest: list[str]) -> None:
        if method == "GET" and not rest:
            self._repo_info(repo_type, repo_id, None)
        elif method == "GET" and len(rest) == 2 and rest[0] == "revision":
            self._repo_info(repo_type, repo_id, rest[1])
        elif method == "GET" and len(rest) >= 2 and rest[0] == "tree":
            self._tree(repo_type, repo_id, rest[1], "/".join(rest[2:]).strip("/"))
        elif method == "POST" and len(rest) == 2 and rest[0] == "paths-info":
            self._paths_info(repo_type, repo_id, rest[1])
        elif method == "POST" and len(rest) == 2 and rest[0] == "preupload":
            self._preupload(repo_type, repo_id, rest[1])
        elif method == "POST" and len(rest) == 2 and rest[0] == "commit":
            self._commit(repo_type, repo_id, rest[1])
        else:
            raise HubError(404, f"Not found: {method} {self.path}")

    # ------------------------------------------------------------------ endpoints

    def _create_repo(self) -> None:
        self._require_token()
        body = self._json_body()
        name, organization = body.get("name"), body.get("organization")
        if not isinstance(name, str) or not name or "/" in name:
            raise HubError(400, f"Invalid repo name: {name!r}")
        repo_type = body.get("type") or "model"
        if repo_type not in _WEB_PREFIX:
            raise HubError(400, f"Unsupported repo type: {repo_type!r}")
        visibility = body.get("visibility")
        private = bool(body.get("private")) or visibility == "private"
        repo_id = f"{organization or self.hub.default_user}/{name}"
        hub = self.hub
        with hub._lock:
            hub._create_repo(repo_type, repo_id, private)
        self._send_json({"url": f"{hub.endpoint}/{_WEB_PREFIX[repo_type]}{repo_id}", "name": repo_id}, status=200)

    def _delete_repo(self) -> None:
        self._require_token()
        body = self._json_body()
        repo_type = body.get("type") or "model"
        repo_id = f"{body.get('organization') or self.hub.default_user}/{body.get('name')}"
        hub = self.hub
        with hub._lock:
            hub._get_repo(repo_type, repo_id)
            del hub._repos[(repo_type, repo_id)]
        self._send_json({})

    def _repo_info(self, repo_type: str, repo_id: str, revision: str | None) -> None:
        hub = self.hub
        with hub._lock:
            repo = hub._visible_repo(repo_type, repo_id, bool(self._token))
            commit = hub._resolve(repo, revision or "main")
            payload = hub._repo_info(repo, commit, blobs=self._flag("blobs"))
        self._send_json(payload)

    def _tree(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        hub = self.hub
        recursive = self._flag("recursive")
        with hub._lock:
            repo = hub._visible_repo(repo_type, repo_id, bool(self._token))
            commit = hub._resolve(repo, revision)
            prefix = path + "/" if path else ""
            files = sorted(p for p in commit.files if p.startswith(prefix))
            if path and not files:
                raise HubError(404, f"Directory {path!r} not found at {revision}", error_code="EntryNotFound",
                               headers={"X-Repo-Commit": commit.oid})
            entries: dict[str, dict[str, Any]] = {}
            for file_path in files:
                parts = file_path[len(prefix) :].split("/")
                # Folders on the way to the file (all of them when recursive, the first level otherwise).
                for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                    folder = prefix + "/".join(parts[:depth])
                    entries.setdefault(folder, hub._entry(commit, folder, is_dir=True))
                if recursive or len(parts) == 1:
                    entries[file_path] = hub._entry(commit, file_path, is_dir=False)
            listing = [entries[key] for key in sorted(entries)]
        try:
            start = int(base64.urlsafe_b64decode((self._param("cursor") or "MA==").encode()).decode())
        except (ValueError, UnicodeDecodeError) as err:
            raise HubError(400, "Invalid cursor") from err
        page = listing[start : start + hub.page_size]
        headers = {}
        if start + hub.page_size < len(listing):
            cursor = base64.urlsafe_b64encode(str(start + hub.page_size).encode()).decode()
            query = urlencode({"recursive": str(recursive).lower(), "expand": self._param("expand", "false"),
                               "cursor": cursor})
            next_url = f"{hub.endpoint}{urlsplit(self.path).path}?{query}"
            headers["Link"] = f'<{next_url}>; rel="next"'
        self._send_json(page, headers=headers)

    def _paths_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        body = self._read_body().decode()
        ctype = self.headers.get("Content-Type", "")
        if "json" in ctype:
            paths = json.loads(body or "{}").get("paths", [])
        else:
            paths = parse_qs(body).get("paths", [])
        hub = self.hub
        with hub._lock:
            repo = hub._visible_repo(repo_type, repo_id, bool(self._token))
            commit = hub._resolve(repo, revision)
            result = []
            for path in paths:
                path = path.strip("/")
                if path in commit.files:
                    result.append(hub._entry(commit, path, is_dir=False))
                elif any(p.startswith(path + "/") for p in commit.files):
                    result.append(hub._entry(commit, path, is_dir=True))
        self._send_json(result)

    def _preupload(self, repo_type: str, repo_id: str, revision: str) -> None:
        self._require_token()
        if self._flag("create_pr"):
            raise HubError(400, "Pull requests are not supported by the loopback Hub")
        body = self._json_body()
        hub = self.hub
        with hub._lock:
            repo = hub._visible_repo(repo_type, repo_id, bool(self._token))
            current = hub._branch_head(repo, revision).files
            answer = [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": current.get(f["path"])}
                for f in body.get("files", [])
            ]
            head_oid = repo.branches[revision]
        self._send_json({"files": answer, "commitOid": head_oid})

    def _commit(self, repo_type: str, repo_id: str, revision: str) -> None:
        self._require_token()
        if self._flag("create_pr"):
            raise HubError(400, "Pull requests are not supported by the loopback Hub")
        lines = [line for line in self._read_body().splitlines() if line.strip()]
        try:
            items = [json.loads(line) for line in lines]
        except json.JSONDecodeError as err:
            raise HubError(400, f"Invalid NDJSON commit payload: {err}") from err
        if not items or items[0].get("key") != "header":
            raise HubError(400, "Commit payload must start with a header line")
        header = items[0].get("value", {})
        hub = self.hub
        with hub._lock:
            repo = hub._visible_repo(repo_type, repo_id, bool(self._token))
            base = hub._branch_head(repo, revision)
            parent_commit = header.get("parentCommit")
            if parent_commit and not base.oid.startswith(parent_commit):
                raise HubError(412, f"Parent commit {parent_commit} is not the head of {revision} ({base.oid})")
            files = dict(base.files)
            for item in items[1:]:
                key, value = item.get("key"), item.get("value", {})
                path = str(value.get("path", "")).strip("/")
                if not path or any(part in ("", ".", "..") for part in path.split("/")):
                    raise HubError(400, f"Invalid path in commit: {value.get('path')!r}")
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise HubError(400, f"Unsupported encoding {value.get('encoding')!r} for {path}")
                    files[path] = hub._store_blob(base64.b64decode(value.get("content", "")))
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {path}",
                                       error_code="EntryNotFound")
                elif key == "deletedFolder":
                    doomed = [p for p in files if p.startswith(path + "/")]
                    if not doomed:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}",
                                       error_code="EntryNotFound")
                    for p in doomed:
                        del files[p]
                elif key == "lfsFile":
                    raise HubError(400, "lfsFile operations are not supported: the loopback Hub answers "
                                        "uploadMode='regular' for every file")
                else:
                    raise HubError(400, f"Unknown commit operation {key!r}")
            commit = hub._add_commit(repo, revision, base.oid, str(header.get("summary", "")),
                                     str(header.get("description", "")), files)
        url = f"{hub.endpoint}/{_WEB_PREFIX[repo_type]}{repo_id}/commit/{commit.oid}"
        self._send_json({"success": True, "commitOid": commit.oid, "commitUrl": url, "hookOutput": "",
                         "pullRequestUrl": None})

    def _resolve_file(self, repo_type: str, repo_id: str, revision: str, path: str, head: bool) -> None:
        hub = self.hub
        with hub._lock:
            repo = hub._visible_repo(repo_type, repo_id, bool(self._token))
            commit = hub._resolve(repo, revision)
            oid = commit.files.get(path)
            if oid is None:
                raise HubError(404, "Entry not found", error_code="EntryNotFound",
                               headers={"X-Repo-Commit": commit.oid})
            data = hub._blobs[oid]
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{oid}"', "Accept-Ranges": "bytes",
                   "Content-Disposition": f'inline; filename="{quote(path.rsplit("/", 1)[-1])}"'}
        status, body = 200, data
        byte_range = self.headers.get("Range", "")
        if byte_range.startswith("bytes=") and not head:
            first, _, last = byte_range[len("bytes=") :].partition("-")
            try:
                start = int(first) if first else max(len(data) - int(last), 0)
                end = int(last) if first and last else len(data) - 1
            except ValueError as err:
                raise HubError(416, f"Invalid Range header: {byte_range}") from err
            if start >= len(data) and data:
                raise HubError(416, f"Range {byte_range} outside of a {len(data)}-byte file")
            end = min(end, len(data) - 1)
            status, body = 206, data[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        self._send(status, body, content_type="application/octet-stream", headers=headers, head=head)


# ---------------------------------------------------------------------- client configuration + fixture

# Constants `huggingface_hub` reads at import time, mapped to the value the test hub needs.
def _client_constants(hub: LoopbackHub, home: Path) -> dict[str, Any]:
    hub_cache = str(home / "hub")
    return {
        "ENDPOINT": hub.endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,  # telemetry would also look up agent registries on huggingface.co
        "HF_HUB_DISABLE_XET": True,  # regular HTTP transfers only, whether or not hf_xet is installed
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
        "HF_HUB_DISABLE_UPDATE_CHECK": True,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": hub_cache,
        "HUGGINGFACE_HUB_CACHE": hub_cache,
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HUGGINGFACE_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
        "CHECK_FOR_UPDATE_DONE_PATH": str(home / ".check_for_update_done"),
        "CHECK_FOR_SKILL_UPDATE_DONE_PATH": str(home / ".check_for_skill_update_done"),
    }


def configure_client(monkeypatch: pytest.MonkeyPatch, hub: LoopbackHub, home: Path) -> None:
    """Point `huggingface_hub` at `hub` for the duration of a test (undone by `monkeypatch`).

    Environment variables cover code that reads them at call time and subprocesses; the module constants cover
    everything `huggingface_hub` already read at import time. Pass ``endpoint=hub.endpoint`` explicitly where an
    API takes it: that works even for code holding its own copy of the constants.
    """
    from huggingface_hub import constants

    env = {
        "HF_ENDPOINT": hub.endpoint,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN": hub.token,
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "DO_NOT_TRACK": "1",
        # A proxy configured in the environment must never see loopback traffic.
        "NO_PROXY": ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"])),
        "no_proxy": ",".join(filter(None, [os.environ.get("no_proxy"), "127.0.0.1", "localhost"])),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "TRANSFORMERS_OFFLINE", "HUGGINGFACE_CO_STAGING"):
        monkeypatch.delenv(key, raising=False)
    for name, value in _client_constants(hub, home).items():
        if hasattr(constants, name):  # tolerate constants a future client version renames
            monkeypatch.setattr(constants, name, value)
    # Modules that copied a constant with `from ..constants import X`.
    import importlib

    for module_name, name, value in (
        ("huggingface_hub.utils._cache_manager", "HF_HUB_CACHE", str(home / "hub")),
        ("huggingface_hub.utils._cache_assets", "HF_ASSETS_CACHE", str(home / "assets")),
    ):
        module = importlib.import_module(module_name)
        if hasattr(module, name):
            monkeypatch.setattr(module, name, value)


@pytest.fixture
def hub_server(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[LoopbackHub]:
    """A running `LoopbackHub` with `huggingface_hub` pointed at it (endpoint, empty cache, token, online mode).

    Yields the hub: ``hub.endpoint`` is its URL, ``hub.token`` the token the client sends by default
    (``HF_TOKEN``); pass ``token=False`` to a client call to act anonymously. Fails the test if the server hit an
    internal error.
    """
    from huggingface_hub.utils import _http

    hub = LoopbackHub().start()
    home = tmp_path_factory.mktemp("hf_home")
    try:
        configure_client(monkeypatch, hub, home)
        # The client keeps one shared HTTP session; a fresh one picks up the patched proxy settings, and closing it
        # afterwards drops pooled connections to this (soon dead) server.
        _http.close_session()
        yield hub
    finally:
        _http.close_session()
        hub.stop()
    errors = hub.internal_errors
    if errors:
        pytest.fail("LoopbackHub internal error(s):\n" + "\n".join(errors), pytrace=False)
