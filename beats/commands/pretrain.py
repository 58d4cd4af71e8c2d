"""``beats pretrain AUDIO... -o OUT``: self-supervised pre-training on unlabelled audio."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .arguments import (
    non_negative_float,
    non_negative_int,
    output_folder,
    positive_int,
    warnings_as_lines,
)
from .finetune import interrupted
from .training import (
    LENGTH,
    OPTIMISER,
    RUN,
    UNLABELLED,
    Option,
    add_audio_arguments,
    add_config_file,
    add_options,
    config_from_args,
    reparse_with_config_file,
)


def _options() -> list[Option]:
    """(config field, flags, type, help); defaults come from PretrainConfig (the paper's
    for base) and --help shows them with the tiny preset's where it differs."""
    from ..train.pretrain import TRAINING_PRESETS

    tiny = TRAINING_PRESETS["tiny"]
    options: list[Option] = [
        ("config", ("--config",), str,
         "model: tiny, base or large, or a JSON file of SSL config keys "
         '({"preset": "tiny", "mask_ratio": 0.6, "model": {"encoder_layers": 6}})'),
        ("tokenizer", ("--tokenizer",), str,
         "labels computed while training: random (the iteration-1 random projection of "
         "--seed, saved to OUT/tokenizer) or a tokenizer checkpoint (folder, .pt, name); "
         "not given: random unless --tokens"),
        ("tokens", ("--tokens",), str,
         "labels read from a beats tokenize output folder of the same audio instead"),
        *UNLABELLED,
        ("mask_ratio", ("--mask-ratio",), non_negative_float,
         "share of each clip's patches masked; not given: the config's (0.75 in every "
         "preset)"),
        ("positions", ("--positions",), str,
         "where the encoder sees kept patches: true, scattered or compacted; not given: "
         "the config's (true in every preset)"),
        ("predictor_layers", ("--predictor-layers",), positive_int,
         "Transformer layers of the label predictor; not given: the config's (3; tiny 2)"),
        ("label_smoothing", ("--label-smoothing",), non_negative_float,
         "of the cross-entropy; not given: the config's (0.1 in every preset)"),
        *LENGTH,
        *OPTIMISER,
        ("eval_every", ("--eval-every",), non_negative_int,
         "steps between held-out evaluations (0: once per pass over the files)"),
        *RUN,
    ]
    out = []
    for name, flags, kind, text in options:
        if name in tiny:
            text = f"{text}; with --config tiny: {tiny[name]}"
        out.append((name, flags, kind, text))
    return out


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


def build(p: argparse.ArgumentParser) -> None:
    """Add every ``beats pretrain`` argument to ``p``."""
    from ..train.pretrain import PretrainConfig

    add_audio_arguments(p)
    p.add_argument("-o", "--output", type=output_folder, help="output folder (required)")
    add_config_file(p)
    add_options(p, _options(), PretrainConfig())


def _with_preset_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Parse again with the preset's training settings as defaults (``--config tiny``:
    fewer steps, smaller batches, float32): options given on the command line win."""
    from ..train.pretrain import preset_defaults

    defaults = preset_defaults(args.config)
    if not defaults:
        return args
    parser = argparse.ArgumentParser(prog="beats pretrain")
    build(parser)
    parser.set_defaults(**defaults)
    argv = list(getattr(args, "argv", None) or sys.argv[1:])
    again = parser.parse_args(argv[argv.index("pretrain") + 1:])
    again.argv = argv
    return again


def run(args: argparse.Namespace) -> int:
    from ..train.pretrain import PretrainConfig, pretrain

    if args.config_file:
        args = reparse_with_config_file(args, "pretrain", build, lambda record: {
            "audio": record.get("inputs"), "heldout": record.get("heldout") or None,
            "output": record.get("output")})
    else:
        args = _with_preset_defaults(args)
    if not args.audio or not args.output:
        raise ValueError("give AUDIO and -o OUT (or --config-file OUT/config.json)")
    cfg = config_from_args(PretrainConfig, args)
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
    if result.fit.failed:
        print(f"beats pretrain: {len(result.fit.failed)} file(s) could not be read and were "
              f"skipped (see {out / 'failed.jsonl'})", file=sys.stderr)
    if not args.quiet:
        if result.heldout:
            h = result.heldout
            print(f"held-out masked accuracy {h['masked_accuracy']:.3f} (most frequent label "
                  f"{h['majority']:.3f}, nearest kept patch {h['neighbour']:.3f})",
                  file=sys.stderr)
        print(f"model saved to {out / 'model'} ({result.fit.steps} steps, "
              f"{result.fit.seconds:.0f} s)", file=sys.stderr)
    return 1 if result.fit.failed else 0
