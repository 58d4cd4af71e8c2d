"""`beats extract` under bad files, bad weights, concurrent runs, kills and Ctrl-C: every
per-file problem is a `failed` record with its reason, no NaN is ever recorded as a
success, one run owns its output folder, workers die with the run, and resume finds
finished inputs whatever the spelling of the inputs."""

from __future__ import annotations

import copy
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.numpy import load_file

from beats.audio import load_audio
from beats.extract import ExtractOptions, extract
from beats.manifest import read_manifest
from beats.tokenizer import BEATsTokenizer

from .audio_files import needs_espeak, needs_sox, sf_write, sox, sox_tone, speech
from .conftest import REFERENCE, reference_model
from .test_extract import MODEL, ROOT, beats_cli


def _latest(out: Path) -> dict:
    return {r.key: r for r in read_manifest(out / "manifest.jsonl")}


def _float_wav(path: Path, peak_at: float | None = None, value: float = 0.0) -> Path:
    """1 s of a 0.1-amplitude tone as 32-bit float, one sample replaced by ``value``."""
    wav = (0.1 * np.sin(np.arange(16000) * 0.2)).astype(np.float32)
    if peak_at is not None:
        wav[int(peak_at * 16000)] = value
    sf.write(str(path), wav, 16000, subtype="FLOAT")
    return path


