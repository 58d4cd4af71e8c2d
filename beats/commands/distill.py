"""``beats distill AUDIO... -o OUT --teacher MODEL``: train an acoustic tokenizer from a teacher."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
    """The options made from `beats.train.distill.DistillConfig`'s fields."""
    return build(argparse.ArgumentParser())


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "distill",
        help="train an acoustic tokenizer from a BEATs teacher on unlabelled audio",
        description=(
            "Distil a BEATs acoustic tokenizer (student encoder, quantize_layer, EMA codebook "
            "of l2-normalised codes) from a teacher on unlabelled AUDIO, as BEATs iterations "
            ">= 2 do. An estimator predicts the teacher's target at every patch from the "
            "student's codes; loss 1 - cosine plus the commitment term. The target: an SSL "
            "teacher's last-layer output per patch (the paper), or, for a fine-tuned "
            "teacher, its class logits per patch (the class head applied before pooling: "
            "the tokenizer labels patches, and the per-patch logits hold the clip logits, "
            "their mean, plus where each class sounds). Writes OUT/tokenizer (a tokenizer "
            "checkpoint for BEATsTokenizer.from_pretrained and `beats tokenize -m`; the "
            "estimator is dropped), OUT/metrics.jsonl (loss, cosine, commitment, "
            "codebook_usage: codes hit per step, codebook_usage_recent, perplexity, lr, "
            "audio_seconds_per_second), OUT/config.json, OUT/failed.jsonl (files that could "
            "not be read, skipped; when none can be, nothing is trained) and OUT/state (for "
            "--resume: same settings, teacher, student and audio only). Several processes: "
            "torchrun --nproc-per-node N -m beats distill ..."
        ),
    )
    build(p)


def build(p: argparse.ArgumentParser) -> list[Option]:
    """Add every ``beats distill`` argument to ``p``; returns the config's options."""
    from ..train.distill import DistillConfig

    add_audio_arguments(p)
    p.add_argument("-o", "--output", type=output_folder,
                   help="output folder (required; no default)")
    p.add_argument("--teacher", default=None,
                   help="the teacher: a BEATs checkpoint (registry name, hub repo, folder or "
                        ".pt), SSL or fine-tuned; not a tokenizer (required; no default)")
    return add_config_options(p, DistillConfig)


def run(args: argparse.Namespace) -> int:
    from ..train.distill import DistillConfig, distill

    record = read_config_file(args.config_file)
    args.audio = args.audio or record_audio(record)
    args.heldout = args.heldout or record.get("heldout") or None
    args.teacher = args.teacher or record.get("teacher")
    args.output = args.output or record.get("output")
    if not args.audio or not args.output or not args.teacher:
        raise InputError("give AUDIO..., -o OUT and --teacher MODEL (or --config-file "
                         "OUT/config.json)")
    cfg = config_from_layers(DistillConfig, args, record)
    # A TrainingError (diverged) is exit 4 in beats.cli, like every command's errors.
    try:
        with warnings_as_lines("distill"):
            result = distill(args.teacher, args.audio, cfg, args.output,
                             heldout=args.heldout or (), teacher_name=args.teacher)
    except KeyboardInterrupt:
        return interrupted("distill", args.output)
    out = Path(args.output)
    if result.fit.finished_before:
        print(f"beats distill: the run in {out} is finished (same settings, teacher and "
              f"audio): nothing to do; its tokenizer is {out / 'tokenizer'}", file=sys.stderr)
        return 0
    code = report_failures("distill", result.fit, out)
    if not cfg.quiet:
        last = _last_line(out)
        size = result.tokenizer.cfg.quant_n
        if last:
            print(f"step {last['step']}: cosine {last['cosine']:.3f}, codebook usage "
                  f"{last['codebook_usage']:.0f} codes per step, "
                  f"{last['codebook_usage_recent']:.0f} of {size} in the last "
                  f"{cfg.usage_window} steps, perplexity {last['perplexity']:.1f}",
                  file=sys.stderr)
        print(f"tokenizer saved to {out / 'tokenizer'} ({result.fit.steps} steps, "
              f"{result.fit.seconds:.0f} s)", file=sys.stderr)
    return code


def _last_line(out: Path) -> dict | None:
    """The last training line of OUT/metrics.jsonl (one with ``cosine``), or None."""
    from ..train.logs import read_metrics

    lines = [x for x in read_metrics(out) if "cosine" in x and "codebook_usage" in x]
    return lines[-1] if lines else None
