"""Reading audio files for BEATs: any format libsndfile reads, mono, 16 kHz, float32.

Formats: WAV (8/16/24/32-bit integer and float), FLAC, OGG/Vorbis, OGG/Opus, MP3, AIFF,
AU, CAF, W64 and the rest of libsndfile's list. Multi-channel audio is averaged to mono
unless a channel is picked. Resampling uses soxr (high quality). Files are decoded in
blocks, downmixed and resampled block by block (soxr's streaming resampler, which gives
the same samples as resampling the whole file at once), so memory holds the 16 kHz mono
result and one block, whatever the file's rate and channel count.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from .errors import InputError

SAMPLE_RATE = 16000
AUDIO_EXTENSIONS = (
    ".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc",
    ".au", ".snd", ".caf", ".w64", ".rf64",
)
# Sample rates outside these bounds (Hz) are refused as broken headers: real audio runs
# from telephone rates (8 kHz, a few at 4-6 kHz) up to 384-768 kHz (ultrasound
# recorders), while a header claiming 1 Hz would resample 16 000-fold.
MIN_SAMPLE_RATE = 1000
MAX_SAMPLE_RATE = 1_000_000
BLOCK_FRAMES = 1 << 16  # frames decoded at a time (2 MB for 8 channels of float32)


class AudioError(InputError):
    """An audio file that cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class AudioInfo:
    """What a file held before conversion: its rate (Hz), channels, frames and format.

    After `load_audio` read a whole file, ``frames`` counts the frames actually decoded:
    a damaged file can hold fewer than its header claims, and ``warning`` then says so.
    """

    path: str
    sample_rate: int
    channels: int
    frames: int
    format: str
    warning: str | None = None

    @property
    def duration(self) -> float:
        """Seconds."""
        return self.frames / self.sample_rate if self.sample_rate else 0.0


