"""Reading real audio files: formats, channels, sample rates and bad files."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from beats.audio import AudioError, audio_info, load_audio, resample, to_mono

from .audio_files import needs_espeak, needs_sox, sf_write, sox_tone, speech


@pytest.mark.parametrize(
    "name, subtype, fmt",
    [
        ("pcm8.wav", "PCM_U8", None),
        ("pcm16.wav", "PCM_16", None),
        ("pcm24.wav", "PCM_24", None),
        ("pcm32.wav", "PCM_32", None),
        ("float.wav", "FLOAT", None),
        ("double.wav", "DOUBLE", None),
        ("clip.flac", "PCM_16", None),
        ("clip.ogg", "VORBIS", None),
        ("clip.opus", "OPUS", "OGG"),
        ("clip.mp3", "MPEG_LAYER_III", None),
    ],
)
def test_formats_read_at_16k(tmp_path, name, subtype, fmt):
    path = tmp_path / name
    written = sf_write(path, seconds=1.0, rate=48000 if "opus" in name else 16000,
                       subtype=subtype, fmt=fmt)
    wav, info = load_audio(path)
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert abs(len(wav) - 16000) <= 1200  # codecs (MP3) add priming samples
    assert np.abs(wav).max() <= 1.0
    if subtype in ("PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE"):  # lossless: equal samples
        assert info.sample_rate == 16000
        tol = {"PCM_16": 1e-4, "PCM_24": 1e-6}.get(subtype, 1e-7)
        assert np.abs(wav - written[:, 0]).max() <= tol
    elif subtype == "PCM_U8":
        assert np.abs(wav - written[:, 0]).max() <= 1 / 128
    else:  # lossy codecs: the same signal, roughly
        n = min(len(wav), len(written))
        assert np.corrcoef(wav[:n], resample(written[:, 0], info.sample_rate)[:n])[0, 1] > 0.5


@needs_sox
@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_sox_tones_at_other_rates_are_resampled(tmp_path, rate):
    path = sox_tone(tmp_path / f"tone{rate}.wav", seconds=2.0, rate=rate, freq="1000")
    wav, info = load_audio(path)
    assert info.sample_rate == rate and info.duration == pytest.approx(2.0)
    assert len(wav) == 32000
    spectrum = np.abs(np.fft.rfft(wav[4000:-4000]))
    peak_hz = spectrum.argmax() * 16000 / len(wav[4000:-4000])
    assert abs(peak_hz - 1000) < 5


@needs_sox
def test_stereo_downmix_and_channel_pick(tmp_path):
    left = sox_tone(tmp_path / "l.wav", freq="300")
    right = sox_tone(tmp_path / "r.wav", freq="2000")
    both = tmp_path / "stereo.wav"
    from .audio_files import sox

    sox("-M", str(left), str(right), str(both))
    assert audio_info(both).channels == 2
    mixed, _ = load_audio(both)
    l_only, _ = load_audio(both, channel=0)
    r_only, _ = load_audio(both, channel=-1)
    assert np.allclose(mixed, (l_only + r_only) / 2, atol=1e-6)
    assert np.allclose(l_only, load_audio(left)[0], atol=1e-6)
    with pytest.raises(ValueError, match="channel 2 does not exist: the audio has 2"):
        load_audio(both, channel=2)


@needs_espeak
def test_espeak_speech(tmp_path):
    wav, info = load_audio(speech(tmp_path / "speech.wav"))
    assert info.sample_rate == 22050
    assert len(wav) == round(info.frames * 16000 / 22050)
    assert 0.05 < np.abs(wav).max() <= 1.0


def test_empty_file(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    with pytest.raises(AudioError, match=r"empty\.wav: the file is empty"):
        load_audio(path)


def test_header_only_wav_has_no_samples(tmp_path):
    path = tmp_path / "nothing.wav"
    sf.write(str(path), np.zeros((0, 1), dtype=np.float32), 16000)
    with pytest.raises(AudioError, match="holds no samples"):
        load_audio(path)


def test_text_file_with_audio_extension(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio\n" * 20)
    with pytest.raises(AudioError, match=r"notes\.wav: not a valid WAV file"):
        load_audio(path)


def test_corrupt_flac(tmp_path):
    path = tmp_path / "cut.flac"
    sf_write(path, seconds=2.0, subtype="PCM_16")
    data = bytearray(path.read_bytes())
    data[:64] = bytes(64)  # destroy the header
    path.write_bytes(bytes(data))
    with pytest.raises(AudioError, match=r"cut\.flac: not a valid FLAC file"):
        load_audio(path)


def test_unknown_format_is_named(tmp_path):
    path = tmp_path / "data.xyz"
    path.write_bytes(os.urandom(4000))
    with pytest.raises(AudioError, match=r"unknown audio format '\.xyz'"):
        load_audio(path)


def test_missing_and_directory(tmp_path):
    with pytest.raises(AudioError, match="no such file"):
        load_audio(tmp_path / "missing.wav")
    (tmp_path / "dir.wav").mkdir()
    with pytest.raises(AudioError, match="is a directory"):
        load_audio(tmp_path / "dir.wav")


def _read_as_nobody(path) -> str:
    """load_audio(path) in a child process running as uid/gid 65534; the error message."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(read_end)
        try:
            os.setgid(65534)
            os.setuid(65534)
            load_audio(path)
            message = b"read"
        except BaseException as e:
            message = f"{type(e).__name__}: {e}".encode()
        os.write(write_end, message)
        os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as f:
        return f.read().decode()


def test_unreadable_file():
    folder = Path(tempfile.mkdtemp(prefix="beats-perm-"))  # in /tmp, which others traverse
    try:
        _check_unreadable(folder)
    finally:
        shutil.rmtree(folder)


def _check_unreadable(folder: Path) -> None:
    folder.chmod(0o755)
    path = folder / "secret.wav"
    sf_write(path)
    path.chmod(0)
    if os.geteuid() != 0:
        with pytest.raises(AudioError, match="permission denied"):
            load_audio(path)
        return
    # root reads anything: check from a child that drops to an unprivileged user
    message = _read_as_nobody(path)
    assert message.startswith("AudioError") and "cannot read the file" in message, message
    folder.chmod(0o700)  # now the folder itself is closed to others
    message = _read_as_nobody(path)
    assert message.startswith("AudioError") and "cannot reach the file" in message, message


def test_to_mono_and_resample_checks():
    stereo = np.stack([np.ones(10), np.zeros(10)], axis=1).astype(np.float32)
    assert np.allclose(to_mono(stereo), 0.5)
    with pytest.raises(ValueError, match="positive"):
        resample(np.zeros(10), 0)


@needs_sox
def test_offset_and_duration_read_a_crop(tmp_path):
    path = sox_tone(tmp_path / "sweep.wav", seconds=3.0, freq="300-3000")
    whole, info = load_audio(path)
    crop, crop_info = load_audio(path, offset=1.25, duration=0.5)
    assert crop_info == info  # the info describes the whole file
    assert np.array_equal(crop, whole[20000:28000])
    tail, _ = load_audio(path, offset=2.75, duration=10.0)  # cut at the end
    assert np.array_equal(tail, whole[44000:])
    with pytest.raises(AudioError, match="past the end"):
        load_audio(path, offset=3.5)
    with pytest.raises(ValueError, match="offset"):
        load_audio(path, offset=-1.0)
