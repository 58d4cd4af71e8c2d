"""The synthetic soundscapes say what their audio holds: events where the table puts them."""

from __future__ import annotations

import itertools
import json
import shutil
import warnings

import numpy as np
import pytest
import soundfile as sf

from beats.labelled import read_csv, read_strong_tsv
from benchmarks import soundscapes
from benchmarks.soundscapes import RATE, make_soundscapes


@pytest.fixture(scope="module")
def scapes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scapes")
    return make_soundscapes(folder, 24, seed=5)


def _power(wav: np.ndarray, a: float, b: float) -> float:
    return float(np.mean(wav[round(a * RATE): round(b * RATE)].astype(np.float64) ** 2))


def _db(ratio: float) -> float:
    return 10 * np.log10(ratio)


def test_the_table_reads_without_a_warning_and_lists_every_file(scapes):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = read_strong_tsv(scapes)
    assert len(data) == 24 and data.classes == ["beep", "buzz", "chirp"]
    assert [p.name for p in data.paths] == [f"scape_{i:04d}.wav" for i in range(24)]
    counts = [len(e) for e in data.events]
    assert min(counts) == 0 and max(counts) <= 3 and sum(counts) >= 24
    meta = json.loads((scapes.parent / "soundscapes.json").read_text())
    assert [f["events"] for f in meta["files"]] == counts
    for path, events in zip(data.paths, data.events, strict=True):
        info = sf.info(str(path))
        assert (info.samplerate, info.channels, info.frames) == (RATE, 1, 10 * RATE)
        assert info.subtype == "PCM_16"
        for e in events:
            assert 0.3 - 1e-3 <= e.offset - e.onset <= 2.0 + 1e-3 and e.offset <= 10.0
        for label in data.classes:  # one class never overlaps itself in a file
            spans = sorted((e.onset, e.offset) for e in events if e.label == label)
            assert all(b[0] >= a[1] for a, b in itertools.pairwise(spans))


def test_events_stand_out_exactly_where_the_table_puts_them(scapes):
    data = read_strong_tsv(scapes)
    checked = 0
    for path, events in zip(data.paths, data.events, strict=True):
        wav, _ = sf.read(str(path))
        quiet = np.ones(len(wav), dtype=bool)  # the background alone
        for e in events:
            quiet[round(e.onset * RATE): round(e.offset * RATE)] = False
        background = float(np.mean(wav[quiet] ** 2))
        for e in events:
            # SNR 6 to 20 dB (each event within 2 dB): at least 10 log10(1 + 10^0.4) dB
            assert _db(_power(wav, e.onset, e.offset) / background) > 5.0, (path.name, e)
            before = (e.onset - 0.25, e.onset - 0.02)  # just outside the event
            if before[0] >= 0 and quiet[round(before[0] * RATE): round(before[1] * RATE)].all():
                assert abs(_db(_power(wav, *before) / background)) < 3.0, (path.name, e)
                checked += 1
    assert checked >= 10


def _peak_hz(wav: np.ndarray, a: float, b: float) -> float:
    part = wav[round(a * RATE): round(b * RATE)]
    spectrum = np.abs(np.fft.rfft(part * np.hanning(len(part))))
    freqs = np.fft.rfftfreq(len(part), 1 / RATE)
    spectrum[freqs < 60] = 0  # brown noise piles up at the lowest frequencies
    return float(freqs[spectrum.argmax()])


def test_each_class_sounds_as_described(scapes):
    data = read_strong_tsv(scapes)
    seen = set()
    for path, events in zip(data.paths, data.events, strict=True):
        wav, _ = sf.read(str(path))
        for e in events:
            if any(o is not e and o.onset < e.offset and e.onset < o.offset for o in events):
                continue  # another class sounds at the same time
            length = e.offset - e.onset
            if e.label == "beep":  # one tone of 800 to 1200 Hz
                assert 790 <= _peak_hz(wav, e.onset, e.offset) <= 1210
            elif e.label == "chirp":  # rises from about 300 Hz to about 3 kHz
                first = _peak_hz(wav, e.onset, e.onset + 0.15 * length)
                last = _peak_hz(wav, e.offset - 0.15 * length, e.offset)
                assert first < 700 and last > 1500, (first, last)
            else:  # the fundamental of a 100 to 200 Hz buzz
                assert 95 <= _peak_hz(wav, e.onset, e.offset) <= 205
            seen.add(e.label)
    assert seen == {"beep", "buzz", "chirp"}


def test_the_weak_table_holds_the_classes_of_each_file(scapes):
    strong, weak = read_strong_tsv(scapes), read_csv(scapes.parent / "weak.csv")
    assert weak.paths == strong.paths and weak.classes == strong.classes
    assert weak.labels == strong.labels and () in weak.labels
    assert weak.multilabel


def test_same_seed_same_bytes_and_clips_do_not_depend_on_the_count(tmp_path):
    a = make_soundscapes(tmp_path / "a", 4, seed=1)
    b = make_soundscapes(tmp_path / "b", 2, seed=1)
    c = make_soundscapes(tmp_path / "c", 2, seed=2)
    for i in range(2):
        name = f"audio/scape_{i:04d}.wav"
        assert (a.parent / name).read_bytes() == (b.parent / name).read_bytes()
        assert (a.parent / name).read_bytes() != (c.parent / name).read_bytes()
    assert a.read_text().startswith(b.read_text())


def test_a_long_clip_holds_more_events(tmp_path):
    tsv = make_soundscapes(tmp_path, 1, seconds=60.0, seed=3, prefix="long")
    data = read_strong_tsv(tsv)
    assert sf.info(str(data.paths[0])).duration == 60.0
    assert 3 < len(data.events[0]) <= 18


def test_the_command_line_writes_the_set(tmp_path, capsys):
    tsv = soundscapes.main([str(tmp_path / "out"), "--count", "3", "--seed", "4",
                            "--seconds", "5"])
    assert "3 clips of 5 s" in capsys.readouterr().out
    assert len(read_strong_tsv(tsv)) == 3 and sf.info(str(next(
        (tmp_path / "out" / "audio").iterdir()))).duration == 5.0
    with pytest.raises(ValueError, match="unknown classes"):
        make_soundscapes(tmp_path / "bad", 1, classes=("beep", "bark"))


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_spoken_words_join_the_classes_with_espeak(tmp_path):
    tsv = make_soundscapes(tmp_path, 8, seed=0, classes=(*soundscapes.CLASSES, "speech"))
    data = read_strong_tsv(tsv)
    words = [e for events in data.events for e in events if e.label == "speech"]
    assert words and all(0.1 < e.offset - e.onset <= 2.0 for e in words)
    assert "speech" in (tmp_path / "weak.csv").read_text().splitlines()[0].split(",")
