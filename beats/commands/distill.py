"""``beats distill AUDIO... -o OUT --teacher MODEL``: train an acoustic tokenizer from a teacher."""

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


def _decay(text: str) -> float:
    value = non_negative_float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {text}")
    return value


# (config field, flags, type, help). Defaults come from DistillConfig; --help shows them.
OPTIONS: list[Option] = [
    ("student", ("--config",), str,
     "the student tokenizer's size: tiny, base (the released tokenizers' 12 x 768), or a "
     "JSON file {\"preset\": \"tiny\", BEATsConfig keys to change, e.g. \"quant_n\": 256}"),
    ("target", ("--target",), str,
     "what the student learns to predict: auto (logits for a teacher with a class head, "
     "else features), features (the teacher's last-layer output at every patch) or logits "
     "(a fine-tuned teacher's class logits at every patch, before pooling)"),
    ("epochs", ("--epochs",), positive_int, "passes over the audio files"),
    *LENGTH,
    *OPTIMISER,
    *UNLABELLED,
    ("beta", ("--beta",), non_negative_float,
     "commitment loss weight (the original 1.0; ESPnet 10)"),
    ("decay", ("--decay",), _decay, "codebook EMA decay per optimiser step"),
    ("kmeans_iters", ("--kmeans-iters",), positive_int,
     "k-means iterations of the codebook initialisation (on the first step's clips)"),
    ("estimator_layers", ("--estimator-layers",), positive_int,
     "Transformer layers of the estimator (dropped after training)"),
    ("restart_after", ("--restart-after",), non_negative_int,
     "restart codes unused for this many steps from the step's encoder outputs (0: never, "
     "as the original)"),
    ("usage_window", ("--usage-window",), positive_int,
     "steps counted by codebook_usage_recent in metrics.jsonl"),
    ("eval_every", ("--eval-every",), non_negative_int,
     "steps between held-out evaluations (0: each epoch; needs --heldout)"),
    *RUN,
]


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


def build(p: argparse.ArgumentParser) -> None:
    """Add every ``beats distill`` argument to ``p``."""
    from ..train.distill import DistillConfig

    defaults = DistillConfig()
    add_audio_arguments(p)
    p.add_argument("-o", "--output", type=output_folder,
                   help="output folder (required; no default)")
    p.add_argument("--teacher", default=None,
                   help="the teacher: a BEATs checkpoint (registry name, hub repo, folder or "
                        ".pt), SSL or fine-tuned; not a tokenizer (required; no default)")
    add_config_file(p)
    add_options(p, OPTIONS, defaults)


def run(args: argparse.Namespace) -> int:
    from ..train.distill import DistillConfig, distill

    args = reparse_with_config_file(args, "distill", build, lambda record: {
        "audio": record.get("audio"), "heldout": record.get("heldout") or None,
        "teacher": record.get("teacher"), "output": record.get("output")})
    if not args.audio or not args.output or not args.teacher:
        raise ValueError("give AUDIO..., -o OUT and --teacher MODEL (or --config-file "
                         "OUT/config.json)")
    cfg = config_from_args(DistillConfig, args)
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
    if result.fit.failed:
        print(f"beats distill: {len(result.fit.failed)} file(s) could not be read and were "
              f"skipped (see {out / 'failed.jsonl'})", file=sys.stderr)
    if not args.quiet:
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
    return 1 if result.fit.failed else 0


def _last_line(out: Path) -> dict | None:
    """The last training line of OUT/metrics.jsonl (one with ``cosine``), or None."""
    from ..train.logs import read_metrics

    lines = [x for x in read_metrics(out) if "cosine" in x and "codebook_usage" in x]
    return lines[-1] if lines else None
