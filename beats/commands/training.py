"""What the training commands (``finetune``, ``pretrain``, ``distill``) share on the command
line: one option per field of their `beats.train.config.TrainConfig` subclass (made by
`beats.commands.options.add_options`), ``--config-file`` to repeat a run, the AUDIO
arguments of the trainers on unlabelled audio, and building the config.

The config is built from layers, the later winning: the dataclass's defaults, a preset's
(``pretrain --config tiny``), the ``--config-file``'s settings, and the options given on
the command line. The command line is parsed once: options not given are absent from the
parsed arguments (`beats.commands.options.given`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from ..errors import InputError
from .options import Option, add_options, build_config, given

C = TypeVar("C")


def add_config_options(p: argparse.ArgumentParser, cls: type,
                       notes: Mapping[str, str] | None = None) -> list[Option]:
    """``--config-file`` and an option per field of ``cls`` (absent unless given)."""
    p.add_argument("--config-file", help="repeat a run: an OUT/config.json (options given on "
                                         "the command line override it)")
    return add_options(p, cls, layered=True, notes=notes)


def read_config_file(path: str | None) -> dict[str, Any]:
    """The record of a run's ``OUT/config.json`` ({} without one); its ``config`` holds
    the settings (``resume`` left out: a repeated run is a new one unless --resume)."""
    if not path:
        return {}
    try:
        record = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"--config-file {path} is not JSON ({e})") from None
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise InputError(f"--config-file {path} is not a beats training config.json (no "
                         "'config')")
    record["config"] = {k: v for k, v in record["config"].items() if k != "resume"}
    return record


def record_audio(record: Mapping[str, Any]) -> list[str] | None:
    """The AUDIO inputs a config.json names (``audio``; ``inputs`` in pre-training runs
    written before both trainers used one name)."""
    audio = record.get("audio", record.get("inputs"))
    return list(audio) if audio else None


def config_from_layers(cls: type[C], args: argparse.Namespace, record: Mapping[str, Any],
                       base: Mapping[str, Any] | None = None) -> C:
    """``cls`` from ``base`` < the config file's settings < the options given; an
    impossible value names its option."""
    values = {**(base or {}), **record.get("config", {}), **given(args, cls)}
    return build_config(cls, values, lambda v: cls.from_dict(v))  # type: ignore[attr-defined]


def add_audio_arguments(p: argparse.ArgumentParser) -> None:
    """AUDIO... (files, folders, .txt/.lst lists: `beats.train.unlabelled.find_audio`) and
    ``--heldout`` (the same kinds, repeatable) for trainers on unlabelled audio."""
    p.add_argument("audio", nargs="*", metavar="AUDIO",
                   help="audio files, folders (searched recursively) or .txt/.lst lists of "
                        "paths, as beats extract takes them (optional with --config-file)")
    p.add_argument("--heldout", action="append", default=None, metavar="AUDIO",
                   help="held-out audio (file, folder or list; repeatable) scored every "
                        "--eval-every steps on fixed crops (and masks, for pre-training) "
                        "(default: none)")


def report_failures(command: str, fit: Any, out: Path) -> int:
    """Say how many files were skipped (listed in OUT/failed.jsonl) and whether some failed
    with an unexpected error (tracebacks in OUT/errors.log); the exit code: 1 when files
    were skipped, else 0. ``fit``: the run's `beats.train.loop.FitResult`."""
    from ..failures import ERRORS_LOG, unexpected_notice

    if fit.failed:
        print(f"beats {command}: {len(fit.failed)} file(s) could not be read and were "
              f"skipped (see {out / 'failed.jsonl'})", file=sys.stderr)
    notice = unexpected_notice(command, fit.unexpected, out / ERRORS_LOG)
    if notice:
        print(notice, file=sys.stderr)
    return 1 if fit.failed else 0
