"""`TrainConfig`: the training loop's settings, shared by every task, with a JSON round trip.

Tasks extend it by subclassing (``FinetuneConfig(TrainConfig)``); `to_dict` / `from_dict`
cover every field of the subclass too, so ``OUT/config.json`` repeats a run exactly.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

DTYPES = ("float32", "bfloat16", "float16")
SCHEDULES = ("cosine", "linear", "constant")
# Options that may differ between a run and its resumption (they change nothing computed).
RESUME_FREE = ("resume", "quiet", "num_workers", "log_every", "save_every", "device")

C = TypeVar("C", bound="TrainConfig")


@dataclass
class TrainConfig:
    """How to train (every task). Units: steps are optimiser steps; seconds of audio.

    Attributes:
        epochs: passes over the training items (used when ``steps`` is None).
        steps: optimiser steps; overrides ``epochs``.
        batch_size: clips per optimiser step, over all processes.
        batch_seconds: audio seconds per step instead: clips = round(batch_seconds /
            crop_seconds) (the task's crop length).
        micro_batch: clips per forward pass per process (None: the process's whole share
            of the step); gradient accumulation takes the step's share in pieces.
        lr: peak learning rate (AdamW); each parameter group scales it (layer-wise decay).
        schedule: after warm-up, ``cosine`` or ``linear`` decay to 0, or ``constant``.
        warmup_steps: linear warm-up steps; 0 uses ``warmup_ratio`` of all steps.
        warmup_ratio: warm-up as a share of all steps, when ``warmup_steps`` is 0.
        weight_decay, betas, eps: AdamW's (decay is not applied to biases and norms).
        clip_norm: global gradient-norm clip (0: off).
        dtype: autocast dtype (weights stay float32); float16 adds loss scaling.
        device: ``auto`` (CUDA under torchrun: its LOCAL_RANK), ``cpu``, ``cuda:1``, ...
        seed: data order, crops, augmentation and model randomness all follow from it.
        num_workers: DataLoader processes reading audio (0: in the main process).
        log_every: steps between ``metrics.jsonl`` lines (step 1 and the last step too).
        save_every: steps between training-state checkpoints (and at the end).
        eval_every: steps between validations (0: once per epoch).
        patience: validations without improvement before stopping (0: never stop early).
        fsdp: shard parameters, gradients and optimiser state over processes (FSDP2,
            one unit per encoder layer): for models that do not fit one GPU.
        resume: continue the run in the output folder from its last checkpoint.
        quiet: no progress bar or summary.
    """

    epochs: int = 30
    steps: int | None = None
    batch_size: int = 16
    batch_seconds: float | None = None
    micro_batch: int | None = None
    lr: float = 1e-4
    schedule: str = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    clip_norm: float = 1.0
    dtype: str = "float32"
    device: str = "auto"
    seed: int = 0
    num_workers: int = 2
    log_every: int = 10
    save_every: int = 100
    eval_every: int = 0
    patience: int = 0
    fsdp: bool = False
    resume: bool = False
    quiet: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first impossible value."""
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ValueError(f"{name.replace('_', '-')}={getattr(self, name)!r}: {what}")

        for name in ("epochs", "batch_size", "log_every", "save_every"):
            need(_is_int(getattr(self, name)) and getattr(self, name) >= 1, name,
                 "must be a positive integer")
        for name in ("steps", "micro_batch"):
            value = getattr(self, name)
            need(value is None or (_is_int(value) and value >= 1), name,
                 "must be a positive integer")
        for name in ("warmup_steps", "eval_every", "patience", "num_workers", "seed"):
            need(_is_int(getattr(self, name)) and getattr(self, name) >= 0, name,
                 "must be an integer >= 0")
        need(self.lr > 0 and math.isfinite(self.lr), "lr", "must be a positive number")
        need(self.batch_seconds is None or self.batch_seconds > 0, "batch_seconds",
             "must be positive")
        need(0 <= self.warmup_ratio < 1, "warmup_ratio", "must lie in [0, 1)")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(self.clip_norm >= 0, "clip_norm", "must be >= 0 (0 turns clipping off)")
        need(self.schedule in SCHEDULES, "schedule", f"choose one of {SCHEDULES}")
        need(self.dtype in DTYPES, "dtype", f"choose one of {DTYPES}")
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        need(all(0 <= b < 1 for b in self.betas), "betas", "must lie in [0, 1)")

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready."""
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any], **overrides: Any) -> C:
        """Build from `to_dict` output (``overrides`` win). Unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} settings {unknown}; known: {sorted(names)}")
        values = {**data, **overrides}
        hints = typing.get_type_hints(cls)
        for name, value in values.items():
            values[name] = _coerce(name, value, hints[name])
        return cls(**values)

    def differences(self, other: TrainConfig) -> dict[str, tuple[Any, Any]]:
        """Settings that differ from ``other``'s (those in `RESUME_FREE` left out)."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {k: (theirs.get(k), v) for k, v in mine.items()
                if k not in RESUME_FREE and theirs.get(k) != v}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """JSON value -> the field's type (tuples from lists, floats from ints); checked."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ValueError(f"setting {name!r} cannot be null")
    for kind in options:
        origin = typing.get_origin(kind) or kind
        if origin is bool and isinstance(value, bool):
            return value
        if origin is int and _is_int(value):
            return value
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if origin is str and isinstance(value, str):
            return value
        if origin is tuple and isinstance(value, (list, tuple)):
            return tuple(value)
    raise ValueError(f"setting {name!r} = {value!r} has the wrong type (expected {hint})")
