"""The bundled registry of released checkpoints, name lookup and its errors."""

from __future__ import annotations

import json

import pytest

from beats import BEATs, available_models
from beats import registry as reg

SPEC_QUERY = (
    "?sv=2020-08-04&st=2023-03-01T07%3A51%3A05Z&se=2033-03-02T07%3A51%3A00Z&sr=c&sp=rl"
    "&sig=QJXmSJG9DbMKf48UDIU1MfzIro8HQOf3sqlNXiflY1I%3D"
)
FT_CPT2 = "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2"
SPEC_NAMES = [
    "BEATs_iter1", "BEATs_iter2", "BEATs_iter3", "BEATs_iter3_plus_AS2M",
    "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt1", "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2",
]


def test_bundled_registry_holds_the_released_files():
    entries = {e.name: e for e in reg.load_registry()}
    assert len(entries) == 19
    for name in SPEC_NAMES:  # spec section 10, with its release URL pattern
        assert entries[name].urls == (
            f"https://valle.blob.core.windows.net/share/BEATs/{name}.pt{SPEC_QUERY}",
        )
    kinds = [e.kind for e in entries.values()]
    assert [kinds.count(k) for k in ("pretrained", "fine-tuned", "tokenizer")] == [5, 10, 4]
    for e in entries.values():
        assert e.sha256 is None and e.size is None  # not verified here: never invented
        assert e.license == "MIT"
        assert e.description and "\n" not in e.description
        assert e.urls[0].startswith("https://valle.blob.core.windows.net/share/BEATs/"
                                    f"{e.name}.pt?")
    assert [e.name for e in entries.values() if e.default] == ["BEATs_iter3_plus_AS2M"]
    assert reg.default_model().name == "BEATs_iter3_plus_AS2M"


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


def _write(tmp_path, models):
    path = tmp_path / "registry.json"
    path.write_text(json.dumps({"format_version": 1, "models": models}))
    return path


def _model(name, **kw):
    return {"name": name, "kind": "pretrained", "urls": [f"http://127.0.0.1:9/{name}.pt"],
            "sha256": None, "size": None, "license": "MIT", "description": "d", **kw}


def test_registry_override_by_environment(tmp_path, monkeypatch):
    path = _write(tmp_path, [_model("Mine", default=True, aliases=["m"])])
    monkeypatch.setenv("BEATS_REGISTRY", str(path))
    assert available_models() == ["Mine"]
    assert reg.find("M").name == "Mine"
    assert reg.registry_path() == path


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


def test_missing_registry_file(tmp_path, monkeypatch):
    monkeypatch.setenv("BEATS_REGISTRY", str(tmp_path / "nope.json"))
    with pytest.raises(FileNotFoundError, match=r"no checkpoint registry at .*nope\.json"):
        available_models()
