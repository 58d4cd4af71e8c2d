"""``beats pretrain AUDIO... -o OUT``: self-supervised pre-training on unlabelled audio."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import InputError
from .arguments import output_folder, warnings_as_lines
from .finetune import interrupted
from .options import Option
from .training import (
    add_audio_arguments,
    add_config_options,
    config_from_layers,
    read_config_file,
    record_audio,
    report_failures,
)


def options() -> list[Option]:
    """The options made from `beats.train.pretrain.PretrainConfig`'s fields."""
    return build(argparse.ArgumentParser())


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="self-supervised pre-training (masked acoustic-token prediction) on unlabelled "
             "audio",
        description=(
            "Pre-train a BEATs encoder on unlabelled AUDIO: the labels of 75 % of each "
            "clip's patches are hidden and predicted from the rest (the labels: a frozen "
            "tokenizer on the same filterbank, or beats tokenize outputs). Writes OUT/model "
            "(an ordinary BEATs checkpoint: beats extract, beats finetune -m and "
            "BEATs.from_pretrained load it), OUT/tokenizer (the random tokenizer, when used),"
            " OUT/metrics.jsonl, OUT/config.json, OUT/failed.jsonl and OUT/state (for "
            "--resume: same settings, audio and labels only). Files that cannot be read are "
            "skipped and listed in OUT/failed.jsonl; when none can be, nothing is trained. "
            "Defaults are the paper's for base (400k steps of 560 x 10 s, on GPUs); "
            "--config tiny learns on a CPU in minutes. Several processes: torchrun "
            "--nproc-per-node N -m beats pretrain ..."
        ),
    )
    build(p)


def build(p: argparse.ArgumentParser) -> list[Option]:
    """Add every ``beats pretrain`` argument to ``p``; returns the config's options. The
    shown defaults are PretrainConfig's (the paper's for base), with the tiny preset's
    where it differs."""
    from ..train.pretrain import TRAINING_PRESETS, PretrainConfig

    add_audio_arguments(p)
    p.add_argument("-o", "--output", type=output_folder, help="output folder (required)")
    tiny = {k: f"with --config tiny: {v}" for k, v in TRAINING_PRESETS["tiny"].items()}
    return add_config_options(p, PretrainConfig, notes=tiny)


def run(args: argparse.Namespace) -> int:
    from ..train.pretrain import pretrain

    record = read_config_file(args.config_file)
    args.audio = args.audio or record_audio(record)
    args.heldout = args.heldout or record.get("heldout") or None
    args.output = args.output or record.get("output")
    if not args.audio or not args.output:
        raise InputError("give AUDIO and -o OUT (or --config-file OUT/config.json)")
    cfg = pretrain_config(args, record)
    # A TrainingError (diverged) is exit 4 in beats.cli, like every command's errors.
    try:
        with warnings_as_lines("pretrain"):
            result = pretrain(args.audio, args.output, cfg, heldout=args.heldout or ())
    except KeyboardInterrupt:
        return interrupted("pretrain", args.output)
    out = Path(args.output)
    if result.fit.finished_before:
        print(f"beats pretrain: the run in {out} is finished (same settings, audio and "
              f"labels): nothing to do; its model is {out / 'model'}", file=sys.stderr)
        return 0
    code = report_failures("pretrain", result.fit, out)
    if not cfg.quiet:
        if result.heldout:
            h = result.heldout
            print(f"held-out masked accuracy {h['masked_accuracy']:.3f} (most frequent label "
                  f"{h['majority']:.3f}, nearest kept patch {h['neighbour']:.3f})",
                  file=sys.stderr)
        print(f"model saved to {out / 'model'} ({result.fit.steps} steps, "
              f"{result.fit.seconds:.0f} s)", file=sys.stderr)
    return code


def pretrain_config(args: argparse.Namespace, record: dict[str, Any]) -> Any:
    """The run's `PretrainConfig`: its defaults < the preset's training settings (``--config
    tiny``: fewer steps, smaller batches, float32) < the config file's < the options given."""
    from ..train.pretrain import PretrainConfig, preset_defaults

    model = getattr(args, "config", None) or record.get("config", {}).get("config") or "base"
    return config_from_layers(PretrainConfig, args, record, base=preset_defaults(model))
