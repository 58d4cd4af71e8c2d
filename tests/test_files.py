"""Input discovery, output paths that never leave the output folder, the manifest."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from beats.files import (
    LOCK_NAME,
    FolderBusyError,
    atomic_write,
    discover_inputs,
    folder_lock,
    output_path,
    printable,
)
from beats.manifest import FAILED, OK, ManifestWriter, Record, latest_by_key, read_manifest


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_folders_are_searched_recursively_by_extension(tmp_path):
    root = tmp_path / "audio"
    for name in ("b.wav", "a/c.FLAC", "a/z/d.mp3", "notes.txt", "a/.hidden.wav", "e.ogg"):
        _touch(root / name)
    found = discover_inputs([root])
    assert [f.key for f in found] == ["b.wav", "e.ogg", "a/c.FLAC", "a/z/d.mp3"]
    assert found[2].path == root / "a" / "c.FLAC"


def test_list_file_and_plain_files(tmp_path):
    _touch(tmp_path / "x" / "one.wav")
    outside = _touch(tmp_path.parent / f"{tmp_path.name}-other.wav")
    listing = tmp_path / "inputs.txt"
    listing.write_text(f"# my clips\nx/one.wav\n\n{outside}  # absolute, elsewhere\n")
    found = discover_inputs([listing, tmp_path / "missing.wav"])
    assert [f.key for f in found] == ["x/one.wav", outside.name, "missing.wav"]
    assert found[0].path == tmp_path / "x" / "one.wav"
    outside.unlink()


def test_duplicate_keys_refused(tmp_path):
    a = _touch(tmp_path / "a" / "clip.wav")
    b = _touch(tmp_path / "b" / "clip.wav")
    with pytest.raises(ValueError, match=r"same output 'clip\.wav'"):
        discover_inputs([a, b])


def test_list_entry_escaping_keeps_file_name(tmp_path):
    target = _touch(tmp_path / "deep" / "x.wav")
    listing = tmp_path / "lists" / "l.txt"
    listing.parent.mkdir()
    listing.write_text("../deep/x.wav\n")
    assert [f.key for f in discover_inputs([listing])] == ["x.wav"]
    assert discover_inputs([listing])[0].path.resolve() == target.resolve()


def test_output_path_stays_inside(tmp_path):
    out = tmp_path / "out"
    assert output_path(out, "a/b.wav", ".npy") == (out / "a" / "b.wav.npy").resolve()
    with pytest.raises(ValueError, match="leave the output folder"):
        output_path(out, "../../etc/x", ".npy")
    (out).mkdir()
    (out / "link").symlink_to(tmp_path)  # a symlink inside out pointing outside
    with pytest.raises(ValueError, match="leave the output folder"):
        output_path(out, "link/x.wav", ".npy")


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(path) as f:
        f.write(b"new-partial")
        raise RuntimeError("killed")
    assert path.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [path]
    with atomic_write(path) as f:
        f.write(b"new")
    assert path.read_bytes() == b"new"


def test_manifest_round_trip_and_torn_line(tmp_path):
    path = tmp_path / "manifest.jsonl"
    with ManifestWriter(path) as m:
        m.append(Record("a.wav", "a.wav", OK, 1.5, 16000, "a.wav.npy", [768]))
        m.append(Record("b.wav", "b.wav", FAILED, error="corrupt"))
    with open(path, "a") as f:
        f.write('{"input": "c.wav", "key": "c.w')  # killed mid-write
    records = read_manifest(path)
    assert [r.key for r in records] == ["a.wav", "b.wav"]
    assert records[0].shape == [768] and records[1].error == "corrupt"
    with ManifestWriter(path) as m:  # resuming appends on a fresh line
        m.append(Record("b.wav", "b.wav", OK, 2.0, 8000, "b.wav.npy", [768]))
    latest = latest_by_key(read_manifest(path))
    assert latest["b.wav"].status == OK and len(latest) == 2


def test_manifest_skips_every_line_that_is_not_a_record(tmp_path):
    path = tmp_path / "manifest.jsonl"
    good = Record("/in/a.wav", "a.wav", OK, 1.5, 16000, "a.wav.npy", [768])
    lines = [
        good.to_json().encode(),
        b"[1,2,3]", b"null", b"42", b'"a string"', b"{}", b"true",
        b'{"input": "/in/b.wav", "key": 7, "status": "ok"}',  # a key that is not a path
        b'{"input": "/in/b.wav", "key": "b.wav", "status": "done"}',  # unknown status
        b'{"input": "/in/b.wav", "key": "b.wav", "status": "ok", "shape": "768"}',
        b'{"input": "/in/b.wav", "key": "b.wav", "status": "ok", "duration": "long"}',
        b'{"input": "/in/\\ud800.wav", "key": "x.wav", "status": "ok"}',  # no file name
        b"\xff\xfe not UTF-8 at all",
        b"[" * 100000,  # deeper than the JSON parser goes
        Record("/in/c.wav", "c.wav", FAILED, error="corrupt").to_json().encode(),
    ]
    torn = Record("/in/caf\u00e9.wav", "caf\u00e9.wav", OK).to_json().encode()
    torn = torn[: torn.index("\u00e9".encode()) + 1]  # killed inside the two bytes of "é"
    path.write_bytes(b"\n".join(lines) + b"\n" + torn)
    assert [r.key for r in read_manifest(path)] == ["a.wav", "c.wav"]
    with ManifestWriter(path) as m:  # a resumed run appends on a fresh line
        m.append(Record("/in/d.wav", "d.wav", OK, 2.0, 8000, "d.wav.npy", [768]))
    records = read_manifest(path)
    assert [r.key for r in records] == ["a.wav", "c.wav", "d.wav"]
    assert records[0] == good and records[2].duration == 2.0


def test_manifest_keeps_names_that_are_not_utf8(tmp_path):
    name = os.fsdecode(b"caf\xe9 \xff.wav")  # Latin-1 bytes: lone surrogates in Python
    path = tmp_path / "manifest.jsonl"
    record = Record(f"/in/{name}", name, OK, 1.0, 16000, f"{name}.npy", [48],
                    extra={"warning": "note"})
    with ManifestWriter(path) as m:
        m.append(record)
    raw = path.read_bytes()
    raw.decode("utf-8")  # the manifest stays valid UTF-8 for every other tool
    assert b"caf\\udce9 \\udcff.wav" in raw
    (back,) = read_manifest(path)
    assert back == record and os.fsencode(back.key) == b"caf\xe9 \xff.wav"
    assert printable(name) == "caf\\xe9 \\xff.wav"


def test_list_file_paths_are_relative_to_its_folder_and_may_be_any_bytes(tmp_path):
    name = os.fsdecode(b"ol\xe9.wav")
    target = _touch(tmp_path / "lists" / "audio" / name)
    listing = tmp_path / "lists" / "files.txt"
    listing.write_bytes(b"audio/ol\xe9.wav\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cwd = os.getcwd()
    try:
        os.chdir(elsewhere)  # the current directory plays no part
        found = discover_inputs([Path("..") / "lists" / "files.txt"])
    finally:
        os.chdir(cwd)
    assert [f.key for f in found] == [f"audio/{name}"]
    assert (elsewhere / found[0].path).resolve() == target.resolve()


LOCK_HOLDER = """
import sys, time
from beats.files import folder_lock
with folder_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def _hold_lock(folder: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(folder)], env=env,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_folder_lock_excludes_a_second_holder(tmp_path):
    with folder_lock(tmp_path / "out", "beats extract") as folder:
        assert folder == tmp_path / "out"
        with pytest.raises(FolderBusyError, match=r"another beats extract run is writing "
                                                  r"into .*out"), \
                folder_lock(folder, "beats extract"):
            pass
    with folder_lock(tmp_path / "out"):  # released at the end of the block
        pass


def test_folder_lock_of_a_live_process_holds_and_a_killed_one_does_not(tmp_path):
    out = tmp_path / "out"
    holder = _hold_lock(out)
    try:
        with pytest.raises(FolderBusyError), folder_lock(out):
            pass
    finally:
        holder.kill()  # SIGKILL: no cleanup runs in the holder
        holder.wait()
    assert (out / LOCK_NAME).exists()  # the file stays, the lock does not
    with folder_lock(out):
        pass
