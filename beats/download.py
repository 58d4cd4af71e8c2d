"""Streamed, resumable, verified downloads of plain URLs (the registry's checkpoints).

A download streams into ``DEST.part`` with a progress bar. After an interruption (a cut
connection, a timeout, a killed process) the next attempt resumes from the bytes already
in ``DEST.part`` with an HTTP ``Range`` request, or restarts from zero when the server
does not honour it. The finished file is checked against the expected size and SHA-256
when they are known (a mismatch deletes it and says so) and only then renamed to ``DEST``,
atomically, so ``DEST`` is either absent or complete.

Two processes must not download to the same ``DEST`` at once: callers hold a lock.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

from .errors import BeatsError

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
_RETRY_STATUS = (408, 429, 500, 502, 503, 504)
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class DownloadError(BeatsError, OSError):
    """A download failed; the message says why and whether a retry will resume."""


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
        size: expected size in bytes, when known.
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
                    f"downloading {short_url(url)} failed {failures} times in a row ({e})" + kept
                ) from None
            # The final error says how many attempts failed: a retry is no news by itself.
            logger.info("download of %s interrupted (%s); retrying", short_url(url), e)
            time.sleep(min(0.2 * 2 ** (failures - 1), 5.0))
    got = part.stat().st_size
    if size is not None and got != size:
        part.unlink()
        raise DownloadError(
            f"{short_url(url)} gave {got} bytes where {size} were expected; the file was "
            "deleted, try again (if it persists, the registry entry or the server is wrong)"
        )
    digest = sha256_file(part)
    if sha256 is not None and digest != sha256.lower():
        part.unlink()
        raise ChecksumError(
            f"SHA-256 mismatch for {dest.name} from {short_url(url)}: expected {sha256.lower()}, "
            f"got {digest}. The downloaded file was deleted. Try again; if it persists, the "
            "file on the server is not the one the registry describes"
        )
    os.replace(part, dest)
    return digest


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
    headers = {"Accept-Encoding": "identity", "User-Agent": "beats"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=timeout
        )
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the server will not serve from there: start over
            part.unlink()
            raise _Interrupted("the server refused to resume (HTTP 416)") from None
        if e.code in _RETRY_STATUS:
            raise _Interrupted(f"HTTP {e.code} {e.reason}") from None
        raise DownloadError(f"{short_url(url)} answered HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise _Interrupted(f"cannot connect: {reason}") from None

    with response:
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
        got = have
        disable = None if progress is None else not progress
        with open(part, mode) as f, _progress_bar_class()(
            total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
            desc=desc, disable=disable, leave=False,
        ) as bar:
            while True:
                try:
                    chunk = response.read(CHUNK_BYTES)
                except (OSError, http.client.HTTPException) as e:
                    raise _Interrupted(f"connection lost after {got} bytes: {e!r}") from None
                if not chunk:
                    break
                f.write(chunk)
                got += len(chunk)
                bar.update(len(chunk))
    if total is not None and got < total:
        raise _Interrupted(f"connection closed after {got} of {total} bytes")


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
