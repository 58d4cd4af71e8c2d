"""`beats extract` end to end on real files: equality with extract_features, bad inputs,
resume after a kill, shards, many files, and a 2-process torchrun."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from beats.audio import load_audio
from beats.extract import ExtractOptions, extract
from beats.manifest import read_manifest
from beats.pooling import PoolingSpec

from .audio_files import needs_espeak, needs_sox, sf_write, sox, sox_tone, speech
from .conftest import REFERENCE, reference_model

ROOT = Path(__file__).resolve().parents[1]
MODEL = str(REFERENCE / "postnorm_gru.pt")


def beats_cli(*args: str, check: bool = False, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "beats", *args], capture_output=True,
                          text=True, env=env, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"beats {args} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def _manifest(out: Path) -> dict[str, dict]:
    return {r.key: r for r in read_manifest(out / "manifest.jsonl")}


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory) -> Path:
    """A small tree of real audio: sox tones and sweeps, espeak-ng speech, soundfile FLAC."""
    root = tmp_path_factory.mktemp("audio")
    (root / "tones").mkdir()
    sox_tone(root / "tones" / "a440.wav", seconds=1.5, rate=22050)
    sox_tone(root / "tones" / "sweep.wav", seconds=3.2, rate=44100, freq="200-4000")
    left, right = sox_tone(root / "l.wav", freq="300"), sox_tone(root / "r.wav", freq="1200")
    sox("-M", str(left), str(right), str(root / "tones" / "stereo48k.wav"), "rate", "48000")
    left.unlink()
    right.unlink()
    speech(root / "speech.wav", "embeddings for a folder of audio", voice="en")
    sf_write(root / "chirp.flac", seconds=2.0, rate=8000, subtype="PCM_16")
    return root


@needs_sox
@needs_espeak
def test_cli_embeddings_equal_extract_features(audio_dir, tmp_path):
    out = tmp_path / "out"
    proc = beats_cli("extract", str(audio_dir), "-o", str(out), "-m", MODEL, "-j", "2", "-b", "3")
    assert proc.returncode == 0, proc.stderr
    assert "5 ok, 0 padded, 0 failed" in proc.stderr
    model = reference_model("postnorm_gru")
    records = _manifest(out)
    assert sorted(records) == ["chirp.flac", "speech.wav", "tones/a440.wav",
                               "tones/stereo48k.wav", "tones/sweep.wav"]
    for key, record in records.items():
        wav, info = load_audio(audio_dir / key)
        with torch.no_grad():
            feats = model.extract_features(wav).features[0]
        expect = feats.mean(dim=0).numpy()  # mean over every valid patch = both poolings
        got = np.load(out / record.output)
        assert got.shape == (48,) and record.shape == [48]
        assert np.abs(got - expect).max() < 1e-5, key
        assert record.status == "ok" and record.sample_rate == info.sample_rate
        assert record.duration == pytest.approx(info.duration)
    assert (out / "tones" / "stereo48k.wav.npy").exists()  # the tree is mirrored


@needs_sox
def test_time_resolved_all_layers_with_centre_times(audio_dir, tmp_path):
    out = tmp_path / "out"
    options = ExtractOptions(pooling=PoolingSpec(layers="all", time="none", freq="keep"),
                             num_workers=0)
    model = reference_model("postnorm_gru")
    summary = extract(model, [audio_dir / "tones" / "sweep.wav"], out, options, progress=False)
    assert summary.ok == 1
    got = np.load(out / "sweep.wav.npy")
    times = np.load(out / "sweep.wav.times.npy")
    wav, _ = load_audio(audio_dir / "tones" / "sweep.wav")
    with torch.no_grad():
        ref = model.extract_features(wav, output_hidden_states=True)
    steps = (1 + (len(wav) - 400) // 160) // 16
    assert got.shape == (4, steps, 8, 48)
    for j in range(4):
        assert np.abs(got[j].reshape(-1, 48) - ref.hidden_states[j][0].numpy()).max() < 1e-5
    assert np.allclose(times, 0.0875 + 0.16 * np.arange(steps))


def test_bad_inputs_are_recorded_and_skipped(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    sf_write(src / "good.wav", seconds=1.0)
    sf_write(src / "tiny.wav", seconds=0.1)
    (src / "empty.wav").write_bytes(b"")
    (src / "text.mp3").write_text("not audio at all\n" * 10)
    sf_write(src / "corrupt.flac", seconds=1.0, subtype="PCM_16")
    data = bytearray((src / "corrupt.flac").read_bytes())
    data[:80] = bytes(80)
    (src / "corrupt.flac").write_bytes(bytes(data))
    out = tmp_path / "out"
    proc = beats_cli("extract", str(src), "-o", str(out), "-m", MODEL, "-j", "0")
    assert proc.returncode == 1  # some inputs failed
    assert "1 ok, 1 padded, 3 failed" in proc.stderr
    records = _manifest(out)
    assert records["good.wav"].status == "ok"
    assert records["tiny.wav"].status == "padded" and records["tiny.wav"].duration == 0.1
    assert np.load(out / "tiny.wav.npy").shape == (48,)
    for key, reason in (("empty.wav", "empty"), ("text.mp3", "not a valid MP3"),
                        ("corrupt.flac", "not a valid FLAC")):
        assert records[key].status == "failed" and reason in records[key].error, key
        assert not (out / f"{key}.npy").exists()


def _many_files(folder: Path, count: int, seconds: float = 0.5) -> None:
    folder.mkdir(parents=True)
    for i in range(count):
        sf_write(folder / f"clip{i:04d}.wav", seconds=seconds + 0.01 * (i % 7), seed=i)


def test_resume_after_kill(tmp_path):
    src = tmp_path / "in"
    _many_files(src, 40, seconds=1.0)
    whole = tmp_path / "whole"
    beats_cli("extract", str(src), "-o", str(whole), "-m", MODEL, "-j", "0", "-b", "1", "-q",
              check=True)

    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "beats", "extract", str(src), "-o", str(out), "-m", MODEL,
         "-j", "0", "-b", "1", "-q"], env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(out.glob("*.npy"))) < 12 and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npy")}
    assert 12 <= len(first) < 40, "the run must be killed mid-way"
    first_records = read_manifest(out / "manifest.jsonl")

    resumed = beats_cli("extract", str(src), "-o", str(out), "-m", MODEL, "-j", "0", "-b", "1",
                        "--resume", check=True)
    assert "0 failed" in resumed.stderr
    records = read_manifest(out / "manifest.jsonl")
    keys = [r.key for r in records]
    assert sorted(set(keys)) == sorted(keys) and len(keys) == 40  # none computed twice
    assert {r.key for r in first_records} <= set(keys)
    for name, mtime in first.items():  # outputs of the first run were not rewritten
        assert (out / name).stat().st_mtime_ns == mtime
    for p in whole.glob("*.npy"):
        assert np.array_equal(np.load(p), np.load(out / p.name)), p.name
    assert not list(out.glob(".*.tmp"))


def test_resume_refuses_other_settings_and_reuse_needs_resume(tmp_path):
    src = tmp_path / "in"
    _many_files(src, 2)
    out = tmp_path / "out"
    model = reference_model("postnorm_gru")
    extract(model, [src], out, ExtractOptions(num_workers=0), model_name=MODEL, progress=False)
    with pytest.raises(FileExistsError, match="pass --resume"):
        extract(model, [src], out, ExtractOptions(num_workers=0), model_name=MODEL)
    other = ExtractOptions(num_workers=0, resume=True, pooling=PoolingSpec(time="none"))
    with pytest.raises(ValueError, match="time_pooling: 'mean' -> 'none'"):
        extract(model, [src], out, other, model_name=MODEL)
    same = extract(model, [src], out, ExtractOptions(num_workers=0, resume=True),
                   model_name=MODEL, progress=False)
    assert same.skipped == 2 and same.ok == 0
    proc = beats_cli("extract", str(src), "-o", str(out), "-m", MODEL, "-j", "0")
    assert proc.returncode == 2 and "pass --resume" in proc.stderr


def test_safetensors_shards_equal_npy(tmp_path):
    src = tmp_path / "in"
    _many_files(src, 10)
    model = reference_model("postnorm_gru")
    spec = PoolingSpec(time="none", freq="mean")
    extract(model, [src], tmp_path / "npy", ExtractOptions(pooling=spec, num_workers=0),
            progress=False)
    extract(model, [src], tmp_path / "st",
            ExtractOptions(pooling=spec, num_workers=0, output_format="safetensors",
                           shard_size=4), progress=False)
    shards = sorted((tmp_path / "st").glob("shard-*.safetensors"))
    run = shards[0].name.split("-00-")[0]  # shard-<run id>-<rank>-<number>
    assert re.fullmatch(r"shard-\d{8}T\d{6}-[0-9a-f]{6}", run)
    assert [s.name for s in shards] == [f"{run}-00-0000{i}.safetensors" for i in range(3)]
    tensors = {}
    for s in shards:
        tensors.update(load_file(s))
    records = _manifest(tmp_path / "st")
    for key, record in records.items():
        shard, inner = record.output.split("#")
        assert (tmp_path / "st" / shard).exists()
        assert inner == key
        assert np.array_equal(tensors[key], np.load(tmp_path / "npy" / f"{key}.npy"))
        assert np.array_equal(tensors[key + "#times"],
                              np.load(tmp_path / "npy" / f"{key[:-4]}.wav.times.npy"))


@pytest.mark.slow
def test_folder_of_2000_tiny_files(tmp_path):
    src = tmp_path / "in"
    _many_files(src, 2000, seconds=0.2)
    out = tmp_path / "out"
    proc = beats_cli("extract", str(src), "-o", str(out), "-m", MODEL, "-j", "2", "-b", "64")
    assert proc.returncode == 0, proc.stderr
    assert "2000 ok" in proc.stderr
    assert len(list(out.glob("*.npy"))) == 2000
    assert len(read_manifest(out / "manifest.jsonl")) == 2000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_torchrun_equals_one_process(tmp_path):
    src = tmp_path / "in"
    _many_files(src, 9)
    single = tmp_path / "single"
    beats_cli("extract", str(src), "-o", str(single), "-m", MODEL, "-j", "0", "-q", check=True)
    multi = tmp_path / "multi"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
         "-m", "beats", "extract", str(src), "-o", str(multi), "-m", MODEL, "-j", "0", "-q",
         "--device", "cpu"],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert not list(multi.glob("manifest.rank*"))
    records = _manifest(multi)
    assert sorted(records) == sorted(_manifest(single))
    for p in single.glob("*.npy"):
        assert np.array_equal(np.load(p), np.load(multi / p.name)), p.name
    assert json.loads((multi / "run.json").read_text())["model"] == MODEL


@needs_sox
def test_long_files_are_windowed_and_stitched(tmp_path):
    from beats import extract_windowed

    src = tmp_path / "in"
    src.mkdir()
    sox_tone(src / "long.wav", seconds=23.0, rate=16000, freq="100-6000")
    sox_tone(src / "short.wav", seconds=4.0, rate=16000, freq="500")
    model = reference_model("postnorm_gru")
    spec = PoolingSpec(layers="all", time="none", freq="keep")
    extract(model, [src], tmp_path / "win", ExtractOptions(pooling=spec, num_workers=0,
                                                           window=6.0, hop=4.0), progress=False)
    extract(model, [src], tmp_path / "whole", ExtractOptions(pooling=spec, num_workers=0,
                                                             window=None), progress=False)
    long_wav, _ = load_audio(src / "long.wav")
    windowed = np.load(tmp_path / "win" / "long.wav.npy")  # (L + 1, T, 8, C)
    steps = (1 + (len(long_wav) - 400) // 160) // 16
    assert windowed.shape == (4, steps, 8, 48)
    for k in (0, 3):  # every layer stitched like extract_windowed does it
        ref = extract_windowed(model, long_wav, window_s=6.0, hop_s=4.0, output_layer=k)
        assert np.abs(windowed[k].reshape(-1, 48) - ref.features.numpy()).max() < 1e-5
        assert np.allclose(np.load(tmp_path / "win" / "long.wav.times.npy"), ref.step_times)
    whole = np.load(tmp_path / "whole" / "long.wav.npy")
    assert whole.shape == windowed.shape and np.abs(whole - windowed).max() > 1e-3
    # a file shorter than the window is embedded whole either way
    assert np.abs(np.load(tmp_path / "win" / "short.wav.npy")
                  - np.load(tmp_path / "whole" / "short.wav.npy")).max() < 1e-5
    default = ExtractOptions()
    assert default.window == 10.0 and default.hop == 8.0
