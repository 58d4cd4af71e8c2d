"""The one training loop (`fit`) that fine-tuning, pre-training and distillation share.

A training run is a `Task` (what is trained and how its loss is computed) plus a
`TrainConfig` (how long, how fast, on what). `fit` owns everything else: the output
folder and its lock, data loading in worker processes, gradient accumulation, AdamW with
warm-up and decay, gradient clipping, autocast (bf16/fp16 with loss scaling), data
parallelism under ``torchrun`` (and FSDP2 with ``cfg.fsdp``), validation and the best
checkpoint, early stopping, ``metrics.jsonl`` / TensorBoard / tqdm on rank 0, and
checkpoints of the full training state that resume bit-exactly.

How to add a task (``beats pretrain``, ``beats distill``, ...): subclass `Task`.

- ``model``: the `nn.Module` holding everything that is trained (saved in checkpoints).
- ``train_set``: a map-style Dataset indexed by ``(stream position, item index)`` keys
  (`beats.train.data.ClipDataset` reads clips with crops and per-item random draws;
  draw anything random per item, such as masks, from the generator it hands to its
  ``augment`` callable). ``sample_weights`` (optional) turns on sampling with
  replacement by weight; ``clip_seconds`` converts ``--batch-seconds`` to clips.
- ``collate(items) -> batch``: a dict with ``count`` (the number of loss terms in this
  micro-batch: clips, masked patches, ... known BEFORE the forward pass), ``seconds``
  (audio seconds, for throughput) and ``failed`` ([(source, error)] of unreadable items);
  tensors in it are moved to the device by the loop.
  `beats.train.data.collate_clips` does this for clips.
- ``parameter_groups(cfg) -> [{"params": [...], "lr_scale": s, "weight_decay": w}]``:
  called after the model is on its device (and sharded), so build it from the modules.
- ``forward_loss(batch, denominator) -> (loss, metrics)``: the loss SUMMED over the
  micro-batch's loss terms and divided by ``denominator``, the global number of loss
  terms of the whole optimiser step (every micro-batch, every process). Summing these
  over micro-batches and processes gives the step's mean loss, identical whatever the
  split. ``metrics``: ``{name: tensor([sum, count])}``; logged as sum / count over the
  logging window.
- ``evaluate() -> {"score": ..., ...} | None`` (optional): validation, run by every
  process on the same data (so that sharded models can run); ``score`` higher is better,
  an optional ``tiebreak`` (higher better) decides equal scores; the other numbers are
  logged with a ``val_`` prefix.
- ``export(out_dir, tag, state_dict)`` (optional): write the task's artefacts from a full
  model state dict, ``tag`` "best" (on a validation improvement) or "last" (at the end).
- ``before_step(step, micro)`` (optional): called on every process before the step's
  forward passes, with this process's micro-batches (as collated, on the CPU; some may
  be empty): one-off collective set-up that needs data, such as the distillation
  codebook's k-means initialisation (every process takes part even when its share is
  empty, so collectives cannot hang).
- ``after_step(step) -> {name: value} | None`` (optional): e.g. an EMA codebook update
  (gradients are synced and the optimiser has stepped; all-reduce your own statistics
  with `distributed.all_sum`); the values returned are logged, averaged over the steps
  of the logging window. ``discard_step(step)`` (optional) is called instead when float16
  loss scaling skipped the step (no optimiser step): drop what the forwards recorded.
  ``fsdp_units()``: the modules to shard one by one (default:
  the model's encoder layers above layer 0); ``train_mode()``: set train/eval modes
  before each step (default ``model.train()``; keep frozen parts in eval);
  ``run_info()``: extra entries for ``OUT/config.json``; ``identity()``: what the run
  trains on (model, classes, data digests), recorded in ``OUT/config.json`` and compared
  on ``--resume`` (`beats.train.state.identity_differences`); ``failed``: [(source,
  error)] found unreadable before training, recorded in ``OUT/failed.jsonl``;
  ``readable``: how many inputs were found readable before training (0 stops the run
  before it starts; None: not checked); ``name``: the command's name, used in messages.

Then ``fit(task, cfg, out_dir) -> FitResult`` runs it; a task-specific config subclasses
`TrainConfig` (its extra fields land in ``config.json`` and take part in the resume check).
When the task has written everything it writes, `finish` marks the run finished: a
finished run is never written again, and ``fit`` with ``resume`` on it returns its
`FitResult` (``finished_before``) without training.
Model randomness (dropout, layerdrop, mixup) must come from the torch global RNG (saved
per process); data randomness from the Dataset's per-item generator.

The loss normalisation makes 2 processes x n clips equal 1 process x 2n clips up to float
summation order: each process backpropagates its share of the step's mean loss, and
`distributed.sync_gradients` sums the gradients.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .. import __version__
from ..errors import InputError
from ..failures import ErrorLog, expected
from ..files import atomic_write, folder_lock, remove_stale_temporaries
from ..workers import worker_init
from . import distributed, logs, state
from .config import TrainConfig
from .schedule import lr_factor, warmup_steps

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CONFIG_FILE = "config.json"
MAX_SKIPPED = 20  # float16: consecutive overflowing steps before the run is given up
METRICS_FILE = logs.METRICS_FILE


class RunError(InputError):
    """A run that cannot start (bad folder, settings that do not match a resumed run)."""


class TrainingError(RuntimeError):
    """Training stopped: a non-finite loss or gradient norm."""


class Task:
    """What is trained: subclass and fill in (see the module docstring)."""

    name: str = "train"
    model: nn.Module
    train_set: Dataset
    sample_weights: list[float] | None = None
    clip_seconds: float | None = None
    failed: Sequence[tuple[str, ...]] = ()  # files found unreadable before training
    # (`beats.train.data.failure_entry`)
    readable: int | None = None  # inputs found readable before training (None: unchecked)

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        raise NotImplementedError

    def parameter_groups(self, cfg: TrainConfig) -> list[dict[str, Any]]:
        return [{"params": [p for p in self.model.parameters() if p.requires_grad]}]

    def forward_loss(self, batch: dict[str, Any], denominator: float
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def train_mode(self) -> None:
        """Put the model in training mode (override to keep frozen parts in eval)."""
        self.model.train()

    def evaluate(self) -> dict[str, float] | None:
        return None

    def export(self, out_dir: Path, tag: str, state_dict: dict[str, torch.Tensor]) -> None:
        return None

    def before_step(self, step: int, micro: list[dict[str, Any]]) -> None:
        return None

    def after_step(self, step: int) -> dict[str, float] | None:
        return None

    def discard_step(self, step: int) -> None:
        return None

    def fsdp_units(self) -> list[nn.Module]:
        """Modules sharded one by one: the encoder layers, except layer 0 when it holds
        the relative position table that every layer uses (the encoder reads it outside
        layer 0's forward, so it stays in the model's own unit, gathered throughout)."""
        encoder = getattr(self.model, "encoder", None)
        layers = list(getattr(encoder, "layers", []))
        if getattr(encoder, "relative_position_embedding", False):
            return layers[1:]
        return layers

    def run_info(self) -> dict[str, Any]:
        """Extra entries for ``OUT/config.json`` (data, model, classes, ...)."""
        return {}

    def identity(self) -> dict[str, Any]:
        """What a resumed run must share with the earlier one: ``{part: JSON value}``, parts
        named in `beats.train.state.IDENTITY_NAMES` (model, classes, data, ...)."""
        return {}


@dataclass
class FitResult:
    """What a run did: steps taken, best validation step and score, wall seconds of
    training (summed over resumptions), whether it stopped early, files that failed;
    ``finished_before``: the run had finished already (nothing was trained or written)."""

    steps: int
    best_step: int | None
    best_score: float | None
    seconds: float
    stopped_early: bool
    failed: list[tuple[str, str]] = field(default_factory=list)
    unexpected: int = 0  # failed files whose error was unexpected: see OUT/errors.log
    finished_before: bool = False


def holds_run(out_dir: Path) -> bool:
    """Whether ``out_dir`` already holds a training run."""
    return any((out_dir / name).exists()
               for name in (CONFIG_FILE, METRICS_FILE, state.STATE_DIR))


def check_output_folder(out_dir: Path, resume: bool) -> None:
    """Refuse a folder holding another run unless resuming (before any work is done)."""
    if not resume and holds_run(Path(out_dir)):
        raise RunError(f"{out_dir} already holds a training run; pass --resume to continue "
                       "it or choose an empty output folder")


def _check_resume_config(out_dir: Path, cfg: TrainConfig, identity: dict[str, Any]) -> None:
    """A resumed run must have the earlier run's settings and identity (model, classes,
    data): else one line naming what differs."""
    path = out_dir / CONFIG_FILE
    if not (cfg.resume and path.exists()):
        return
    record = json.loads(path.read_text())
    changed = cfg.differences(type(cfg).from_dict(record["config"]))
    differences = []
    if changed:
        details = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        differences.append(f"other settings ({details})")
    differences += state.identity_differences(record.get("identity") or {}, identity)
    if differences:
        raise RunError(f"cannot resume in {out_dir}: the earlier run used "
                       f"{' and '.join(differences)}; resume with the same settings, model "
                       "and data, or use a new output folder")


def _start(out_dir: Path, cfg: TrainConfig, task: Task, d: distributed.Dist,
           stack: contextlib.ExitStack) -> FitResult | None:
    """Lock and check the folder on rank 0 and write config.json; every rank learns of
    an error instead of hanging at the next collective (rank 0 raises it as it was, the
    others a `RunError`, or a ``RuntimeError`` for a bug). Returns the earlier
    `FitResult` of a resumed run that had finished (then nothing is written)."""
    error, finished = None, None
    if d.main:
        try:
            stack.enter_context(folder_lock(out_dir, f"beats {task.name}"))
            check_output_folder(out_dir, cfg.resume)
            identity = task.identity()
            _check_resume_config(out_dir, cfg, identity)
            finished = state.load_finished(out_dir) if cfg.resume else None
            if finished is None:
                _check_readable(out_dir, task)
                remove_stale_temporaries(out_dir)  # a killed run's half-written files
                record = {"beats_version": __version__, "command": sys.argv,
                          "task": task.name, "world_size": d.world, "config": cfg.to_dict(),
                          **task.run_info(), "identity": identity}
                with atomic_write(out_dir / CONFIG_FILE, "w") as f:
                    json.dump(record, f, indent=2)
        except Exception as e:
            error = e
    said = None if error is None else (expected(error), str(error))
    said, finished = distributed.broadcast_object((said, finished), d)
    if error is not None:
        raise error
    if said is not None:  # another rank: (expected, message) of rank 0's error
        raise RunError(said[1]) if said[0] else RuntimeError(f"rank 0 met a bug: {said[1]}")
    if finished is not None:
        finished["failed"] = [tuple(x) for x in finished.get("failed", [])]
        return FitResult(**finished, finished_before=True)
    return None


def _check_readable(out_dir: Path, task: Task) -> None:
    """Stop before training when no input could be read, naming ``failed.jsonl``."""
    if task.readable != 0:
        return
    logs.write_failures(out_dir / logs.FAILED_FILE, ErrorLog(out_dir), task.failed)
    raise RunError(f"none of the {len(task.failed)} input file(s) could be read (see "
                   f"{out_dir / logs.FAILED_FILE} for why); nothing was trained")


def finish(out_dir: str | Path, result: FitResult) -> None:
    """Mark the run in ``out_dir`` finished, once the task has written all its files: a
    ``--resume`` of it then says so and writes nothing. Rank 0 writes; no collective (the
    process group may be gone)."""
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if initialized else int(os.environ.get("RANK", "0"))
    if rank == 0 and not result.finished_before:
        record = dataclasses.asdict(result)
        record.pop("finished_before")
        state.save_finished(Path(out_dir), record)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def _seed_everything(seed: int, rank: int) -> None:
    torch.manual_seed(seed * 1009 + rank)
    random.seed(seed * 1009 + rank)
    np.random.seed((seed * 1009 + rank) % 2**32)


# --------------------------------------------------------------------------- state dicts
def _full_state(model: nn.Module, opt: torch.optim.Optimizer | None, cfg: TrainConfig
                ) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Full (unsharded) model and optimiser state dicts (on rank 0 under FSDP)."""
    if not cfg.fsdp:
        return model.state_dict(), None if opt is None else opt.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=options)
    opt_sd = None if opt is None else get_optimizer_state_dict(model, opt, options=options)
    return model_sd, opt_sd


