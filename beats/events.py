"""From frame scores to sound events: median filter, thresholds, gap merging, short events.

A fine-tuned model scores every 160 ms time step (`beats.detect`). Those scores become
events in four stages, each a function of the steps only, so that the same stages run on a
whole file at once or on a live stream a few steps at a time and give the same events:

1. a median filter over time, per class (``median_filter`` seconds, rounded to an odd
   number of steps; the first and last step are repeated past the ends);
2. a threshold per class: a step is active when its filtered score is at or above it;
3. gap merging: two events of one class separated by less than ``min_gap`` seconds
   become one;
4. short events go: an event shorter than ``min_duration`` seconds is dropped.

Step t stands for the time from ``0.16 t`` to ``0.16 (t + 1)`` seconds, so an event over
steps a..b runs from ``0.16 a`` to ``0.16 (b + 1)``. Its score is the highest filtered
score of its class over its steps.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import InputError

STEP_SAMPLES = 2560  # 160 ms at 16 kHz: the hop between BEATs time steps
SAMPLE_RATE = 16000
STEP_SECONDS = STEP_SAMPLES / SAMPLE_RATE


class Event(NamedTuple):
    """A detected (or annotated) sound: seconds from the start of the audio, a class name
    and a score in [0, 1] (the highest frame probability of the class over the event)."""

    onset: float
    offset: float
    label: str
    score: float = 1.0


def step_time(step: int | np.ndarray) -> float | np.ndarray:
    """Start time in seconds of time step ``step`` (float64): ``2560 step / 16000``."""
    return STEP_SAMPLES * step / SAMPLE_RATE


def format_event(event: Event) -> str:
    """``onset<TAB>offset<TAB>label<TAB>score``: times to the millisecond, score to 4
    decimals (the line ``beats detect --stream`` prints)."""
    return f"{event.onset:.3f}\t{event.offset:.3f}\t{clean_label(event.label)}\t{event.score:.4f}"


def clean_label(label: str) -> str:
    """A class name fit for a tab-separated table: tabs and line breaks become spaces."""
    return " ".join(label.replace("\t", " ").splitlines()) if any(
        c in label for c in "\t\r\n") else label


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class PostProcessing:
    """The four stages, in steps (use `from_seconds`).

    Attributes:
        thresholds: (classes,) a step is active at or above its class's threshold.
        median_steps: odd length of the median filter (1: none).
        gap_steps: gaps of at most this many inactive steps between two events of one
            class are bridged (0: none).
        min_steps: events shorter than this many steps are dropped.
    """

    thresholds: tuple[float, ...]
    median_steps: int = 1
    gap_steps: int = 0
    min_steps: int = 1

    def __post_init__(self) -> None:
        if self.median_steps < 1 or self.median_steps % 2 == 0:
            raise InputError(f"median_steps must be odd and >= 1, got {self.median_steps}")
        if self.gap_steps < 0 or self.min_steps < 1:
            raise InputError("gap_steps must be >= 0 and min_steps >= 1")
        if not all(math.isfinite(t) for t in self.thresholds):
            raise InputError(f"thresholds must be finite numbers, got {self.thresholds}")

    @classmethod
    def from_seconds(
        cls, thresholds: Sequence[float], *, median_filter: float = 0.0,
        min_duration: float = 0.0, min_gap: float = 0.0,
    ) -> PostProcessing:
        """Settings in seconds, converted to steps of 0.16 s.

        ``median_filter`` is rounded to the nearest number of steps, made odd by adding
        one when even (0.5 s -> 3 steps); ``min_gap``: gaps strictly shorter are bridged
        (0.5 s bridges gaps of up to 3 steps, 0.48 s); ``min_duration``: events of at
        least this length are kept (0.3 s keeps events of 2 steps and more).
        """
        for name, value in (("median_filter", median_filter), ("min_duration", min_duration),
                            ("min_gap", min_gap)):
            if not (math.isfinite(value) and value >= 0):
                raise InputError(f"{name} must be a number of seconds >= 0, got {value}")
        median = max(1, round(median_filter / STEP_SECONDS))
        median += 1 - median % 2
        gap = max(0, math.ceil(min_gap / STEP_SECONDS - 1e-9) - 1)
        shortest = max(1, math.ceil(min_duration / STEP_SECONDS - 1e-9))
        return cls(tuple(float(t) for t in thresholds), median, gap, shortest)

    @property
    def delay_steps(self) -> int:
        """Steps after an event's last step that must be scored before it is decided:
        half the median filter plus the longest bridged gap plus one."""
        return self.median_steps // 2 + self.gap_steps + 1


def class_thresholds(
    threshold: float | Sequence[float] | Mapping[str, float] | str | os.PathLike,
    labels: Sequence[str],
) -> list[float]:
    """One threshold per class of ``labels``.

    ``threshold`` is one number for every class, a sequence of one per class, a mapping
    class name -> threshold (``"*"`` sets the value of the classes it does not name; else
    0.5), or the path of a text file of such lines, ``NAME<whitespace>VALUE`` (the value
    is the last word on the line; ``#`` starts a comment).
    """
    if isinstance(threshold, (str, os.PathLike)):
        threshold = read_thresholds(threshold)
    if isinstance(threshold, Mapping):
        unknown = [name for name in threshold if name != "*" and name not in labels]
        if unknown:
            raise InputError(f"thresholds name unknown classes {unknown[:5]}; the model's "
                             f"classes include {list(labels)[:5]}")
        default = float(threshold.get("*", 0.5))
        values = [float(threshold.get(name, default)) for name in labels]
    elif isinstance(threshold, (int, float)) and not isinstance(threshold, bool):
        values = [float(threshold)] * len(labels)
    else:
        values = [float(t) for t in threshold]
        if len(values) != len(labels):
            raise InputError(f"give one threshold per class: {len(labels)} classes, "
                             f"{len(values)} thresholds")
    bad = [v for v in values if not (math.isfinite(v) and 0.0 <= v <= 1.0)]
    if bad:
        raise InputError(f"a threshold is a probability and must lie in [0, 1], got {bad[0]} "
                         "(--threshold)")
    return values


def read_thresholds(path: str | os.PathLike) -> dict[str, float]:
    """A per-class threshold file: ``NAME<whitespace>VALUE`` per line (see
    `class_thresholds`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read the threshold file {path}: {e}") from None
    out: dict[str, float] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.rsplit(maxsplit=1)
        try:
            value = float(parts[1]) if len(parts) == 2 else float("nan")
        except ValueError:
            value = float("nan")
        if not math.isfinite(value):
            raise InputError(f"{path}:{number}: expected a class name and a threshold, "
                             f"got {line!r}")
        out[parts[0].strip()] = value
    if not out:
        raise InputError(f"{path} holds no thresholds (lines of NAME VALUE)")
    return out


# --------------------------------------------------------------------------- stages
class MedianFilter:
    """A running median over time, per class, fed a few steps at a time.

    `push` takes (n, classes) scores and returns the filtered steps that are final: step t
    needs the steps up to t + k // 2. `flush` repeats the last step past the end and
    returns the rest. Fed in any pieces, it returns the same values as one push of the
    whole sequence and a flush.
    """

    def __init__(self, steps: int) -> None:
        self.half = steps // 2
        self._buffer: np.ndarray | None = None  # the edge-padded sequence from the next output

    def push(self, scores: np.ndarray) -> np.ndarray:
        if self.half == 0 or len(scores) == 0:
            return scores
        if self._buffer is None:
            self._buffer = np.repeat(scores[:1], self.half, axis=0)
        self._buffer = np.concatenate([self._buffer, scores])
        return self._drain()

    def flush(self) -> np.ndarray | None:
        if self.half == 0 or self._buffer is None:
            return None
        self._buffer = np.concatenate([self._buffer, np.repeat(self._buffer[-1:], self.half,
                                                               axis=0)])
        out = self._drain()
        self._buffer = None
        return out

    def _drain(self) -> np.ndarray:
        assert self._buffer is not None
        width = 2 * self.half + 1
        ready = len(self._buffer) - width + 1
        if ready <= 0:
            return self._buffer[:0]
        windows = np.lib.stride_tricks.sliding_window_view(self._buffer, width, axis=0)
        out = np.median(windows[:ready], axis=-1).astype(self._buffer.dtype, copy=False)
        self._buffer = self._buffer[ready:]
        return out


class EventDecoder:
    """Thresholds, gap merging and short-event removal, fed filtered scores a few steps
    at a time.

    `push` takes (n, classes) scores and returns the events decided by them: an event is
    decided once ``gap_steps + 1`` inactive steps follow it (no later step can extend it).
    `flush` ends the sequence and returns the events still open. Events come in the order
    they are decided (the step that decided them, then class index), which is the same
    however the sequence is cut into pieces.
    """

    def __init__(self, labels: Sequence[str], post: PostProcessing) -> None:
        if len(post.thresholds) != len(labels):
            raise InputError(f"{len(labels)} classes but {len(post.thresholds)} thresholds")
        self.labels = list(labels)
        self.post = post
        self._thresholds = np.asarray(post.thresholds, dtype=np.float64)
        self._step = 0  # steps seen
        self._start = np.full(len(labels), -1, dtype=np.int64)  # open event's first step
        self._end = np.zeros(len(labels), dtype=np.int64)  # its last active step
        self._peak = np.zeros(len(labels), dtype=np.float64)

    def push(self, scores: np.ndarray) -> list[Event]:
        n = len(scores)
        if n == 0:
            return []
        if scores.ndim != 2 or scores.shape[1] != len(self.labels):
            raise InputError(f"scores must be (steps, {len(self.labels)}), got "
                             f"{scores.shape}")
        first, gap = self._step, self.post.gap_steps
        active = scores >= self._thresholds
        decided: list[tuple[int, int, Event]] = []
        for c in np.flatnonzero(active.any(axis=0) | (self._start >= 0)):
            edges = np.diff(active[:, c].astype(np.int8), prepend=0, append=0)
            starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
            for a, b in zip(starts, stops, strict=True):
                peak = float(scores[a:b, c].max())
                if self._start[c] >= 0 and first + a - self._end[c] - 1 <= gap:
                    self._end[c] = first + b - 1
                    self._peak[c] = max(self._peak[c], peak)
                    continue
                if self._start[c] >= 0:
                    self._close(c, int(self._end[c]) + gap + 1, decided)
                self._start[c], self._end[c], self._peak[c] = first + a, first + b - 1, peak
            if self._start[c] >= 0 and first + n - 1 - self._end[c] > gap:
                self._close(c, int(self._end[c]) + gap + 1, decided)
        self._step += n
        return [event for *_, event in sorted(decided, key=lambda d: (d[0], d[1]))]

    def flush(self) -> list[Event]:
        decided: list[tuple[int, int, Event]] = []
        for c in np.flatnonzero(self._start >= 0):
            self._close(c, self._step, decided)
        return [event for *_, event in sorted(decided, key=lambda d: (d[0], d[1]))]

    def _close(self, c: int, step: int, decided: list[tuple[int, int, Event]]) -> None:
        start, end = int(self._start[c]), int(self._end[c])
        self._start[c] = -1
        if end - start + 1 >= self.post.min_steps:
            event = Event(step_time(start), step_time(end + 1), self.labels[c],
                          float(self._peak[c]))
            decided.append((step, int(c), event))


def decode_events(
    scores: np.ndarray, labels: Sequence[str], post: PostProcessing
) -> list[Event]:
    """Events of a whole sequence of frame scores (steps, classes), sorted by onset, then
    class order: the four stages of the module doc."""
    median = MedianFilter(post.median_steps)
    decoder = EventDecoder(labels, post)
    events = decoder.push(median.push(scores))
    tail = median.flush()
    if tail is not None:
        events += decoder.push(tail)
    events += decoder.flush()
    order = {name: i for i, name in enumerate(labels)}
    return sorted(events, key=lambda e: (e.onset, order[e.label], e.offset))


def read_event_table(path: str | os.PathLike) -> dict[str, list[Event]]:
    """A DCASE event table (``beats detect``'s events.tsv, or reference annotations):
    tab-separated with a header naming ``filename onset offset event_label`` and
    optionally ``score`` (1.0 when absent). A row with empty onset, offset and label
    lists a file without events. Returns ``{filename: [Event, ...]}`` in file order."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read the event table {path}: {e}") from None
    header = lines[0].split("\t") if lines else []
    if not {"filename", "onset", "offset", "event_label"} <= set(header):
        raise InputError(f"{path}: the first line must name the tab-separated columns "
                         "filename, onset, offset, event_label (and optionally score)")
    column = {name: i for i, name in enumerate(header)}
    out: dict[str, list[Event]] = {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        cells = line.split("\t") + [""] * len(header)
        name, onset, offset, label = (cells[column[c]].strip() for c in
                                      ("filename", "onset", "offset", "event_label"))
        events = out.setdefault(name, [])
        if not (onset or offset or label):
            continue
        try:
            score = float(cells[column["score"]]) if "score" in column else 1.0
            event = Event(float(onset), float(offset), label, score)
        except ValueError:
            event = None
        if event is None or not label or not 0 <= event.onset <= event.offset:
            raise InputError(f"{path}:{number}: expected a file name, onset <= offset in "
                             f"seconds and a label, got {line!r}")
        events.append(event)
    return out
