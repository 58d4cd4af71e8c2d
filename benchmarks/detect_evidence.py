"""Evidence for strong-label fine-tuning: sound event detection on held-out soundscapes.

    python -m benchmarks.detect_evidence [--train 400] [--val 40] [--test 100] [--seeds 1]
        [--epochs 20] [--json PATH] [--keep DIR]
    python -m benchmarks.detect_evidence --quick        # seconds: a smoke run

1. Makes three sets of 10 s soundscapes with `benchmarks.soundscapes` (beeps, chirps and
   buzzes over pink or brown noise, 0 to 3 events a clip), each from its own seed:
   training, validation (the best checkpoint and the post-processing) and a held-out test
   set that nothing is chosen on.
2. For each training seed, starts from the same small random `BEATs` (seeded) and trains
   it twice with the same clips and settings: ``FinetuneConfig(strong=True)`` (the event
   times: a target per 160 ms step, random 4 s crops that carry their events) and
   ``FinetuneConfig(strong=False)`` (each clip's classes only, as a tagger is trained; it
   reads whole clips, since its labels describe whole clips). The third row is the same
   backbone with a new random head and no training.
3. Chooses each model's post-processing on the validation set (threshold and median
   filter, the best mean of segment and event macro F1; ``--threshold`` and
   ``--median-filter`` fix them instead), then scores the three on the test set with
   `beats.train.strong.evaluate_detection`: segment F1 (1 s), event F1 (collars 200 ms /
   20 %), macro (mean over classes) and micro (counts summed), and PSDS (DCASE
   scenario 1, from the frame scores, every threshold).

Prints the CPU, torch, the commit, the seeds, the split sizes, wall time and a table (the
mean over seeds, with the range when there are several); ``--json`` writes it all.
The target: strong labels reach segment F1 >= 0.8 and event F1 >= 0.6 (macro) and beat
weak labels on both.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from beats import BEATs, BEATsConfig  # noqa: E402
from beats.detect import DetectConfig  # noqa: E402
from beats.labelled import LabelledSet, read_strong_tsv  # noqa: E402
from beats.train import FinetuneConfig, finetune  # noqa: E402
from beats.train.finetune import prepare_model  # noqa: E402
from beats.train.strong import evaluate_detection  # noqa: E402
from benchmarks.pretrain_bench import cpu_description, load_average  # noqa: E402
from benchmarks.soundscapes import make_soundscapes  # noqa: E402

SIZES = {  # small random backbones (the released layout: deep norm, relative positions)
    "tiny": dict(encoder_layers=3, encoder_embed_dim=48, encoder_ffn_embed_dim=96,
                 encoder_attention_heads=4, embed_dim=32, conv_pos=16, conv_pos_groups=4),
    "small": dict(encoder_layers=4, encoder_embed_dim=96, encoder_ffn_embed_dim=192,
                  encoder_attention_heads=4, embed_dim=64, conv_pos=16, conv_pos_groups=4),
}
LAYOUT = dict(activation_fn="gelu", layer_norm_first=False, deep_norm=True,
              relative_position_embedding=True, num_buckets=320, max_distance=800,
              gru_rel_pos=True)
DATA_SEEDS = {"train": 1, "val": 2, "test": 3}
METHODS = ("strong", "weak", "none")
NAMES = {"strong": "strong labels", "weak": "weak labels (whole clips)",
         "none": "no fine-tuning (random head)"}
THRESHOLDS = (0.1, 0.3, 0.5, 0.7, 0.9)  # the post-processing tried on validation
MEDIANS = (0.0, 0.5, 1.0)  # seconds
COLUMNS = (("segment_f1", "macro_f1"), ("segment_f1", "f1"), ("event_f1", "macro_f1"),
           ("event_f1", "f1"), ("psds", None))
TARGET = {"segment_f1": 0.8, "event_f1": 0.6}


def git_commit() -> str:
    """The checkout's short commit, ``+changes`` when files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, text=True, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty.strip() else "")


def backbone(size: str, seed: int) -> BEATs:
    """A small random BEATs of ``SIZES[size]``, initialised from ``seed``."""
    torch.manual_seed(seed)
    return BEATs(BEATsConfig(**SIZES[size], **LAYOUT))


