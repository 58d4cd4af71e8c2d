"""Finding input audio files and mapping them to output paths inside an output folder."""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .audio import AUDIO_EXTENSIONS
from .errors import BeatsError, InputError


@dataclass(frozen=True)
class InputFile:
    """An input and its key: the relative path its outputs mirror (no suffix, '/'-separated)."""

    path: Path
    key: str


def _walk(folder: Path, extensions: tuple[str, ...]) -> Iterator[Path]:
    for root, dirs, names in os.walk(folder, followlinks=False):
        dirs.sort()
        for name in sorted(names):
            if name.lower().endswith(extensions) and not name.startswith("."):
                yield Path(root) / name


def safe_key(relative: Path) -> str:
    """'a/b/c.wav' -> 'a/b/c.wav' with '..', absolute and empty parts refused."""
    parts = [p for p in relative.parts if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts) or relative.is_absolute():
        raise InputError(f"{relative}: input paths must stay below their folder")
    return "/".join(parts)


def discover_inputs(
    inputs: Iterable[str | os.PathLike], extensions: tuple[str, ...] = AUDIO_EXTENSIONS
) -> list[InputFile]:
    """Files, folders (searched recursively by extension) and list files, in a stable order.

    A list file is a text file whose name ends in ``.txt`` or ``.lst``: one path per line,
    ``#`` starts a comment. A relative path in a list file is relative to the folder that
    holds the list file (not to the current directory), so a list keeps working when the
    command runs elsewhere. Each input gets a key that mirrors its place: relative to the
    folder it was found in, the list file's folder (or its own name for a listed file
    outside that folder), or its own name for a plain file. Duplicate keys are refused
    with both paths. File names need not be valid UTF-8 (they are kept as the OS gives
    them; a list file is read as UTF-8 with undecodable bytes kept the same way).
    """
    found: list[InputFile] = []
    for item in inputs:
        path = Path(os.fsdecode(item))
        if path.is_dir():
            for file in _walk(path, extensions):
                found.append(InputFile(file, safe_key(file.relative_to(path))))
        elif path.suffix.lower() in (".txt", ".lst") and path.is_file():
            base = path.parent.resolve()
            text = path.read_bytes().decode("utf-8", "surrogateescape")
            for number, line in enumerate(text.splitlines(), start=1):
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                full = Path(line) if Path(line).is_absolute() else path.parent / line
                if full.is_dir():
                    raise InputError(f"{path}:{number}: {line} is a folder; list files only")
                try:
                    key = safe_key(full.resolve().relative_to(base))
                except ValueError:  # outside the list's folder: keep the file name
                    key = safe_key(Path(full.name))
                found.append(InputFile(full, key))
        else:  # a file, even a missing one: the run records it as failed
            found.append(InputFile(path, safe_key(Path(path.name))))
    seen: dict[str, Path] = {}
    for f in found:
        if f.key in seen and seen[f.key] != f.path:
            raise InputError(
                f"two inputs map to the same output {f.key!r}: {seen[f.key]} and {f.path}; "
                "pass their common parent folder instead"
            )
        seen[f.key] = f.path
    unique = {f.key: f for f in found}
    return list(unique.values())


