"""``beats detect`` on the command line: events.tsv and the per-file formats against the
Python API, a bad file failing alone, resume, exit codes, and a live stream piped through
stdin that prints the events of the offline run."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest

from beats.audio import load_audio
from beats.cli import main
from beats.detect import DetectConfig, Detector
from beats.events import format_event
from beats.inputs import pad_to_minimum
from beats.outputs import read_scores_table

from .audio_files import needs_sox, sox
from .conftest import REFERENCE, reference_model
from .test_detect import SETTINGS, THRESHOLDS, soundscape

MODEL = str(REFERENCE / "finetuned.pt")
POST = ["--median-filter", "0.5", "--min-gap", "0.3"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A folder: the 25 s soundscape, a 3 s tone below sub/, a 0.1 s tone (zero-padded)
    and a file that is not audio; and a threshold file beside it."""
    root = tmp_path_factory.mktemp("detect")
    folder = root / "in"
    (folder / "sub").mkdir(parents=True)
    soundscape(folder / "scape.wav")
    sox("-R", "-n", "-r", "16000", "-b", "16", str(folder / "sub" / "tone.wav"), "synth", "3",
        "sine", "1000", "vol", "0.4")
    sox("-R", "-n", "-r", "16000", "-b", "16", str(folder / "short.wav"), "synth", "0.1",
        "sine", "500")
    (folder / "bad.wav").write_bytes(b"this is not audio")
    thresholds = root / "thresholds.txt"
    thresholds.write_text("".join(f"{name}\t{value}\n" for name, value in THRESHOLDS.items()))
    return folder, thresholds


def detect(*args: str) -> int:
    return main(["detect", *args, "-m", MODEL, "-j", "0", "-q"])


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


@needs_sox
def test_a_folder_gives_events_tsv_scores_and_raven_tables(inputs, tmp_path):
    folder, thresholds = inputs
    out = tmp_path / "out"
    args = [str(folder), "-o", str(out), "--threshold", str(thresholds), *POST]
    assert detect(*args, "--format", "raven", "--save-scores") == 1  # bad.wav failed
    detector = Detector(reference_model("finetuned"), DetectConfig(**SETTINGS))
    expected, scape = [], None
    for key in ("scape.wav", "short.wav", "sub/tone.wav"):
        wav = pad_to_minimum(load_audio(folder / key)[0])
        events = detector.events(wav)
        expected += [f"{key}\t{format_event(e)}" for e in events]
        if key == "scape.wav":
            scape = (wav, events)
    lines = (out / "events.tsv").read_text().splitlines()
    assert lines[0] == "filename\tonset\toffset\tevent_label\tscore"
    assert lines[1:] == expected and len(expected) >= 10
    by_key = {r["key"]: r for r in records(out)}
    assert by_key["bad.wav"]["status"] == "failed" and "bad.wav" in by_key["bad.wav"]["error"]
    assert by_key["short.wav"]["status"] == "padded"
    raven = (out / "scape.wav.selections.txt").read_text().splitlines()
    assert raven[0].split("\t")[:5] == ["Selection", "View", "Channel", "Begin Time (s)",
                                        "End Time (s)"]
    assert len(raven) == 1 + len(scape[1])
    assert (out / "sub" / "tone.wav.selections.txt").is_file()
    with warnings.catch_warnings():  # dcase_util, under sed_scores_eval, warns on import
        warnings.simplefilter("ignore")
        from sed_scores_eval.base_modules.io import read_sed_scores

    table = read_sed_scores(out / "scores" / "scape.tsv")
    assert list(table.columns) == ["onset", "offset", *THRESHOLDS]
    np.testing.assert_allclose(table[list(THRESHOLDS)].to_numpy(),
                               detector.frame_scores(scape[0]).probs, atol=1e-6)
    assert table["offset"].iloc[-1] == pytest.approx(156 * 0.16)
    times, values, labels = read_scores_table(out / "scores" / "scape.tsv")
    assert labels == list(THRESHOLDS) and np.array_equal(values, table[labels].to_numpy())
    assert np.array_equal(times[:-1], table["onset"].to_numpy())

    # Resume: finished files are skipped, the bad one fails again, the table stays.
    before = (out / "events.tsv").read_text()
    assert detect(*args, "--format", "raven", "--save-scores", "--resume") == 1
    assert [r["key"] for r in records(out)].count("scape.wav") == 1
    assert (out / "events.tsv").read_text() == before
    # Other settings or no --resume: refused, the folder holds a run.
    assert detect(*args, "--format", "raven", "--resume") == 2
    assert detect(*args, "--format", "raven", "--save-scores") == 2


