"""Exit codes and messages of the command line, as the README promises: 0 done, 1 some
inputs failed, 2 bad arguments or setup with one line saying what to do (never a
traceback), 3 a bug."""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from beats.cli import main, setup_error
from beats.download import DownloadError
from beats.errors import InputError
from beats.files import atomic_write

from .audio_files import sf_write
from .conftest import REFERENCE
from .servers import FileServer
from .test_cli import beats_cli

TINY = str(REFERENCE / "postnorm_gru.pt")
FINETUNED = str(REFERENCE / "finetuned.pt")


def one_error_line(stderr: str, command: str) -> str:
    """The single line of ``stderr``, checked to be ``beats COMMAND: error: ...``."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"beats {command}: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture
def wav(tmp_path) -> str:
    sf_write(tmp_path / "a.wav", seconds=1.0)
    return str(tmp_path / "a.wav")


def _closed_port_url() -> str:
    srv = FileServer({})
    url = srv.url
    srv.close()  # nothing listens there any more: connections are refused
    return url


# ---------------------------------------------------------------------- downloads
def test_failed_download_is_one_line_with_offline_advice(tmp_path, wav, monkeypatch, capsys):
    url = _closed_port_url()
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({"format_version": 1, "models": [{
        "name": "Tiny_ft", "kind": "fine-tuned", "urls": [f"{url}/share/Tiny_ft.pt?sig=x"],
        "sha256": "ab" * 32, "size": 1000, "license": "MIT", "description": "t", "default": True,
    }]}))
    cache = tmp_path / "cache"
    monkeypatch.setenv("BEATS_REGISTRY", str(registry))
    monkeypatch.setenv("BEATS_CACHE", str(cache))
    assert main(["tag", wav, "-m", "Tiny_ft"]) == 2
    out, err = capsys.readouterr()
    line = one_error_line(err, "tag")  # no "retrying" lines before it
    assert f"tried {url}/share/Tiny_ft.pt: cannot connect: [Errno 111] Connection refused" in line
    assert "Check the network connection" in line
    assert "run `beats models --import FILE`" in line
    assert ".part" not in line and "sig=x" not in line  # nothing was kept; no signature
    assert out == ""


@pytest.mark.slow  # huggingface_hub retries an unreachable Hub for about 25 s
def test_hub_connection_error_is_one_line(tmp_path, wav):
    url = _closed_port_url()
    proc = beats_cli("extract", wav, "-o", str(tmp_path / "out"), "-m", "someone/model",
                     "-j", "0", HF_ENDPOINT=url, HF_HOME=str(tmp_path / "hf"))
    assert proc.returncode == 2
    line = one_error_line(proc.stderr, "extract")
    assert f"cannot fetch config.json of the Hub repo someone/model: the Hub ({url}) did " \
           "not answer ([Errno 111] Connection refused)" in line
    assert "Check the network connection and HF_ENDPOINT" in line


# ---------------------------------------------------------------------- model files
def _random_bytes(seed: int) -> bytes:
    data = np.random.default_rng(seed).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    assert data[:1] != b"\x80" and data[:2] != b"PK"
    return data


@pytest.mark.parametrize("kind, holds", [
    ("text", "it holds text"),
    ("passwd", "it holds text"),
    ("random", "it holds unrecognised binary data"),
    ("wav", "it holds WAV audio"),
    ("empty", "it holds nothing (the file is empty)"),
])
def test_model_that_is_not_a_checkpoint(tmp_path, wav, capsys, kind, holds):
    path = tmp_path / "model.pt"
    if kind == "text":
        path.write_text("hello\n")
    elif kind == "passwd":
        if not Path("/etc/passwd").is_file():
            pytest.skip("no /etc/passwd")
        path = Path("/etc/passwd")
    elif kind == "random":
        path.write_bytes(_random_bytes(1))
    elif kind == "wav":
        shutil.copy(wav, path)
    else:
        path.write_bytes(b"")
    code = main(["extract", wav, "-o", str(tmp_path / "out"), "-m", str(path), "-j", "0", "-q"])
    assert code == 2
    line = one_error_line(capsys.readouterr().err, "extract")
    assert f"{path} is not a PyTorch checkpoint: {holds}, not what torch.save writes" in line
    assert "run code" not in line and "weights_only" not in line


def test_corrupt_pickle_is_not_called_code(tmp_path, wav, capsys):
    path = tmp_path / "model.pt"
    path.write_bytes(b"\x80\x02" + _random_bytes(2))
    assert main(["tag", wav, "-m", str(path)]) == 2
    line = one_error_line(capsys.readouterr().err, "tag")
    assert f"{path} is corrupt or not a checkpoint: its pickle cannot be read" in line
    assert "run code" not in line and "weights_only" not in line


def test_pickle_refusal_names_the_global_and_never_suggests_running_it(tmp_path, wav, capsys):
    ckpt = torch.load(TINY, weights_only=True)
    path = tmp_path / "fairseq_style.pt"
    torch.save({**ckpt, "args": argparse.Namespace(lr=0.1)}, path)
    assert main(["extract", wav, "-o", str(tmp_path / "out"), "-m", str(path), "-j", "0"]) == 2
    line = one_error_line(capsys.readouterr().err, "extract")
    assert "loading it would run code named in the file (it calls argparse.Namespace)" in line
    assert "weights_only" not in line and "False" not in line


# ---------------------------------------------------------------------- arguments
@pytest.mark.parametrize("args, message", [
    (["tag", "{wav}", "-k", "0"], "argument -k/--top-k: must be a positive integer, got 0"),
    (["extract", "{wav}", "-o", "{out}", "-b", "0"],
     "argument -b/--batch-size: must be a positive integer, got 0"),
    (["extract", "{wav}", "-o", "{out}", "-j", "-2"],
     "argument -j/--workers: must be 0 or a positive integer, got -2"),
    (["tokenize", "{wav}", "-o", "{out}", "--batch-size", "-1"],
     "argument -b/--batch-size: must be a positive integer, got -1"),
    (["extract", "{wav}", "-o", "{out}", "--shard-size", "zero"],
     "argument --shard-size: must be an integer, got 'zero'"),
    (["extract", "{wav}", "-o", "{out}", "--window", "-1"],
     "argument --window: must be 0 or a positive number, got -1"),
    (["extract", "{wav}", "-o", "{out}", "--hop", "nan"],
     "argument --hop: must be a finite number, got nan"),
    (["probe", "{wav}", "-o", "{out}", "--epochs", "0"],
     "argument --epochs: must be a positive integer, got 0"),
    (["extract", "{wav}", "-o", "{wav}"],
     "argument -o/--output: {wav} is a file: give a folder for the outputs"),
    (["tokenize", "{wav}", "-o", "{wav}"],
     "argument -o/--output: {wav} is a file: give a folder for the outputs"),
])
def test_bad_argument_names_the_flag_and_the_value(tmp_path, wav, capsys, args, message):
    args = [a.format(wav=wav, out=tmp_path / "out") for a in args]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"beats {args[0]}: error: {message.format(wav=wav)}" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_tag_with_an_encoder_only_model_is_a_setup_error(wav, capsys):
    assert main(["tag", wav, "-m", TINY]) == 2
    line = one_error_line(capsys.readouterr().err, "tag")
    assert "has no class head: tag needs a fine-tuned model" in line


def test_extract_with_a_tokenizer_says_to_use_tokenize(tmp_path, wav, capsys):
    tokenizer = str(REFERENCE / "tokenizer.pt")
    assert main(["extract", wav, "-o", str(tmp_path / "o"), "-m", tokenizer, "-j", "0"]) == 2
    line = one_error_line(capsys.readouterr().err, "extract")
    assert "load it with BEATsTokenizer.from_pretrained (on the command line: " \
           "`beats tokenize`)" in line


# ---------------------------------------------------------------------- disks
def _mount_tmpfs(folder: Path, options: str) -> None:
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a small file system here (needs root and CAP_SYS_ADMIN)")


@pytest.fixture
def small_disks(tmp_path):
    """A read-only file system and a 12 KiB one, mounted for the test."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small file system needs root")
    mounted = []
    try:
        for name, options in (("ro", "ro,size=1m"), ("full", "size=12k")):
            _mount_tmpfs(tmp_path / name, options)
            mounted.append(tmp_path / name)
        yield tmp_path / "ro", tmp_path / "full"
    finally:
        for folder in mounted:
            subprocess.run(["umount", str(folder)], check=True)


