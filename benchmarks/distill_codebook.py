"""Codebook health of tokenizer distillation: does restarting dead codes help?

    python -m benchmarks.corpus CORPUS                    # 12 minutes of real audio, ~15 s
    python benchmarks/distill_codebook.py CORPUS [--teacher MODEL] [--steps 300] [--clips 8]

Distils the same tiny student (``tiny`` preset, 1024 codes of 256 as the paper) from the
same teacher on ``CORPUS/train`` twice, restarts of codes unused for ``--restart-after``
steps off (the original) and on, same seed, and scores both on ``CORPUS/heldout`` (fixed
crops) along the way. Without ``--teacher`` a tiny SSL teacher is first pre-trained here
for ``--teacher-steps`` steps (iteration 1: masked prediction of the random-projection
tokenizer's labels, `beats.train.ssl`), so that its features carry what it learned from
this audio rather than a random network's.

Printed per run: training cosine, codes hit per step (``codebook_usage``), codes hit in
the last 50 steps, perplexity of a step's codes (all from the last log window), codes
restarted, and on the held-out clips at the end: cosine, distinct codes and perplexity;
before them the held-out cosine of the best constant prediction (the teacher's mean
output), below which a cosine means nothing.
With the CPU and its load average: other jobs share the cores. On a machine that
other jobs load, run it with ``OMP_NUM_THREADS=1`` (spinning torch threads made the
tiny models here about ten times slower).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from beats import BEATs
from beats.train.data import ClipDataset, collate_clips, filterbank
from beats.train.distill import DistillConfig, distill
from beats.train.masking import mask_patches, num_patches, pad_masks
from beats.train.random_tokenizer import random_tokenizer
from beats.train.ssl import BEATsForPretraining, SSLConfig, summarize_metrics
from beats.train.unlabelled import find_audio, heldout_batches, heldout_dataset
from benchmarks.pretrain_bench import cpu_description, load_average


def pretrain_teacher(corpus: Path, out: Path, steps: int, seed: int) -> Path:
    """A tiny SSL model after ``steps`` steps of iteration-1 pre-training (8 x 4 s crops,
    75 % masked, AdamW lr 1e-3 with 10 % warm-up); its encoder saved to ``out``."""
    torch.manual_seed(seed)
    model = BEATsForPretraining(SSLConfig.preset("tiny")).train()
    tokenizer = random_tokenizer(seed)
    data = ClipDataset(find_audio([corpus / "train"]), crop_seconds=4.0, seed=seed)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    keys = [(i, order[i % len(order)]) for i in range(steps * 8)]
    loader = DataLoader(data, batch_sampler=[keys[i : i + 8] for i in range(0, len(keys), 8)],
                        collate_fn=collate_clips)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    warmup = max(1, steps // 10)
    for step, batch in enumerate(loader):
        for group in opt.param_groups:
            group["lr"] = 1e-3 * min(1.0, (step + 1) / warmup)
        features, frames = filterbank(batch["wav"], batch["lengths"], model.backbone.cfg)
        labels = tokenizer.labels_from_fbank(features, frames)
        masked = pad_masks([mask_patches(num_patches(int(n)), 0.75, g)
                            for n in batch["lengths"]], labels.shape[1])
        out_ = model(features, frames, masked, labels)
        opt.zero_grad()
        out_.loss(out_.count).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % 50 == 0 or step == 0:
            m = summarize_metrics(out_.metrics)
            print(f"  teacher step {step + 1}: loss {float(out_.loss(out_.count).detach()):.3f}, "
                  f"masked accuracy {m['masked_accuracy']:.3f}", flush=True)
    return model.export(out)


@torch.no_grad()
def constant_baseline(teacher: BEATs, corpus: Path) -> float:
    """Held-out cosine of the best constant prediction: the teacher's mean unit output over
    the valid patches of the held-out crops (the runs' fixed 4 s crops), against each patch.
    A distilled cosine means something only above it."""
    data = heldout_dataset(find_audio([corpus / "heldout"]), DistillConfig(crop_seconds=4.0))
    units = []
    for keys in heldout_batches(len(data), 8):
        batch = collate_clips([data[k] for k in keys])
        features, frames = filterbank(batch["wav"], batch["lengths"], teacher.cfg)
        out = teacher.forward_fbank(features, frames)
        units.append(torch.nn.functional.normalize(out.features[~out.padding_mask], dim=-1))
    u = torch.cat(units)  # (M, C) unit targets
    return float((u @ torch.nn.functional.normalize(u.mean(dim=0), dim=0)).mean())


def run(corpus: Path, teacher: Path, out: Path, args: argparse.Namespace, restart: int
        ) -> dict[str, float]:
    student = out / "student.json"
    student.write_text(json.dumps({"preset": "tiny", "quant_n": args.codes}))
    cfg = DistillConfig(steps=args.steps, batch_size=args.clips, crop_seconds=4.0, lr=args.lr,
                        warmup_ratio=0.08, student=str(student), restart_after=restart,
                        usage_window=50, seed=args.seed, num_workers=1, log_every=10,
                        eval_every=args.steps // 3, quiet=True)
    tic = time.perf_counter()
    distill(teacher, [corpus / "train"], cfg, out / f"restart-{restart}",
            heldout=[corpus / "heldout"])
    seconds = time.perf_counter() - tic
    lines = [json.loads(x) for x in (out / f"restart-{restart}" / "metrics.jsonl")
             .read_text().splitlines()]
    train = [x for x in lines if "cosine" in x]
    val = [x for x in lines if "val_cosine" in x]
    last = train[-1]
    restarted, before = 0.0, 0
    for x in train:  # each line holds the mean per step of its window
        restarted += x.get("codes_restarted", 0.0) * (x["step"] - before)
        before = x["step"]
    return {"restart": restart, "cosine": last["cosine"], "usage": last["codebook_usage"],
            "recent": last["codebook_usage_recent"], "perplexity": last["perplexity"],
            "restarted": restarted,
            "val_cosine": val[-1]["val_cosine"], "val_codes": val[-1]["val_codebook_usage"],
            "val_perplexity": val[-1]["val_perplexity"], "seconds": seconds,
            "trajectory": [(x["step"], x["codebook_usage_recent"]) for x in train]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("corpus", type=Path, help="a folder made by `python -m benchmarks.corpus`")
    p.add_argument("--teacher", help="a BEATs checkpoint (default: pre-train a tiny one here)")
    p.add_argument("--teacher-steps", type=int, default=300)
    p.add_argument("--steps", type=int, default=300, help="distillation steps per run")
    p.add_argument("--clips", type=int, default=8, help="4 s crops per distillation step")
    p.add_argument("--codes", type=int, default=1024)
    p.add_argument("--restart-after", type=int, default=20)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("distill-codebook"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{cpu_description()}; torch {torch.__version__}; load before: {load_average()}")
    teacher = args.teacher
    if teacher is None:
        teacher = args.out / "teacher"
        if not (teacher / "config.json").exists():
            print(f"pre-training a tiny SSL teacher ({args.teacher_steps} steps)", flush=True)
            pretrain_teacher(args.corpus, teacher, args.teacher_steps, args.seed)
    model = BEATs.from_pretrained(teacher).eval()
    baseline = constant_baseline(model, args.corpus)
    print(f"teacher: {teacher} ({type(model).__name__}); held-out cosine of its mean output "
          f"(the best constant prediction): {baseline:.3f}", flush=True)
    rows = []
    for restart in (0, args.restart_after):
        print(f"distilling, restart-after {restart} ...", flush=True)
        rows.append(run(args.corpus, Path(teacher), args.out, args, restart))
    print(f"load after: {load_average()}")
    print(f"\n{args.steps} steps of {args.clips} x 4 s, {args.codes} codes, lr {args.lr}; "
          "last log window "
          "(10 steps) and held-out clips at the end:\n")
    print("| restart after | train cosine | codes per step | codes in last 50 steps | "
          "perplexity | codes restarted | held-out cosine | held-out codes | "
          "held-out perplexity | s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['restart'] or 'off'} | {r['cosine']:.3f} | {r['usage']:.0f} | "
              f"{r['recent']:.0f} | {r['perplexity']:.1f} | {r['restarted']:.0f} | "
              f"{r['val_cosine']:.3f} | {r['val_codes']:.0f} | {r['val_perplexity']:.1f} | "
              f"{r['seconds']:.0f} |")
    for r in rows:
        shown = ", ".join(f"{s}: {u:.0f}" for s, u in r["trajectory"][::3])
        print(f"codes in the last 50 steps, restart {r['restart'] or 'off'}: {shown}")


if __name__ == "__main__":
    main()
