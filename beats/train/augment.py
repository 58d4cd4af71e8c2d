"""Input augmentation: random roll, SpecAugment time/frequency masks, mixup.

Per-item draws (roll shift, mask positions) happen in the Dataset from the item's own
generator (`ItemAugmenter`); the batch-level operations (`apply_masks` on the filterbank,
`mixup`) run in the training process, mixup with the torch global RNG (saved in the
training state, so a resumed run draws the same).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..fbank import NUM_MEL_BINS, num_frames

MASKS = 2  # time masks and frequency masks per clip (SpecAugment's usual two of each)


@dataclass
class ItemAugmenter:
    """Per-item augmentation draws, for `beats.train.data.ClipDataset`.

    Attributes:
        roll: circularly shift the waveform by a uniform random amount.
        time_mask: each of the `MASKS` time masks is up to this share of the clip's
            frames wide (0: none).
        freq_mask: each of the `MASKS` frequency masks is up to this many mel bins wide
            (0: none).

    The masks are returned as ``time_masks`` and ``freq_masks`` (MASKS, 2) int64 arrays of
    (start, width); `apply_masks` applies them to the filterbank. With ``roll``, ``roll``
    () int64 is the shift in samples (sample i moved to (i + roll) mod N), so that
    time-stamped labels can move with the audio.
    """

    roll: bool = False
    time_mask: float = 0.0
    freq_mask: int = 0

    def __call__(self, wav: np.ndarray, rng: np.random.Generator
                 ) -> tuple[np.ndarray, dict[str, Any]]:
        extras: dict[str, Any] = {}
        if self.roll:
            shift = int(rng.integers(0, len(wav)))
            wav = np.roll(wav, shift)
            extras["roll"] = np.array(shift, dtype=np.int64)
        frames = num_frames(len(wav))
        extras["time_masks"] = _draw(rng, frames, int(self.time_mask * frames))
        extras["freq_masks"] = _draw(rng, NUM_MEL_BINS, self.freq_mask)
        return wav, extras


def _draw(rng: np.random.Generator, size: int, max_width: int) -> np.ndarray:
    """(MASKS, 2) (start, width): width uniform in [0, max_width], start uniform."""
    out = np.zeros((MASKS, 2), dtype=np.int64)
    for m in range(MASKS):
        width = int(rng.integers(0, max_width + 1)) if max_width > 0 else 0
        out[m] = (int(rng.integers(0, max(1, size - width + 1))), width)
    return out


def apply_masks(features: torch.Tensor, time_masks: torch.Tensor | None,
                freq_masks: torch.Tensor | None) -> torch.Tensor:
    """Zero (the normalised filterbank's mean) the masked frames and bins.

    features (B, T, 128); time_masks, freq_masks (B, M, 2) of (start, width).
    """
    keep = torch.ones(features.shape, dtype=torch.bool, device=features.device)
    for masks, axis in ((time_masks, 1), (freq_masks, 2)):
        if masks is None or not masks[..., 1].any():
            continue
        masks = masks.to(features.device)
        pos = torch.arange(features.shape[axis], device=features.device)
        start, width = masks[..., 0:1], masks[..., 1:2]  # (B, M, 1)
        hit = ((pos >= start) & (pos < start + width)).any(dim=1)  # (B, size)
        keep &= ~(hit.unsqueeze(2) if axis == 1 else hit.unsqueeze(1))
    return features * keep


def mixup_draw(batch: int, prob: float, alpha: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The random part of `mixup`, from the torch global RNG: (partner (B,) int64, lam (B,)
    float32, mixed (B,) bool). A clip that is not mixed has lam 1."""
    partner = torch.randperm(batch)
    lam = torch.distributions.Beta(alpha, alpha).sample((batch,))
    mixed = torch.rand(batch) < prob
    return partner, torch.where(mixed, lam, torch.ones_like(lam)), mixed


def mix(x: torch.Tensor, partner: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """``lam x + (1 - lam) x[partner]``, lam (B,) broadcast over x's trailing dimensions."""
    partner = partner.to(x.device)
    lam = lam.to(x.device).view(-1, *([1] * (x.dim() - 1)))
    return lam * x + (1 - lam) * x[partner]


def mixup(wav: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor, prob: float,
          alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mix each clip, with probability ``prob``, with a random partner of the batch.

    lambda ~ Beta(alpha, alpha) per clip; waveform and targets (B, ...) are mixed with the
    same lambda; the mixed clip is as long as the longer of the two. Uses the torch global
    RNG (`mixup_draw`). Returns (wav, lengths, targets).
    """
    batch = wav.shape[0]
    if prob <= 0 or batch < 2:
        return wav, lengths, targets
    partner, lam, mixed = mixup_draw(batch, prob, alpha)
    return (mix(wav, partner, lam), mixed_lengths(lengths, partner, mixed),
            mix(targets, partner, lam))


def mixed_lengths(lengths: torch.Tensor, partner: torch.Tensor, mixed: torch.Tensor
                  ) -> torch.Tensor:
    """(B,) the length of each mixed clip: the longer of the two."""
    partner, mixed = partner.to(lengths.device), mixed.to(lengths.device)
    return torch.where(mixed, torch.maximum(lengths, lengths[partner]), lengths)