@needs_sox
@needs_espeak
def test_a_folder_of_bad_files_fails_each_and_embeds_the_rest(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    latin1 = os.fsdecode(b"chanson d'\xe9t\xe9.wav")  # not valid UTF-8
    sox_tone(src / latin1, seconds=1.2, rate=44100, freq="600")
    speech(src / "speech.wav", "one bad file never stops a run")
    sox_tone(src / "tone.flac", seconds=2.0, rate=48000, channels=2)
    _float_wav(src / "hot.wav", 0.5, 3.0)  # outside [-1, 1], still plausible
    sox("-r", "1", "-n", "-b", "16", str(src / "onehz.wav"), "synth", "3000s", "sine", "0.1")
    sox("-r", "1", "-n", "-b", "16", str(src / "onehz.flac"), "synth", "3000s", "sine", "0.1")
    _float_wav(src / "huge.wav", 0.3, 1e15)
    _float_wav(src / "nan.wav", 0.7, np.nan)
    out = tmp_path / "out"
    proc = beats_cli("extract", str(src), "-o", str(out), "-m", MODEL, "-j", "2", "-b", "2")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr
    assert "4 ok, 0 padded, 4 failed" in proc.stderr
    records = _latest(out)
    assert {k: r.status for k, r in records.items()} == {
        latin1: "ok", "speech.wav": "ok", "tone.flac": "ok", "hot.wav": "ok",
        "onehz.wav": "failed", "onehz.flac": "failed", "huge.wav": "failed",
        "nan.wav": "failed"}
    reasons = {"onehz.wav": "sample rate of 1 Hz, outside the 1000 to 1000000 Hz",
               "onehz.flac": "sample rate of 1 Hz", "huge.wav": "samples peak at 1e+15",
               "nan.wav": "holds NaN or Inf samples (the first at 0.700 s)"}
    for key, reason in reasons.items():
        assert reason in records[key].error and key in records[key].error, key
        assert not (out / f"{key}.npy").exists()
    assert "samples peak at 3" in records["hot.wav"].extra["warning"]
    # the odd name survives the manifest and names its output and its input exactly
    record = records[latin1]
    assert os.fsencode(record.input) == os.fsencode(src / latin1)
    wav, _ = load_audio(src / latin1)
    with torch.no_grad():
        want = reference_model("postnorm_gru").extract_features(wav).features[0].mean(0)
    assert np.abs(np.load(out / record.output) - want.numpy()).max() < 1e-5
    for npy in out.rglob("*.npy"):
        assert np.isfinite(np.load(npy)).all(), npy
    again = beats_cli("extract", str(src), "-o", str(out), "-m", MODEL, "-j", "0", "--resume")
    assert again.returncode == 1 and "Traceback" not in again.stderr
    assert "0 ok, 0 padded, 4 failed, 4 skipped" in again.stderr


def test_nan_weights_fail_every_file_instead_of_writing_nan(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    sf_write(src / "short.wav", seconds=1.0)
    sf_write(src / "long.wav", seconds=3.5, seed=1)  # windowed: longer than the window
    broken = copy.deepcopy(reference_model("postnorm_gru"))
    with torch.no_grad():
        broken.encoder.layers[1].fc2.weight[3, 5] = float("nan")
    summary = extract(broken, [src], tmp_path / "out",
                      ExtractOptions(num_workers=0, window=2.0), progress=False)
    assert (summary.ok, summary.failed) == (0, 2)
    for key, record in _latest(tmp_path / "out").items():
        assert record.status == "failed" and "NaN or Inf" in record.error, key
        assert "weights" in record.error
    assert not list((tmp_path / "out").glob("*.npy"))

    tokenizer = BEATsTokenizer.from_pretrained(REFERENCE / "tokenizer.pt")
    with torch.no_grad():
        tokenizer.encoder.layers[0].fc1.weight[0, 0] = float("inf")
    summary = extract(tokenizer, [src], tmp_path / "tokens",
                      ExtractOptions(num_workers=0, window=2.0, tokens=True), progress=False)
    assert (summary.ok, summary.failed) == (0, 2)
    assert all("NaN or Inf" in r.error for r in _latest(tmp_path / "tokens").values())


@needs_sox
def test_a_truncated_file_is_recorded_with_the_duration_read(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    sox_tone(tmp_path / "full.flac", seconds=9.0, rate=32000, freq="300-2000")
    data = (tmp_path / "full.flac").read_bytes()
    (src / "cut.flac").write_bytes(data[: len(data) // 2])
    summary = extract(reference_model("postnorm_gru"), [src], tmp_path / "out",
                      ExtractOptions(num_workers=0), progress=False)
    assert summary.ok == 1
    record = _latest(tmp_path / "out")["cut.flac"]
    info = load_audio(src / "cut.flac")[1]
    assert 3.0 < record.duration == info.duration < 6.0  # not the 9 s of the header
    assert record.status == "ok" and "decoding stopped at" in record.extra["warning"]
    assert summary.audio_seconds == pytest.approx(record.duration)


def test_an_output_path_leaving_the_folder_fails_that_file_only(tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    sf_write(src / "sub" / "a.wav")
    sf_write(src / "b.wav", seed=1)
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "sub").symlink_to(elsewhere)  # out/sub/a.wav.npy would land outside out
    summary = extract(reference_model("postnorm_gru"), [src], out,
                      ExtractOptions(num_workers=0), progress=False)
    assert (summary.ok, summary.failed) == (1, 1)
    records = _latest(out)
    assert records["b.wav"].status == "ok"
    assert records["sub/a.wav"].status == "failed"
    assert "cannot write its output" in records["sub/a.wav"].error
    assert "would leave the output folder" in records["sub/a.wav"].error
    assert list(elsewhere.iterdir()) == []


def _many(folder: Path, count: int, seconds: float = 1.0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        sf_write(folder / f"clip{i:03d}.wav", seconds=seconds, seed=i)
    return folder


def _start(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "beats", *args], env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)


def _wait_for(condition, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _tensors_of(out: Path) -> dict[str, set[str]]:
    return {p.name: set(load_file(p)) for p in out.glob("shard-*.safetensors")}


def test_a_second_run_into_a_busy_folder_is_refused(tmp_path):
    src = _many(tmp_path / "in", 12)
    out = tmp_path / "out"
    args = ("extract", str(src), "-o", str(out), "-m", MODEL, "-j", "0", "-b", "1",
            "--format", "safetensors", "--shard-size", "4")
    first = _start(*args)
    _wait_for(lambda: len(read_manifest(out / "manifest.jsonl")) >= 4)  # a shard written
    first.send_signal(signal.SIGSTOP)  # hold the first run mid-way, deterministically
    try:
        second = beats_cli(*args, "--resume")  # the same folder, while the first runs
    finally:
        first.send_signal(signal.SIGCONT)
    first_err = first.communicate(timeout=300)[1]
    assert first.returncode == 0, first_err
    assert second.returncode == 2
    assert "another beats extract run is writing into" in second.stderr
    tensors = _tensors_of(out)
    records = read_manifest(out / "manifest.jsonl")
    assert len(records) == 12
    for r in records:  # every record points at a tensor that exists
        shard, name = r.output.split("#")
        assert name in tensors[shard], r.output

    _many(tmp_path / "in", 15)  # three more inputs; the earlier shards must stay as they are
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    resumed = beats_cli(*args, "--resume")
    assert resumed.returncode == 0 and "3 ok" in resumed.stderr, resumed.stderr
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    assert {k: after[k] for k in before} == before and len(after) == len(before) + 1
    (new,) = set(after) - set(before)
    assert new.split("-00-")[0] != next(iter(before)).split("-00-")[0]  # another run id
    tensors = _tensors_of(out)
    latest = _latest(out)
    assert len(latest) == 15
    for r in latest.values():
        shard, name = r.output.split("#")
        assert name in tensors[shard], r.output


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has died; only its parent has not collected it


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux")
def test_workers_die_with_a_killed_run(tmp_path):
    src = _many(tmp_path / "in", 60, seconds=2.0)
    run = _start("extract", str(src), "-o", str(tmp_path / "out"), "-m", MODEL, "-j", "2",
                 "-b", "2", "-q")
    workers: list[int] = []

    def started() -> bool:
        workers[:] = _children(run.pid)
        return len(workers) == 2 and (tmp_path / "out" / "manifest.jsonl").exists()

    _wait_for(started)
    time.sleep(0.5)
    run.kill()  # SIGKILL: the run gets no chance to stop its workers
    run.wait()
    killed = time.monotonic()
    try:
        _wait_for(lambda: not any(_alive(w) for w in workers), seconds=5.0)
        print(f"workers gone {time.monotonic() - killed:.2f} s after SIGKILL of the run")
    finally:
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)


def test_ctrl_c_exits_at_once_keeps_what_finished_and_resume_completes(tmp_path):
    src = _many(tmp_path / "in", 40, seconds=2.0)
    out = tmp_path / "out"
    args = ("extract", str(src), "-o", str(out), "-m", MODEL, "-j", "2", "-b", "2",
            "--format", "safetensors", "--shard-size", "1000")  # all in one pending shard
    run = _start(*args)
    stderr: list[str] = []  # the progress bar rewrites its line: read as it comes
    reader = threading.Thread(target=lambda: stderr.extend(iter(lambda: run.stderr.read(1), "")))
    reader.start()
    workers = []

    def progressed() -> bool:
        workers[:] = _children(run.pid)
        done = re.findall(r"(\d+)/40 ", "".join(stderr))
        return bool(done) and int(done[-1]) >= 4

    _wait_for(progressed)
    os.killpg(run.pid, signal.SIGINT)  # what a terminal does: the whole process group
    interrupted = time.monotonic()
    run.wait(timeout=30)
    print(f"exited {time.monotonic() - interrupted:.2f} s after Ctrl-C")
    reader.join()
    text = "".join(stderr)
    assert run.returncode == 130, text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    lines = [x for x in text.replace("\r", "\n").splitlines() if x.startswith("beats extract")]
    assert lines == [f"beats extract: interrupted; what finished is kept in {out}: run the "
                     "same command with --resume to continue"]
    assert not [w for w in workers if _alive(w)]
    tensors = _tensors_of(out)
    records = read_manifest(out / "manifest.jsonl")
    assert 4 <= len(records) < 40  # the pending shard was written, nothing is lost
    for r in records:
        shard, name = r.output.split("#")
        assert name in tensors[shard]
    resumed = beats_cli(*args, "--resume", "-q")
    assert resumed.returncode == 0, resumed.stderr
    latest = _latest(out)
    assert len(latest) == 40 and len(read_manifest(out / "manifest.jsonl")) == 40
    assert not list(out.glob(".*.tmp"))


def test_inputs_without_audio_are_an_error(tmp_path):
    src = tmp_path / "in"
    (src / "empty").mkdir(parents=True)
    (src / "notes.txt").write_text("no audio here\n")
    (src / "picture.png").write_bytes(b"\x89PNG")
    proc = beats_cli("extract", str(src), "-o", str(tmp_path / "out"), "-m", MODEL)
    assert proc.returncode == 2
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"beats extract: error: no audio files found in {src} (looked for files "
                           "ending in .wav .wave .flac .ogg")


def test_resume_finds_finished_inputs_by_file_whatever_the_spelling(tmp_path, monkeypatch):
    root = tmp_path / "my_audio"
    for name, seed in (("speech/a.wav", 1), ("speech/b.wav", 2), ("music/c.wav", 3)):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        sf_write(root / name, seconds=0.5, seed=seed)
    model = reference_model("postnorm_gru")
    out = tmp_path / "out"
    options = ExtractOptions(num_workers=0, resume=True)
    monkeypatch.chdir(tmp_path)
    first = extract(model, ["my_audio/"], out, options, progress=False)  # relative
    assert first.ok == 3

    sf_write(root / "speech" / "d.wav", seconds=0.5, seed=4)
    second = extract(model, [root / "speech"], out, options, progress=False)  # absolute
    assert (second.ok, second.skipped) == (1, 2)
    assert (out / "speech" / "d.wav.npy").exists()  # keyed as the first run keyed them
    assert not (out / "d.wav.npy").exists() and not (out / "a.wav.npy").exists()
    assert sorted(_latest(out)) == ["music/c.wav", "speech/a.wav", "speech/b.wav",
                                    "speech/d.wav"]

    other = tmp_path / "other"  # another file whose output would be speech/a.wav
    (other / "speech").mkdir(parents=True)
    sf_write(other / "speech" / "a.wav", seconds=0.5, seed=9)
    with pytest.raises(ValueError, match=r"cannot resume: 1 input\(s\) would overwrite "
                                         r"outputs of other files"):
        extract(model, [other], out, options, progress=False)

    root.rename(tmp_path / "moved")  # the inputs moved: their keys still match
    third = extract(model, [tmp_path / "moved"], out, options, progress=False)
    assert (third.ok, third.skipped) == (0, 4)
