"""Sound event detection metrics: segment-based F1, event-based F1 and PSDS.

The definitions are those of the DCASE evaluations, computed as the reference packages
compute them (the tests compare the numbers with theirs):

- `segment_f1`, as sed_eval's ``SegmentBasedMetrics``: each file is cut into segments of
  ``segment`` seconds (1 s); a class is active in a segment when an event of the class
  overlaps it (onsets rounded down, offsets up, to whole segments). A file's length is
  its duration when given, else its latest offset, reference or estimated.
- `event_f1`, as sed_eval's ``EventBasedMetrics``: an estimated event matches a
  reference event of its class when its onset is within ``collar`` (200 ms) of the
  reference's and its offset within ``max(collar, offset_share * reference length)``
  (200 ms or 20 % of the event); each event matches at most one other, and the matching
  is a maximum one (as sed_eval's "optimal" matching).
- `psds`, as sed_scores_eval's ``intersection_based.psds``: the Polyphonic Sound
  Detection Score from frame scores, over every threshold, DCASE scenario 1 by default
  (detection and ground-truth tolerance 0.7, no cross-trigger term, ``alpha_st = 1``, up
  to 100 false positives per hour).

Both F1 scores are reported micro-averaged (``f1``: counts summed over classes, sed_eval's
"overall") and macro-averaged (``macro_f1``: the mean of the class F1s, sed_eval's
"class-wise average", which DCASE ranks by). As in the DCASE baselines, a class with no
estimated event has precision 0 (sed_eval's ``empty_system_output_handling="zero_score"``);
a class with no reference event has no recall, so its F1 is NaN and left out of the mean.

Events are ``(onset, offset, label)`` tuples or `beats.events.Event` s (a fourth element, a
score, is ignored), grouped by file name: ``{filename: [events]}``. A file named by only
one side counts with no events on the other.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InputError

Events = Mapping[str, Iterable[Any]]  # file name -> events


# --------------------------------------------------------------------------- inputs
def _event_tuples(items: Iterable[Any], where: str) -> list[tuple[float, float, str]]:
    out = []
    for item in items:
        if hasattr(item, "onset"):
            onset, offset, label = item.onset, item.offset, item.label
        else:
            onset, offset, label = item[0], item[1], item[2]
        onset, offset = float(onset), float(offset)
        if not (math.isfinite(onset) and math.isfinite(offset)) or offset < onset:
            raise InputError(f"{where}: event ({onset}, {offset}, {label!r}) has an offset "
                             "before its onset or a time that is not a number")
        out.append((onset, offset, str(label)))
    return out


def _grouped(
    reference: Events, estimated: Events, classes: Sequence[str] | None
) -> tuple[list[str], list[str], dict[str, list], dict[str, list]]:
    """(files, classes, reference by file, estimated by file), labels checked."""
    ref = {name: _event_tuples(events, f"reference {name}") for name, events in
           reference.items()}
    est = {name: _event_tuples(events, f"estimate {name}") for name, events in
           estimated.items()}
    labels = {e[2] for events in (*ref.values(), *est.values()) for e in events}
    if classes is None:
        classes = sorted(labels)
    else:
        classes = list(classes)
        unknown = sorted(labels - set(classes))
        if unknown:
            raise InputError(f"events have labels outside the classes: {unknown[:5]}")
    files = sorted(ref.keys() | est.keys())
    return files, classes, ref, est


# --------------------------------------------------------------------------- F1 scores
@dataclass
class F1Scores:
    """Counts and scores of a segment- or event-based evaluation.

    Attributes:
        f1, precision, recall: micro-averaged (counts summed over classes and files).
        macro_f1, macro_precision, macro_recall: the means over classes (NaN ignored).
        class_f1: F1 of each class (NaN for a class without reference events).
        tp, n_ref, n_sys: true positives, reference and estimated counts (segments or
            events), summed over classes.
        class_counts: (tp, n_ref, n_sys) of each class.
    """

    f1: float
    precision: float
    recall: float
    macro_f1: float
    macro_precision: float
    macro_recall: float
    class_f1: dict[str, float]
    tp: int
    n_ref: int
    n_sys: int
    class_counts: dict[str, tuple[int, int, int]] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON values (NaN as None)."""
        def clean(x: float) -> float | None:
            return None if math.isnan(x) else x

        return {
            "f1": clean(self.f1), "precision": clean(self.precision),
            "recall": clean(self.recall), "macro_f1": clean(self.macro_f1),
            "macro_precision": clean(self.macro_precision),
            "macro_recall": clean(self.macro_recall),
            "class_f1": {k: clean(v) for k, v in self.class_f1.items()},
            "tp": self.tp, "n_ref": self.n_ref, "n_sys": self.n_sys,
        }


