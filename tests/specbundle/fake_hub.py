"""A Hub-compatible HTTP server on 127.0.0.1 with the subset of endpoints huggingface_hub uses to create, commit
to, inspect and download from model repos (read from huggingface_hub's hf_api.py, _commit_api.py,
_snapshot_download.py and file_download.py).

Every file is stored and served as a regular git blob: preupload answers "regular", so uploads never go through
LFS or xet, and downloads are plain GET /{repo}/resolve/{revision}/{path} with ETag and X-Repo-Commit headers.
Tests reach into `FakeHub.repos` to tamper with stored content.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socketserver
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    title: str
    files: dict[str, bytes]
    parent: str | None
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        return self.commits.get(revision)

    def commit(self, branch: str, title: str, files: dict[str, bytes]) -> Commit:
        parent = self.branches.get(branch)
        oid = hashlib.sha1(f"{self.repo_id}:{parent}:{title}:{len(self.commits)}:{time.time_ns()}".encode()).hexdigest()
        c = Commit(oid, title, files, parent, time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()))
        self.commits[oid] = c
        self.branches[branch] = oid
        return c


class _LoopbackServer(ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self):
        # HTTPServer.server_bind calls socket.getfqdn, a DNS query: nothing here may leave the machine.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class FakeHub:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) in arrival order
        self.lock = threading.Lock()
        self.server = _LoopbackServer(("127.0.0.1", 0), _make_handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, name="fake-hub", daemon=True
        )

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def head(self, repo_id: str, branch: str = "main") -> Commit:
        repo = self.repos[repo_id]
        return repo.commits[repo.branches[branch]]

    def tamper(self, repo_id: str, path: str, data: bytes, branch: str = "main") -> None:
        """Replace a stored file's bytes in place (the commit and its metadata stay as they were)."""
        self.head(repo_id, branch).files[path] = data


