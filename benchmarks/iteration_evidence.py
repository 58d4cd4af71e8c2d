"""Evidence for the BEATs iteration: iteration 2 (a distilled tokenizer) against iteration 1.

    python benchmarks/iteration_evidence.py OUT [--config tiny] [--iterations 2]
        [--corpus DIR] [--probe-seeds 5] [-- extra beats iterate options]

1. The corpus: ``--corpus DIR`` (a folder with ``train/``, ``heldout/`` and a labelled
   ``probe/`` with one subfolder per class, e.g. your own audio), else the real corpus of
   `benchmarks.corpus` (12 min of espeak-ng speech and sox signals, held-out clips, a
   7-class probe set) made in ``OUT/corpus``.
2. Runs the real command, ``python -m beats iterate CORPUS/train --heldout CORPUS/heldout
   --probe CORPUS/probe --iterations N --config C -o OUT/iterate`` (run again, it continues
   where it stopped), whose summary gives per iteration the held-out masked accuracy
   against the most frequent label's rate, the labels used per batch and the distilled
   codebook's usage.
3. Probes each iteration's model ``--probe-seeds`` times (other stratified splits, the
   embeddings computed once): test accuracy mean and range.

At base size on GPUs (what the paper's gain needs; see docs/performance/benchmarks.md)::

    python benchmarks/iteration_evidence.py runs/base --config base --corpus /data/audio \\
        -- --device cuda --dtype bfloat16

Prints the CPU, the load average, wall time and a table; writes ``OUT/evidence.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.pretrain_bench import cpu_description, load_average  # noqa: E402
from benchmarks.pretrain_evidence import probe  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--config", default="tiny", help="the SSL model preset (tiny, base, large)")
    p.add_argument("--iterations", type=int, default=2)
    p.add_argument("--corpus", type=Path, default=None,
                   help="a folder with train/, heldout/ and probe/ (default: make one)")
    p.add_argument("--probe-seeds", type=int, default=5)
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:cut])
    extra = argv[cut + 1:]  # after --: more beats iterate options
    out: Path = args.out
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    print(f"CPU: {cpu_description()}; torch {torch.__version__}; load before: "
          f"{load_average()}", flush=True)
    corpus = args.corpus or out / "corpus"
    if args.corpus is None and not (corpus / "corpus.json").exists():
        subprocess.run([sys.executable, "-m", "benchmarks.corpus", str(corpus)], check=True,
                       cwd=ROOT, env=env)
    tic = time.perf_counter()
    run = out / "iterate"
    proc = subprocess.run(
        [sys.executable, "-m", "beats", "iterate", str(corpus / "train"), "--heldout",
         str(corpus / "heldout"), "--probe", str(corpus / "probe"), "--iterations",
         str(args.iterations), "--config", args.config, "-o", str(run), "-q", *extra],
        env=env, text=True, capture_output=True)
    if proc.returncode != 0:
        raise SystemExit(f"beats iterate failed:\n{proc.stderr[-3000:]}")
    seconds = time.perf_counter() - tic
    rows = json.loads((run / "summary.json").read_text())
    for row in rows:
        k = row["iteration"]
        row["probe_seeds"] = probe(corpus / "probe", run / f"iter{k}" / "pretrain" / "model",
                                   out / f"probe-iter{k}", args.probe_seeds)
    print(f"load after: {load_average()}; beats iterate took {seconds:.0f} s")
    print("\n| iteration | tokenizer | held-out masked acc | its most frequent label "
          "| labels used per batch | distilled codebook usage | probe test acc, mean "
          "[min, max] |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        acc = r["probe_seeds"]
        usage = "-" if r["codebook_usage"] is None else f"{r['codebook_usage']:.0f}"
        print(f"| {r['iteration']} | {r['tokenizer']} | {r['heldout_masked_accuracy']:.3f} "
              f"| {r['heldout_majority']:.3f} | {r['labels_used']:.0f} | {usage} "
              f"| {sum(acc) / len(acc):.3f} [{min(acc):.3f}, {max(acc):.3f}] |")
    (out / "evidence.json").write_text(json.dumps({"seconds": seconds, "rows": rows},
                                                  indent=2))


if __name__ == "__main__":
    main()