def load_model_weights(model: nn.Module, state_dict: dict[str, torch.Tensor],
                       cfg: TrainConfig) -> None:
    """Load a full state dict (read on every process) into a plain or sharded model."""
    if not cfg.fsdp:
        model.load_state_dict(state_dict)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state_dict, options=StateDictOptions(full_state_dict=True))


def _load_full_state(model: nn.Module, opt: torch.optim.Optimizer, saved: dict[str, Any],
                     cfg: TrainConfig) -> None:
    if not cfg.fsdp:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, saved.get("model", {}), options=options)
    set_optimizer_state_dict(model, opt, saved.get("optimizer", {}), options=options)


# --------------------------------------------------------------------------- the loop
def steps_for(cfg: TrainConfig, num_items: int, clip_seconds: float | None) -> tuple[int, int]:
    """(clips per step, total steps) for ``num_items`` training items."""
    if cfg.batch_seconds is not None:
        if not clip_seconds:
            raise RunError("batch-seconds needs a crop length (crop-seconds) to count clips")
        per_step = max(1, round(cfg.batch_seconds / clip_seconds))
    else:
        per_step = cfg.batch_size
    total = cfg.steps or math.ceil(cfg.epochs * num_items / per_step)
    return per_step, total


def fit(task: Task, cfg: TrainConfig, out_dir: str | Path) -> FitResult:
    """Train ``task`` with ``cfg``, writing into ``out_dir``; see the module docstring.

    Raises `RunError` before any work when the folder is busy or holds another run (without
    ``cfg.resume``) or a resumed run's settings differ, and `TrainingError` when the loss
    or gradient norm stops being finite (never with float16, whose loss scaling skips
    such steps).
    """
    out_dir = Path(out_dir)
    d = distributed.setup(cfg.device)
    with contextlib.ExitStack() as stack:
        stack.callback(distributed.teardown, d)
        finished = _start(out_dir, cfg, task, d, stack)
        if finished is not None:
            return finished
        return _fit(task, cfg, out_dir, d)


