"""The extract, training and float16 sections of `benchmarks/gpu_check.py`.

Each function takes the run's `gpu_check.Check` and adds its rows; see that module's
docstring for what is measured and why.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import multiprocessing
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from beats import BEATs, BEATsConfig
from benchmarks.bench import TINY, test_audio
from benchmarks.train_bench import CLASSES, baseline_steps, fit_steps

if TYPE_CHECKING:
    from benchmarks.gpu_check import Check

NEEDS_CUDA = "needs CUDA"


# --------------------------------------------------------------------------- extract
def make_files(folder: Path, count: int, quick: bool) -> float:
    """``count`` audio files in ``folder``: even ones 16 kHz WAV, odd ones 44.1 kHz FLAC
    (resampled when read), 3, 6, 9 and 12 s in turn (12 s goes through the 10 s windows);
    with ``quick`` 0.5, 1, 1.5 and 3 s (3 s through 2 s windows). A tone, a sweep and
    noise per file. Returns the audio seconds."""
    import soundfile as sf

    lengths = (0.5, 1.0, 1.5, 3.0) if quick else (3.0, 6.0, 9.0, 12.0)
    folder.mkdir(parents=True, exist_ok=True)

    def write(i: int) -> float:
        rate = 16000 if i % 2 == 0 else 44100
        seconds = lengths[i % len(lengths)]
        t = np.arange(round(seconds * rate)) / rate
        rng = np.random.default_rng(i)
        f0 = 150.0 + 37.0 * (i % 23)
        x = (0.3 * np.sin(2 * np.pi * f0 * t) + 0.2 * np.sin(2 * np.pi * (f0 + 300 * t) * t)
             + 0.05 * rng.standard_normal(len(t)))
        suffix = "wav" if rate == 16000 else "flac"
        sf.write(folder / f"clip{i:04d}.{suffix}", x.astype(np.float32), rate,
                 subtype="PCM_16")
        return seconds

    with ThreadPoolExecutor(max_workers=8) as pool:
        return float(sum(pool.map(write, range(count))))


class GpuBusy:
    """NVML's GPU utilisation (the share of time a kernel was running), sampled every
    50 ms in a thread while the ``with`` block runs; `mean` is None without NVML."""

    def __init__(self, check: Check) -> None:
        self.device = check.device
        self.samples: list[float] = []
        self.reason = NEEDS_CUDA
        self.enabled = False
        if check.cuda:
            try:
                torch.cuda.utilization(self.device)
                self.enabled = True
            except Exception as e:  # no pynvml, or NVML refused
                self.reason = f"NVML unavailable ({type(e).__name__}: {e})"[:120]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.samples.append(float(torch.cuda.utilization(self.device)))

    def __enter__(self) -> GpuBusy:
        if self.enabled:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None

    def text(self) -> str:
        return (f"GPU busy {self.mean:.0f}% (NVML, {len(self.samples)} samples)"
                if self.mean is not None else f"GPU busy: {self.reason}")


def extract_check(check: Check) -> None:
    """`beats.extract.extract` end to end, and each of its stages alone."""
    from torch.utils.data import DataLoader

    from beats.extract import ExtractOptions, _embed_batch
    from beats.files import discover_inputs
    from beats.manifest import ManifestWriter, Record
    from beats.outputs import NpyWriter
    from beats.reading import BatchReader, as_is, by_duration
    from beats.workers import worker_init
    from benchmarks.gpu_check import base_model

    section, args = "extract", check.args
    files = check.scratch / "audio"
    audio = make_files(files, args.files, args.quick)
    items = discover_inputs([files])
    dtype = torch.bfloat16  # what a GPU user runs (``--dtype bfloat16``)
    model = base_model(check).eval().to(check.device, dtype)
    cores = multiprocessing.cpu_count()
    configs = {"defaults": (8, min(4, cores)), "tuned": (64, min(16, cores))}
    window = 10.0  # the command line's default
    if args.quick:
        configs, window = {"quick": (4, 1)}, 2.0
    what = (f"{args.files} files, {audio:.0f} s of audio; model "
            f"{str(dtype).replace('torch.', '')}")

    write_seconds = None
    for label, (batch, workers) in configs.items():
        procs = f"{workers} worker" + "s" * (workers != 1)
        # decoding alone: the loader that extract uses, nothing else
        start = time.perf_counter()
        loader = DataLoader(BatchReader(by_duration(items, batch), None,
                                        multiprocessing.Event()),
                            batch_size=None, num_workers=workers, collate_fn=as_is,
                            prefetch_factor=2 if workers else None,
                            worker_init_fn=worker_init if workers else None)
        loaded = list(loader)
        decode = time.perf_counter() - start
        check.add(section, f"decoding only, {procs}", "info", value=audio / decode,
                  unit="audio s/s", notes=f"{label}; {what}", data={"seconds": decode})
        # embedding alone (pooling and the copy to the CPU included), after a warm-up
        options = ExtractOptions(batch_size=batch, num_workers=0, window=window)
        list(_embed_batch(model, loaded[0], options))
        check.reset_peak()
        check.sync()
        start = time.perf_counter()
        results = [r for part in loaded for r in _embed_batch(model, part, options)]
        check.sync()
        embed = time.perf_counter() - start
        check.add(section, f"embedding only, batch {batch}", "info", value=audio / embed,
                  unit="audio s/s", peak_gpu_mib=check.peak(), notes=label,
                  data={"seconds": embed})
        if write_seconds is None:  # writing alone: .npy files and the manifest, fsynced
            out = check.scratch / "written"
            out.mkdir()
            start = time.perf_counter()
            with ManifestWriter(out / "manifest.jsonl") as manifest:
                writer = NpyWriter(out, manifest)
                for x, (array, times, _) in results:
                    writer.write(Record(str(x.item.path), x.item.key, "ok",
                                        duration=x.info.duration, shape=list(array.shape)),
                                 array.astype(np.float32), times)
            write_seconds = time.perf_counter() - start
            check.add(section, "writing outputs only", "info", value=audio / write_seconds,
                      unit="audio s/s",
                      notes=f"{len(results) / write_seconds:.0f} files/s (npy + manifest, "
                            "each fsynced)", data={"seconds": write_seconds})
        del loaded, results
        # end to end
        from beats.extract import extract

        busy = GpuBusy(check)
        check.reset_peak()
        with busy:
            summary = extract(model, [files], check.scratch / f"extract-{label}",
                              ExtractOptions(batch_size=batch, num_workers=workers,
                                             window=window),
                              progress=False)
        rate = summary.audio_seconds / summary.seconds
        embed_name = "GPU embedding" if check.cuda else "embedding"
        stages = {"decoding workers": audio / decode, embed_name: audio / embed,
                  "writing outputs": audio / write_seconds}
        main = audio / (embed + write_seconds)  # the main process embeds, then writes
        if stages["decoding workers"] < main:
            slowest = "decoding workers"
        else:
            slowest = embed_name if embed >= write_seconds else "writing outputs"
        ok = summary.ok + summary.padded == args.files and summary.failed == 0
        check.judge(section, f"extract, batch {batch}, {procs}", rate, ok,
                    f"{args.files} files ok", unit="audio s/s", peak_gpu_mib=check.peak(),
                    notes=(f"{label}; bottleneck: {slowest} (decoding {audio / decode:.0f}, "
                           f"main process {main:.0f} audio s/s); "
                           f"{rate / min(audio / decode, main):.0%} of the slowest stage's "
                           f"speed; {busy.text()}; {summary.failed} failed"),
                    data={"bottleneck": slowest, "stages_audio_per_s": stages,
                          "main_process_audio_per_s": main, "gpu_busy_percent": busy.mean,
                          "ok": summary.ok, "failed": summary.failed,
                          "seconds": summary.seconds})


# --------------------------------------------------------------------------- training
@contextlib.contextmanager
def process_group(backend: str, device: torch.device) -> Iterator[None]:
    """A 1-process group on 127.0.0.1 (what torchrun would set up, without torchrun)."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def best_step(times: list[float]) -> float:
    """The best step after the first (warm-up)."""
    return min(times[1:]) if len(times) > 1 else times[0]


