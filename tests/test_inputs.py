"""Bad input gets a clear TypeError/ValueError; integer PCM is converted from full scale."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from .conftest import reference_model


@pytest.fixture(scope="module")
def model():
    return reference_model("postnorm_gru")


def _wave(n=16000, seed=0):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) * 1.6 - 0.8


def test_one_dimensional_and_batched_agree(model):
    wav = _wave()
    with torch.no_grad():
        one = model.extract_features(wav)
        two = model.extract_features(wav.unsqueeze(0))
    assert one.features.shape == (1, 48, 48)
    assert torch.equal(one.features, two.features)


@pytest.mark.parametrize("shape", [(), (2, 1, 16000), (1, 2, 3, 16000)])
def test_wrong_rank(model, shape):
    with pytest.raises(ValueError, match=r"\(N,\) or \(B, N\)"):
        model.extract_features(torch.zeros(shape))


def test_channel_axis_three_d_hints_downmix(model):
    with pytest.raises(ValueError, match="downmix"):
        model.extract_features(torch.zeros(1, 2, 16000))


def test_stereo_samples_by_channels(model):
    stereo = np.zeros((16000, 2), dtype=np.float32)
    with pytest.raises(ValueError, match=r"\(samples, channels\).*downmix"):
        model.extract_features(stereo)


@pytest.mark.parametrize("wav", [torch.zeros(0), torch.zeros(2, 0), torch.zeros(0, 16000)])
def test_empty(model, wav):
    with pytest.raises(ValueError, match="empty"):
        model.extract_features(wav)


def test_empty_list(model):
    with pytest.raises(ValueError, match="empty"):
        model.extract_features([])


def test_too_short_names_minimum_and_items(model):
    with pytest.raises(ValueError, match=r"clip\(s\) \[0\].*2799.*at least 2800 samples"):
        model.extract_features(torch.zeros(2799))
    batch = torch.zeros(3, 16000)
    with pytest.raises(ValueError, match=r"clip\(s\) \[1, 2\].*at least 2800"):
        model.extract_features(batch, lengths=torch.tensor([16000, 2000, 100]))


def test_exactly_minimum_is_one_time_step(model):
    with torch.no_grad():
        out = model.extract_features(_wave(2800))
    assert out.features.shape[1] == 8


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_inf_names_items(model, bad):
    batch = torch.stack([_wave(), _wave(seed=1), _wave(seed=2)])
    batch[2, 500] = bad
    with pytest.raises(ValueError, match=r"NaN or Inf in batch item\(s\) \[2\]"):
        model.extract_features(batch)


@pytest.mark.parametrize(
    "dtype, scale, offset",
    [(np.int16, 32768, 0), (np.int32, 2**31, 0), (np.int8, 128, 0), (np.uint8, 128, 128)],
)
def test_integer_pcm_is_converted_from_full_scale(model, dtype, scale, offset):
    info = np.iinfo(dtype)
    rng = np.random.default_rng(0)
    pcm = rng.integers(info.min, info.max, size=16000, endpoint=True).astype(dtype)
    as_float = (pcm.astype(np.float64) - offset) / scale
    with torch.no_grad():
        a = model.extract_features(pcm).features
        b = model.extract_features(torch.from_numpy(as_float.astype(np.float32))).features
        c = model.extract_features(torch.from_numpy(pcm)).features
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.equal(a, c)


def test_int64_and_bool_are_refused(model):
    with pytest.raises(TypeError, match="no known PCM scale"):
        model.extract_features(torch.zeros(16000, dtype=torch.int64))
    with pytest.raises(TypeError, match="floating-point"):
        model.extract_features(torch.zeros(16000, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"torch\.Tensor or numpy"):
        model.extract_features("speech.wav")


def test_float64_and_float16_are_accepted(model):
    wav = _wave()
    with torch.no_grad():
        a = model.extract_features(wav).features
        b = model.extract_features(wav.double().numpy()).features
    assert torch.equal(a, b)


def test_loud_float_audio_warns(model):
    with pytest.warns(UserWarning, match=r"outside \[-1, 1\]"):
        model.extract_features(_wave() * 32768)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.extract_features(_wave())


def test_mask_shape_mismatch(model):
    with pytest.raises(ValueError, match=r"padding_mask has shape \(2, 100\)"):
        model.extract_features(torch.zeros(2, 16000), padding_mask=torch.zeros(2, 100, dtype=bool))


def test_mask_must_be_a_suffix(model):
    mask = torch.zeros(2, 16000, dtype=torch.bool)
    mask[1, 100:200] = True  # a hole in the middle
    with pytest.raises(ValueError, match=r"suffix.*rows \[1\]"):
        model.extract_features(torch.zeros(2, 16000), padding_mask=mask)


def test_float_mask_refused_int_mask_accepted(model):
    wav = torch.stack([_wave(), _wave(seed=1)])
    with pytest.raises(TypeError, match="bool"):
        model.extract_features(wav, padding_mask=torch.zeros(2, 16000))
    int_mask = torch.zeros(2, 16000, dtype=torch.int64)
    int_mask[1, 9000:] = 1
    with torch.no_grad():
        a = model.extract_features(wav, padding_mask=int_mask)
        b = model.extract_features(wav, lengths=torch.tensor([16000, 9000]))
    assert torch.equal(a.features, b.features)


@pytest.mark.parametrize(
    "lengths, error, match",
    [
        (torch.tensor([16000]), ValueError, r"lengths has shape \(1,\), expected \(2,\)"),
        (torch.tensor([16000, 17000]), ValueError, r"lengths must lie in \[0, 16000\]"),
        (torch.tensor([16000.0, 9000.0]), TypeError, "integers"),
    ],
)
def test_bad_lengths(model, lengths, error, match):
    with pytest.raises(error, match=match):
        model.extract_features(torch.zeros(2, 16000), lengths=lengths)


def test_mask_and_lengths_together_refused(model):
    with pytest.raises(ValueError, match="not both"):
        model.extract_features(torch.zeros(1, 16000),
                               padding_mask=torch.zeros(1, 16000, dtype=torch.bool),
                               lengths=torch.tensor([16000]))


def test_list_of_clips_with_lengths_refused(model):
    with pytest.raises(ValueError, match="carries its own lengths"):
        model.extract_features([_wave(), _wave(9000)], lengths=torch.tensor([16000, 9000]))


def test_sample_rate_resamples_like_loading_a_file(model, tmp_path):
    import soundfile as sf

    from beats.audio import load_audio

    rng = np.random.default_rng(3)
    clip = (0.3 * np.sin(np.arange(44100) * 0.05) + 0.05 * rng.standard_normal(44100))
    clip = clip.astype(np.float32)
    sf.write(tmp_path / "c.wav", clip, 44100, subtype="FLOAT")
    from_file, _ = load_audio(tmp_path / "c.wav")
    with torch.no_grad():
        a = model.extract_features(clip, sample_rate=44100)
        b = model.extract_features(from_file)
    assert torch.equal(a.features, b.features)
    # in a batch each clip is resampled on its own valid samples
    batch = np.zeros((2, 44100), dtype=np.float32)
    batch[0], batch[1, :30000] = clip, clip[:30000]
    with torch.no_grad():
        both = model.extract_features(batch, lengths=np.array([44100, 30000]), sample_rate=44100)
        short = model.extract_features(clip[:30000], sample_rate=44100)
    n = short.features.shape[1]
    assert (both.features[1, :n] - short.features[0]).abs().max() < 1e-5
    assert int((~both.padding_mask[1]).sum()) == n


def test_sample_rate_checks(model):
    with pytest.raises(ValueError, match="sample_rate must be a positive int"):
        model.extract_features(torch.zeros(16000), sample_rate=0)
    with pytest.raises(ValueError, match="at 16 kHz; BEATs needs at least 2800"):
        model.extract_features(torch.zeros(8000), sample_rate=48000)  # 2667 samples at 16 kHz
