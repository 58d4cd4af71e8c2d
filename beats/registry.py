"""The registry of released checkpoints (``checkpoints/registry.json``) and name lookup.

Every entry has a ``name`` (Microsoft's file name without ``.pt``), a ``kind``
(``pretrained``, ``fine-tuned`` or ``tokenizer``), download ``urls``, ``sha256`` and
``size`` (null until a download has been verified), a ``license``, a one-line
``description``, short ``aliases`` and whether it is the ``default``. Names and aliases
match case-insensitively; ``default`` names the default entry.

Set ``BEATS_REGISTRY`` to the path of a file in the same format to use it instead of the
bundled one (a mirror inside a closed network, say).
"""

from __future__ import annotations

import difflib
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .labels import data_dir

KINDS = ("pretrained", "fine-tuned", "tokenizer")
REGISTRY_ENV = "BEATS_REGISTRY"


@dataclass(frozen=True)
class RegistryEntry:
    """One released checkpoint."""

    name: str
    kind: str
    urls: tuple[str, ...]
    sha256: str | None
    size: int | None
    license: str
    description: str
    aliases: tuple[str, ...] = ()
    default: bool = False


def registry_path() -> Path:
    """The registry file in use: ``$BEATS_REGISTRY`` if set, else the bundled one."""
    override = os.environ.get(REGISTRY_ENV)
    return Path(override).expanduser() if override else data_dir() / "registry.json"


def load_registry(path: str | Path | None = None) -> list[RegistryEntry]:
    """Read and check a registry file (default: `registry_path()`)."""
    return list(_load(Path(path) if path is not None else registry_path()))


@functools.lru_cache(maxsize=8)
def _load_cached(path: Path, mtime_ns: int) -> tuple[RegistryEntry, ...]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the checkpoint registry {path}: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("models"), list):
        raise ValueError(f"{path} is not a beats registry: expected an object with a 'models' list")
    entries = []
    for i, raw in enumerate(doc["models"]):
        try:
            entries.append(_entry(raw))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: model entry {i} is malformed: {e}") from None
    _check(entries, path)
    return tuple(entries)


def _load(path: Path) -> tuple[RegistryEntry, ...]:
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint registry at {path} (check ${REGISTRY_ENV})")
    return _load_cached(path.resolve(), path.stat().st_mtime_ns)


def _entry(raw: dict) -> RegistryEntry:
    if raw["kind"] not in KINDS:
        raise ValueError(f"kind {raw['kind']!r} is not one of {KINDS}")
    sha = raw.get("sha256")
    if sha is not None and (len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha)):
        raise ValueError(f"sha256 of {raw['name']!r} must be 64 lowercase hex digits or null")
    size = raw.get("size")
    if size is not None and (not isinstance(size, int) or size <= 0):
        raise ValueError(f"size of {raw['name']!r} must be a positive int or null")
    urls = tuple(raw["urls"])
    if not urls or not all(isinstance(u, str) and u for u in urls):
        raise ValueError(f"{raw['name']!r} needs at least one download url")
    return RegistryEntry(
        name=str(raw["name"]),
        kind=raw["kind"],
        urls=urls,
        sha256=sha,
        size=size,
        license=str(raw.get("license") or "unknown"),
        description=str(raw.get("description") or ""),
        aliases=tuple(str(a) for a in raw.get("aliases", ())),
        default=bool(raw.get("default", False)),
    )


def _check(entries: list[RegistryEntry], path: Path) -> None:
    seen: dict[str, str] = {}
    for e in entries:
        for key in (e.name, *e.aliases):
            other = seen.setdefault(key.lower(), e.name)
            if other != e.name:
                raise ValueError(f"{path}: name or alias {key!r} is used twice ({other}, {e.name})")
    defaults = [e.name for e in entries if e.default]
    if len(defaults) > 1:
        raise ValueError(f"{path}: more than one default model: {defaults}")


def available_models(kind: str | None = None) -> list[str]:
    """Names of the registered checkpoints, optionally of one ``kind``."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return [e.name for e in load_registry() if kind is None or e.kind == kind]


def default_model() -> RegistryEntry:
    """The registry's default checkpoint."""
    for e in load_registry():
        if e.default:
            return e
    raise ValueError(f"the registry {registry_path()} marks no default model: give a model "
                     "name (-m NAME), or mark one entry \"default\": true")


def find(name: str) -> RegistryEntry | None:
    """The entry whose name or alias equals ``name`` (any case), ``default`` for the default."""
    key = name.strip().lower()
    entries = load_registry()
    if key == "default":
        return next((e for e in entries if e.default), None)
    for e in entries:
        if key == e.name.lower() or key in (a.lower() for a in e.aliases):
            return e
    return None


def close_matches(name: str, n: int = 3) -> list[str]:
    """Registered names (and aliases, shown with their name) that resemble ``name``."""
    entries = load_registry()
    by_key: dict[str, str] = {}
    for e in entries:
        by_key[e.name.lower()] = e.name
        for a in e.aliases:
            by_key.setdefault(a.lower(), f"{a} ({e.name})")
    keys = difflib.get_close_matches(name.strip().lower(), list(by_key), n=n, cutoff=0.6)
    out: list[str] = []
    for k in keys:
        if by_key[k] not in out:
            out.append(by_key[k])
    return out
