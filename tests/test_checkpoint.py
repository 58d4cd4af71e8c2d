"""Loading Microsoft .pt checkpoints: key styles, strict key check, labels, bad files."""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import pytest
import torch

from beats import BEATs

from .conftest import REFERENCE, reference_model


def _load(name: str) -> dict:
    return torch.load(REFERENCE / name, weights_only=True)


def _outputs(model: BEATs, wav: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.extract_features(wav).features


def test_parametrized_weight_norm_keys_load_identically(tmp_path, waves):
    ckpt = _load("postnorm_gru.pt")
    sd = dict(ckpt["model"])
    prefix = "encoder.pos_conv.0."
    sd[prefix + "parametrizations.weight.original0"] = sd.pop(prefix + "weight_g")
    sd[prefix + "parametrizations.weight.original1"] = sd.pop(prefix + "weight_v")
    path = tmp_path / "new_style.pt"
    torch.save({"cfg": ckpt["cfg"], "model": sd}, path)
    new = BEATs.from_pretrained(path)
    assert torch.equal(_outputs(new, waves["wav.0"]),
                       _outputs(reference_model("postnorm_gru"), waves["wav.0"]))


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    ckpt = _load("postnorm_gru.pt")
    sd = dict(ckpt["model"])
    del sd["encoder.layers.1.fc1.weight"]
    sd["encoder.layers.1.surprise"] = torch.zeros(3)
    path = tmp_path / "broken.pt"
    torch.save({"cfg": ckpt["cfg"], "model": sd}, path)
    with pytest.raises(ValueError) as err:
        BEATs.from_pretrained(path)
    text = str(err.value)
    assert "broken.pt" in text
    assert "1 missing key (encoder.layers.1.fc1.weight)" in text
    assert "1 unexpected key (encoder.layers.1.surprise)" in text


def test_shape_mismatch_is_reported(tmp_path):
    ckpt = _load("postnorm_gru.pt")
    cfg = dict(ckpt["cfg"], encoder_ffn_embed_dim=64)
    path = tmp_path / "wrong_cfg.pt"
    torch.save({"cfg": cfg, "model": ckpt["model"]}, path)
    with pytest.raises(ValueError, match=r"encoder\.layers\.0\.fc1\.bias \(96,\) in the file, "
                                         r"\(64,\) in the model .* the file's "
                                         r"encoder_ffn_embed_dim is 96 and the config says 64"):
        BEATs.from_pretrained(path)


def test_differing_shared_position_tables_refused(tmp_path):
    ckpt = _load("postnorm_gru.pt")
    sd = dict(ckpt["model"])
    key = "encoder.layers.2.self_attn.relative_attention_bias.weight"
    sd[key] = sd[key] + 1.0
    path = tmp_path / "unshared.pt"
    torch.save({"cfg": ckpt["cfg"], "model": sd}, path)
    with pytest.raises(ValueError, match="differs from layer 0"):
        BEATs.from_pretrained(path)


def test_label_dict_and_display_names():
    model = reference_model("finetuned")
    raw = _load("finetuned.pt")["label_dict"]
    assert model.label_dict == {int(k): v for k, v in raw.items()}
    with open(Path(__file__).parents[1] / "checkpoints" / "audioset_labels.csv") as f:
        names = {row["mid"]: row["display_name"] for row in csv.DictReader(f)}
    assert len(names) == 527
    assert model.labels == [names[raw[i]] for i in range(5)]
    assert model.labels[0] == "Speech"
    assert reference_model("postnorm_gru").labels is None


def test_truncated_file_names_the_file(tmp_path):
    data = (REFERENCE / "postnorm_gru.pt").read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.pt is truncated or corrupt"):
        BEATs.from_pretrained(path)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pt"):
        BEATs.from_pretrained("nowhere.pt")


def test_not_a_beats_checkpoint(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match="expected a dict with 'cfg' and 'model'"):
        BEATs.from_pretrained(path)


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(_Payload.marker),))


def test_pickle_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code_ran"
    _Payload.marker = str(marker)
    path = tmp_path / "evil.pt"
    torch.save({"cfg": {}, "model": {}, "x": _Payload()}, path, pickle_protocol=2)
    assert not marker.exists()
    with pytest.raises(ValueError, match=r"evil\.pt.*would run code") as err:
        BEATs.from_pretrained(path)
    assert "beats convert" in str(err.value)
    assert "weights_only=False" not in str(err.value)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):  # the guard is torch's weights_only loader
        torch.load(path, weights_only=True)
    assert not marker.exists()


def test_from_pretrained_dtype_and_eval_mode():
    model = BEATs.from_pretrained(REFERENCE / "postnorm_gru.pt", dtype=torch.float64)
    assert not model.training
    assert model.dtype == torch.float64
