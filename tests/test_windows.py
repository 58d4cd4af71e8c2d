"""Windowed extraction of long audio: the plan, the stitching, and agreement with direct runs."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from beats.windows import (
    STEP_SAMPLES,
    extract_windowed,
    iter_windowed,
    num_steps,
    plan_windows,
    step_times,
)

from .conftest import reference_model


def _audio(seconds: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = int(seconds * 16000)
    t = torch.arange(n) / 16000
    tone = 0.3 * torch.sin(2 * torch.pi * (200 + 300 * t) * t)
    return (tone + 0.05 * torch.randn(n, generator=g)).clamp(-1, 1)


def test_default_plan_for_a_minute():
    n = 60 * 16000
    windows = plan_windows(n)  # 10 s windows (62 steps), 8 s hop (50 steps)
    total = num_steps(n)
    assert total == 374
    assert [w.start for w in windows] == [0, 50, 100, 150, 200, 250, 300, 312]
    assert all(w.stop - w.start == 62 for w in windows)
    # Every step is kept exactly once, in order, by a window that covers it.
    assert windows[0].keep_start == 0 and windows[-1].keep_stop == total
    for a, b in pairwise(windows):
        assert a.keep_stop == b.keep_start
    for w in windows:
        assert w.start <= w.keep_start < w.keep_stop <= w.stop
    # ... by the window whose centre is nearest (ties to the earlier one).
    for t in range(total):
        dist = [abs((2 * t + 1) - (2 * w.start + 62)) for w in windows]
        owner = next(k for k, w in enumerate(windows) if w.keep_start <= t < w.keep_stop)
        assert owner == dist.index(min(dist)), t
    # Inner steps see at least (62 - 50) / 2 = 6 steps of context on each side.
    for w in windows:
        if w.start > 0:
            assert w.keep_start - w.start >= 6
        if w.stop < total:
            assert w.stop - w.keep_stop >= 6


def test_plan_rounding_and_errors():
    assert plan_windows(160000) == plan_windows(161000)  # one whole window
    assert len(plan_windows(5 * 16000, window_s=10.0)) == 1
    w = plan_windows(30 * 16000, window_s=4.0, hop_s=3.0)
    assert w[0].stop == 24 and w[1].start == 19  # 4 s -> 24 steps, 3 s -> 19 steps
    with pytest.raises(ValueError, match="hop_s"):
        plan_windows(30 * 16000, window_s=4.0, hop_s=5.0)
    with pytest.raises(ValueError, match="hop_s"):
        plan_windows(30 * 16000, hop_s=0.05)
    with pytest.raises(ValueError, match="too short"):
        plan_windows(2000)


def test_step_times_are_centres():
    times = step_times(3)
    assert times.dtype == torch.float64
    # step t reads samples [2560 t, 2560 t + 2800): centre (2560 t + 1400) / 16000 s
    assert torch.allclose(times, torch.tensor([0.0875, 0.2475, 0.4075], dtype=torch.float64))


def test_short_clip_is_one_window_and_equals_embed():
    model = reference_model("postnorm_gru")
    wav = _audio(3.3)
    out = extract_windowed(model, wav)
    direct = model.embed(wav).features[0]
    assert len(out.windows) == 1
    assert torch.equal(out.features, direct)
    assert out.step_times.shape == (direct.shape[0] // 8,)


def test_long_clip_pieces_equal_their_windows_run_alone():
    model = reference_model("postnorm_gru")
    wav = _audio(21.0)
    out = extract_windowed(model, wav, window_s=4.0, hop_s=3.0, batch_size=3)
    total = num_steps(wav.numel())
    assert out.features.shape == (8 * total, model.cfg.encoder_embed_dim)
    assert out.step_times.shape == (total,)
    assert len(out.windows) > 3
    span = STEP_SAMPLES * (out.windows[0].stop - 1) + 2800
    for w in out.windows:
        alone = model.embed(wav[STEP_SAMPLES * w.start :][:span]).features[0]
        assert alone.shape[0] == 8 * (w.stop - w.start)
        got = out.features[8 * w.keep_start : 8 * w.keep_stop]
        want = alone[8 * (w.keep_start - w.start) : 8 * (w.keep_stop - w.start)]
        assert (got - want).abs().max() <= 1e-5
    # The same sequence one window at a time, and as the iterator's pieces.
    single = extract_windowed(model, wav, window_s=4.0, hop_s=3.0, batch_size=1)
    assert (single.features - out.features).abs().max() <= 1e-5
    pieces = [p for _, p in iter_windowed(model, wav, window_s=4.0, hop_s=3.0, batch_size=3)]
    assert torch.equal(torch.cat(pieces), out.features)
    # Away from window edges the stitched sequence is close to one run over the whole file.
    direct = model.embed(wav).features[0]
    cos = torch.nn.functional.cosine_similarity(direct, out.features, dim=-1)
    assert cos.min() > 0.99


def test_output_layer_and_inputs():
    model = reference_model("postnorm_gru")
    wav = _audio(12.0)
    out = extract_windowed(model, wav, window_s=4.0, hop_s=2.0, output_layer=1)
    first = extract_windowed(model, (wav * 32767).round().to(torch.int16).numpy(),
                             window_s=4.0, hop_s=2.0, output_layer=1)
    assert out.features.shape == first.features.shape
    assert (out.features - first.features).abs().max() < 1e-2  # int16 PCM rounding only
    with pytest.raises(ValueError, match="one clip"):
        extract_windowed(model, torch.zeros(2, 16000))
    with pytest.raises(ValueError, match="batch_size"):
        extract_windowed(model, wav, batch_size=0)
