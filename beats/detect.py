"""Sound event detection with a fine-tuned BEATs: frame scores, events, live streams.

A fine-tuned model (a released AudioSet checkpoint or a ``beats finetune`` output) applies
its class head at every patch and averages the logits over the clip. Averaged over the 8
frequency bands of each 160 ms time step instead, the same logits score every step: frame
scores, with no training (their mean over a clip's steps is the clip's logits). Their
probabilities (`beats.model.BEATs.activate`: sigmoid, or softmax over classes for
single-label models) go through `beats.events` to become events.

One computation, two ways of feeding it:

- `Detector.events` takes a whole clip. A clip longer than the window is cut into the
  windows of `beats.windows` (10 s every 8 s by default) and their steps stitched, each
  window run on its own.
- `StreamingDetector` takes the same audio a few samples at a time (``push``) and returns
  each event as soon as no later audio can change it; ``flush`` ends the stream. It runs
  the same windows on the same samples (each as soon as its audio is in; the last one,
  moved back to end with the stream, at ``flush``) and feeds the same post-processing, so
  its events equal `Detector.events` on the whole recording.

Latency of a stream: step t's scores are final once the audio reaches step t + W + 1 (W:
steps of a window, 62 for 10 s), because the window that keeps step t may start as late
as step t. An event is decided ``delay_steps`` steps after its last one (half the median
filter, the longest bridged gap and one more step). So an event is returned at most
``0.16 (W + M + G) + 0.175`` seconds of audio after its offset (M: half the median
filter's steps, G: the bridged gap's steps): `Detector.latency`, 10.1 s for the defaults.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import soxr
import torch

from .audio import to_mono
from .errors import InputError, NonFiniteError
from .events import (
    STEP_SECONDS,
    Event,
    EventDecoder,
    MedianFilter,
    PostProcessing,
    class_thresholds,
    decode_events,
    step_time,
)
from .extract import ExtractOptions, Job, Summary, extract
from .fbank import SAMPLE_RATE
from .files import InputFile, discover_inputs
from .inputs import MIN_SAMPLES, ArrayLike, pad_to_minimum
from .labels import audioset_names
from .model import BEATs
from .options import option
from .outputs import EVENT_FORMATS, EventWriter, events_completed, scores_path
from .windows import (
    STEP_SAMPLES,
    STEP_SPAN,
    Window,
    frame_scores_windowed,
    num_steps,
    plan_windows,
    score_window,
    window_steps,
)

Threshold = float | Sequence[float] | Mapping[str, float] | str | os.PathLike


@dataclass(frozen=True)
class DetectConfig:
    """How frame scores become events (``beats detect``'s options)."""

    threshold: Threshold = option(
        0.5, help="a step is active when its probability is at or above the threshold: one "
        "number, one per class (of the model, or of classes), {class name: value} (\"*\": "
        "the others'), or a file of NAME VALUE lines (`beats.events.class_thresholds`)",
        flags=("--threshold",), cli=False)
    median_filter: float = option(
        0.0, help="seconds of the median filter over each class's probabilities (rounded "
        "to an odd number of 0.16 s steps; 0: none)", ge=0, metavar="SECONDS")
    min_duration: float = option(0.0, help="seconds: shorter events are dropped", ge=0,
                                 metavar="SECONDS")
    min_gap: float = option(0.0, help="seconds: events of one class closer than this are "
                            "merged", ge=0, metavar="SECONDS")
    classes: Sequence[str] | None = option(
        None, help="class names to detect (display names such as Speech, or the "
        "checkpoint's own labels such as AudioSet MIDs); an entry may list several names "
        "separated by ;", unset="all", flags=("--classes",), cli=False)
    window: float | None = option(
        10.0, help="seconds: longer audio is scored in windows of this length every hop "
        "seconds, as beats extract does", unset="a clip is scored whole (no streaming "
        "then; 0 on the command line)", flags=("--window",), cli=False)
    hop: float | None = option(None, help="seconds between window starts", gt=0,
                               unset="80% of the window", metavar="SECONDS")

    def __post_init__(self) -> None:
        if self.window is not None:
            if not (math.isfinite(self.window) and self.window * SAMPLE_RATE >= MIN_SAMPLES):
                raise InputError(f"window {self.window} s is shorter than the model's 0.175 s")
            if self.hop is None:
                object.__setattr__(self, "hop", round(0.8 * self.window, 3))
        elif self.hop is not None:
            raise InputError("hop needs a window")

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> DetectConfig:
        """A config from keyword options, refusing names that are not fields."""
        unknown = sorted(set(options) - {f.name for f in fields(cls)})
        if unknown:
            raise InputError(f"unknown detection options {unknown}; use "
                             f"{[f.name for f in fields(cls)]}")
        return cls(**options)


def class_names(model: BEATs) -> list[str]:
    """Display name of each of a fine-tuned model's classes, in index order (AudioSet
    MIDs become names such as ``Speech``; a class without a label is ``class N``)."""
    if model.predictor is None:
        raise InputError(
            "detection needs a fine-tuned model (one with a class head), such as "
            "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2 or a `beats finetune` output; this "
            "model has none")
    names, labels = audioset_names(), model.label_dict or {}
    out = []
    for i in range(model.cfg.predictor_class):
        label = labels.get(i)
        out.append(f"class {i}" if label is None else names.get(label, label))
    return out


def select_classes(
    names: Sequence[str], wanted: Sequence[str] | None, raw: Mapping[int, str] | None = None
) -> list[int]:
    """Indices (ascending) of the classes ``wanted`` names (all when None): a display
    name, a checkpoint label from ``raw`` (index -> label), or a unique case-insensitive
    match; entries may hold several names separated by ``;``."""
    if wanted is None:
        return list(range(len(names)))
    exact = {name: i for i, name in enumerate(names)}
    exact.update({label: i for i, label in (raw or {}).items() if label not in exact})
    folded: dict[str, list[int]] = {}
    for name, i in exact.items():
        folded.setdefault(name.casefold(), []).append(i)
    chosen: set[int] = set()
    for entry in wanted:
        for name in (part.strip() for part in entry.split(";")):
            if not name:
                continue
            if name in exact:
                chosen.add(exact[name])
            elif len(set(folded.get(name.casefold(), []))) == 1:
                chosen.add(folded[name.casefold()][0])
            else:
                close = difflib.get_close_matches(name, list(names), n=3)
                hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
                raise InputError(f"the model has no class {name!r}{hint} (`beats detect "
                                 "--classes` takes the model's class names)")
    if not chosen:
        raise InputError("--classes names no class")
    return sorted(chosen)


@dataclass
class FrameScores:
    """Frame scores of one clip.

    Attributes:
        probs: (steps, classes) float32 probabilities of the chosen classes.
        logits: (steps, classes) float32 frame logits of the chosen classes.
        labels: the classes' names.
    Step t stands for ``0.16 t`` to ``0.16 (t + 1)`` seconds (`onsets`, `offsets`).
    """

    probs: np.ndarray
    logits: np.ndarray
    labels: list[str]

    @property
    def onsets(self) -> np.ndarray:
        """(steps,) float64 start of each step in seconds."""
        return step_time(np.arange(len(self.probs)))

    @property
    def offsets(self) -> np.ndarray:
        """(steps,) float64 end of each step in seconds."""
        return step_time(np.arange(1, len(self.probs) + 1))

    @property
    def step_times(self) -> np.ndarray:
        """(steps,) float64 centre of the audio each step reads, ``0.16 t + 0.0875``."""
        return (STEP_SAMPLES * np.arange(len(self.probs)) + STEP_SPAN / 2) / SAMPLE_RATE


class Detector:
    """A fine-tuned model and a `DetectConfig`, resolved: the chosen classes, their
    thresholds and the post-processing in steps.

    ``Detector(model, DetectConfig(threshold=0.3)).events(wav)`` gives the events of one
    clip; `stream` gives a `StreamingDetector` with the same settings.
    """

    def __init__(self, model: BEATs, config: DetectConfig | None = None) -> None:
        self.model = model
        self.config = config or DetectConfig()
        names = class_names(model)
        self.indices = select_classes(names, self.config.classes, model.label_dict)
        self.labels = [names[i] for i in self.indices]
        threshold = self.config.threshold
        if isinstance(threshold, Sequence) and not isinstance(threshold, str) and len(
                threshold) == len(self.labels):
            thresholds = class_thresholds(threshold, self.labels)  # one per chosen class
        else:  # one, or one per class of the model (a file may name any class)
            every = class_thresholds(threshold, names)
            thresholds = [every[i] for i in self.indices]
        self.post = PostProcessing.from_seconds(
            thresholds, median_filter=self.config.median_filter,
            min_duration=self.config.min_duration, min_gap=self.config.min_gap,
        )
        self.width = self.hop = None
        if self.config.window is not None:
            assert self.config.hop is not None
            self.width, self.hop = window_steps(self.config.window, self.config.hop)

    def settings(self) -> dict[str, Any]:
        """Everything the events depend on, resolved, as JSON values (a resumed ``beats
        detect`` run must share them)."""
        cfg = self.config
        return {"classes": self.labels, "thresholds": list(self.post.thresholds),
                "median_filter": cfg.median_filter, "min_duration": cfg.min_duration,
                "min_gap": cfg.min_gap, "window": cfg.window, "hop": cfg.hop}

    @property
    def latency(self) -> float | None:
        """Seconds of audio after an event's offset by which a stream has returned it at
        the latest (None without windows): ``0.16 (W + M + G) + 0.175``."""
        if self.width is None:
            return None
        return STEP_SECONDS * (self.width + self.post.delay_steps - 1) + STEP_SPAN / SAMPLE_RATE

    def frame_scores(self, wav: ArrayLike) -> FrameScores:
        """Frame scores of one 16 kHz clip (N,) of any length (windowed when longer than
        the window)."""
        with torch.inference_mode():
            out = frame_scores_windowed(self.model, wav, window_s=self.config.window,
                                        hop_s=self.config.hop or 0.0)
            index = torch.tensor(self.indices, device=out.probs.device)
            probs = out.probs.index_select(1, index).cpu().numpy()
            logits = out.logits.index_select(1, index).cpu().numpy()
        return FrameScores(probs, logits, list(self.labels))

    def decode(self, probs: np.ndarray) -> list[Event]:
        """Events from frame probabilities (steps, chosen classes), sorted by onset."""
        return decode_events(probs, self.labels, self.post)

    def events(self, wav: ArrayLike) -> list[Event]:
        """The events of one 16 kHz clip (N,), sorted by onset."""
        return self.decode(self.frame_scores(wav).probs)

    def stream(self, sample_rate: int = SAMPLE_RATE, channels: int = 1) -> StreamingDetector:
        """A `StreamingDetector` with these settings, for audio at ``sample_rate`` Hz with
        ``channels`` channels."""
        return StreamingDetector(self, sample_rate=sample_rate, channels=channels)


@dataclass
class _Current:
    """The last window computed: its first step and its probabilities (steps, classes)."""

    start: int
    probs: np.ndarray = field(repr=False)


class StreamingDetector:
    """Events of a live stream, as soon as they are decided.

    ``push(samples)`` takes the next samples (``(n,)`` mono, or ``(n, channels)`` or
    interleaved ``(n * channels,)``; float in [-1, 1] or int16 PCM) at ``sample_rate`` Hz
    and returns the events they decide; ``flush()`` ends the stream and returns the rest.
    The events, in order of decision, are those `Detector.events` gives for the whole
    recording (same windows, same samples, same post-processing); each comes at most
    `latency` seconds of audio after its offset. Other rates are resampled with soxr's
    streaming resampler, which gives the samples ``beats.audio.load_audio`` gives.
    """

    def __init__(self, detector: Detector, *, sample_rate: int = SAMPLE_RATE,
                 channels: int = 1) -> None:
        if detector.width is None or detector.hop is None:
            raise InputError("a stream needs windows: give a window length (seconds), not "
                             "whole-clip scoring")
        if not isinstance(sample_rate, int) or sample_rate < 1000:
            raise InputError(f"sample rate must be an integer of at least 1000 Hz, got "
                             f"{sample_rate!r}")
        if not isinstance(channels, int) or channels < 1:
            raise InputError(f"channels must be a positive integer, got {channels!r}")
        self.detector = detector
        self.sample_rate = sample_rate
        self.channels = channels
        self._resampler = (None if sample_rate == SAMPLE_RATE else soxr.ResampleStream(
            sample_rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ"))
        self._audio = np.zeros(0, dtype=np.float32)  # 16 kHz samples from _offset on
        self._offset = 0
        self._received = 0  # 16 kHz samples so far
        self._next_window = 0  # index of the next regular window to run
        self._current: _Current | None = None
        self._decided = 0  # steps passed on to the post-processing
        self._median = MedianFilter(detector.post.median_steps)
        self._decoder = EventDecoder(detector.labels, detector.post)
        self._done = False

    @property
    def latency(self) -> float:
        """Seconds of audio after an event's offset by which it has been returned."""
        latency = self.detector.latency
        assert latency is not None
        return latency

    @property
    def seconds(self) -> float:
        """Seconds of audio received (at 16 kHz)."""
        return self._received / SAMPLE_RATE

    def push(self, samples: ArrayLike) -> list[Event]:
        """Take the next samples; return the events they decide (in order of decision)."""
        if self._done:
            raise InputError("this stream was flushed; start a new StreamingDetector")
        mono = self._mono(samples)
        if self._resampler is not None:
            mono = self._resampler.resample_chunk(mono)
        self._append(mono)
        return self._advance()

    def flush(self) -> list[Event]:
        """End the stream: score what is left (the last window ends with the stream) and
        return the remaining events."""
        if self._done:
            return []
        self._done = True
        if self._resampler is not None:
            self._append(self._resampler.resample_chunk(np.zeros(0, np.float32), last=True))
        if self._received == 0:
            return []
        if self._received < MIN_SAMPLES:  # a short recording is zero-padded, as files are
            self._append(np.zeros(MIN_SAMPLES - self._received, dtype=np.float32))
        cfg = self.detector.config
        assert cfg.window is not None and cfg.hop is not None
        windows = plan_windows(self._received, cfg.window, cfg.hop)
        rows = []
        for w in windows:
            if w.keep_stop <= self._decided:
                continue
            if self._current is not None and w.start == self._current.start:
                probs = self._current.probs
            else:
                probs = self._score(w, whole=len(windows) == 1)
            rows.append(probs[max(self._decided, w.keep_start) - w.start : w.keep_stop - w.start])
            self._decided = w.keep_stop
        events = self._decode(rows)
        tail = self._median.flush()
        if tail is not None:
            events += self._decoder.push(tail)
        self._current, self._audio = None, self._audio[:0]
        return events + self._decoder.flush()

    # ------------------------------------------------------------------ internals
    def _mono(self, samples: ArrayLike) -> np.ndarray:
        x = samples.detach().cpu().numpy() if isinstance(samples, torch.Tensor) else np.asarray(
            samples)
        if x.dtype == np.int16:
            x = x.astype(np.float32) / np.float32(32768.0)
        elif x.dtype.kind != "f":
            raise InputError(f"samples must be float in [-1, 1] or int16 PCM, got {x.dtype}")
        x = x.astype(np.float32, copy=False)
        if x.ndim == 1 and self.channels > 1:
            if len(x) % self.channels:
                raise InputError(f"{len(x)} interleaved samples are not whole frames of "
                                 f"{self.channels} channels")
            x = x.reshape(-1, self.channels)
        if x.ndim == 2 and x.shape[1] != self.channels:
            raise InputError(f"samples have {x.shape[1]} channels, the stream {self.channels}")
        if x.ndim not in (1, 2):
            raise InputError(f"samples must be (n,) or (n, channels), got shape {x.shape}")
        if not np.isfinite(x).all():
            raise InputError("samples hold NaN or Inf")
        return np.ascontiguousarray(to_mono(x))

    def _append(self, mono: np.ndarray) -> None:
        if len(mono):
            self._audio = np.concatenate([self._audio, mono])
            self._received += len(mono)

    def _score(self, window: Window, whole: bool) -> np.ndarray:
        """Probabilities (steps, chosen classes) of one window, run as files run it."""
        if whole:
            samples = self._audio
        else:
            first = STEP_SAMPLES * window.start - self._offset
            span = STEP_SAMPLES * (window.stop - window.start - 1) + STEP_SPAN
            samples = self._audio[first : first + span]
        with torch.inference_mode():
            _, probs = score_window(self.detector.model, torch.from_numpy(samples))
            index = torch.tensor(self.detector.indices, device=probs.device)
            return probs.index_select(1, index).cpu().numpy()

    def _advance(self) -> list[Event]:
        """Run every window whose audio is in and pass on the steps that are final."""
        width, hop = self.detector.width, self.detector.hop
        assert width is not None and hop is not None
        available = num_steps(self._received) if self._received >= MIN_SAMPLES else 0
        rows = []
        # Window k (start k * hop) is a regular window of the final plan, whatever the
        # stream's length, once the stream has more than k * hop + width steps.
        while self._next_window * hop + width < available:
            start = self._next_window * hop
            probs = self._score(Window(start, start + width, start, start + width), whole=False)
            if self._current is not None:  # the previous window's steps end at the edge
                edge = (self._current.start + start + width + 1) // 2
                rows.append(self._current.probs[self._decided - self._current.start :
                                                edge - self._current.start])
                self._decided = edge
            self._current = _Current(start, probs)
            self._next_window += 1
            drop = STEP_SAMPLES * start - self._offset  # later windows start after this one
            self._audio, self._offset = self._audio[drop:], self._offset + drop
        if self._current is not None:
            # The next window starts at the earliest at the current one + (available -
            # width) steps, so steps before this edge stay with the current window.
            limit = (self._current.start + available + 1) // 2
            if limit > self._decided:
                rows.append(self._current.probs[self._decided - self._current.start :
                                                limit - self._current.start])
                self._decided = limit
        return self._decode(rows)

    def _decode(self, rows: list[np.ndarray]) -> list[Event]:
        if not rows:
            return []
        return self._decoder.push(self._median.push(np.concatenate(rows)))


# --------------------------------------------------------------------------- many files
def detect_files(
    model: BEATs,
    inputs: Sequence[str | os.PathLike] | list[InputFile],
    output_dir: str | os.PathLike,
    config: DetectConfig | None = None,
    *,
    output_format: str = "tsv",
    save_scores: bool = False,
    num_workers: int = 2,
    resume: bool = False,
    max_duration: float | None = 4 * 3600.0,
    model_name: str = "model",
    progress: bool = True,
) -> Summary:
    """Detect the events of every input into ``output_dir`` (``beats detect``).

    Runs on the engine of `beats.extract.extract` (the same inputs, manifest, resume,
    folder lock and failure handling: a file that cannot be read or scored is recorded as
    failed and the run goes on) and writes ``events.tsv`` (DCASE: ``filename onset offset
    event_label score``), a file per input for ``output_format`` audacity, raven or json,
    and with ``save_scores`` each file's frame probabilities as
    ``scores/<name without extension>.tsv`` (sed_scores_eval's format). Each file is
    scored alone, as `Detector.events` scores it. Returns the run's `Summary`.
    """
    detector = Detector(model, config)
    if output_format not in EVENT_FORMATS:
        raise InputError(f"format {output_format!r}: choose one of {EVENT_FORMATS}")
    given = list(inputs)
    items = given if given and isinstance(given[0], InputFile) else discover_inputs(given)
    if save_scores:
        _check_score_names(Path(output_dir), items)
    fingerprint = {"model": model_name, "output": "events", **detector.settings(),
                   "format": output_format, "save_scores": save_scores}

    def compute(model: BEATs, loaded: list[Any], options: ExtractOptions) -> Iterator[Any]:
        for item in loaded:
            probs = detector.frame_scores(pad_to_minimum(item.wav)).probs
            if not np.isfinite(probs).all():  # the engine records it for this file alone
                raise NonFiniteError("the model's frame scores hold NaN or Inf although the "
                                     "audio is finite: the checkpoint may hold NaN or Inf "
                                     "weights, or a half-precision dtype overflowed (try "
                                     "--dtype float32)")
            yield item, (probs, None, len(item.wav) < MIN_SAMPLES)

    job = Job(
        command="beats detect", fingerprint=fingerprint, compute=compute,
        writer=lambda out, manifest: EventWriter(out, manifest, detector.decode,
                                                 detector.labels, output_format, save_scores),
        completed=lambda out, previous: events_completed(out, previous, output_format,
                                                         save_scores),
    )
    options = ExtractOptions(batch_size=1, num_workers=num_workers, window=None,
                             resume=resume, max_duration=max_duration)
    return extract(model, items, output_dir, options, model_name=model_name,
                   progress=progress, job=job)


def _check_score_names(output_dir: Path, items: list[InputFile]) -> None:
    """Refuse two inputs whose score files would share a name (``a.wav``, ``a.flac``)."""
    seen: dict[Path, InputFile] = {}
    for item in items:
        path = scores_path(output_dir, item.key)
        if path in seen:
            raise InputError(f"{seen[path].path} and {item.path} would write the same scores "
                             f"file ({path.name}: sed_scores_eval names scores by file name "
                             "without extension); rename one, or drop --save-scores")
        seen[path] = item