def pretrain_steps(check: Check, wav: torch.Tensor, steps: int, dtype: str) -> list[float]:
    """Seconds per step of `fit` pre-training (the base preset, or tiny with --quick) on
    ``wav``'s clips, labels from the random-projection tokenizer."""
    from beats.train.data import Clip
    from beats.train.loop import fit
    from beats.train.pretrain import LabelSource, PretrainConfig, PretrainTask
    from beats.train.ssl import BEATsForPretraining

    seconds = wav.shape[1] / 16000
    cfg = PretrainConfig.for_preset(
        "tiny" if check.args.quick else "base", steps=steps, batch_size=wav.shape[0],
        dtype=dtype, device=str(check.device), num_workers=0, log_every=1,
        save_every=10**6, eval_every=10**6, quiet=True, crop_seconds=seconds,
        warmup_steps=1)
    source = LabelSource(cfg)
    torch.manual_seed(0)
    model = BEATsForPretraining(cfg.ssl_config(source.num_labels))
    clips = [Clip(w.numpy(), None, seconds) for w in wav]
    task = PretrainTask(model, clips, cfg, source)
    with tempfile.TemporaryDirectory(prefix="beats-gpu-check-") as out:
        fit(task, cfg, out)
        lines = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    audio = wav.shape[0] * seconds
    return [audio / x["audio_seconds_per_second"] for x in lines]


