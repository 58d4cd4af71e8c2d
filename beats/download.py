"""Streamed, resumable, verified downloads of plain URLs, and probing them without a download.

A download streams into ``DEST.part`` with a progress bar. After an interruption (a cut
connection, a timeout) the next attempt resumes from the bytes already in ``DEST.part``
with an HTTP ``Range`` request, or restarts from zero when the server does not honour it.
The finished file is checked against the expected size and SHA-256 when they are known (a
mismatch deletes it and says so) and only then renamed to ``DEST``, atomically, so
``DEST`` is either absent or complete. A server that answers with an HTML page (a login
or error page) or announces the wrong size is stopped before the body is read.

Every `DownloadError` carries ``cause``: the reason in a few words, without the address
(``HTTP 403 AuthenticationFailed``, ``an HTML page (text/html), not a checkpoint``,
``sha256 mismatch: ...``), for messages that list several sources.

Two processes must not download to the same ``DEST`` at once: callers hold a lock.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .errors import BeatsError

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
_RETRY_STATUS = (408, 429, 500, 502, 503, 504)
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_XML_CODE = re.compile(rb"<Code>\s*([A-Za-z0-9_.-]{1,64})\s*</Code>")
_HTML_START = (b"<!doctype html", b"<html", b"<head", b"<body")
USER_AGENT = "beats"


class DownloadError(BeatsError, OSError):
    """A download failed; the message says why and whether a retry will resume.

    ``cause`` is the reason alone, without the address (defaults to the message).
    """

    def __init__(self, message: str, cause: str | None = None) -> None:
        super().__init__(message)
        self.cause = cause or message

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ChecksumError(DownloadError):
    """The downloaded file's SHA-256 is not the expected one (the file was deleted)."""


class _Interrupted(Exception):
    """A transient failure: the next attempt resumes or restarts."""


def short_url(url: str) -> str:
    """The URL without its query string (which can hold long access signatures)."""
    return url.split("?", 1)[0]


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def looks_like_html(head: bytes) -> bool:
    """Whether the first bytes of a file are an HTML page."""
    return head.lstrip()[:16].lower().startswith(_HTML_START)


def check_file(path: str | Path, size: int | None, sha256: str | None) -> str | None:
    """Why the file at ``path`` is not the expected one, or None when it is.

    The reason names an HTML page first (a login or error page saved as the file), then a
    wrong size, then a wrong SHA-256.
    """
    got = Path(path).stat().st_size
    if size is not None and got == size and sha256 is None:
        return None
    digest = None if sha256 is None else sha256_file(path)
    if (size is None or got == size) and (digest is None or digest == sha256):
        return None
    with open(path, "rb") as f:
        if looks_like_html(f.read(512)):
            return "an HTML page, not a checkpoint"
    if size is not None and got != size:
        return f"wrong size: {got} bytes, the registry pins {size}"
    return f"sha256 mismatch: got {digest}, the registry pins {sha256}"


def download(
    url: str,
    dest: str | Path,
    *,
    sha256: str | None = None,
    size: int | None = None,
    retries: int = 5,
    timeout: float = 30.0,
    progress: bool | None = None,
    desc: str | None = None,
) -> str:
    """Download ``url`` to ``dest`` and return the file's SHA-256 (hex).

    Args:
        sha256: expected SHA-256; on a mismatch the file is deleted and `ChecksumError`
            raised with both hashes.
        size: expected size in bytes, when known: a server announcing another size is
            refused before anything is read.
        retries: attempts after the first that may follow an interruption; an attempt that
            received data resets the count.
        timeout: seconds a connection or a read may stall before it counts as interrupted.
        progress: show a tqdm bar; None shows it only on a terminal.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    failures = 0
    while True:
        before = part.stat().st_size if part.exists() else 0
        try:
            _attempt(url, part, size, timeout, progress, desc or dest.name)
            break
        except _Interrupted as e:
            after = part.stat().st_size if part.exists() else 0
            failures = 1 if after > before else failures + 1
            if failures > retries:
                kept = (f"; {after} bytes are kept in {part} and the next try resumes from "
                        "there" if after else "")
                raise DownloadError(
                    f"downloading {short_url(url)} failed {failures} times in a row ({e})" + kept,
                    cause=str(e),
                ) from None
            # The final error says how many attempts failed: a retry is no news by itself.
            logger.info("download of %s interrupted (%s); retrying", short_url(url), e)
            time.sleep(min(0.2 * 2 ** (failures - 1), 5.0))
    got = part.stat().st_size
    if size is not None and got != size:
        part.unlink()
        raise DownloadError(
            f"{short_url(url)} gave {got} bytes where {size} were expected; the file was "
            "deleted, try again (if it persists, the registry entry or the server is wrong)",
            cause=f"wrong size: {got} bytes, the registry pins {size}",
        )
    digest = sha256_file(part)
    if sha256 is not None and digest != sha256.lower():
        part.unlink()
        raise ChecksumError(
            f"SHA-256 mismatch for {dest.name} from {short_url(url)}: expected {sha256.lower()}, "
            f"got {digest}. The downloaded file was deleted. Try again; if it persists, the "
            "file on the server is not the one the registry describes",
            cause=f"sha256 mismatch: got {digest}, the registry pins {sha256.lower()}",
        )
    os.replace(part, dest)
    return digest


def _open(url: str, headers: dict[str, str], timeout: float) -> http.client.HTTPResponse:
    request = urllib.request.Request(
        url, headers={"Accept-Encoding": "identity", "User-Agent": USER_AGENT, **headers})
    return urllib.request.urlopen(request, timeout=timeout)


def http_error_cause(error: urllib.error.HTTPError) -> str:
    """``HTTP 403 AuthenticationFailed``: the status and the error code a storage service
    puts in its XML body (Azure, S3) or headers, else the status's reason phrase."""
    code = error.headers.get("X-Error-Code") or error.headers.get("x-ms-error-code")
    if not code:
        try:
            match = _XML_CODE.search(error.read(65536) or b"")
        except (OSError, http.client.HTTPException):
            match = None
        code = match.group(1).decode() if match else None
    return f"HTTP {error.code} {code or error.reason}"


