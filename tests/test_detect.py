"""Frame scores and detection in Python: frame logits against the clip logits (and the
original implementation's probabilities), long clips against extract's windows, and live
streams, fed in pieces, against the whole recording."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from beats import BEATs
from beats.audio import load_audio
from beats.detect import DetectConfig, Detector
from beats.errors import InputError
from beats.inputs import pad_to_minimum
from beats.windows import extract_windowed, frame_scores_windowed, num_steps

from .audio_files import needs_sox, sox
from .conftest import NUM_WAVES, REFERENCE, padded_batch, reference_model

# Thresholds at which the reference model (random weights) finds events of every class
# in the soundscape below.
THRESHOLDS = {"Speech": 0.6, "Music": 0.45, "Animal": 0.72, "Vehicle": 0.6, "Silence": 0.8}
SETTINGS = {"threshold": THRESHOLDS, "median_filter": 0.5, "min_gap": 0.3}


def soundscape(path, rate: int = 16000, channels: int = 1):
    """25 s: a tone, white noise, a sweep and pink noise (three windows of 10 s); -R: the
    same noise every time."""
    sox("-R", "-n", "-r", str(rate), "-c", str(channels), "-b", "16", str(path),
        "synth", "6", "sine", "440", "vol", "0.5", ":", "synth", "5", "whitenoise", "vol",
        "0.3", ":", "synth", "8", "sine", "300-3000", "vol", "0.5", ":", "synth", "6",
        "pinknoise", "vol", "0.2")
    return path


@pytest.fixture(scope="module")
def scape(tmp_path_factory):
    return soundscape(tmp_path_factory.mktemp("scape") / "scape.wav")


def pieces(wav: np.ndarray, rng: np.random.Generator | None, size: int = 1600):
    start = 0
    while start < len(wav):
        step = size if rng is None else int(rng.integers(1, 20000))
        yield wav[start : start + step]
        start += step


def test_frame_logits_average_to_the_clip_logits(waves, expected):
    model = reference_model("finetuned")
    clips = [waves[f"wav.{i}"] for i in range(NUM_WAVES)]
    alone = []
    with torch.inference_mode():
        for i, clip in enumerate(clips):
            out = model.embed(clip)
            assert out.frame_logits.shape == (1, num_steps(len(clip)), 5)
            assert (out.frame_logits.mean(dim=1) - out.logits).abs().max() <= 1e-5
            probs = torch.sigmoid(out.frame_logits.mean(dim=1))[0]
            assert (probs - expected["finetuned"][f"probs.{i}"]).abs().max() <= 1e-5
            alone.append(out.frame_logits[0])
        batch, lengths = padded_batch(clips[:3])
        out = model.embed(batch, lengths=lengths)
    assert out.step_padding_mask.any()
    for b in range(3):
        valid = ~out.step_padding_mask[b]
        frames = out.frame_logits[b][valid]
        assert frames.shape == alone[b].shape
        assert (frames.mean(dim=0) - out.logits[b]).abs().max() <= 1e-5
        assert (frames - alone[b]).abs().max() <= 1e-5
        assert (out.frame_logits[b][~valid] == 0).all()
    assert out.step_times[:2].tolist() == [0.0875, 0.2475]


def test_long_clips_are_scored_in_extract_windows(waves):
    model = reference_model("finetuned")
    wav = torch.cat([waves["wav.4"], waves["wav.2"], waves["wav.1"]])  # 14 s
    scores = frame_scores_windowed(model, wav, window_s=4.0, hop_s=2.0)
    assert len(scores.windows) == 7  # 6 every 12 steps and the last, moved back
    with torch.inference_mode():
        stitched = extract_windowed(model, wav, window_s=4.0, hop_s=2.0)
        logits = model.predictor(stitched.features).view(-1, 8, 5).mean(dim=1)
    assert (scores.logits - logits).abs().max() <= 1e-5
    assert (scores.probs - torch.sigmoid(logits)).abs().max() <= 1e-5
    assert torch.equal(scores.step_times, stitched.step_times)
    # A clip within one window is scored whole, as extract_features scores it.
    short = frame_scores_windowed(model, waves["wav.4"])
    with torch.inference_mode():
        whole = model.embed(waves["wav.4"]).frame_logits[0]
    assert torch.equal(short.logits, whole)


@needs_sox
def test_a_stream_in_pieces_gives_the_events_of_the_file(scape):
    detector = Detector(reference_model("finetuned"), DetectConfig(**SETTINGS))
    wav, _ = load_audio(scape)
    whole = detector.events(wav)
    assert len(whole) >= 5 and len({e.label for e in whole}) >= 3
    rng = np.random.default_rng(0)
    for chooser in (None, rng):
        stream = detector.stream()
        early = []
        for piece in pieces(wav, chooser):
            for event in stream.push(piece):
                early.append(event)
                if chooser is None:  # pieces of 0.1 s: the latency holds to 0.1 s
                    assert stream.seconds - event.offset <= stream.latency + 0.1
        assert early, "no event before the end of the stream"
        assert sorted(early + stream.flush()) == sorted(whole)
    # window 62 steps, median 3 steps (half: 1), gaps of 1 step bridged
    assert detector.latency == pytest.approx(0.16 * (62 + 1 + 1) + 0.175)


@needs_sox
def test_a_stream_at_another_rate_and_channels_gives_the_events_of_the_file(tmp_path):
    path = soundscape(tmp_path / "stereo.wav", rate=22050, channels=2)
    detector = Detector(reference_model("finetuned"), DetectConfig(**SETTINGS))
    wav, _ = load_audio(path)  # 16 kHz mono, as beats detect reads it
    whole = detector.events(wav)
    assert whole
    pcm, rate = sf.read(path, dtype="int16")
    stream = detector.stream(sample_rate=rate, channels=2)
    got = []
    for piece in pieces(pcm, np.random.default_rng(1)):
        got += stream.push(piece)
    assert sorted(got + stream.flush()) == sorted(whole)


def test_short_streams_give_the_events_of_short_files():
    detector = Detector(reference_model("finetuned"), DetectConfig(threshold=0.6))
    rng = np.random.default_rng(2)
    found = 0
    for size in (1000, 2800, 50_000):  # zero-padded, one step, one window
        wav = (0.3 * rng.standard_normal(size)).astype(np.float32)
        whole = detector.events(pad_to_minimum(wav))
        stream = detector.stream()
        got = [e for piece in pieces(wav, rng) for e in stream.push(piece)]
        assert sorted(got + stream.flush()) == sorted(whole)
        found += len(whole)
    assert found
    with pytest.raises(InputError, match="needs windows"):
        Detector(reference_model("finetuned"), DetectConfig(window=None)).stream()


def test_single_label_models_give_a_distribution_per_step(waves):
    model = BEATs.from_pretrained(REFERENCE / "finetuned.pt",
                                  config={"predictor_activation": "softmax"})
    wav = waves["wav.4"]
    scores = Detector(model, DetectConfig(threshold=0.3)).frame_scores(wav)
    np.testing.assert_allclose(scores.probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(scores.probs, torch.from_numpy(scores.logits).softmax(-1),
                               atol=1e-6)
    with torch.inference_mode():
        clip = model.embed(wav).probs[0]
    mean = torch.from_numpy(scores.logits).mean(dim=0).softmax(-1)
    assert (clip - mean).abs().max() <= 1e-5


def test_model_detect_gives_events_per_clip(waves):
    model = reference_model("finetuned")
    clips = [waves["wav.4"], waves["wav.2"]]
    events = model.detect(clips, threshold=0.62, classes=["Animal; silence", "/m/09x0r"])
    assert len(events) == 2 and events[0]
    detector = Detector(model, DetectConfig(threshold=0.62,
                                            classes=["Animal", "Silence", "Speech"]))
    for clip, found in zip(clips, events, strict=True):
        assert found == detector.events(clip)
        assert {e.label for e in found} <= {"Animal", "Silence", "Speech"}
    # Thresholds may name classes left out by `classes`, or give one per chosen class.
    chosen = DetectConfig(threshold={"Music": 0.9, "Speech": 0.3, "*": 0.7},
                          classes=["Speech", "Silence"])
    assert Detector(model, chosen).post.thresholds == (0.3, 0.7)
    chosen = DetectConfig(threshold=[0.3, 0.7], classes=["Speech", "Silence"])
    assert Detector(model, chosen).post.thresholds == (0.3, 0.7)
    with pytest.raises(InputError, match="did you mean 'Animal'"):
        model.detect(clips[0], classes=["Animals"])
    with pytest.raises(InputError, match="unknown detection options"):
        model.detect(clips[0], treshold=0.5)
    with pytest.raises(InputError, match="fine-tuned"):
        reference_model("postnorm_gru").detect(clips[0])
