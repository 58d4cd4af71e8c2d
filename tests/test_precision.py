"""Reduced precision: bfloat16 (and float16) encoders keep float32 where accuracy needs it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from beats import BEATs

from .conftest import ENCODER_CASES, NUM_WAVES, REFERENCE, padded_batch, reference_model

COSINE_MIN = 0.999  # per position, against the float32 features


@pytest.mark.parametrize("case", ENCODER_CASES)
def test_bfloat16_features_match_float32_per_position(case, waves):
    full = reference_model(case)
    half = BEATs.from_pretrained(REFERENCE / f"{case}.pt", dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    for i in range(NUM_WAVES):
        wav = waves[f"wav.{i}"]
        ref = full.embed(wav)
        out = half.embed(wav)
        assert out.features.dtype == torch.bfloat16
        cos = F.cosine_similarity(out.features.float(), ref.features, dim=-1)
        assert cos.min() >= COSINE_MIN, (i, float(cos.min()))
        if ref.probs is not None:  # the head pools in float32 and returns float32
            assert out.probs.dtype == torch.float32
            assert (out.probs - ref.probs).abs().max() < 5e-3


def test_float16_features_match_float32_per_position(waves):
    full = reference_model("postnorm_gru")
    half = BEATs.from_pretrained(REFERENCE / "postnorm_gru.pt", dtype=torch.float16)
    wav = waves["wav.2"]
    cos = F.cosine_similarity(half.embed(wav).features.float(), full.embed(wav).features, dim=-1)
    assert cos.min() >= COSINE_MIN


def test_bfloat16_keeps_float32_filterbank_and_conv_weight(waves):
    half = BEATs.from_pretrained(REFERENCE / "postnorm_gru.pt", dtype=torch.bfloat16)
    features, _ = half.preprocess(waves["wav.0"])
    full_features, _ = reference_model("postnorm_gru").preprocess(waves["wav.0"])
    assert features.dtype == torch.float32
    assert torch.equal(features, full_features)
    conv = half.encoder.pos_conv[0]
    assert conv.weight().dtype == torch.float32  # weight norm in float32, then cast


def test_bfloat16_padded_batch_is_close_to_clips_alone(waves):
    half = BEATs.from_pretrained(REFERENCE / "postnorm_gru.pt", dtype=torch.bfloat16)
    clips = [waves[f"wav.{i}"] for i in range(3)]
    batch, lengths = padded_batch(clips)
    together = half.embed(batch, lengths=lengths)
    for b, clip in enumerate(clips):
        alone = half.embed(clip).features[0]
        got = together.features[b, : alone.shape[0]]
        assert F.cosine_similarity(got.float(), alone.float(), dim=-1).min() >= COSINE_MIN


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_filterbank_is_float32_under_autocast(dtype, waves):
    """Mixed-precision frameworks run the whole model under autocast: the filterbank must
    not follow it (float16 overflows its energies to inf, the features to NaN)."""
    from beats.fbank import fbank

    wav = waves["wav.1"]
    plain, frames = fbank(wav)
    with torch.autocast("cpu", dtype=dtype):
        mixed, mixed_frames = fbank(wav)
    assert mixed.dtype == torch.float32
    assert torch.equal(mixed, plain) and torch.equal(mixed_frames, frames)


@pytest.mark.parametrize("case", ["postnorm_gru", "prenorm_glu"])
def test_float16_autocast_features_are_finite_and_match_float32(case, waves):
    full = reference_model(case)
    wav = waves["wav.2"]
    with torch.no_grad():
        ref = full.extract_features(wav).features
        with torch.autocast("cpu", dtype=torch.float16):
            out = full.extract_features(wav).features
    assert torch.isfinite(out).all()
    cos = F.cosine_similarity(out.float(), ref, dim=-1)
    assert cos.min() >= COSINE_MIN, float(cos.min())
