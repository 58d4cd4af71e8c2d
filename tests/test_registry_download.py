"""Registry names: download from a local server, convert once into the cache, offline use.

The registries here are format 1 (a ``urls`` list per entry, as ``BEATS_REGISTRY`` files
written for earlier versions are): they still load and download, verified.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import huggingface_hub.constants  # noqa: F401  read now, from conftest's environment
import pytest
import torch

from beats import BEATs, BEATsTokenizer
from beats.sources import NotCachedError, SourcesFailed

from .conftest import REFERENCE, reference_model
from .servers import FileServer
from .test_save_load import assert_same_model

FILES = {name: (REFERENCE / f"{name}.pt").read_bytes()
         for name in ("finetuned", "postnorm_gru", "tokenizer")}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _registry(tmp_path: Path, url: str, **overrides) -> Path:
    """A format-1 registry of the reference checkpoints served at ``url``, digests pinned."""
    def entry(name, file, kind, **kw):
        return {"name": name, "kind": kind, "urls": [f"{url}/share/{file}.pt?sig=x"],
                "sha256": _sha(FILES[file]), "size": len(FILES[file]), "license": "MIT",
                "description": "test", **kw, **overrides.get(name, {})}

    models = [
        entry("Tiny_finetuned", "finetuned", "fine-tuned", aliases=["tiny-ft"]),
        entry("Tiny", "postnorm_gru", "pretrained", default=True),
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
    assert source["sha256"] == _sha(FILES["finetuned"]) and source["verified"] is True
    assert source["size"] == len(FILES["finetuned"])
    assert source["source"] == f"{mirror.url}/share/finetuned.pt"  # no signature
    mirror.close()  # later loads need no server
    again = BEATs.from_pretrained("Tiny_finetuned", cache_dir=cache)
    assert_same_model(first, again, waves["wav.2"])


def test_default_cache_is_beats_cache_env(mirror, tmp_path, monkeypatch):
    monkeypatch.setenv("BEATS_CACHE", str(tmp_path / "env-cache"))
    BEATs.from_pretrained("default")
    assert (tmp_path / "env-cache" / "Tiny" / "model.safetensors").is_file()
    source = json.loads((tmp_path / "env-cache" / "Tiny" / "source.json").read_text())
    assert source["sha256"] == _sha(FILES["postnorm_gru"]) and source["verified"] is True


def test_entry_without_a_pinned_digest_is_never_downloaded(tmp_path, monkeypatch):
    with FileServer({"/share/postnorm_gru.pt": FILES["postnorm_gru"]}) as srv:
        registry = _registry(tmp_path, srv.url, Tiny={"sha256": None, "size": None})
        monkeypatch.setenv("BEATS_REGISTRY", str(registry))
        with pytest.raises(SourcesFailed) as err:
            BEATs.from_pretrained("Tiny", cache_dir=tmp_path / "c")
        assert srv.requests == []
    assert str(err.value) == (
        "Tiny has no pinned sha256 in the registry, so beats does not download it (a file from "
        "a mirror is trusted only through its digest). Get Tiny.pt by other means, then run "
        "`beats models --import FILE --name Tiny` (no digest is known: its structure is "
        "checked and it is marked unverified)")
    assert not (tmp_path / "c").exists()


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
        with pytest.raises(SourcesFailed) as err:
            BEATs.from_pretrained("Tiny_finetuned", cache_dir=tmp_path / "c")
    assert str(err.value).splitlines() == [
        "cannot download Tiny_finetuned; every source failed:",
        f"  tried {srv.url}/share/finetuned.pt: sha256 mismatch: got "
        f"{_sha(FILES['finetuned'])}, the registry pins {wrong};",
        "Get Tiny_finetuned.pt by other means, then run `beats models --import FILE` (the "
        "file is checked against the pinned sha256)",
    ]
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
    assert isinstance(err.value, NotCachedError)
    lines = str(err.value).splitlines()
    reason = "HF_HUB_OFFLINE is set" if how == "env" else "local_files_only=True"
    assert lines[0].startswith(f"Tiny is not in the beats cache ({tmp_path / 'c' / 'Tiny'}) "
                               f"and downloads are off ({reason})")
    assert lines[1] == f"  tried {mirror.url}/share/postnorm_gru.pt: not tried, downloads are off;"
    assert lines[2] == ("Run once with network access, or: Get Tiny.pt by other means, then run "
                        "`beats models --import FILE` (the file is checked against the pinned "
                        "sha256)")
    assert "yourself" not in str(err.value)  # no address is offered as advice
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
    data = FILES["postnorm_gru"][:50000]  # a registry that pins a broken file
    with FileServer({"/share/postnorm_gru.pt": data}) as srv:
        pinned = {"sha256": _sha(data), "size": len(data)}
        monkeypatch.setenv("BEATS_REGISTRY", str(_registry(tmp_path, srv.url, Tiny=pinned)))
        with pytest.raises(ValueError) as err:
            BEATs.from_pretrained("Tiny", cache_dir=tmp_path / "c")
    text = str(err.value)
    assert text.startswith(f"the file of Tiny from {srv.url}/share/postnorm_gru.pt matches the "
                           "pinned sha256 but cannot be used, and was deleted: ")
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
    data = evil.read_bytes()
    with FileServer({"/share/postnorm_gru.pt": data}) as srv:
        pinned = {"sha256": _sha(data), "size": len(data)}  # even a pinned file is not run
        monkeypatch.setenv("BEATS_REGISTRY", str(_registry(tmp_path, srv.url, Tiny=pinned)))
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
        with pytest.raises(OSError, match=r"tried .*/share/postnorm_gru\.pt: HTTP 404 Not Found;"):
            BEATs.from_pretrained("Tiny", cache_dir=tmp_path / "c")
