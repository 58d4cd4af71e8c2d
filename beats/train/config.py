"""`TrainConfig`: the training loop's settings, shared by every task, with a JSON round trip.

Tasks extend it by subclassing (``FinetuneConfig(TrainConfig)``); `to_dict` / `from_dict`
cover every field of the subclass too, so ``OUT/config.json`` repeats a run exactly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import InputError
from ..options import check, coerce, option

DTYPES = ("float32", "bfloat16", "float16")
SCHEDULES = ("cosine", "linear", "constant")
# The --help sections of the loop's options.
LENGTH, OPTIMISER, EVALUATION, RUN = "training length", "optimiser", "evaluation", "running"
# Options that may differ between a run and its resumption (they change nothing computed).
RESUME_FREE = ("resume", "quiet", "num_workers", "log_every", "save_every", "device")

C = TypeVar("C", bound="TrainConfig")


@dataclass
class TrainConfig:
    """How to train (every task). Units: steps are optimiser steps; seconds of audio.

    Every field is an `beats.options.option`: its help, bounds and choices make the
    training commands' options, their checks and the configuration reference.
    """

    epochs: int = option(30, help="passes over the training items (used when --steps is "
                         "not given)", ge=1, group=LENGTH)
    steps: int | None = option(None, help="optimiser steps; overrides --epochs", ge=1,
                               unset="as many as --epochs passes take", group=LENGTH)
    batch_size: int = option(16, help="clips per optimiser step, over all processes", ge=1,
                             group=LENGTH)
    batch_seconds: float | None = option(
        None, help="audio seconds per step instead: clips = round(this / the crop length)",
        gt=0, unset="unset, --batch-size counts", group=LENGTH)
    micro_batch: int | None = option(
        None, help="clips per forward pass per process, for gradient accumulation", ge=1,
        unset="the process's whole share of the step", group=LENGTH)
    lr: float = option(1e-4, help="peak learning rate (AdamW); each parameter group scales "
                       "it (layer-wise decay)", gt=0, group=OPTIMISER)
    schedule: str = option("cosine", help="after warm-up: cosine or linear decay to 0, or "
                           "constant", choices=SCHEDULES, group=OPTIMISER)
    warmup_steps: int = option(0, help="linear warm-up steps (0: --warmup-ratio of all "
                               "steps)", ge=0, flags=("--warmup-steps", "--warmup"),
                               group=OPTIMISER)
    warmup_ratio: float = option(0.1, help="warm-up as a share of all steps, when "
                                 "--warmup-steps is 0", ge=0, lt=1, group=OPTIMISER)
    weight_decay: float = option(0.01, help="AdamW weight decay (not applied to biases and "
                                 "norms)", ge=0, group=OPTIMISER)
    betas: tuple[float, float] = option((0.9, 0.98), help="AdamW's betas (beta1 beta2)",
                                        ge=0, lt=1, metavar=("B1", "B2"), group=OPTIMISER)
    eps: float = option(1e-8, help="AdamW's epsilon", gt=0, group=OPTIMISER)
    clip_norm: float = option(1.0, help="global gradient-norm clip (0: off)", ge=0,
                              group=OPTIMISER)
    dtype: str = option("float32", help="autocast dtype (weights stay float32); float16 "
                        "adds loss scaling", choices=DTYPES, group=RUN)
    device: str = option("auto", help="auto (cuda, mps, cpu; under torchrun the process's "
                         "LOCAL_RANK GPU), cpu, cuda, cuda:1, ...", group=RUN)
    seed: int = option(0, help="seed of data order, crops, augmentation and "
                       "initialisation", ge=0, group=RUN)
    num_workers: int = option(2, help="processes reading audio (0: in the main process)",
                              ge=0, flags=("-j", "--workers"), group=RUN)
    log_every: int = option(10, help="steps between metrics.jsonl lines (step 1 and the "
                            "last step too)", ge=1, group=RUN)
    save_every: int = option(100, help="steps between training-state checkpoints (and at "
                             "the end)", ge=1, group=RUN)
    eval_every: int = option(0, help="steps between validations (0: once per epoch)", ge=0,
                             group=EVALUATION)
    patience: int = option(0, help="validations without improvement before stopping (0: "
                           "never stop early)", ge=0, group=EVALUATION)
    fsdp: bool = option(False, help="shard parameters, gradients and optimiser state over "
                        "torchrun processes (FSDP2, one unit per encoder layer): for models "
                        "that do not fit one GPU", group=RUN)
    resume: bool = option(False, help="continue the run in the output folder from its last "
                          "checkpoint", group=RUN)
    quiet: bool = option(False, help="no progress bar or summary", flags=("-q", "--quiet"),
                         group=RUN)

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        self.validate()

    def validate(self) -> None:
        """Raise `beats.options.OptionError` naming the first impossible value."""
        check(self)
        self.betas = (float(self.betas[0]), float(self.betas[1]))

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
            raise InputError(f"unknown {cls.__name__} settings {unknown}; known: "
                             f"{sorted(names)}")
        values = {**data, **overrides}
        return cls(**{k: coerce(cls, k, v) for k, v in values.items()})

    def differences(self, other: TrainConfig) -> dict[str, tuple[Any, Any]]:
        """Settings that differ from ``other``'s (those in `RESUME_FREE` left out)."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {k: (theirs.get(k), v) for k, v in mine.items()
                if k not in RESUME_FREE and theirs.get(k) != v}