def _prf(tp: float, n_ref: float, n_sys: float) -> tuple[float, float, float]:
    """sed_eval's precision, recall and F1 with empty output scored zero."""
    precision = 0.0 if n_sys == 0 else float(tp / float(n_sys))
    recall = math.nan if n_ref == 0 else float(tp / float(n_ref))
    if precision == 0 and recall == 0:
        return precision, recall, 0.0
    return precision, recall, float(2 * precision * recall / (precision + recall))


def _nanmean(values: list[float]) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all NaN: the mean is NaN
        return float(np.nanmean(values)) if values else math.nan


def _scores(counts: dict[str, list[int]]) -> F1Scores:
    """F1Scores from per-class [tp, n_ref, n_sys]."""
    tp = sum(c[0] for c in counts.values())
    n_ref = sum(c[1] for c in counts.values())
    n_sys = sum(c[2] for c in counts.values())
    precision, recall, f1 = _prf(tp, n_ref, n_sys)
    per_class = {name: _prf(*c) for name, c in counts.items()}
    return F1Scores(
        f1=f1, precision=precision, recall=recall,
        macro_f1=_nanmean([p[2] for p in per_class.values()]),
        macro_precision=_nanmean([p[0] for p in per_class.values()]),
        macro_recall=_nanmean([p[1] for p in per_class.values()]),
        class_f1={name: p[2] for name, p in per_class.items()},
        tp=tp, n_ref=n_ref, n_sys=n_sys,
        class_counts={name: (c[0], c[1], c[2]) for name, c in counts.items()},
    )


def _activity(events: list[tuple[float, float, str]], classes: list[str], segment: float,
              length: int) -> np.ndarray:
    """(segments, classes) bool: a class is active in every segment an event touches."""
    roll = np.zeros((length, len(classes)), dtype=bool)
    index = {name: i for i, name in enumerate(classes)}
    for onset, offset, label in events:
        first = math.floor(onset / segment)
        stop = math.ceil(offset / segment)
        roll[first:stop, index[label]] = True  # past the file's length: cut
    return roll


def segment_f1(
    reference: Events, estimated: Events, classes: Sequence[str] | None = None, *,
    segment: float = 1.0, durations: Mapping[str, float] | None = None,
) -> F1Scores:
    """Segment-based precision, recall and F1 (sed_eval's definition, module doc).

    Args:
        reference, estimated: events by file name.
        classes: the class names (default: every label seen, sorted).
        segment: segment length in seconds.
        durations: seconds of each file; without them a file lasts until its latest
            offset (then a file with no event on either side counts nothing).
    """
    segment = float(segment)
    if not segment > 0:
        raise InputError(f"segment must be > 0 seconds, got {segment}")
    files, classes, ref, est = _grouped(reference, estimated, classes)
    counts = {name: [0, 0, 0] for name in classes}
    for name in files:
        r, e = ref.get(name, []), est.get(name, [])
        if durations is not None:
            if name not in durations:
                raise InputError(f"durations has no entry for {name!r}")
            seconds = float(durations[name])
        else:
            seconds = max([0.0] + [x[1] for x in r] + [x[1] for x in e])
        length = math.ceil(seconds / segment)
        r_roll, e_roll = (_activity(x, classes, segment, length) for x in (r, e))
        tp = (r_roll & e_roll).sum(axis=0)
        for i, cls in enumerate(classes):
            counts[cls][0] += int(tp[i])
            counts[cls][1] += int(r_roll[:, i].sum())
            counts[cls][2] += int(e_roll[:, i].sum())
    return _scores(counts)


def _max_matching(hits: np.ndarray) -> int:
    """Size of a maximum matching of a bipartite graph given as a (left, right) bool
    matrix (augmenting paths)."""
    right_of: dict[int, int] = {}  # right vertex -> its left match

    def augment(left: int, seen: set[int]) -> bool:
        for right in np.flatnonzero(hits[left]):
            right = int(right)
            if right in seen:
                continue
            seen.add(right)
            if right not in right_of or augment(right_of[right], seen):
                right_of[right] = left
                return True
        return False

    return sum(augment(left, set()) for left in range(hits.shape[0]))


