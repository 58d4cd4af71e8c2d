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


VOICES = ["en", "en-us", "en+f3", "en+m3", "de", "fr"]
WORDS = ["hello there", "seven eight nine", "good morning to you", "open the window now",
         "a small test", "numbers and letters"]


def sound_classes(root: Path, per_class: int = 20) -> Path:
    """3 classes x ``per_class`` clips of 0.6 - 3 s: espeak-ng speech in 6 voices, sox
    tones and chords, sox white/pink/brown noise. Returns ``root`` (one folder per class)."""
    rng = np.random.default_rng(0)
    for c in ("speech", "tonal", "noise"):
        (root / c).mkdir(parents=True, exist_ok=True)
    for i in range(per_class):
        seconds = f"{rng.uniform(0.6, 3.0):.2f}"
        speech(root / "speech" / f"s{i:02d}.wav", WORDS[i % 6], voice=VOICES[i % 6],
               speed=120 + 10 * (i % 7))
        base = 200 + 37 * i
        if i % 2:
            chord = [f"{base * r:.0f}" for r in (1.0, 1.25, 1.5)]
            synth = [x for f in chord for x in ("sine", f)]
            sox("-n", "-r", "16000", str(root / "tonal" / f"t{i:02d}.wav"), "synth", seconds,
                *synth, "remix", "-", "vol", "0.3")
        else:
            sox("-n", "-r", "16000", str(root / "tonal" / f"t{i:02d}.wav"), "synth", seconds,
                "sine", str(base), "vol", "0.5")
        colour = ("whitenoise", "pinknoise", "brownnoise")[i % 3]
        sox("-n", "-r", "16000", str(root / "noise" / f"n{i:02d}.wav"), "synth", seconds,
            colour, "vol", f"{rng.uniform(0.2, 0.6):.2f}")
    return root


def order_classes(root: Path, per_class: int = 16, seed: int = 1) -> Path:
    """A task where temporal order is everything: 4 classes whose clips hold the same
    sounds in different orders. ``up``/``down``: a sox sine sweep rising or falling over
    the same band; ``beep_noise``/``noise_beep``: a tone then noise, or noise then the
    tone. Frequencies, lengths (1.5 - 3 s), noise colours and levels vary per clip."""
    rng = np.random.default_rng(seed)
    for c in ("up", "down", "beep_noise", "noise_beep"):
        (root / c).mkdir(parents=True, exist_ok=True)
    for i in range(per_class):
        seconds = rng.uniform(1.5, 3.0)
        lo, hi = int(rng.uniform(150, 600)), int(rng.uniform(1500, 5000))
        for name, band in (("up", f"{lo}-{hi}"), ("down", f"{hi}-{lo}")):
            sox("-n", "-r", "16000", str(root / name / f"{name}{i:02d}.wav"), "synth",
                f"{seconds:.2f}", "sine", band, "vol", f"{rng.uniform(0.3, 0.6):.2f}")
        half = f"{seconds / 2:.2f}"
        tone = root / f".tone{i}.wav"
        noise = root / f".noise{i}.wav"
        sox("-n", "-r", "16000", str(tone), "synth", half, "sine",
            str(int(rng.uniform(300, 2000))), "vol", "0.5")
        sox("-n", "-r", "16000", str(noise), "synth", half,
            ("whitenoise", "pinknoise", "brownnoise")[i % 3], "vol",
            f"{rng.uniform(0.2, 0.5):.2f}")
        sox(str(tone), str(noise), str(root / "beep_noise" / f"bn{i:02d}.wav"))
        sox(str(noise), str(tone), str(root / "noise_beep" / f"nb{i:02d}.wav"))
        tone.unlink()
        noise.unlink()
    return root