def _fit(task: Task, cfg: TrainConfig, out_dir: Path, d: distributed.Dist) -> FitResult:
    num_items = len(task.train_set)
    per_step, total = steps_for(cfg, num_items, task.clip_seconds)
    if per_step < d.world:
        raise RunError(f"{per_step} clips per step cannot be shared by {d.world} processes")
    steps_per_epoch = math.ceil(num_items / per_step)
    eval_every = cfg.eval_every or steps_per_epoch
    warmup = warmup_steps(total, cfg.warmup_steps, cfg.warmup_ratio)
    dtype = DTYPES[cfg.dtype]
    state_dir = out_dir / state.STATE_DIR

    model = task.model.to(d.device)
    if cfg.fsdp:
        if d.world < 2:
            raise RunError("--fsdp shards over processes: start it with torchrun (2 or more)")
        distributed.shard(model, task.fsdp_units())
        distributed.register_methods(model, ["forward_fbank", "forward_waveform",
                                             "extract_features"])
    groups = task.parameter_groups(cfg)
    for g in groups:
        g.setdefault("lr_scale", 1.0)
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                            weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(d.device.type, enabled=dtype == torch.float16)

    loop = {"step": 0, "best_score": None, "best_tiebreak": None, "best_step": None,
            "bad_evals": 0, "seconds": 0.0, "stopped_early": False}
    saved = state.load(state_dir / state.LAST) if (
        cfg.resume and (state_dir / state.LAST).exists()) else None
    if saved is not None:
        if saved["world"] != d.world:
            raise RunError(f"the run was started with {saved['world']} process(es); resume "
                           f"it with as many (got {d.world})")
        _load_full_state(model, opt, saved if d.main or not cfg.fsdp else {}, cfg)
        scaler.load_state_dict(saved["scaler"])
        loop.update(saved["loop"])
        state.restore_rng(saved["rng"][d.rank])
    else:
        _seed_everything(cfg.seed, d.rank)
    start = loop["step"]

    from .data import StepSampler

    sampler = StepSampler(num_items, per_step, rank=d.rank, world=d.world,
                          micro_batch=cfg.micro_batch, seed=cfg.seed, start=start,
                          total=0 if loop["stopped_early"] else total,
                          weights=task.sample_weights)
    loader = DataLoader(task.train_set, batch_sampler=sampler, collate_fn=task.collate,
                        num_workers=cfg.num_workers,
                        worker_init_fn=worker_init if cfg.num_workers else None,
                        generator=torch.Generator().manual_seed(cfg.seed),
                        prefetch_factor=2 if cfg.num_workers else None,
                        # page-locked batches: the non_blocking copies in _to_device are
                        # then truly asynchronous (from pageable memory they wait)
                        pin_memory=d.device.type == "cuda")
    log = logs.RunLog(out_dir, start, total, d, cfg.quiet)
    failures = logs.Failures(out_dir, d)
    failures.add([list(task.failed) if d.main else []])
    failures.flush()
    window = logs.Window()
    window.restore(loop.pop("window", None))
    skipped = [0]  # consecutive float16 steps skipped for overflowing gradients
    step = start
    try:
        batches = iter(loader)
        while step < sampler.total:
            micro = [next(batches) for _ in range(sampler.accum)]
            tic = time.perf_counter()
            result = _train_step(task, cfg, model, opt, scaler, params, micro, step, total,
                                 warmup, dtype, d, skipped)
            if result["skipped"]:
                task.discard_step(step)
            else:  # the task's per-step numbers are logged like its metrics (window mean)
                done = task.after_step(step) or {}
                result.update({k: (float(v), 1.0) for k, v in done.items()})
            step += 1
            window.add(result, time.perf_counter() - tic)
            failures.add(b["failed"] for b in micro)
            loop["seconds"] += time.perf_counter() - tic
            entry: dict[str, Any] = {}
            if step % cfg.log_every == 0 or step in (1, total):
                entry.update(window.entry(step, step * per_step / num_items, d))
                failures.flush()
            if step % eval_every == 0 or step == total:
                scores = _evaluate(task, dtype, d)
                if scores is not None:
                    entry.update({"step": step, "epoch": step * per_step / num_items,
                                  **{f"val_{k}": v for k, v in scores.items()}})
                    if _improved(loop, scores):
                        loop.update(best_score=scores["score"], best_step=step, bad_evals=0,
                                    best_tiebreak=scores.get("tiebreak"))
                        _save_best(task, cfg, model, out_dir, step, scores, d)
                    else:
                        loop["bad_evals"] += 1
                        if cfg.patience and loop["bad_evals"] >= cfg.patience:
                            loop["stopped_early"] = True
            if entry:
                log.write(entry)
            log.advance()
            if step % cfg.save_every == 0 or step == total or loop["stopped_early"]:
                loop["step"] = step
                _save_last(cfg, model, opt, scaler, {**loop, "window": window.snapshot()},
                           out_dir, d)
            if loop["stopped_early"]:
                break
    finally:
        log.close()
    loop["step"] = step
    failures.flush()
    model_sd, _ = _full_state(model, None, cfg)
    if d.main:
        task.export(out_dir, "last", model_sd)
    distributed.barrier(d)
    return FitResult(step, loop["best_step"], loop["best_score"], loop["seconds"],
                     loop["stopped_early"], failures.all, failures.unexpected)