def resample(wav: np.ndarray, orig_sr: int, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Resample (N,) or (N, C) float samples from ``orig_sr`` to ``target_sr`` Hz (soxr HQ)."""
    if orig_sr <= 0 or target_sr <= 0:
        raise InputError(f"sample rates must be positive, got {orig_sr} -> {target_sr}")
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
        raise InputError(f"channel {channel} does not exist: the audio has {channels} channel(s)")
    return wav[:, channel]


def audio_info(path: str | os.PathLike) -> AudioInfo:
    """Header information of an audio file, without decoding it."""
    path = _check_path(path)
    try:
        with _open(path) as f:
            return _info(path, f)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise _not_audio(path, e) from None


def load_audio(
    path: str | os.PathLike,
    *,
    sample_rate: int = SAMPLE_RATE,
    channel: int | None = None,
    offset: float = 0.0,
    duration: float | None = None,
    max_duration: float | None = None,
) -> tuple[np.ndarray, AudioInfo]:
    """Read a file as mono float32 samples at ``sample_rate`` Hz.

    ``offset`` and ``duration`` (seconds) read a part of the file only (a crop for
    training): the file is seeked, not decoded from its start. A part that runs past the
    end is cut there. ``max_duration`` (seconds) refuses a file (or part) longer than that
    before decoding it. Returns ``(wav (N,), info)`` where ``info`` describes the file as
    stored (see `AudioInfo`). A file whose decoding fails part-way (a truncated FLAC, say)
    gives the audio decoded before the fault, with ``info.warning`` saying what happened.
    Raises `AudioError` naming the file for a missing, empty, unreadable or unrecognised
    file, a sample rate outside [`MIN_SAMPLE_RATE`, `MAX_SAMPLE_RATE`], a file longer than
    ``max_duration``, or one that holds no samples.
    """
    path = _check_path(path)
    if offset < 0 or (duration is not None and duration <= 0):
        raise InputError(f"offset must be >= 0 and duration > 0 seconds, got {offset}, "
                         f"{duration}")
    try:
        with _open(path) as f:
            info = _info(path, f)
            _check_header(info, channel, offset, duration, max_duration)
            start = round(offset * f.samplerate)
            if start and start >= f.frames:
                raise AudioError(f"{path}: offset {offset} s is past the end of the file "
                                 f"({info.duration:.3f} s)")
            if start:
                f.seek(start)
            wanted = None if duration is None else max(1, round(duration * f.samplerate))
            limit = None if max_duration is None else round(max_duration * f.samplerate)
            wav, frames, fault = _read_blocks(
                f, info, channel, sample_rate, start, wanted, limit)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise _not_audio(path, e) from None
    if frames == 0:
        why = f": {fault}" if fault else ""
        raise AudioError(f"{path}: the file holds no samples ({info.format}){why}")
    if fault is not None:
        read = (start + frames) / info.sample_rate
        info = dataclasses.replace(info, warning=(
            f"decoding stopped at {read:.3f} s of the {info.duration:.3f} s the header "
            f"claims (libsndfile: {fault}); the audio before that is used"))
    if start == 0 and wanted is None:  # the whole file: its length as decoded
        info = dataclasses.replace(info, frames=frames)
    return wav, info


def _read_blocks(
    f: sf.SoundFile, info: AudioInfo, channel: int | None, sample_rate: int, start: int,
    wanted: int | None, limit: int | None,
) -> tuple[np.ndarray, int, str | None]:
    """Decode up to ``wanted`` frames (None: to the end) from frame ``start`` in blocks,
    each downmixed and fed to a streaming resampler.

    Returns (wav, frames decoded, the decoding fault that ended the read early or None).
    """
    stream = (None if info.sample_rate == sample_rate else
              soxr.ResampleStream(info.sample_rate, sample_rate, 1, dtype="float32",
                                  quality="HQ"))
    buffer = np.empty((BLOCK_FRAMES, info.channels), dtype=np.float32)
    pieces: list[np.ndarray] = []
    frames, fault = 0, None
    while wanted is None or frames < wanted:
        n = BLOCK_FRAMES if wanted is None else min(BLOCK_FRAMES, wanted - frames)
        try:
            got = len(f.read(n, dtype="float32", always_2d=True, out=buffer[:n]))
        except sf.LibsndfileError as e:  # damaged: keep what was decoded before the fault
            fault = str(e).split(": ", 1)[-1].strip() or type(e).__name__
            try:
                got = min(max(f.tell() - start - frames, 0), n)
            except (sf.LibsndfileError, RuntimeError):
                got = 0
        if got:
            frames += got
            if limit is not None and frames > limit:
                raise AudioError(f"{info.path}: longer than the limit of "
                                 f"{_clock(limit / info.sample_rate)}, although its header "
                                 f"claims {_clock(info.duration)}")
            mono = np.ascontiguousarray(to_mono(buffer[:got], channel))
            if stream is not None:
                mono = stream.resample_chunk(mono)
            elif np.shares_memory(mono, buffer):
                mono = mono.copy()  # the buffer is reused for the next block
            pieces.append(mono)
        if got < n or fault is not None:
            break
    if stream is not None:
        pieces.append(stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
    wav = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
    return wav.astype(np.float32, copy=False), frames, fault


def _open(path: Path) -> sf.SoundFile:
    """Open for reading; the name goes as bytes, so names that are not valid UTF-8 work."""
    return sf.SoundFile(os.fsencode(path))


def _info(path: Path, f: sf.SoundFile) -> AudioInfo:
    return AudioInfo(str(path), f.samplerate, f.channels, f.frames, f"{f.format}/{f.subtype}")


def _clock(seconds: float) -> str:
    """3725.5 -> '1:02:05.5 (3725.5 s)'."""
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{int(hours)}:{int(minutes):02d}:{secs:04.1f} ({seconds:.1f} s)"


def _check_header(
    info: AudioInfo, channel: int | None, offset: float, duration: float | None,
    max_duration: float | None,
) -> None:
    """Refuse absurd rates, missing channels and over-long files before decoding."""
    if not MIN_SAMPLE_RATE <= info.sample_rate <= MAX_SAMPLE_RATE:
        raise AudioError(
            f"{info.path}: its header claims a sample rate of {info.sample_rate} Hz, outside "
            f"the {MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} Hz of real audio: the file is "
            "damaged or mislabelled"
        )
    if channel is not None and not -info.channels <= channel < info.channels:
        raise InputError(f"channel {channel} does not exist: the audio has {info.channels} "
                         "channel(s)")
    if max_duration is not None:
        part = max(info.duration - offset, 0.0)
        if duration is not None:
            part = min(part, duration)
        if part > max_duration:
            raise AudioError(
                f"{info.path}: its header claims {_clock(part)} of audio, longer than the "
                f"limit of {_clock(max_duration)}; split it, or raise the limit "
                "(beats extract --max-duration)"
            )


def _check_path(path: str | os.PathLike) -> Path:
    path = Path(os.fsdecode(path))  # bytes names too
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
