"""What the training commands (``finetune``, ``pretrain``, ``distill``) share on the command
line: options that map one to one onto fields of a `beats.train.config.TrainConfig`
subclass (shown with their defaults), ``--config-file`` to repeat a run, and building the
config from the parsed arguments.

An option is ``(config field, flags, type, help)``; the type ``"flag"`` is a switch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .arguments import non_negative_float, non_negative_int, positive_float, positive_int

Option = tuple[str, tuple[str, ...], Any, str]
C = TypeVar("C")

# The loop's own settings (`TrainConfig`), in the order --help lists them.
LENGTH: list[Option] = [
    ("steps", ("--steps",), positive_int,
     "optimiser steps (default: as many as --epochs passes take)"),
    ("batch_size", ("--batch-size",), positive_int, "clips per optimiser step, all processes"),
    ("batch_seconds", ("--batch-seconds",), positive_float,
     "audio seconds per step instead: clips = round(this / the crop length) (default: "
     "unset, --batch-size counts)"),
    ("micro_batch", ("--micro-batch",), positive_int,
     "clips per forward pass per process, for gradient accumulation (default: the whole "
     "share)"),
]
OPTIMISER: list[Option] = [
    ("lr", ("--lr",), positive_float, "peak learning rate (AdamW)"),
    ("schedule", ("--schedule",), str, "after warm-up: cosine, linear (to 0) or constant"),
    ("warmup_steps", ("--warmup-steps", "--warmup"), non_negative_int,
     "linear warm-up steps (0: --warmup-ratio of all steps)"),
    ("warmup_ratio", ("--warmup-ratio",), non_negative_float, "warm-up as a share of all steps"),
    ("weight_decay", ("--weight-decay",), non_negative_float,
     "AdamW weight decay (not on biases/norms)"),
    ("clip_norm", ("--clip-norm",), non_negative_float, "gradient-norm clip (0: off)"),
]
RUN: list[Option] = [
    ("log_every", ("--log-every",), positive_int, "steps between metrics.jsonl lines"),
    ("save_every", ("--save-every",), positive_int, "steps between training-state checkpoints"),
    ("dtype", ("--dtype",), str, "autocast dtype: float32, bfloat16 or float16 (loss scaling)"),
    ("device", ("--device",), str, "auto (cuda, mps, cpu), cpu, cuda, cuda:1, ..."),
    ("seed", ("--seed",), non_negative_int,
     "seed of data order, crops, augmentation and initialisation"),
    ("num_workers", ("-j", "--workers"), non_negative_int,
     "processes reading audio (0: in the main process)"),
    ("fsdp", ("--fsdp",), "flag",
     "shard the model over torchrun processes (FSDP2, one unit per encoder layer)"),
    ("resume", ("--resume",), "flag", "continue the run in OUT from its last checkpoint"),
    ("quiet", ("-q", "--quiet"), "flag", "no progress bar or summary"),
]


def add_options(p: argparse.ArgumentParser, options: Sequence[Option], defaults: Any) -> None:
    """Add ``options`` to ``p``, each defaulting to the field of ``defaults`` (a config);
    its help ends with that default. A text's own "(default: ...)" says what None means:
    it is shown when the config's default is None, and replaced by the value otherwise
    (``--steps`` is None for fine-tuning, 400000 for pre-training)."""
    for name, flags, kind, text in options:
        default = getattr(defaults, name)
        if kind == "flag":
            p.add_argument(*flags, dest=name, action="store_true", help=text)
        else:
            if default is None and "(default: " in text:
                shown = text
            else:
                shown = f"{re.sub(r' [(]default: [^)]*[)]', '', text)} (default: {default})"
            p.add_argument(*flags, dest=name, type=kind, default=default, help=shown)


def add_config_file(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config-file", help="repeat a run: an OUT/config.json (options given on "
                                         "the command line override it)")


def reparse_with_config_file(
    args: argparse.Namespace, command: str, build: Callable[[argparse.ArgumentParser], None],
    extra: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> argparse.Namespace:
    """With ``--config-file``: parse the command line again with the file's values as
    defaults, so that the options given on the command line win. ``extra(record)`` maps
    the file's other entries (data, model, output, ...) onto argument names."""
    if not args.config_file:
        return args
    record = json.loads(Path(args.config_file).read_text())
    if "config" not in record:
        raise ValueError(f"{args.config_file} is not a beats training config.json (no 'config')")
    values = dict(record["config"])
    values.pop("resume", None)
    if isinstance(values.get("betas"), list):
        values["betas"] = tuple(values["betas"])
    values.update((extra or (lambda r: {}))(record))
    parser = argparse.ArgumentParser(prog=f"beats {command}")
    build(parser)
    parser.set_defaults(**{k: v for k, v in values.items() if v is not None})
    argv = list(getattr(args, "argv", None) or sys.argv[1:])
    return parser.parse_args(argv[argv.index(command) + 1:])


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    """``cls`` (a config dataclass) from the parsed arguments named like its fields."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in vars(args).items() if k in names})


# Trainers on unlabelled audio (`beats.train.unlabelled.UnlabelledConfig`): pretrain, distill.
UNLABELLED: list[Option] = [
    ("crop_seconds", ("--crop",), positive_float,
     "seconds per training crop: random crops of longer files, starting on 160 ms steps; "
     "shorter files are padded and the padding masked"),
    ("eval_batch", ("--eval-batch",), positive_int, "held-out clips per forward pass"),
]


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
