"""Writing models back as Microsoft ``.pt`` checkpoints (`save_microsoft_checkpoint`,
``beats convert MODEL OUT.pt``): the original's files, key for key."""

from __future__ import annotations

import pytest
import torch

from beats import BEATs, BEATsTokenizer
from beats.cli import main

from .conftest import ENCODER_CASES, REFERENCE

CASES = [*ENCODER_CASES, "tokenizer"]


def _load(case: str) -> BEATs:
    cls = BEATsTokenizer if case == "tokenizer" else BEATs
    return cls.from_pretrained(REFERENCE / f"{case}.pt")


@pytest.mark.parametrize("case", CASES)
def test_export_gives_back_the_original_file(tmp_path, case):
    """Loaded, then exported: the same cfg (values and order), keys, shapes, dtypes and
    tensors as the file the original code wrote, and label_dict only for fine-tuned."""
    original = torch.load(REFERENCE / f"{case}.pt", weights_only=True)
    path = _load(case).save_microsoft_checkpoint(tmp_path / "out.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pt"]  # no temporary left
    exported = torch.load(path, weights_only=True)
    assert list(exported) == list(original)
    assert list(exported["cfg"].items()) == list(original["cfg"].items())
    assert sorted(exported["model"]) == sorted(original["model"])
    for key, want in original["model"].items():
        got = exported["model"][key]
        assert got.shape == want.shape and got.dtype == want.dtype, key
        assert torch.equal(got, want), key
    assert exported.get("label_dict") == original.get("label_dict")
    assert ("label_dict" in exported) == (case == "finetuned")


def test_export_repeats_the_shared_table_under_every_layer(tmp_path):
    model = _load("postnorm_gru")
    table = model.state_dict()["encoder.layers.0.self_attn.relative_attention_bias.weight"]
    assert not any(k.startswith("encoder.layers.1.self_attn.relative_attention_bias")
                   for k in model.state_dict())  # one table in the model...
    ckpt = torch.load(model.save_microsoft_checkpoint(tmp_path / "m.pt"), weights_only=True)
    for layer in range(model.cfg.encoder_layers):  # ...under every layer's name in the file
        assert torch.equal(
            ckpt["model"][f"encoder.layers.{layer}.self_attn.relative_attention_bias.weight"],
            table)
    assert "encoder.pos_conv.0.weight_g" in ckpt["model"]
    assert "encoder.pos_conv.0.weight_v" in ckpt["model"]


def test_non_default_and_unknown_cfg_keys_are_kept(tmp_path):
    ckpt = torch.load(REFERENCE / "postnorm_gru.pt", weights_only=True)
    ckpt["cfg"]["espnet_extra"] = "kept"
    with pytest.warns(UserWarning, match="espnet_extra"):
        model = BEATs.from_microsoft_checkpoint(ckpt)
    model.cfg.quant_noise = 0.1  # not a Microsoft key: written because it is not the default
    cfg = torch.load(model.save_microsoft_checkpoint(tmp_path / "m.pt"), weights_only=True)["cfg"]
    assert cfg["espnet_extra"] == "kept" and cfg["quant_noise"] == 0.1
    assert "quant_n" not in cfg and "quant_noise_block_size" not in cfg  # defaults: left out


@pytest.mark.parametrize("case", ["postnorm_gru", "finetuned", "tokenizer"])
def test_folder_to_pt_to_folder_is_bit_identical(tmp_path, capsys, case):
    first = _load(case).save_pretrained(tmp_path / "first")
    assert main(["convert", str(first), str(tmp_path / "model.pt")]) == 0
    out = capsys.readouterr().out
    want_keys = "cfg, model, label_dict" if case == "finetuned" else "cfg, model"
    assert f"wrote {tmp_path / 'model.pt'}: a Microsoft checkpoint ({want_keys};" in out
    assert main(["convert", str(tmp_path / "model.pt"), str(tmp_path / "second")]) == 0
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "second").iterdir())
    for name in names:
        assert (first / name).read_bytes() == (tmp_path / "second" / name).read_bytes(), name


def test_convert_says_how_to_load_a_tokenizer(tmp_path, capsys):
    assert main(["convert", str(REFERENCE / "tokenizer.pt"), str(tmp_path / "tok")]) == 0
    out = capsys.readouterr().out
    assert f"load it with BEATsTokenizer.from_pretrained('{tmp_path / 'tok'}') or " \
           f"`beats tokenize -m {tmp_path / 'tok'} ...`" in out
    assert "BEATs.from_pretrained" not in out
    assert main(["convert", str(tmp_path / "tok"), str(tmp_path / "tok.pth")]) == 0
    assert "BEATsTokenizer.from_pretrained" in capsys.readouterr().out
    assert BEATsTokenizer.from_pretrained(tmp_path / "tok.pth").quantize is not None


def test_export_refuses_to_overwrite_without_force(tmp_path, capsys):
    out = tmp_path / "m.pt"
    out.write_bytes(b"keep me")
    assert main(["convert", str(REFERENCE / "finetuned.pt"), str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"beats convert: error: {out} already exists; pass --force to overwrite it")
    assert out.read_bytes() == b"keep me"
    assert main(["convert", str(REFERENCE / "finetuned.pt"), str(out), "--force"]) == 0
    assert BEATs.from_pretrained(out).predictor is not None


def test_export_to_a_folder_named_pt_is_refused(tmp_path, capsys):
    (tmp_path / "odd.pt").mkdir()
    assert main(["convert", str(REFERENCE / "finetuned.pt"), str(tmp_path / "odd.pt")]) == 2
    assert "odd.pt is a folder: give a file name ending in .pt" in capsys.readouterr().err
