"""The download cache of registry checkpoints.

Layout, under ``cache_dir`` or ``$BEATS_CACHE`` (default ``$XDG_CACHE_HOME/beats``, that is
``~/.cache/beats``)::

    BEATs_iter3_plus_AS2M/          one folder per registry name, in save_pretrained format
        config.json
        model.safetensors
        labels.json                 fine-tuned models
        source.json                 where it came from: url, sha256 and size of the .pt
    .downloads/NAME.pt.part         a download in progress (resumed by the next try)
    .locks/NAME.lock                held while NAME is downloaded and converted

A Microsoft ``.pt`` is downloaded once, converted once, and deleted; every later load reads
the safetensors folder and never unpickles anything. The folder appears complete or not at
all (it is built under a temporary name and renamed).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from .download import ChecksumError, DownloadError, download, sha256_file, short_url
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
    """The ``source.json`` record of a cached entry (url, sha256, size), if any."""
    try:
        return json.loads((model_dir(entry, cache_dir) / SOURCE_NAME).read_text())
    except (OSError, ValueError):
        return None


def fetch(
    entry: RegistryEntry,
    cache_dir: str | Path | None,
    *,
    offline: str | None,
    convert: Callable[[Path, Path], None],
    progress: bool | None = None,
) -> Path:
    """Return ``entry``'s cached folder, downloading and converting it first if needed.

    Args:
        offline: None when downloads are allowed, else why not (for the error message).
        convert: ``convert(pt_path, out_dir)`` writes the save_pretrained files of a ``.pt``.
    """
    target = model_dir(entry, cache_dir)
    if is_cached(entry, cache_dir):
        return target
    if offline is not None:
        raise FileNotFoundError(
            f"{entry.name} is not in the beats cache ({target}) and downloads are off "
            f"({offline}). Load it once with network access to cache it, or download "
            f"{short_url(entry.urls[0])} yourself and run `beats convert FILE {target}`"
        )
    root = cache_root(cache_dir)
    (root / ".locks").mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / ".locks" / f"{entry.name}.lock")):
        if is_cached(entry, cache_dir):  # another process finished it meanwhile
            return target
        try:
            pt, url, digest = _download(entry, root / ".downloads" / f"{entry.name}.pt", progress)
        except ChecksumError:
            raise
        except DownloadError as e:
            raise DownloadError(
                f"{e}. Check the network connection (and HTTPS_PROXY behind a proxy); on a "
                f"machine without access, download {short_url(entry.urls[0])} elsewhere, copy "
                f"it here and run `beats convert FILE {target}`"
            ) from None
        staging = temporary_folder(root, f".{entry.name}.")
        try:
            try:
                convert(pt, staging)
            except Exception as e:
                pt.unlink(missing_ok=True)
                raise ValueError(
                    f"the download of {entry.name} ({short_url(url)}) cannot be used and was "
                    f"deleted: {e}"
                ) from e
            record = {
                "name": entry.name,
                "url": short_url(url),
                "sha256": digest,
                "size": pt.stat().st_size,
                "sha256_verified": entry.sha256 is not None,
                "downloaded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            (staging / SOURCE_NAME).write_text(json.dumps(record, indent=2) + "\n")
            if target.exists():  # an incomplete folder left by hand or by an old version
                shutil.rmtree(target)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        pt.unlink()
    return target


def _download(entry: RegistryEntry, dest: Path, progress: bool | None) -> tuple[Path, str, str]:
    """Download ``entry`` to ``dest`` from its first URL that works: (path, url, sha256)."""
    if dest.is_file():  # downloaded earlier but not converted (interrupted between the two)
        digest = sha256_file(dest)
        if entry.sha256 is None or digest == entry.sha256:
            return dest, entry.urls[0], digest
        dest.unlink()
    errors: list[DownloadError] = []
    for url in entry.urls:
        try:
            digest = download(url, dest, sha256=entry.sha256, size=entry.size,
                              progress=progress, desc=entry.name)
            return dest, url, digest
        except DownloadError as e:
            errors.append(e)
    if len(errors) == 1:
        raise errors[0]
    # Every mirror failed: keep the last error's type (a checksum error stays one).
    raise type(errors[-1])(f"cannot download {entry.name}: " + "; ".join(map(str, errors)))
