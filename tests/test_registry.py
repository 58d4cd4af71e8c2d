"""The bundled registry of released checkpoints, name lookup and its errors."""

from __future__ import annotations

import json

import pytest

from beats import BEATs, available_models
from beats import registry as reg

FT_CPT2 = "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2"


def test_bundled_registry_holds_the_released_files():
    entries = {e.name: e for e in reg.load_registry()}
    assert len(entries) == 19
    kinds = [e.kind for e in entries.values()]
    assert [kinds.count(k) for k in ("pretrained", "fine-tuned", "tokenizer")] == [5, 10, 4]
    for e in entries.values():
        assert e.license == "MIT"
        assert e.description and "\n" not in e.description
        assert e.pinned == (e.kind != "tokenizer")  # no digest is known for the tokenizers
        pages = [s for s in e.sources if s.type == "browser"]
        assert len(pages) == 1 and pages[0].url.startswith("https://1drv.ms/u/s!")
        assert e.sources[-1] == pages[0]  # the browser page comes last
        assert e.urls == ()  # no plain address: Microsoft's Azure links are withdrawn
    assert [e.name for e in entries.values() if e.default] == ["BEATs_iter3_plus_AS2M"]
    assert reg.default_model().name == "BEATs_iter3_plus_AS2M"
    scripted = sorted(e.name for e in entries.values() if e.scripted_sources)
    assert scripted == ["BEATs_iter3", "BEATs_iter3_finetuned_on_AS2M_cpt1",
                        "BEATs_iter3_plus_AS2M", FT_CPT2]
    # the tokenizer's mirror is listed, but nothing unpinned is fetched by beats
    tokenizer = entries["Tokenizer_iter3_plus_AS2M"]
    assert tokenizer.sources[0].repo_id == "AustinZhang/resp-agent-models"
    assert tokenizer.scripted_sources == ()
    assert tokenizer.architecture == {"input_patch_size": 16, "encoder_layers": 12,
                                      "encoder_embed_dim": 768, "quant_n": 1024, "quant_dim": 256}


def test_bundled_registry_no_longer_names_the_withdrawn_azure_links():
    text = reg.registry_path().read_text()
    assert "valid until 2033" not in text and "2033" not in text
    assert "blob.core.windows.net" not in text


def test_available_models():
    names = available_models()
    assert names[0] == "BEATs_iter1" and "Tokenizer_iter3_plus_AS2M" in names
    assert available_models("tokenizer") == [
        "Tokenizer_iter2", "Tokenizer_iter3", "Tokenizer_iter3_plus_AS20K",
        "Tokenizer_iter3_plus_AS2M",
    ]
    assert len(available_models("fine-tuned")) == 10
    with pytest.raises(ValueError, match="kind must be one of"):
        available_models("finetuned")


@pytest.mark.parametrize("query, name", [
    ("BEATs_iter3_plus_AS2M", "BEATs_iter3_plus_AS2M"),
    ("beats_iter3_plus_as2m", "BEATs_iter3_plus_AS2M"),
    ("iter3+", "BEATs_iter3_plus_AS2M"),
    ("AS2M", "BEATs_iter3_plus_AS2M"),
    ("default", "BEATs_iter3_plus_AS2M"),
    ("as2m-cpt2", FT_CPT2),
    ("beats_ITER3_plus_as2m_finetuned_on_as2m_CPT2", FT_CPT2),
    ("iter1-cpt1", "BEATs_iter1_finetuned_on_AS2M_cpt1"),
    ("tokenizer", "Tokenizer_iter3_plus_AS2M"),
])
def test_names_and_aliases_resolve_in_any_case(query, name):
    assert reg.find(query).name == name


def test_unknown_name_lists_close_matches():
    assert reg.find("BEATs_iter3_plus_AS2") is None
    with pytest.raises(ValueError) as err:
        BEATs.from_pretrained("BEATs_iter3_plus_AS2")
    text = str(err.value)
    assert "unknown model 'BEATs_iter3_plus_AS2'" in text
    assert "Did you mean: BEATs_iter3_plus_AS2M" in text
    assert "beats models" in text


def test_unknown_name_without_matches_names_the_default():
    with pytest.raises(ValueError, match="The default is BEATs_iter3_plus_AS2M"):
        BEATs.from_pretrained("zzzz")


def test_alias_typo_suggests_alias_with_its_name():
    assert reg.close_matches("as2m-cpt3")[0] in (
        "as2m-cpt2 (BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2)",
        "as2m-cpt1 (BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt1)",
    )


