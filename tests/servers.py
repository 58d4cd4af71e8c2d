"""Local HTTP servers for the loading tests, on 127.0.0.1 only.

`FileServer` serves bytes at paths like a blob store (optional ``Range`` support, and it
can cut connections mid-file). `HubServer` speaks the part of the Hugging Face Hub protocol
that huggingface_hub's ``hf_hub_download``, ``create_repo`` and ``upload_folder`` use, so the
real client runs against it. Both record every request.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10  # seconds an idle or stalled connection is kept: requests stay bounded
    owner: _Server

    def log_message(self, format: str, *args) -> None:  # quiet
        pass

    def _record(self) -> None:
        self.owner.requests.append(Request(self.command, self.path, dict(self.headers)))

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              head: bool = False) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, obj: object, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(),
                   {"Content-Type": "application/json", **(headers or {})})

    def _serve_bytes(self, data: bytes, headers: dict[str, str], head: bool,
                     ranges: bool = True, cut: bool = False) -> None:
        """Send ``data`` (or the requested range); with ``cut``, stop halfway and hang up."""
        start = 0
        match = re.match(r"bytes=(\d+)-$", self.headers.get("Range", ""))
        status = 200
        if ranges and match:
            start = int(match.group(1))
            if start >= len(data):
                self._send(416, headers={"Content-Range": f"bytes */{len(data)}"}, head=head)
                return
            status = 206
            headers = {**headers,
                       "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
        body = data[start:]
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        if ranges:
            self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(body)))
        if cut:
            self.send_header("Connection", "close")
        self.end_headers()
        if head:
            return
        if cut:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


class _Server:
    handler: type[_Handler]

    def __init__(self) -> None:
        self.requests: list[Request] = []
        handler = type("Handler", (self.handler,), {"owner": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------- plain files
class _FileHandler(_Handler):
    owner: FileServer

    def do_HEAD(self) -> None:
        self._get(head=True)

    def do_GET(self) -> None:
        self._get(head=False)

    def _get(self, head: bool) -> None:
        self._record()
        path = urlsplit(self.path).path
        data = self.owner.files.get(path)
        if data is None:
            self._send(404, b"not found", head=head)
            return
        cut = not head and self.owner.cuts > 0
        if cut:
            self.owner.cuts -= 1
        self._serve_bytes(data, {"Content-Type": "application/octet-stream"}, head,
                          ranges=self.owner.ranges, cut=cut)


class FileServer(_Server):
    """Serves ``files`` ({path: bytes}). ``ranges``: honour Range requests. ``cuts``: how
    many GET responses to cut off halfway (the full Content-Length is announced)."""

    handler = _FileHandler

    def __init__(self, files: dict[str, bytes], *, ranges: bool = True, cuts: int = 0) -> None:
        self.files = dict(files)
        self.ranges = ranges
        self.cuts = cuts
        super().__init__()

    def gets(self, path: str) -> list[Request]:
        return [r for r in self.requests if r.method == "GET" and urlsplit(r.path).path == path]


# ---------------------------------------------------------------------- hub
@dataclass
class _Repo:
    refs: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)


_COMMIT_IDS = itertools.count()


class _HubHandler(_Handler):
    owner: HubServer

    def do_HEAD(self) -> None:
        self._resolve(head=True)

    def do_GET(self) -> None:
        self._resolve(head=False)

    def do_POST(self) -> None:
        self._record()
        path = urlsplit(self.path).path
        body = self._body()
        if path == "/api/repos/create":
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}"
            self.owner.repos.setdefault(repo_id, _Repo())
            self._json(200, {"url": f"{self.owner.url}/{repo_id}"})
            return
        match = re.match(r"^/api/models/([^/]+/[^/]+)/(preupload|commit)/(.+)$", path)
        if not match or match.group(1) not in self.owner.repos:
            self._json(404, {"error": "not found"}, {"X-Error-Code": "RepoNotFound"})
            return
        repo_id, action, revision = match.group(1), match.group(2), unquote(match.group(3))
        if action == "preupload":
            files = json.loads(body)["files"]
            self._json(200, {"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                for f in files
            ]})
            return
        added = {}
        for line in body.splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                added[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
        sha = self.owner.commit(repo_id, added, branch=revision)
        self._json(200, {"commitUrl": f"{self.owner.url}/{repo_id}/commit/{sha}",
                         "commitOid": sha, "pullRequestUrl": None})

    def _resolve(self, head: bool) -> None:
        self._record()
        match = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", urlsplit(self.path).path)
        if not match:
            self._send(404, b"not found", head=head)
            return
        repo_id, revision, filename = match.group(1), unquote(match.group(2)), match.group(3)
        repo = self.owner.repos.get(repo_id)
        if repo is None:
            self._send(404, head=head, headers={"X-Error-Code": "RepoNotFound",
                                                "X-Error-Message": "Repository not found"})
            return
        sha = repo.refs.get(revision, revision if revision in repo.commits else None)
        if sha is None:
            self._send(404, head=head, headers={"X-Error-Code": "RevisionNotFound",
                                                "X-Error-Message": "Invalid rev id"})
            return
        data = repo.commits[sha].get(filename)
        if data is None:
            self._send(404, head=head, headers={"X-Error-Code": "EntryNotFound",
                                                "X-Error-Message": "Entry not found",
                                                "X-Repo-Commit": sha})
            return
        etag = hashlib.sha256(data).hexdigest()
        self._serve_bytes(data, {"X-Repo-Commit": sha, "ETag": f'"{etag}"',
                                 "Content-Type": "application/octet-stream"}, head)


class HubServer(_Server):
    """An in-memory model hub: repos with branches and commits of files."""

    handler = _HubHandler

    def __init__(self) -> None:
        self.repos: dict[str, _Repo] = {}
        super().__init__()

    def commit(self, repo_id: str, files: dict[str, bytes], branch: str = "main") -> str:
        """Add a commit on ``branch`` (the previous files plus ``files``); return its id."""
        repo = self.repos.setdefault(repo_id, _Repo())
        parent = repo.commits.get(repo.refs.get(branch, ""), {})
        sha = hashlib.sha1(f"{repo_id}:{next(_COMMIT_IDS)}".encode()).hexdigest()
        repo.commits[sha] = {**parent, **files}
        repo.refs[branch] = sha
        return sha

    def hub_requests(self, repo_id: str) -> list[Request]:
        return [r for r in self.requests if f"/{repo_id}/" in r.path]
