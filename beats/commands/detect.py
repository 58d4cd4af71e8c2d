"""``beats detect``: sound events (onset, offset, label, score) in files or a live stream."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path

from .arguments import (
    non_negative_float,
    non_negative_int,
    output_folder,
    positive_int,
)
from .extract import DTYPES, interrupted, report
from .options import add_options
from .tag import DEFAULT_TAGGER

LATENCY = (
    "Latency of --stream: each event is printed as soon as no later audio can change it, "
    "at most 0.16 x (W + M + G) + 0.175 s of audio after its offset, where W is the steps "
    "of a window (10 s: 62), M half the median filter's steps and G the steps --min-gap "
    "bridges: 10.1 s with the defaults, 4.0 s with --window 4 --hop 2 (the exact figure "
    "is printed when the stream starts)."
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..detect import DetectConfig

    p = sub.add_parser(
        "detect",
        help="sound events with their times (fine-tuned models), in files or a live stream",
        description=(
            "Detect sound events in INPUTS (files, folders searched recursively, or "
            ".txt/.lst lists of paths) with a fine-tuned model: each 160 ms step is scored, "
            "the scores are median-filtered, thresholded and merged into events. Writes "
            "OUT/events.tsv (tab-separated: filename onset offset event_label score), "
            "OUT/manifest.jsonl of every outcome and, by --format, an Audacity label file, a "
            "Raven selection table or a JSON file per input. With --stream, reads raw 16-bit "
            "little-endian PCM from stdin (INPUTS is -) and prints each event as "
            "'onset offset event_label score' (seconds from the stream's start); the events "
            "equal those of a file holding the same audio. " + LATENCY
        ),
        epilog=("Examples: beats detect recordings/ -o events/ --threshold 0.3 "
                "--median-filter 0.5; arecord -f S16_LE -r 16000 -c 1 | beats detect - "
                "--stream."),
    )
    p.add_argument("inputs", nargs="+", help="audio files, folders or list files; - with --stream")
    p.add_argument("-o", "--output", type=output_folder, default=None,
                   help="output folder, created if needed (not with --stream)")
    p.add_argument("-m", "--model", default=DEFAULT_TAGGER,
                   help="a fine-tuned model: registry name, hub repo, folder (such as a "
                        "`beats finetune` output's OUT/model) or .pt file")
    p.add_argument("--threshold", default="0.5",
                   help="a step is active at or above this probability: one number, or a "
                        "file of 'CLASS VALUE' lines ('* VALUE' for the classes it does not "
                        "name, else 0.5)")
    add_options(p, DetectConfig, ["median_filter", "min_duration", "min_gap"], checked=True)
    p.add_argument("--classes", action="append", default=None, metavar="NAMES",
                   help="detect only these classes (names such as Speech, or the "
                        "checkpoint's labels); repeat the option or separate names with ;")
    p.add_argument("--window", type=non_negative_float, default=10.0,
                   help="seconds: longer audio is scored in overlapping windows of this "
                        "length and stitched (0: whole files; not with --stream)")
    add_options(p, DetectConfig, ["hop"], checked=True)
    p.add_argument("--format", dest="output_format", default="tsv",
                   choices=("tsv", "audacity", "raven", "json"),
                   help="besides events.tsv, one file per input: an Audacity label track "
                        "(.txt), a Raven selection table (.selections.txt) or JSON")
    p.add_argument("--save-scores", action="store_true",
                   help="also write each file's frame probabilities to OUT/scores/<name>.tsv "
                        "(onset, offset and a column per class, as sed_scores_eval reads)")
    p.add_argument("--stream", action="store_true",
                   help="read raw s16le PCM from stdin (give - as the input) and print events")
    p.add_argument("--rate", type=positive_int, default=16000, help="--stream: sample rate (Hz)")
    p.add_argument("--channels", type=positive_int, default=1,
                   help="--stream: interleaved channels (averaged to mono)")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="weights and activations")
    p.add_argument("-j", "--workers", type=non_negative_int, default=min(4, os.cpu_count() or 1),
                   help="processes reading audio (0: read in the main process)")
    p.add_argument("--max-duration", type=non_negative_float, default=4 * 3600.0,
                   help="seconds: a longer file fails rather than filling memory (0: no limit)")
    p.add_argument("--resume", action="store_true",
                   help="continue a run in OUT: skip inputs already done, redo the rest")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument("--log-level", default="ERROR", type=str.upper,
                   choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="WARNING logs each failure as it happens")


def threshold_value(text: str) -> float | str:
    """``--threshold``: a finite number, or the path of an existing threshold file."""
    from ..errors import InputError

    try:
        value = float(text)
    except ValueError:
        if Path(text).is_file():
            return text
        raise InputError(f"--threshold {text!r}: give a number or the path of a file of "
                         "'CLASS VALUE' lines") from None
    if not math.isfinite(value):
        raise InputError(f"--threshold must be a finite number, got {text}")
    return value


def run(args: argparse.Namespace) -> int:
    from ..detect import DetectConfig, Detector, detect_files
    from ..devices import pick_device
    from ..errors import InputError
    from ..model import BEATs

    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    streaming = args.inputs == ["-"]
    if args.stream != streaming:
        raise InputError("--stream reads stdin: give - as the only input with it, and files "
                         "or folders without it")
    if args.stream and args.output is not None:
        raise InputError("--stream prints its events; drop -o (or detect in files instead)")
    if args.stream and not args.window:
        raise InputError("--stream needs windows: give --window SECONDS (not 0)")
    if not args.stream and args.output is None:
        raise InputError("give an output folder with -o OUT (the events go to OUT/events.tsv)")
    config = DetectConfig(
        threshold=threshold_value(args.threshold), median_filter=args.median_filter,
        min_duration=args.min_duration, min_gap=args.min_gap, classes=args.classes,
        window=args.window or None, hop=args.hop)
    if args.stream and sys.stdin.isatty():
        raise InputError("--stream reads raw PCM from stdin: pipe it in, e.g. arecord -f S16_LE "
                         "-r 16000 -c 1 | beats detect - --stream")
    model = BEATs.from_pretrained(args.model, device=pick_device(args.device),
                                  dtype=DTYPES[args.dtype])
    detector = Detector(model, config)
    if args.stream:
        return stream(detector, args.rate, args.channels, args.quiet)
    try:
        summary = detect_files(
            model, args.inputs, args.output, config, output_format=args.output_format,
            save_scores=args.save_scores, num_workers=args.workers, resume=args.resume,
            max_duration=args.max_duration or None, model_name=str(args.model),
            progress=not args.quiet)
    except KeyboardInterrupt:
        return interrupted("detect", args.output)
    code = report("detect", summary, args.quiet)
    if not args.quiet:
        print(f"beats detect: events in {Path(args.output) / 'events.tsv'}", file=sys.stderr)
    return code


def stream(detector, rate: int, channels: int, quiet: bool) -> int:
    """Read s16le PCM from stdin until it ends (or Ctrl-C); print events as decided."""
    import numpy as np

    from ..cli import INTERRUPTED
    from ..events import format_event

    live = detector.stream(sample_rate=rate, channels=channels)
    if not quiet:
        print(f"beats detect: reading {rate} Hz, {channels}-channel 16-bit PCM from stdin; "
              f"each event is printed at most {live.latency:.3f} s of audio after it ends",
              file=sys.stderr)
    frame = 2 * channels
    pending, code = b"", 0
    fd = sys.stdin.buffer.fileno()
    try:
        while chunk := os.read(fd, 1 << 15):
            data = pending + chunk
            whole = len(data) - len(data) % frame
            pending = data[whole:]
            if whole:
                samples = np.frombuffer(data[:whole], dtype="<i2").reshape(-1, channels)
                for event in live.push(samples):
                    print(format_event(event), flush=True)
    except KeyboardInterrupt:
        code = INTERRUPTED
    for event in live.flush():
        print(format_event(event), flush=True)
    if pending and not quiet:
        print(f"beats detect: ignored {len(pending)} trailing byte(s), less than one frame",
              file=sys.stderr)
    return code