def event_f1(
    reference: Events, estimated: Events, classes: Sequence[str] | None = None, *,
    collar: float = 0.2, offset_share: float = 0.2,
) -> F1Scores:
    """Event-based precision, recall and F1 (sed_eval's definition, module doc).

    Args:
        reference, estimated: events by file name.
        classes: the class names (default: every label seen, sorted).
        collar: seconds of tolerance on the onset and (at least) on the offset.
        offset_share: the offset tolerance is at least this share of the reference
            event's length.
    """
    if not collar > 0 or not 0 <= offset_share <= 1:
        raise InputError("collar must be > 0 seconds and offset_share in [0, 1]")
    files, classes, ref, est = _grouped(reference, estimated, classes)
    counts = {name: [0, 0, 0] for name in classes}
    for name in files:
        for cls in classes:
            r = np.array([x[:2] for x in ref.get(name, []) if x[2] == cls]).reshape(-1, 2)
            e = np.array([x[:2] for x in est.get(name, []) if x[2] == cls]).reshape(-1, 2)
            counts[cls][1] += len(r)
            counts[cls][2] += len(e)
            if not (len(r) and len(e)):
                continue
            onset_ok = np.abs(r[:, :1] - e[None, :, 0]) <= collar
            tolerance = np.maximum(collar, offset_share * (r[:, 1] - r[:, 0]))
            offset_ok = np.abs(r[:, 1:] - e[None, :, 1]) <= tolerance[:, None]
            counts[cls][0] += _max_matching(onset_ok & offset_ok)
    return _scores(counts)


# --------------------------------------------------------------------------- PSDS
@dataclass
class PSDSResult:
    """What `psds` returns.

    Attributes:
        psds: the area under the effective PSD-ROC up to ``max_efpr``, over ``max_efpr``.
        class_psds: the same for each class's own ROC.
        etpr, efpr: the effective PSD-ROC (true positive rate, false positives per hour).
    """

    psds: float
    class_psds: dict[str, float]
    etpr: np.ndarray = field(repr=False)
    efpr: np.ndarray = field(repr=False)