def fsdp_steps(check: Check, model: BEATs, wav: torch.Tensor, targets: torch.Tensor,
               steps: int) -> tuple[list[float], list[float], float]:
    """The loop's step (`beats.train.loop._train_step`, FSDP branch) on a fine-tuning
    model sharded by `beats.train.distributed.shard` in the current 1-process group.

    Returns (seconds per step, losses, largest weight change)."""
    from beats.train import distributed, loop
    from beats.train.data import Clip
    from beats.train.finetune import FinetuneConfig, FinetuneTask, prepare_model

    seconds = wav.shape[1] / 16000
    clips = [Clip(w.numpy(), int(t), seconds) for w, t in zip(wav, targets, strict=True)]
    cfg = FinetuneConfig(steps=steps, batch_size=len(clips), lr=1e-4, dtype="bfloat16",
                         num_workers=0, quiet=True, device=str(check.device), fsdp=True,
                         crop_seconds=seconds, time_mask=0.0, freq_mask=0, head_dropout=0.0,
                         warmup_steps=1, layer_lr_decay=1.0)
    task = FinetuneTask(prepare_model(model, CLASSES, False, cfg), clips, [], CLASSES, False,
                        cfg)
    d = distributed.setup(cfg.device)
    net = task.model.to(d.device)
    distributed.shard(net, task.fsdp_units())
    distributed.register_methods(net, ["forward_fbank", "forward_waveform",
                                       "extract_features"])
    groups = task.parameter_groups(cfg)
    for g in groups:
        g.setdefault("lr_scale", 1.0)
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                            weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(d.device.type, enabled=False)

    def full(p: torch.Tensor) -> torch.Tensor:
        p = p.detach()
        return (p.full_tensor() if hasattr(p, "full_tensor") else p).float().clone()

    before = [full(p) for p in params]
    micro = [task.collate([task.train_set[(i, i)] for i in range(len(clips))])]
    times, losses = [], []
    for step in range(steps):
        start = time.perf_counter()
        result = loop._train_step(task, cfg, net, opt, scaler, params, micro, step, steps, 1,
                                  torch.bfloat16, d, [0])
        check.sync()
        times.append(time.perf_counter() - start)
        losses.append(result["loss"])
    moved = max(float((full(p) - b).abs().max()) for p, b in zip(params, before, strict=True))
    return times, losses, moved


