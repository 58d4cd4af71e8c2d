"""Throughput of BEATs paths against the original computation, measured in one run.

    python benchmarks/bench.py            # base model, batch 4 x 10 s, 10-minute file
    python benchmarks/bench.py --quick    # tiny model, seconds: a smoke run

Paths: ``baseline`` (benchmarks/original.py: the original's computation, float32),
``fast-fp32`` and ``fast-bf16`` (`BEATs.embed`), ``fast-fp16`` (GPU only) and, with
``--compile``, ``compiled-fp32`` (``torch.compile`` of the waveform-to-features graph).
The fast paths use the default attention implementation (``auto``); ``--attn sdpa,eager``
adds each fast path again with those (``fast-bf16:sdpa``, ...). The last column names the
attention implementation each path ran.
Rounds run every path once in turn; each path's best round is reported, so a noisy
machine slows all paths alike. Columns: audio seconds per second; achieved GFLOP/s
(`model_flops`); peak RSS of the process during the path and the part above what was
resident before it (on GPU: peak allocated memory); speed relative to the baseline; and
the features' max |diff| and smallest per-position cosine against the baseline's.
A last line times `extract_windowed` on one long file (default 10 minutes).

Weights: ``--checkpoint`` (a Microsoft .pt), else the cached BEATs_iter3_plus_AS2M when
the loader can find it offline, else random weights (the original's initialisation):
speed and agreement do not depend on the weights.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from beats import BEATs, BEATsConfig, extract_windowed
from beats.fbank import num_frames
from benchmarks.original import OriginalBEATs

BASE = dict(  # BEATs_iter3_plus_AS2M: 90 M parameters
    encoder_layers=12, encoder_embed_dim=768, encoder_ffn_embed_dim=3072,
    encoder_attention_heads=12, activation_fn="gelu", layer_norm_first=False, deep_norm=True,
    conv_bias=False, conv_pos=128, conv_pos_groups=16, relative_position_embedding=True,
    num_buckets=320, max_distance=800, gru_rel_pos=True, embed_dim=512,
    layer_wise_gradient_decay_ratio=0.6,
)
TINY = dict(  # the reference vectors' postnorm_gru layout
    encoder_layers=3, encoder_embed_dim=48, encoder_ffn_embed_dim=96, encoder_attention_heads=4,
    activation_fn="gelu", layer_norm_first=False, deep_norm=True, conv_pos=16,
    conv_pos_groups=4, relative_position_embedding=True, num_buckets=320, max_distance=800,
    gru_rel_pos=True, embed_dim=32,
)


def model_flops(cfg: BEATsConfig, positions: int) -> float:
    """Multiply-adds x 2 of one clip with S = ``positions`` patches (filterbank excluded).

    patch conv 2 S E 256; projection (E != C) 2 S E C; positional conv 2 S C (C / G) K;
    per layer: projections q, k, v, out 8 S C^2, feed-forward 4 S C F (GLU 6 S C F),
    scores and weighted sum 4 S^2 C, GRU gate 16 S C.
    """
    s, e, c, f = positions, cfg.embed_dim, cfg.encoder_embed_dim, cfg.encoder_ffn_embed_dim
    total = 2 * s * e * 256 + 2 * s * c * (c // cfg.conv_pos_groups) * cfg.conv_pos
    if e != c:
        total += 2 * s * e * c
    ffn = 6 * s * c * f if cfg.activation_fn == "glu" else 4 * s * c * f
    layer = 8 * s * c * c + ffn + 4 * s * s * c + (16 * s * c if cfg.gru_rel_pos else 0)
    return float(total + cfg.encoder_layers * layer)


def test_audio(batch: int, num_samples: int, seed: int = 0) -> torch.Tensor:
    """(B, N) chirps plus noise in [-1, 1], a different clip per row."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(num_samples) / 16000
    rows = []
    for b in range(batch):
        f0 = 100.0 * (b + 1)
        chirp = 0.3 * torch.sin(2 * torch.pi * (f0 + 400 * t / (t[-1] + 1)) * t)
        rows.append(chirp + 0.05 * torch.randn(num_samples, generator=g))
    return torch.stack(rows).clamp(-1, 1)