def printable(text: str) -> str:
    """``text`` with the bytes of a name that is not valid UTF-8 shown as ``\\xNN``: for
    messages, and for safetensors tensor names, which must be valid UTF-8."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def output_path(output_dir: Path, key: str, suffix: str) -> Path:
    """``output_dir / (key + suffix)``, e.g. ``out/birds/a.wav.npy``, always inside output_dir.

    Keeping the audio suffix in the name keeps ``a.wav`` and ``a.flac`` apart.
    """
    root = output_dir.resolve()
    target = root / (key + suffix)
    target = target.parent.resolve() / target.name
    if root not in target.parents:
        raise InputError(f"output for {key!r} would leave the output folder {root}")
    return target


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; on success it is flushed to disk and
    renamed to ``path``, on failure deleted.

    Readers see either the old file or the complete new one, never a partial write. The
    file gets the permissions the umask gives new files (as ``open`` does), not the
    private 0600 of `tempfile.mkstemp`. A write that fails because the disk is full raises
    ``OSError(ENOSPC)`` naming ``path``, whatever the writing library raised.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_name(path.parent, f".{path.name}.", ".tmp",
                    lambda p: os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)))
    mode = stat.S_IMODE(tmp.stat().st_mode)  # 0666 less the umask, as the system applied it
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
            if stat.S_IMODE(os.fstat(f.fileno()).st_mode) != mode:
                os.chmod(tmp, mode)  # safetensors writes its files 0600 whatever the umask
        os.replace(tmp, path)
    except Exception as e:
        full = _disk_full(path, e)
        if full is None:
            raise
        raise full from e
    finally:
        tmp.unlink(missing_ok=True)


def temporary_folder(parent: Path, prefix: str) -> Path:
    """A new empty folder in ``parent`` (created if needed) with a unique name starting
    with ``prefix``, with the permissions the umask gives new folders (not `mkdtemp`'s
    private 0700): build something there, then rename it into place."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    return _new_name(parent, prefix, "", lambda p: os.mkdir(p, 0o777))


# What `atomic_path` names its temporary files: ``.<name>.<12 hex digits>.tmp``.
_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete the temporary files `atomic_path` left under ``folder`` (a run killed while
    writing); returns how many. Only for a caller holding the folder's `folder_lock`: then
    no live writer owns them."""
    removed = 0
    for root, _dirs, names in os.walk(folder):
        for name in names:
            if _TEMPORARY.match(name):
                Path(root, name).unlink(missing_ok=True)
                removed += 1
    return removed


def _new_name(parent: Path, prefix: str, suffix: str, create: Callable[[Path], None]) -> Path:
    """``create`` a path ``parent/prefix<random>suffix`` that did not exist; return it."""
    for _ in range(100):
        candidate = parent / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            create(candidate)
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"cannot find a free temporary name in {parent}")


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _disk_full(path: Path, error: Exception) -> OSError | None:
    """An ``OSError(ENOSPC)`` naming ``path`` if ``error`` came from a full disk, else None.

    Libraries report a full disk in their own ways (numpy: "1152 requested and 992
    written", safetensors: its own error type), so when a write fails and the disk has
    (almost) no space left, the disk is taken to be the cause.
    """
    if isinstance(error, OSError) and error.errno in _NO_SPACE:
        if error.filename is not None:
            return None
        return OSError(error.errno, os.strerror(error.errno), str(path))
    try:
        stat = os.statvfs(path.parent)
    except (OSError, AttributeError):  # gone, or no statvfs (Windows)
        return None
    no_inodes = stat.f_files > 0 and stat.f_favail == 0  # some file systems report 0 of 0
    if stat.f_bavail * stat.f_frsize >= _NEARLY_FULL_BYTES and not no_inodes:
        return None
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


_NEARLY_FULL_BYTES = 1 << 20


@contextmanager
def atomic_write(path: Path, mode: str = "wb") -> Iterator[IO]:
    """`atomic_path`, opened: ``with atomic_write(p, "w") as f: f.write(...)``."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f


LOCK_NAME = ".beats.lock"


class FolderBusyError(BeatsError, RuntimeError):
    """Another process is writing into the same output folder."""


@contextmanager
def folder_lock(folder: str | os.PathLike, command: str = "beats") -> Iterator[Path]:
    """Hold ``folder/.beats.lock`` for the duration of a run; yields the folder.

    A second run into the same folder fails at once with `FolderBusyError` instead of
    interleaving its writes with the first. The lock is an OS file lock (``flock``), so the
    operating system releases it when the holding process exits or is killed: a dead run
    never keeps its folder locked, and the lock file left behind is harmless.
    """
    from filelock import FileLock, Timeout

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / LOCK_NAME))
    try:
        lock.acquire(blocking=False)
    except Timeout:
        raise FolderBusyError(
            f"another {command} run is writing into {folder} (it holds {folder / LOCK_NAME}); "
            "wait for it to finish or choose another output folder"
        ) from None
    try:
        yield folder
    finally:
        lock.release()
