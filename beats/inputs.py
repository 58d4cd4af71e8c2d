"""Turn what users pass as audio into a checked (B, N) float32 batch with per-clip lengths."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from .audio import SAMPLE_RATE, resample
from .errors import InputError

MIN_SAMPLES = 2800  # 16 fbank frames = one 16 x 16 patch row (0.175 s at 16 kHz)

# Integer PCM is converted from its full scale to [-1, 1) (as soundfile does).
_INT_SCALES = {
    torch.int16: (0.0, 32768.0),
    torch.int32: (0.0, 2147483648.0),
    torch.int8: (0.0, 128.0),
    torch.uint8: (128.0, 128.0),
}

def pad_to_minimum(wav: np.ndarray) -> np.ndarray:
    """A (N,) clip zero-padded to `MIN_SAMPLES` when shorter (for files below the model's
    0.175 s, which the command line pads and flags rather than refuses)."""
    return np.pad(wav, (0, MIN_SAMPLES - len(wav))) if len(wav) < MIN_SAMPLES else wav


ArrayLike = torch.Tensor | np.ndarray | Sequence


def _as_tensor(x: ArrayLike, what: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        if x.dtype.kind in "OUS":
            raise TypeError(f"{what} must hold numbers, got a numpy array of dtype {x.dtype}")
        return torch.from_numpy(np.ascontiguousarray(x))
    raise TypeError(
        f"{what} must be a torch.Tensor or numpy.ndarray (or a list of 1-D ones), "
        f"got {type(x).__name__}"
    )


def _to_float(wav: torch.Tensor) -> torch.Tensor:
    """Float32 in [-1, 1]: floats are cast, int8/16/32 and uint8 PCM rescaled, others refused."""
    if wav.dtype in _INT_SCALES:
        offset, scale = _INT_SCALES[wav.dtype]
        return (wav.to(torch.float32) - offset) / scale
    if wav.dtype == torch.bool or wav.is_complex():
        raise TypeError(f"audio must be real floating-point samples, got dtype {wav.dtype}")
    if not wav.is_floating_point():
        raise TypeError(
            f"audio of dtype {wav.dtype} has no known PCM scale: pass float samples in "
            "[-1, 1], or int16/int32/int8/uint8 PCM (converted from full scale)"
        )
    return wav.to(torch.float32)


def _stack_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D float32 rows -> zero-padded (B, max N) batch on the first row's device, lengths."""
    lengths = torch.tensor([r.shape[0] for r in rows], dtype=torch.long)
    batch = rows[0].new_zeros(len(rows), int(lengths.max()))
    for i, r in enumerate(rows):
        batch[i, : r.shape[0]] = r.to(batch.device)
    return batch, lengths.to(batch.device)


