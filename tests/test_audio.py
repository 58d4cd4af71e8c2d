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


@needs_sox
def test_absurd_sample_rates_are_refused_before_decoding(tmp_path):
    # sox writes what it is told: a 1 Hz header over 3000 samples would be resampled
    # 16 000-fold (48 M samples); 64 kB of 1 Hz WAV would be 8.9 hours
    from .audio_files import sox

    wav = tmp_path / "onehz.wav"
    sox("-r", "1", "-n", "-b", "16", str(wav), "synth", "3000s", "sine", "0.1")
    flac = tmp_path / "onehz.flac"
    sox("-r", "1", "-n", "-b", "16", str(flac), "synth", "3000s", "sine", "0.1")
    assert audio_info(wav).sample_rate == 1 and audio_info(flac).frames == 3000
    for path in (wav, flac):
        with pytest.raises(AudioError, match=r"sample rate of 1 Hz, outside the 1000 to "
                                             r"1000000 Hz of real audio"):
            load_audio(path)
    fast = tmp_path / "two-mhz.wav"
    sf.write(str(fast), np.zeros(4000, dtype=np.float32), 2_000_000)
    with pytest.raises(AudioError, match="sample rate of 2000000 Hz"):
        load_audio(fast)


@needs_sox
def test_max_duration_is_checked_on_the_header(tmp_path):
    path = sox_tone(tmp_path / "three.wav", seconds=3.0)
    with pytest.raises(AudioError, match=r"claims 0:00:03.0 \(3.0 s\) of audio, longer than "
                                         r"the limit of 0:00:02.0"):
        load_audio(path, max_duration=2.0)
    assert len(load_audio(path, max_duration=3.0)[0]) == 48000
    assert len(load_audio(path, offset=1.5, max_duration=2.0)[0]) == 24000  # the part read


@needs_sox
def test_block_reading_equals_whole_file_decoding(tmp_path):
    # 8 channels at 192 kHz over several blocks: decoded, downmixed and resampled block by
    # block, against the whole file decoded at once and resampled in one call
    from .audio_files import sox

    channels = [sox_tone(tmp_path / f"c{c}.wav", seconds=1.7, rate=192000,
                         freq=f"{200 + 700 * c}-{900 + 500 * c}") for c in range(8)]
    path = tmp_path / "multi.flac"
    sox("-M", *map(str, channels), "-b", "24", str(path))
    info = audio_info(path)
    assert (info.channels, info.sample_rate, info.frames) == (8, 192000, 326400)
    whole, _ = sf.read(str(path), dtype="float32", always_2d=True)
    for channel in (None, 3):
        mono = whole.mean(axis=1, dtype=np.float32) if channel is None else whole[:, channel]
        want = resample(mono, 192000)
        got, got_info = load_audio(path, channel=channel)
        assert got.shape == want.shape == (27200,)
        assert np.abs(got - want).max() <= 1e-6, channel
        assert got_info.frames == 326400 and got_info.warning is None
    part, _ = load_audio(path, offset=0.5, duration=0.9)
    assert np.abs(part - resample(whole[96000:268800].mean(axis=1, dtype=np.float32),
                                  192000)).max() <= 1e-6
    at_rate, _ = load_audio(path, sample_rate=192000)  # no resampling: the mean itself
    assert np.array_equal(at_rate, whole.mean(axis=1, dtype=np.float32))


@needs_sox
def test_memory_of_a_long_192k_8_channel_file_stays_small(tmp_path):
    # Decoding the whole file first held 30 s x 192 kHz x 8 channels of float32 (184 MB);
    # read in blocks, the peak is the 16 kHz mono result and one block. tracemalloc sees
    # numpy's allocations (soundfile decodes into numpy arrays).
    import tracemalloc

    from .audio_files import sox

    channels = [sox_tone(tmp_path / f"c{c}.wav", seconds=30, rate=192000, freq=str(300 * (c + 1)))
                for c in range(8)]
    path = tmp_path / "long.flac"
    sox("-M", *map(str, channels), str(path))
    for c in channels:
        c.unlink()
    whole_bytes = 30 * 192000 * 8 * 4
    load_audio(path, duration=0.1)  # warm up the libraries
    tracemalloc.start()
    try:
        wav, _ = load_audio(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(wav) == 480000
    print(f"peak {peak / 1e6:.1f} MB traced; whole-file float32 {whole_bytes / 1e6:.0f} MB")
    assert peak < 0.05 * whole_bytes  # 9.2 MB: the 1.9 MB result, its pieces, one block


@needs_sox
def test_truncated_flac_gives_the_audio_before_the_cut(tmp_path):
    full = tmp_path / "full.flac"
    sox_tone(full, seconds=10.0, rate=48000, channels=2, freq="300-3000")
    data = full.read_bytes()
    cut = tmp_path / "cut.flac"
    cut.write_bytes(data[: len(data) // 3])  # a copy that stopped a third of the way
    assert audio_info(cut).frames == 480000  # the header still claims 10 s
    wav, info = load_audio(cut, sample_rate=48000)
    reference, _ = load_audio(full, sample_rate=48000)
    assert 48000 * 2 < info.frames < 48000 * 5 and len(wav) == info.frames
    assert np.array_equal(wav, reference[: len(wav)])  # lossless: the very same samples
    assert "decoding stopped at" in info.warning and "10.000 s the header claims" in info.warning
    resampled, info16 = load_audio(cut)
    assert info16.frames == info.frames and abs(len(resampled) - info.frames / 3) <= 1
