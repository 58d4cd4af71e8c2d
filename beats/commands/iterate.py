"""``beats iterate AUDIO... -o OUT --iterations 3``: the whole BEATs iteration, resumable."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..options import OptionError
from .arguments import non_negative_int, output_folder, positive_float, positive_int
from .options import add_options, named_error
from .training import add_audio_arguments


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "iterate",
        help="run the BEATs iteration: random tokenizer -> pretrain -> distill -> pretrain ...",
        description=(
            "The BEATs iteration as one resumable command: iteration 1 pre-trains an SSL "
            "model on the random-projection tokenizer's labels; each later iteration distils "
            "a tokenizer from the previous SSL model (or, with --teacher-finetune, from that "
            "model fine-tuned on labelled data: the iter3+ path) and pre-trains a new SSL "
            "model from scratch on its labels. Each stage runs in its own folder "
            "(OUT/iterK/pretrain, OUT/iterK/distill, OUT/iterK/finetune, OUT/iterK/probe) "
            "with its own metrics.jsonl and checkpoints. Run the same command again after "
            "an interruption: finished stages are skipped and the interrupted one resumes "
            "from its last checkpoint. Ends with a table per iteration (masked accuracy, "
            "labels used, codebook usage, probe accuracy with --probe), also in "
            "OUT/summary.json."),
    )
    build(p)


def build(p: argparse.ArgumentParser) -> None:
    """Add every ``beats iterate`` argument to ``p``: `IterateConfig`'s own fields, the
    stages' settings files, and shortcuts to settings several stages share."""
    from ..options import flags, options_of
    from ..train.iterate import DISTILL_PRESETS, IterateConfig
    from ..train.pretrain import TRAINING_PRESETS, PretrainConfig

    add_audio_arguments(p)
    p.add_argument("-o", "--output", type=output_folder, required=True,
                   help="output folder (required; no default)")
    add_options(p, IterateConfig, ["iterations"])
    p.add_argument("--config", default="tiny",
                   help="the SSL model: tiny, base, large or a JSON file as beats pretrain "
                        "takes it; the distilled tokenizers get the student of the same "
                        "preset (tiny, else base) (default: tiny)")
    add_options(p, IterateConfig, ["teacher_finetune", "probe"])
    p.add_argument("--steps", type=positive_int, default=None,
                   help="pre-training steps per iteration (default: the preset's: tiny "
                        f"{TRAINING_PRESETS['tiny']['steps']}, base and large "
                        f"{PretrainConfig.steps})")
    p.add_argument("--distill-steps", type=positive_int, default=None,
                   help="distillation steps per iteration (default: tiny "
                        f"{DISTILL_PRESETS['tiny']['steps']}; base the paper's epochs)")
    p.add_argument("--finetune-epochs", type=positive_int, default=None,
                   help="fine-tuning epochs with --teacher-finetune (default: beats "
                        "finetune's)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="clips per step of pre-training and distillation (default: the "
                        "presets')")
    p.add_argument("--crop", dest="crop_seconds", type=positive_float, default=None,
                   help="seconds per training crop of pre-training and distillation "
                        "(default: the presets')")
    for field in options_of(IterateConfig):
        if field.metadata["metavar"] == "JSON":  # a stage's settings, from a file
            stage = field.name
            p.add_argument(*flags(field), dest=f"{stage}_options", metavar="JSON",
                           default=None,
                           help=f"a JSON file of {field.metadata['help']}: beats {stage} "
                                f"config field names, as in a {stage} run's OUT/config.json "
                                "'config'; applied before the options above (default: none)")
    p.add_argument("--dtype", default=None,
                   help="autocast dtype of every stage: float32, bfloat16, float16 "
                        "(default: the presets')")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, ... "
                                                    "(default: auto)")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="seed of every stage (default: 0)")
    p.add_argument("-j", "--workers", dest="num_workers", type=non_negative_int, default=2,
                   help="processes reading audio (0: in the main process) (default: 2)")
    p.add_argument("--resume", action="store_true",
                   help="accepted for symmetry with the other trainers: a run in OUT with "
                        "the same settings always continues")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or table")


def _options(path: str | None) -> dict[str, Any]:
    """Config fields from a JSON file: a flat object, or a run's config.json ('config')."""
    if not path:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"cannot read {path}: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("config"), dict):
        data = data["config"]
    if not isinstance(data, dict):
        raise InputError(f"{path}: settings are a JSON object of config fields")
    if isinstance(data.get("betas"), list):
        data["betas"] = tuple(data["betas"])
    return data


