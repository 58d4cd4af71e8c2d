"""Input discovery, output paths that never leave the output folder, the manifest."""

from __future__ import annotations

from pathlib import Path

import pytest

from beats.files import atomic_write, discover_inputs, output_path
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
