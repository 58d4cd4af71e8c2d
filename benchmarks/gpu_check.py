"""Every CUDA path of beats in one run: parity, inference speed, extract, training, float16.

    python benchmarks/gpu_check.py                        # CUDA: sized for 8 minutes, one H100
    python benchmarks/gpu_check.py --device cpu --quick   # tiny sizes on CPU: a smoke run

Prints one table and writes it as JSON (``--json``, default ``gpu_check.json``). Each row
has a status: ``pass`` or ``fail`` against its bound, ``info`` (measured, no bound),
``skip`` (with the reason: a CUDA-only row on another device, or the time budget) or
``error`` (the check raised; a failure too). The exit code is 1 when a row failed, else 0.

Sections (sizes of the full run; ``--quick`` shrinks them all):

- parity: the four reference checkpoints (tests/data/reference) on the device. float32
  hidden states and features against the reference vectors (max abs diff <= 1e-4,
  fine-tuned probabilities <= 1e-5); bfloat16 and float16 weights, cosine per position
  against them (>= 0.999); padded batches equal to clips alone (float32 <= 1e-5, half
  precision cosine >= 0.999). On CUDA also float32 with cuDNN's TF32 off, to tell a TF32
  convolution from a real difference.
- inference: the base architecture (random weights) on batch 64 x 10 s: the original
  computation (benchmarks/original.py, float32) and `BEATs.embed` in float32, bfloat16
  and float16, then the same under ``torch.compile``: audio seconds per second, ratio to
  the original, achieved TFLOP/s, peak GPU memory, the SDPA kernel that ran (read from
  the profiler's operator names, not assumed) and agreement with the original. Bound:
  bfloat16 at least 3x the original's float32 (CUDA only).
- extract: 500 generated files (16 kHz WAV and 44.1 kHz FLAC, 3 to 12 s) through
  `beats.extract.extract` (what ``beats extract`` runs) in bfloat16, with the command
  line's defaults (batch 8, 4 workers) and tuned (batch 64, up to 16 workers); then what
  each stage can do alone: decoding in the workers, embedding, writing outputs; the
  slowest names the bottleneck, and NVML's GPU busy share is sampled where available.
- training: the base model, batch 16 x 10 s, bfloat16 autocast: the original's
  forward/backward (float32 and under autocast) against `beats.train.fit` fine-tuning and
  pre-training, in audio seconds per second with peak memory; fine-tuning inside a
  1-process NCCL group (and an all-reduce of every gradient through it); the loop's step
  on a model sharded with FSDP2 in that group.
- float16: the reference checkpoints under float16 autocast (how mixed-precision
  frameworks call a model: the report of NaN in microsoft/unilm #1569), and 200 training
  steps of the tiny model with float16 loss scaling: no NaN, no step given up.

Rows run in that order, except that compiled inference runs last, as long as
``--budget`` seconds allow; a row without time left is skipped and says so. ``--only``
runs some parts (``parity,inference,extract,training,float16,compile``): a rerun after a
fix, say.

On a GPU machine whose image has torch, numpy, safetensors, huggingface_hub, tqdm and
filelock but not the rest of beats' dependencies, carry those as wheels (Python 3.12).
Where pip can reach PyPI, in the checkout:

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \\
        --implementation cp --platform manylinux_2_28_x86_64 \\
        --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \\
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \\
        -d .whl soundfile==0.14.0 soxr==1.1.0 cffi==2.1.1 pycparser==3.12

and on the GPU machine, from the checkout (beats is imported from it, not installed):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \\
        --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
    python3 benchmarks/gpu_check.py --json /tmp/gpu_check.json

When a runner copies the checkout to the GPU machine (tracked files and untracked ones
that git does not ignore), keep the wheels out of git and send them as an ignored path
(``echo /.whl/ >> .git/info/exclude`` once; then name ``.whl`` among the ignored paths
the runner carries), and make its command one line, the JSON written into the folder
the runner brings back (``$OUT`` below):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; \\
        PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --json $OUT/gpu_check.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from beats import BEATs, BEATsConfig  # noqa: E402
from beats.devices import pick_device  # noqa: E402
from beats.fbank import num_frames  # noqa: E402
from benchmarks.bench import BASE, TINY, compare, cpu_name, model_flops, test_audio  # noqa: E402
from benchmarks.original import OriginalBEATs  # noqa: E402

REFERENCE = ROOT / "tests" / "data" / "reference"
CASES = ("postnorm_gru", "finetuned", "prenorm_glu", "relpos_relu")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SECTIONS = ("parity", "inference", "extract", "training", "float16")
PARTS = ("parity", "inference", "extract", "training", "float16", "compile")  # for --only
HIDDEN_TOL, PROBS_TOL, BATCH_TOL, COSINE_MIN = 1e-4, 1e-5, 1e-5, 0.999
SPEEDUP_MIN = 3.0  # bfloat16 inference against the original's float32, CUDA only
NEEDS_CUDA = "needs CUDA"


# --------------------------------------------------------------------------- rows
@dataclass
class Row:
    """One line of the table. ``value`` is the row's headline number (``unit``), judged
    against ``bound`` when there is one; ``data`` holds every number measured."""

    section: str
    name: str
    status: str  # pass, fail, info, skip, error
    value: float | str | None = None
    unit: str = ""
    bound: str = ""
    ratio: float | None = None  # against the original computation, same device
    peak_gpu_mib: float | None = None
    notes: str = ""
    data: dict[str, Any] = field(default_factory=dict)


class Check:
    """The device, the time budget, scratch space and the rows of one run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = pick_device(args.device)  # "cuda" gets its index
        self.cuda = self.device.type == "cuda"
        self.deadline = time.monotonic() + args.budget
        self.rows: list[Row] = []
        self.timings: dict[str, float] = {}  # wall seconds of each attempted check
        self.scratch = Path(tempfile.mkdtemp(prefix="beats-gpu-check-"))

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def add(self, section: str, name: str, status: str, **fields: Any) -> Row:
        row = Row(section, name, status, **fields)
        self.rows.append(row)
        return row

    def judge(self, section: str, name: str, value: float, ok: bool, bound: str,
              **fields: Any) -> Row:
        """A bounded row: pass when ``ok`` (a value that is not a finite number fails)."""
        finite = isinstance(value, (int, float)) and math.isfinite(value)
        return self.add(section, name, "pass" if ok and finite else "fail", value=value,
                        bound=bound, **fields)

    def skip(self, section: str, name: str, reason: str) -> Row:
        return self.add(section, name, "skip", notes=reason)

    def attempt(self, section: str, name: str, fn: Callable[[], None],
                seconds: float = 0.0) -> None:
        """Run ``fn`` (which adds its own rows) if ``seconds`` are left; an exception
        becomes an ``error`` row named ``name``, its traceback printed to stderr."""
        if self.left() < seconds:
            self.skip(section, name, f"time budget: {max(self.left(), 0):.0f} s left, "
                                     f"about {seconds:.0f} s needed")
            return
        start = time.perf_counter()
        try:
            fn()
        except Exception as e:
            traceback.print_exc()
            message = " ".join(f"{type(e).__name__}: {e}".split())
            self.add(section, name, "error", notes=message[:300])
        finally:
            gc.collect()
            if self.cuda:
                torch.cuda.empty_cache()
            took = time.perf_counter() - start
            self.timings[f"{section}: {name}"] = took
            print(f"# {section}: {name}: {took:.1f} s", file=sys.stderr, flush=True)

    # ---------------------------------------------------------------- measuring
    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.cuda:
            gc.collect()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> float | None:
        """Peak GPU memory allocated since `reset_peak`, MiB (None off CUDA)."""
        return torch.cuda.max_memory_allocated(self.device) / 2**20 if self.cuda else None

    def best_time(self, fn: Callable[[], Any], repeats: int) -> float:
        """Best wall seconds of ``repeats`` calls of ``fn`` (synchronised)."""
        best = math.inf
        for _ in range(repeats):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            best = min(best, time.perf_counter() - start)
        return best


