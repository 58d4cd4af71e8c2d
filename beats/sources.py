"""Getting a registry checkpoint's file from its sources, in order, each file verified.

`obtain` tries an entry's scripted sources in the registry's order (Hugging Face mirrors
through `beats.mirrors`, plain URLs through `beats.download`) and returns the first file
whose size and sha256 equal the pinned ones. A source that fails leaves none of its bytes
behind (not in the beats cache, not in the Hugging Face cache) and gets one line naming it
and the cause; when a later source works, those lines are logged as warnings, and when
every source fails they make up the error, followed by the way out: the browser page the
registry names, then ``beats models --import FILE``. A plain URL is never offered as
advice: an address that failed is only listed as tried.

What is trusted: only a file whose sha256 the registry pins. An entry without a pinned
digest (the acoustic tokenizers) is never downloaded automatically, even when a mirror
lists it; the error points to the browser page and ``beats models --import FILE --name
NAME``, which checks the file's structure and installs it marked unverified.

`check` probes every source of an entry without downloading it (``beats models --check``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from . import mirrors
from .download import DownloadError, Probe, check_file, download, probe_url
from .registry import RegistryEntry, Source

logger = logging.getLogger(__name__)

URL_RETRIES = 2  # consecutive attempts without progress before the next source is tried


class SourcesFailed(DownloadError):
    """No source gave the checkpoint's file; the message lists each and the way out."""


class NotCachedError(SourcesFailed, FileNotFoundError):
    """Downloads are off and the checkpoint is in neither the beats nor the Hub cache."""


@dataclass(frozen=True)
class Obtained:
    """A verified file: where it is, the source and a description of it (``origin``), and
    whether it is a temporary download (delete it once converted) or in the Hub cache."""

    path: Path
    source: Source
    origin: str
    temporary: bool


def way_out(entry: RegistryEntry) -> str:
    """How a person gets ``entry``'s file by hand and installs it (one sentence)."""
    if entry.pinned:
        install = ("then run `beats models --import FILE` (the file is checked against the "
                   "pinned sha256)")
    else:
        install = (f"then run `beats models --import FILE --name {entry.name}` (no digest "
                   "is known: its structure is checked and it is marked unverified)")
    page = entry.browser_page
    if page is None:
        return f"Get {entry.name}.pt by other means, {install}"
    return f"Open {page} in a browser, download {entry.name}.pt, {install}"


def not_downloadable(entry: RegistryEntry) -> str | None:
    """Why beats cannot download ``entry`` by itself at all, or None when it can try."""
    if not entry.pinned:
        return (f"{entry.name} has no pinned sha256 in the registry, so beats does not "
                "download it (a file from a mirror is trusted only through its digest). "
                + way_out(entry))
    if not entry.scripted_sources:
        return (f"{entry.name} has no source beats can download from: Microsoft publishes it "
                "on a OneDrive page that opens in a browser but not to scripts. "
                + way_out(entry))
    return None


def obtain(
    entry: RegistryEntry,
    downloads: Path,
    *,
    offline: str | None = None,
    progress: bool | None = None,
    target: Path | None = None,
) -> Obtained:
    """The verified file of ``entry`` from its first source that gives one.

    Args:
        downloads: folder for plain-URL downloads (``NAME.pt``); Hub files stay in the
            Hugging Face cache.
        offline: None when downloads are allowed, else why not: then only a verified copy
            already in the Hugging Face cache is used.
        target: where the converted checkpoint will live (named in the offline message).
    """
    reason = not_downloadable(entry)
    if reason is not None:
        raise SourcesFailed(reason)
    dest = downloads / f"{entry.name}.pt"
    if dest.is_file():  # verified earlier but not converted (interrupted between the two)
        if check_file(dest, entry.size, entry.sha256) is None:
            return Obtained(dest, entry.scripted_sources[0], "an earlier download", True)
        dest.unlink()
    failures: list[str] = []
    for source in entry.scripted_sources:
        if source.type == "url" and offline is not None:
            failures.append(f"{source.label()}: not tried, downloads are off")
            continue
        try:
            got = _try(source, entry, dest, offline is not None, progress)
        except DownloadError as e:
            failures.append(f"{source.label()}: {e.cause}")
            continue
        for line in failures:
            logger.warning("%s: could not use %s; got the file from %s", entry.name, line,
                           source.label())
        return got
    if offline is not None:
        where = f" ({target})" if target is not None else ""
        hub = any(s.type == "huggingface" for s in entry.scripted_sources)
        either = (f"; no verified copy is in the Hugging Face cache ({mirrors.hub_cache()}) "
                  "either" if hub else "")
        raise NotCachedError(
            f"{entry.name} is not in the beats cache{where} and downloads are off "
            f"({offline}){either}.\n" + _tried(failures)
            + f"\nRun once with network access, or: {way_out(entry)}"
        )
    network = all(any(mark in line for mark in _NETWORK) for line in failures)
    raise SourcesFailed(f"cannot download {entry.name}; every source failed:\n"
                        + _tried(failures) + "\n" + (_CHECK_NETWORK if network else "")
                        + way_out(entry))


# What the causes of a source that could not be reached at all say.
_NETWORK = (": cannot connect", ": timed out", "did not answer: not reachable",
            "did not answer: timed out")
_CHECK_NETWORK = ("Check the network connection (and HTTPS_PROXY behind a proxy, HF_ENDPOINT "
                  "for a Hub mirror), or: ")


def _tried(failures: list[str]) -> str:
    return "\n".join(f"  tried {line};" for line in failures)


def _try(source: Source, entry: RegistryEntry, dest: Path, offline: bool,
         progress: bool | None) -> Obtained:
    if source.type == "huggingface":
        path, commit = mirrors.fetch(source, size=entry.size, sha256=entry.sha256,
                                     offline=offline)
        origin = source.label() + (f" at commit {commit}" if commit else "")
        return Obtained(path, source, origin, False)
    assert source.url is not None
    try:
        download(source.url, dest, sha256=entry.sha256, size=entry.size, retries=URL_RETRIES,
                 progress=progress, desc=entry.name)
    except DownloadError:
        dest.with_name(dest.name + ".part").unlink(missing_ok=True)  # unverified bytes
        raise
    return Obtained(dest, source, source.label(), True)


def check(entry: RegistryEntry) -> list[tuple[Source, Probe | None]]:
    """Probe each of ``entry``'s sources without downloading it; None for a browser page."""
    out: list[tuple[Source, Probe | None]] = []
    for source in entry.sources:
        if source.type == "huggingface":
            found: Probe | None = mirrors.probe(source, size=entry.size, sha256=entry.sha256)
        elif source.type == "url":
            assert source.url is not None
            found = probe_url(source.url, size=entry.size)
        else:
            found = None
        out.append((source, found))
    return out