class Memory:
    """Peak memory of one path: RSS on CPU (Linux resets the peak), allocator on GPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start = 0.0

    @staticmethod
    def _status(key: str) -> float | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return float(line.split()[1]) / 1024  # kB -> MiB
        except OSError:
            return None
        return None

    def reset(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device) / 2**20
            return
        with contextlib.suppress(OSError, AttributeError):  # glibc: hand freed memory back,
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # so that RSS is what is alive now
        with contextlib.suppress(OSError):  # writing 5 resets the peak RSS (VmHWM)
            Path("/proc/self/clear_refs").write_text("5")
        self.start = self._status("VmRSS") or 0.0

    def peak(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        hwm = self._status("VmHWM")
        if hwm is None:  # no /proc: the lifetime peak (ru_maxrss: kB on Linux, B on macOS)
            scale = 2**20 if platform.system() == "Darwin" else 2**10
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale
        return hwm


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_model(args: argparse.Namespace) -> tuple[BEATs, str]:
    if args.quick:
        torch.manual_seed(0)
        return BEATs(BEATsConfig(**TINY)).eval(), "tiny random (postnorm_gru layout)"
    if args.checkpoint:
        return BEATs.from_pretrained(args.checkpoint), str(args.checkpoint)
    try:  # the registry loader (when present) finds a cached checkpoint offline
        model = BEATs.from_pretrained("BEATs_iter3_plus_AS2M", local_files_only=True)
        return model, "BEATs_iter3_plus_AS2M (cached)"
    except Exception:  # not cached, or no registry loader: random weights
        torch.manual_seed(0)
        return BEATs(BEATsConfig(**BASE)).eval(), "random (base architecture, 90 M)"


def build_paths(
    model: BEATs, args: argparse.Namespace
) -> tuple[dict[str, Callable[[], torch.Tensor]], dict[str, BEATs]]:
    """The paths to time (``args.paths`` and the baseline) and the models of the fast ones."""
    device = torch.device(args.device)
    num_samples = round(args.seconds * 16000)
    wav = test_audio(args.batch, num_samples).to(device)
    baseline = OriginalBEATs(model)
    paths: dict[str, Callable[[], torch.Tensor]] = {"baseline": lambda: baseline(wav)[0]}
    models = {"fast-fp32": model}
    if device.type == "cuda":
        models["fast-fp16"] = copy.deepcopy(model).to(torch.float16)
    models["fast-bf16"] = copy.deepcopy(model).to(torch.bfloat16)
    models = {name: m for name, m in models.items() if name in args.paths}
    for name in list(models):
        for attn in args.attn:
            models[f"{name}:{attn}"] = other = copy.deepcopy(models[name])
            other.attn_implementation = attn
    for name, m in models.items():
        paths[name] = lambda m=m: m.embed(wav).features
    if args.compile and "compiled-fp32" in args.paths:
        compiled = torch.compile(model.forward_waveform, fullgraph=True)
        lengths = torch.full((args.batch,), num_samples, device=device)

        def run_compiled() -> torch.Tensor:
            with torch.inference_mode():
                return compiled(wav, lengths, mask_keys=False).features

        paths["compiled-fp32"] = run_compiled
    return paths, models


def compare(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |diff|, smallest per-position cosine) of features against the reference."""
    out, ref = out.float(), ref.float()
    cos = F.cosine_similarity(out, ref, dim=-1).min()
    return float((out - ref).abs().max()), float(cos)


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, weights = load_model(args)
    model = model.to(device)
    cfg = model.cfg
    num_samples = round(args.seconds * 16000)
    positions = 8 * (num_frames(num_samples) // 16)
    flops = args.batch * model_flops(cfg, positions)
    print(f"# machine: {cpu_name()}, "
          f"{torch.get_num_threads()} threads; torch {torch.__version__}; device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"# weights: {weights}; batch {args.batch} x {args.seconds:g} s "
          f"(S = {positions} positions); {flops / 1e9:.4g} GFLOP per batch; "
          f"best of {args.repeats} rounds")

    paths, models = build_paths(model, args)
    memory = Memory(device)
    best = {name: float("inf") for name in paths}
    peak = {name: 0.0 for name in paths}
    work = {name: 0.0 for name in paths}
    outputs: dict[str, torch.Tensor] = {}
    for name, fn in paths.items():  # warm-up (and compile) outside the timed rounds
        outputs[name] = fn()
        sync(device)
    for _ in range(args.repeats):
        for name, fn in paths.items():
            memory.reset()
            start = time.perf_counter()
            fn()
            sync(device)
            elapsed = time.perf_counter() - start
            best[name] = min(best[name], elapsed)
            peak[name] = max(peak[name], memory.peak())
            work[name] = max(work[name], memory.peak() - memory.start)

    rows = []
    ref = outputs["baseline"]
    for name in paths:
        diff, cos = compare(outputs[name], ref)
        rows.append(dict(
            path=name, audio_per_s=args.batch * args.seconds / best[name],
            gflops=flops / best[name] / 1e9, peak_mib=peak[name], work_mib=work[name],
            speedup=best["baseline"] / best[name], max_diff=diff, min_cos=cos,
            attention=models[name].attn_implementation if name in models else "-",
        ))
    mem = "peak alloc MiB" if device.type == "cuda" else "peak RSS MiB (+ path)"
    print(f"| path | audio s/s | GFLOP/s | {mem} | vs baseline | max abs diff | min cosine "
          "| attention |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['path']} | {r['audio_per_s']:.1f} | {r['gflops']:.3g} | "
              f"{r['peak_mib']:.0f} (+{r['work_mib']:.0f}) | {r['speedup']:.2f}x | "
              f"{r['max_diff']:.2e} | {r['min_cos']:.6f} | {r['attention']} |")

    if args.long_minutes > 0:
        long_wav = test_audio(1, round(args.long_minutes * 60 * 16000), seed=1)[0]
        memory.reset()
        start = time.perf_counter()
        out = extract_windowed(model, long_wav, batch_size=args.batch)
        sync(device)
        elapsed = time.perf_counter() - start
        rows.append(dict(path="windowed", audio_per_s=args.long_minutes * 60 / elapsed,
                         peak_mib=memory.peak(), work_mib=memory.peak() - memory.start))
        print(f"# long audio: {args.long_minutes:g} min through extract_windowed (fast-fp32, "
              f"10 s windows, 8 s hop, batch {args.batch}): {tuple(out.features.shape)} in "
              f"{elapsed:.1f} s = {rows[-1]['audio_per_s']:.1f} audio s/s; {mem} "
              f"{rows[-1]['peak_mib']:.0f} (+{rows[-1]['work_mib']:.0f}) with a "
              f"{long_wav.numel() * 4 / 2**20:.0f} MiB waveform and "
              f"{out.features.numel() * out.features.element_size() / 2**20:.0f} MiB output")
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="tiny model, batch 2 x 2 s, one round, 0.5-minute file: a smoke run")
    p.add_argument("--checkpoint", type=Path, help="a Microsoft .pt to load")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (best is reported)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--long-minutes", type=float, default=10.0,
                   help="length of the windowed long-audio run (0 skips it)")
    p.add_argument("--compile", action="store_true", help="add the torch.compile path")
    p.add_argument("--paths", default="fast-fp32,fast-bf16,fast-fp16,compiled-fp32",
                   help="comma-separated paths besides the baseline")
    p.add_argument("--attn", default="",
                   help="comma-separated attention implementations (eager, sdpa, by_clip) to "
                        "run each fast path with too, besides the default (auto)")
    args = p.parse_args(argv)
    args.paths = args.paths.split(",")
    args.attn = [a for a in args.attn.split(",") if a]
    if args.quick:
        args.batch, args.seconds, args.repeats, args.long_minutes = 2, 2.0, 1, 0.5
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
