"""Synthetic soundscapes with strong labels: sound events at known times over noise.

    python -m benchmarks.soundscapes OUT [--count 60] [--seconds 10] [--seed 0]

writes, deterministically from the seed (same bytes on every run):

- ``OUT/audio/scape_NNNN.wav``: 16 kHz mono 16-bit clips of ``--seconds`` seconds: pink
  or brown background noise with 0 to 3 events for each 10 s, at random times;
- ``OUT/annotations.tsv``: the events as a DCASE strong-label table (tab-separated
  ``filename onset offset event_label``, seconds, paths relative to OUT; a file with no
  event is one row with empty onset, offset and label), as ``beats finetune --strong``
  and `beats.labelled.read_strong_tsv` read it;
- ``OUT/weak.csv``: the same files with clip-level labels only, in the multi-label layout
  ``path,beep,buzz,chirp`` (1 when the class sounds somewhere in the file, else 0; a file
  with no event is a row of zeros, which a ``path,label`` table cannot hold);
- ``OUT/soundscapes.json``: the settings, and per file its background and SNR.

The classes need nothing but numpy and tell apart easily, also for a small model:

- ``beep``: a pure tone of 800 to 1200 Hz;
- ``chirp``: a logarithmic sweep from about 300 Hz up to about 3000 Hz over the event;
- ``buzz``: a harmonic buzz, fundamental 100 to 200 Hz, harmonics to 4 kHz falling 1/k;
- ``speech`` (only when asked for, needs espeak-ng): a spoken word, its silence trimmed.

Each event lasts 0.3 to 2 s (a word: its own length, at most 2 s) and fades in and out
over 10 ms. Events of one class never overlap in a file; events of different classes may.
A clip's events share one signal-to-noise ratio (event RMS over background RMS, drawn per
clip from ``snr_db``, 6 to 20 dB by default), each event within 2 dB of it; the background
lies between -40 and -26 dBFS. Every clip draws from its own
generator seeded by (seed, index), so a clip does not depend on how many are made.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile as sf

RATE = 16000
CLASSES = ("beep", "chirp", "buzz")
SPEECH = "speech"
BACKGROUNDS = ("pink", "brown")
FADE_SECONDS = 0.01
EVENT_SECONDS = (0.3, 2.0)
EVENTS_PER_10S = 3
WORDS = ("hello", "seven", "window", "morning", "yellow", "number", "table", "river")
VOICES = ("en", "en-us", "en+f3", "en+m3", "de", "fr")
TRIES = 50  # placements tried for an event before it is left out


# --------------------------------------------------------------------------- sounds
def coloured_noise(n: int, colour: str, rng: np.random.Generator) -> np.ndarray:
    """(n,) float64 noise of unit RMS whose power falls as 1/f (pink) or 1/f^2 (brown)
    from 50 Hz up; flat from 20 to 50 Hz, nothing below 20 Hz (inaudible, and it would
    make up most of the RMS)."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / RATE)
    power = {"pink": 1.0, "brown": 2.0}[colour]
    spectrum = spectrum / np.maximum(freqs, 50.0) ** (power / 2)
    spectrum[freqs < 20] = 0
    noise = np.fft.irfft(spectrum, n)
    return noise / np.sqrt(np.mean(noise**2))


def fade(x: np.ndarray, seconds: float = FADE_SECONDS) -> np.ndarray:
    """``x`` with raised-cosine fades of ``seconds`` at both ends (shorter clips: half)."""
    k = min(int(seconds * RATE), len(x) // 2)
    if k > 0:
        ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(k) / k)
        x = x.copy()
        x[:k] *= ramp
        x[len(x) - k:] *= ramp[::-1]
    return x


def beep(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n,) a pure tone of 800 to 1200 Hz."""
    freq = rng.uniform(800, 1200)
    return np.sin(2 * np.pi * freq * np.arange(n) / RATE + rng.uniform(0, 2 * np.pi))


def chirp(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n,) a logarithmic sweep from 250-400 Hz to 2500-3500 Hz over the n samples."""
    low, high = rng.uniform(250, 400), rng.uniform(2500, 3500)
    t = np.arange(n) / RATE
    duration = n / RATE
    rate = np.log(high / low) / duration
    phase = 2 * np.pi * low * (np.exp(rate * t) - 1) / rate  # integral of low e^(rate t)
    return np.sin(phase)


