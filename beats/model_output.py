"""What `BEATs` returns (`BEATsOutput`) and the padding masks that say which of its
positions are valid."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .errors import InputError
from .fbank import NUM_MEL_BINS

PATCHES_PER_STEP = NUM_MEL_BINS // 16  # 8 frequency patches per 160 ms time step


def patch_padding_mask(lengths: torch.Tensor, num_positions: int) -> torch.Tensor:
    """Exact patch-level padding mask (B, S), True at padding, from sample lengths (B,).

    A clip of n samples has T = 1 + (n - 400) // 160 frames and T // 16 time steps, so its
    first 8 * (T // 16) positions are valid (docs/design/architecture.md, Padding).
    """
    frames = torch.div(lengths - 400, 160, rounding_mode="floor") + 1
    return frame_padding_mask(frames.clamp(min=0), num_positions)


def frame_padding_mask(frames: torch.Tensor, num_positions: int) -> torch.Tensor:
    """Patch-level padding mask (B, S), True at padding, from valid frame counts (B,).

    A clip of T frames has T // 16 whole time steps: its first 8 * (T // 16) positions
    are valid.
    """
    valid = PATCHES_PER_STEP * torch.div(frames, 16, rounding_mode="floor")
    return torch.arange(num_positions, device=frames.device) >= valid.unsqueeze(1)


def check_fbank(features: torch.Tensor, frames: torch.Tensor) -> None:
    """Refuse a filterbank batch whose shapes or frame counts cannot be right (one host
    sync); for entry points that take a filterbank from callers."""
    if features.dim() != 3 or features.shape[2] != NUM_MEL_BINS:
        raise InputError(f"the filterbank must be (B, T, {NUM_MEL_BINS}), got shape "
                         f"{tuple(features.shape)}")
    if frames.shape != features.shape[:1] or frames.is_floating_point():
        raise InputError(f"frames must be (B,) = ({features.shape[0]},) integers, got "
                         f"{frames.dtype} {tuple(frames.shape)}")
    if bool(((frames < 0) | (frames > features.shape[1])).any()):
        raise InputError(f"frames must count filterbank frames in [0, {features.shape[1]}] "
                         f"(fbank's second output, not samples); got {frames.tolist()}")


@dataclass
class BEATsOutput:
    """What `BEATs.extract_features` returns.

    Indexing and unpacking behave like the original's ``(x, padding_mask)`` tuple: item 0
    is ``features`` for pre-trained models and ``probs`` for fine-tuned ones (as in the
    original, whose fine-tuned models return probabilities there); item 1 is the mask.

    Attributes:
        features: (B, S, C) last encoder output (or layer ``output_layer``'s); zero at
            padded positions. S = 8 * time steps, position s = 8 * t + f.
        padding_mask: (B, S) bool, True at padded positions.
        hidden_states: L + 1 tensors (B, S, C) when asked for, else None.
        logits: (B, classes) fine-tuned models: the predictor averaged over valid positions.
        probs: (B, classes) ``sigmoid(logits)``, or ``softmax`` for single-label
            fine-tunes (``cfg.predictor_activation``).
        frame_logits: (B, T, classes) fine-tuned models: the predictor at each 160 ms time
            step, averaged over the step's 8 frequency bands; zero at padded steps
            (``step_padding_mask``). Their mean over a clip's valid steps is its
            ``logits``. ``BEATs.activate(frame_logits)`` gives frame probabilities.
    """

    features: torch.Tensor
    padding_mask: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None
    logits: torch.Tensor | None = None
    probs: torch.Tensor | None = None
    frame_logits: torch.Tensor | None = None

    @property
    def step_padding_mask(self) -> torch.Tensor:
        """(B, T) bool, True at padded time steps (160 ms each, T = S / 8)."""
        return self.padding_mask[:, ::PATCHES_PER_STEP]

    @property
    def step_times(self) -> torch.Tensor:
        """(T,) float64 centre of each step in seconds, ``0.16 t + 0.0875``."""
        steps = self.padding_mask.shape[1] // PATCHES_PER_STEP
        return (2560.0 * torch.arange(steps, dtype=torch.float64) + 1400.0) / 16000.0

    def to_tuple(self) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.probs if self.probs is not None else self.features
        return first, self.padding_mask

    def __getitem__(self, index: int | slice) -> Any:
        return self.to_tuple()[index]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.to_tuple())

    def __len__(self) -> int:
        return 2
