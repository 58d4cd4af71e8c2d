"""Outputs from the waveform equal the original implementation's (tests/data/reference)."""

from __future__ import annotations

import pytest
import torch

from beats.fbank import fbank

from .conftest import ENCODER_CASES, MANIFEST, NUM_WAVES, reference_model

# Tolerances from the reference README (float32 on CPU).
HIDDEN_TOL = 1e-4
PROBS_TOL = 1e-5


def test_manifest_lengths_match_waves(waves):
    assert [waves[f"wav.{i}"].numel() for i in range(NUM_WAVES)] == MANIFEST["waves"]["lengths"]


@pytest.mark.parametrize("i", range(NUM_WAVES))
def test_raw_filterbank_matches_torchaudio_reference(waves, i):
    ours, frames = fbank(waves[f"wav.{i}"], normalize=False)
    ref = waves[f"fbank_raw.{i}"]
    assert ours.shape[1:] == ref.shape and int(frames) == ref.shape[0]
    diff = (ours[0] - ref).abs()
    assert diff.max() <= 2e-3
    assert diff.mean() <= 2e-5


@pytest.mark.parametrize("case", ENCODER_CASES)
@pytest.mark.parametrize("i", range(NUM_WAVES))
def test_every_stage_matches_reference(case, i, waves, expected):
    model = reference_model(case)
    ref = expected[case]
    wav = waves[f"wav.{i}"]
    with torch.no_grad():
        features, _ = model.preprocess(wav)
        patches = model.embed_patches(features)[0]
        out = model.extract_features(wav, output_hidden_states=True)
    assert (patches - ref[f"patches.{i}"]).abs().max() <= HIDDEN_TOL
    layers = model.cfg.encoder_layers
    assert len(out.hidden_states) == layers + 1
    for j in range(layers + 1):
        want = ref[f"hidden.{i}.{j}"]
        got = out.hidden_states[j][0]
        assert got.shape == want.shape, (j, got.shape, want.shape)
        assert (got - want).abs().max() <= HIDDEN_TOL, f"hidden state {j}"
    if case == "finetuned":
        assert (out.probs[0] - ref[f"probs.{i}"]).abs().max() <= PROBS_TOL
        assert torch.equal(out[0], out.probs)  # item 0 is probs, as in the original
    else:
        assert (out.features[0] - ref[f"features.{i}"]).abs().max() <= HIDDEN_TOL
        assert torch.equal(out[0], out.features)


def test_prenorm_features_are_last_hidden_state_after_final_norm(waves):
    model = reference_model("prenorm_glu")
    with torch.no_grad():
        out = model.extract_features(waves["wav.0"], output_hidden_states=True)
        normed = model.encoder.layer_norm(out.hidden_states[-1])
    assert torch.allclose(out.features, normed, atol=1e-6)
    assert not torch.allclose(out.features, out.hidden_states[-1], atol=1e-3)


@pytest.mark.parametrize("case", ["postnorm_gru", "prenorm_glu"])
def test_output_layer_stops_early_and_equals_hidden_state(case, waves):
    model = reference_model(case)
    wav = waves["wav.1"]
    calls = []
    hooks = [
        layer.register_forward_hook(lambda *_: calls.append(1)) for layer in model.encoder.layers
    ]
    try:
        with torch.no_grad():
            full = model.extract_features(wav, output_hidden_states=True)
            calls.clear()
            for k in range(model.cfg.encoder_layers + 1):
                calls.clear()
                out = model.extract_features(wav, output_layer=k)
                assert len(calls) == k  # layers above k never ran
                assert torch.equal(out.features, full.hidden_states[k])
            last = model.extract_features(wav, output_layer=-1)
            assert torch.equal(last.features, full.hidden_states[-1])
    finally:
        for h in hooks:
            h.remove()
    with pytest.raises(ValueError, match="out of range"):
        model.extract_features(wav, output_layer=model.cfg.encoder_layers + 1)