def buzz(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n,) harmonics k f0 (f0 100 to 200 Hz, up to 4 kHz) with amplitudes 1/k."""
    f0 = rng.uniform(100, 200)
    t = np.arange(n) / RATE
    out = np.zeros(n)
    for k in range(1, int(4000 // f0) + 1):
        out += np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 2 * np.pi)) / k
    return out


def spoken_word(rng: np.random.Generator, folder: Path) -> np.ndarray:
    """A word said by espeak-ng, at 16 kHz, leading and trailing silence cut, at most the
    longest event."""
    import soxr

    word, voice = WORDS[rng.integers(len(WORDS))], VOICES[rng.integers(len(VOICES))]
    path = folder / "word.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(int(rng.integers(120, 200))), "-w",
                    str(path), word], check=True, capture_output=True)
    wav, rate = sf.read(str(path), dtype="float64")
    wav = soxr.resample(wav, rate, RATE) if rate != RATE else wav
    loud = np.flatnonzero(np.abs(wav) > 0.05 * np.abs(wav).max())
    return wav[loud[0]: loud[-1] + 1][: int(EVENT_SECONDS[1] * RATE)]


SYNTHS = {"beep": beep, "chirp": chirp, "buzz": buzz}


# --------------------------------------------------------------------------- one clip
def make_clip(rng: np.random.Generator, seconds: float, classes: Sequence[str],
              snr_db: tuple[float, float], scratch: Path | None = None
              ) -> tuple[np.ndarray, list[tuple[float, float, str]], dict[str, float | str]]:
    """One soundscape: (samples (N,) float32 in [-1, 1], events (onset s, offset s,
    class) by onset, {"background": colour, "snr_db": value})."""
    n = round(seconds * RATE)
    colour = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    level = 10 ** rng.uniform(-2.0, -1.3)  # background RMS, -40 to -26 dBFS
    snr = rng.uniform(*snr_db)
    mix = level * coloured_noise(n, colour, rng)
    stretches = max(1, round(seconds / 10))  # 0 to 3 events for each 10 s
    count = sum(int(rng.integers(0, EVENTS_PER_10S + 1)) for _ in range(stretches))
    events: list[tuple[float, float, str]] = []
    for _ in range(count):
        label = classes[rng.integers(len(classes))]
        if label == SPEECH:
            assert scratch is not None
            sound = spoken_word(rng, scratch)
        else:
            length = round(rng.uniform(*EVENT_SECONDS) * RATE)
            sound = SYNTHS[label](min(length, n), rng)
        sound = fade(sound / np.sqrt(np.mean(sound**2)))
        taken = [(a, b) for a, b, c in events if c == label]
        for _ in range(TRIES):
            start = int(rng.integers(0, n - len(sound) + 1))
            onset, offset = start / RATE, (start + len(sound)) / RATE
            if all(offset <= a or onset >= b for a, b in taken):
                break
        else:
            continue  # no room left for this class: the clip has one event fewer
        gain = level * 10 ** ((snr + rng.uniform(-2, 2)) / 20)
        mix[start: start + len(sound)] += gain * sound
        events.append((round(onset, 4), round(offset, 4), label))
    peak = np.abs(mix).max()
    if peak > 0.95:
        mix *= 0.95 / peak
    events.sort()
    return mix.astype(np.float32), events, {"background": colour, "snr_db": round(snr, 2)}


# --------------------------------------------------------------------------- a set
def make_soundscapes(folder: str | Path, count: int, seconds: float = 10.0, seed: int = 0,
                     classes: Sequence[str] = CLASSES, snr_db: tuple[float, float] = (6.0, 20.0),
                     prefix: str = "scape") -> Path:
    """Write ``count`` soundscapes of ``seconds`` s into ``folder`` (see the module doc):
    ``audio/PREFIX_NNNN.wav``, ``annotations.tsv``, ``weak.csv``, ``soundscapes.json``.
    ``classes`` may add ``"speech"`` (needs espeak-ng). Returns the path of
    ``annotations.tsv``."""
    folder = Path(folder)
    unknown = [c for c in classes if c not in (*SYNTHS, SPEECH)]
    if unknown:
        raise ValueError(f"unknown classes {unknown}; choose from {[*SYNTHS, SPEECH]}")
    if SPEECH in classes and shutil.which("espeak-ng") is None:
        raise RuntimeError("the speech class needs espeak-ng (apt-get install espeak-ng)")
    if seconds < EVENT_SECONDS[1]:
        raise ValueError(f"clips must be at least {EVENT_SECONDS[1]} s long")
    (folder / "audio").mkdir(parents=True, exist_ok=True)
    strong, weak, files = [], [], []
    with tempfile.TemporaryDirectory(prefix="soundscapes-") as scratch:
        for i in range(count):
            rng = np.random.default_rng([seed, i])
            wav, events, info = make_clip(rng, seconds, classes, snr_db, Path(scratch))
            name = f"audio/{prefix}_{i:04d}.wav"
            sf.write(str(folder / name), wav, RATE, subtype="PCM_16")
            strong += [(name, f"{a:.4f}", f"{b:.4f}", c) for a, b, c in events] or [
                (name, "", "", "")]
            present = {c for _, _, c in events}
            weak.append([name] + ["1" if c in present else "0" for c in sorted(classes)])
            files.append({"file": name, **info, "events": len(events)})
    with open(folder / "annotations.tsv", "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(["filename", "onset", "offset", "event_label"])
        writer.writerows(strong)
    with open(folder / "weak.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["path", *sorted(classes)])
        writer.writerows(weak)
    settings = {"count": count, "seconds": seconds, "seed": seed, "classes": list(classes),
                "snr_db": list(snr_db), "rate": RATE}
    (folder / "soundscapes.json").write_text(json.dumps({**settings, "files": files},
                                                        indent=1) + "\n")
    return folder / "annotations.tsv"


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--count", type=int, default=60, help="clips to make")
    p.add_argument("--seconds", type=float, default=10.0, help="length of each clip")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speech", action="store_true", help="add the speech class (espeak-ng)")
    args = p.parse_args(argv)
    classes = (*CLASSES, SPEECH) if args.speech else CLASSES
    tsv = make_soundscapes(args.out, args.count, args.seconds, args.seed, classes)
    print(f"{args.count} clips of {args.seconds:g} s: {tsv}")
    return tsv


if __name__ == "__main__":
    main()
