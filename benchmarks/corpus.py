"""A real, unlabelled audio corpus for pre-training experiments, made by real tools.

    python -m benchmarks.corpus OUT [--minutes 12] [--seed 0] [--jobs 2]

writes, deterministically from the seed (same bytes on every run):

- ``OUT/train/*.wav``   unlabelled clips (4-10 s, 16 kHz mono) totalling ``--minutes``:
  espeak-ng speech (many languages, voices, speeds, pitches, texts) and sox signals
  (chords, melodies, sweeps, plucked rhythms, white/pink/brown noise, noise bursts),
  some of them mixtures of two kinds;
- ``OUT/heldout/*.wav`` more clips of the same kinds, for held-out masked accuracy;
- ``OUT/probe/KIND/*.wav`` a small labelled set (3-5 s clips, one folder per kind, the
  layout ``beats probe`` reads) with its own texts, voices and seeds, for a linear probe;
- ``OUT/corpus.json``   every file with its kind, duration and the recipe that made it.

Each clip draws its parameters from its own generator, seeded by (seed, split, index),
so the clips do not depend on the order or number of parallel jobs; sox runs with ``-R``
(repeatable dither and noise).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

RATE = 16000
KINDS = ("speech", "chord", "melody", "sweep", "pluck", "noise", "burst")
COARSE = {"speech": "speech", "chord": "music", "melody": "music", "sweep": "music",
          "pluck": "music", "noise": "noise", "burst": "noise"}
SPLITS = {"train": 0, "heldout": 1, "probe": 2}
LANGUAGES = ("en", "en-us", "en-gb-scotland", "de", "fr-fr", "es", "it", "nl", "pt", "pl",
             "sv", "fi")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m7", "f1", "f2", "f3", "f4", "f5", "croak",
            "klatt", "whisper")
SENTENCES = (
    "the quick brown fox jumps over the lazy dog",
    "a large red ship sailed slowly past the old harbour wall",
    "please call me back when you have finished reading the report",
    "seven bright stars were shining above the quiet village",
    "she sells sea shells by the sea shore every summer morning",
    "we will meet at the station at half past nine tomorrow",
    "the weather forecast promised rain but the sky stayed clear",
    "numbers such as forty two and one hundred and six are easy",
    "my grandfather built this wooden table with his own hands",
    "turn left at the bakery and walk straight for two blocks",
    "the orchestra played a long and beautiful symphony",
    "could you tell me where the nearest library is",
    "fresh bread and warm soup are waiting in the kitchen",
    "the children laughed as the puppy chased its own tail",
    "every good boy deserves fudge after a day of hard work",
    "the museum opens at ten and closes at six in the evening",
    "thunder rolled across the valley as the storm drew near",
    "he quickly typed the password and pressed the green button",
    "a cup of strong coffee helps me think in the morning",
    "the river winds through the forest towards the distant sea",
    "bring your umbrella because the clouds look very dark",
    "our train was delayed by almost forty minutes today",
    "the painter mixed blue and yellow to make a soft green",
    "listen carefully to the sound of the waves on the rocks",
)
# The probe speaks other texts than the unlabelled clips.
PROBE_SENTENCES = (
    "twelve purple balloons floated over the crowded market square",
    "the mechanic fixed the engine before the sun went down",
    "silver coins were hidden beneath the loose floor board",
    "an owl called softly from the top of the tall pine tree",
    "the teacher wrote three long equations on the blackboard",
    "water boils at one hundred degrees at sea level",
)
SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10),
          "pentatonic": (0, 2, 4, 7, 9)}
CHORDS = {"major": (0, 4, 7), "minor": (0, 3, 7), "seventh": (0, 4, 7, 10),
          "diminished": (0, 3, 6), "sus4": (0, 5, 7)}
WAVES = ("sine", "square", "triangle", "sawtooth", "pluck")
NOISES = ("whitenoise", "pinknoise", "brownnoise")


def hz(midi: float) -> float:
    return 440.0 * 2.0 ** ((midi - 69) / 12)


def sox(*args: str) -> None:
    subprocess.run(["sox", "-R", *args], check=True, capture_output=True)


def tone(path: Path, seconds: float, wave: str, freqs: list[float], volume: float) -> None:
    """One or more simultaneous tones (a chord) of ``wave``, faded in and out."""
    synth: list[str] = []
    for f in freqs:
        synth += [wave, f"{f:.2f}"]
    fade = min(0.05, seconds / 4)
    sox("-r", "48000", "-c", str(len(freqs)), "-n", "-r", str(RATE), "-c", "1", "-b", "16",
        str(path), "synth", f"{seconds:.3f}", *synth,
        "fade", "q", f"{fade:.3f}", f"{seconds:.3f}", f"{fade:.3f}", "vol", f"{volume:.3f}")


def silence(path: Path, seconds: float) -> None:
    sox("-n", "-r", str(RATE), "-c", "1", "-b", "16", str(path), "trim", "0", f"{seconds:.3f}")


def concat(parts: list[Path], path: Path, seconds: float) -> None:
    """Concatenate ``parts`` and cut or pad the result to ``seconds``."""
    sox(*map(str, parts), str(path), "pad", "0", f"{seconds:.3f}", "trim", "0", f"{seconds:.3f}")


class Maker:
    """Makes one clip of a kind from a generator; ``noises`` are the long recordings that
    noise clips are cut from."""

    def __init__(self, noises: dict[str, Path]) -> None:
        self.noises = noises

    @staticmethod
    def scratch(path: Path, name: str) -> Path:
        """A scratch file of the clip being made at ``path`` (in a folder beside it)."""
        folder = path.with_suffix(".parts")
        folder.mkdir(exist_ok=True)
        return folder / name

    def speech(self, rng: np.random.Generator, path: Path, seconds: float,
               probe: bool) -> dict:
        texts = PROBE_SENTENCES if probe else SENTENCES
        text = ". ".join(texts[i] for i in rng.choice(len(texts), size=3, replace=False))
        voice = f"{rng.choice(LANGUAGES)}+{rng.choice(VARIANTS)}"
        speed, pitch = int(rng.integers(120, 221)), int(rng.integers(15, 86))
        raw = self.scratch(path, "speech.wav")
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch),
                        "-w", str(raw), text], check=True, capture_output=True)
        volume = float(rng.uniform(0.4, 1.0))
        sox(str(raw), "-r", str(RATE), "-c", "1", "-b", "16", str(path), "vol", f"{volume:.3f}",
            "pad", "0", f"{seconds:.3f}", "trim", "0", f"{seconds:.3f}")
        return {"voice": voice, "speed": speed, "pitch": pitch, "text": text}

    def chord(self, rng: np.random.Generator, path: Path, seconds: float, probe: bool) -> dict:
        wave = str(rng.choice(WAVES))
        count = int(rng.integers(2, 5))
        parts, names = [], []
        for i in range(count):
            quality = str(rng.choice(list(CHORDS)))
            root = int(rng.integers(45, 70))
            part = self.scratch(path, f"c{i}.wav")
            tone(part, seconds / count, wave, [hz(root + n) for n in CHORDS[quality]],
                 float(rng.uniform(0.15, 0.3)))
            parts.append(part)
            names.append(f"{root}{quality}")
        concat(parts, path, seconds)
        return {"wave": wave, "chords": names}

    def melody(self, rng: np.random.Generator, path: Path, seconds: float, probe: bool) -> dict:
        wave = str(rng.choice(WAVES))
        scale = str(rng.choice(list(SCALES)))
        root = int(rng.integers(55, 75))
        beat = float(rng.uniform(0.12, 0.45))
        parts, notes = [], []
        for i in range(int(seconds / beat) + 1):
            degree = int(rng.integers(0, 2 * len(SCALES[scale])))
            octave, step = divmod(degree, len(SCALES[scale]))
            note = root + 12 * octave + SCALES[scale][step]
            part = self.scratch(path, f"n{i}.wav")
            length = beat * float(rng.choice([1, 1, 1, 2]))
            tone(part, length, wave, [hz(note)], float(rng.uniform(0.3, 0.6)))
            parts.append(part)
            notes.append(note)
        concat(parts, path, seconds)
        return {"wave": wave, "scale": scale, "beat": round(beat, 3), "notes": notes}

    def sweep(self, rng: np.random.Generator, path: Path, seconds: float, probe: bool) -> dict:
        wave = str(rng.choice(["sine", "square", "triangle", "sawtooth"]))
        count = int(rng.integers(1, 4))
        parts, spans = [], []
        for i in range(count):
            start, stop = rng.uniform(80, 6000, size=2)  # up or down
            span = f"{start:.0f}{rng.choice(['-', ':'])}{stop:.0f}"  # linear or exponential
            part = self.scratch(path, f"s{i}.wav")
            sox("-n", "-r", str(RATE), "-c", "1", "-b", "16", str(part), "synth",
                f"{seconds / count:.3f}", wave, span, "vol", f"{rng.uniform(0.2, 0.5):.3f}")
            parts.append(part)
            spans.append(span)
        concat(parts, path, seconds)
        return {"wave": wave, "sweeps": spans}

    def pluck(self, rng: np.random.Generator, path: Path, seconds: float, probe: bool) -> dict:
        notes = [int(n) for n in rng.integers(40, 80, size=int(rng.integers(1, 3)))]
        beat = float(rng.uniform(0.15, 0.6))
        parts = []
        for i in range(int(seconds / beat) + 1):
            part = self.scratch(path, f"p{i}.wav")
            if rng.random() < 0.25:
                silence(part, beat)
            else:
                tone(part, beat, "pluck", [hz(notes[i % len(notes)])],
                     float(rng.uniform(0.4, 0.8)))
            parts.append(part)
        concat(parts, path, seconds)
        return {"notes": notes, "beat": round(beat, 3)}

    def _noise(self, rng: np.random.Generator, path: Path, seconds: float,
               colour: str, effects: list[str]) -> None:
        start = float(rng.uniform(0, 50.0))
        sox(str(self.noises[colour]), str(path), "trim", f"{start:.3f}", f"{seconds:.3f}",
            *effects)

    def noise(self, rng: np.random.Generator, path: Path, seconds: float, probe: bool) -> dict:
        colour = str(rng.choice(NOISES))
        effects: list[str] = []
        shape = str(rng.choice(["plain", "lowpass", "highpass", "bandpass", "tremolo"]))
        if shape in ("lowpass", "highpass"):
            effects += [shape, f"{rng.uniform(300, 4000):.0f}"]
        elif shape == "bandpass":
            effects += ["bandpass", f"{rng.uniform(300, 4000):.0f}", "1q"]
        elif shape == "tremolo":
            effects += ["tremolo", f"{rng.uniform(1, 8):.2f}", "80"]
        effects += ["vol", f"{rng.uniform(0.1, 0.4):.3f}"]
        self._noise(rng, path, seconds, colour, effects)
        return {"colour": colour, "shape": shape}

    def burst(self, rng: np.random.Generator, path: Path, seconds: float, probe: bool) -> dict:
        colour = str(rng.choice(NOISES))
        parts, total, i = [], 0.0, 0
        while total < seconds:
            on, off = float(rng.uniform(0.02, 0.25)), float(rng.uniform(0.08, 0.7))
            burst, gap = self.scratch(path, f"b{i}.wav"), self.scratch(path, f"g{i}.wav")
            self._noise(rng, burst, on, colour,
                        ["fade", "l", "0.005", f"{on:.3f}", f"{on * 0.7:.3f}",
                         "vol", f"{rng.uniform(0.3, 0.9):.3f}"])
            silence(gap, off)
            parts += [burst, gap]
            total += on + off
            i += 1
        concat(parts, path, seconds)
        return {"colour": colour, "bursts": i}

    def make(self, kind: str, rng: np.random.Generator, path: Path, seconds: float,
             probe: bool) -> dict:
        recipe = getattr(self, kind)(rng, path, seconds, probe)
        shutil.rmtree(path.with_suffix(".parts"), ignore_errors=True)
        return recipe

    def mixture(self, kinds: tuple[str, str], rng: np.random.Generator, path: Path,
                seconds: float) -> dict:
        first, second = self.scratch(path, "mix0.wav"), self.scratch(path, "mix1.wav")
        recipes = [getattr(self, k)(rng, p, seconds, False)
                   for k, p in zip(kinds, (first, second), strict=True)]
        sox("-m", str(first), str(second), str(path))
        shutil.rmtree(path.with_suffix(".parts"), ignore_errors=True)
        return {"parts": [{"kind": k, **r} for k, r in zip(kinds, recipes, strict=True)]}


def plan(seed: int, minutes: float, heldout_fraction: float, probe_per_class: int) -> list[dict]:
    """Every clip to make: split, index, kind(s), duration, and its own seed sequence."""
    jobs = []
    for split, target in (("train", minutes * 60), ("heldout", minutes * 60 * heldout_fraction)):
        total, index = 0.0, 0
        while total < target:
            rng = np.random.default_rng([seed, SPLITS[split], index])
            seconds = round(float(rng.uniform(4.0, 10.0)), 2)
            if rng.random() < 0.15:
                pair = rng.choice(len(KINDS), size=2, replace=False)
                kind = "+".join(KINDS[i] for i in sorted(pair))
            else:
                kind = KINDS[index % len(KINDS)]
            jobs.append({"split": split, "index": index, "kind": kind, "seconds": seconds,
                         "path": f"{split}/{index:04d}_{kind}.wav"})
            total += seconds
            index += 1
    index = 0
    for kind in KINDS:
        for _ in range(probe_per_class):
            rng = np.random.default_rng([seed, SPLITS["probe"], index])
            seconds = round(float(rng.uniform(3.0, 5.0)), 2)
            jobs.append({"split": "probe", "index": index, "kind": kind, "seconds": seconds,
                         "path": f"probe/{kind}/{index:04d}.wav", "label": kind,
                         "coarse_label": COARSE[kind]})
            index += 1
    return jobs


def make_corpus(out: Path, *, seed: int = 0, minutes: float = 12.0,
                heldout_fraction: float = 0.15, probe_per_class: int = 16,
                jobs: int = 2) -> dict:
    """Write the corpus into ``out`` (which must not hold one already); returns its index."""
    if (out / "corpus.json").exists():
        raise FileExistsError(f"{out} already holds a corpus (corpus.json): choose a new folder")
    todo = plan(seed, minutes, heldout_fraction, probe_per_class)
    for job in todo:
        (out / job["path"]).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="beats-corpus-") as tmp_name:
        tmp = Path(tmp_name)
        noises = {}
        for colour in NOISES:  # one long recording per colour; clips cut it at random
            noises[colour] = tmp / f"{colour}.wav"
            sox("-n", "-r", str(RATE), "-c", "1", "-b", "16", str(noises[colour]),
                "synth", "60", colour)
        maker = Maker(noises)

        def run(job: dict) -> dict:
            rng = np.random.default_rng([seed, SPLITS[job["split"]], job["index"], 1])
            path = out / job["path"]
            work = tmp / f"{job['split']}-{job['index']}.wav"
            if "+" in job["kind"]:
                a, b = job["kind"].split("+")
                recipe = maker.mixture((a, b), rng, work, job["seconds"])
            else:
                recipe = maker.make(job["kind"], rng, work, job["seconds"],
                                    job["split"] == "probe")
            shutil.move(work, path)
            return {**job, "recipe": recipe}

        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            done = list(pool.map(run, todo))
    index = {
        "seed": seed, "sample_rate": RATE,
        "minutes": {s: round(sum(j["seconds"] for j in done if j["split"] == s) / 60, 2)
                    for s in SPLITS},
        "files": done,
    }
    (out / "corpus.json").write_text(json.dumps(index, indent=1))
    return index


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="output folder (created)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=12.0,
                   help="unlabelled training audio to make (default 12)")
    p.add_argument("--heldout-fraction", type=float, default=0.15,
                   help="held-out unlabelled audio, as a fraction of --minutes")
    p.add_argument("--probe-per-class", type=int, default=16,
                   help="labelled probe clips per kind (default 16)")
    p.add_argument("-j", "--jobs", type=int, default=2, help="parallel tool processes")
    args = p.parse_args(argv)
    for tool in ("sox", "espeak-ng"):
        if shutil.which(tool) is None:
            print(f"corpus: {tool} is not installed (apt-get install sox espeak-ng)",
                  file=sys.stderr)
            return 2
    start = time.perf_counter()
    try:
        index = make_corpus(args.out, seed=args.seed, minutes=args.minutes,
                            heldout_fraction=args.heldout_fraction,
                            probe_per_class=args.probe_per_class, jobs=args.jobs)
    except FileExistsError as e:
        print(f"corpus: {e}", file=sys.stderr)
        return 2
    counts: dict[str, int] = {}
    for f in index["files"]:
        counts[f"{f['split']}/{f['kind']}"] = counts.get(f"{f['split']}/{f['kind']}", 0) + 1
    print(f"wrote {len(index['files'])} clips to {args.out} in "
          f"{time.perf_counter() - start:.1f} s; minutes per split: {index['minutes']}")
    print("clips per kind:", json.dumps(counts, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
