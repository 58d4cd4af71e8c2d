"""Real audio files made by real tools (sox, espeak-ng) and by soundfile, for tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

HAVE_SOX = shutil.which("sox") is not None
HAVE_ESPEAK = shutil.which("espeak-ng") is not None
needs_sox = pytest.mark.skipif(not HAVE_SOX, reason="sox not installed (.ci/run installs it)")
needs_espeak = pytest.mark.skipif(not HAVE_ESPEAK, reason="espeak-ng not installed")


def sox(*args: str) -> None:
    subprocess.run(["sox", *args], check=True, capture_output=True)


def sox_tone(path: Path, seconds: float = 1.0, rate: int = 16000, channels: int = 1,
             freq: str = "440", bits: int | None = None, extra: tuple[str, ...] = ()) -> Path:
    """A sine tone (``freq`` may be a sweep such as ``300-3000``) written by sox."""
    fmt = ["-b", str(bits)] if bits else []
    sox("-n", "-r", str(rate), "-c", str(channels), *fmt, *extra, str(path),
        "synth", str(seconds), "sine", freq, "vol", "0.5")
    return path


def speech(path: Path, text: str = "the quick brown fox jumps over the lazy dog",
           voice: str = "en", speed: int = 160) -> Path:
    """espeak-ng speech (22.05 kHz mono WAV)."""
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(path), text],
                   check=True, capture_output=True)
    return path


def sf_write(path: Path, seconds: float = 1.0, rate: int = 16000, channels: int = 1,
             subtype: str | None = None, fmt: str | None = None, seed: int = 0) -> np.ndarray:
    """A chirp plus noise written by soundfile; returns the float samples written."""
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    mono = 0.4 * np.sin(2 * np.pi * (200 + 800 * t) * t) + 0.05 * rng.standard_normal(t.size)
    data = np.stack([mono * (0.5 + 0.5 * c) for c in range(channels)], axis=1).astype(np.float32)
    sf.write(str(path), data, rate, subtype=subtype, format=fmt)
    return data
