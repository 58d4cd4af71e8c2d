"""Learning-rate schedules as a pure function of the step (nothing to save for resume)."""

from __future__ import annotations

import math


def warmup_steps(total: int, steps: int, ratio: float) -> int:
    """Warm-up length: ``steps`` when given (> 0), else ``ratio`` of ``total`` (rounded)."""
    return steps if steps > 0 else round(ratio * total)


def lr_factor(step: int, total: int, warmup: int, kind: str = "cosine") -> float:
    """Multiplier of the peak learning rate for optimiser step ``step`` (0-based).

    Linear warm-up from 1 / warmup to 1 over ``warmup`` steps, then ``cosine`` or
    ``linear`` decay from 1 (step ``warmup``) towards 0 (reached at step ``total``, one
    past the last), or ``constant``.
    """
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {kind!r}: use cosine, linear or constant")
