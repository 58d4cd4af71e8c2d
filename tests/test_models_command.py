"""``beats models``: where each checkpoint comes from, ``--import`` of files downloaded by
hand, ``--check`` of every source; and the default model's failure when every mirror
serves other bytes."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import huggingface_hub.constants  # noqa: F401  read now, from conftest's environment
import numpy as np
import pytest

from beats import BEATs, BEATsTokenizer
from beats import registry as reg
from beats.cli import main

from .audio_files import sf_write
from .conftest import REFERENCE, reference_model
from .servers import AZURE_403, FileServer, HubServer, repo_key
from .test_cli import beats_cli
from .test_cli_errors import one_error_line
from .test_save_load import assert_same_model
from .test_sources import BROWSER, PAGE, entry, hf, repo, url, write_registry

ENCODER = (REFERENCE / "postnorm_gru.pt").read_bytes()
TAGGER = (REFERENCE / "finetuned.pt").read_bytes()
TOKENIZER = (REFERENCE / "tokenizer.pt").read_bytes()
TINY_TOKENIZER = {"input_patch_size": 16, "encoder_layers": 3, "encoder_embed_dim": 48,
                  "quant_n": 16, "quant_dim": 8}


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """A registry of the reference checkpoints: one from a mirror, one browser-only, two
    tokenizers without digests; the beats cache in tmp_path/cache."""
    monkeypatch.setenv("BEATS_CACHE", str(tmp_path / "cache"))
    path = write_registry(
        tmp_path / "registry.json",
        entry("Tiny", [hf("nobody/tiny"), BROWSER], ENCODER, default=True),
        entry("Tiny_ft", [BROWSER], TAGGER, kind="fine-tuned"),
        entry("Tiny_tokenizer", [BROWSER], None, kind="tokenizer", architecture=TINY_TOKENIZER),
        entry("Big_tokenizer", [BROWSER], None, kind="tokenizer",
              architecture={**TINY_TOKENIZER, "encoder_layers": 12}),
    )
    monkeypatch.setenv("BEATS_REGISTRY", str(path))
    return tmp_path


def test_import_installs_by_digest_and_works_offline(registry, monkeypatch, capsys, waves):
    downloads = registry / "Downloads"
    downloads.mkdir()
    (downloads / "a.pt").write_bytes(TAGGER)  # the name does not matter, the bytes do
    (downloads / "b.pt").write_bytes(ENCODER)
    assert main(["models", "--import", str(downloads / "a.pt"), str(downloads / "b.pt")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"{downloads / 'a.pt'}: installed as Tiny_ft (sha256 verified) in "
        f"{registry / 'cache' / 'Tiny_ft'}; use it with -m Tiny_ft",
        f"{downloads / 'b.pt'}: installed as Tiny (sha256 verified) in "
        f"{registry / 'cache' / 'Tiny'}; use it with -m Tiny",
    ]
    record = json.loads((registry / "cache" / "Tiny_ft" / "source.json").read_text())
    assert record["verified"] is True and record["sha256"] == hashlib.sha256(TAGGER).hexdigest()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_same_model(reference_model("finetuned"), BEATs.from_pretrained("Tiny_ft"),
                      waves["wav.0"])
    sf_write(registry / "a.wav", seconds=1.0)
    assert main(["tag", str(registry / "a.wav"), "-m", "Tiny_ft", "-k", "2"]) == 0
    assert "a.wav" in capsys.readouterr().out


def test_import_refuses_files_it_cannot_identify_and_writes_nothing(registry, capsys):
    rng = np.random.default_rng(0)
    random = registry / "random.pt"
    random.write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    same_size = registry / "Tiny.pt"
    same_size.write_bytes(bytes(reversed(ENCODER)))
    page = registry / "page.pt"
    page.write_bytes(b"<!DOCTYPE html><html><body>OneDrive</body></html>")
    before = _files(registry)
    expected = {
        random: f"{random} (5000 bytes) matches no checkpoint in the registry "
                f"({registry / 'registry.json'}): none has that size; nothing was written.",
        same_size: f"{same_size} ({len(ENCODER)} bytes, sha256 "
                   f"{hashlib.sha256(same_size.read_bytes()).hexdigest()}) matches no checkpoint "
                   f"in the registry ({registry / 'registry.json'}): it has the size of Tiny but "
                   "other bytes, so it is not that file; nothing was written.",
        page: f"{page} is an HTML page, not a checkpoint: the browser saved the page instead of "
              "the file; nothing was written",
    }
    missing = registry / "missing.pt"
    assert main(["models", "--import", str(missing), str(random)]) == 2
    assert f"no file at {missing}" in capsys.readouterr().err
    for path, message in expected.items():
        assert main(["models", "--import", str(path)]) == 2
        line = one_error_line(capsys.readouterr().err, "models")
        assert line.startswith(f"beats models: error: {message}")
    assert _files(registry) == before  # no cache, no lock, nothing


def test_import_of_a_random_file_with_the_bundled_registry(tmp_path, monkeypatch, capsys):
    random = tmp_path / "BEATs_iter3_plus_AS2M.pt"
    random.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, np.uint8).tobytes())
    monkeypatch.setenv("BEATS_CACHE", str(tmp_path / "cache"))
    assert main(["models", "--import", str(random)]) == 2
    line = one_error_line(capsys.readouterr().err, "models")
    assert f"{random} (4096 bytes) matches no checkpoint in the registry" in line
    assert _files(tmp_path) == ["BEATs_iter3_plus_AS2M.pt"]


def test_import_by_name_only_for_unpinned_entries_and_by_structure(registry, capsys, waves):
    tokenizer, encoder = registry / "tok.pt", registry / "enc.pt"
    tokenizer.write_bytes(TOKENIZER)
    encoder.write_bytes(ENCODER)
    refusals = [
        (["--import", str(encoder), "--name", "Tiny"], "Tiny has a pinned sha256, so its file is "
         "identified by size and digest: import it without --name"),
        (["--import", str(encoder), "--name", "Tiny_tokenizer"], f"{encoder} cannot be installed "
         f"as Tiny_tokenizer: {encoder} is a BEATs encoder checkpoint without the tokenizer's "
         "quantizer"),
        (["--import", str(tokenizer), "--name", "Big_tokenizer"], f"{tokenizer} is not "
         "Big_tokenizer: encoder_layers is 3, Big_tokenizer has 12; nothing was written"),
        (["--import", str(tokenizer), "--name", "Tiny_tokeniser"], "--name 'Tiny_tokeniser' is not "
         "a registered checkpoint. Did you mean: Tiny_tokenizer, Big_tokenizer?"),
        (["--import", str(tokenizer), str(encoder), "--name", "Tiny_tokenizer"], "--name names "
         "one file, and 2 were given"),
        (["--name", "Tiny_tokenizer"], "--name goes with --import FILE"),
    ]
    for args, message in refusals:
        assert main(["models", *args]) == 2
        assert one_error_line(capsys.readouterr().err, "models").startswith(
            f"beats models: error: {message}")
    assert not (registry / "cache").exists()
    assert main(["models", "--import", str(tokenizer), "--name", "Tiny_tokenizer"]) == 0
    assert capsys.readouterr().out == (
        f"{tokenizer}: installed as Tiny_tokenizer (unverified: no digest is known, its structure "
        f"was checked) in {registry / 'cache' / 'Tiny_tokenizer'}; use it with -m Tiny_tokenizer\n")
    loaded = BEATsTokenizer.from_pretrained("Tiny_tokenizer", local_files_only=True)
    reference = BEATsTokenizer.from_pretrained(REFERENCE / "tokenizer.pt")
    assert all((a == b).all() for a, b in zip(loaded.state_dict().values(),
                                              reference.state_dict().values(), strict=True))
    record = json.loads((registry / "cache" / "Tiny_tokenizer" / "source.json").read_text())
    assert record["verified"] is False and record["sha256"] == hashlib.sha256(TOKENIZER).hexdigest()


def test_models_table_says_where_each_comes_from(registry, capsys):
    (registry / "ft.pt").write_bytes(TAGGER)
    (registry / "tok.pt").write_bytes(TOKENIZER)
    assert main(["models", "--import", str(registry / "ft.pt")]) == 0
    assert main(["models", "--import", str(registry / "tok.pt"), "--name", "Tiny_tokenizer"]) == 0
    capsys.readouterr()
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split() for line in lines[:5]] == [
        ["NAME", "KIND", "DEFAULT", "CACHED", "VERIFIED", "SOURCE", "DIGEST", "ALIASES"],
        ["Tiny", "pretrained", "*", "no", "-", "mirror", "pinned", "default"],
        ["Tiny_ft", "fine-tuned", "yes", "yes", "browser", "pinned"],
        ["Tiny_tokenizer", "tokenizer", "yes", "no", "browser", "none"],
        ["Big_tokenizer", "tokenizer", "no", "-", "browser", "none"],
    ]
    assert f"4 checkpoints, 2 cached in {registry / 'cache'}" in lines
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["models"]}
    assert rows["Tiny_ft"]["browser_page"] == PAGE
    assert rows["Tiny"]["sources"][0] == {"type": "huggingface", "repo_id": "nobody/tiny",
                                          "repo_type": "model", "filename": "Tiny.pt"}
    assert (rows["Tiny_tokenizer"]["cached"], rows["Tiny_tokenizer"]["verified"]) == (True, False)


def test_check_probes_every_source_without_downloading(tmp_path, monkeypatch, capsys):
    with HubServer() as hub, FileServer({"/Tiny.pt": ENCODER},
                                        pages={"/azure.pt": AZURE_403}) as web:
        good, moved = repo(), repo()
        hub.commit(good, {"Tiny.pt": ENCODER}, repo_type="dataset")
        hub.commit(moved, {"Tiny.pt": bytes(reversed(ENCODER))})
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        answering = entry("Tiny", [hf(good, repo_type="dataset"), url(web.url + "/Tiny.pt"),
                                   BROWSER])
        dead = entry("Dead", [hf(moved), hf(repo()), url(web.url + "/azure.pt"), BROWSER])
        unpinned = entry("Tok", [hf(good, "Tok.pt", repo_type="dataset"), BROWSER], None,
                         kind="tokenizer")
        monkeypatch.setenv("BEATS_REGISTRY", str(write_registry(
            tmp_path / "r.json", answering, dead, unpinned, entry("Paged", [BROWSER]))))
        assert main(["models", "--check"]) == 1
        out = capsys.readouterr().out.splitlines()
        monkeypatch.setenv("BEATS_REGISTRY", str(write_registry(tmp_path / "ok.json", answering)))
        assert main(["models", "--check"]) == 0
        assert capsys.readouterr().out.splitlines()[-1] == (
            "1 of 1 checkpoints with a scripted source answer. 0 need a browser and --import.")
        methods = {(r.method, r.headers.get("Range")) for r in web.requests}
        hub_methods = {r.method for r in hub.requests}
        cdn = hub.cdn.requests
    size, other = len(ENCODER), hashlib.sha256(bytes(reversed(ENCODER))).hexdigest()
    commit = hub.repos[repo_key(good, "dataset")].refs["main"][:12]
    missing = dead["sources"][1]["repo_id"]
    assert out[0] == f"Hugging Face endpoint: {hub.url}"
    assert out[1:] == [
        "Tiny",
        f"  ok    {good} (Hugging Face dataset, main) Tiny.pt: {size} bytes, commit {commit}, "
        "sha256 as pinned",
        f"  ok    {web.url}/Tiny.pt: HTTP 206, {size} bytes",
        f"  -     {PAGE} (browser only): not probed",
        "Dead",
        f"  FAIL  {moved} (Hugging Face, main) Tiny.pt: {size} bytes, commit "
        f"{hub.repos[moved].refs['main'][:12]}: sha256 {other} is not the pinned one",
        f"  FAIL  {missing} (Hugging Face, main) Tiny.pt: HTTP 404 RepoNotFound (a private or "
        "gated repo needs HF_TOKEN)",
        f"  FAIL  {web.url}/azure.pt: HTTP 403 AuthenticationFailed",
        f"  -     {PAGE} (browser only): not probed",
        "Tok (no pinned digest: not downloaded)",
        f"  FAIL  {good} (Hugging Face dataset, main) Tok.pt: HTTP 404 EntryNotFound",
        f"  -     {PAGE} (browser only): not probed",
        "Paged",
        f"  -     {PAGE} (browser only): not probed",
        "",
        "1 of 2 checkpoints with a scripted source answer; unreachable: Dead. 2 need a browser "
        "and --import.",
    ]
    assert methods == {("GET", "bytes=0-0")} and hub_methods == {"HEAD"} and cdn == []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["models", "--check"]) == 2
    assert "downloads are off (HF_HUB_OFFLINE is set)" in capsys.readouterr().err


def test_default_model_refused_when_every_mirror_serves_other_bytes(tmp_path):
    """The bundled registry's default encoder, its mirrors on a local Hub (HF_ENDPOINT), each
    serving a file of the right size but other bytes; one Hub even lists the pinned sha256."""
    default = reg.default_model()
    mirrors = [s for s in default.scripted_sources if s.type == "huggingface"]
    assert len(mirrors) >= 2
    other = bytes(default.size)  # the right size, all zeros
    with HubServer() as hub:
        for source in mirrors:
            hub.commit(source.repo_id, {source.filename: other}, repo_type=source.repo_type,
                       sha=source.revision)  # the pinned commit (or a new one on main)
        first = mirrors[0]
        hub.listed_sha256[(repo_key(first.repo_id, first.repo_type), first.filename)] = \
            default.sha256  # metadata that matches, bytes that do not: found after download
        sf_write(tmp_path / "a.wav", seconds=1.0)
        done = beats_cli("extract", str(tmp_path / "a.wav"), "-o", str(tmp_path / "out"),
                         HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"),
                         BEATS_CACHE=str(tmp_path / "beats"))
        downloaded = [r for r in hub.cdn.requests if r.method == "GET"]
    assert done.returncode == 2
    line = one_error_line(done.stderr, "extract")
    assert line.startswith(f"beats extract: error: cannot download {default.name}; every source "
                           "failed: tried ")
    assert line.count("sha256 mismatch") == len(mirrors)
    assert f"Open {default.browser_page} in a browser, download {default.name}.pt, then run " \
           "`beats models --import FILE`" in line
    assert len(downloaded) == 1  # the others were refused from the Hub's listing
    big = [p for p in tmp_path.rglob("*") if p.is_file() and p.stat().st_size > 1 << 20]
    assert big == []  # no copy of those bytes in the Hugging Face cache or the beats cache
    assert [p for p in (tmp_path / "hf").rglob("*") if p.parent.name == "blobs"] == []
    assert (tmp_path / "hf" / "hub" / f"models--{first.repo_id.replace('/', '--')}").is_dir()
    assert os.listdir(tmp_path / "beats") == [".locks"]
