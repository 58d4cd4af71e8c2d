"""The HEAR 2021 API on a reference model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from beats import hear
from beats.windows import extract_windowed, num_steps

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


def test_short_clip_timestamps_lie_within_the_clip():
    model = hear.load_model(str(REFERENCE / "postnorm_gru.pt"), device="cpu")
    for n in (0, 1, 1000, 1399, 2799):
        emb, times = hear.get_timestamp_embeddings(torch.zeros(2, n), model)
        assert emb.shape == (2, 1, 48) and times.shape == (2, 1)
        assert 0 <= times[0, 0].item() <= 1000 * n / 16000
        assert times[0, 0].item() == 500 * n / 16000  # the middle of the audio
    _, times = hear.get_timestamp_embeddings(torch.zeros(1, 2800), model)
    assert times.tolist() == [[87.5]]


def test_numpy_input_gives_the_same_as_a_tensor(waves):
    model = hear.load_model(str(REFERENCE / "postnorm_gru.pt"), device="cpu")
    audio = torch.stack([waves["wav.0"], waves["wav.0"] * 0.3])
    emb, times = hear.get_timestamp_embeddings(audio.numpy(), model)
    ref, ref_times = hear.get_timestamp_embeddings(audio, model)
    assert torch.equal(emb, ref) and torch.equal(times, ref_times)
    assert torch.equal(hear.get_scene_embeddings(audio.numpy(), model),
                       hear.get_scene_embeddings(audio, model))


@pytest.mark.parametrize("n", [1000, 40000, 200000])
def test_empty_batch_gives_empty_outputs_of_the_right_shape(n):
    model = hear.load_model(str(REFERENCE / "postnorm_gru.pt"), device="cpu")
    emb, times = hear.get_timestamp_embeddings(torch.zeros(0, n), model)
    steps = len(hear.timestamps(n))
    assert emb.shape == (0, steps, 48) and emb.dtype == torch.float32
    assert times.shape == (0, steps) and times.dtype == torch.float32
    scene = hear.get_scene_embeddings(np.zeros((0, n), dtype=np.float32), model)
    assert scene.shape == (0, 48) and scene.dtype == torch.float32


def test_long_clips_are_embedded_in_windows_like_extract(waves):
    """25 s clips: three windows each, stitched as `extract_windowed` stitches them."""
    model = hear.load_model(str(REFERENCE / "postnorm_gru.pt"), device="cpu")
    long = torch.cat([waves["wav.4"], waves["wav.2"].flip(0), waves["wav.4"] * 0.5,
                      waves["wav.2"]])  # 400000 samples
    audio = torch.stack([long, long.flip(0)])
    emb, times = hear.get_timestamp_embeddings(audio, model)
    steps = num_steps(400000)
    assert emb.shape == (2, steps, 48) and emb.dtype == torch.float32
    assert np.allclose(times[1].numpy(), 87.5 + 160 * np.arange(steps))
    assert times[0, -1] + 87.5 <= 25000  # the last step ends within the clip
    for i in range(2):
        ref = extract_windowed(model, audio[i], window_s=10.0, hop_s=8.0).features
        assert torch.allclose(emb[i], ref.view(steps, 8, 48).mean(1), atol=1e-6)
    scene = hear.get_scene_embeddings(audio, model)
    assert torch.allclose(scene, emb.mean(1), atol=1e-6)


_TWENTY_MINUTES = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))  # safety net: never swap
import torch
from beats import BEATs, hear
from tests.conftest import tiny_config

torch.manual_seed(0)
model = BEATs(tiny_config()).eval()
n = 20 * 60 * 16000
audio = (0.3 * torch.sin(torch.arange(n, dtype=torch.float32) * 0.01)).unsqueeze(0)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
emb, times = hear.get_timestamp_embeddings(audio, model)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(tuple(emb.shape), float(times[0, 0]), float(times[0, -1]),
      bool(torch.isfinite(emb).all()), (peak - base) // 1024)
"""


@pytest.mark.slow
def test_twenty_minutes_in_bounded_memory():
    """HEAR's longest clips: one pass of attention would need a 4 x 60000^2 mask (58 GB)."""
    done = subprocess.run([sys.executable, "-c", _TWENTY_MINUTES], capture_output=True,
                          text=True, timeout=600, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout.strip().rsplit(") ", 1)
    first, last, finite, grown_mib = out[1].split()
    assert out[0] == "(1, 7499, 48"
    assert float(first) == 87.5 and float(last) == 87.5 + 160 * 7498  # to 1199.9 s of 1200 s
    assert finite == "True"
    assert int(grown_mib) < 1024  # measured: about 250 MiB above the loaded model