def training(check: Check) -> None:
    import torch.distributed as dist

    from benchmarks.gpu_check import base_model

    section, args, dev = "training", check.args, check.device
    seconds = 2.0 if args.quick else 10.0
    model = base_model(check, dropout=0.0, attention_dropout=0.0).train()
    wav = test_audio(args.train_batch, round(seconds * 16000))
    targets = torch.arange(args.train_batch) % len(CLASSES)
    audio = args.train_batch * seconds
    steps = args.train_steps
    what = (f"batch {args.train_batch} x {seconds:g} s, best of {steps - 1} "
            f"step{'s' * (steps != 2)} after a warm-up step")
    base: list[float] = []

    def original(autocast: torch.dtype | None) -> None:
        check.reset_peak()
        times = baseline_steps(copy.deepcopy(model).to(dev), wav.to(dev), targets.to(dev),
                               steps, autocast)
        step = best_step(times)
        if autocast is None:
            base.append(step)
        name = "float32" if autocast is None else "bfloat16 autocast"
        check.add(section, f"original {name} forward/backward", "info", value=audio / step,
                  unit="audio s/s", ratio=base[0] / step if base else None,
                  peak_gpu_mib=check.peak(), notes=what + ("; the baseline" if not autocast
                                                           else ""),
                  data={"step_seconds": step})

    def fitted(name: str, run: Any, notes: str = "", status: str = "info",
               bound: str = "") -> None:
        check.reset_peak()
        times = run()
        step = best_step(times)
        check.add(section, name, status, value=audio / step, unit="audio s/s", bound=bound,
                  ratio=base[0] / step if base else None, peak_gpu_mib=check.peak(),
                  notes="; ".join(x for x in (what, notes) if x),
                  data={"step_seconds": step, "steps": len(times)})

    check.attempt(section, "original float32 forward/backward", lambda: original(None))
    check.attempt(section, "original bfloat16 autocast forward/backward",
                  lambda: original(torch.bfloat16))
    check.attempt(section, "fit fine-tune bfloat16", lambda: fitted(
        "fit fine-tune bfloat16", lambda: fit_steps(model, wav, targets, steps, "bfloat16",
                                                    str(dev))))
    check.attempt(section, "fit pre-train bfloat16", lambda: fitted(
        "fit pre-train bfloat16", lambda: pretrain_steps(check, wav, steps, "bfloat16"),
        notes=f"{'tiny' if args.quick else 'base'} preset, 75% of patches masked"))

    backend = "nccl" if check.cuda else "gloo"
    if not check.cuda:
        check.skip(section, "fit fine-tune in a 1-process NCCL group", NEEDS_CUDA +
                   " (NCCL); the same steps ran in a gloo group")
        check.skip(section, "FSDP2 step, 1-process NCCL group", NEEDS_CUDA +
                   " (NCCL); the same steps ran in a gloo group")

    def in_group() -> None:
        fitted(f"fit fine-tune in a 1-process {backend.upper()} group",
               lambda: fit_steps(model, wav, targets, steps, "bfloat16", str(dev)),
               status="pass", bound="completes")
        numel = sum(p.numel() for p in model.parameters())
        flat = torch.randn(numel, device=dev)
        before = flat.clone()
        dist.all_reduce(flat)
        took = check.best_time(lambda: dist.all_reduce(flat), 3)
        row = check.rows[-1]
        row.notes += (f"; all-reduce of {numel * 4 / 2**20:.1f} MiB (one float32 "
                      f"gradient per weight) in the group: {took * 1e3:.2f} ms (one "
                      "process: the code path, not the interconnect)")
        row.data["all_reduce_seconds"] = took
        if not torch.equal(flat, before):  # a sum over one process changes nothing
            row.status, row.notes = "fail", row.notes + "; the all-reduce changed the values"

    def sharded() -> None:
        times, losses, moved = fsdp_steps(check, copy.deepcopy(model), wav, targets, steps)
        step = best_step(times)
        ok = all(math.isfinite(x) for x in losses) and moved > 0
        check.judge(section, f"FSDP2 step, 1-process {backend.upper()} group", audio / step,
                    ok, "completes, finite loss, weights move", unit="audio s/s",
                    ratio=base[0] / step if base else None, peak_gpu_mib=check.peak(),
                    notes=f"{what}; losses {losses[0]:.4g} -> {losses[-1]:.4g}; largest "
                          f"weight change {moved:.2e}",
                    data={"step_seconds": step, "losses": losses, "moved": moved})

    def group_checks() -> None:
        with process_group(backend, dev):
            check.attempt(section, f"fit fine-tune in a 1-process {backend.upper()} group",
                          in_group)
            check.reset_peak()
            check.attempt(section, f"FSDP2 step, 1-process {backend.upper()} group", sharded)

    check.attempt(section, f"1-process {backend.upper()} group", group_checks)


