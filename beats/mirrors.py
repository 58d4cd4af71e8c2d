"""Checkpoint files in Hugging Face Hub repos (the registry's mirrors), through huggingface_hub.

The file goes where huggingface_hub puts every Hub download: its cache (``HF_HUB_CACHE``,
by default ``~/.cache/huggingface/hub``), so ``HF_ENDPOINT`` (a mirror such as hf-mirror.com
or a company proxy), ``HF_TOKEN`` and ``HF_HUB_OFFLINE`` work as for any Hub download, and a
copy already in that cache is used without a download. The endpoint is read when a file is
fetched, so setting ``HF_ENDPOINT`` after import counts too.

A mirror is run by a third party, so its file is trusted only through the registry's pinned
size and sha256: before downloading, the size and the sha256 the Hub lists for the file
(its LFS object id) are compared with the pinned ones; after downloading, the file itself is
checked. A file that fails is deleted from the Hugging Face cache (the blob and its snapshot
link), so no later run can pick it up.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from types import ModuleType

from .download import DownloadError, Probe, check_file
from .registry import Source

METADATA_TIMEOUT = 15.0  # seconds to wait for the Hub to describe a file
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SIZES = re.compile(r"should be of size (\d+) but has size (\d+)")


def _hf() -> ModuleType:
    """huggingface_hub, imported without the warning tqdm prints when it is imported in a
    Jupyter kernel without ipywidgets ("IProgress not found"; its bars are text then)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="IProgress not found")
        import huggingface_hub.file_download  # (the submodule that imports tqdm)
    return huggingface_hub


def hub_endpoint() -> str:
    """The Hub in use: ``$HF_ENDPOINT`` now, else what huggingface_hub read at import."""
    return (os.environ.get("HF_ENDPOINT") or _hf().constants.ENDPOINT).rstrip("/")


def hub_cache() -> Path:
    """huggingface_hub's cache folder (``HF_HUB_CACHE``)."""
    return Path(_hf().constants.HF_HUB_CACHE)


def _url(source: Source) -> str:
    return _hf().hf_hub_url(source.repo_id, source.filename, repo_type=source.repo_type,
                            revision=source.revision, endpoint=hub_endpoint())


def cause(error: BaseException) -> str:
    """A huggingface_hub or network error in a few words: ``HTTP 404 EntryNotFound``,
    ``timed out``, ``connection cut``, ``not reachable (...)``."""
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    if isinstance(status, int):
        code = response.headers.get("X-Error-Code") or getattr(response, "reason_phrase", "")
        text = f"HTTP {status} {code or ''}".strip()
        if status == 401 or code in ("RepoNotFound", "GatedRepo"):
            text += " (a private or gated repo needs HF_TOKEN)"
        return text
    names = {c.__name__ for c in type(error).__mro__}
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if any("Timeout" in n for n in names):
        return "timed out"
    if names & {"RemoteProtocolError", "ChunkedEncodingError", "IncompleteRead",
                "ProtocolError", "ReadError"}:
        return f"connection cut ({first})"
    if names & {"ConnectError", "ConnectionError", "NewConnectionError"}:
        return f"not reachable ({first})"
    sizes = _SIZES.search(str(error))
    if sizes:
        return f"connection cut: {sizes.group(2)} of {sizes.group(1)} bytes arrived"
    return first


def _fail(source: Source, why: str) -> DownloadError:
    return DownloadError(f"{source.label()}: {why}", cause=why)


