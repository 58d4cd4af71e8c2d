"""The beats cache of registry checkpoints, converted to safetensors.

Layout, under ``cache_dir`` or ``$BEATS_CACHE`` (default ``$XDG_CACHE_HOME/beats``, that is
``~/.cache/beats``)::

    BEATs_iter3_plus_AS2M/          one folder per registry name, in save_pretrained format
        config.json
        model.safetensors
        labels.json                 fine-tuned models
        source.json                 where the .pt came from, its sha256 and size, verified
    .downloads/NAME.pt.part         a plain-URL download in progress
    .locks/NAME.lock                held while NAME is downloaded, converted or imported

A Microsoft ``.pt`` is obtained once (`beats.sources`: verified against the registry's
pinned digest), converted once, and the converted folder is what every later load reads,
without unpickling anything. A plain-URL download is deleted after conversion; a file from
a Hugging Face mirror stays in the Hugging Face cache, as every Hub download does. The
folder appears complete or not at all (it is built under a temporary name and renamed).

A cached checkpoint is *verified* when the sha256 recorded in its ``source.json`` is the
one the registry pins; a file imported with ``--name`` (no digest known) is not.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from filelock import FileLock

from . import mirrors, sources
from .errors import BeatsError, InputError
from .files import temporary_folder
from .registry import RegistryEntry
from .serialization import CONFIG_NAME, WEIGHTS_NAME

CACHE_ENV = "BEATS_CACHE"
SOURCE_NAME = "source.json"


def default_cache_dir() -> Path:
    """``$BEATS_CACHE``, else ``$XDG_CACHE_HOME/beats``, else ``~/.cache/beats``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "beats"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def model_dir(entry: RegistryEntry, cache_dir: str | Path | None = None) -> Path:
    """Where ``entry``'s converted files live (whether or not they are there yet)."""
    return cache_root(cache_dir) / entry.name


def is_cached(entry: RegistryEntry, cache_dir: str | Path | None = None) -> bool:
    folder = model_dir(entry, cache_dir)
    return (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file()


def read_source(entry: RegistryEntry, cache_dir: str | Path | None = None) -> dict | None:
    """The ``source.json`` record of a cached entry (sha256, size, source, verified)."""
    try:
        record = json.loads((model_dir(entry, cache_dir) / SOURCE_NAME).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def is_verified(entry: RegistryEntry, cache_dir: str | Path | None = None) -> bool:
    """Whether ``entry`` is cached from a file whose sha256 is the registry's pinned one."""
    record = read_source(entry, cache_dir) or {}
    return (is_cached(entry, cache_dir) and entry.sha256 is not None
            and record.get("sha256") == entry.sha256)


@contextlib.contextmanager
def locked(entry: RegistryEntry, cache_dir: str | Path | None = None) -> Iterator[Path]:
    """Hold ``entry``'s lock in the cache (one download, conversion or import at a time);
    yields the cache root."""
    root = cache_root(cache_dir)
    (root / ".locks").mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / ".locks" / f"{entry.name}.lock")):
        yield root


def install(
    entry: RegistryEntry,
    cache_dir: str | Path | None,
    write: Callable[[Path], None],
    record: dict,
) -> Path:
    """Build ``entry``'s folder with ``write(folder)`` and ``record`` as its source.json, then
    put it in place atomically (replacing an older one). The caller holds `locked`."""
    root = cache_root(cache_dir)
    target = model_dir(entry, cache_dir)
    staging = temporary_folder(root, f".{entry.name}.")
    try:
        write(staging)
        record = {"name": entry.name, **record,
                  "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (staging / SOURCE_NAME).write_text(json.dumps(record, indent=2) + "\n")
        if target.exists():  # an older or incomplete folder
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def fetch(
    entry: RegistryEntry,
    cache_dir: str | Path | None,
    *,
    offline: str | None,
    convert: Callable[[Path, Path], None],
    progress: bool | None = None,
) -> Path:
    """Return ``entry``'s cached folder, obtaining and converting its file first if needed.

    Args:
        offline: None when downloads are allowed, else why not (for the error message);
            then only a verified copy in the Hugging Face cache can be converted.
        convert: ``convert(pt_path, out_dir)`` writes the save_pretrained files of a ``.pt``.

    Raises `beats.sources.SourcesFailed` (a `DownloadError`) when no source gives the file,
    with one line per source tried and the way to get the file by hand.
    """
    target = model_dir(entry, cache_dir)
    if is_cached(entry, cache_dir):
        return target
    reason = sources.not_downloadable(entry)
    if reason is not None:  # said before anything is written
        raise sources.SourcesFailed(reason)
    with locked(entry, cache_dir) as root:
        if is_cached(entry, cache_dir):  # another process finished it meanwhile
            return target
        try:
            _obtain_and_install(entry, cache_dir, root, target, offline, convert, progress)
        finally:
            with contextlib.suppress(OSError):
                (root / ".downloads").rmdir()  # when empty
    return target


def _obtain_and_install(
    entry: RegistryEntry,
    cache_dir: str | Path | None,
    root: Path,
    target: Path,
    offline: str | None,
    convert: Callable[[Path, Path], None],
    progress: bool | None,
) -> None:
    got = sources.obtain(entry, root / ".downloads", offline=offline, progress=progress,
                         target=target)
    try:
        record = {"sha256": entry.sha256, "size": got.path.stat().st_size,
                  "verified": True, "source": got.origin, "how": "downloaded"}
        install(entry, cache_dir, lambda out: convert(got.path, out), record)
    except (MemoryError, OSError):
        raise  # a full disk, say: the verified file is kept for the next try
    except BeatsError as e:  # the file is not what its registry entry says
        _discard(got)
        raise InputError(f"the file of {entry.name} from {got.origin} matches the pinned "
                         f"sha256 but cannot be used, and was deleted: {e}") from e
    except Exception:  # a bug in beats: the file may be fine; start afresh next time
        _discard(got)
        raise
    if got.temporary:
        got.path.unlink(missing_ok=True)


def _discard(got: sources.Obtained) -> None:
    if got.temporary:
        got.path.unlink(missing_ok=True)
    else:
        mirrors.remove_cached(got.path)