def _html(response: http.client.HTTPResponse) -> str | None:
    kind = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    return kind if kind in ("text/html", "application/xhtml+xml") else None


def _attempt(
    url: str, part: Path, size: int | None, timeout: float, progress: bool | None, desc: str
) -> None:
    """One request: resume ``part`` if it has data, else (re)start it. Raises `_Interrupted`."""
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:
        part.unlink()  # longer than the file can be: a stale leftover
        have = 0
    if size is not None and have == size:
        return
    try:
        response = _open(url, {"Range": f"bytes={have}-"} if have else {}, timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the server will not serve from there: start over
            part.unlink()
            raise _Interrupted("the server refused to resume (HTTP 416)") from None
        cause = http_error_cause(e)
        if e.code in _RETRY_STATUS:
            raise _Interrupted(cause) from None
        raise DownloadError(f"{short_url(url)} answered {cause}", cause=cause) from None
    except TimeoutError:
        raise _Interrupted(f"timed out after {timeout:g} s") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, (TimeoutError, socket.timeout)):
            raise _Interrupted(f"timed out after {timeout:g} s") from None
        raise _Interrupted(f"cannot connect: {reason}") from None

    with response:
        html = _html(response)
        if html is not None:
            part.unlink(missing_ok=True)
            cause = f"an HTML page ({html}), not a checkpoint"
            raise DownloadError(f"{short_url(url)} answered with {cause}", cause=cause)
        total: int | None
        if have and response.status == 206:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != have:
                part.unlink()
                raise _Interrupted("the server resumed at the wrong place; restarting")
            total = None if match.group(3) == "*" else int(match.group(3))
            mode = "ab"
        else:
            if have:
                logger.info("%s does not support resuming; restarting", short_url(url))
            have, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None else None
        if size is not None and total is not None and total != size:
            part.unlink(missing_ok=True)
            cause = f"wrong size: the server announces {total} bytes, the registry pins {size}"
            raise DownloadError(f"{short_url(url)}: {cause}", cause=cause)
        got = have
        disable = None if progress is None else not progress
        with open(part, mode) as f, _progress_bar_class()(
            total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
            desc=desc, disable=disable, leave=False,
        ) as bar:
            while True:
                try:
                    chunk = response.read(CHUNK_BYTES)
                except TimeoutError:
                    raise _Interrupted(f"timed out after {timeout:g} s, {got} bytes in") from None
                except (OSError, http.client.HTTPException):
                    raise _Interrupted(_cut(got, total)) from None
                if not chunk:
                    break
                f.write(chunk)
                got += len(chunk)
                bar.update(len(chunk))
    if total is not None and got < total:
        raise _Interrupted(_cut(got, total))


def _cut(got: int, total: int | None) -> str:
    return f"connection cut after {got} of {total if total is not None else '?'} bytes"


@dataclass(frozen=True)
class Probe:
    """What an address answered to a one-byte request: ``ok`` and a short ``text``."""

    ok: bool
    text: str
    size: int | None = None


def probe_url(url: str, *, size: int | None = None, timeout: float = 15.0) -> Probe:
    """Ask for the first byte of ``url`` (``Range: bytes=0-0``) and report what answers.

    Nothing else is read. ``ok`` when the server answers with a file, not an HTML page, of
    ``size`` bytes when that is known and the server says the total.
    """
    try:
        response = _open(url, {"Range": "bytes=0-0"}, timeout)
    except urllib.error.HTTPError as e:
        return Probe(False, http_error_cause(e))
    except TimeoutError:
        return Probe(False, f"timed out after {timeout:g} s")
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        return Probe(False, f"cannot connect: {getattr(e, 'reason', e)}")
    with response:
        html = _html(response)
        match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
        if match and match.group(3) != "*":
            total: int | None = int(match.group(3))
        elif response.status == 200 and response.headers.get("Content-Length"):
            total = int(response.headers["Content-Length"])
        else:
            total = None
    if html is not None:
        return Probe(False, f"an HTML page ({html}), not a checkpoint")
    shown = f"HTTP {response.status}, " + (f"{total} bytes" if total is not None else
                                           "size not said")
    if size is not None and total is not None and total != size:
        return Probe(False, f"{shown}: wrong size, the registry pins {size}", total)
    return Probe(True, shown, total)


def _progress_bar_class() -> type:
    """tqdm's notebook bar in Jupyter when ipywidgets is there to draw it, else the text bar.

    ``tqdm.auto`` without ipywidgets warns ("IProgress not found") and draws nothing, so it
    is only used when it can work; the text bar works everywhere, notebooks included.
    """
    import importlib.util

    if importlib.util.find_spec("ipywidgets") is None:
        from tqdm import tqdm
    else:
        from tqdm.auto import tqdm
    return tqdm
