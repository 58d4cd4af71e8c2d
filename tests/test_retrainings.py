"""Re-trainings in the Microsoft format (OpenBEATs/ESPnet): larger sizes, extra cfg keys,
state dicts saved under an extra ``encoder.`` prefix."""

from __future__ import annotations

import pytest
import torch

from beats import BEATs, BEATsConfig

from .conftest import MANIFEST, REFERENCE, reference_model

EXTRA_CFG = {"espnet_version": "202412", "use_flash_attn": False}


def _prefixed(ckpt: dict, **cfg_updates) -> dict:
    return {"cfg": {**ckpt["cfg"], **EXTRA_CFG, **cfg_updates},
            "model": {f"encoder.{k}": v for k, v in ckpt["model"].items()}}


def test_prefixed_keys_and_extra_cfg_load_identically(tmp_path, waves):
    ckpt = torch.load(REFERENCE / "finetuned.pt", weights_only=True)
    path = tmp_path / "openbeats.pt"
    torch.save({**_prefixed(ckpt), "label_dict": ckpt["label_dict"]}, path)
    with pytest.warns(UserWarning, match=r"ignoring unknown cfg keys \['espnet_version', "):
        model = BEATs.from_pretrained(path)
    assert model.cfg.extra == EXTRA_CFG
    reference = reference_model("finetuned")
    sd, ref = model.state_dict(), reference.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in sd)
    with torch.no_grad():
        assert torch.equal(model.extract_features(waves["wav.1"]).probs,
                           reference.extract_features(waves["wav.1"]).probs)
    # The extra keys survive save_pretrained and come back.
    with pytest.warns(UserWarning, match="ignoring unknown cfg keys"):
        again = BEATs.from_pretrained(model.save_pretrained(tmp_path / "saved"))
    assert again.cfg.extra == EXTRA_CFG


def test_prefixed_file_missing_a_key_names_it_without_the_prefix(tmp_path):
    ckpt = torch.load(REFERENCE / "postnorm_gru.pt", weights_only=True)
    broken = _prefixed(ckpt)
    del broken["model"]["encoder.encoder.layers.1.fc2.bias"]
    path = tmp_path / "broken.pt"
    torch.save(broken, path)
    with pytest.warns(UserWarning), pytest.raises(ValueError) as err:
        BEATs.from_pretrained(path)
    assert "1 missing key (encoder.layers.1.fc2.bias)" in str(err.value)
    assert "unexpected" not in str(err.value)


def test_prefix_other_than_encoder_is_not_guessed(tmp_path):
    ckpt = torch.load(REFERENCE / "postnorm_gru.pt", weights_only=True)
    path = tmp_path / "wrapped.pt"
    torch.save({"cfg": ckpt["cfg"], "model": {f"model.{k}": v for k, v in ckpt["model"].items()}},
               path)
    with pytest.raises(ValueError, match=r"\d+ missing keys .* the file's keys carry the prefix "
                                         r"'model\.'"):
        BEATs.from_pretrained(path)


@pytest.mark.slow
def test_large_openbeats_style_checkpoint(tmp_path):
    """24 layers, width 1024, 16 heads, FFN 4096 (311 M parameters), random weights."""
    cfg = {**MANIFEST["cases"]["postnorm_gru"]["cfg"], "encoder_layers": 24,
           "encoder_embed_dim": 1024, "encoder_attention_heads": 16,
           "encoder_ffn_embed_dim": 4096, "embed_dim": 512, "conv_pos": 128,
           "conv_pos_groups": 16, **EXTRA_CFG}
    with torch.device("meta"):
        skeleton = BEATs(BEATsConfig.from_dict(cfg, warn_unknown=False))
        shapes = {k: v.shape for k, v in skeleton.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    weights = {k: torch.empty(shape).uniform_(-0.04, 0.04, generator=gen)
               for k, shape in shapes.items()}
    sd = {f"encoder.{k}": v for k, v in weights.items()}
    table = "encoder.layers.0.self_attn.relative_attention_bias.weight"
    for i in range(1, 24):  # the original repeats the shared table under every layer
        sd[f"encoder.{table.replace('layers.0', f'layers.{i}')}"] = weights[table]
    path = tmp_path / "large.pt"
    torch.save({"cfg": cfg, "model": sd}, path)
    del sd
    with pytest.warns(UserWarning, match="ignoring unknown cfg keys"):
        model = BEATs.from_pretrained(path)
    assert sum(p.numel() for p in model.parameters()) > 300_000_000
    loaded = model.state_dict()
    assert loaded.keys() == weights.keys()
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)
    del weights, loaded
    wav = torch.sin(torch.arange(8000) * 0.05) * 0.5  # 0.5 s
    with torch.inference_mode():
        features = model.extract_features(wav).features
    assert features.shape == (1, 24, 1024) and torch.isfinite(features).all()
    with pytest.warns(UserWarning, match="ignoring unknown cfg keys"):
        again = BEATs.from_pretrained(model.save_pretrained(tmp_path / "saved"))
    with torch.inference_mode():
        assert torch.equal(again.extract_features(wav).features, features)