def _make(cls: type, base: dict[str, Any], path: str | None, flags: dict[str, Any],
          what: str) -> Any:
    """``cls(**base)`` updated by the JSON file, then by the flags given (not None)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {**base, **_options(path)}
    values.update({k: v for k, v in flags.items() if v is not None})
    for key in ("resume", "tokenizer", "tokens"):
        values.pop(key, None)
    unknown = sorted(set(values) - names)
    if unknown:
        raise InputError(f"--{what}-options: unknown {what} setting(s) {', '.join(unknown)}")
    try:
        return cls(**values)
    except OptionError as e:
        raise InputError(f"the {what} settings (--{what}-options and the options above): "
                         f"{e}") from None


def configs(args: argparse.Namespace) -> Any:
    """The `IterateConfig` the arguments describe."""
    from ..train.distill import DistillConfig
    from ..train.finetune import FinetuneConfig
    from ..train.iterate import DISTILL_PRESETS, IterateConfig
    from ..train.pretrain import PretrainConfig, preset_defaults, preset_name

    run = {"device": args.device, "seed": args.seed, "num_workers": args.num_workers,
           "quiet": args.quiet, "dtype": args.dtype}
    shared = {"batch_size": args.batch_size, "crop_seconds": args.crop_seconds}
    preset = preset_name(args.config)
    preset = preset if preset in DISTILL_PRESETS else "base"
    pretrain = _make(PretrainConfig, {"config": args.config, **preset_defaults(args.config)},
                     args.pretrain_options, {**run, **shared, "steps": args.steps},
                     "pretrain")
    distill = _make(DistillConfig, DISTILL_PRESETS[preset], args.distill_options,
                    {**run, **shared, "steps": args.distill_steps}, "distill")
    finetune = _make(FinetuneConfig, {}, args.finetune_options,
                     {**run, "epochs": args.finetune_epochs}, "finetune")
    cfg = IterateConfig(iterations=args.iterations, pretrain=pretrain, distill=distill,
                        finetune=finetune, teacher_finetune=args.teacher_finetune,
                        probe=args.probe)
    try:
        cfg.validate()
    except OptionError as e:
        raise named_error(e, IterateConfig) from None
    return cfg


def probe(data: str, seed: int, device: str, quiet: bool):
    """A probe stage: ``beats probe DATA -m MODEL -o OUT`` in this process -> test scores."""
    from ..cli import EXIT_BUG, main

    def run(model: Path, out: Path) -> dict[str, float]:
        argv = ["probe", data, "-m", str(model), "-o", str(out), "--seed",
                str(seed), "--device", device, "-j", "0"] + (["-q"] if quiet else [])
        code = main(argv)
        report = out / "report.json"
        if code == EXIT_BUG:  # its traceback is written; stop here as a bug too
            raise RuntimeError(f"beats probe of {model} on {data} met a bug (exit {code})")
        if code not in (0, 1) or not report.is_file():  # 1: some files skipped
            raise InputError(f"the probe of {model} on {data} failed (beats probe exit "
                             f"{code}); fix the probe data and run the same command again")
        test = json.loads(report.read_text()).get("test") or {}
        return {k: float(v) for k, v in test.items() if isinstance(v, (int, float))}

    return run


def run(args: argparse.Namespace) -> int:
    from ..failures import ERRORS_LOG
    from ..train.iterate import format_summary, iterate
    from ..train.loop import TrainingError

    if not args.audio:
        raise InputError("give AUDIO... (files, folders or .txt/.lst lists of paths)")
    cfg = configs(args)

    def say(stage, action: str) -> None:
        if not args.quiet:
            verb = {"run": "running", "resume": "resuming", "skip": "skipping (done)"}[action]
            print(f"beats iterate: {verb} {stage.name} in {stage.folder}", file=sys.stderr)

    try:
        result = iterate(args.audio, args.output, cfg, heldout=args.heldout or (),
                         probe_fn=probe(args.probe, args.seed, args.device, args.quiet)
                         if args.probe else None, on_stage=say)
    except TrainingError as e:  # exit 4 in beats.cli, with what to do here
        raise TrainingError(f"{e} (finished stages are kept; a lower learning rate through "
                            "--pretrain-options or --distill-options needs a new -o)") from None
    except KeyboardInterrupt:
        print("beats iterate: interrupted; finished stages are kept and the same command "
              "continues the run", file=sys.stderr)
        return 130
    if not args.quiet:
        print(format_summary(result.rows))
        print(f"summary saved to {Path(args.output) / 'summary.json'}", file=sys.stderr)
    skipped = [p for p in sorted(Path(args.output).glob("iter*/*/failed.jsonl"))
               if p.stat().st_size]
    if skipped:  # exit 1: the run completed without some inputs
        print(f"beats iterate: some files could not be read and were skipped (see "
              f"{', '.join(map(str, skipped))})", file=sys.stderr)
    logs = sorted(Path(args.output).glob(f"iter*/*/{ERRORS_LOG}"))
    if logs:
        print(f"beats iterate: some files failed with an unexpected error, probably a bug in "
              f"beats: the tracebacks are in {', '.join(map(str, logs))}; please report them",
              file=sys.stderr)
    return 1 if skipped else 0
