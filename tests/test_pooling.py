"""Layer choice and pooling of encoder outputs, on a real reference model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from beats.pooling import PoolingSpec, parse_layers, pool, step_centres

from .conftest import padded_batch, reference_model


@pytest.fixture(scope="module")
def batch_output(waves):
    model = reference_model("postnorm_gru")
    clips = [waves["wav.0"], waves["wav.2"]]
    wav, lengths = padded_batch(clips)
    with torch.no_grad():
        return model.extract_features(wav, lengths=lengths, output_hidden_states=True)


def test_time_resolved_keeps_valid_steps_only(batch_output):
    keep = pool(batch_output, PoolingSpec(time="none", freq="keep"), 3)
    assert keep[0].shape == (6, 8, 48) and keep[1].shape == (15, 8, 48)  # 98 // 16, 248 // 16
    assert torch.equal(keep[0].reshape(48, 48), batch_output.features[0, :48])
    avg = pool(batch_output, PoolingSpec(time="none", freq="mean"), 3)
    assert torch.allclose(avg[1], batch_output.features[1].view(-1, 8, 48)[:15].mean(1))


def test_mean_and_std_over_valid_steps(batch_output):
    feats = batch_output.features[0, :48].view(6, 8, 48).mean(1)  # (T, C)
    mean = pool(batch_output, PoolingSpec(time="mean", freq="mean"), 3)[0]
    assert torch.allclose(mean, feats.mean(0), atol=1e-6)
    both = pool(batch_output, PoolingSpec(time="mean+std", freq="mean"), 3)[0]
    assert both.shape == (96,)
    assert torch.allclose(both[48:], torch.from_numpy(feats.numpy().std(0)), atol=1e-5)


def test_layers(batch_output):
    all_layers = pool(batch_output, PoolingSpec(layers="all", time="mean"), 3)[0]
    assert all_layers.shape == (4, 48)
    some = pool(batch_output, PoolingSpec(layers=(0, 3), time="none", freq="keep"), 3)[1]
    assert some.shape == (2, 15, 8, 48)
    assert torch.equal(some[1].reshape(-1, 48), batch_output.hidden_states[3][1, :120])
    with pytest.raises(ValueError, match="layer 4 does not exist"):
        pool(batch_output, PoolingSpec(layers=(4,)), 3)


def test_parse_and_validate():
    assert parse_layers("last") == "last" and parse_layers("ALL") == "all"
    assert parse_layers("4,8, 12") == (4, 8, 12)
    with pytest.raises(ValueError, match="--layers"):
        parse_layers("top")
    with pytest.raises(ValueError, match="time pooling"):
        PoolingSpec(time="max")
    with pytest.raises(ValueError, match="frequency pooling"):
        PoolingSpec(freq="sum")


def test_step_centres():
    # step t spans samples 2560 t .. 2560 t + 2799 at 16 kHz
    expected = [(2560 * t + 1400) / 16000 for t in range(4)]
    assert np.allclose(step_centres(4), expected)
