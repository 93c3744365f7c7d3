"""A stand-in for the Hugging Face Hub API, not the Hub.

A small HTTP server (stdlib ``ThreadingHTTPServer`` on 127.0.0.1) that speaks the
part of the Hub API that ``huggingface_hub`` and ``datasets`` use to publish and
read dataset repositories, so the project's unchanged publishing code can be
tested offline by pointing ``HF_ENDPOINT`` at it (with ``HF_HUB_DISABLE_XET=1``
so uploads use the LFS batch protocol).

It keeps git-like state: commits with sha1 ids and parents, branches, tags, and
the files of every commit; file contents live in a content-addressed folder on
disk and the state is mirrored to ``state.json``, so tests can inspect (and grep)
everything it stored. It never stores request headers.

Routes::

    POST /api/repos/create                              409 if the repo exists
    POST /api/validate-yaml                             400 on unparsable card YAML
    GET  /api/agent-harnesses                           empty registry (huggingface_hub telemetry)
    GET  /api/whoami-v2                                 "stand-in-user"; 401 for a token in
                                                        refused_tokens, role "read" for one in
                                                        read_only_tokens, else "write"
    GET  /api/{type}s/{repo}[/revision/{rev}]           repo info (sha, siblings)
    POST /api/{type}s/{repo}/preupload/{rev}            "lfs" for data/binary/large files
    POST /api/{type}s/{repo}/commit/{rev}               ndjson; 412 on a stale parentCommit
    POST /{datasets/|spaces/}{repo}.git/info/lfs/objects/batch
    PUT  /_standin/lfs/{sha256}                         LFS upload target (sha256 checked)
    POST|DELETE /api/{type}s/{repo}/branch/{branch}     409 if it exists
    POST /api/{type}s/{repo}/tag/{rev}                  409 if the tag exists
    DELETE /api/{type}s/{repo}/tag/{tag}
    GET  /api/{type}s/{repo}/refs
    GET  /api/{type}s/{repo}/commits/{rev}
    GET  /api/{type}s/{repo}/tree/{rev}[/{path}]        ?recursive=
    POST /api/{type}s/{repo}/paths-info/{rev}
    HEAD|GET /{datasets/|spaces/}{repo}/resolve/{rev}/{path}   X-Repo-Commit, ETag, Range

Faults are injected per route kind (``commit``, ``tag``, ``preupload``,
``lfs_batch``, ``lfs_put``, ``resolve``, ``refs``, ``create``) with
:meth:`HubStandin.add_faults` or ``POST /_standin/faults`` (JSON
``{"commit": ["503", "drop"]}``); each request of that kind consumes one:

    "500" | "502" | "503" | "504"  answer with that status and change nothing
    "503-echo-auth"                as "503", but the error message repeats the request's
                                   Authorization header (a misbehaving proxy), to test scrubbing
    "drop"                         close the connection without answering; change nothing
    "drop-after"                   do the work, then close without answering (a lost response)
    "stale-parent"                 (commit) land a foreign commit on the branch first, so the
                                   client's parentCommit is stale and it gets a real 412
    "tag-race"                     (tag) another client creates the same tag first -> real 409
    "foreign-after"                (preupload) answer, then another client pushes a commit to
                                   the branch, so what the client learnt about it is stale

``GET /_standin/state`` returns the state; unknown routes answer 404 and are
recorded in :attr:`HubStandin.unhandled`.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

# Mirrors the LFS rules of the default .gitattributes of a Hub dataset repo (abridged).
LFS_SUFFIXES = {
    ".parquet",
    ".arrow",
    ".png",
    ".jpg",
    ".jpeg",
    ".gif",
    ".webp",
    ".bin",
    ".safetensors",
    ".gz",
    ".zip",
}
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
GITATTRIBUTES = "".join(
    f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in sorted(LFS_SUFFIXES)
)
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
FAULT_KINDS = {"commit", "tag", "preupload", "lfs_batch", "lfs_put", "resolve", "refs", "create"}
_FAULT_RE = re.compile(
    r"^(5\d\d(-echo-auth)?|drop|drop-after|stale-parent|tag-race|foreign-after)$"
)


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
    )


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class FileEntry:
    sha256: str
    size: int
    lfs: bool
    git_oid: str  # git blob id of the content, or of the LFS pointer


@dataclass
class Commit:
    id: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, FileEntry]


@dataclass
class Repo:
    id: str
    type: str
    private: bool
    created: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> str | None:
        """Commit id of a branch, tag, full ref or commit id."""
        for prefix, refs in (("refs/heads/", self.branches), ("refs/tags/", self.tags)):
            if revision.startswith(prefix):
                return refs.get(revision[len(prefix) :])
        if revision in self.branches:
            return self.branches[revision]
        if revision in self.tags:
            return self.tags[revision]
        return revision if revision in self.commits else None


class Response:
    def __init__(self, status: int, body: Any = b"", headers: dict[str, str] | None = None):
        self.status = status
        self.headers = dict(headers or {})
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            self.headers.setdefault("Content-Type", "application/json")
        self.body: bytes = body


def _error(status: int, message: str, code: str | None = None) -> Response:
    headers = {"X-Error-Message": message}
    if code:
        headers["X-Error-Code"] = code
    return Response(status, {"error": message}, headers)


class _Drop(Exception):
    """Close the connection without answering."""


class _FaultResponse(Exception):
    """Answer with an injected error response."""

    def __init__(self, response: Response):
        self.response = response


class HubStandin:
    """The stand-in server: ``with HubStandin(storage) as hub: hub.url ...``."""

    def __init__(self, storage: str | Path, host: str = "127.0.0.1", port: int = 0):
        self.storage = Path(storage)
        (self.storage / "blobs").mkdir(parents=True, exist_ok=True)
        self.repos: dict[str, Repo] = {}
        self.faults: dict[str, list[str]] = {}
        self.unhandled: list[str] = []
        # Tokens the tests mark; any other Bearer token is a valid write token.
        self.refused_tokens: set[str] = set()
        self.read_only_tokens: set[str] = set()
        self.lock = threading.RLock()
        self._counter = 0
        standin = self

        class Handler(_Handler):
            hub = standin

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{host}:{self.server.server_address[1]}"
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> HubStandin:
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> HubStandin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- test helpers ------------------------------------------------------------
    def add_faults(self, kind: str, *faults: str) -> None:
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; one of {sorted(FAULT_KINDS)}")
        for fault in faults:
            if not _FAULT_RE.match(fault):
                raise ValueError(f"unknown fault {fault!r}; see the module docstring")
        with self.lock:
            self.faults.setdefault(kind, []).extend(faults)

    def pending_faults(self) -> dict[str, list[str]]:
        with self.lock:
            return {k: list(v) for k, v in self.faults.items() if v}

    def clear_faults(self) -> None:
        with self.lock:
            self.faults.clear()

    def state(self) -> dict[str, Any]:
        with self.lock:
            return {
                "repos": {
                    key: {
                        "id": repo.id,
                        "type": repo.type,
                        "private": repo.private,
                        "branches": dict(repo.branches),
                        "tags": dict(repo.tags),
                        "commits": {
                            c.id: {
                                "parent": c.parent,
                                "title": c.title,
                                "date": c.date,
                                "files": {p: vars(e) for p, e in sorted(c.files.items())},
                            }
                            for c in repo.commits.values()
                        },
                    }
                    for key, repo in self.repos.items()
                },
                "unhandled": list(self.unhandled),
            }

    def repo(self, repo_id: str, repo_type: str = "dataset") -> Repo:
        return self.repos[f"{repo_type}/{repo_id}"]

    def history(
        self, repo_id: str, revision: str = "main", repo_type: str = "dataset"
    ) -> list[str]:
        """Commit ids reachable from ``revision``, newest first."""
        repo = self.repo(repo_id, repo_type)
        out, cursor = [], repo.resolve(revision)
        while cursor:
            out.append(cursor)
            cursor = repo.commits[cursor].parent
        return out

    def read_file(
        self, repo_id: str, revision: str, path: str, repo_type: str = "dataset"
    ) -> bytes:
        repo = self.repo(repo_id, repo_type)
        entry = repo.commits[repo.resolve(revision)].files[path]
        return self._blob(entry.sha256).read_bytes()

    # -- storage -----------------------------------------------------------------
    def _blob(self, sha256: str) -> Path:
        return self.storage / "blobs" / sha256

    def _store_blob(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self._blob(sha)
        if not path.exists():
            # Unique temporary name: two uploads of the same object may race.
            tmp = path.with_name(f"{sha}.{threading.get_ident()}.{time.time_ns()}.part")
            tmp.write_bytes(data)
            tmp.replace(path)
        return sha

    def _persist(self) -> None:
        (self.storage / "state.json").write_text(json.dumps(self.state(), indent=1))

    def _new_commit(
        self, repo: Repo, parent: str | None, title: str, message: str, files: dict[str, FileEntry]
    ) -> str:
        self._counter += 1
        tree = json.dumps({p: e.git_oid for p, e in sorted(files.items())})
        commit_id = hashlib.sha1(
            f"{repo.id}\n{parent}\n{tree}\n{title}\n{self._counter}\n{time.time_ns()}".encode()
        ).hexdigest()
        repo.commits[commit_id] = Commit(commit_id, parent, title, message, _now(), files)
        return commit_id

    def _entry_for(self, data: bytes, lfs: bool) -> FileEntry:
        sha = self._store_blob(data)
        oid = git_blob_oid(lfs_pointer(sha, len(data)) if lfs else data)
        return FileEntry(sha, len(data), lfs, oid)

    def _foreign_commit(self, repo: Repo, branch: str) -> None:
        """Someone else pushes to ``branch`` (used to make a client's parent stale)."""
        head = repo.branches[branch]
        files = dict(repo.commits[head].files)
        files["FOREIGN.md"] = self._entry_for(
            f"foreign commit on top of {head}\n".encode(), lfs=False
        )
        repo.branches[branch] = self._new_commit(repo, head, "Foreign commit", "", files)


class _Handler(BaseHTTPRequestHandler):
    hub: HubStandin
    server_version = "HubStandin/1"

    def log_message(self, format: str, *args: Any) -> None:
        # Request lines only (never headers): they show which routes the clients used.
        with self.hub.lock, open(self.hub.storage / "requests.log", "a") as log:
            log.write(f"{self.command} {self.path} {args[1] if len(args) > 1 else ''}\n")

    # -- plumbing -------------------------------------------------------------
    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, response: Response) -> None:
        self.send_response(response.status)
        for key, value in response.headers.items():
            self.send_header(key, value)
        if "Content-Length" not in response.headers:
            self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    def _dispatch(self) -> None:
        self.hub_body = self._body()
        split = urlsplit(self.path)
        self.query = parse_qs(split.query)
        segments = [unquote(s) for s in split.path.split("/")[1:]]
        self.drop_after = False
        try:
            response = self._route(segments)
            if self.drop_after:
                raise _Drop
        except _Drop:
            self.close_connection = True
            self.log_message('"%s" %s', self.requestline, "dropped")
            return
        self._send(response)

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    @property
    def base(self) -> str:
        return f"http://{self.headers.get('Host', '127.0.0.1')}"

    def _json(self) -> Any:
        return json.loads(self.hub_body or b"{}")

    def _authorized(self) -> bool:
        return self.headers.get("Authorization", "").startswith("Bearer ")

    def _fault(self, kind: str) -> str | None:
        """Consume the next fault for ``kind``; answer errors and drops here."""
        with self.hub.lock:
            queue = self.hub.faults.get(kind) or []
            fault = queue.pop(0) if queue else None
        if fault == "drop-after":
            self.drop_after = True  # _dispatch drops the answer once the work is done
            return fault
        if fault is None or fault in ("stale-parent", "tag-race", "foreign-after"):
            return fault
        if fault == "drop":
            raise _Drop
        status = int(fault.split("-")[0])
        message = f"stand-in injected {status} on {kind}"
        if fault.endswith("echo-auth"):
            message += f" (request had Authorization: {self.headers.get('Authorization', '')})"
        raise _FaultResponse(Response(status, {"error": message}))

    # -- routing ----------------------------------------------------------------
    def _route(self, seg: list[str]) -> Response:
        try:
            return self._route_inner(seg)
        except _FaultResponse as fault:
            return fault.response

    def _route_inner(self, seg: list[str]) -> Response:
        method = self.command
        if seg[:1] == ["_standin"]:
            return self._control(method, seg[1:])
        if seg[:1] == ["api"]:
            if seg[1:3] == ["repos", "create"] and method == "POST":
                return self._create_repo()
            if seg[1:2] == ["validate-yaml"] and method == "POST":
                return self._validate_yaml()
            if seg[1:2] == ["whoami-v2"] and method == "GET":
                return self._whoami()
            if seg[1:2] == ["agent-harnesses"] and method == "GET":
                # huggingface_hub fetches this registry for its user-agent; empty = no detection.
                return Response(200, {"standardEnvVars": [], "harnesses": {}})
            if len(seg) >= 4 and seg[1] in REPO_TYPES:
                repo_key = f"{REPO_TYPES[seg[1]]}/{seg[2]}/{seg[3]}"
                return self._repo_api(method, repo_key, seg[4:])
        else:
            return self._git_or_resolve(method, seg)
        return self._unhandled()

    def _whoami(self) -> Response:
        token = self.headers.get("Authorization", "").removeprefix("Bearer ")
        if not self._authorized() or token in self.hub.refused_tokens:
            return _error(401, "Invalid credentials in Authorization header")
        role = "read" if token in self.hub.read_only_tokens else "write"
        return Response(200, {"type": "user", "name": "stand-in-user", "orgs": [],
                              "auth": {"type": "access_token", "accessToken": {"role": role}}})

    def _unhandled(self) -> Response:
        with self.hub.lock:
            self.hub.unhandled.append(f"{self.command} {self.path}")
        return _error(404, f"stand-in does not implement {self.command} {urlsplit(self.path).path}")

    def _control(self, method: str, seg: list[str]) -> Response:
        if seg == ["faults"] and method == "POST":
            try:
                for kind, faults in self._json().items():
                    self.hub.add_faults(kind, *faults)
            except ValueError as err:
                return _error(400, str(err))
            return Response(200, self.hub.pending_faults())
        if seg == ["state"] and method == "GET":
            return Response(200, self.hub.state())
        if len(seg) == 2 and seg[0] == "lfs" and method == "PUT":
            return self._lfs_put(seg[1])
        return self._unhandled()

    def _get_repo(self, repo_key: str) -> Repo | Response:
        repo = self.hub.repos.get(repo_key)
        if repo is None or (repo.private and not self._authorized()):
            return _error(404, "Repository not found", "RepoNotFound")
        return repo

    def _create_repo(self) -> Response:
        if not self._authorized():
            return _error(401, "Invalid credentials in Authorization header")
        self._fault("create")
        payload = self._json()
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or 'stand-in-user'}/{payload['name']}"
        key = f"{repo_type}/{repo_id}"
        url = f"{self.base}/{URL_PREFIX[repo_type]}{repo_id}"
        with self.hub.lock:
            if key in self.hub.repos:
                return Response(409, {"error": "You already created this repo", "url": url})
            repo = Repo(
                repo_id,
                repo_type,
                payload.get("visibility") == "private" or bool(payload.get("private")),
                _now(),
            )
            files = {".gitattributes": self.hub._entry_for(GITATTRIBUTES.encode(), lfs=False)}
            repo.branches["main"] = self.hub._new_commit(repo, None, "initial commit", "", files)
            self.hub.repos[key] = repo
            self.hub._persist()
        return Response(200, {"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self) -> Response:
        content = self._json().get("content", "")
        match = re.match(r"^---\n(.*?)\n---", content, re.S)
        try:
            if match:
                yaml.safe_load(match.group(1))
        except yaml.YAMLError as err:
            return Response(400, {"errors": [{"message": f"invalid YAML: {err}"}], "warnings": []})
        return Response(200, {"errors": [], "warnings": []})

    def _repo_api(self, method: str, key: str, rest: list[str]) -> Response:
        repo = self._get_repo(key)
        if isinstance(repo, Response):
            return repo
        action = rest[0] if rest else None
        arg = rest[1] if len(rest) > 1 else None
        if method == "GET" and action is None:
            return self._repo_info(repo, "main")
        if method == "GET" and action == "revision" and arg:
            return self._repo_info(repo, arg)
        if method == "GET" and action == "refs":
            self._fault("refs")
            return self._refs(repo)
        if method == "GET" and action == "commits" and arg:
            return self._commits(repo, arg)
        if method == "GET" and action == "tree" and arg:
            return self._tree(repo, arg, "/".join(rest[2:]))
        if method == "POST" and action == "paths-info" and arg:
            return self._paths_info(repo, arg)
        if method in ("POST", "PUT", "DELETE") and not self._authorized():
            return _error(401, "Invalid credentials in Authorization header")
        if method == "POST" and action == "preupload" and arg:
            fault = self._fault("preupload")
            response = self._preupload(repo, arg)
            if fault == "foreign-after":
                with self.hub.lock:
                    self.hub._foreign_commit(repo, arg)
                    self.hub._persist()
            return response
        if method == "POST" and action == "commit" and arg:
            return self._commit(repo, arg)
        if action == "branch" and arg and method in ("POST", "DELETE"):
            return self._branch(repo, method, arg)
        if action == "tag" and arg and method in ("POST", "DELETE"):
            return self._tag(repo, method, arg)
        return self._unhandled()

    # -- read routes ------------------------------------------------------------
    def _resolve(self, repo: Repo, revision: str) -> Commit | Response:
        commit_id = repo.resolve(revision)
        if commit_id is None:
            return _error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commits[commit_id]

    def _repo_info(self, repo: Repo, revision: str) -> Response:
        with self.hub.lock:
            commit = self._resolve(repo, revision)
            if isinstance(commit, Response):
                return commit
            siblings = [
                {"rfilename": p, "size": e.size, "blobId": e.git_oid}
                for p, e in sorted(commit.files.items())
            ]
            return Response(
                200,
                {
                    "_id": hashlib.sha1(repo.id.encode()).hexdigest()[:24],
                    "id": repo.id,
                    "author": repo.id.split("/")[0],
                    "sha": commit.id,
                    "private": repo.private,
                    "gated": False,
                    "disabled": False,
                    "createdAt": repo.created,
                    "lastModified": commit.date,
                    "downloads": 0,
                    "likes": 0,
                    "tags": [],
                    "siblings": siblings,
                },
            )

    def _refs(self, repo: Repo) -> Response:
        with self.hub.lock:

            def refs(kind: str, items: dict[str, str]) -> list[dict[str, str]]:
                return [
                    {"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": c}
                    for n, c in sorted(items.items())
                ]

            return Response(
                200,
                {
                    "branches": refs("heads", repo.branches),
                    "converts": [],
                    "tags": refs("tags", repo.tags),
                    "pullRequests": [],
                },
            )

    def _commits(self, repo: Repo, revision: str) -> Response:
        with self.hub.lock:
            commit = self._resolve(repo, revision)
            if isinstance(commit, Response):
                return commit
            out = []
            cursor: Commit | None = commit
            while cursor is not None:
                out.append(
                    {
                        "id": cursor.id,
                        "title": cursor.title,
                        "message": cursor.message,
                        "authors": [{"user": "stand-in-user"}],
                        "date": cursor.date,
                    }
                )
                cursor = repo.commits[cursor.parent] if cursor.parent else None
            return Response(200, out)

    @staticmethod
    def _file_info(path: str, entry: FileEntry) -> dict[str, Any]:
        info: dict[str, Any] = {
            "type": "file",
            "path": path,
            "size": entry.size,
            "oid": entry.git_oid,
        }
        if entry.lfs:
            info["lfs"] = {
                "oid": entry.sha256,
                "size": entry.size,
                "pointerSize": len(lfs_pointer(entry.sha256, entry.size)),
            }
        return info

    @staticmethod
    def _dir_info(path: str, files: dict[str, FileEntry]) -> dict[str, Any]:
        inside = json.dumps(
            {p: e.git_oid for p, e in sorted(files.items()) if p.startswith(path + "/")}
        )
        return {
            "type": "directory",
            "path": path,
            "size": 0,
            "oid": hashlib.sha1(inside.encode()).hexdigest(),
        }

    @staticmethod
    def _dirs(files: dict[str, FileEntry]) -> set[str]:
        return {
            str(parent) for p in files for parent in PurePosixPath(p).parents if str(parent) != "."
        }

    def _tree(self, repo: Repo, revision: str, path: str) -> Response:
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        with self.hub.lock:
            commit = self._resolve(repo, revision)
            if isinstance(commit, Response):
                return commit
            files, dirs = commit.files, self._dirs(commit.files)
            path = path.strip("/")
            if path and path not in dirs:
                if path in files:
                    return Response(200, [self._file_info(path, files[path])])
                return _error(404, f"Entry not found: {path}", "EntryNotFound")
            prefix = f"{path}/" if path else ""

            def listed(p: str) -> bool:
                return p.startswith(prefix) and (recursive or "/" not in p[len(prefix) :])

            out = [self._dir_info(d, files) for d in sorted(dirs) if listed(d)]
            out += [self._file_info(p, e) for p, e in sorted(files.items()) if listed(p)]
            return Response(200, out)

    def _paths_info(self, repo: Repo, revision: str) -> Response:
        form = parse_qs(self.hub_body.decode())
        paths = form.get("paths", [])
        with self.hub.lock:
            commit = self._resolve(repo, revision)
            if isinstance(commit, Response):
                return commit
            dirs = self._dirs(commit.files)
            out = []
            for path in (p.strip("/") for p in paths):
                if path in commit.files:
                    out.append(self._file_info(path, commit.files[path]))
                elif path in dirs:
                    out.append(self._dir_info(path, commit.files))
            return Response(200, out)

    # -- write routes ---------------------------------------------------------------
    def _preupload(self, repo: Repo, revision: str) -> Response:
        with self.hub.lock:
            commit = self._resolve(repo, revision)
            existing = commit.files if isinstance(commit, Commit) else {}
        out = []
        for item in self._json().get("files", []):
            sample = base64.b64decode(item.get("sample", ""))
            lfs = (
                PurePosixPath(item["path"]).suffix.lower() in LFS_SUFFIXES
                or item.get("size", 0) > LFS_SIZE_THRESHOLD
                or b"\0" in sample
            )
            remote = existing.get(item["path"])
            # Same oid convention as the client: sha256 for LFS files, git blob id for regular ones.
            oid = None if remote is None else (remote.sha256 if remote.lfs else remote.git_oid)
            out.append(
                {
                    "path": item["path"],
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": oid,
                }
            )
        return Response(
            200, {"files": out, "commitOid": commit.id if isinstance(commit, Commit) else None}
        )

    def _commit(self, repo: Repo, branch: str) -> Response:
        fault = self._fault("commit")
        lines = [json.loads(line) for line in self.hub_body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            return _error(400, "the commit payload must start with a header line")
        header = lines[0]["value"]
        with self.hub.lock:
            if branch not in repo.branches:
                return _error(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            if fault == "stale-parent":
                self.hub._foreign_commit(repo, branch)
            head = repo.branches[branch]
            parent = header.get("parentCommit")
            if parent is not None and parent != head:
                return _error(412, "A commit has happened since. Please refresh and try again.")
            files = dict(repo.commits[head].files)
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                path = value.get("path", "").strip("/")
                if key == "file":
                    files[path] = self.hub._entry_for(base64.b64decode(value["content"]), lfs=False)
                elif key == "lfsFile":
                    if not self.hub._blob(value["oid"]).exists():
                        return _error(
                            422, f"LFS object {value['oid']} for {path} was never uploaded"
                        )
                    files[path] = FileEntry(
                        value["oid"],
                        value["size"],
                        True,
                        git_blob_oid(lfs_pointer(value["oid"], value["size"])),
                    )
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        return _error(
                            404, f"A file with this name doesn't exist: {path}", "EntryNotFound"
                        )
                elif key == "deletedFolder":
                    for p in [p for p in files if p.startswith(path + "/")]:
                        del files[p]
                else:
                    return _error(400, f"unsupported commit operation {key!r}")
            commit_id = self.hub._new_commit(
                repo, head, header.get("summary", ""), header.get("description", ""), files
            )
            repo.branches[branch] = commit_id
            self.hub._persist()
        url = f"{self.base}/{URL_PREFIX[repo.type]}{repo.id}/commit/{commit_id}"
        return Response(
            200,
            {
                "success": True,
                "commitOid": commit_id,
                "commitUrl": url,
                "hookOutput": "",
                "pullRequestUrl": None,
            },
        )

    def _branch(self, repo: Repo, method: str, branch: str) -> Response:
        with self.hub.lock:
            if method == "DELETE":
                if repo.branches.pop(branch, None) is None:
                    return _error(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            else:
                if branch in repo.branches:
                    return _error(409, f"Branch {branch} already exists")
                start = self._json().get("startingPoint") or "main"
                commit = self._resolve(repo, start)
                if isinstance(commit, Response):
                    return commit
                repo.branches[branch] = commit.id
            self.hub._persist()
        return Response(200, {})

    def _tag(self, repo: Repo, method: str, name: str) -> Response:
        with self.hub.lock:
            if method == "DELETE":
                if repo.tags.pop(name, None) is None:
                    return _error(404, f"Invalid rev id: {name}", "RevisionNotFound")
                self.hub._persist()
                return Response(200, {})
        fault = self._fault("tag")
        tag = self._json().get("tag", "")
        with self.hub.lock:
            commit = self._resolve(repo, name)
            if isinstance(commit, Response):
                return commit
            if fault == "tag-race" and tag not in repo.tags:
                repo.tags[tag] = (
                    repo.branches["main"]
                    if repo.branches["main"] != commit.id
                    else commit.parent or commit.id
                )
            if not tag or "/" in tag or tag in repo.tags or tag in repo.branches:
                return _error(409, f"Tag {tag} already exists")
            repo.tags[tag] = commit.id
            self.hub._persist()
        return Response(200, {})

    # -- LFS and file routes --------------------------------------------------------
    def _git_or_resolve(self, method: str, seg: list[str]) -> Response:
        repo_type = "model"
        if seg and seg[0] in REPO_TYPES and seg[0] != "models":
            repo_type, seg = REPO_TYPES[seg[0]], seg[1:]
        if (
            len(seg) >= 5
            and seg[1].endswith(".git")
            and seg[2:] == ["info", "lfs", "objects", "batch"]
            and method == "POST"
        ):
            repo = self._get_repo(f"{repo_type}/{seg[0]}/{seg[1][:-4]}")
            if isinstance(repo, Response):
                return repo
            if not self._authorized():
                return _error(401, "Invalid credentials in Authorization header")
            self._fault("lfs_batch")
            return self._lfs_batch()
        if len(seg) >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
            repo = self._get_repo(f"{repo_type}/{seg[0]}/{seg[1]}")
            if isinstance(repo, Response):
                return repo
            self._fault("resolve")
            return self._resolve_file(repo, seg[3], "/".join(seg[4:]))
        return self._unhandled()

    def _lfs_batch(self) -> Response:
        objects = []
        for obj in self._json().get("objects", []):
            item: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if not self.hub._blob(obj["oid"]).exists():
                item["actions"] = {
                    "upload": {"href": f"{self.base}/_standin/lfs/{obj['oid']}", "header": {}}
                }
            objects.append(item)
        return Response(
            200,
            {"transfer": "basic", "objects": objects},
            {"Content-Type": "application/vnd.git-lfs+json"},
        )

    def _lfs_put(self, oid: str) -> Response:
        self._fault("lfs_put")
        if hashlib.sha256(self.hub_body).hexdigest() != oid:
            return _error(400, f"uploaded content does not match sha256 {oid}")
        self.hub._store_blob(self.hub_body)
        return Response(200, b"")

    def _resolve_file(self, repo: Repo, revision: str, path: str) -> Response:
        with self.hub.lock:
            commit = self._resolve(repo, revision)
            if isinstance(commit, Response):
                return commit
            entry = commit.files.get(path)
            if entry is None:
                return _error(404, f"Entry not found: {path}", "EntryNotFound")
            data = self.hub._blob(entry.sha256).read_bytes()
        headers = {
            "X-Repo-Commit": commit.id,
            "ETag": f'"{entry.sha256 if entry.lfs else entry.git_oid}"',
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
        }
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
        if match and (match.group(1) or match.group(2)):
            if match.group(1):
                start = int(match.group(1))
                end = min(int(match.group(2)), len(data) - 1) if match.group(2) else len(data) - 1
            else:
                start, end = max(0, len(data) - int(match.group(2))), len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return Response(206, data[start : end + 1], headers)
        return Response(200, data, headers)


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Run the Hub stand-in (not the Hub) for manual experiments."
    )
    parser.add_argument(
        "--storage", required=True, help="folder for blobs, state.json and requests.log"
    )
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one)")
    args = parser.parse_args()
    with HubStandin(args.storage, port=args.port) as hub:
        print(f"HF_ENDPOINT={hub.url} HF_HUB_DISABLE_XET=1", flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()
