"""``beats models``: the registry of released checkpoints, and which of them are cached."""

from __future__ import annotations

import argparse
import json

from .. import cache
from ..registry import KINDS, load_registry, registry_path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "models",
        help="list the released checkpoints and which are cached",
        description="List the registered checkpoints (names and aliases work in "
        "BEATs.from_pretrained), the default one, and which are in the beats cache.",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--kind", choices=KINDS, help="only checkpoints of this kind")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="the beats cache to look in (default: $BEATS_CACHE or ~/.cache/beats)")


def run(args: argparse.Namespace) -> int:
    rows = []
    for entry in load_registry():
        if args.kind and entry.kind != args.kind:
            continue
        source = cache.read_source(entry, args.cache_dir) or {}
        rows.append({
            "name": entry.name,
            "kind": entry.kind,
            "default": entry.default,
            # `default` names the default entry (`registry.find`), whatever its aliases say.
            "aliases": list(entry.aliases) + (["default"] if entry.default else []),
            "cached": cache.is_cached(entry, args.cache_dir),
            "cache_path": str(cache.model_dir(entry, args.cache_dir)),
            "sha256": entry.sha256,
            "downloaded_sha256": source.get("sha256"),
            "size": entry.size,
            "license": entry.license,
            "description": entry.description,
            "urls": list(entry.urls),
        })
    root = cache.cache_root(args.cache_dir)
    if args.json:
        doc = {"registry": str(registry_path()), "cache_dir": str(root), "models": rows}
        print(json.dumps(doc, indent=2))
        return 0
    header = ("NAME", "KIND", "DEFAULT", "CACHED", "ALIASES")
    table = [header] + [
        (r["name"], r["kind"], "*" if r["default"] else "", "yes" if r["cached"] else "no",
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
    return 0