# --------------------------------------------------------------------------- float16
def float16(check: Check) -> None:
    from safetensors.torch import load_file

    from beats.train.data import Clip
    from beats.train.finetune import FinetuneConfig, FinetuneTask, prepare_model
    from beats.train.logs import read_metrics
    from beats.train.loop import fit
    from benchmarks.gpu_check import (
        COSINE_MIN,
        REFERENCE,
        Worst,
        reference_cases,
        reference_clips,
    )

    section, args, dev = "float16", check.args, check.device

    def autocast_inference() -> None:
        waves = load_file(REFERENCE / "waves.safetensors")
        worst = Worst(False)
        for case in reference_cases(check, torch.float16):
            ref = load_file(REFERENCE / f"{case}.expected.safetensors")
            model = BEATs.from_pretrained(REFERENCE / f"{case}.pt", device=dev)
            layers = model.cfg.encoder_layers
            for i in range(reference_clips(check)):
                with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.float16):
                    out = model.extract_features(waves[f"wav.{i}"].to(dev))
                got = out.features[0].float().cpu()
                want = ref.get(f"features.{i}", ref[f"hidden.{i}.{layers}"])
                worst.add(float(F.cosine_similarity(got, want, dim=-1).min()),
                          f"{case} clip {i}")
        check.judge(section, "float16 autocast vs reference vectors", worst.value,
                    worst.value >= COSINE_MIN, f">= {COSINE_MIN}", unit="min cosine",
                    notes=f"float32 weights under torch.autocast(float16), as mixed-precision "
                          f"frameworks run it; worst: {worst.where}")

    def training_steps() -> None:
        steps = args.fp16_steps
        batch, seconds = (2, 1.0) if args.quick else (8, 2.0)
        torch.manual_seed(0)
        tiny = BEATs(BEATsConfig(**TINY))
        # loud clips (clipped at full scale): the largest filterbank energies
        wav = (test_audio(batch, round(seconds * 16000), seed=3) * 4).clamp(-1, 1)
        clips = [Clip(w.numpy(), i % len(CLASSES), seconds) for i, w in enumerate(wav)]
        cfg = FinetuneConfig(steps=steps, batch_size=batch, lr=5e-4, dtype="float16",
                             num_workers=0, log_every=1, save_every=10**6, quiet=True,
                             device=str(dev), crop_seconds=seconds,
                             warmup_steps=max(1, steps // 10))
        task = FinetuneTask(prepare_model(tiny, CLASSES, False, cfg), clips, [], CLASSES,
                            False, cfg)
        with tempfile.TemporaryDirectory(prefix="beats-gpu-check-") as out:
            result = fit(task, cfg, out)
            lines = read_metrics(Path(out))
        losses = [x["loss"] for x in lines]
        skipped = sum(x.get("grad_norm") is None for x in lines)
        finite = (all(x is not None and math.isfinite(x) for x in losses)
                  and all(bool(torch.isfinite(p).all()) for p in task.model.parameters()))
        check.judge(section, "float16 training, tiny model, loss scaling", result.steps,
                    result.steps == steps and finite, f"{steps} steps, no NaN", unit="steps",
                    notes=f"batch {batch} x {seconds:g} s of loud clips; loss {losses[0]:.4g} "
                          f"-> {losses[-1]:.4g}; {skipped} steps skipped by the loss scaler",
                    data={"losses": losses, "skipped": skipped})

    check.attempt(section, "float16 autocast vs reference vectors", autocast_inference)
    check.attempt(section, "float16 training, tiny model, loss scaling", training_steps)
