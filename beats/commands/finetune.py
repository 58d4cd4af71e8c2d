"""``beats finetune DATA -o OUT [-m MODEL]``: fine-tune the whole model on labelled audio."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .arguments import (
    fraction,
    non_negative_float,
    non_negative_int,
    output_folder,
    positive_float,
    positive_int,
    warnings_as_lines,
)
from .training import (
    LENGTH,
    OPTIMISER,
    RUN,
    Option,
    add_config_file,
    add_options,
    config_from_args,
    reparse_with_config_file,
)

# (config field, flags, type, help). Defaults come from FinetuneConfig; --help shows them.
OPTIONS: list[Option] = [
    ("epochs", ("--epochs",), positive_int, "passes over the training clips"),
    ("steps", ("--steps",), positive_int, "optimiser steps (overrides --epochs)"),
    *[o for o in LENGTH if o[0] != "steps"],
    *OPTIMISER,
    ("layer_lr_decay", ("--layer-lr-decay",), positive_float,
     "layer-wise learning-rate decay: layer L-1-i gets lr * decay^(i+1) (1: off); the "
     "effective form under Adam"),
    ("grad_decay", ("--grad-decay",), positive_float,
     "layer-wise gradient decay (GradMultiply, the released configs' 0.6; 1: off). Adam "
     "nearly cancels a constant gradient scale: prefer --layer-lr-decay"),
    ("layerdrop", ("--layerdrop",), non_negative_float,
     "probability of skipping each encoder layer"),
    ("dropout", ("--dropout",), non_negative_float, "encoder dropout"),
    ("attention_dropout", ("--attention-dropout",), non_negative_float, "attention dropout"),
    ("head_dropout", ("--head-dropout",), non_negative_float, "dropout before the class head"),
    ("freeze_layers", ("--freeze-layers",), non_negative_int,
     "keep the patch embedding and the bottom k layers frozen"),
    ("mixup", ("--mixup",), non_negative_float,
     "probability that a clip is mixed with another (0: off); makes the loss BCE"),
    ("mixup_alpha", ("--mixup-alpha",), positive_float, "mixup weight ~ Beta(alpha, alpha)"),
    ("time_mask", ("--time-mask",), non_negative_float,
     "SpecAugment: 2 time masks, each up to this share of the frames (0: off)"),
    ("freq_mask", ("--freq-mask",), non_negative_int,
     "SpecAugment: 2 frequency masks, each up to this many of 128 mel bins (0: off)"),
    ("roll", ("--roll",), "flag", "random circular roll of the waveform"),
    ("balanced", ("--balanced",), "flag",
     "balanced sampling for multi-label data (AST's weights: sum of 1000 / (label count "
     "+ 0.01) over a clip's labels)"),
    ("crop_seconds", ("--crop-seconds",), positive_float,
     "training reads random crops of this length from longer clips (evaluation: whole clips)"),
    ("val_fraction", ("--val-fraction",), fraction,
     "share of each class's files for validation"),
    ("test_fraction", ("--test-fraction",), fraction,
     "share of each class's files held out"),
    ("val_fold", ("--val-fold",), str, "CSV fold used for validation (best checkpoint)"),
    ("test_fold", ("--test-fold",), str, "CSV fold held out for scoring"),
    ("patience", ("--patience",), non_negative_int,
     "validations without improvement before stopping (0: never)"),
    ("eval_every", ("--eval-every",), non_negative_int,
     "steps between validations (0: each epoch)"),
    ("eval_batch", ("--eval-batch",), positive_int, "clips per forward pass in evaluation"),
    *RUN,
]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune the whole model on labelled audio (single- or multi-label)",
        description=(
            "Fine-tune a BEATs checkpoint on DATA: a folder with one subfolder per class, "
            "a CSV path,label[,fold] (labels joined by ';' for multi-label) or "
            "path,CLASS_1,...,CLASS_K[,fold] with 0/1 cells, or a strong-label TSV (its "
            "files' labels are their events' classes). Each file is in one split only. "
            "Writes OUT/model (a fine-tuned checkpoint with your class names: best "
            "validation step), OUT/model-last, OUT/report.json, OUT/metrics.jsonl, "
            "OUT/config.json, OUT/failed.jsonl (files that could not be read, skipped) and "
            "OUT/state (for --resume: same settings, model, classes and data only). Several "
            "processes: torchrun --nproc-per-node N -m beats finetune ..."
        ),
    )
    build(p)


def build(p: argparse.ArgumentParser) -> None:
    """Add every ``beats finetune`` argument to ``p``."""
    from ..train.finetune import FinetuneConfig

    defaults = FinetuneConfig()
    p.add_argument("data", nargs="?", help="class folder or CSV (optional with --config-file)")
    p.add_argument("-o", "--output", type=output_folder, help="output folder (required)")
    p.add_argument("-m", "--model", default=None,
                   help="checkpoint to start from: registry name, hub repo, folder or .pt "
                        "(default: the registry's default model)")
    p.add_argument("--cv", action="store_true",
                   help="first cross-validate over the CSV folds (each fold the test set once)")
    add_config_file(p)
    add_options(p, OPTIONS, defaults)


def run(args: argparse.Namespace) -> int:
    from ..train.finetune import FinetuneConfig, finetune

    args = reparse_with_config_file(args, "finetune", build, lambda record: {
        "data": record.get("data"), "model": record.get("model"),
        "output": record.get("output")})
    if not args.data or not args.output:
        raise ValueError("give DATA and -o OUT (or --config-file OUT/config.json)")
    cfg = config_from_args(FinetuneConfig, args)
    model = args.model or _default_model()
    # A TrainingError (diverged) is exit 4 in beats.cli, like every command's errors.
    try:
        with warnings_as_lines("finetune"):
            result = finetune(model, args.data, cfg, args.output, cv=args.cv,
                              model_name=str(model))
    except KeyboardInterrupt:
        return interrupted("finetune", args.output)
    report = result.report
    out = Path(args.output)
    if result.fit.finished_before:
        print(f"beats finetune: the run in {out} is finished (same settings, model and "
              f"data): nothing to do; its model is {out / 'model'}", file=sys.stderr)
        return 0
    if report["failed_files"]:
        print(f"beats finetune: {len(report['failed_files'])} file(s) could not be read and "
              f"were skipped (see {out / 'failed.jsonl'})", file=sys.stderr)
    if not args.quiet:
        for split in ("val", "test"):
            if split in report:
                r = report[split]
                shown = ", ".join(f"{k} {r[k]:.3f}" for k in ("accuracy", "macro_f1", "mAP")
                                  if k in r)
                print(f"{split} ({r['clips']} clips): {shown}", file=sys.stderr)
        if "cv" in report:
            shown = ", ".join(f"{k} {v:.3f}" for k, v in report["cv"]["mean"].items())
            print(f"cross-validation mean: {shown}", file=sys.stderr)
        print(f"model saved to {out / 'model'} (best step {report['best_step']}"
              f" of {report['steps']}, {report['training_seconds']:.0f} s)", file=sys.stderr)
    return 1 if report["failed_files"] else 0


def interrupted(command: str, output: str) -> int:
    """Ctrl-C in a training command: one line; exit code 130."""
    print(f"beats {command}: interrupted; the last checkpoint is in "
          f"{Path(output) / 'state'}: the same command with --resume continues the run",
          file=sys.stderr)
    return 130


def _default_model() -> str:
    from .extract import default_model_name

    return default_model_name()
