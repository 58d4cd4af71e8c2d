"""Installing checkpoint files obtained by hand into the beats cache (``beats models --import``).

A Microsoft ``.pt`` downloaded in a browser (from the OneDrive page the registry names) is
identified by its size and sha256 against the registry's pinned digests, converted to
safetensors and installed under its registry name, so ``-m NAME`` and
``BEATs.from_pretrained(NAME)`` then work offline. A file that matches no entry is refused
and nothing is written: a file named like a checkpoint can hold other bytes.

For an entry without a pinned digest (the acoustic tokenizers) the file is named with
``name=``: it is accepted when its structure matches the entry (the kind of checkpoint and
the architecture the registry lists, such as 12 layers and 1024 codes of width 256), and
the cache records it as unverified.

Example (``Tokenizer_iter3_plus_AS2M.pt`` saved from its OneDrive page)::

    from beats.importer import import_checkpoint
    import_checkpoint("Downloads/Tokenizer_iter3_plus_AS2M.pt", name="Tokenizer_iter3_plus_AS2M")
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from . import cache, registry
from .download import looks_like_html, sha256_file
from .errors import InputError
from .registry import RegistryEntry


@dataclass(frozen=True)
class Imported:
    """A file installed in the cache: which entry, where, and whether its digest was pinned."""

    file: Path
    entry: RegistryEntry
    folder: Path
    verified: bool


def identify(path: str | os.PathLike) -> RegistryEntry:
    """The registry entry whose pinned size and sha256 are those of the file at ``path``.

    Raises `InputError` when none is, saying why (no checkpoint of that size, or one of that
    size but other bytes).
    """
    path = Path(path)
    _check_readable(path)
    size = path.stat().st_size
    entries = registry.load_registry()
    same_size = [e for e in entries if e.pinned and e.size in (None, size)]
    refused = f"; nothing was written. {_HINT}"
    if not same_size:
        raise InputError(f"{path} ({size} bytes) matches no checkpoint in the registry "
                         f"({registry.registry_path()}): none has that size" + refused)
    digest = sha256_file(path)
    for entry in same_size:
        if entry.sha256 == digest:
            return entry
    names = ", ".join(e.name for e in same_size if e.size == size) or "none"
    raise InputError(f"{path} ({size} bytes, sha256 {digest}) matches no checkpoint in the "
                     f"registry ({registry.registry_path()}): it has the size of {names} but "
                     "other bytes, so it is not that file" + refused)


_HINT = ("Give a file saved from a page `beats models` names; a tokenizer, whose digest is "
         "not known, needs --name NAME")


def _check_readable(path: Path) -> None:
    if not path.is_file():
        raise InputError(f"no file at {path}: give the path of a downloaded .pt file")
    with open(path, "rb") as f:
        if looks_like_html(f.read(512)):
            raise InputError(f"{path} is an HTML page, not a checkpoint: the browser saved the "
                             "page instead of the file; nothing was written")


def import_checkpoints(
    files: list[str | os.PathLike],
    *,
    name: str | None = None,
    cache_dir: str | Path | None = None,
) -> list[Imported]:
    """Identify every file first, then convert and install each; see `import_checkpoint`.

    Nothing is written unless every file is identified.
    """
    paths = [Path(f) for f in files]
    if not paths:
        raise InputError("give at least one file to import")
    if name is not None:
        if len(paths) != 1:
            raise InputError(f"--name names one file, and {len(paths)} were given: import "
                             "them one at a time")
        _check_readable(paths[0])
        chosen = [_named(name)]
    else:
        chosen = [identify(p) for p in paths]  # every file, before anything is written
    done = []
    for path, entry in zip(paths, chosen, strict=True):
        model = _load(path, entry, check_structure=name is not None)
        verified = name is None
        record = {"sha256": entry.sha256 if verified else sha256_file(path),
                  "size": path.stat().st_size, "verified": verified,
                  "source": f"imported from {path.resolve()}", "how": "imported"}
        if not verified:
            record["checked"] = "structure only (kind and architecture): no digest is known"
        with cache.locked(entry, cache_dir):
            folder = cache.install(entry, cache_dir, model.save_pretrained, record)
        done.append(Imported(path, entry, folder, verified))
        del model
    return done


def import_checkpoint(
    file: str | os.PathLike,
    *,
    name: str | None = None,
    cache_dir: str | Path | None = None,
) -> Imported:
    """Install a downloaded checkpoint file in the beats cache under its registry name.

    Args:
        file: a Microsoft ``.pt`` file (read with ``weights_only=True``: no code runs).
        name: only for an entry without a pinned digest (the tokenizers): install the file
            under that name when its structure matches the entry; it is marked unverified.
        cache_dir: the beats cache (default ``$BEATS_CACHE`` or ``~/.cache/beats``).

    Raises `InputError` (nothing written) when the file matches no entry, or ``name`` is
    given for an entry with a pinned digest, or the file's structure does not match.
    """
    return import_checkpoints([file], name=name, cache_dir=cache_dir)[0]


def _named(name: str) -> RegistryEntry:
    entry = registry.find(name)
    if entry is None:
        matches = registry.close_matches(name)
        hint = f" Did you mean: {', '.join(matches)}?" if matches else ""
        raise InputError(f"--name {name!r} is not a registered checkpoint.{hint} `beats "
                         "models` lists them")
    if entry.pinned:
        raise InputError(f"{entry.name} has a pinned sha256, so its file is identified by size "
                         "and digest: import it without --name (--name is only for checkpoints "
                         "without a known digest, the tokenizers)")
    return entry


def _load(path: Path, entry: RegistryEntry, check_structure: bool):
    """The model in ``path``, built as ``entry``'s kind; with ``check_structure``, refused
    unless its kind and architecture are ``entry``'s."""
    from . import checkpoint
    from .model import BEATs
    from .tokenizer import BEATsTokenizer

    cls = BEATsTokenizer if entry.kind == "tokenizer" else BEATs
    try:
        model = cls.from_microsoft_checkpoint(checkpoint.load_pt(path), source=str(path))
    except ValueError as e:
        raise InputError(f"{path} cannot be installed as {entry.name}: {e}; nothing was "
                         "written") from None
    if not check_structure:
        return model
    problems = []
    if entry.kind != "tokenizer" and model.cfg.finetuned_model != (entry.kind == "fine-tuned"):
        has = "a fine-tuned" if model.cfg.finetuned_model else "a pre-trained"
        problems.append(f"it is {has} encoder and {entry.name} is {entry.kind}")
    for key, want in sorted(entry.architecture.items()):
        got = getattr(model.cfg, key, model.cfg.extra.get(key) if model.cfg.extra else None)
        if got != want:
            problems.append(f"{key} is {got}, {entry.name} has {want}")
    if problems:
        raise InputError(f"{path} is not {entry.name}: " + "; ".join(problems)
                         + "; nothing was written")
    return model