def training_set(train_tsv: Path, val_tsv: Path) -> LabelledSet:
    """The training and validation soundscapes as one set: folds ``train`` and ``val``."""
    a, b = read_strong_tsv(train_tsv), read_strong_tsv(val_tsv)
    classes = sorted(set(a.classes) | set(b.classes))
    return LabelledSet(a.sources + b.sources, a.labels + b.labels,
                       ["train"] * len(a) + ["val"] * len(b), classes=classes,
                       multilabel=True, events=list(a.events) + list(b.events))


def untrained(model: BEATs, classes: list[str], cfg: FinetuneConfig) -> BEATs:
    """``model`` with a new random head of ``classes`` and no training."""
    return prepare_model(model, classes, True, cfg).eval()


def post_processing(model: BEATs, val_tsv: Path, args: argparse.Namespace
                    ) -> DetectConfig:
    """The `DetectConfig` with the best mean of segment and event macro F1 on the
    validation set, over `THRESHOLDS` x `MEDIANS` (those fixed by the options only)."""
    best, chosen = -1.0, DetectConfig()
    for threshold in THRESHOLDS if args.threshold is None else (args.threshold,):
        for median in MEDIANS if args.median_filter is None else (args.median_filter,):
            detect = DetectConfig(threshold=threshold, median_filter=median)
            r = evaluate_detection(model, val_tsv, detect=detect, batch=16)
            f1 = [r[m]["macro_f1"] or 0.0 for m in ("segment_f1", "event_f1")]
            if sum(f1) / 2 > best:
                best, chosen = sum(f1) / 2, detect
    return chosen


def run_seed(seed: int, data: LabelledSet, sets: dict[str, Path], args: argparse.Namespace,
             out: Path) -> dict[str, Any]:
    """The three rows of one training seed: {method: evaluate_detection's dict on the test
    set, plus ``seconds`` of training and the post-processing chosen}."""
    cfg = FinetuneConfig(
        epochs=args.epochs, batch_size=args.batch, lr=args.lr, crop_seconds=args.crop,
        layer_lr_decay=1.0, freq_mask=0, val_fold="val", test_fraction=0.0, seed=seed,
        num_workers=0, eval_batch=16, quiet=True, patience=0)
    start = backbone(args.size, seed)
    rows = {}
    for method in METHODS:
        tic = time.perf_counter()
        if method == "none":
            model = untrained(start, data.classes, cfg)
        else:
            strong = method == "strong"
            run_cfg = dataclasses.replace(cfg, strong=strong,
                                          crop_seconds=args.crop if strong else args.seconds)
            model = finetune(start, data, run_cfg, out / f"{method}-seed{seed}").model
        seconds = time.perf_counter() - tic
        detect = post_processing(model, sets["val"], args)
        rows[method] = {**evaluate_detection(model, sets["test"], detect=detect, batch=16),
                        "seconds": round(seconds, 1)}
        print(f"seed {seed} {method}: {summary(rows[method])} ({seconds:.0f} s)", flush=True)
    return rows


def value(row: dict[str, Any], metric: str, key: str | None) -> float:
    """One figure of an evaluate_detection dict (NaN when it has none)."""
    x = row[metric] if key is None else row[metric][key]
    return float("nan") if x is None else float(x)


def summary(row: dict[str, Any]) -> str:
    """One line: the table's figures and the post-processing."""
    figures = ", ".join(f"{m}{'.' + k if k else ''} {value(row, m, k):.3f}" for m, k in COLUMNS)
    return f"{figures}; {post_text(row)}"


def post_text(row: dict[str, Any]) -> str:
    """``threshold T, median M s`` of an evaluate_detection dict."""
    return f"threshold {row['detect']['threshold']:g}, median {row['detect']['median_filter']:g} s"


def cell(values: list[float]) -> str:
    """The mean, and the range ``[min, max]`` of several."""
    if any(math.isnan(v) for v in values):
        return "-"
    mean = f"{np.mean(values):.3f}"
    return mean if len(values) == 1 else f"{mean} [{min(values):.3f}, {max(values):.3f}]"


