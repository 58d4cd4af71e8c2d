"""BEATsConfig: Microsoft keys and defaults, unknown keys, validation, round trip."""

from __future__ import annotations

import dataclasses
import warnings

import pytest

from beats import BEATsConfig

from .conftest import MANIFEST

MICROSOFT_DEFAULTS = {  # the Microsoft BEATsConfig defaults (input_patch_size: see docstring)
    "embed_dim": 512, "conv_bias": False, "encoder_layers": 12, "encoder_embed_dim": 768,
    "encoder_ffn_embed_dim": 3072, "encoder_attention_heads": 12, "activation_fn": "gelu",
    "layer_wise_gradient_decay_ratio": 1.0, "layer_norm_first": False, "deep_norm": False,
    "dropout": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.0,
    "encoder_layerdrop": 0.0, "dropout_input": 0.0, "conv_pos": 128, "conv_pos_groups": 16,
    "relative_position_embedding": False, "num_buckets": 320, "max_distance": 1280,
    "gru_rel_pos": False, "finetuned_model": False, "predictor_dropout": 0.1,
    "predictor_class": 527,
}


def test_defaults_are_microsofts():
    cfg = BEATsConfig()
    for key, value in MICROSOFT_DEFAULTS.items():
        assert getattr(cfg, key) == value, key
    assert cfg.input_patch_size == 16


@pytest.mark.parametrize("case", sorted(MANIFEST["cases"]))
def test_every_reference_cfg_round_trips(case):
    raw = MANIFEST["cases"][case]["cfg"]
    cfg = BEATsConfig.from_dict(raw)
    out = cfg.to_dict()
    for key, value in raw.items():
        assert out[key] == value, key
    assert BEATsConfig.from_dict(out) == cfg


def test_unknown_keys_warn_once_and_are_kept():
    raw = dict(MANIFEST["cases"]["postnorm_gru"]["cfg"], espnet_flag=True, frontend="x")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = BEATsConfig.from_dict(raw)
    assert len(caught) == 1
    assert "espnet_flag" in str(caught[0].message) and "frontend" in str(caught[0].message)
    assert cfg.extra == {"espnet_flag": True, "frontend": "x"}
    assert cfg.to_dict()["frontend"] == "x"


def test_flags_stored_as_ints_become_bools():
    cfg = BEATsConfig(deep_norm=1, conv_bias=0)
    assert cfg.deep_norm is True and cfg.conv_bias is False


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"encoder_embed_dim": 50, "encoder_attention_heads": 4}, "encoder_embed_dim"),
        ({"input_patch_size": 8}, "input_patch_size"),
        ({"activation_fn": "swish"}, "activation_fn"),
        ({"dropout": 1.5}, "dropout"),
        ({"encoder_layers": -1}, "encoder_layers"),
        ({"encoder_layers": 2.5}, "encoder_layers"),
        ({"deep_norm": "yes"}, "deep_norm"),
        ({"deep_norm": True, "layer_norm_first": True}, "deep_norm"),
        ({"gru_rel_pos": True, "relative_position_embedding": False}, "gru_rel_pos"),
        ({"encoder_embed_dim": 48, "encoder_attention_heads": 4, "conv_pos_groups": 5},
         "encoder_embed_dim"),
    ],
)
def test_validation_names_the_key(overrides, key):
    with pytest.raises(ValueError, match=rf"BEATsConfig\.{key}"):
        BEATsConfig(**overrides)


def test_from_dict_rejects_non_dict():
    with pytest.raises(TypeError):
        BEATsConfig.from_dict(["encoder_layers", 12])


def test_fields_cover_every_microsoft_key():
    names = {f.name for f in dataclasses.fields(BEATsConfig)}
    assert set(MICROSOFT_DEFAULTS) | {"input_patch_size"} <= names
