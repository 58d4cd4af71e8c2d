"""Training throughput: `beats.train.fit` against a plain loop over the original computation.

    python benchmarks/train_bench.py            # base architecture, batch 4 x 10 s, fp32
    python benchmarks/train_bench.py --quick    # tiny model, 2 x 2 s: a smoke run

Every path trains the same random weights (the base architecture, 90 M parameters; speed
does not depend on the weights) on the same batch of clips, one optimiser step per
batch, with AdamW and a per-position linear head averaged over positions, no dropout:

- ``baseline``: a plain loop: `benchmarks.original.OriginalBEATs` forward (the original's
  computation: per-clip filterbank, (S, B, C) layout, explicit attention) with autograd,
  head, cross-entropy, backward, AdamW step;
- ``fit-fp32`` (and ``fit-bf16``, autocast): `beats.train.fit` with the fine-tuning task
  on the clips held in memory (data loading, SpecAugment off, gradient clipping, the
  schedule, logging: the whole loop), its steps timed from ``metrics.jsonl``.

Columns: audio seconds trained per second (best step after a warm-up step), peak RSS of
the process while the path ran (in brackets: above what was resident before), speed
relative to the baseline. Other processes on the machine slow every path; the load
average is printed with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from beats import BEATs, BEATsConfig
from beats.train.data import Clip
from beats.train.finetune import FinetuneConfig, FinetuneTask, prepare_model
from beats.train.loop import fit
from benchmarks.bench import BASE, TINY, Memory, cpu_name, test_audio
from benchmarks.original import OriginalBEATs

CLASSES = ["a", "b", "c", "d"]


def baseline_steps(model: BEATs, wav: torch.Tensor, targets: torch.Tensor, steps: int,
                   autocast: torch.dtype | None = None) -> list[float]:
    """Seconds per optimiser step of the plain loop over the original computation, on the
    device of ``model`` and ``wav`` (float32, or under ``autocast`` of that dtype)."""
    device = wav.device
    original = OriginalBEATs(model)
    params = original.trainable()
    head = torch.nn.Linear(model.cfg.encoder_embed_dim, len(CLASSES)).to(device)
    opt = torch.optim.AdamW([*params, *head.parameters()], lr=1e-4)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=autocast or torch.float32,
                            enabled=autocast is not None):
            features, _ = original.forward(wav)
            logits = head(features).mean(dim=1).float()
        loss = F.cross_entropy(logits, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def fit_steps(model: BEATs, wav: torch.Tensor, targets: torch.Tensor, steps: int,
              dtype: str, device: str = "cpu") -> list[float]:
    """Seconds per optimiser step of `fit` (from its metrics.jsonl, one line per step);
    ``wav`` and ``model`` on the CPU, training on ``device``."""
    clips = [Clip(w.numpy(), int(t), w.numel() / 16000) for w, t in zip(wav, targets,
                                                                         strict=True)]
    cfg = FinetuneConfig(steps=steps, batch_size=len(clips), lr=1e-4, dtype=dtype,
                         num_workers=0, log_every=1, save_every=10**6, quiet=True,
                         device=device, crop_seconds=wav.shape[1] / 16000, time_mask=0.0,
                         freq_mask=0, head_dropout=0.0, warmup_steps=1, layer_lr_decay=1.0)
    task = FinetuneTask(prepare_model(model, CLASSES, False, cfg), clips, [], CLASSES,
                        False, cfg)
    with tempfile.TemporaryDirectory(prefix="beats-train-bench-") as out:
        fit(task, cfg, out)
        lines = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    seconds = wav.shape[0] * wav.shape[1] / 16000
    return [seconds / x["audio_seconds_per_second"] for x in lines]


def run(args: argparse.Namespace) -> list[dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = BEATs(BEATsConfig(**(TINY if args.quick else BASE), dropout=0.0,
                              attention_dropout=0.0)).train()
    num_samples = round(args.seconds * 16000)
    wav = test_audio(args.batch, num_samples)
    targets = torch.arange(args.batch) % len(CLASSES)
    params = sum(p.numel() for p in model.parameters())
    print(f"# machine: {cpu_name()}, {torch.get_num_threads()} threads; torch "
          f"{torch.__version__}; load average before: {os.getloadavg()[0]:.2f}")
    print(f"# model: {'tiny' if args.quick else 'base'} architecture ({params / 1e6:.1f} M "
          f"parameters), random weights; batch {args.batch} x {args.seconds:g} s; "
          f"{args.steps} steps per path, the first not counted")
    memory = Memory(torch.device("cpu"))
    paths = {"baseline": lambda: baseline_steps(model, wav, targets, args.steps),
             "fit-fp32": lambda: fit_steps(model, wav, targets, args.steps, "float32")}
    if args.bf16:
        paths["fit-bf16"] = lambda: fit_steps(model, wav, targets, args.steps, "bfloat16")
    rows = []
    for name, fn in paths.items():
        memory.reset()
        times = fn()
        best = min(times[1:]) if len(times) > 1 else times[0]
        rows.append(dict(path=name, audio_per_s=args.batch * args.seconds / best,
                         step_s=best, peak_mib=memory.peak(),
                         work_mib=memory.peak() - memory.start))
    base = rows[0]["audio_per_s"]
    print("| path | audio s/s | s per step | peak RSS MiB (+ path) | vs baseline |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        r["speedup"] = r["audio_per_s"] / base
        print(f"| {r['path']} | {r['audio_per_s']:.2f} | {r['step_s']:.2f} | "
              f"{r['peak_mib']:.0f} (+{r['work_mib']:.0f}) | {r['speedup']:.2f}x |")
    print(f"# load average after: {os.getloadavg()[0]:.2f}")
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, 2 x 2 s, 3 steps")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--steps", type=int, default=4, help="steps per path (first not counted)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--no-bf16", dest="bf16", action="store_false",
                   help="skip the bfloat16 autocast path")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.seconds, args.steps = 2, 2.0, 3
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    np.set_printoptions(precision=3)
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