def _detections(scores: np.ndarray, times: np.ndarray, thresholds: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """Onsets and offsets (thresholds, most events) of the runs of steps at or above each
    threshold; unused entries are 0 (an empty event)."""
    active = np.zeros((len(thresholds), len(scores) + 2), dtype=np.int8)
    active[:, 1:-1] = (scores[None, :] >= thresholds[:, None]) & (scores > -np.inf)
    change = np.diff(active, axis=1)  # (thresholds, steps + 1)
    rows, starts = np.nonzero(change == 1)
    _, stops = np.nonzero(change == -1)
    counts = np.bincount(rows, minlength=len(thresholds))
    width = max(int(counts.max()) if len(counts) else 0, 1)
    slot = np.arange(len(rows)) - (np.cumsum(counts) - counts)[rows]
    onsets = np.zeros((len(thresholds), width))
    offsets = np.zeros_like(onsets)
    onsets[rows, slot] = times[starts]
    offsets[rows, slot] = times[stops]
    return onsets, offsets


def _intersection_counts(
    onsets: np.ndarray, offsets: np.ndarray, gt_on: np.ndarray, gt_off: np.ndarray,
    dtc: float, gtc: float, decimals: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(true positives, false positives) per threshold: a detection is relevant when its
    overlap with the ground truth covers ``dtc`` of it; a reference event is found when
    relevant detections cover ``gtc`` of it (times compared at ``decimals``)."""
    real = offsets > onsets
    overlap = np.maximum(np.minimum(offsets[..., None], gt_off) -
                         np.maximum(onsets[..., None], gt_on), 0.0)
    covered = np.round(np.sum(overlap, axis=-1), decimals=decimals)
    relevant = (covered >= np.round(dtc * (offsets - onsets), decimals=decimals)) * real
    fps = real.sum(-1) - relevant.sum(-1)
    found = np.round(np.sum(relevant[..., None] * overlap, axis=-2), decimals=decimals)
    tps = (found >= np.round(gtc * (gt_off - gt_on), decimals=decimals)).sum(-1)
    return tps, fps


def _file_deltas(
    scores: np.ndarray, times: np.ndarray, gt_on: np.ndarray, gt_off: np.ndarray,
    dtc: float, gtc: float, decimals: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, tp change, fp change): how the counts of one file and class change
    when the threshold falls to each threshold, for the thresholds where they do."""
    if len(gt_on) == 0:  # only false positives: +1 at each local maximum, -1 at minima
        before = np.concatenate(([-np.inf], scores[:-1]))
        after = np.concatenate((scores[1:], [-np.inf]))
        steps = ((scores > before).astype(int) - (after > scores).astype(int)) * (
            scores > -np.inf)
        keep = np.abs(steps) > 0.5
        return scores[keep], np.zeros(int(keep.sum())), steps[keep].astype(float)
    thresholds = np.unique(scores)
    tps = np.zeros(len(thresholds))
    fps = np.zeros(len(thresholds))
    block = max(1, 2_000_000 // max(1, len(scores) * max(1, len(gt_on))))
    for first in range(0, len(thresholds), block):
        part = thresholds[first : first + block]
        onsets, offsets = _detections(scores, times, part)
        tps[first : first + block], fps[first : first + block] = _intersection_counts(
            onsets, offsets, gt_on, gt_off, dtc, gtc, decimals)
    stats = np.stack([tps, fps], axis=1)
    deltas = stats - np.concatenate((stats[1:], np.zeros_like(stats[:1])))
    keep = np.abs(deltas).sum(1) > 0
    return thresholds[keep], deltas[keep, 0], deltas[keep, 1]


def _staircase_auc(y: np.ndarray, x: np.ndarray, max_x: float) -> float:
    """Area under a step curve (value y[i] from x[i] to x[i + 1]) up to ``max_x``."""
    order = np.argsort(x)
    x, y = x[order], y[order]
    cut = int(np.argmax(np.concatenate((x > max_x, [True]))))
    x = np.concatenate((x[:cut], [max_x]))
    y = y[:cut]
    return sum(y * (x[1:] - x[:-1]))


def _class_roc(tpr: np.ndarray, efpr: np.ndarray, max_efpr: float
               ) -> tuple[np.ndarray, np.ndarray]:
    """The ROC's best true positive rate at each distinct false positive rate, in order
    of rate, up to ``max_efpr``."""
    order = np.lexsort((tpr, efpr))
    tpr, efpr = tpr[order], efpr[order]
    best = np.maximum.accumulate(tpr)
    rising = np.concatenate(([0], np.arange(1, len(tpr))[best[1:] > best[:-1]]))
    tpr, efpr = tpr[rising], efpr[rising]
    efpr, last = np.unique(efpr[::-1], return_index=True)
    tpr = tpr[-1 - last]
    cut = int(np.argmax(np.concatenate((efpr > max_efpr, [True]))))
    return tpr[:cut], efpr[:cut]


def psds(
    scores: Mapping[str, Any], reference: Events, durations: Mapping[str, float],
    classes: Sequence[str] | None = None, *, dtc: float = 0.7, gtc: float = 0.7,
    alpha_st: float = 1.0, max_efpr: float = 100.0, time_decimals: int = 6,
) -> PSDSResult:
    """The Polyphonic Sound Detection Score of frame scores (sed_scores_eval's, module
    doc), over every threshold.

    Args:
        scores: file name -> frame scores: a `beats.detect.FrameScores`, or a pair
            ``(timestamps (steps + 1,), scores (steps, classes))`` where step t runs from
            ``timestamps[t]`` to ``timestamps[t + 1]`` seconds (then give ``classes``).
        reference: file name -> reference events; the same files as ``scores`` (a file
            without events: an empty list); events of one class may not overlap or touch,
            and every class needs at least one.
        durations: file name -> seconds, the same files.
        classes: the score columns' class names (taken from `FrameScores` otherwise).
        dtc, gtc: detection and ground-truth tolerance criteria.
        alpha_st: weight of the standard deviation over classes subtracted from the mean
            class ROC.
        max_efpr: false positives per hour up to which the area is taken.
        time_decimals: times are compared rounded to this many decimals.
    """
    files = sorted(scores)
    if set(reference) != set(files) or set(durations) != set(files):
        raise InputError("scores, reference and durations must name the same files; "
                         f"scores has {len(files)}, reference {len(reference)}, durations "
                         f"{len(durations)}")
    if not files:
        raise InputError("psds needs at least one file")
    tables = {name: _score_table(scores[name], classes, name) for name in files}
    names = list(classes) if classes is not None else list(scores[files[0]].labels)
    for name, (_, values) in tables.items():
        if values.shape[1] != len(names):
            raise InputError(f"{name}: {values.shape[1]} score columns for {len(names)} classes")
    truth = {name: _event_tuples(reference[name], f"reference {name}") for name in files}
    _check_reference(truth, names)
    duration = sum(float(durations[name]) for name in durations)
    if not duration > 0:
        raise InputError("the files' durations must add up to more than 0 seconds")
    rocs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for c, cls in enumerate(names):
        change, tp_delta, fp_delta = [], [], []
        for name in files:
            times, values = tables[name]
            events = np.array([e[:2] for e in truth[name] if e[2] == cls]).reshape(-1, 2)
            at, tp, fp = _file_deltas(values[:, c], times, events[:, 0], events[:, 1],
                                      dtc, gtc, time_decimals)
            change.append(at)
            tp_delta.append(tp)
            fp_delta.append(fp)
        thresholds, where = np.unique(np.concatenate(change), return_inverse=True)
        deltas = np.zeros((len(thresholds), 2))
        np.add.at(deltas, where, np.stack([np.concatenate(tp_delta),
                                           np.concatenate(fp_delta)], axis=1))
        counts = np.concatenate((np.cumsum(deltas[::-1], axis=0)[::-1], np.zeros((1, 2))))
        n_ref = sum(e[2] == cls for events in truth.values() for e in events)
        tpr = counts[:, 0] / max(n_ref, 1)
        efpr = counts[:, 1] / duration * 3600.0
        rocs[cls] = _class_roc(tpr, efpr, max_efpr)
    grid = np.unique(np.sort(np.concatenate([efpr for _, efpr in rocs.values()])))
    curves = []
    for tpr, efpr in rocs.values():
        index = np.searchsorted(efpr, grid, side="right") - 1
        curves.append(np.where(index < 0, 0.0, tpr[np.clip(index, 0, None)]))
    etpr = np.maximum(np.mean(curves, axis=0) - alpha_st * np.std(curves, axis=0), 0.0)
    etpr = np.concatenate((etpr, [etpr[-1]]))
    grid = np.concatenate((grid, [max_efpr]))
    return PSDSResult(
        psds=_staircase_auc(etpr, grid, max_efpr) / max_efpr,
        class_psds={cls: _staircase_auc(tpr, efpr, max_efpr) / max_efpr
                    for cls, (tpr, efpr) in rocs.items()},
        etpr=etpr, efpr=grid,
    )


def _score_table(value: Any, classes: Sequence[str] | None, name: str
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(timestamps (steps + 1,), scores (steps, classes)) float64 of one file."""
    if hasattr(value, "probs") and hasattr(value, "onsets"):
        if classes is not None and list(classes) != list(value.labels):
            raise InputError(f"{name}: its scores are for {value.labels[:5]}, not {classes}")
        times = np.concatenate((value.onsets, value.offsets[-1:]))
        values = value.probs
    else:
        if classes is None:
            raise InputError("give classes= with (timestamps, scores) pairs")
        times, values = value
    times = np.asarray(times, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or times.shape != (len(values) + 1,) or len(values) == 0:
        raise InputError(f"{name}: scores must be (steps, classes) with steps + 1 "
                         f"timestamps, got {values.shape} and {times.shape}")
    if not (np.diff(times) > 0).all():
        raise InputError(f"{name}: timestamps must increase")
    return times, values


def _check_reference(truth: dict[str, list[tuple[float, float, str]]],
                     classes: list[str]) -> None:
    """Refuse what PSDS cannot score: unknown labels, a class without events, events of
    one class that overlap or touch."""
    seen = set()
    for name, events in truth.items():
        last: dict[str, float] = {}
        for onset, offset, label in sorted(events):
            if label not in classes:
                raise InputError(f"reference {name}: label {label!r} is not a class")
            if onset <= last.get(label, -math.inf):
                raise InputError(f"reference {name}: two {label!r} events overlap or touch "
                                 f"(at {onset} s); merge them")
            last[label] = offset
            seen.add(label)
    missing = [c for c in classes if c not in seen]
    if missing:
        raise InputError(f"PSDS needs reference events of every class; none of {missing[:5]}")