def _listed_problem(source: Source, size: int | None, sha256: str | None) -> str | None:
    """Ask the Hub about the file (one HEAD request): why it cannot be the pinned file, or
    None. Raises huggingface_hub's and the network's errors."""
    meta = _hf().get_hf_file_metadata(_url(source), timeout=METADATA_TIMEOUT)
    if meta.commit_hash is None:
        return (f"{hub_endpoint()} did not answer as a Hugging Face Hub (no X-Repo-Commit "
                "header): check HF_ENDPOINT")
    if size is not None and meta.size is not None and meta.size != size:
        return f"wrong size: the Hub lists {meta.size} bytes, the registry pins {size}"
    listed = (meta.etag or "").lower()
    if sha256 is not None and _SHA256.match(listed) and listed != sha256:
        return f"sha256 mismatch: the Hub lists {listed}, the registry pins {sha256}"
    return None


def fetch(source: Source, *, size: int | None, sha256: str | None,
          offline: bool) -> tuple[Path, str]:
    """The verified file of ``source`` in the Hugging Face cache, and the commit it is from.

    With ``offline``, only a copy already in that cache is used. Raises `DownloadError`
    (with ``cause``) when the Hub refuses, does not answer, or the file is not the pinned
    one; a wrong file is deleted from the cache first.
    """
    hf = _hf()
    from huggingface_hub.utils import LocalEntryNotFoundError

    local_only = offline
    unreachable = f"the Hub ({hub_endpoint()}) did not answer"
    if not offline:
        try:
            problem = _listed_problem(source, size, sha256)
        except Exception as e:  # the Hub's and the network's errors, whatever the versions
            why = cause(e)
            if not why.startswith(("not reachable", "timed out")):
                raise _fail(source, why) from None
            local_only = True  # as huggingface_hub does: fall back on its cache
            unreachable = f"the Hub ({hub_endpoint()}) did not answer: {why}"
        else:
            if problem is not None:
                raise _fail(source, problem + "; nothing was downloaded")
    try:
        path = Path(hf.hf_hub_download(
            source.repo_id, source.filename, repo_type=source.repo_type,
            revision=source.revision, endpoint=hub_endpoint(), local_files_only=local_only,
        ))
    except LocalEntryNotFoundError:
        if offline:
            raise _fail(source, "not in the Hugging Face cache") from None
        raise _fail(source, unreachable + ", and the file is not in the Hugging Face "
                    "cache") from None
    except Exception as e:
        raise _fail(source, cause(e)) from None
    problem = check_file(path, size, sha256)
    if problem is not None:
        remove_cached(path)
        raise _fail(source, f"{problem}; the file was deleted from the Hugging Face cache")
    return path, _commit(path)


def _commit(path: Path) -> str:
    """The commit of a snapshot file (``.../snapshots/COMMIT/file``), or ''."""
    parts = path.parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else ""


def remove_cached(path: Path) -> None:
    """Delete a file from the Hugging Face cache: its snapshot link and the blob behind it."""
    blob = path.resolve()
    path.unlink(missing_ok=True)
    if blob != path.absolute():
        blob.unlink(missing_ok=True)


def probe(source: Source, *, size: int | None, sha256: str | None) -> Probe:
    """Ask the Hub about ``source``'s file with one HEAD request; nothing is downloaded."""
    try:
        meta = _hf().get_hf_file_metadata(_url(source), timeout=METADATA_TIMEOUT)
    except Exception as e:  # the Hub's and the network's errors, whatever the versions
        return Probe(False, cause(e))
    if meta.commit_hash is None:
        return Probe(False, "no X-Repo-Commit header: not a Hugging Face Hub (check HF_ENDPOINT)")
    listed = (meta.etag or "").lower()
    shown = (f"{meta.size if meta.size is not None else '?'} bytes, commit "
             f"{meta.commit_hash[:12]}")
    if size is not None and meta.size is not None and meta.size != size:
        return Probe(False, f"{shown}: wrong size, the registry pins {size}", meta.size)
    if _SHA256.match(listed):
        if sha256 is not None and listed != sha256:
            return Probe(False, f"{shown}: sha256 {listed} is not the pinned one", meta.size)
        shown += ", sha256 as pinned" if sha256 is not None else f", sha256 {listed}"
    return Probe(True, shown, meta.size)