def _train_step(task: Task, cfg: TrainConfig, model: nn.Module, opt: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler, params: list[nn.Parameter],
                micro: list[dict[str, Any]], step: int, total: int, warmup: int,
                dtype: torch.dtype, d: distributed.Dist, skipped: list[int]
                ) -> dict[str, Any]:
    """One optimiser step over this process's micro-batches; global sums of the step."""
    local = torch.tensor([float(sum(b["count"] for b in micro)),
                          float(sum(b["seconds"] for b in micro))], dtype=torch.float64)
    # alone, the counts stay on the host: a trip through the GPU would wait for the
    # previous step's optimiser kernels before this step's forward could be queued
    summed = local if d.world == 1 else distributed.all_sum(local.to(d.device), d)
    count, seconds = summed.tolist()
    factor = lr_factor(step, total, warmup, cfg.schedule)
    for g in opt.param_groups:
        g["lr"] = cfg.lr * g["lr_scale"] * factor
    task.train_mode()
    task.before_step(step, micro)
    # FSDP averages gradients over processes (gloo has no pre-multiplied sum to make it
    # sum): a loss scaled by the world size undoes that (exactly for a power-of-two world
    # size, else up to float rounding)
    fsdp_scale = d.world if cfg.fsdp else 1
    loss_sum = torch.zeros((), dtype=torch.float64, device=d.device)
    sums: dict[str, torch.Tensor] = {}
    if count > 0:
        for i, batch in enumerate(micro):
            if cfg.fsdp:
                distributed.set_gradient_sync(model, i == len(micro) - 1)
            if batch["count"] == 0:
                continue
            batch = _to_device(batch, d.device)
            with torch.autocast(d.device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss, metrics = task.forward_loss(batch, count / fsdp_scale)
            scaler.scale(loss).backward()
            loss_sum += loss.detach().double() / fsdp_scale
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0) + v.detach().double()
    if not cfg.fsdp:
        distributed.sync_gradients(params, d)
    names = sorted(sums)
    parts = [loss_sum.reshape(1)] + [sums[k].reshape(2) for k in names]
    totals = distributed.all_sum(torch.cat(parts), d).cpu()
    loss_value = float(totals[0])
    scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm if cfg.clip_norm > 0 else math.inf)
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    # float16's loss scaling skips a step whose gradients overflow (and lowers the scale);
    # anything else that is not finite, the loss above all, ends the run
    bad = None
    overflowed = False
    if count > 0 and not math.isfinite(loss_value):
        bad = f"the loss is not finite ({loss_value})"
    elif count > 0 and not math.isfinite(norm) and not scaler.is_enabled():
        bad = f"the gradient norm is not finite ({norm})"
    elif count > 0 and not math.isfinite(norm):
        overflowed = True
        skipped[0] += 1
        if skipped[0] >= MAX_SKIPPED:
            bad = f"float16 gradients overflowed {MAX_SKIPPED} steps in a row"
    else:
        skipped[0] = 0
    if bad:
        raise TrainingError(
            f"step {step + 1}: {bad}; lower --lr, raise --warmup-steps, use --dtype float32, "
            "or check the data. The last good training state is in state/last.pt"
        )
    if count > 0:
        scaler.step(opt)
        scaler.update()
    opt.zero_grad(set_to_none=True)
    out = {"loss": loss_value, "count": count, "seconds": seconds,
           "lr": cfg.lr * factor, "grad_norm": norm, "skipped": overflowed}
    for i, k in enumerate(names):
        out[k] = (float(totals[1 + 2 * i]), float(totals[2 + 2 * i]))
    return out


