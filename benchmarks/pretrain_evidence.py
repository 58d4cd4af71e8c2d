"""Evidence that `beats pretrain` learns: held-out masked accuracy and a linear probe.

    python benchmarks/pretrain_evidence.py OUT [--positions true compacted]
        [--probe-seeds 5] [-- extra beats pretrain options (--steps N, ...)]

1. Makes the real corpus (`benchmarks.corpus`: 12 min of espeak-ng speech and sox
   signals, held-out clips, a 7-class labelled probe set) in ``OUT/corpus`` unless there.
2. For each ``--positions``, runs the real command, ``python -m beats pretrain
   OUT/corpus/train --heldout OUT/corpus/heldout --config tiny --positions P``, into
   ``OUT/pretrain-P`` (an existing finished run is reused): its held-out lines give the
   masked accuracy against two baselines over the same held-out masked patches: the most
   frequent label's rate and copying the nearest kept patch of the same frequency band.
3. Probes: ``beats probe OUT/corpus/probe -m MODEL`` (linear, on time-averaged last-layer
   features) for every pre-trained model and for the same architecture at its
   initialisation (the weights the run started from: same seed, no training), each with
   ``--probe-seeds`` different stratified splits; test accuracy mean and range.

Prints the CPU, the load average, wall times and a table; writes ``OUT/evidence.json``.
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


def beats(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "beats", *args], env=env, text=True,
                          capture_output=True)
    if proc.returncode != 0:
        raise SystemExit(f"beats {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc


def initial_model(run: Path, out: Path) -> Path:
    """The backbone a run started from: `BEATsForPretraining` built as `pretrain` builds
    it (its SSL config, seeded by its seed), saved untrained."""
    from beats.train.ssl import BEATsForPretraining, SSLConfig

    record = json.loads((run / "config.json").read_text())
    torch.manual_seed(record["config"]["seed"])
    model = BEATsForPretraining(SSLConfig.from_dict({**record["ssl_config"], "preset": "tiny"}))
    return model.export(out)


def probe(data: Path, model: Path, out: Path, seeds: int) -> list[float]:
    """Test accuracies of ``seeds`` linear probes (other splits and head seeds); the
    embeddings are computed once, by the first."""
    accuracies = []
    for seed in range(seeds):
        target = out / f"seed{seed}"
        source = ["-m", str(model)] if seed == 0 else ["--embeddings",
                                                        str(out / "seed0" / "embeddings")]
        if not (target / "report.json").exists():
            beats("probe", str(data), "-o", str(target), *source, "--seed", str(seed),
                  "-j", "0", "-q")
        accuracies.append(json.loads((target / "report.json").read_text())["test"]["accuracy"])
    return accuracies


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--positions", nargs="+", default=["true", "compacted"],
                   choices=["true", "compacted", "scattered"])
    p.add_argument("--probe-seeds", type=int, default=5)
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:cut])
    extra = argv[cut + 1:]  # after --: more beats pretrain options (--steps, --lr, ...)
    out: Path = args.out
    print(f"CPU: {cpu_description()}; torch {torch.__version__}; load before: "
          f"{load_average()}")
    corpus = out / "corpus"
    if not (corpus / "corpus.json").exists():
        subprocess.run([sys.executable, "-m", "benchmarks.corpus", str(corpus)], check=True,
                       cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    results: dict[str, dict] = {}
    for positions in args.positions:
        run = out / f"pretrain-{positions}"
        tic = time.perf_counter()
        if not (run / "model" / "config.json").exists():
            beats("pretrain", str(corpus / "train"), "--heldout", str(corpus / "heldout"),
                  "-o", str(run), "--config", "tiny", "--positions", positions, "-q",
                  "--resume", *extra)
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        val = [x for x in lines if "val_masked_accuracy" in x]
        train = [x for x in lines if "loss" in x]
        results[positions] = {
            "seconds": round(time.perf_counter() - tic, 1),
            "steps": val[-1]["step"],
            "curve": [(x["step"], round(x["val_masked_accuracy"], 4)) for x in val],
            "heldout_masked_accuracy": val[-1]["val_masked_accuracy"],
            "best_heldout_masked_accuracy": max(x["val_masked_accuracy"] for x in val),
            "majority": val[-1]["val_majority"], "neighbour": val[-1]["val_neighbour"],
            "train_masked_accuracy": train[-1]["masked_accuracy"],
            "audio_seconds_per_second": sum(x["audio_seconds_per_second"] for x in train[1:])
            / max(len(train) - 1, 1),
            "probe": probe(corpus / "probe", run / "model", out / f"probe-{positions}",
                           args.probe_seeds),
        }
        print(json.dumps({positions: results[positions]}), flush=True)
    first = out / f"pretrain-{args.positions[0]}"
    init = initial_model(first, out / "initial-model")
    results["initial"] = {"probe": probe(corpus / "probe", init, out / "probe-initial",
                                         args.probe_seeds)}
    print(f"load after: {load_average()}")
    print("\n| run | held-out masked acc (best) | most frequent label | nearest kept patch "
          "| probe test acc, mean [min, max] |")
    print("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        acc = r["probe"]
        shown = f"{sum(acc) / len(acc):.3f} [{min(acc):.3f}, {max(acc):.3f}]"
        if name == "initial":
            print(f"| tiny at initialisation (untrained) | - | - | - | {shown} |")
            continue
        print(f"| tiny, positions={name}, {r['steps']} steps | "
              f"{r['heldout_masked_accuracy']:.3f} ({r['best_heldout_masked_accuracy']:.3f})"
              f" | {r['majority']:.3f} | {r['neighbour']:.3f} | {shown} |")
    (out / "evidence.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