def _write(tmp_path, models, version=1):
    path = tmp_path / "registry.json"
    path.write_text(json.dumps({"format_version": version, "models": models}))
    return path


def _model(name, **kw):
    return {"name": name, "kind": "pretrained", "urls": [f"http://127.0.0.1:9/{name}.pt"],
            "sha256": None, "size": None, "license": "MIT", "description": "d", **kw}


def _model2(name, **kw):
    return {"name": name, "kind": "pretrained", "sha256": "ab" * 32, "size": 10,
            "sources": [{"type": "browser", "url": "https://example.org/page"}], **kw}


def test_registry_override_by_environment(tmp_path, monkeypatch):
    path = _write(tmp_path, [_model("Mine", default=True, aliases=["m"])])
    monkeypatch.setenv("BEATS_REGISTRY", str(path))
    assert available_models() == ["Mine"]
    assert reg.find("M").name == "Mine"
    assert reg.registry_path() == path


def test_format_1_urls_become_url_sources(tmp_path):
    entry, = reg.load_registry(_write(tmp_path, [_model("A", sha256="cd" * 32)]))
    assert entry.sources == (reg.Source(type="url", url="http://127.0.0.1:9/A.pt"),)
    assert entry.scripted_sources == entry.sources and entry.pinned and entry.size is None
    unpinned, = reg.load_registry(_write(tmp_path, [_model("B")]))
    assert unpinned.scripted_sources == ()  # never fetched without a digest


def test_format_2_sources_in_order(tmp_path):
    sources = [
        {"type": "huggingface", "repo_id": "a/b", "repo_type": "dataset", "filename": "x/A.pt",
         "revision": "0123456789abcdef0123456789abcdef01234567", "note": "cited"},
        {"type": "url", "url": "https://example.org/A.pt?sig=secret"},
        {"type": "huggingface", "repo_id": "c/d", "filename": "A.pt", "revision": None},
        {"type": "browser", "url": "https://example.org/share"},
    ]
    entry, = reg.load_registry(_write(tmp_path, [_model2("A", sources=sources)], version=2))
    assert [s.type for s in entry.sources] == ["huggingface", "url", "huggingface", "browser"]
    assert [s.label() for s in entry.sources] == [
        "a/b (Hugging Face dataset, 0123456789ab) x/A.pt", "https://example.org/A.pt",
        "c/d (Hugging Face, main) A.pt", "https://example.org/share (browser only)"]
    assert entry.scripted_sources == entry.sources[:3]
    assert entry.browser_page == "https://example.org/share"


@pytest.mark.parametrize("models, message", [
    ([_model("A", aliases=["x"]), _model("B", aliases=["X"])], "alias 'X' is used twice"),
    ([_model("A", default=True), _model("B", default=True)], "more than one default"),
    ([_model("A", sha256="abc")], "64 lowercase hex"),
    ([_model("A", kind="weights")], "kind 'weights' is not one of"),
    ([_model("A", urls=[])], "needs at least one download url"),
    ([{"kind": "pretrained"}], "entry 0 is malformed"),
])
def test_malformed_registry_is_refused(tmp_path, models, message):
    with pytest.raises(ValueError, match=message):
        reg.load_registry(_write(tmp_path, models))


@pytest.mark.parametrize("entry, message", [
    (_model2("A", size=None), "must give both sha256 and size, or neither"),
    (_model2("A", sources=[]), "needs at least one source"),
    (_model2("A", sources=[{"type": "ftp", "url": "ftp://x"}]), "source type 'ftp'"),
    (_model2("A", sources=[{"type": "url", "url": "file:///etc/passwd"}]), "needs an http"),
    (_model2("A", sources=[{"type": "huggingface", "repo_id": "nobody", "filename": "A.pt"}]),
     r"needs repo_id \(owner/name\)"),
    (_model2("A", sources=[{"type": "huggingface", "repo_id": "a/b", "filename": "A.pt",
                            "repo_type": "bucket"}]), "repo_type 'bucket'"),
    (_model2("../A"), "must be a non-empty file name"),
])
def test_malformed_format_2_entry_is_refused(tmp_path, entry, message):
    with pytest.raises(ValueError, match=message):
        reg.load_registry(_write(tmp_path, [entry], version=2))


def test_unknown_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match="format_version 3 is not one beats reads"):
        reg.load_registry(_write(tmp_path, [_model2("A")], version=3))


def test_missing_registry_file(tmp_path, monkeypatch):
    monkeypatch.setenv("BEATS_REGISTRY", str(tmp_path / "nope.json"))
    with pytest.raises(FileNotFoundError, match=r"no checkpoint registry at .*nope\.json"):
        available_models()
