"""beats.sed_metrics against the reference packages (sed_eval for the F1 scores,
sed_scores_eval for PSDS) on fixtures, edge cases included, and on examples counted by
hand."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from beats.errors import InputError
from beats.sed_metrics import event_f1, psds, segment_f1

with warnings.catch_warnings():  # dcase_util imports pkg_resources, which warns
    warnings.simplefilter("ignore")
    sed_eval = pytest.importorskip("sed_eval")
    dcase_util = pytest.importorskip("dcase_util")
    intersection_based = pytest.importorskip("sed_scores_eval.intersection_based")
    from sed_scores_eval.base_modules.scores import create_score_dataframe

CLASSES = ["dog", "bird", "car"]


def random_events(rng, seconds: float, per_class: int) -> list[tuple[float, float, str]]:
    """Events of each class, one after another (a class never overlaps itself)."""
    events = []
    for label in CLASSES:
        t = rng.uniform(0.0, 1.0)
        for _ in range(int(rng.integers(0, per_class + 1))):
            onset = round(t + rng.uniform(0.05, 2.0), 3)
            offset = round(onset + rng.uniform(0.05, 3.0), 3)
            if offset > seconds:
                break
            events.append((onset, offset, label))
            t = offset
    return events


def noisy_copy(rng, events):
    """The events with jittered times, some relabelled, plus a few false alarms."""
    out = []
    for onset, offset, label in events:
        onset = max(0.0, onset + rng.normal(0, 0.15))
        offset = max(onset + 0.01, offset + rng.normal(0, 0.3))
        out.append((onset, offset, label if rng.random() > 0.2 else CLASSES[rng.integers(3)]))
    return out + random_events(rng, 10.0, 1)


def fixtures() -> list[tuple[str, dict, dict]]:
    rng = np.random.default_rng(0)
    cases = []
    for seed in range(4):
        ref = {f"f{i}.wav": random_events(rng, 10.0, 3) for i in range(4)}
        cases.append((f"random{seed}", ref, {k: noisy_copy(rng, v) for k, v in ref.items()}))
    ref = {"a.wav": [(1.0, 2.0, "dog"), (1.5, 4.0, "bird"), (3.0, 3.5, "car")],
           "b.wav": [(0.0, 9.5, "car"), (0.2, 0.9, "dog")]}
    est = {"a.wav": [(1.1, 2.1, "dog"), (1.4, 3.0, "bird"), (3.0, 3.6, "car"),
                     (0.9, 4.2, "car")],
           "b.wav": [(0.1, 9.0, "car"), (0.25, 0.8, "dog"), (0.3, 0.5, "dog")]}
    cases.append(("overlapping classes", ref, est))
    cases.append(("no detections", ref, {"a.wav": [], "b.wav": []}))
    cases.append(("a file without events", {**ref, "c.wav": []},
                  {**est, "c.wav": [(2.0, 3.0, "bird")]}))
    cases.append(("nothing at all", {"a.wav": []}, {"a.wav": []}))
    cases.append(("onsets on the collar", {"a.wav": [(1.0, 2.0, "dog"), (5.0, 9.0, "car")]},
                  {"a.wav": [(1.2, 2.1, "dog"), (4.8, 9.8, "car")]}))
    return cases


def sed_eval_f1(ref, est, kind: str) -> tuple[float, float, float, float]:
    if kind == "segment":
        metric = sed_eval.sound_event.SegmentBasedMetrics(CLASSES, time_resolution=1.0)
    else:
        metric = sed_eval.sound_event.EventBasedMetrics(CLASSES, t_collar=0.2,
                                                        percentage_of_length=0.2)
    metric.empty_system_output_handling = "zero_score"  # as the DCASE baselines
    for name in sorted(ref.keys() | est.keys()):
        def container(events, name=name):
            return dcase_util.containers.MetaDataContainer(
                [{"filename": name, "onset": a, "offset": b, "event_label": c}
                 for a, b, c in events])
        metric.evaluate(container(ref.get(name, [])), container(est.get(name, [])))
    overall = metric.results_overall_metrics()["f_measure"]
    average = metric.results_class_wise_average_metrics()["f_measure"]
    return overall["f_measure"], overall["precision"], overall["recall"], average["f_measure"]


@pytest.mark.parametrize("kind", ["segment", "event"])
def test_f1_scores_equal_sed_eval(kind):
    compute = segment_f1 if kind == "segment" else event_f1
    for name, ref, est in fixtures():
        ours = compute(ref, est, CLASSES)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = sed_eval_f1(ref, est, kind)
        mine = (ours.f1, ours.precision, ours.recall, ours.macro_f1)
        np.testing.assert_allclose(mine, theirs, rtol=0, atol=1e-12, equal_nan=True,
                                   err_msg=f"{kind} F1 on {name}")


def test_f1_counted_by_hand():
    ref = {"a.wav": [(1.0, 2.0, "dog")]}
    est = {"a.wav": [(1.1, 2.15, "dog"), (5.0, 6.0, "dog")]}
    # Events: the first matches (onset 0.1 s off, offset 0.15 s off), the second is a
    # false alarm: precision 1/2, recall 1, F1 2/3.
    scores = event_f1(ref, est)
    assert (scores.tp, scores.n_ref, scores.n_sys) == (1, 1, 2)
    assert scores.f1 == pytest.approx(2 / 3)
    # Segments of 1 s: the reference covers segment 1, the estimates 1, 2 and 5.
    scores = segment_f1(ref, est)
    assert (scores.tp, scores.n_ref, scores.n_sys) == (1, 1, 3)
    assert scores.f1 == pytest.approx(0.5)
    # With durations, segments past the end of the file do not count.
    assert segment_f1(ref, est, durations={"a.wav": 4.0}).n_sys == 2
    # No detection at all: precision 0, F1 0; no reference event: F1 undefined.
    assert event_f1(ref, {"a.wav": []}).f1 == 0.0
    assert math.isnan(event_f1({"a.wav": []}, {"a.wav": []}).f1)
    with pytest.raises(InputError, match="outside the classes"):
        event_f1(ref, {"a.wav": [(0.0, 1.0, "cat")]}, ["dog"])


def psds_fixture(seed: int, decimals: int):
    """Five 10 s files of 62 steps: noise scores, raised over the reference events."""
    rng = np.random.default_rng(seed)
    names = [f"f{i}" for i in range(5)]
    ref = {name: random_events(rng, 9.5, 2) for name in names}
    ref["f4"] = [(0.5, 2.0, "dog"), (1.0, 3.0, "bird"), (2.5, 6.0, "car"), (6.5, 9.0, "dog")]
    ref["f3"] = []  # a file without events
    times = 2560 * np.arange(63) / 16000
    scores = {}
    for name in names:
        values = rng.uniform(0, 0.4, (62, 3))
        for onset, offset, label in ref[name]:
            values[int(onset / 0.16) : int(offset / 0.16) + 1, CLASSES.index(label)] += (
                rng.uniform(0.2, 0.6))
        scores[name] = (times, np.round(values, decimals))  # 2 decimals: many ties
    return scores, ref, {name: 10.0 for name in names}


@pytest.mark.parametrize("seed,decimals", [(0, 6), (1, 2), (2, 6)])
def test_psds_equals_sed_scores_eval(seed, decimals):
    scores, ref, durations = psds_fixture(seed, decimals)
    ours = psds(scores, ref, durations, CLASSES)
    frames = {name: create_score_dataframe(values, times, CLASSES)
              for name, (times, values) in scores.items()}
    theirs = intersection_based.psds(
        frames, ref, durations, dtc_threshold=0.7, gtc_threshold=0.7, alpha_ct=0.0,
        alpha_st=1.0, max_efpr=100.0)
    assert 0.0 < ours.psds < 1.0
    assert ours.psds == pytest.approx(theirs[0], abs=1e-12)
    for label in CLASSES:
        assert ours.class_psds[label] == pytest.approx(theirs[1][label], abs=1e-12)


def test_psds_of_perfect_and_of_useless_scores():
    times = 2560 * np.arange(63) / 16000
    ref = {"a": [(0.32, 1.6, "dog"), (4.8, 6.4, "bird")], "b": [(1.6, 3.2, "car")]}
    perfect = {}
    for name, events in ref.items():
        values = np.zeros((62, 3))
        for onset, offset, label in events:
            values[round(onset / 0.16) : round(offset / 0.16), CLASSES.index(label)] = 1.0
        perfect[name] = (times, values)
    durations = {"a": 10.0, "b": 10.0}
    assert psds(perfect, ref, durations, CLASSES).psds == pytest.approx(1.0)
    # Constant scores: the one detection spans each file, a false alarm every 10 s
    # (360 per hour, beyond the 100 PSDS looks at).
    flat = {name: (times, np.zeros((62, 3))) for name in ref}
    assert psds(flat, ref, durations, CLASSES).psds == 0.0
    with pytest.raises(InputError, match="overlap or touch"):
        psds(perfect, {**ref, "b": [(1.6, 3.2, "car"), (3.2, 4.0, "car")]}, durations,
             CLASSES)
    with pytest.raises(InputError, match="every class"):
        psds(perfect, {"a": ref["a"], "b": []}, durations, CLASSES)
