"""``beats models``: the registered checkpoints, where each comes from and whether it is cached;
``--import FILE...`` installs files downloaded by hand; ``--check`` probes every source."""

from __future__ import annotations

import argparse
import json

from .. import cache
from ..errors import InputError
from ..hub import offline_reason
from ..registry import KINDS, RegistryEntry, Source, load_registry, registry_path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "models",
        help="list the released checkpoints, import downloaded files, check the sources",
        description="List the registered checkpoints (names and aliases work in "
        "BEATs.from_pretrained): the default one, whether beats downloads each by itself "
        "(from a mirror, checked against the pinned sha256) or it needs a browser and "
        "--import, and which are cached. --import installs files downloaded by hand; "
        "--check asks every source whether it answers, without downloading.",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--kind", choices=KINDS, help="only checkpoints of this kind")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="the beats cache to look in (default: $BEATS_CACHE or ~/.cache/beats)")
    p.add_argument("--import", dest="import_files", nargs="+", metavar="FILE",
                   help="install downloaded .pt files in the cache under their registry names "
                        "(each is identified by its size and sha256)")
    p.add_argument("--name", metavar="NAME",
                   help="with --import: the checkpoint a file is, for checkpoints without a "
                        "pinned digest (the tokenizers); its structure is checked and it is "
                        "marked unverified")
    p.add_argument("--check", action="store_true",
                   help="probe every source (HEAD or a one-byte request, honouring "
                        "HF_ENDPOINT) and exit 1 unless every checkpoint with a scripted "
                        "source answers")


def run(args: argparse.Namespace) -> int:
    if args.name is not None and not args.import_files:
        raise InputError("--name goes with --import FILE: it names the checkpoint a file is")
    if args.import_files and args.check:
        raise InputError("--import and --check are separate jobs: run them one at a time")
    if args.import_files:
        return _import(args)
    entries = [e for e in load_registry() if not args.kind or e.kind == args.kind]
    if args.check:
        return _check(entries)
    return _list(entries, args)


def source_kind(entry: RegistryEntry) -> str:
    """``mirror`` or ``url`` when beats downloads ``entry`` by itself, else ``browser``
    (only a page a person opens), or ``none``."""
    scripted = entry.scripted_sources
    if scripted:
        return "mirror" if any(s.type == "huggingface" for s in scripted) else "url"
    return "browser" if entry.browser_page else "none"


def _row(entry: RegistryEntry, cache_dir: str | None) -> dict:
    record = cache.read_source(entry, cache_dir) or {}
    cached = cache.is_cached(entry, cache_dir)
    return {
        "name": entry.name,
        "kind": entry.kind,
        "default": entry.default,
        # `default` names the default entry (`registry.find`), whatever its aliases say.
        "aliases": list(entry.aliases) + (["default"] if entry.default else []),
        "source": source_kind(entry),
        "digest": "pinned" if entry.pinned else "none",
        "cached": cached,
        "verified": cached and cache.is_verified(entry, cache_dir),
        "cache_path": str(cache.model_dir(entry, cache_dir)),
        "sha256": entry.sha256,
        "size": entry.size,
        "digest_sources": list(entry.digest_sources),
        "cached_sha256": record.get("sha256"),
        "cached_from": record.get("source"),
        "browser_page": entry.browser_page,
        "sources": [_source_dict(s) for s in entry.sources],
        "license": entry.license,
        "description": entry.description,
    }


def _source_dict(source: Source) -> dict:
    fields = ("type", "repo_id", "repo_type", "filename", "revision", "url", "note")
    out = {k: getattr(source, k) for k in fields if getattr(source, k) not in (None, "")}
    if source.type != "huggingface":
        out.pop("repo_type", None)
    return out


def _list(entries: list[RegistryEntry], args: argparse.Namespace) -> int:
    rows = [_row(e, args.cache_dir) for e in entries]
    root = cache.cache_root(args.cache_dir)
    if args.json:
        doc = {"registry": str(registry_path()), "cache_dir": str(root), "models": rows}
        print(json.dumps(doc, indent=2))
        return 0
    header = ("NAME", "KIND", "DEFAULT", "CACHED", "VERIFIED", "SOURCE", "DIGEST", "ALIASES")
    table = [header] + [
        (r["name"], r["kind"], "*" if r["default"] else "", "yes" if r["cached"] else "no",
         ("yes" if r["verified"] else "no") if r["cached"] else "-", r["source"], r["digest"],
         ", ".join(r["aliases"]))
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:
        cells = [cell.ljust(w) for cell, w in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]))
    cached = sum(r["cached"] for r in rows)
    print(f"\n{len(rows)} checkpoints, {cached} cached in {root}")
    print(f"registry: {registry_path()}")
    print("SOURCE mirror: beats downloads it by itself and checks it against the pinned sha256. "
          "browser: open its page (`beats models --json` lists it) in a browser, then run "
          "`beats models --import FILE`; with DIGEST none (no digest known) add --name NAME, "
          "and the file is checked by its structure only (VERIFIED no).")
    return 0


def _import(args: argparse.Namespace) -> int:
    from ..importer import import_checkpoints

    for done in import_checkpoints(args.import_files, name=args.name, cache_dir=args.cache_dir):
        how = ("sha256 verified" if done.verified else
               "unverified: no digest is known, its structure was checked")
        print(f"{done.file}: installed as {done.entry.name} ({how}) in {done.folder}; "
              f"use it with -m {done.entry.name}")
    return 0


def _check(entries: list[RegistryEntry]) -> int:
    from .. import mirrors, sources

    reason = offline_reason()
    if reason is not None:
        raise InputError(f"--check asks the sources over the network, and downloads are off "
                         f"({reason})")
    print(f"Hugging Face endpoint: {mirrors.hub_endpoint()}")
    unreachable, counted = [], 0
    for entry in entries:
        print(entry.name + ("" if entry.pinned else " (no pinned digest: not downloaded)"))
        answered = False
        for source, probe in sources.check(entry):
            if probe is None:
                print(f"  -     {source.label()}: not probed")
                continue
            print(f"  {'ok' if probe.ok else 'FAIL':5} {source.label()}: {probe.text}")
            answered = answered or (probe.ok and source in entry.scripted_sources)
        if entry.scripted_sources:
            counted += 1
            if not answered:
                unreachable.append(entry.name)
    print(f"\n{counted - len(unreachable)} of {counted} checkpoints with a scripted source "
          "answer" + (f"; unreachable: {', '.join(unreachable)}" if unreachable else "")
          + f". {sum(not e.scripted_sources for e in entries)} need a browser and --import.")
    return 1 if unreachable else 0
