"""``beats extract``: embeddings for files and folders of audio."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

import torch

from ..devices import pick_device
from ..extract import ExtractOptions, Summary
from ..pooling import FREQ_POOLING, TIME_POOLING, PoolingSpec, parse_layers
from .arguments import (
    non_negative_float,
    non_negative_int,
    output_folder,
    positive_float,
    positive_int,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "extract",
        help="embed audio files into .npy files or safetensors shards",
        description=(
            "Embed every audio file in INPUTS (files, folders searched recursively, or "
            ".txt/.lst lists of paths) into OUT, with a manifest.jsonl of every outcome. "
            "Default output: one 768-d vector per file (last layer, mean over time and "
            "frequency) as OUT/<input path>.npy."
        ),
    )
    p.add_argument("-m", "--model", default=None,
                   help="registry name, hub repo, folder or .pt file (default: the registry's "
                        "default model)")
    p.add_argument("--layers", default="last", type=parse_layers,
                   help="last, all, or hidden-state numbers like 4,8,12 (0 = encoder input)")
    p.add_argument("--time-pooling", default="mean", choices=TIME_POOLING,
                   help="mean: one vector per file; mean+std: the mean and the standard "
                        "deviation over time, concatenated; none: one row per 160 ms step, "
                        "with the step times beside it")
    p.add_argument("--freq-pooling", default="mean", choices=FREQ_POOLING,
                   help="keep the 8 frequency patches of each 160 ms step, or average them")
    add_run_arguments(p)


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The options `extract` and `tokenize` share: inputs, output, device, batching,
    windows, output format, resume, verbosity."""
    p.add_argument("inputs", nargs="+", help="audio files, folders or list files")
    p.add_argument("-o", "--output", required=True, type=output_folder,
                   help="output folder (created if needed)")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="weights and activations; bfloat16 halves memory (fast on GPUs and "
                        "CPUs with bfloat16 arithmetic)")
    p.add_argument("-b", "--batch-size", type=positive_int, default=8,
                   help="files (or windows of a long file) per forward pass")
    p.add_argument("-j", "--workers", type=non_negative_int, default=min(4, os.cpu_count() or 1),
                   help="processes reading audio (0: read in the main process; default: "
                        "the number of CPU cores, at most 4)")
    p.add_argument("--prefetch", type=positive_int, default=2,
                   help="batches each worker reads ahead")
    p.add_argument("--window", type=non_negative_float, default=10.0,
                   help="seconds: files longer than this are embedded in overlapping windows "
                        "and stitched (default 10, BEATs' training length; 0: whole files)")
    p.add_argument("--hop", type=positive_float, default=None,
                   help="seconds between window starts (default: 80%% of the window)")
    p.add_argument("--max-duration", type=non_negative_float, default=4 * 3600.0,
                   help="seconds: a longer file fails rather than filling memory with its "
                        "samples (230 MB per hour; default 14400, 4 hours; 0: no limit)")
    p.add_argument("--format", dest="output_format", default="npy",
                   choices=("npy", "safetensors"),
                   help="npy: one file per input; safetensors: shards of --shard-size inputs")
    p.add_argument("--shard-size", type=positive_int, default=1000,
                   help="inputs per safetensors shard")
    p.add_argument("--resume", action="store_true",
                   help="continue a run in OUT: skip complete outputs, redo the rest")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument("--log-level", default="ERROR", type=str.upper,
                   choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="WARNING logs each failure as it happens, INFO also the plan and "
                        "totals (the summary at the end lists failures anyway)")


def run_options(args: argparse.Namespace, **extra: Any) -> ExtractOptions:
    """`ExtractOptions` from the shared arguments (``extra``: pooling, tokens)."""
    return ExtractOptions(
        batch_size=args.batch_size, num_workers=args.workers, prefetch=args.prefetch,
        output_format=args.output_format, shard_size=args.shard_size,
        window=args.window or None, hop=args.hop, resume=args.resume,
        max_duration=args.max_duration or None, **extra,
    )


def interrupted(command: str, output: str) -> int:
    """Ctrl-C: one line (finished outputs are kept, --resume continues); exit code 130."""
    print(f"beats {command}: interrupted; what finished is kept in {output}: run the same "
          "command with --resume to continue", file=sys.stderr)
    return 130


def report(command: str, summary: Summary, quiet: bool) -> int:
    """Print the run's summary and first failures (unless quiet) and whether unexpected
    errors happened; the exit code."""
    if not quiet:
        print(f"beats {command}: {summary}", file=sys.stderr)
        for _path, error in summary.failures[:20]:
            print(f"  failed: {error}", file=sys.stderr)
        if len(summary.failures) > 20:
            print(f"  ... and {len(summary.failures) - 20} more (see manifest.jsonl)",
                  file=sys.stderr)
    notice = summary.notice(command)  # said even when quiet: a bug to report
    if notice:
        print(notice, file=sys.stderr)
    return summary.exit_code


def run(args: argparse.Namespace) -> int:
    from ..extract import extract
    from ..model import BEATs

    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    options = run_options(args, pooling=PoolingSpec(
        layers=args.layers, time=args.time_pooling, freq=args.freq_pooling))
    device = pick_device(args.device)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        name = args.model or default_model_name()
        model = BEATs.from_pretrained(name, device=device, dtype=DTYPES[args.dtype])
        summary = extract(model, args.inputs, args.output, options, model_name=str(name),
                          progress=not args.quiet)
    except KeyboardInterrupt:
        return interrupted("extract", args.output)
    finally:
        if distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return report("extract", summary, args.quiet)


def default_model_name() -> str:
    """The registry's default checkpoint name."""
    from ..registry import default_model

    return default_model().name