_REPO = r"(?P<repo>[^/]+/[^/]+)"
ROUTES = [
    ("POST", re.compile(r"/api/repos/create"), "create_repo"),
    ("POST", re.compile(r"/api/validate-yaml"), "validate_yaml"),
    ("GET", re.compile(r"/api/agent-harnesses"), "agent_harnesses"),
    ("GET", re.compile(rf"/api/models/{_REPO}/revision/(?P<rev>.+)"), "model_info"),
    ("GET", re.compile(rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?"), "tree"),
    ("GET", re.compile(rf"/api/models/{_REPO}/refs"), "refs"),
    ("GET", re.compile(rf"/api/models/{_REPO}/commits/(?P<rev>.+)"), "commits"),
    ("POST", re.compile(rf"/api/models/{_REPO}/preupload/(?P<rev>.+)"), "preupload"),
    ("POST", re.compile(rf"/api/models/{_REPO}/commit/(?P<rev>.+)"), "commit"),
    ("POST", re.compile(rf"/api/models/{_REPO}/branch/(?P<branch>.+)"), "create_branch"),
    ("GET", re.compile(rf"/api/models/{_REPO}"), "model_info"),
    ("GET", re.compile(rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"), "resolve"),
    ("HEAD", re.compile(rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"), "resolve"),
]


def _make_handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep pytest output clean
            pass

        def do_GET(self):
            self._dispatch("GET")

        def do_HEAD(self):
            self._dispatch("HEAD")

        def do_POST(self):
            self._dispatch("POST")

        # ---------------------------------------------------------------- plumbing

        def _dispatch(self, method: str):
            url = urlsplit(self.path)
            path = unquote(url.path)
            self.query = parse_qs(url.query)
            length = int(self.headers.get("Content-Length") or 0)
            self.body = self.rfile.read(length) if length else b""
            with hub.lock:
                hub.requests.append((method, path))
                for m, pattern, name in ROUTES:
                    match = pattern.fullmatch(path)
                    if m == method and match:
                        return getattr(self, name)(**match.groupdict())
                self._error(404, "NotFound", f"no route for {method} {path}")

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, data, status: int = 200, headers: dict | None = None):
            self._send(status, json.dumps(data).encode(), headers)

        def _error(self, status: int, code: str, message: str, headers: dict | None = None):
            self._json(
                {"error": message}, status, {"X-Error-Code": code, "X-Error-Message": message, **(headers or {})}
            )

        def _authorized(self) -> bool:
            return self.headers.get("Authorization", "").startswith("Bearer ")

        def _repo(self, repo: str, write: bool = False) -> Repo | None:
            r = hub.repos.get(repo)
            if r is None or (r.private and not self._authorized()):
                self._error(404, "RepoNotFound", f"Repository not found: {repo}")
                return None
            if write and not self._authorized():
                self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
                return None
            return r

        def _commit(self, repo: Repo, rev: str) -> Commit | None:
            c = repo.resolve(rev)
            if c is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return c

        # ---------------------------------------------------------------- endpoints

        def create_repo(self):
            if not self._authorized():
                return self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
            payload = json.loads(self.body or b"{}")
            repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
            if repo_id in hub.repos:
                # The Hub's 409 carries the url too: create_repo(exist_ok=True) reads it.
                msg = "You already created this model repo"
                return self._json({"error": msg, "url": f"{hub.url}/{repo_id}"}, 409, {"X-Error-Message": msg})
            repo = Repo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
            repo.commit(
                "main", "initial commit", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
            )
            hub.repos[repo_id] = repo
            self._json({"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

        def agent_harnesses(self):
            # huggingface_hub fetches this registry once per process to build its user-agent.
            self._json({"standardEnvVars": [], "harnesses": {}})

        def validate_yaml(self):
            content = json.loads(self.body)["content"]
            match = re.match(r"---\n(.*?)\n---\n", content, re.S)
            try:
                data = yaml.safe_load(match.group(1)) if match else None
            except yaml.YAMLError as e:
                return self._error(400, "BadRequest", f"invalid YAML in README.md: {e}")
            if not isinstance(data, dict):
                return self._error(400, "BadRequest", "README.md has no YAML metadata block")
            self._json({"errors": [], "warnings": []})

        def model_info(self, repo, rev="main"):
            r = self._repo(repo)
            if r is None:
                return
            c = self._commit(r, rev)
            if c is None:
                return
            self._json(
                {
                    "id": repo,
                    "modelId": repo,
                    "sha": c.oid,
                    "private": r.private,
                    "lastModified": c.date,
                    "tags": [],
                    "siblings": [{"rfilename": p} for p in sorted(c.files)],
                }
            )

        def tree(self, repo, rev, path=None):
            r = self._repo(repo)
            if r is None:
                return
            c = self._commit(r, rev)
            if c is None:
                return
            prefix = (path.strip("/") + "/") if path else ""
            entries = [
                {"type": "file", "path": p, "size": len(data), "oid": git_blob_oid(data)}
                for p, data in sorted(c.files.items())
                if p.startswith(prefix)
            ]
            self._json(entries)

        def refs(self, repo):
            r = self._repo(repo)
            if r is None:
                return
            branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": oid} for b, oid in r.branches.items()]
            self._json({"branches": branches, "tags": [], "converts": [], "pullRequests": []})

        def commits(self, repo, rev):
            r = self._repo(repo)
            if r is None:
                return
            c = self._commit(r, rev)
            out = []
            while c is not None:
                out.append(
                    {"id": c.oid, "title": c.title, "message": "", "authors": [{"user": "user"}], "date": c.date}
                )
                c = r.commits.get(c.parent) if c.parent else None
            self._json(out)

        def preupload(self, repo, rev):
            r = self._repo(repo, write=True)
            if r is None:
                return
            c = r.resolve(rev)
            files = json.loads(self.body)["files"]
            self._json(
                {
                    "files": [
                        {
                            "path": f["path"],
                            "uploadMode": "regular",
                            "shouldIgnore": False,
                            "oid": git_blob_oid(c.files[f["path"]]) if c and f["path"] in c.files else None,
                        }
                        for f in files
                    ]
                }
            )

        def commit(self, repo, rev):
            r = self._repo(repo, write=True)
            if r is None:
                return
            if rev not in r.branches:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
            header = next(item["value"] for item in lines if item["key"] == "header")
            files = dict(r.resolve(rev).files)
            for item in lines:
                key, value = item["key"], item["value"]
                if key == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                elif key == "deletedFolder":
                    files = {p: d for p, d in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
                elif key != "header":
                    return self._error(400, "BadRequest", f"this fake Hub stores regular files only, got {key!r}")
            c = r.commit(rev, header["summary"], files)
            self._json({"commitUrl": f"{hub.url}/{repo}/commit/{c.oid}", "commitOid": c.oid, "pullRequestUrl": None})

        def create_branch(self, repo, branch):
            r = self._repo(repo, write=True)
            if r is None:
                return
            if branch in r.branches:
                return self._error(409, "BranchExists", f"Reference already exists: {branch}")
            start = json.loads(self.body or b"{}").get("startingPoint") or "main"
            c = self._commit(r, start)
            if c is None:
                return
            r.branches[branch] = c.oid
            self._json({})

        def resolve(self, repo, rev, path):
            r = self._repo(repo)
            if r is None:
                return
            c = self._commit(r, rev)
            if c is None:
                return
            if path not in c.files:
                return self._error(404, "EntryNotFound", f"{path} does not exist", {"X-Repo-Commit": c.oid})
            data = c.files[path]
            self._send(
                200,
                data,
                {"ETag": f'"{git_blob_oid(data)}"', "X-Repo-Commit": c.oid, "Accept-Ranges": "bytes"},
                content_type="application/octet-stream",
            )

    return Handler
