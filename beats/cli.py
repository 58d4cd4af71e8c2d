"""The ``beats`` command line (also ``python -m beats``).

Each subcommand lives in ``beats/commands/<name>.py`` with ``add_parser(subparsers)`` and
``run(args) -> int``; this module only dispatches, so subcommands import their heavy
dependencies when they run.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from . import __version__

# Subcommand modules under beats/commands/, in the order `beats --help` lists them.
SUBCOMMANDS: list[str] = [
    "extract", "tag", "tokenize", "probe", "finetune", "models", "convert",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="beats", description="BEATs audio embeddings: exact, batch-invariant, fast."
    )
    parser.add_argument("--version", action="version", version=f"beats {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"beats.commands.{name}")
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # as typed (--config-file)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    module = importlib.import_module(f"beats.commands.{args.command.replace('-', '_')}")
    try:
        return int(module.run(args) or 0)
    except BrokenPipeError:  # `beats models | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
