"""From encoder outputs to the embeddings people store: layer choice and pooling.

BEATs emits 8 positions per 160 ms time step (one per band of 16 mel bins), position
``s = 8 * t + f``. Step t covers frames ``16t .. 16t + 15``, i.e. samples
``2560 t .. 2560 t + 2799``; its centre time is ``0.16 t + 0.0875`` seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import InputError
from .model_output import PATCHES_PER_STEP, BEATsOutput

TIME_POOLING = ("none", "mean", "mean+std")
FREQ_POOLING = ("keep", "mean")


def step_centres(num_steps: int) -> np.ndarray:
    """Centre time (seconds, float64) of each 160 ms step: (T,), ``(2560 t + 1400) / 16000``."""
    return (2560.0 * np.arange(num_steps, dtype=np.float64) + 1400.0) / 16000.0


@dataclass(frozen=True)
class PoolingSpec:
    """Which layers to keep and how to pool them.

    Attributes:
        layers: ``"last"`` (the model's features), ``"all"`` (hidden states 0..L), or a
            tuple of hidden-state indices (0 = encoder input, L = last layer).
        time: ``"none"`` (one row per 160 ms step), ``"mean"`` or ``"mean+std"`` over the
            clip's valid steps (std is the population std; mean and std concatenated).
        freq: ``"keep"`` the 8 frequency patches of each step, or ``"mean"`` over them.

    Output shape per clip, with an extra leading layer axis unless ``layers == "last"``:
    time none: (T, 8, C) or (T, C); mean: (8, C) or (C,); mean+std: (8, 2C) or (2C,).
    """

    layers: str | tuple[int, ...] = "last"
    time: str = "mean"
    freq: str = "mean"

    def __post_init__(self) -> None:
        if self.time not in TIME_POOLING:
            raise InputError(f"time pooling {self.time!r}: choose one of {TIME_POOLING}")
        if self.freq not in FREQ_POOLING:
            raise InputError(f"frequency pooling {self.freq!r}: choose one of {FREQ_POOLING}")
        if isinstance(self.layers, str) and self.layers not in ("last", "all"):
            raise InputError(f"layers {self.layers!r}: use 'last', 'all' or layer numbers")

    @property
    def needs_hidden_states(self) -> bool:
        return self.layers != "last"

    @property
    def time_resolved(self) -> bool:
        return self.time == "none"

    def layer_indices(self, num_layers: int) -> tuple[int, ...] | None:
        """Hidden-state indices to keep (None for ``last``); checks they exist."""
        if self.layers == "last":
            return None
        if self.layers == "all":
            return tuple(range(num_layers + 1))
        for k in self.layers:
            if not 0 <= k <= num_layers:
                raise InputError(
                    f"layer {k} does not exist: the model has hidden states 0..{num_layers}"
                )
        return tuple(self.layers)


def parse_layers(text: str) -> str | tuple[int, ...]:
    """``"last"``, ``"all"`` or a comma list such as ``"4,8,12"`` (for the CLI)."""
    text = text.strip().lower()
    if text in ("last", "all"):
        return text
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise InputError(f"--layers {text!r}: use 'last', 'all' or numbers like 4,8,12") from None


def pool(output: BEATsOutput, spec: PoolingSpec, num_layers: int) -> list[torch.Tensor]:
    """Per-clip embeddings of a batch, as float32 tensors on the output's device.

    Padded steps never enter a pool; a time-resolved embedding has exactly the clip's
    valid steps.
    """
    indices = spec.layer_indices(num_layers)
    if indices is None:
        stack = output.features.unsqueeze(1)  # (B, 1, S, C)
    else:
        if output.hidden_states is None:
            raise InputError("these layers need extract_features(output_hidden_states=True)")
        stack = torch.stack([output.hidden_states[k] for k in indices], dim=1)
    batch, layers, positions, dim = stack.shape
    x = stack.float().view(batch, layers, positions // PATCHES_PER_STEP, PATCHES_PER_STEP, dim)
    if spec.freq == "mean":
        x = x.mean(dim=3)  # (B, layers, T, C)
    # (B,) valid steps, read back once (per clip, each read waits for the GPU)
    steps = ((~output.padding_mask).sum(dim=1) // PATCHES_PER_STEP).tolist()
    clips = []
    for b in range(batch):
        valid = x[b, :, : steps[b]]  # (layers, T_b, ...)
        if spec.time == "mean":
            valid = valid.mean(dim=1)
        elif spec.time == "mean+std":
            valid = torch.cat([valid.mean(dim=1), valid.std(dim=1, unbiased=False)], dim=-1)
        clips.append(valid[0] if indices is None else valid)
    return clips