def _pad_list(clips: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
    tensors = [_to_float(_as_tensor(c, f"clip {i}")) for i, c in enumerate(clips)]
    for i, t in enumerate(tensors):
        if t.dim() != 1:
            raise InputError(
                f"a list of clips must hold 1-D waveforms; clip {i} has shape {tuple(t.shape)}"
            )
    return _stack_padded(tensors)


def _resample_rows(
    wav: torch.Tensor, lengths: torch.Tensor, sample_rate: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample each clip's valid samples from ``sample_rate`` to 16 kHz and re-pad."""
    if not isinstance(sample_rate, int) or isinstance(sample_rate, bool) or sample_rate <= 0:
        raise InputError(f"sample_rate must be a positive int (Hz), got {sample_rate!r}")
    rows = [
        torch.from_numpy(resample(wav[b, : int(n)].cpu().numpy(), sample_rate))
        for b, n in enumerate(lengths.tolist())
    ]
    batch, new_lengths = _stack_padded(rows)
    return batch.to(wav.device), new_lengths.to(wav.device)


def _items(mask: torch.Tensor) -> list[int]:
    return mask.nonzero().flatten().tolist()


def prepare_batch(
    wav: ArrayLike,
    padding_mask: ArrayLike | None = None,
    lengths: ArrayLike | None = None,
    *,
    device: torch.device | str | None = None,
    sample_rate: int = SAMPLE_RATE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check audio input and return ``(wav (B, N) float32, lengths (B,) int64)`` on ``device``.

    Args:
        wav: (N,) or (B, N) tensor or numpy array of 16 kHz mono samples, or a list of 1-D
            clips of any lengths (zero-padded here). Floats must lie in [-1, 1]; int16,
            int32, int8 and uint8 PCM are converted from their full scale.
        padding_mask: (B, N) or (N,) bool, True at padded samples (padding must be a
            suffix of each row).
        lengths: (B,) valid samples per clip. Give ``padding_mask`` or ``lengths``, not both.
        sample_rate: the rate of ``wav`` in Hz; other rates than 16000 are resampled (soxr,
            high quality, each clip's valid part), and the lengths returned are at 16 kHz.

    Padded samples are set to zero. Raises ``TypeError``/``ValueError`` with a message
    that says what was wrong and what to do.
    """
    if padding_mask is not None and lengths is not None:
        raise InputError("give either padding_mask or lengths, not both")
    if isinstance(wav, (list, tuple)):
        if len(wav) == 0:
            raise InputError("audio is empty: got an empty list of clips")
        if padding_mask is not None or lengths is not None:
            raise InputError("a list of clips carries its own lengths: drop padding_mask/lengths")
        wav, lengths = _pad_list(wav)
    wav = _to_float(_as_tensor(wav, "audio"))
    if device is not None:
        wav = wav.to(device)
    single = wav.dim() == 1
    if single:
        wav = wav.unsqueeze(0)
    if wav.dim() != 2:
        hint = (" If it has a channel axis, downmix first (e.g. wav.mean(dim=1))."
                if wav.dim() == 3 else "")
        raise InputError(
            f"audio must be (N,) or (B, N) samples, got {wav.dim()}-D shape "
            f"{tuple(wav.shape)}.{hint}"
        )
    batch, n = wav.shape
    if batch == 0 or n == 0:
        raise InputError(f"audio is empty: shape {tuple(wav.shape)}")
    if 1 <= n <= 8 and batch > n:
        raise InputError(
            f"audio of shape {tuple(wav.shape)} looks like (samples, channels): BEATs takes "
            "mono 16 kHz audio; downmix with wav.mean(axis=-1) (or pick one channel)"
        )

    if padding_mask is not None:
        mask = _as_tensor(padding_mask, "padding_mask").to(wav.device)
        if single and mask.dim() == 1:
            mask = mask.unsqueeze(0)
        if tuple(mask.shape) != (batch, n):
            raise InputError(
                f"padding_mask has shape {tuple(mask.shape)} but audio has {(batch, n)}"
            )
        if mask.dtype != torch.bool:
            if mask.is_floating_point() or not ((mask == 0) | (mask == 1)).all():
                raise TypeError(f"padding_mask must be bool (True = padding), got {mask.dtype}")
            mask = mask.bool()
        lengths_t = n - mask.sum(dim=1)
        suffix = torch.arange(n, device=wav.device) >= lengths_t.unsqueeze(1)
        if not torch.equal(mask, suffix):
            raise InputError(
                "padding_mask must mark a suffix of each row as padding (True after the "
                f"valid samples); rows {_items((mask != suffix).any(dim=1))} do not"
            )
    elif lengths is not None:
        lengths_t = _as_tensor(lengths, "lengths").to(wav.device)
        if lengths_t.dim() == 0:
            lengths_t = lengths_t.unsqueeze(0)
        if lengths_t.is_floating_point() or lengths_t.dtype == torch.bool:
            raise TypeError(f"lengths must be integers (samples), got {lengths_t.dtype}")
        if tuple(lengths_t.shape) != (batch,):
            raise InputError(f"lengths has shape {tuple(lengths_t.shape)}, expected ({batch},)")
        if ((lengths_t < 0) | (lengths_t > n)).any():
            raise InputError(
                f"lengths must lie in [0, {n}] (the padded length); got {lengths_t.tolist()}"
            )
    else:
        lengths_t = torch.full((batch,), n, dtype=torch.long, device=wav.device)
    lengths_t = lengths_t.to(torch.long)

    valid = torch.arange(n, device=wav.device) < lengths_t.unsqueeze(1)
    wav = torch.where(valid, wav, torch.zeros((), dtype=wav.dtype, device=wav.device))
    bad = ~torch.isfinite(wav).all(dim=1)
    if bad.any():
        raise InputError(f"audio contains NaN or Inf in batch item(s) {_items(bad)}")
    if sample_rate != SAMPLE_RATE:
        wav, lengths_t = _resample_rows(wav, lengths_t, sample_rate)
    short = lengths_t < MIN_SAMPLES
    if short.any():
        items = _items(short)
        raise InputError(
            f"audio too short: clip(s) {items} have {lengths_t[short].tolist()} samples at "
            f"16 kHz; BEATs needs at least {MIN_SAMPLES} samples (0.175 s). Pad with zeros "
            "or drop them"
        )
    peak = wav.abs().amax(dim=1)
    if (peak > 2.0).any():
        warnings.warn(
            f"audio in batch item(s) {_items(peak > 2.0)} peaks at "
            f"{peak.max().item():.3g}, far outside [-1, 1]: float samples must be scaled "
            "to [-1, 1] (divide int16-scale values by 32768)",
            UserWarning,
            stacklevel=3,
        )
    return wav, lengths_t
