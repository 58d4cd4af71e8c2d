"""``beats finetune DATA -o OUT [-m MODEL]``: fine-tune the whole model on labelled audio."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import InputError
from .arguments import output_folder, warnings_as_lines
from .options import Option
from .training import add_config_options, config_from_layers, read_config_file, report_failures


def options() -> list[Option]:
    """The options made from `beats.train.finetune.FinetuneConfig`'s fields."""
    return build(argparse.ArgumentParser())


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
            "OUT/state (for --resume: same settings, model, classes and data only). With "
            "--strong, DATA is a DCASE strong-label TSV and the model learns when each "
            "sound is heard (frame-level), for beats detect. Several processes: torchrun "
            "--nproc-per-node N -m beats finetune ..."
        ),
    )
    build(p)


def build(p: argparse.ArgumentParser) -> list[Option]:
    """Add every ``beats finetune`` argument to ``p``; returns the config's options."""
    from ..train.finetune import FinetuneConfig

    p.add_argument("data", nargs="?", help="class folder, CSV or strong-label TSV (optional "
                   "with --config-file)")
    p.add_argument("-o", "--output", type=output_folder, help="output folder (required)")
    p.add_argument("-m", "--model", default=None,
                   help="checkpoint to start from: registry name, hub repo, folder or .pt "
                        "(default: the registry's default model)")
    p.add_argument("--cv", action="store_true",
                   help="first cross-validate over the CSV folds (each fold the test set once)")
    return add_config_options(p, FinetuneConfig)


def run(args: argparse.Namespace) -> int:
    from ..train.finetune import FinetuneConfig, finetune

    record = read_config_file(args.config_file)
    args.data = args.data or record.get("data")
    args.model = args.model or record.get("model")
    args.output = args.output or record.get("output")
    if not args.data or not args.output:
        raise InputError("give DATA and -o OUT (or --config-file OUT/config.json)")
    cfg = config_from_layers(FinetuneConfig, args, record)
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
    code = report_failures("finetune", result.fit, out)
    if not cfg.quiet:
        for split in ("val", "test"):
            if split in report:
                print(f"{split}: {_scores(report[split])}", file=sys.stderr)
        if "cv" in report:
            shown = ", ".join(f"{k} {v:.3f}" for k, v in report["cv"]["mean"].items())
            print(f"cross-validation mean: {shown}", file=sys.stderr)
        print(f"model saved to {out / 'model'} (best step {report['best_step']}"
              f" of {report['steps']}, {report['training_seconds']:.0f} s)", file=sys.stderr)
    return code


def _scores(r: dict) -> str:
    """One split's headline numbers: classification, then detection when timed."""
    shown = [f"{k} {r[k]:.3f}" for k in ("accuracy", "macro_f1", "mAP") if k in r]
    for key, name in (("segment_f1", "segment F1"), ("event_f1", "event F1")):
        if key in r and r[key]["macro_f1"] is not None:
            shown.append(f"{name} {r[key]['macro_f1']:.3f}")
    if r.get("psds") is not None:
        shown.append(f"PSDS {r['psds']:.3f}")
    count = r.get("clips", r.get("files"))
    return f"{', '.join(shown)} ({count} files)"


def interrupted(command: str, output: str) -> int:
    """Ctrl-C in a training command: one line; exit code 130."""
    print(f"beats {command}: interrupted; the last checkpoint is in "
          f"{Path(output) / 'state'}: the same command with --resume continues the run",
          file=sys.stderr)
    return 130


def _default_model() -> str:
    from .extract import default_model_name

    return default_model_name()
