"""A checkpoint's sources tried in order: a Hub-compatible server reached through HF_ENDPOINT
(with the Hub's headers, LFS redirects and pinned revisions) and plain URL servers, all on
127.0.0.1. Each failing source gets its line; a failure leaves nothing in either cache."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from pathlib import Path

import huggingface_hub.constants  # read now, from conftest's environment
import pytest

from beats import BEATs, BEATsTokenizer
from beats.mirrors import hub_cache
from beats.sources import NotCachedError, SourcesFailed

from .conftest import REFERENCE, reference_model
from .servers import AZURE_403, HTML_PAGE, FileServer, HubServer, repo_key
from .test_save_load import assert_same_model

GOOD = (REFERENCE / "postnorm_gru.pt").read_bytes()
SHA = hashlib.sha256(GOOD).hexdigest()
OTHER = bytes(reversed(GOOD))  # the right size, other bytes
PAGE = "https://1drv.ms/u/s!test-page-never-fetched"
PINNED = "5b53b0404df452a3a607d7e67687227730e5bad1"
_IDS = itertools.count()


def repo(name: str = "beats") -> str:
    """A repo id no other test uses (the Hugging Face cache lives for the whole session)."""
    return f"mirror{os.getpid()}x{next(_IDS)}/{name}"


def hf(repo_id: str, filename: str = "Tiny.pt", revision: str | None = None,
       repo_type: str = "model") -> dict:
    return {"type": "huggingface", "repo_id": repo_id, "repo_type": repo_type,
            "filename": filename, "revision": revision}


def url(address: str) -> dict:
    return {"type": "url", "url": address}


BROWSER = {"type": "browser", "url": PAGE}


def write_registry(path: Path, *entries: dict) -> Path:
    path.write_text(json.dumps({"format_version": 2, "models": list(entries)}))
    return path


def entry(name: str, sources: list[dict], data: bytes | None = GOOD, kind: str = "pretrained",
          **kw) -> dict:
    """A format-2 entry pinned to ``data``'s size and sha256 (None: no digest)."""
    pinned = {"sha256": None, "size": None} if data is None else {
        "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    return {"name": name, "kind": kind, **pinned, "sources": sources, **kw}


def hub_folder(repo_id: str, repo_type: str = "model") -> Path:
    return hub_cache() / f"{repo_type}s--{repo_id.replace('/', '--')}"


def bytes_left(*roots: Path) -> list[str]:
    """Files that hold data: anything but locks, refs, markers (empty) and CACHEDIR.TAG."""
    return sorted(str(p) for root in roots if root.exists() for p in root.rglob("*")
                  if p.is_file() and p.stat().st_size > 0 and "refs" not in p.parts
                  and p.name != "CACHEDIR.TAG")


@pytest.fixture
def hub(monkeypatch):
    """A fresh Hub-compatible server, the endpoint huggingface_hub uses (HF_ENDPOINT)."""
    with HubServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def test_sources_are_tried_in_order_until_a_verified_file(hub, tmp_path, monkeypatch, waves,
                                                          caplog):
    missing, pinned = repo(), repo()
    hub.commit(missing, {"README.md": b"no checkpoint here"})
    hub.commit(pinned, {"Tiny.pt": GOOD}, branch=None, sha=PINNED)  # the pinned commit
    hub.commit(pinned, {"Tiny.pt": OTHER})  # main moved on to other bytes
    pages = {"/share/Tiny.pt": AZURE_403, "/page/Tiny.pt": HTML_PAGE}
    with FileServer({}, pages=pages) as web:
        sources = [hf(missing), url(web.url + "/share/Tiny.pt?sig=old"),
                   url(web.url + "/page/Tiny.pt"), hf(pinned, revision=PINNED), BROWSER]
        monkeypatch.setenv("BEATS_REGISTRY",
                           str(write_registry(tmp_path / "r.json", entry("Tiny", sources))))
        monkeypatch.setenv("HF_TOKEN", "hf_secret")
        caplog.set_level(logging.WARNING, logger="beats.sources")
        model = BEATs.from_pretrained("Tiny", cache_dir=tmp_path / "beats")
        web_auth = [r.headers.get("Authorization") for r in web.requests]
    assert_same_model(reference_model("postnorm_gru"), model, waves["wav.0"])
    # the order of tries, and what each was asked
    assert [(r.method, r.path.split("/resolve/")[-1]) for r in hub.requests] == [
        ("HEAD", "main/Tiny.pt"), (("HEAD", f"{PINNED}/Tiny.pt")), ("HEAD", f"{PINNED}/Tiny.pt")]
    assert [r.method for r in hub.cdn.requests] == ["GET"]
    assert all(r.headers.get("authorization") == "Bearer hf_secret" for r in hub.requests)
    assert web_auth == [None, None]  # the Hub token never goes to another address
    assert [r.getMessage() for r in caplog.records] == [
        f"Tiny: could not use {missing} (Hugging Face, main) Tiny.pt: HTTP 404 EntryNotFound; "
        f"got the file from {pinned} (Hugging Face, {PINNED[:12]}) Tiny.pt",
        f"Tiny: could not use {web.url}/share/Tiny.pt: HTTP 403 AuthenticationFailed; got the "
        f"file from {pinned} (Hugging Face, {PINNED[:12]}) Tiny.pt",
        f"Tiny: could not use {web.url}/page/Tiny.pt: an HTML page (text/html), not a "
        f"checkpoint; got the file from {pinned} (Hugging Face, {PINNED[:12]}) Tiny.pt",
    ]
    record = json.loads((tmp_path / "beats" / "Tiny" / "source.json").read_text())
    assert record["verified"] is True and record["sha256"] == SHA
    assert record["source"] == f"{pinned} (Hugging Face, {PINNED[:12]}) Tiny.pt at commit {PINNED}"
    # the Hub's copy stays in the Hub cache, as every Hub download does; beats keeps no .pt
    snapshot = hub_folder(pinned) / "snapshots" / PINNED / "Tiny.pt"
    assert snapshot.read_bytes() == GOOD
    assert not list((tmp_path / "beats").rglob("*.pt"))


def test_every_kind_of_failure_gets_its_line_and_leaves_nothing(hub, tmp_path, monkeypatch):
    honest, lying, short = repo(), repo(), repo()
    hub.commit(honest, {"Tiny.pt": OTHER})  # the Hub lists the sha256 of those other bytes
    hub.commit(lying, {"Tiny.pt": OTHER}, repo_type="dataset")
    hub.listed_sha256[(repo_key(lying, "dataset"), "Tiny.pt")] = SHA  # ... or lists the pinned
    hub.commit(short, {"Tiny.pt": GOOD[:1000]})
    half = len(GOOD) // 2
    files = {"/wrong.pt": OTHER, "/short.pt": GOOD[:1000]}
    with FileServer(files, pages={"/azure.pt": AZURE_403, "/page.pt": HTML_PAGE}) as web, \
            FileServer({"/cut.pt": GOOD}, cut_at=half) as flaky:
        sources = [hf(honest), hf(lying, repo_type="dataset"), hf(short),
                   url(web.url + "/wrong.pt"), url(web.url + "/short.pt"),
                   url(flaky.url + "/cut.pt"), url(web.url + "/azure.pt"),
                   url(web.url + "/page.pt"), BROWSER]
        monkeypatch.setenv("BEATS_REGISTRY",
                           str(write_registry(tmp_path / "r.json", entry("Tiny", sources))))
        with pytest.raises(SourcesFailed) as err:
            BEATs.from_pretrained("Tiny", cache_dir=tmp_path / "beats")
    other = hashlib.sha256(OTHER).hexdigest()
    assert str(err.value).splitlines() == [
        "cannot download Tiny; every source failed:",
        f"  tried {honest} (Hugging Face, main) Tiny.pt: sha256 mismatch: the Hub lists {other}, "
        f"the registry pins {SHA}; nothing was downloaded;",
        f"  tried {lying} (Hugging Face dataset, main) Tiny.pt: sha256 mismatch: got {other}, the "
        f"registry pins {SHA}; the file was deleted from the Hugging Face cache;",
        f"  tried {short} (Hugging Face, main) Tiny.pt: wrong size: the Hub lists 1000 bytes, the "
        f"registry pins {len(GOOD)}; nothing was downloaded;",
        f"  tried {web.url}/wrong.pt: sha256 mismatch: got {other}, the registry pins {SHA};",
        f"  tried {web.url}/short.pt: wrong size: the server announces 1000 bytes, the registry "
        f"pins {len(GOOD)};",
        f"  tried {flaky.url}/cut.pt: connection cut after {half} of {len(GOOD)} bytes;",
        f"  tried {web.url}/azure.pt: HTTP 403 AuthenticationFailed;",
        f"  tried {web.url}/page.pt: an HTML page (text/html), not a checkpoint;",
        f"Open {PAGE} in a browser, download Tiny.pt, then run `beats models --import FILE` (the "
        "file is checked against the pinned sha256)",
    ]
    assert [r.method for r in hub.cdn.requests] == ["GET"]  # only the lying mirror's file came
    assert bytes_left(tmp_path / "beats", hub_folder(honest), hub_folder(lying, "dataset"),
                      hub_folder(short)) == []
    assert hub_folder(lying, "dataset").is_dir()  # it was there, and its bytes are gone
    assert sorted(p.name for p in (tmp_path / "beats").iterdir()) == [".locks"]


def test_an_unreachable_hub_falls_through_to_the_next_source(tmp_path, monkeypatch, caplog):
    dead = HubServer()
    dead.close()  # nothing listens there: the Hub is offline
    monkeypatch.setenv("HF_ENDPOINT", dead.url)
    mirror = repo()
    with FileServer({"/Tiny.pt": GOOD}) as web:
        for sources, name in (([hf(mirror), url(web.url + "/Tiny.pt")], "Tiny"),
                              ([hf(mirror), BROWSER], "Tiny2")):
            path = write_registry(tmp_path / f"{name}.json", entry(name, sources))
            monkeypatch.setenv("BEATS_REGISTRY", str(path))
            caplog.set_level(logging.WARNING, logger="beats.sources")
            if name == "Tiny":
                BEATs.from_pretrained(name, cache_dir=tmp_path / "beats")
                continue
            with pytest.raises(SourcesFailed) as err:
                BEATs.from_pretrained(name, cache_dir=tmp_path / "beats")
    warning, = [r.getMessage() for r in caplog.records]
    assert warning.startswith(f"Tiny: could not use {mirror} (Hugging Face, main) Tiny.pt: the "
                              f"Hub ({dead.url}) did not answer: not reachable (")
    assert warning.endswith(f"and the file is not in the Hugging Face cache; got the file from "
                            f"{web.url}/Tiny.pt")
    line = str(err.value).splitlines()[1]
    assert line.startswith(f"  tried {mirror} (Hugging Face, main) Tiny.pt: the Hub ({dead.url}) "
                           "did not answer: not reachable (")
    assert (tmp_path / "beats" / "Tiny" / "model.safetensors").is_file()
    assert not (tmp_path / "beats" / "Tiny2").exists()


def test_hf_hub_offline_uses_a_verified_copy_in_the_hub_cache(hub, tmp_path, monkeypatch, waves):
    warm, cold = repo(), repo()
    for name in (warm, cold):
        hub.commit(name, {"Tiny.pt": GOOD})
    sources = [hf(cold), hf(warm, revision="main"), BROWSER]
    monkeypatch.setenv("BEATS_REGISTRY", str(write_registry(
        tmp_path / "r.json", entry("Tiny", sources), entry("Cold", [hf(cold), BROWSER]))))
    huggingface_hub.hf_hub_download(warm, "Tiny.pt", endpoint=hub.url)  # by anything, earlier
    seen = len(hub.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = BEATs.from_pretrained("Tiny", cache_dir=tmp_path / "beats")
    assert_same_model(reference_model("postnorm_gru"), model, waves["wav.1"])
    assert len(hub.requests) == seen  # not one request
    record = json.loads((tmp_path / "beats" / "Tiny" / "source.json").read_text())
    assert record["source"].startswith(f"{warm} (Hugging Face, main) Tiny.pt at commit ")
    # cold everywhere: says what is missing and the way out, and asks nobody
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(NotCachedError) as err:
        BEATs.from_pretrained("Cold", cache_dir=tmp_path / "beats", local_files_only=True)
    lines = str(err.value).splitlines()
    assert lines[0] == (f"Cold is not in the beats cache ({tmp_path / 'beats' / 'Cold'}) and "
                        "downloads are off (local_files_only=True); no verified copy is in the "
                        f"Hugging Face cache ({hub_cache()}) either.")
    assert lines[1] == (f"  tried {cold} (Hugging Face, main) Tiny.pt: not in the Hugging Face "
                        "cache;")
    assert lines[-1].startswith(f"Run once with network access, or: Open {PAGE} in a browser")
    assert len(hub.requests) == seen


def test_a_wrong_copy_in_the_hub_cache_is_deleted_when_used(hub, tmp_path, monkeypatch):
    mirror = repo()
    hub.commit(mirror, {"Tiny.pt": OTHER}, sha=PINNED)
    snapshot = Path(huggingface_hub.hf_hub_download(mirror, "Tiny.pt", revision=PINNED,
                                                    endpoint=hub.url))
    blob = snapshot.resolve()
    assert blob.read_bytes() == OTHER and blob != snapshot
    monkeypatch.setenv("BEATS_REGISTRY", str(write_registry(
        tmp_path / "r.json", entry("Tiny", [hf(mirror, revision=PINNED), BROWSER]))))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # so the cached copy is what beats checks
    with pytest.raises(SourcesFailed) as err:
        BEATs.from_pretrained("Tiny", cache_dir=tmp_path / "beats")
    assert (f"sha256 mismatch: got {hashlib.sha256(OTHER).hexdigest()}, the registry pins {SHA}; "
            "the file was deleted from the Hugging Face cache;") in str(err.value)
    assert not snapshot.exists() and not blob.exists()
    assert bytes_left(hub_folder(mirror), tmp_path / "beats") == []


def test_checkpoints_without_a_scripted_source_are_never_fetched(hub, tmp_path, monkeypatch):
    mirror = repo()
    hub.commit(mirror, {"Tiny_tokenizer.pt": (REFERENCE / "tokenizer.pt").read_bytes()})
    monkeypatch.setenv("BEATS_REGISTRY", str(write_registry(
        tmp_path / "r.json",
        entry("Tiny_tokenizer", [hf(mirror, "Tiny_tokenizer.pt"), BROWSER], data=None,
              kind="tokenizer"),
        entry("Tiny_browser", [BROWSER]),
    )))
    with pytest.raises(SourcesFailed) as unpinned:
        BEATsTokenizer.from_pretrained("Tiny_tokenizer", cache_dir=tmp_path / "beats")
    with pytest.raises(SourcesFailed) as browser:
        BEATs.from_pretrained("Tiny_browser", cache_dir=tmp_path / "beats")
    assert str(unpinned.value) == (
        "Tiny_tokenizer has no pinned sha256 in the registry, so beats does not download it (a "
        f"file from a mirror is trusted only through its digest). Open {PAGE} in a browser, "
        "download Tiny_tokenizer.pt, then run `beats models --import FILE --name Tiny_tokenizer` "
        "(no digest is known: its structure is checked and it is marked unverified)")
    assert str(browser.value) == (
        "Tiny_browser has no source beats can download from: Microsoft publishes it on a "
        f"OneDrive page that opens in a browser but not to scripts. Open {PAGE} in a browser, "
        "download Tiny_browser.pt, then run `beats models --import FILE` (the file is checked "
        "against the pinned sha256)")
    assert hub.requests == [] and not (tmp_path / "beats").exists()
