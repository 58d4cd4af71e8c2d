"""save_pretrained / from_pretrained with the safetensors folder format, and its errors."""

from __future__ import annotations

import csv
import json
import marshal
import pickle
from pathlib import Path

import pytest
import torch

from beats import BEATs, BEATsTokenizer

from .conftest import ENCODER_CASES, REFERENCE, reference_model, tiny_config


def _features(model: BEATs, wav: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model.extract_features(wav)
    return out.probs if out.probs is not None else out.features


def assert_same_model(a: BEATs, b: BEATs, wav: torch.Tensor) -> None:
    """Bit-identical: every tensor, the config, the labels and the outputs."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert a.cfg.to_dict() == b.cfg.to_dict()
    assert a.label_dict == b.label_dict
    assert not b.training
    assert torch.equal(_features(a, wav), _features(b, wav))


@pytest.mark.parametrize("case", [*ENCODER_CASES])
def test_save_pretrained_reloads_bit_exactly(tmp_path, waves, case):
    model = reference_model(case)
    out = model.save_pretrained(tmp_path / case)
    names = sorted(p.name for p in out.iterdir())
    expected = ["config.json", "model.safetensors"]
    assert names == sorted(expected + (["labels.json"] if case == "finetuned" else []))
    wav = waves["wav.1"]
    assert_same_model(model, BEATs.from_pretrained(out), wav)  # the folder
    assert_same_model(model, BEATs.from_pretrained(str(out / "model.safetensors")), wav)
    assert_same_model(model, BEATs.from_pretrained(out / "config.json"), wav)


def test_config_json_contents(tmp_path):
    model = reference_model("finetuned")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "beats"
    assert config["architectures"] == ["BEATs"]
    assert config["beats_format_version"] == 1
    assert config["has_labels"] is True
    assert config["encoder_layers"] == 3 and config["predictor_class"] == 5
    labels = json.loads((tmp_path / "labels.json").read_text())
    assert labels["0"] == "/m/09x0r" and len(labels) == 5


def test_save_is_atomic_and_drops_stale_labels(tmp_path):
    reference_model("finetuned").save_pretrained(tmp_path)
    reference_model("postnorm_gru").save_pretrained(tmp_path)  # overwrite, no labels
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    reloaded = BEATs.from_pretrained(tmp_path)
    assert reloaded.label_dict is None and reloaded.predictor is None


def test_reload_with_dtype_and_device(tmp_path):
    reference_model("postnorm_gru").save_pretrained(tmp_path)
    model = BEATs.from_pretrained(tmp_path, dtype=torch.float64, device="cpu")
    assert model.dtype == torch.float64 and model.device.type == "cpu"


def test_loading_skips_random_init_but_matches_a_normal_build(waves):
    """from_pretrained builds on the meta device; the result equals build + load_state_dict."""
    ckpt = torch.load(REFERENCE / "postnorm_gru.pt", weights_only=True)
    from beats import BEATsConfig
    from beats.checkpoint import normalize_state_dict

    normal = BEATs(BEATsConfig.from_dict(dict(ckpt["cfg"])))
    normal.load_state_dict(normalize_state_dict(ckpt["model"]))
    normal.eval()
    assert_same_model(normal, reference_model("postnorm_gru"), waves["wav.0"])


def test_every_audioset_class_has_a_display_name(tmp_path):
    with open(Path(__file__).parents[1] / "checkpoints" / "audioset_labels.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 527
    model = BEATs(tiny_config(finetuned_model=True, predictor_class=527))
    model.label_dict = {int(r["index"]): r["mid"] for r in rows}
    reloaded = BEATs.from_pretrained(model.save_pretrained(tmp_path))
    assert reloaded.labels == [r["display_name"] for r in rows]
    assert not any(name.startswith("/m/") or name.startswith("/t/") for name in reloaded.labels)


# ---------------------------------------------------------------------- errors
def test_folder_without_model_files_says_what_it_needs(tmp_path):
    (tmp_path / "BEATs_iter3.pt").write_bytes(b"x")
    with pytest.raises(FileNotFoundError) as err:
        BEATs.from_pretrained(tmp_path)
    text = str(err.value)
    assert "needs config.json and model.safetensors" in text
    assert "['BEATs_iter3.pt']" in text and "beats convert BEATs_iter3.pt DIR" in text


def test_safetensors_without_config(tmp_path):
    reference_model("postnorm_gru").save_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors needs its config\.json"):
        BEATs.from_pretrained(tmp_path / "model.safetensors")


def test_truncated_safetensors_names_the_file(tmp_path):
    reference_model("postnorm_gru").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"model\.safetensors is truncated or corrupt"):
        BEATs.from_pretrained(tmp_path)


@pytest.mark.parametrize("edit, message", [
    (lambda c: {**c, "model_type": "wav2vec2"}, "describes a 'wav2vec2' model, not a BEATs"),
    (lambda c: {**c, "beats_format_version": 2}, "format version 2; this beats reads up to"),
    (lambda c: [c], "must hold a JSON object"),
    (lambda c: {**c, "encoder_layers": -1}, "encoder_layers=-1: must be 0 or more"),
])
def test_bad_config_json(tmp_path, edit, message):
    reference_model("postnorm_gru").save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(ValueError, match=message):
        BEATs.from_pretrained(tmp_path)


def test_config_json_that_is_not_json(tmp_path):
    reference_model("postnorm_gru").save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        BEATs.from_pretrained(tmp_path)


def test_missing_labels_file(tmp_path):
    reference_model("finetuned").save_pretrained(tmp_path)
    (tmp_path / "labels.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"its config\.json says the model has labels"):
        BEATs.from_pretrained(tmp_path)


def test_bad_labels_file(tmp_path):
    reference_model("finetuned").save_pretrained(tmp_path)
    (tmp_path / "labels.json").write_text('{"zero": "/m/09x0r"}')
    with pytest.raises(ValueError, match="must map class indices"):
        BEATs.from_pretrained(tmp_path)


def test_weights_not_matching_config_are_listed(tmp_path):
    reference_model("postnorm_gru").save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "encoder_layers": 2}))
    with pytest.raises(ValueError, match=r"\d+ unexpected keys \(encoder\.layers\.2\."):
        BEATs.from_pretrained(tmp_path)


def test_microsoft_file_with_a_cfg_that_is_not_a_dict(tmp_path):
    ckpt = torch.load(REFERENCE / "postnorm_gru.pt", weights_only=True)
    path = tmp_path / "odd.pt"
    torch.save({"cfg": [1, 2], "model": ckpt["model"]}, path)
    with pytest.raises(ValueError, match=r"odd\.pt: 'cfg' must be a dict, got list"):
        BEATs.from_pretrained(path)


def test_missing_path_suggests_the_registry_name():
    with pytest.raises(FileNotFoundError) as err:
        BEATs.from_pretrained("./BEATs_iter3_plus_AS2M.pt")
    assert "no checkpoint file or folder at ./BEATs_iter3_plus_AS2M.pt" in str(err.value)
    assert "from_pretrained('BEATs_iter3_plus_AS2M')" in str(err.value)


def test_revision_is_refused_for_local_paths():
    with pytest.raises(ValueError, match="revision='v1' applies to Hugging Face Hub repos only"):
        BEATs.from_pretrained(REFERENCE / "postnorm_gru.pt", revision="v1")


# ---------------------------------------------------------------------- tokenizer vs encoder
def test_encoder_class_refuses_a_tokenizer_checkpoint():
    with pytest.raises(ValueError) as err:
        BEATs.from_pretrained(REFERENCE / "tokenizer.pt")
    assert "tokenizer.pt is an acoustic tokenizer checkpoint" in str(err.value)
    assert "BEATsTokenizer.from_pretrained" in str(err.value)


def test_tokenizer_class_refuses_an_encoder_checkpoint():
    with pytest.raises(ValueError, match=r"postnorm_gru\.pt is a BEATs encoder checkpoint"):
        BEATsTokenizer.from_pretrained(REFERENCE / "postnorm_gru.pt")


def test_subclass_is_built_by_from_pretrained(tmp_path):
    class Sub(BEATs):
        pass

    model = Sub.from_pretrained(REFERENCE / "postnorm_gru.pt")
    assert type(model) is Sub
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["Sub"]
    assert type(Sub.from_pretrained(tmp_path)) is Sub


# ---------------------------------------------------------------------- code in pickles
class _Code:
    """Unpickles to a code object (marshal.loads of compiled bytecode)."""

    def __init__(self, source: str) -> None:
        self.bytes = marshal.dumps(compile(source, "<payload>", "exec"))

    def __reduce__(self):
        return (marshal.loads, (self.bytes,))


class _Exec:
    """Unpickles by running the code object it carries."""

    def __init__(self, source: str) -> None:
        self.code = _Code(source)

    def __reduce__(self):
        return (exec, (self.code,))


def _touching(marker: Path) -> _Exec:
    return _Exec(f"import pathlib; pathlib.Path({str(marker)!r}).touch()")


def test_pickle_carrying_a_code_object_is_refused_without_running_it(tmp_path):
    control = tmp_path / "control_ran"
    pickle.loads(pickle.dumps(_touching(control)))  # a plain unpickler runs the payload
    assert control.exists()
    marker = tmp_path / "code_ran"
    ckpt = torch.load(REFERENCE / "postnorm_gru.pt", weights_only=True)
    path = tmp_path / "payload.pt"
    torch.save({**ckpt, "cfg": {**ckpt["cfg"], "x": _touching(marker)}}, path)
    with pytest.raises(ValueError) as err:
        BEATs.from_pretrained(path)
    text = str(err.value)
    assert f"{path} is not a plain-tensor checkpoint: loading it would run code" in text
    assert "(it calls exec)" in text and "beats convert" in text
    assert not marker.exists()
