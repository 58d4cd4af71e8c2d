"""The registry of released checkpoints (``checkpoints/registry.json``) and name lookup.

Every entry has a ``name`` (Microsoft's file name without ``.pt``), a ``kind``
(``pretrained``, ``fine-tuned`` or ``tokenizer``), the pinned ``size`` (bytes) and
``sha256`` of the file (both, or neither) with the public ``digest_sources`` they were read
from, its ``sources`` in order of preference, a ``license``, a one-line ``description``,
short ``aliases`` and whether it is the ``default``. Names and aliases match case-insensitively;
``default`` names the default entry.

A source is one of:

- ``{"type": "huggingface", "repo_id", "repo_type", "filename", "revision"}``: a file in a
  Hugging Face Hub repo, fetched with huggingface_hub (``revision`` null: ``main``);
- ``{"type": "url", "url"}``: a plain HTTP(S) address;
- ``{"type": "browser", "url"}``: a page that only a browser can open (Microsoft's OneDrive
  shares). beats never fetches it; messages name it as the way to get the file by hand.

A file from a mirror is trusted only through the pinned digest: an entry without
``sha256`` and ``size`` (the acoustic tokenizers, whose digests are not known) is never
downloaded automatically, whatever its sources; it is installed by hand with
``beats models --import FILE --name NAME``, which checks the file's structure against
``architecture`` (config keys such as ``encoder_layers``) and marks it unverified.

The bundled file is format 2, built by ``checkpoints/build_registry.py``. Set
``BEATS_REGISTRY`` to the path of a file in format 2, or in format 1 (entries with a
``urls`` list instead of ``sources``), to use it instead of the bundled one.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError, NotFoundError
from .labels import data_dir

KINDS = ("pretrained", "fine-tuned", "tokenizer")
SOURCE_TYPES = ("huggingface", "url", "browser")
REPO_TYPES = ("model", "dataset", "space")
REGISTRY_ENV = "BEATS_REGISTRY"
FORMATS = (1, 2)
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class Source:
    """Where a checkpoint's file can be had.

    ``type`` is ``huggingface`` (``repo_id``, ``repo_type``, ``filename``, ``revision``),
    ``url`` or ``browser`` (``url``). ``note`` says who uses or cites it.
    """

    type: str
    url: str | None = None
    repo_id: str | None = None
    repo_type: str = "model"
    filename: str | None = None
    revision: str | None = None
    note: str = ""

    @property
    def scripted(self) -> bool:
        """Whether code may fetch it (everything but a browser-only page)."""
        return self.type != "browser"

    def label(self) -> str:
        """How messages name the source: ``owner/name (Hugging Face, main) file.pt``."""
        if self.type == "huggingface":
            kind = "" if self.repo_type == "model" else f" {self.repo_type}"
            revision = self.revision[:12] if self.revision else "main"
            return f"{self.repo_id} (Hugging Face{kind}, {revision}) {self.filename}"
        if self.type == "browser":
            return f"{self.url} (browser only)"
        return (self.url or "").split("?", 1)[0]  # a query string can hold a signature


@dataclass(frozen=True)
class RegistryEntry:
    """One released checkpoint."""

    name: str
    kind: str
    sources: tuple[Source, ...]
    sha256: str | None
    size: int | None
    license: str
    description: str
    aliases: tuple[str, ...] = ()
    default: bool = False
    digest_sources: tuple[str, ...] = ()
    architecture: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def pinned(self) -> bool:
        """Whether the registry pins the file's sha256 (so mirrors can be trusted); format 2
        pins the size with it, format 1 may leave the size out."""
        return self.sha256 is not None

    @property
    def scripted_sources(self) -> tuple[Source, ...]:
        """The sources beats fetches by itself: none unless the digest is pinned."""
        return tuple(s for s in self.sources if s.scripted) if self.pinned else ()

    @property
    def browser_page(self) -> str | None:
        """The first browser-only page, where a person can get the file by hand."""
        return next((s.url for s in self.sources if s.type == "browser"), None)

    @property
    def urls(self) -> tuple[str, ...]:
        """The plain URL sources."""
        return tuple(s.url for s in self.sources if s.type == "url" and s.url)


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
        raise InputError(f"cannot read the checkpoint registry {path}: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("models"), list):
        raise InputError(f"{path} is not a beats registry: expected an object with a 'models' list")
    version = doc.get("format_version", 1)
    if version not in FORMATS:
        raise InputError(f"{path}: format_version {version!r} is not one beats reads {FORMATS}; "
                         "a newer beats may read it")
    entries = []
    for i, raw in enumerate(doc["models"]):
        try:
            entries.append(_entry(raw, version))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise InputError(f"{path}: model entry {i} is malformed: {e}") from None
    _check(entries, path)
    return tuple(entries)


def _load(path: Path) -> tuple[RegistryEntry, ...]:
    if not path.is_file():
        raise NotFoundError(f"no checkpoint registry at {path} (check ${REGISTRY_ENV})")
    return _load_cached(path.resolve(), path.stat().st_mtime_ns)


def _entry(raw: dict, version: int) -> RegistryEntry:
    name = raw["name"]
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise InputError(f"name {name!r} must be a non-empty file name")
    if raw["kind"] not in KINDS:
        raise InputError(f"kind {raw['kind']!r} is not one of {KINDS}")
    sha = raw.get("sha256")
    if sha is not None and (not isinstance(sha, str) or len(sha) != 64 or set(sha) - _HEX):
        raise InputError(f"sha256 of {name!r} must be 64 lowercase hex digits or null")
    size = raw.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
        raise InputError(f"size of {name!r} must be a positive int or null")
    if version >= 2 and (sha is None) != (size is None):
        raise InputError(f"{name!r} must give both sha256 and size, or neither")
    if version == 1:
        urls = raw["urls"]
        if not urls or not all(isinstance(u, str) and u for u in urls):
            raise InputError(f"{name!r} needs at least one download url")
        sources = tuple(Source(type="url", url=u) for u in urls)
    else:
        sources = tuple(_source(s, name) for s in raw["sources"])
        if not sources:
            raise InputError(f"{name!r} needs at least one source")
    architecture = raw.get("architecture") or {}
    if not isinstance(architecture, dict):
        raise InputError(f"architecture of {name!r} must be an object of config keys")
    return RegistryEntry(
        name=name,
        kind=raw["kind"],
        sources=sources,
        sha256=sha,
        size=size,
        license=str(raw.get("license") or "unknown"),
        description=str(raw.get("description") or ""),
        aliases=tuple(str(a) for a in raw.get("aliases", ())),
        default=bool(raw.get("default", False)),
        digest_sources=tuple(str(s) for s in raw.get("digest_sources", ())),
        architecture=dict(architecture),
    )


def _source(raw: dict, name: str) -> Source:
    kind = raw["type"]
    if kind not in SOURCE_TYPES:
        raise InputError(f"source type {kind!r} of {name!r} is not one of {SOURCE_TYPES}")
    note = str(raw.get("note") or "")
    if kind == "huggingface":
        repo_type = raw.get("repo_type") or "model"
        if repo_type not in REPO_TYPES:
            raise InputError(f"repo_type {repo_type!r} of {name!r} is not one of {REPO_TYPES}")
        repo_id, filename = raw["repo_id"], raw["filename"]
        if not (isinstance(repo_id, str) and repo_id.count("/") == 1 and filename):
            raise InputError(f"a Hugging Face source of {name!r} needs repo_id (owner/name) "
                             "and filename")
        revision = raw.get("revision")
        return Source(type=kind, repo_id=repo_id, repo_type=repo_type, filename=str(filename),
                      revision=str(revision) if revision else None, note=note)
    url = raw["url"]
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise InputError(f"a {kind} source of {name!r} needs an http(s) url, got {url!r}")
    return Source(type=kind, url=url, note=note)


def _check(entries: list[RegistryEntry], path: Path) -> None:
    seen: dict[str, str] = {}
    for e in entries:
        for key in (e.name, *e.aliases):
            other = seen.setdefault(key.lower(), e.name)
            if other != e.name:
                raise InputError(f"{path}: name or alias {key!r} is used twice ({other}, {e.name})")
    defaults = [e.name for e in entries if e.default]
    if len(defaults) > 1:
        raise InputError(f"{path}: more than one default model: {defaults}")


def available_models(kind: str | None = None) -> list[str]:
    """Names of the registered checkpoints, optionally of one ``kind``."""
    if kind is not None and kind not in KINDS:
        raise InputError(f"kind must be one of {KINDS}, got {kind!r}")
    return [e.name for e in load_registry() if kind is None or e.kind == kind]


def default_model() -> RegistryEntry:
    """The registry's default checkpoint."""
    for e in load_registry():
        if e.default:
            return e
    raise InputError(f"the registry {registry_path()} marks no default model: give a model "
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