def attention_kernels(check: Check, fn: Callable[[], Any]) -> str:
    """Which scaled-dot-product-attention implementation ``fn`` ran, from the profiler.

    The dispatcher's operator names say which backend SDPA chose (flash, memory-efficient,
    cuDNN, math, or the CPU flash kernel); on CUDA the attention kernel's own name is
    added. An encoder that ran no SDPA operator says what ran instead.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if check.cuda else [])
    with profile(activities=activities) as prof:
        fn()
        check.sync()
    events = prof.key_averages()
    names = {event.key for event in events}
    backends = {
        "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
        "aten::_scaled_dot_product_flash_attention": "flash",
        "aten::_scaled_dot_product_efficient_attention": "memory-efficient",
        "aten::_scaled_dot_product_cudnn_attention": "cuDNN",
        "aten::_scaled_dot_product_fused_attention_overrideable": "fused (overrideable)",
        "aten::_scaled_dot_product_attention_math": "math",
    }
    found = sorted({label for op, label in backends.items() if op in names})
    if check.cuda:
        kernels = sorted({e.key for e in events
                          if e.device_type == torch.autograd.DeviceType.CUDA and any(
                              k in e.key.lower() for k in ("fmha", "flash", "attention",
                                                           "cudnn", "sdpa"))})
        if kernels:
            found.append("kernel " + kernels[0][:60])
    if not any(op in names for op in backends):
        if any(n.startswith("aten::baddbmm") for n in names):
            found.insert(0, "none: batched products (by_clip attention)")
        elif "aten::bmm" in names:
            found.insert(0, "none: explicit bmm + softmax")
        else:
            found.insert(0, "none seen (fused into compiled kernels)")
    return "; ".join(found)


# --------------------------------------------------------------------------- parity
class Worst:
    """The worst of a series of numbers and where it was seen (NaN is the worst)."""

    def __init__(self, higher_is_worse: bool) -> None:
        self.higher_is_worse = higher_is_worse
        self.value: float | None = None
        self.where = ""

    def add(self, value: float, where: str) -> None:
        old = self.value
        if (old is None or not math.isfinite(value)
                or (math.isfinite(old) and (value > old if self.higher_is_worse
                                            else value < old))):
            self.value, self.where = value, where


def reference_clips(check: Check) -> int:
    """How many reference clips to run: all five, or the four short ones with --quick."""
    count = len(json.loads((REFERENCE / "manifest.json").read_text())["waves"]["lengths"])
    return 4 if check.args.quick else count


def reference_cases(check: Check, dtype: torch.dtype) -> tuple[str, ...]:
    """The reference checkpoints to run in ``dtype``: all four, or with --quick, in half
    precision, the two layouts furthest apart (post-norm with the GRU gate, pre-norm GLU)."""
    if check.args.quick and dtype != torch.float32:
        return ("postnorm_gru", "prenorm_glu")
    return CASES


def parity_of(check: Check, dtype: torch.dtype, batches: bool = True) -> dict[str, Worst]:
    """Worst agreement of the four reference checkpoints in ``dtype`` on the device.

    ``reference``: every hidden state and the features of each clip alone against the
    reference vectors (float32: max abs diff; half precision: the features' min cosine per
    position); ``probs``: the fine-tuned probabilities (float32); ``batch``: clips 0-2 as
    one padded batch against each alone (float32: max abs diff, else min cosine).
    """
    from safetensors.torch import load_file

    waves = load_file(REFERENCE / "waves.safetensors")
    count = reference_clips(check)
    exact = dtype == torch.float32
    worst = {"reference": Worst(exact), "probs": Worst(True), "batch": Worst(exact)}
    dev = check.device
    for case in reference_cases(check, dtype):
        ref = load_file(REFERENCE / f"{case}.expected.safetensors")
        model = BEATs.from_pretrained(REFERENCE / f"{case}.pt", device=dev, dtype=dtype)
        layers = model.cfg.encoder_layers
        for i in range(count):
            with torch.inference_mode():
                out = model.extract_features(waves[f"wav.{i}"].to(dev),
                                             output_hidden_states=exact)
            want = ref.get(f"features.{i}", ref[f"hidden.{i}.{layers}"])
            got = out.features[0].float().cpu()
            where = f"{case} clip {i}"
            if exact:
                diff = max(float((h[0].cpu() - ref[f"hidden.{i}.{j}"]).abs().max())
                           for j, h in enumerate(out.hidden_states))
                worst["reference"].add(max(diff, float((got - want).abs().max())), where)
                if out.probs is not None:
                    worst["probs"].add(float((out.probs[0].cpu() - ref[f"probs.{i}"])
                                             .abs().max()), where)
            else:
                worst["reference"].add(float(F.cosine_similarity(got, want, dim=-1).min()),
                                       where)
        if not batches:
            continue
        clips = [waves[f"wav.{i}"] for i in range(3)]
        lengths = torch.tensor([len(c) for c in clips])
        batch = torch.zeros(len(clips), int(lengths.max()))
        for b, c in enumerate(clips):
            batch[b, : len(c)] = c
        with torch.inference_mode():
            together = model.extract_features(batch.to(dev), lengths=lengths.to(dev))
            for b, clip in enumerate(clips):
                alone = model.extract_features(clip.to(dev)).features[0].float()
                got = together.features[b, : alone.shape[0]].float()
                value = (float((got - alone).abs().max()) if exact else
                         float(F.cosine_similarity(got, alone, dim=-1).min()))
                worst["batch"].add(value, f"{case} clip {b}")
    return worst


def parity(check: Check) -> None:
    for name, dtype in DTYPES.items():
        worst = parity_of(check, dtype)
        ref, batch = worst["reference"], worst["batch"]
        if dtype == torch.float32:
            probs = worst["probs"]
            check.judge("parity", "float32 vs reference vectors", ref.value,
                        ref.value <= HIDDEN_TOL, f"<= {HIDDEN_TOL:g}", unit="max abs diff",
                        notes=f"worst: {ref.where}")
            check.judge("parity", "float32 fine-tuned probabilities", probs.value,
                        probs.value <= PROBS_TOL, f"<= {PROBS_TOL:g}", unit="max abs diff",
                        notes=f"worst: {probs.where}")
            check.judge("parity", "float32 padded batch = clips alone", batch.value,
                        batch.value <= BATCH_TOL, f"<= {BATCH_TOL:g}", unit="max abs diff",
                        notes=f"worst: {batch.where}")
        else:
            check.judge("parity", f"{name} vs reference vectors", ref.value,
                        ref.value >= COSINE_MIN, f">= {COSINE_MIN}", unit="min cosine",
                        notes=f"worst: {ref.where}")
            check.judge("parity", f"{name} padded batch = clips alone", batch.value,
                        batch.value >= COSINE_MIN, f">= {COSINE_MIN}", unit="min cosine",
                        notes=f"worst: {batch.where}")
    if not check.cuda:
        check.skip("parity", "float32, cuDNN TF32 off", f"{NEEDS_CUDA} (cuDNN's TF32)")
        return
    default = torch.backends.cudnn.allow_tf32
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        ref = parity_of(check, torch.float32, batches=False)["reference"]
    check.judge("parity", "float32, cuDNN TF32 off", ref.value, ref.value <= HIDDEN_TOL,
                f"<= {HIDDEN_TOL:g}", unit="max abs diff",
                notes=f"worst: {ref.where}; by default cudnn.allow_tf32 = {default}")


# --------------------------------------------------------------------------- inference
def base_model(check: Check, **overrides: Any) -> BEATs:
    """The benchmark architecture (tiny with --quick), random weights, seed 0, on CPU."""
    torch.manual_seed(0)
    return BEATs(BEATsConfig(**(TINY if check.args.quick else BASE), **overrides))


def inference(check: Check, compiled: bool) -> None:
    """Eager paths (``compiled=False``) or their ``torch.compile`` versions."""
    args, dev = check.args, check.device
    section = "inference"
    model = base_model(check).eval().to(dev)
    num_samples = round(args.seconds * 16000)
    wav = test_audio(args.batch, num_samples).to(dev)
    lengths = torch.full((args.batch,), num_samples, device=dev)
    positions = 8 * (num_frames(num_samples) // 16)
    flops = args.batch * model_flops(model.cfg, positions)
    audio = args.batch * args.seconds

    original = OriginalBEATs(model)
    reference = original(wav)[0]
    base_time = check.best_time(lambda: original(wav), args.repeats)
    if not compiled:
        check.reset_peak()
        original(wav)
        peak = check.peak()
        sdpa = attention_kernels(check, lambda: original(wav))
        check.add(section, "original float32 (baseline)", "info", value=audio / base_time,
                  unit="audio s/s", ratio=1.0, peak_gpu_mib=peak,
                  notes=f"{flops / base_time / 1e12:.3g} TFLOP/s; SDPA: {sdpa}; "
                        f"batch {args.batch} x {args.seconds:g} s",
                  data={"seconds": base_time, "tflops": flops / base_time / 1e12,
                        "sdpa": sdpa})

    for name, dtype in DTYPES.items():
        label = f"{'compiled' if compiled else 'eager'} {name}"
        if dtype == torch.float16 and not check.cuda:
            check.skip(section, label, f"{NEEDS_CUDA} (float16 speed; CPU float16 kernels "
                                       "are reference code)")
            continue
        if compiled and args.quick and dtype != torch.float32:
            check.skip(section, label, "--quick compiles the float32 path only")
            continue
        if compiled and check.left() < args.compile_seconds:
            check.skip(section, label, f"time budget: {max(check.left(), 0):.0f} s left, "
                                       f"a compile takes up to {args.compile_seconds:.0f} s")
            continue

        def measure(label: str = label, dtype: torch.dtype = dtype) -> None:
            half = copy.deepcopy(model).to(dtype)
            if compiled:
                backend = "eager" if args.quick and not check.cuda else "inductor"
                fn = torch.compile(half.forward_waveform, fullgraph=True, dynamic=False,
                                   backend=backend)

                def path() -> torch.Tensor:
                    with torch.inference_mode():
                        return fn(wav, lengths, mask_keys=False).features
            else:
                backend = ""

                def path() -> torch.Tensor:
                    return half.embed(wav).features
            start = time.perf_counter()
            out = path()  # warm-up (and compilation)
            check.sync()
            warm = time.perf_counter() - start
            seconds = check.best_time(path, args.repeats)
            check.reset_peak()
            out = path()
            check.sync()
            peak = check.peak()
            diff, cos = compare(out, reference)
            finite = bool(torch.isfinite(out).all())
            ratio = base_time / seconds
            sdpa = attention_kernels(check, path)
            notes = (f"{flops / seconds / 1e12:.3g} TFLOP/s; SDPA: {sdpa}; vs original: "
                     f"max abs diff {diff:.2e}, min cosine {cos:.5f}")
            if compiled:
                notes += f"; compile {warm:.0f} s" + (f" ({backend} backend)"
                                                      if backend != "inductor" else "")
            data = {"seconds": seconds, "tflops": flops / seconds / 1e12, "sdpa": sdpa,
                    "max_diff": diff, "min_cosine": cos, "warmup_seconds": warm,
                    "finite": finite}
            fields = dict(unit="audio s/s", ratio=ratio, peak_gpu_mib=peak, notes=notes,
                          data=data)
            if not finite:
                check.add(section, label, "fail", value=audio / seconds,
                          bound="finite output", **fields)
            elif dtype == torch.bfloat16 and not compiled and check.cuda:
                check.judge(section, label, audio / seconds, ratio >= SPEEDUP_MIN,
                            f"ratio >= {SPEEDUP_MIN:g}", **fields)
            else:
                check.add(section, label, "info", value=audio / seconds, **fields)

        check.attempt(section, label, measure)


# --------------------------------------------------------------------------- main
def print_table(check: Check, meta: dict[str, Any]) -> None:
    print(f"# {meta['device_name']}; torch {meta['torch']}; {meta['date']}; "
          f"{meta['seconds']:.0f} s")
    print("| section | check | value | unit | bound | result | vs original | peak GPU MiB "
          "| notes |")
    print("|---|---|---:|---|---|---|---:|---:|---|")
    order = {s: i for i, s in enumerate(SECTIONS)}
    for r in sorted(check.rows, key=lambda r: order[r.section]):
        value = (f"{r.value:.4g}" if isinstance(r.value, float) else
                 "" if r.value is None else str(r.value))
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}x"
        peak = "" if r.peak_gpu_mib is None else f"{r.peak_gpu_mib:.0f}"
        cells = [r.section, r.name, value, r.unit, r.bound, r.status, ratio, peak, r.notes]
        print("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    bad = [r for r in check.rows if r.status in ("fail", "error")]
    print(f"# {len(check.rows)} rows: {sum(r.status == 'pass' for r in check.rows)} pass, "
          f"{len(bad)} fail or error, {sum(r.status == 'skip' for r in check.rows)} skipped")


def metadata(check: Check, started: float) -> dict[str, Any]:
    commit = None
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip() or None
    name = (torch.cuda.get_device_name(check.device) if check.cuda else cpu_name())
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(check.device), "device_name": name, "torch": torch.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(),
        "cpu": cpu_name(), "cpu_count": os.cpu_count(), "commit": commit,
        "label": check.args.label, "quick": check.args.quick,
        "seconds": time.monotonic() - started, "check_seconds": check.timings,
        "not_measured": {} if check.cuda else {"peak_gpu_mib": NEEDS_CUDA},
        "settings": {k: sorted(v) if isinstance(v, set) else v
                     for k, v in vars(check.args).items() if k != "json"},
    }


def run(args: argparse.Namespace) -> int:
    from benchmarks import gpu_training

    started = time.monotonic()
    check = Check(args)
    if check.cuda and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    # Seconds each section is expected to need on one H100 (estimates): a section starts
    # only while that much of the budget is left. --quick keeps no reserve.
    reserve = {"extract": 60.0, "training": 120.0, "float16": 40.0}
    if args.quick:
        reserve = dict.fromkeys(reserve, 0.0)
    parts = [  # (--only name, section, row name if it cannot start, the check, reserve)
        ("parity", "parity", "parity", lambda: parity(check), 0.0),
        ("inference", "inference", "eager inference", lambda: inference(check, False), 0.0),
        ("extract", "extract", "extract", lambda: gpu_training.extract_check(check),
         reserve["extract"]),
        ("training", "training", "training", lambda: gpu_training.training(check),
         reserve["training"]),
        ("float16", "float16", "float16", lambda: gpu_training.float16(check),
         reserve["float16"]),
        ("compile", "inference", "compiled inference", lambda: inference(check, True), 0.0),
    ]
    try:
        for part, section, name, fn, seconds in parts:
            if args.only is None or part in args.only:
                check.attempt(section, name, fn, seconds)
    finally:
        shutil.rmtree(check.scratch, ignore_errors=True)
    meta = metadata(check, started)
    print_table(check, meta)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in check.rows]},
                              indent=1, default=str) + "\n")
    print(f"# written to {out}")
    return 1 if any(r.status in ("fail", "error") for r in check.rows) else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:1, cpu, ...")
    p.add_argument("--quick", action="store_true",
                   help="tiny model and sizes (seconds on a CPU): keeps the script runnable")
    p.add_argument("--json", default="gpu_check.json", help="where to write the table")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds the checks may take before the rest is skipped "
                        "(default 420; 120 with --quick)")
    p.add_argument("--label", default="", help="free text kept in the JSON (a commit, ...)")
    p.add_argument("--only", default=None,
                   help=f"comma-separated parts to run, of {','.join(PARTS)} (default: all)")
    p.add_argument("--batch", type=int, default=64, help="inference clips per batch")
    p.add_argument("--seconds", type=float, default=10.0, help="inference clip length")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per path (best kept)")
    p.add_argument("--compile-seconds", type=float, default=90.0,
                   help="budget seconds a torch.compile path needs left to start")
    p.add_argument("--files", type=int, default=500, help="files for the extract check")
    p.add_argument("--train-batch", type=int, default=16, help="training clips per step")
    p.add_argument("--train-steps", type=int, default=6,
                   help="training steps per path (the first not counted)")
    p.add_argument("--fp16-steps", type=int, default=200, help="float16 training steps")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = p.parse_args(argv)
    if args.only is not None:
        args.only = {x.strip() for x in args.only.split(",") if x.strip()}
        if not args.only or args.only - set(PARTS):
            p.error(f"--only {','.join(sorted(args.only))}: choose from {','.join(PARTS)}")
    if args.quick:
        args.batch, args.seconds, args.repeats, args.files = 2, 2.0, 1, 8
        args.train_batch, args.train_steps, args.fp16_steps = 2, 2, 6
    if args.budget is None:
        args.budget = 120.0 if args.quick else 420.0
    return args


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
