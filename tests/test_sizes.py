"""Absurd configs fail at once; every real size loads; a model of zero layers computes."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from beats import BEATs, BEATsConfig
from beats.config import MAX_SIZES, check_memory
from beats.tokenizer import BEATsTokenizer

from .conftest import tiny_config

BASE = BEATsConfig()  # 12 x 768, FFN 3072: the released models
LARGE = BEATsConfig(encoder_layers=24, encoder_embed_dim=1024, encoder_ffn_embed_dim=4096,
                    encoder_attention_heads=16)  # OpenBEATs Large, ESPnet large re-trainings


def _numel(model: torch.nn.Module) -> int:
    return sum(v.numel() for v in model.state_dict().values())


@pytest.mark.parametrize("key, value", [
    ("encoder_layers", 1_000_000_000), ("encoder_embed_dim", 10**7),
    ("encoder_ffn_embed_dim", 10**9), ("embed_dim", 10**6), ("predictor_class", 10**9),
    ("quant_n", 10**9), ("conv_pos", 10**6),
])
def test_absurd_sizes_fail_at_once_naming_the_key(key, value):
    with pytest.raises(ValueError, match=rf"BEATsConfig\.{key}={value}: is beyond the "
                                         rf"supported maximum {MAX_SIZES[key]}"):
        BEATsConfig(**{key: value})


def test_bounds_admit_real_models_and_room_above():
    for cfg in (BASE, LARGE, tiny_config()):
        cfg.validate()
    research = BEATsConfig(encoder_layers=96, encoder_embed_dim=8192,
                           encoder_ffn_embed_dim=32768, encoder_attention_heads=64)
    assert sum(research.parameter_counts().values()) > 77e9  # far past any BEATs so far
    assert 90e6 < sum(BASE.parameter_counts().values()) < 91e6
    assert 300e6 < sum(LARGE.parameter_counts().values()) < 320e6


@pytest.mark.parametrize("overrides", [
    {}, {"encoder_layers": 0}, {"finetuned_model": True}, {"embed_dim": 48},
    {"activation_fn": "glu", "layer_norm_first": True, "deep_norm": False, "conv_bias": True},
    {"relative_position_embedding": False, "gru_rel_pos": False},
])
def test_parameter_counts_are_exact(overrides):
    cfg = tiny_config(**overrides)
    assert sum(cfg.parameter_counts().values()) == _numel(BEATs(cfg))


def test_tokenizer_parameter_count_is_exact():
    cfg = tiny_config(quant_n=64, quant_dim=16)
    assert sum(cfg.parameter_counts(tokenizer=True).values()) == _numel(BEATsTokenizer(cfg))


def test_memory_rule_compares_parameter_bytes_with_available_memory():
    need = 4 * sum(BASE.parameter_counts().values())  # 361 MB in float32
    check_memory(BASE, available=need)  # exactly enough passes
    with pytest.raises(ValueError, match=r"90\.3 M parameters, 361\.2 MB at 4 bytes each, and "
                                         r"only 100\.0 MB of memory is available; most of it "
                                         r"comes from encoder_layers=12 layers of 7\.\d+ M"):
        check_memory(BASE, available=100_000_000)
    fine = BEATsConfig(finetuned_model=True, predictor_class=900_000)
    with pytest.raises(ValueError, match=r"comes from predictor_class=900000"):
        check_memory(fine, available=1_000_000_000)
    with pytest.raises(ValueError, match=r"comes from quant_n=1048576, quant_dim=65536"):
        check_memory(BEATsConfig(quant_n=2**20, quant_dim=65536), tokenizer=True,
                     available=10**11)


def test_huge_model_fails_before_allocating():
    """Within the bounds but 200 TB: refused before any tensor exists. Run under a 6 GiB
    address-space limit, so that code allocating first fails there (and never swaps)."""
    script = textwrap.dedent("""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
        from beats import BEATs, BEATsConfig
        cfg = BEATsConfig(encoder_layers=1024, encoder_embed_dim=65536,
                          encoder_ffn_embed_dim=262144, encoder_attention_heads=64)
        try:
            BEATs(cfg)
        except ValueError as e:
            print(e)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "of memory is available; most of it comes from encoder_layers=1024 layers" \
        in done.stdout
    assert "encoder_embed_dim=65536, encoder_ffn_embed_dim=262144" in done.stdout


def _zero_layer_twin(cfg: BEATsConfig) -> tuple[BEATs, BEATs]:
    """A 2-layer model and a 0-layer model holding the same front end and final norm."""
    torch.manual_seed(0)
    deep = BEATs(cfg).eval()
    shallow = BEATs(BEATsConfig.from_dict({**cfg.to_dict(), "encoder_layers": 0})).eval()
    shallow.load_state_dict({k: v for k, v in deep.state_dict().items()
                             if not k.startswith("encoder.layers.")}, strict=True)
    return deep, shallow


@pytest.mark.parametrize("pre_norm", [False, True])
def test_zero_layers_compute_the_encoder_input(pre_norm):
    overrides = {"encoder_layers": 2}
    if pre_norm:
        overrides |= {"layer_norm_first": True, "deep_norm": False}
    deep, shallow = _zero_layer_twin(tiny_config(**overrides))
    wav = [torch.sin(torch.arange(n) * 0.03) * 0.4 for n in (16000, 9000)]
    state0 = deep.embed(wav, output_hidden_states=True).hidden_states[0]
    out = shallow.embed(wav, output_hidden_states=True)
    with torch.inference_mode():
        expected = deep.encoder.layer_norm(state0) if pre_norm else state0
    keep = (~out.padding_mask).unsqueeze(-1)
    assert out.features.shape == (2, 48, 48)
    assert torch.allclose(out.features, expected * keep, atol=1e-6)
    assert len(out.hidden_states) == 1
    assert torch.allclose(out.hidden_states[0], state0, atol=1e-6)
    assert torch.equal(shallow.embed(wav, output_layer=0).features,
                       shallow.embed(wav, output_layer=-1).features)


def test_zero_layer_model_saves_and_loads(tmp_path):
    model = BEATs(tiny_config(encoder_layers=0))
    again = BEATs.from_pretrained(model.save_pretrained(tmp_path))
    wav = torch.sin(torch.arange(8000) * 0.05) * 0.5
    assert again.cfg.encoder_layers == 0
    assert torch.equal(again.embed(wav).features, model.eval().embed(wav).features)
