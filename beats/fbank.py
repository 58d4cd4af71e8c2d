"""Kaldi-compatible log-mel filterbank in plain torch, batched, on any device.

Matches ``torchaudio.compliance.kaldi.fbank(wav * 32768, num_mel_bins=128,
sample_frequency=16000, frame_length=25, frame_shift=10)`` clip by clip
(docs/design/architecture.md, Filterbank), but runs a whole padded batch at once.
torchaudio is never imported.
"""

from __future__ import annotations

import contextlib
import math

import torch

from .errors import InputError
from .modules import is_tracing

SAMPLE_RATE = 16000
FRAME_LENGTH = 400  # samples (25 ms)
FRAME_SHIFT = 160  # samples (10 ms)
N_FFT = 512
NUM_MEL_BINS = 128
FBANK_MEAN = 15.41663
FBANK_STD = 6.55582
_EPS = torch.finfo(torch.float32).eps  # 1.1920929e-07, Kaldi's floor before the log

_TABLES: dict[tuple[str, int | None], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def num_frames(num_samples: torch.Tensor | int) -> torch.Tensor | int:
    """Frames (25 ms every 10 ms, whole frames only) of a clip of ``num_samples`` samples."""
    if isinstance(num_samples, torch.Tensor):
        frames = torch.div(num_samples - FRAME_LENGTH, FRAME_SHIFT, rounding_mode="floor") + 1
        return frames.clamp(min=0)
    return max(0, 1 + (num_samples - FRAME_LENGTH) // FRAME_SHIFT)


def _mel(freq: torch.Tensor | float) -> torch.Tensor | float:
    if isinstance(freq, torch.Tensor):
        return 1127.0 * (1.0 + freq / 700.0).log()
    return 1127.0 * math.log(1.0 + freq / 700.0)


def _dft_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def _autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (torch before 2.4 has no argument)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return device_type == "cuda" and torch.is_autocast_enabled()


def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(window (400,), mel weights (257, 128), DFT matrix (400, 514)) on ``device``, cached.

    The window and mel weights are float32, computed exactly as torchaudio does so that
    the result matches it bit for bit (the window from ``hann_window`` rather than the
    cosine formula: docs/design/architecture.md, Filterbank). The DFT matrix holds the
    real and imaginary parts of the 512-point DFT of a 400-sample frame (the zero padding
    contributes nothing): columns k and 257 + k are ``cos(2 pi n k / 512)`` and
    ``-sin(2 pi n k / 512)``. It is float64 (float32 on MPS), the angle reduced modulo 512
    in integers first.
    """
    key = (device.type, device.index)
    if key in _TABLES and not is_tracing():
        return _TABLES[key]
    # Outside inference mode: cached tables must never be inference tensors, which a later
    # forward with gradients (w.r.t. the waveform, say) could not save for backward.
    with contextlib.nullcontext() if is_tracing() else torch.inference_mode(False):
        window = torch.hann_window(FRAME_LENGTH, periodic=False, dtype=torch.float32).pow(0.85)
        low, high = _mel(20.0), _mel(SAMPLE_RATE / 2)
        delta = (high - low) / (NUM_MEL_BINS + 1)
        b = torch.arange(NUM_MEL_BINS).unsqueeze(1)
        left = low + b * delta
        centre = low + (b + 1.0) * delta
        right = low + (b + 2.0) * delta
        mel = _mel(SAMPLE_RATE / N_FFT * torch.arange(N_FFT // 2)).unsqueeze(0)
        up = (mel - left) / (centre - left)
        down = (right - mel) / (right - centre)
        weights = torch.clamp(torch.minimum(up, down), min=0.0)  # (128, 256)
        weights = torch.nn.functional.pad(weights, (0, 1))  # Nyquist bin has weight 0
        n = torch.arange(FRAME_LENGTH, dtype=torch.long)
        k = torch.arange(N_FFT // 2 + 1, dtype=torch.long)
        angle = (2 * math.pi / N_FFT) * (torch.outer(n, k) % N_FFT).to(torch.float64)
        dft = torch.cat([torch.cos(angle), -torch.sin(angle)], dim=1)
        tables = (window.to(device), weights.t().contiguous().to(device),
                  dft.to(device=device, dtype=_dft_dtype(device)))
    if not is_tracing():  # traced: constants of this graph, not real tensors to keep
        _TABLES[key] = tables
    return tables


def fbank(
    wav: torch.Tensor,
    lengths: torch.Tensor | None = None,
    *,
    normalize: bool = True,
    mean: float = FBANK_MEAN,
    std: float = FBANK_STD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mel filterbank of a batch of 16 kHz waveforms.

    Args:
        wav: (B, N) or (N,) float waveform in [-1, 1] at 16 kHz.
        lengths: (B,) valid samples per clip (default: all N). Samples past a clip's
            length never reach its valid frames.
        normalize: apply BEATs' ``(x - mean) / (2 * std)``; False gives Kaldi's raw log
            energies.
        mean, std: the normalisation statistics (default: Microsoft's 15.41663 and 6.55582;
            OpenBEATs re-trainings may have their own, ``BEATsConfig.fbank_mean/fbank_std``).

    Always computed in float32, also under a caller's ``torch.autocast``.

    Returns:
        ``(fbank, frames)``: fbank (B, T, 128) float32 where T is the frame count of N
        samples, frames (B,) int64 valid frames per clip; rows past a clip's frame count
        are zero.
    """
    if wav.dim() == 1:
        wav = wav.unsqueeze(0)
    if wav.dim() != 2:
        raise InputError(f"fbank expects (B, N) or (N,) waveforms, got shape {tuple(wav.shape)}")
    if _autocast_enabled(wav.device.type):
        # Under a caller's autocast (mixed-precision training frameworks run the whole
        # model in it) the mel product would run in float16, where energies up to ~1e17
        # overflow to inf and the features become NaN; bfloat16 would blur the low bins.
        with torch.autocast(wav.device.type, enabled=False):
            return fbank(wav, lengths, normalize=normalize, mean=mean, std=std)
    batch, n = wav.shape
    if lengths is None:
        lengths = torch.full((batch,), n, dtype=torch.long, device=wav.device)
    lengths = lengths.to(device=wav.device, dtype=torch.long)
    frames = num_frames(lengths)
    total = num_frames(n)
    window, weights, dft = _tables(wav.device)
    if total == 0:
        return wav.new_zeros(batch, 0, NUM_MEL_BINS, dtype=torch.float32), frames

    x = wav.to(torch.float32) * 32768.0
    x = x.unfold(-1, FRAME_LENGTH, FRAME_SHIFT)  # (B, T, 400), a view
    x = x - x.mean(dim=-1, keepdim=True)
    previous = torch.cat([x[..., :1], x[..., :-1]], dim=-1)
    x = (x - 0.97 * previous) * window
    # The power spectrum |rfft(frame, 512)|^2 as one float64 matrix product: low mel bins
    # hold little energy next to the frame's total, and a float32 FFT's error there
    # reaches 2e-3 in the log (the reference vectors were made with a more accurate FFT).
    # In float64 it agrees with an FFT to ~1e-15 of the peak, is as fast on CPU, and exports
    # (ONNX, torch.export) and compiles without complex numbers. MPS stays in float32.
    parts = torch.matmul(x.to(dft.dtype), dft).square()  # (B, T, 514): re^2 and im^2
    half = N_FFT // 2 + 1
    spectrum = (parts[..., :half] + parts[..., half:]).to(torch.float32)
    energies = torch.matmul(spectrum, weights)
    out = energies.clamp(min=_EPS).log()
    if normalize:
        out = (out - mean) / (2 * std)
    valid = torch.arange(total, device=wav.device) < frames.unsqueeze(1)
    out = out.masked_fill(~valid.unsqueeze(-1), 0.0)
    return out, frames
