"""Registry names: download from a local server, convert once into the cache, offline use."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch

from beats import BEATs, BEATsTokenizer
from beats.download import ChecksumError

from .conftest import REFERENCE, reference_model
from .servers import FileServer
from .test_save_load import assert_same_model

FILES = {name: (REFERENCE / f"{name}.pt").read_bytes()
         for name in ("finetuned", "postnorm_gru", "tokenizer")}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _registry(tmp_path: Path, url: str, **overrides) -> Path:
    """A registry of the reference checkpoints served at ``url``."""
    def entry(name, file, kind, **kw):
        return {"name": name, "kind": kind, "urls": [f"{url}/share/{file}.pt?sig=x"],
                "sha256": _sha(FILES[file]), "size": len(FILES[file]), "license": "MIT",
                "description": "test", **kw, **overrides.get(name, {})}

    models = [
        entry("Tiny_finetuned", "finetuned", "fine-tuned", aliases=["tiny-ft"]),
        entry("Tiny", "postnorm_gru", "pretrained", default=True, sha256=None, size=None),
        entry("Tiny_tokenizer", "tokenizer", "tokenizer"),
    ]
    path = tmp_path / "registry.json"
    path.write_text(json.dumps({"format_version": 1, "models": models}))
    return path


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A file server with the reference checkpoints and a registry pointing to it."""
    files = {f"/share/{name}.pt": data for name, data in FILES.items()}
    with FileServer(files) as srv:
        monkeypatch.setenv("BEATS_REGISTRY", str(_registry(tmp_path, srv.url)))
        yield srv


def _cache_files(cache: Path) -> list[str]:
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file())


def test_registry_download_is_converted_once_and_reloads_without_network(
    mirror, tmp_path, waves
):
    cache = tmp_path / "cache"
    first = BEATs.from_pretrained("TINY-FT", cache_dir=cache)  # alias, any case
    assert_same_model(reference_model("finetuned"), first, waves["wav.2"])
    assert len(mirror.gets("/share/finetuned.pt")) == 1
    # The .pt was converted and deleted: the cache holds no pickle to load.
    assert _cache_files(cache) == [
        ".locks/Tiny_finetuned.lock",
        "Tiny_finetuned/config.json", "Tiny_finetuned/labels.json",
        "Tiny_finetuned/model.safetensors", "Tiny_finetuned/source.json",
    ]
    source = json.loads((cache / "Tiny_finetuned" / "source.json").read_text())
    assert source["sha256"] == _sha(FILES["finetuned"]) and source["sha256_verified"] is True
    assert source["size"] == len(FILES["finetuned"])
    assert source["url"] == f"{mirror.url}/share/finetuned.pt"
    mirror.close()  # later loads need no server
    again = BEATs.from_pretrained("Tiny_finetuned", cache_dir=cache)
    assert_same_model(first, again, waves["wav.2"])


def test_default_cache_is_beats_cache_env(mirror, tmp_path, monkeypatch):
    monkeypatch.setenv("BEATS_CACHE", str(tmp_path / "env-cache"))
    BEATs.from_pretrained("default")
    assert (tmp_path / "env-cache" / "Tiny" / "model.safetensors").is_file()
    source = json.loads((tmp_path / "env-cache" / "Tiny" / "source.json").read_text())
    assert source["sha256"] == _sha(FILES["postnorm_gru"])  # recorded though not known
    assert source["sha256_verified"] is False


def test_connection_cut_mid_download_is_resumed(mirror, tmp_path, waves):
    mirror.cuts = 1
    model = BEATs.from_pretrained("Tiny_finetuned", cache_dir=tmp_path / "c")
    gets = mirror.gets("/share/finetuned.pt")
    assert [g.headers.get("Range") for g in gets] == [
        None, f"bytes={len(FILES['finetuned']) // 2}-"
    ]
    assert_same_model(reference_model("finetuned"), model, waves["wav.0"])


def test_wrong_hash_in_registry_deletes_the_download(tmp_path, monkeypatch):
    wrong = "ab" * 32
    with FileServer({"/share/finetuned.pt": FILES["finetuned"]}) as srv:
        registry = _registry(tmp_path, srv.url, Tiny_finetuned={"sha256": wrong})
        monkeypatch.setenv("BEATS_REGISTRY", str(registry))
        with pytest.raises(ChecksumError) as err:
            BEATs.from_pretrained("Tiny_finetuned", cache_dir=tmp_path / "c")
    text = str(err.value)
    assert f"expected {wrong}, got {_sha(FILES['finetuned'])}" in text
    assert "was deleted" in text
    assert _cache_files(tmp_path / "c") == [".locks/Tiny_finetuned.lock"]


