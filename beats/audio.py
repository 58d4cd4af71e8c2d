"""Reading audio files for BEATs: any format libsndfile reads, mono, 16 kHz, float32.

Formats: WAV (8/16/24/32-bit integer and float), FLAC, OGG/Vorbis, OGG/Opus, MP3, AIFF,
AU, CAF, W64 and the rest of libsndfile's list. Multi-channel audio is averaged to mono
unless a channel is picked. Resampling uses soxr (high quality).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16000
AUDIO_EXTENSIONS = (
    ".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc",
    ".au", ".snd", ".caf", ".w64", ".rf64",
)


class AudioError(ValueError):
    """An audio file that cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class AudioInfo:
    """What a file held before conversion: its rate (Hz), channels, frames and format."""

    path: str
    sample_rate: int
    channels: int
    frames: int
    format: str

    @property
    def duration(self) -> float:
        """Seconds."""
        return self.frames / self.sample_rate if self.sample_rate else 0.0


def resample(wav: np.ndarray, orig_sr: int, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Resample (N,) or (N, C) float samples from ``orig_sr`` to ``target_sr`` Hz (soxr HQ)."""
    if orig_sr <= 0 or target_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {target_sr}")
    wav = np.asarray(wav, dtype=np.float32)
    if orig_sr == target_sr:
        return wav
    return soxr.resample(wav, orig_sr, target_sr, quality="HQ").astype(np.float32, copy=False)


def to_mono(wav: np.ndarray, channel: int | None = None) -> np.ndarray:
    """(N, C) -> (N,): the mean of the channels, or channel ``channel`` (negative counts
    from the end)."""
    if wav.ndim == 1:
        return wav
    channels = wav.shape[1]
    if channel is None:
        return wav.mean(axis=1, dtype=np.float32) if channels > 1 else wav[:, 0]
    if not -channels <= channel < channels:
        raise ValueError(f"channel {channel} does not exist: the audio has {channels} channel(s)")
    return wav[:, channel]


def audio_info(path: str | os.PathLike) -> AudioInfo:
    """Header information of an audio file, without decoding it."""
    path = _check_path(path)
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError) as e:
        raise _not_audio(path, e) from None
    return AudioInfo(str(path), info.samplerate, info.channels, info.frames,
                     f"{info.format}/{info.subtype}")


def load_audio(
    path: str | os.PathLike,
    *,
    sample_rate: int = SAMPLE_RATE,
    channel: int | None = None,
    offset: float = 0.0,
    duration: float | None = None,
) -> tuple[np.ndarray, AudioInfo]:
    """Read a file as mono float32 samples in [-1, 1] at ``sample_rate`` Hz.

    ``offset`` and ``duration`` (seconds) read a part of the file only (a crop for
    training): the file is seeked, not decoded from its start. A part that runs past the
    end is cut there. Returns ``(wav (N,), info)`` where ``info`` describes the whole file
    as stored. Raises `AudioError` naming the file for a missing, empty, unreadable or
    unrecognised file.
    """
    path = _check_path(path)
    if offset < 0 or (duration is not None and duration <= 0):
        raise ValueError(f"offset must be >= 0 and duration > 0 seconds, got {offset}, "
                         f"{duration}")
    try:
        with sf.SoundFile(str(path)) as f:
            info = AudioInfo(str(path), f.samplerate, f.channels, f.frames,
                             f"{f.format}/{f.subtype}")
            start = round(offset * f.samplerate)
            if start and start >= f.frames:
                raise AudioError(f"{path}: offset {offset} s is past the end of the file "
                                 f"({info.duration:.3f} s)")
            if start:
                f.seek(start)
            frames = -1 if duration is None else max(1, round(duration * f.samplerate))
            data = f.read(frames=frames, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise _not_audio(path, e) from None
    if data.shape[0] == 0:
        raise AudioError(f"{path}: the file holds no samples ({info.format})")
    wav = resample(to_mono(data, channel), info.sample_rate, sample_rate)
    return np.ascontiguousarray(wav), info


def _check_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    try:
        if not path.exists():
            raise AudioError(f"{path}: no such file")
        if path.is_dir():
            raise AudioError(f"{path}: is a directory, not an audio file")
        size = path.stat().st_size
    except PermissionError:
        raise AudioError(f"{path}: permission denied (cannot reach the file)") from None
    if not os.access(path, os.R_OK):
        raise AudioError(f"{path}: permission denied (cannot read the file)")
    if size == 0:
        raise AudioError(f"{path}: the file is empty (0 bytes)")
    return path


def _not_audio(path: Path, error: Exception) -> AudioError:
    reason = str(error).split(": ", 1)[-1].strip() or type(error).__name__
    suffix = path.suffix.lower()
    if suffix and suffix not in AUDIO_EXTENSIONS:
        what = f"unknown audio format {suffix!r}"
    elif suffix:
        what = f"not a valid {suffix[1:].upper()} file"
    else:
        what = "unknown audio format (no file extension)"
    return AudioError(f"{path}: {what}; libsndfile says: {reason}")
