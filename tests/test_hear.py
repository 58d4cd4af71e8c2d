"""The HEAR 2021 API on a reference model."""

from __future__ import annotations

import numpy as np
import torch

from beats import hear

from .conftest import REFERENCE


def test_hear_api(waves):
    model = hear.load_model(str(REFERENCE / "postnorm_gru.pt"), device="cpu")
    assert model.sample_rate == 16000
    assert model.scene_embedding_size == model.timestamp_embedding_size == 48
    audio = torch.stack([waves["wav.2"], waves["wav.2"].flip(0) * 0.5])  # 2 x 40000 samples
    emb, times = hear.get_timestamp_embeddings(audio, model)
    steps = (1 + (40000 - 400) // 160) // 16
    assert emb.shape == (2, steps, 48) and times.shape == (2, steps)
    assert np.allclose(times[0].numpy(), 87.5 + 160 * np.arange(steps))
    with torch.no_grad():
        alone = model.extract_features(audio[1]).features[0].view(steps, 8, 48).mean(1)
    assert torch.allclose(emb[1], alone, atol=1e-5)
    scene = hear.get_scene_embeddings(audio, model)
    assert scene.shape == (2, 48)
    assert torch.allclose(scene, emb.mean(1), atol=1e-6)


def test_hear_pads_very_short_clips():
    model = hear.load_model(str(REFERENCE / "postnorm_gru.pt"), device="cpu")
    emb, times = hear.get_timestamp_embeddings(torch.zeros(3, 1000), model)
    assert emb.shape == (3, 1, 48) and times.shape == (3, 1)