def test_offline_with_a_warm_cache(mirror, tmp_path, monkeypatch, waves):
    cache = tmp_path / "c"
    online = BEATs.from_pretrained("Tiny", cache_dir=cache)
    requests = len(mirror.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_same_model(online, BEATs.from_pretrained("Tiny", cache_dir=cache), waves["wav.0"])
    monkeypatch.delenv("HF_HUB_OFFLINE")
    offline = BEATs.from_pretrained("Tiny", cache_dir=cache, local_files_only=True)
    assert_same_model(online, offline, waves["wav.0"])
    assert len(mirror.requests) == requests


@pytest.mark.parametrize("how", ["env", "argument"])
def test_offline_with_a_cold_cache_says_what_is_missing(mirror, tmp_path, monkeypatch, how):
    if how == "env":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as err:
        BEATs.from_pretrained("Tiny", cache_dir=tmp_path / "c", local_files_only=how != "env")
    text = str(err.value)
    assert f"Tiny is not in the beats cache ({tmp_path / 'c' / 'Tiny'})" in text
    assert ("HF_HUB_OFFLINE is set" if how == "env" else "local_files_only=True") in text
    assert f"download {mirror.url}/share/postnorm_gru.pt yourself" in text
    assert "beats convert FILE" in text
    assert mirror.requests == []


def test_tokenizer_entry_is_refused_before_downloading(mirror, tmp_path):
    with pytest.raises(ValueError, match="Tiny_tokenizer is an acoustic tokenizer checkpoint"):
        BEATs.from_pretrained("Tiny_tokenizer", cache_dir=tmp_path)
    assert mirror.requests == []


def test_encoder_entry_is_refused_for_a_tokenizer_class_before_downloading(mirror, tmp_path):
    with pytest.raises(ValueError, match="Tiny is a BEATs encoder checkpoint"):
        BEATsTokenizer.from_pretrained("Tiny", cache_dir=tmp_path)
    assert mirror.requests == []


def test_revision_is_refused_for_registry_names(mirror, tmp_path):
    with pytest.raises(ValueError, match="applies to Hugging Face Hub repos only"):
        BEATs.from_pretrained("Tiny", revision="main", cache_dir=tmp_path)


def test_corrupt_download_is_deleted_and_named(tmp_path, monkeypatch):
    data = FILES["postnorm_gru"][:50000]
    with FileServer({"/share/postnorm_gru.pt": data}) as srv:
        monkeypatch.setenv("BEATS_REGISTRY", str(_registry(tmp_path, srv.url)))
        with pytest.raises(ValueError) as err:
            BEATs.from_pretrained("Tiny", cache_dir=tmp_path / "c")
    text = str(err.value)
    assert "the download of Tiny" in text and "was deleted" in text
    assert "Tiny.pt is truncated or corrupt" in text
    assert _cache_files(tmp_path / "c") == [".locks/Tiny.lock"]


class _Payload:
    marker = ""

    def __reduce__(self):
        return (Path.touch, (Path(_Payload.marker),))


def test_code_carrying_download_is_refused_without_running_it(tmp_path, monkeypatch):
    marker = tmp_path / "code_ran"
    _Payload.marker = str(marker)
    evil = tmp_path / "evil.pt"
    ckpt = torch.load(REFERENCE / "postnorm_gru.pt", weights_only=True)
    torch.save({**ckpt, "x": _Payload()}, evil, pickle_protocol=2)
    with FileServer({"/share/postnorm_gru.pt": evil.read_bytes()}) as srv:
        monkeypatch.setenv("BEATS_REGISTRY", str(_registry(tmp_path, srv.url)))
        with pytest.raises(ValueError, match="would run code") as err:
            BEATs.from_pretrained("Tiny", cache_dir=tmp_path / "c")
    assert "was deleted" in str(err.value)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):
        torch.load(evil, weights_only=True)
    assert not marker.exists()


def test_http_error_names_the_url(tmp_path, monkeypatch):
    with FileServer({}) as srv:
        monkeypatch.setenv("BEATS_REGISTRY", str(_registry(tmp_path, srv.url)))
        with pytest.raises(OSError, match=r"/share/postnorm_gru\.pt answered HTTP 404"):
            BEATs.from_pretrained("Tiny", cache_dir=tmp_path / "c")