def test_read_only_and_full_output_disks(small_disks, wav, capsys):
    read_only, full = small_disks
    assert main(["extract", wav, "-o", str(read_only / "out"), "-m", TINY, "-j", "0"]) == 2
    line = one_error_line(capsys.readouterr().err, "extract")
    assert line.endswith(f"cannot write {read_only / 'out'}: the file system is read-only: "
                         "write elsewhere")
    # Every hidden state, per step and band: 6 x 8 x 4 x 48 floats, more than the disk holds.
    assert main(["extract", wav, "-o", str(full / "out"), "-m", TINY, "-j", "0", "-q",
                 "--layers", "all", "--time-pooling", "none", "--freq-pooling", "keep"]) == 2
    line = one_error_line(capsys.readouterr().err, "extract")
    assert f"cannot write {full / 'out' / 'a.wav.npy'}: No space left on device (the disk " \
           "is full or a size limit was reached): free some space or write elsewhere; then " \
           "`--resume` continues the run" in line
    assert [p.name for p in (full / "out").iterdir() if p.name.endswith(".tmp")] == []


def test_atomic_write_names_a_full_disk_whatever_the_writer_says(small_disks):
    _, full = small_disks
    target = full / "big.npy"
    with pytest.raises(OSError) as err, atomic_write(target) as f:
        np.save(f, np.zeros(100_000, np.float32))  # numpy: "... requested and ... written"
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(target)
    assert list(full.iterdir()) == []  # the partial temporary file is gone


# ---------------------------------------------------------------------- the classifier
def test_setup_errors_are_one_line_and_bugs_are_not_setup_errors():
    assert setup_error(InputError("first line\n  second line")) == "first line second line"
    assert setup_error(DownloadError("cannot download x")) == "cannot download x"
    assert setup_error(OSError(errno.EACCES, "Permission denied", "/data/out")) == (
        "cannot access /data/out: permission denied: choose a path you may use, or change "
        "its permissions")
    assert setup_error(OSError(errno.ENOSPC, "No space left on device", "/o/a.npy"),
                       resumable=True).endswith("then `--resume` continues the run")
    assert setup_error(MemoryError()).startswith("out of memory: lower --batch-size")
    for bug in (KeyError("x"), IndexError("y"), TypeError("z"), AttributeError("w"),
                RuntimeError("v"), ValueError("operands could not be broadcast together"),
                FileNotFoundError("raised by code, without an errno")):
        assert setup_error(bug) is None
