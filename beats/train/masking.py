"""Which patches pre-training hides: per-clip uniform random masking (see
docs/design/training.md, Masked pre-training).

The data pipeline draws each clip's mask from the clip's own generator (seeded by seed,
epoch and index), so masks do not depend on workers, ranks or resumes; the batch then
carries the masks and the number of loss terms (masked patches) before the forward.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from ..fbank import num_frames
from ..model_output import PATCHES_PER_STEP, frame_padding_mask


def num_patches(num_samples: int) -> int:
    """Valid patches of a 16 kHz clip of ``num_samples`` samples (496 for 10 s)."""
    return PATCHES_PER_STEP * (int(num_frames(num_samples)) // 16)


def num_masked(num_valid: int, ratio: float) -> int:
    """Patches to mask among ``num_valid``: ``ratio * num_valid`` rounded half up, at
    most ``num_valid - 1`` so that every clip keeps at least one patch."""
    check_ratio(ratio)
    if num_valid <= 0:
        return 0
    return min(int(ratio * num_valid + 0.5), num_valid - 1)


def check_ratio(ratio: float) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise InputError(f"mask ratio must lie in [0, 1), got {ratio!r}")


def mask_patches(num_valid: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """A clip's mask (num_valid,) bool, True at masked patches: a uniform random choice of
    `num_masked` of its valid patches (not blocks), drawn from ``generator`` alone.

    A 10 s clip (496 patches) with ratio 0.75 has 372 masked and 124 kept.
    """
    mask = torch.zeros(num_valid, dtype=torch.bool)
    count = num_masked(num_valid, ratio)
    if count:
        mask[torch.randperm(num_valid, generator=generator)[:count]] = True
    return mask


def pad_masks(masks: list[torch.Tensor], length: int) -> torch.Tensor:
    """Per-clip masks (n_b,) -> one batch mask (B, length), False past each clip's end
    (padding is never masked: it carries no label)."""
    out = torch.zeros(len(masks), length, dtype=torch.bool)
    for b, mask in enumerate(masks):
        if mask.numel() > length:
            raise ValueError(f"mask {b} covers {mask.numel()} patches, the batch has {length}")
        out[b, : mask.numel()] = mask
    return out


def kept_patches(
    masked: torch.Tensor, frames: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the kept patches of a batch are, in their original order.

    Args:
        masked: (B, S) bool, True at masked patches (never at padding).
        frames: (B,) int64 valid filterbank frames per clip.

    Returns:
        ``(index, kept_padding, padding)``: index (B, S') int64 the kept patches'
        positions in the full sequence, S' the most any clip keeps, rows past a clip's
        kept count pointing at S (a spare slot past the end); kept_padding (B, S') bool,
        True at those rows; padding (B, S) bool, True at padded patches.
    """
    if masked.dtype != torch.bool or masked.dim() != 2:
        raise ValueError(f"masked must be a (B, S) bool tensor, got {masked.dtype} "
                         f"{tuple(masked.shape)}")
    length = masked.shape[1]
    padding = frame_padding_mask(frames, length)
    if (masked & padding).any():
        raise ValueError("a mask marks padded patches: padding cannot be masked (pad_masks "
                         "builds batch masks from per-clip ones)")
    kept = ~(masked | padding)
    counts = kept.sum(dim=1)
    # A stable sort of "not kept" puts each clip's kept patches first, in order.
    order = torch.sort((~kept).to(torch.uint8), dim=1, stable=True).indices
    width = int(counts.max())
    kept_padding = torch.arange(width, device=masked.device) >= counts.unsqueeze(1)
    index = order[:, :width].masked_fill(kept_padding, length)
    return index, kept_padding, padding
