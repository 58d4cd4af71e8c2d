"""Files and folders beats writes get the permissions the umask gives, like any tool's:
outputs, run.json, the manifest, safetensors shards, save_pretrained and Microsoft
exports, probes and the download cache (not tempfile's private 0600/0700)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from beats import BEATs
from beats.extract import ExtractOptions, extract
from beats.files import atomic_path, temporary_folder

from .audio_files import sf_write
from .conftest import REFERENCE, reference_model
from .servers import FileServer
from .test_registry_download import FILES, _registry


@pytest.fixture(params=[0o022, 0o027], ids=["022", "027"])
def umask(request):
    """Run the test under this umask, restoring the previous one after it."""
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def modes(folder: Path) -> dict[str, int]:
    """Permission bits of everything under ``folder`` (the folder itself as '.')."""
    found = {".": stat.S_IMODE(folder.stat().st_mode)}
    for path in folder.rglob("*"):
        found[str(path.relative_to(folder))] = stat.S_IMODE(path.stat().st_mode)
    return found


def expect(folder: Path, mask: int) -> None:
    """Every file under ``folder`` is 0666 & ~mask and every folder (``folder`` too, which
    beats created) 0777 & ~mask."""
    for name, mode in modes(folder).items():
        want = (0o777 if (folder / name).is_dir() else 0o666) & ~mask
        assert mode == want, f"{name}: {oct(mode)} instead of {oct(want)}"


def test_atomic_path_and_temporary_folder_follow_the_umask(tmp_path, umask):
    with atomic_path(tmp_path / "new" / "a.bin") as tmp:
        assert stat.S_IMODE(tmp.stat().st_mode) == 0o666 & ~umask  # already while written
        tmp.write_bytes(b"x")
    with atomic_path(tmp_path / "new" / "b.bin") as tmp:
        tmp.unlink()  # a writer that replaces the file with a private one, as safetensors does
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
    folder = temporary_folder(tmp_path / "new", ".stage.")
    assert folder.name.startswith(".stage.") and list(folder.iterdir()) == []
    expect(tmp_path / "new", umask)


@pytest.mark.parametrize("output_format", ["npy", "safetensors"])
def test_extract_outputs_follow_the_umask(tmp_path, umask, output_format):
    audio = tmp_path / "audio"
    audio.mkdir()
    sf_write(audio / "a.wav", seconds=1.0)
    options = ExtractOptions(num_workers=0, output_format=output_format)
    summary = extract(reference_model("postnorm_gru"), [audio], tmp_path / "out", options,
                      progress=False)
    assert summary.ok == 1
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"run.json", "manifest.jsonl"} <= names
    expect(tmp_path / "out", umask)


def test_saved_models_follow_the_umask(tmp_path, umask):
    model = reference_model("finetuned")
    model.save_pretrained(tmp_path / "folder")
    model.save_microsoft_checkpoint(tmp_path / "export" / "model.pt")
    assert sorted(p.name for p in (tmp_path / "folder").iterdir()) == [
        "config.json", "labels.json", "model.safetensors"]
    expect(tmp_path / "folder", umask)
    expect(tmp_path / "export", umask)


def test_download_cache_follows_the_umask(tmp_path, umask, monkeypatch):
    with FileServer({f"/share/{n}.pt": d for n, d in FILES.items()}) as srv:
        monkeypatch.setenv("BEATS_REGISTRY", str(_registry(tmp_path, srv.url)))
        BEATs.from_pretrained("Tiny", cache_dir=tmp_path / "cache")
    folder = tmp_path / "cache" / "Tiny"
    assert json.loads((folder / "source.json").read_text())["name"] == "Tiny"
    expect(tmp_path / "cache", umask)


def test_probe_outputs_follow_the_umask(tmp_path, umask):
    from beats.cli import main

    data = tmp_path / "data"
    for label in ("a", "b"):
        (data / label).mkdir(parents=True)
        for i in range(4):
            sf_write(data / label / f"{i}.wav", seconds=0.5, seed=i + (10 if label == "b" else 0))
    code = main(["probe", str(data), "-o", str(tmp_path / "probe"), "-m",
                 str(REFERENCE / "postnorm_gru.pt"), "-j", "0", "--epochs", "3", "-q"])
    assert code == 0
    assert {"head.safetensors", "head.json", "report.json"} <= {
        p.name for p in (tmp_path / "probe").iterdir()}
    expect(tmp_path / "probe", umask)