@needs_sox
def test_audacity_and_json_files(inputs, tmp_path):
    folder, thresholds = inputs
    events = Detector(reference_model("finetuned"), DetectConfig(**SETTINGS)).events(
        load_audio(folder / "scape.wav")[0])
    for fmt in ("audacity", "json"):
        out = tmp_path / fmt
        assert detect(str(folder / "scape.wav"), "-o", str(out), "--threshold",
                      str(thresholds), *POST, "--format", fmt) == 0
        if fmt == "audacity":
            labels = (out / "scape.wav.txt").read_text().splitlines()
            assert labels == [f"{e.onset:.3f}\t{e.offset:.3f}\t{e.label} ({e.score:.2f})"
                              for e in events]
        else:
            data = json.loads((out / "scape.wav.json").read_text())
            assert data["filename"] == "scape.wav" and data["duration"] == 25.0
            assert [(d["onset"], d["offset"], d["event_label"], d["score"])
                    for d in data["events"]] == [tuple(e) for e in events]


@needs_sox
def test_a_stream_piped_through_stdin_prints_the_offline_events(inputs, tmp_path):
    folder, thresholds = inputs
    out = tmp_path / "out"
    assert detect(str(folder / "scape.wav"), "-o", str(out), "--threshold",
                  str(thresholds), *POST) == 0
    offline = sorted(line.split("\t", 1)[1]
                     for line in (out / "events.tsv").read_text().splitlines()[1:])
    pcm = subprocess.Popen(["sox", str(folder / "scape.wav"), "-t", "raw", "-"],
                           stdout=subprocess.PIPE)
    run = subprocess.run(
        [sys.executable, "-m", "beats", "detect", "-", "--stream", "-m", MODEL,
         "--threshold", str(thresholds), *POST],
        stdin=pcm.stdout, capture_output=True, text=True, timeout=120)
    pcm.stdout.close()
    assert pcm.wait() == 0
    assert run.returncode == 0, run.stderr
    streamed = run.stdout.splitlines()
    assert sorted(streamed) == offline and len(streamed) >= 10
    assert "at most 10.415 s of audio after it ends" in run.stderr


@needs_sox
def test_mistakes_exit_2_with_one_line(inputs, tmp_path, capsys):
    folder, _ = inputs
    wav, out = str(folder / "scape.wav"), str(tmp_path / "out")
    twins = tmp_path / "twins"
    twins.mkdir()
    for suffix in ("wav", "flac"):
        sox("-R", "-n", "-r", "16000", str(twins / f"x.{suffix}"), "synth", "1", "sine", "300")
    cases = [
        ([wav], "-o OUT"),
        (["-", "-o", out], "--stream"),
        ([wav, "--stream"], "--stream"),
        ([wav, "-o", out, "--classes", "Animals"], "did you mean 'Animal'"),
        ([wav, "-o", out, "--threshold", "high"], "--threshold 'high'"),
        ([wav, "-o", out, "--window", "0.1"], "shorter than"),
        ([str(twins), "-o", out, "--save-scores"], "same scores file"),
    ]
    for argv, message in cases:
        assert detect(*argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert main(["detect", wav, "-o", out, "-m", str(REFERENCE / "postnorm_gru.pt")]) == 2
    assert "fine-tuned" in capsys.readouterr().err