def table(runs: list[dict[str, Any]]) -> str:
    """The markdown table: one row per method, the mean (and range) over seeds."""
    lines = ["| model | segment F1 macro | segment F1 micro | event F1 macro | event F1 "
             "micro | PSDS | post-processing | training s |",
             "|---|---:|---:|---:|---:|---:|---|---:|"]
    for method in METHODS:
        cells = [cell([value(r[method], m, k) for r in runs]) for m, k in COLUMNS]
        posts = sorted({post_text(r[method]) for r in runs})
        seconds = np.mean([r[method]["seconds"] for r in runs])
        lines.append(f"| {NAMES[method]} | {' | '.join(cells)} | {'; '.join(posts)} "
                     f"| {seconds:.0f} |")
    return "\n".join(lines)


def target_met(runs: list[dict[str, Any]]) -> bool:
    """Strong labels reach `TARGET` (macro F1, mean over seeds) and beat weak labels."""
    for metric, floor in TARGET.items():
        strong = np.mean([value(r["strong"], metric, "macro_f1") for r in runs])
        weak = np.mean([value(r["weak"], metric, "macro_f1") for r in runs])
        if not (strong >= floor and strong > weak):
            return False
    return True


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=int, default=400, help="training clips")
    p.add_argument("--val", type=int, default=40, help="validation clips")
    p.add_argument("--test", type=int, default=100, help="held-out test clips")
    p.add_argument("--seconds", type=float, default=10.0, help="length of each clip")
    p.add_argument("--seeds", type=int, default=1, help="training seeds: 0, 1, ...")
    p.add_argument("--size", choices=sorted(SIZES), default="tiny", help="the backbone")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch", type=int, default=4, help="clips per step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--crop", type=float, default=4.0,
                   help="seconds of the strong-label training crops")
    p.add_argument("--median-filter", type=float, default=None,
                   help="seconds of the evaluation's median filter (default: chosen on "
                   "validation)")
    p.add_argument("--threshold", type=float, default=None,
                   help="the evaluation's threshold (default: chosen on validation)")
    p.add_argument("--quick", action="store_true", help="a few clips, one epoch: seconds")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--keep", type=Path, default=None,
                   help="make the data and runs in this folder and keep them")
    args = p.parse_args(argv)
    if args.quick:
        args.train, args.val, args.test, args.epochs, args.seeds = 12, 4, 6, 1, 1
        args.median_filter = 0.5 if args.median_filter is None else args.median_filter
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    tic = time.perf_counter()
    machine = {"cpu": cpu_description(), "torch": torch.__version__, "commit": git_commit(),
               "load_before": load_average()}
    print(f"CPU: {machine['cpu']}; torch {machine['torch']}; commit {machine['commit']}; "
          f"load {machine['load_before']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="beats-detect-evidence-") as tmp:
        out = args.keep or Path(tmp)
        sets = {name: make_soundscapes(out / "data" / name, count, args.seconds,
                                       DATA_SEEDS[name])
                for name, count in (("train", args.train), ("val", args.val),
                                    ("test", args.test))}
        sizes = {name: {"clips": len(d), "events": sum(len(e) for e in d.events)}
                 for name, d in ((n, read_strong_tsv(t)) for n, t in sets.items())}
        print("data (seed, clips, events): " + "; ".join(
            f"{n} {DATA_SEEDS[n]}, {s['clips']}, {s['events']}" for n, s in sizes.items()),
            flush=True)
        data = training_set(sets["train"], sets["val"])
        runs = [run_seed(seed, data, sets, args, out / "runs")
                for seed in range(args.seeds)]
    seconds = time.perf_counter() - tic
    machine["load_after"] = load_average()
    text = table(runs)
    met = target_met(runs)
    print(f"\n{args.seeds} training seed(s); data seeds {DATA_SEEDS}; backbone {args.size}; "
          f"{args.epochs} epochs, batch {args.batch}, lr {args.lr:g}, strong crops "
          f"{args.crop:g} s, weak whole clips; wall time {seconds:.0f} s; load after "
          f"{machine['load_after']}\n")
    print(text)
    print(f"\ntarget (strong: segment F1 >= {TARGET['segment_f1']}, event F1 >= "
          f"{TARGET['event_f1']}, macro, and above weak on both): "
          f"{'met' if met else 'NOT met'}")
    result = {"machine": machine, "settings": {k: str(v) if isinstance(v, Path) else v
                                               for k, v in vars(args).items()},
              "data_seeds": DATA_SEEDS, "splits": sizes, "wall_seconds": round(seconds, 1),
              "runs": runs, "table": text, "target_met": met}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
