"""The batched filterbank: per-clip lengths, frame counts, torchaudio when present."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from beats.fbank import FBANK_MEAN, FBANK_STD, fbank, num_frames

from .conftest import padded_batch


@pytest.mark.parametrize("n, frames", [(399, 0), (400, 1), (559, 1), (560, 2), (16000, 98)])
def test_num_frames(n, frames):
    assert num_frames(n) == frames
    assert int(num_frames(torch.tensor(n))) == frames


def test_batch_equals_clips_alone(waves):
    clips = [waves[f"wav.{i}"] for i in range(5)]
    batch, lengths = padded_batch(clips)
    together, frames = fbank(batch, lengths)
    for i, clip in enumerate(clips):
        alone, n = fbank(clip)
        assert int(frames[i]) == int(n[0]) == alone.shape[1]
        assert torch.equal(together[i, : int(n[0])], alone[0])
        assert (together[i, int(n[0]):] == 0).all()


def test_normalisation(waves):
    raw, _ = fbank(waves["wav.0"], normalize=False)
    norm, _ = fbank(waves["wav.0"])
    assert torch.allclose(norm, (raw - FBANK_MEAN) / (2 * FBANK_STD))


def test_silence_hits_the_log_floor():
    out, _ = fbank(torch.zeros(1, 1000), normalize=False)
    assert torch.allclose(out, torch.full_like(out, torch.log(torch.tensor(1.1920929e-07))))


def test_shorter_than_one_frame_gives_no_frames():
    out, frames = fbank(torch.zeros(2, 300))
    assert out.shape == (2, 0, 128) and frames.tolist() == [0, 0]


@pytest.mark.skipif(importlib.util.find_spec("torchaudio") is None, reason="torchaudio absent")
def test_matches_torchaudio_when_installed(waves):  # pragma: no cover - no wheel here
    import torchaudio

    for i in range(3):
        wav = waves[f"wav.{i}"]
        ref = torchaudio.compliance.kaldi.fbank(
            wav.unsqueeze(0) * 32768, num_mel_bins=128, sample_frequency=16000,
            frame_length=25, frame_shift=10,
        )
        ours, _ = fbank(wav, normalize=False)
        assert (ours[0] - ref).abs().max() <= 2e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_on_gpu_matches_cpu(waves):  # pragma: no cover - CPU CI
    wav = waves["wav.2"]
    cpu, _ = fbank(wav)
    gpu, _ = fbank(wav.cuda())
    assert (gpu.cpu() - cpu).abs().max() < 1e-3


def test_dft_product_equals_fft():
    from beats.fbank import _tables

    _, _, dft = _tables(torch.device("cpu"))
    frames = torch.randn(64, 400, dtype=torch.float64) * 3000
    spectrum = torch.fft.rfft(frames, n=512)
    want = spectrum.real.square() + spectrum.imag.square()
    parts = (frames @ dft).square()
    got = parts[:, :257] + parts[:, 257:]
    assert ((got - want).abs() / want.max()).max() < 1e-13
