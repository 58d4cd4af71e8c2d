"""Local HTTP servers for the loading tests, on 127.0.0.1 only.

`FileServer` serves bytes at paths like a blob store or a plain web server: optional
``Range`` support (``bytes=A-`` and ``bytes=A-B``), fixed replies (`Page`: an Azure 403 with
its XML body, an HTML page), and faults: cut connections, a stall before the body. `HubServer`
speaks the part of the Hugging Face Hub protocol that huggingface_hub's ``hf_hub_download``,
``get_hf_file_metadata``, ``create_repo`` and ``upload_folder`` use, with the Hub's headers
(``X-Repo-Commit``, ``X-Linked-Etag``, ``X-Linked-Size``, ``X-Error-Code``), model, dataset
and space repos, branches and commits (a revision can be pinned to a commit id), and LFS
files (``.pt``, ``.safetensors``, ...) answered with a redirect to a separate CDN server, as
the Hub does. Every server records every request.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote, unquote, urlsplit


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]


@dataclass(frozen=True)
class Page:
    """A fixed reply: status, body and content type (and more headers)."""

    status: int
    body: bytes = b""
    content_type: str = "text/plain"
    headers: dict[str, str] = field(default_factory=dict)


# What Azure blob storage answers for a withdrawn shared-access signature.
AZURE_403 = Page(
    403,
    b'\xef\xbb\xbf<?xml version="1.0" encoding="utf-8"?><Error><Code>AuthenticationFailed</Code>'
    b"<Message>Server failed to authenticate the request. Make sure the value of Authorization "
    b"header is formed correctly including the signature.\nRequestId:0f6c1e2a-001e-0035-2c5a\n"
    b"Time:2026-01-05T10:00:00.0000000Z</Message><AuthenticationErrorDetail>Signature not valid "
    b"in the specified time frame</AuthenticationErrorDetail></Error>",
    "application/xml",
    {"x-ms-error-code": "AuthenticationFailed"},
)
HTML_PAGE = Page(200, b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>Sign "
                 b"in to continue</body></html>\n", "text/html; charset=utf-8")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10  # seconds an idle or stalled connection is kept: requests stay bounded
    owner: _Server

    def log_message(self, format: str, *args) -> None:  # quiet
        pass

    def handle(self) -> None:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # client hung up
            super().handle()

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

    def _page(self, page: Page, head: bool) -> None:
        self._send(page.status, page.body, {"Content-Type": page.content_type, **page.headers},
                   head)

    def _json(self, status: int, obj: object, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(),
                   {"Content-Type": "application/json", **(headers or {})})

    def _serve_bytes(self, data: bytes, headers: dict[str, str], head: bool,
                     ranges: bool = True, cut: bool = False, cut_at: int | None = None,
                     stall: float = 0.0) -> None:
        """Send ``data`` (or the requested range). ``cut``: stop halfway through the body and
        hang up; ``cut_at``: hang up at that offset of the file; ``stall``: wait that long
        after the headers."""
        start, end = 0, len(data)
        match = re.match(r"bytes=(\d+)-(\d*)$", self.headers.get("Range", ""))
        status = 200
        if ranges and match:
            start = int(match.group(1))
            end = min(int(match.group(2)) + 1, len(data)) if match.group(2) else len(data)
            if start >= len(data):
                self._send(416, headers={"Content-Range": f"bytes */{len(data)}"}, head=head)
                return
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{end - 1}/{len(data)}"}
        body = memoryview(data)[start:end]
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        if ranges:
            self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(body)))
        stop = len(body) // 2 if cut else None
        if cut_at is not None:
            stop = max(0, min(len(body), cut_at - start))
        if stop is not None:
            self.send_header("Connection", "close")
        self.end_headers()
        if head:
            return
        if stall:
            self.wfile.flush()
            time.sleep(stall)
        if stop is not None:
            self.wfile.write(body[:stop])
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
        page = self.owner.pages.get(path)
        if page is not None:
            self._page(page, head)
            return
        data = self.owner.files.get(path)
        if data is None:
            self._page(self.owner.missing, head)
            return
        cut = not head and self.owner.cuts > 0
        if cut:
            self.owner.cuts -= 1
        self._serve_bytes(data, {"Content-Type": "application/octet-stream"}, head,
                          ranges=self.owner.ranges, cut=cut, cut_at=self.owner.cut_at,
                          stall=self.owner.stall)


class FileServer(_Server):
    """Serves ``files`` ({path: bytes}) and ``pages`` ({path: `Page`}); ``missing`` answers
    any other path (a 404 by default).

    ``ranges``: honour Range requests. ``cuts``: how many GET responses to cut off halfway
    (the full Content-Length is announced). ``cut_at``: cut every response at that offset
    of the file, so a resumed request gets nothing more. ``stall``: seconds to wait after
    the headers before the body.
    """

    handler = _FileHandler

    def __init__(self, files: dict[str, bytes], *, ranges: bool = True, cuts: int = 0,
                 cut_at: int | None = None, stall: float = 0.0,
                 pages: dict[str, Page] | None = None, missing: Page | None = None) -> None:
        self.files = dict(files)
        self.pages = dict(pages or {})
        self.missing = missing or Page(404, b"not found")
        self.ranges = ranges
        self.cuts = cuts
        self.cut_at = cut_at
        self.stall = stall
        super().__init__()

    def gets(self, path: str) -> list[Request]:
        return [r for r in self.requests if r.method == "GET" and urlsplit(r.path).path == path]


# ---------------------------------------------------------------------- hub
@dataclass
class _Repo:
    refs: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)


_COMMIT_IDS = itertools.count()
LFS_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".onnx", ".npy")
_RESOLVE = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


def repo_key(repo_id: str, repo_type: str = "model") -> str:
    """How `HubServer.repos` names a repo: ``owner/name``, ``datasets/owner/name``, ..."""
    return repo_id if repo_type == "model" else f"{repo_type}s/{repo_id}"


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
        match = _RESOLVE.match(urlsplit(self.path).path)
        if not match:
            self._send(404, b"not found", head=head)
            return
        prefix, repo_id = match.group(1), match.group(2)
        revision, filename = unquote(match.group(3)), unquote(match.group(4))
        key = f"{prefix}/{repo_id}" if prefix else repo_id
        repo = self.owner.repos.get(key)
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
        if filename.endswith(LFS_SUFFIXES):  # as the Hub does: metadata here, bytes on a CDN
            actual = self.owner.oid(data)
            listed = self.owner.listed_sha256.get((key, filename), actual)
            cdn_path = f"/{key}/lfs/{actual}/{quote(filename)}"
            self.owner.cdn.files[cdn_path] = data
            self._send(302, head=head, headers={
                "Location": self.owner.cdn.url + cdn_path, "X-Repo-Commit": sha,
                "X-Linked-Etag": f'"{listed}"', "X-Linked-Size": str(len(data)),
                "ETag": f'"{listed}"',
            })
            return
        etag = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's blob id
        self._serve_bytes(data, {"X-Repo-Commit": sha, "ETag": f'"{etag}"',
                                 "Content-Type": "application/octet-stream"}, head)


class HubServer(_Server):
    """An in-memory model hub: repos with branches and commits of files, and a CDN server
    (``cdn``, a `FileServer` with its own address) that serves the LFS files.

    ``listed_sha256[(repo_key(...), filename)]`` makes the Hub list another sha256 for a
    file than that of its bytes (a mirror whose metadata and file disagree).
    """

    handler = _HubHandler

    def __init__(self) -> None:
        self.repos: dict[str, _Repo] = {}
        self.listed_sha256: dict[tuple[str, str], str] = {}
        self._oids: dict[int, tuple[bytes, str]] = {}  # id(bytes): (the bytes, sha256)
        self.cdn = FileServer({})
        super().__init__()

    def close(self) -> None:
        super().close()
        self.cdn.close()

    def oid(self, data: bytes) -> str:
        """The sha256 of ``data`` (the LFS object id), computed once per bytes object."""
        known = self._oids.get(id(data))
        if known is None or known[0] is not data:
            known = self._oids[id(data)] = (data, hashlib.sha256(data).hexdigest())
        return known[1]

    def commit(self, repo_id: str, files: dict[str, bytes], branch: str | None = "main", *,
               repo_type: str = "model", sha: str | None = None) -> str:
        """Add a commit (the previous files of ``branch`` plus ``files``), move ``branch`` to
        it (None: leave every branch alone) and return its id (``sha`` when given)."""
        repo = self.repos.setdefault(repo_key(repo_id, repo_type), _Repo())
        parent = repo.commits.get(repo.refs.get(branch or "", ""), {})
        if sha is None:
            sha = hashlib.sha1(f"{repo_id}:{next(_COMMIT_IDS)}".encode()).hexdigest()
        repo.commits[sha] = {**parent, **files}
        if branch is not None:
            repo.refs[branch] = sha
        return sha

    def hub_requests(self, repo_id: str) -> list[Request]:
        """Requests about ``repo_id``, to the Hub and to its CDN."""
        return [r for r in self.requests + self.cdn.requests if f"/{repo_id}/" in r.path]