def _improved(loop: dict[str, Any], scores: dict[str, float]) -> bool:
    if loop["best_score"] is None:
        return True
    new = (scores["score"], scores.get("tiebreak", 0.0))
    old = (loop["best_score"], loop["best_tiebreak"] or 0.0)
    return new > old


def _evaluate(task: Task, dtype: torch.dtype, d: distributed.Dist) -> dict[str, float] | None:
    with torch.no_grad(), torch.autocast(d.device.type, dtype=dtype,
                                         enabled=dtype != torch.float32):
        scores = task.evaluate()
    if scores is not None and not math.isfinite(scores["score"]):
        raise TrainingError(f"the validation score is not finite ({scores['score']}); the "
                            "model diverged: lower --lr or use --dtype float32")
    return scores


def _save_best(task: Task, cfg: TrainConfig, model: nn.Module, out_dir: Path, step: int,
               scores: dict[str, float], d: distributed.Dist) -> None:
    model_sd, _ = _full_state(model, None, cfg)
    if d.main:
        state.save(out_dir / state.STATE_DIR / state.BEST,
                   {"model": model_sd, "step": step, "scores": dict(scores)})
        task.export(out_dir, "best", model_sd)
    distributed.barrier(d)


def _save_last(cfg: TrainConfig, model: nn.Module, opt: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, loop: dict[str, Any], out_dir: Path,
               d: distributed.Dist) -> None:
    model_sd, opt_sd = _full_state(model, opt, cfg)
    rngs = distributed.gather_objects(state.capture_rng(), d)
    if d.main:
        state.save(out_dir / state.STATE_DIR / state.LAST, {
            "model": model_sd, "optimizer": opt_sd, "scaler": scaler.state_dict(),
            "loop": dict(loop), "rng": rngs, "world": d.world, "config": cfg.to_dict(),
        })
    distributed.barrier(d)
