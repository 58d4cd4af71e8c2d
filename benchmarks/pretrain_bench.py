"""Pre-training throughput: the MAE speed-up of running the encoder on kept patches only.

    python benchmarks/pretrain_bench.py            # base preset, batch 4 x 10 s, 3 rounds
    python benchmarks/pretrain_bench.py --quick    # tiny preset, seconds: a smoke run

One training step is forward + backward + AdamW step of `BEATsForPretraining` on a batch
whose filterbank, labels (the random-projection tokenizer) and masks were made before the
clock starts (their cost, the same for every path, is printed once). Paths:

- ``masked-true`` / ``masked-scattered`` / ``masked-compacted``: 75 % of the patches
  masked, the encoder on the kept 25 % (`SSLConfig.positions` as named);
- ``full``: the same model and batch with nothing dropped: the encoder on every patch,
  the loss on every valid patch (what the step would cost without the MAE trick);
- ``*-bf16``: the same under CPU bfloat16 autocast (fast only with AMX/AVX512-BF16).

Rounds run every path once in turn; each path's best round is reported, so a busy machine
slows all paths alike. Columns: audio seconds per second, step seconds, speed relative to
``full`` (fp32). The machine (lscpu model name, bf16 support) and its load average
(``/proc/loadavg``, before and after) are printed with the figures: other processes
sharing the cores slow every path.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from beats.config import BEATsConfig
from beats.fbank import fbank
from beats.train.masking import mask_patches, num_patches, pad_masks
from beats.train.random_tokenizer import random_tokenizer
from beats.train.ssl import BEATsForPretraining, SSLConfig
from benchmarks.bench import test_audio


def cpu_description() -> str:
    """lscpu's model name, core count and whether the CPU has bfloat16 instructions."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU (no lscpu)"
    info = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in
                                                  text.splitlines())}
    flags = info.get("Flags", "").split()
    bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return (f"{info.get('Model name', '?')}, {info.get('CPU(s)', '?')} CPUs, "
            f"bf16: {'+'.join(bf16) if bf16 else 'none'}")


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def step_flops(cfg: SSLConfig, positions: int, kept: int) -> float:
    """Forward multiply-adds x 2 of one clip: front end on every patch, positional
    convolution and encoder layers on ``kept`` patches, predictor on all ``positions``."""
    m: BEATsConfig = cfg.model
    e, c, f, k = m.embed_dim, m.encoder_embed_dim, m.encoder_ffn_embed_dim, cfg.num_labels

    def layers(n: int, s: int) -> float:
        return n * (8 * s * c * c + 4 * s * c * f + 4 * s * s * c + 16 * s * c)

    front = 2 * positions * e * 256 + (2 * positions * e * c if e != c else 0)
    conv = 2 * kept * c * (c // m.conv_pos_groups) * m.conv_pos
    head = 2 * positions * c * c + 2 * positions * c * k
    return float(front + conv + layers(m.encoder_layers, kept)
                 + layers(cfg.predictor_layers, positions) + head)


def run(args: argparse.Namespace) -> list[dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = SSLConfig.preset(args.preset)
    model = BEATsForPretraining(cfg).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.98),
                                  weight_decay=0.01)
    num_samples = round(args.seconds * 16000)
    wav = test_audio(args.batch, num_samples)
    start = time.perf_counter()
    features, frames = fbank(wav)
    labels = random_tokenizer(0, num_labels=cfg.num_labels).labels_from_fbank(features, frames)
    prep = time.perf_counter() - start
    positions = num_patches(num_samples)
    generator = torch.Generator().manual_seed(0)
    masked = pad_masks([mask_patches(positions, cfg.mask_ratio, generator)
                        for _ in range(args.batch)], positions)
    nothing = torch.zeros_like(masked)
    kept = positions - int(masked[0].sum())
    valid = labels >= 0

    def step(positions_mode: str | None, bf16: bool) -> Callable[[], None]:
        def go() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                if positions_mode is None:  # full: nothing dropped, loss everywhere
                    model.cfg.positions = "true"
                    out = model(features, frames, nothing)
                    loss = F.cross_entropy(out.logits[valid].float(), labels[valid])
                else:
                    model.cfg.positions = positions_mode
                    out = model(features, frames, masked, labels)
                    loss = out.loss(out.count)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return go

    paths = {"full": step(None, False)}
    for mode in args.positions:
        paths[f"masked-{mode}"] = step(mode, False)
    if args.bf16:
        paths["full-bf16"] = step(None, True)
        paths[f"masked-{args.positions[0]}-bf16"] = step(args.positions[0], True)

    params = model.num_parameters()
    encoder = model.num_parameters(encoder_only=True)
    ratio = step_flops(cfg, positions, positions) / step_flops(cfg, positions, kept)
    print(f"# machine: {cpu_description()}; {torch.get_num_threads()} threads; "
          f"torch {torch.__version__}; load average before: {load_average()}")
    print(f"# preset {args.preset}: {params / 1e6:.1f} M parameters ({encoder / 1e6:.1f} M "
          f"encoder, exported); batch {args.batch} x {args.seconds:g} s, {positions} "
          f"patches per clip, {kept} kept; forward FLOPs full / masked = {ratio:.2f}; "
          f"filterbank + labels {prep:.2f} s per batch (not in the step times); "
          f"best of {args.repeats} rounds")
    for fn in paths.values():  # warm-up: allocator, optimiser state
        fn()
    best = {name: float("inf") for name in paths}
    for _ in range(args.repeats):
        for name, fn in paths.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    rows = []
    print("| path | audio s/s | step s | vs full |")
    print("|---|---:|---:|---:|")
    for name in paths:
        row = dict(path=name, audio_per_s=args.batch * args.seconds / best[name],
                   step_s=best[name], speedup=best["full"] / best[name])
        rows.append(row)
        print(f"| {name} | {row['audio_per_s']:.2f} | {row['step_s']:.2f} | "
              f"{row['speedup']:.2f}x |")
    print(f"# load average after: {load_average()}")
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="tiny preset, batch 2 x 2 s, one round: a smoke run")
    p.add_argument("--preset", default="base", choices=("tiny", "base", "large"))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (best is reported)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--positions", default="true,scattered,compacted",
                   help="comma-separated SSLConfig.positions values to time masked")
    p.add_argument("--no-bf16", dest="bf16", action="store_false",
                   help="skip the bfloat16 autocast paths")
    args = p.parse_args(argv)
    args.positions = args.positions.split(",")
    if args.quick:
        args.preset, args.batch, args.seconds, args.repeats = "tiny", 2, 2.0, 1
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
