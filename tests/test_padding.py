"""Padding done right: batched outputs equal per-clip outputs, and the patch mask is exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from beats import patch_padding_mask

from .conftest import ENCODER_CASES, padded_batch, reference_model

BATCH_TOL = 1e-5


@pytest.mark.parametrize("case", ENCODER_CASES)
def test_padded_batch_equals_clips_alone(case, waves):
    model = reference_model(case)
    clips = [waves[f"wav.{i}"] for i in range(3)]
    batch, lengths = padded_batch(clips)
    with torch.no_grad():
        together = model.extract_features(batch, lengths=lengths, output_hidden_states=True)
        for b, clip in enumerate(clips):
            alone = model.extract_features(clip, output_hidden_states=True)
            frames = 1 + (len(clip) - 400) // 160
            valid = 8 * (frames // 16)
            mask = together.padding_mask[b]
            assert int((~mask).sum()) == valid
            assert not mask[:valid].any() and mask[valid:].all()
            assert alone.features.shape[1] == valid
            got = together.features[b, :valid]
            assert (got - alone.features[0]).abs().max() <= BATCH_TOL
            for j, h in enumerate(together.hidden_states):
                diff = (h[b, :valid] - alone.hidden_states[j][0]).abs().max()
                assert diff <= BATCH_TOL, f"hidden state {j}"
            assert (together.features[b, valid:] == 0).all()
            if together.probs is not None:
                assert (together.probs[b] - alone.probs[0]).abs().max() <= BATCH_TOL


def test_padding_mask_and_lengths_and_list_agree(waves):
    model = reference_model("postnorm_gru")
    clips = [waves[f"wav.{i}"] for i in range(3)]
    batch, lengths = padded_batch(clips)
    sample_mask = torch.arange(batch.shape[1]) >= lengths[:, None]
    with torch.no_grad():
        by_lengths = model.extract_features(batch, lengths=lengths)
        by_mask = model.extract_features(batch, padding_mask=sample_mask)
        by_list = model.extract_features(clips)
        by_numpy = model.extract_features(batch.numpy(), padding_mask=sample_mask.numpy())
    for other in (by_mask, by_list, by_numpy):
        assert torch.equal(other.features, by_lengths.features)
        assert torch.equal(other.padding_mask, by_lengths.padding_mask)


def test_garbage_in_padding_does_not_leak(waves):
    model = reference_model("postnorm_gru")
    clips = [waves["wav.0"], waves["wav.2"]]
    batch, lengths = padded_batch(clips)
    noisy = batch.clone()
    noisy[0, lengths[0]:] = torch.rand(int(batch.shape[1] - lengths[0])) * 2 - 1
    noisy[0, -10:] = float("nan")  # even NaN in the padding must not matter
    with torch.no_grad():
        clean = model.extract_features(batch, lengths=lengths)
        dirty = model.extract_features(noisy, lengths=lengths)
    assert torch.equal(clean.features, dirty.features)


def test_patch_padding_mask_counts():
    # n samples -> T = 1 + (n - 400) // 160 frames -> 8 * (T // 16) valid positions.
    lengths = torch.tensor([2800, 2959, 2960, 16000, 160000])
    frames = [16, 16, 17, 98, 998]
    mask = patch_padding_mask(lengths, 8 * (998 // 16))
    assert (~mask).sum(dim=1).tolist() == [8 * (t // 16) for t in frames]


def test_original_misaligned_mask_would_differ(waves):
    """The original maps sample padding to patches by reshaping; show our mask is not that."""
    lengths = torch.tensor([16000, 40000])
    n = 40000
    ours = patch_padding_mask(lengths, 8 * ((1 + (n - 400) // 160) // 16))
    sample_mask = (torch.arange(n) >= lengths[:, None]).numpy()
    s = ours.shape[1]
    extra = n % s
    theirs = sample_mask[:, : n - extra].reshape(2, s, -1).all(-1)
    assert int((~ours[0]).sum()) == 48
    assert int((~torch.from_numpy(np.ascontiguousarray(theirs[0]))).sum()) != 48
