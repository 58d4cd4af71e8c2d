"""Post-processing of frame scores into events (beats.events): each stage on scores whose
events are worked out by hand, and the streaming form equal to the one-shot form."""

from __future__ import annotations

import numpy as np
import pytest

from beats.errors import InputError
from beats.events import (
    Event,
    EventDecoder,
    MedianFilter,
    PostProcessing,
    class_thresholds,
    decode_events,
    format_event,
    read_event_table,
)

# Class A's scores over 12 steps of 0.16 s; B stays low.
A = [0.1, 0.9, 0.9, 0.2, 0.8, 0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 0.2]
SCORES = np.stack([np.array(A), np.full(12, 0.3)], axis=1).astype(np.float32)
LABELS = ["A", "B"]


def spans(events: list[Event]) -> list[tuple[float, float, str]]:
    return [(round(e.onset, 6), round(e.offset, 6), e.label) for e in events]


def post(thresholds=(0.5, 0.5), median=0.0, min_duration=0.0, min_gap=0.0) -> PostProcessing:
    return PostProcessing.from_seconds(thresholds, median_filter=median,
                                       min_duration=min_duration, min_gap=min_gap)


def test_thresholds_make_one_event_per_run_of_active_steps():
    events = decode_events(SCORES, LABELS, post())
    assert spans(events) == [(0.16, 0.48, "A"), (0.64, 0.8, "A"), (1.28, 1.76, "A")]
    assert [e.score for e in events] == pytest.approx([0.9, 0.8, 0.7])
    # A per-class threshold low enough for B: one event over the whole sequence.
    events = decode_events(SCORES, LABELS, post(thresholds=(0.5, 0.25)))
    assert (0.0, 1.92, "B") in spans(events)


def test_gap_merging_then_short_events_dropped():
    # min_gap 0.2 s bridges gaps of one step: steps 1-2 and 4 become one event.
    assert spans(decode_events(SCORES, LABELS, post(min_gap=0.2))) == [
        (0.16, 0.8, "A"), (1.28, 1.76, "A")]
    # min_duration 0.4 s keeps events of at least 3 steps: without merging, only 8-10.
    assert spans(decode_events(SCORES, LABELS, post(min_duration=0.4))) == [(1.28, 1.76, "A")]
    assert spans(decode_events(SCORES, LABELS, post(min_gap=0.2, min_duration=0.4))) == [
        (0.16, 0.8, "A"), (1.28, 1.76, "A")]


def test_median_filter_repeats_the_edges():
    # 3-step medians of A, the first and last value repeated past the ends:
    # 0.1 0.9 0.9 0.8 0.2 0.1 0.1 0.1 0.7 0.7 0.7 0.2
    filtered = MedianFilter(3).push(SCORES)
    assert filtered.shape == (11, 2)  # the last step needs the end of the sequence
    expected = [0.1, 0.9, 0.9, 0.8, 0.2, 0.1, 0.1, 0.1, 0.7, 0.7, 0.7]
    np.testing.assert_allclose(filtered[:, 0], expected, rtol=1e-6)
    events = decode_events(SCORES, LABELS, post(median=0.5))
    assert spans(events) == [(0.16, 0.64, "A"), (1.28, 1.76, "A")]


def test_seconds_become_steps():
    assert post(median=0.5).median_steps == 3  # 3.1 steps -> 3
    assert post(median=1.0).median_steps == 7  # 6.25 -> 6 -> odd: 7
    assert post(median=0.0).median_steps == 1
    assert post(min_gap=0.5).gap_steps == 3  # gaps of 0.48 s < 0.5 s
    assert post(min_gap=0.32).gap_steps == 1  # a 0.32 s gap is not shorter than 0.32 s
    assert post(min_duration=0.32).min_steps == 2
    assert post(min_duration=0.33).min_steps == 3
    with pytest.raises(InputError):
        post(median=-1.0)


def test_pieces_give_the_events_of_the_whole():
    rng = np.random.default_rng(3)
    scores = rng.random((400, 4)).astype(np.float32)
    scores[100:180, 1] += 0.5
    labels = ["w", "x", "y", "z"]
    settings = post(thresholds=(0.7, 0.9, 0.8, 0.95), median=0.5, min_gap=0.35,
                    min_duration=0.3)
    whole = decode_events(scores, labels, settings)
    assert len(whole) > 20
    for trial in range(5):
        median, decoder = MedianFilter(settings.median_steps), EventDecoder(labels, settings)
        got, start = [], 0
        while start < len(scores):
            size = int(rng.integers(1, 40)) if trial else 1
            got += decoder.push(median.push(scores[start : start + size]))
            start += size
        got += decoder.push(median.flush()) + decoder.flush()
        assert sorted(got) == sorted(whole)


def test_thresholds_from_a_mapping_or_a_file(tmp_path):
    labels = ["Speech", "Child speech, kid speaking", "Music"]
    assert class_thresholds(0.3, labels) == [0.3, 0.3, 0.3]
    assert class_thresholds({"Music": 0.2}, labels) == [0.5, 0.5, 0.2]
    assert class_thresholds({"Music": 0.2, "*": 0.7}, labels) == [0.7, 0.7, 0.2]
    path = tmp_path / "thresholds.txt"
    path.write_text("# per class\nChild speech, kid speaking\t0.4\n* 0.6\n\nSpeech 0.25\n")
    assert class_thresholds(path, labels) == [0.25, 0.4, 0.6]
    path.write_text("Speech 0.25\nMusic loud\n")
    with pytest.raises(InputError, match=":2:"):
        class_thresholds(path, labels)
    with pytest.raises(InputError, match="Dog"):
        class_thresholds({"Dog": 0.5}, labels)
    with pytest.raises(InputError, match="one threshold per class"):
        class_thresholds([0.1, 0.2], labels)
    for outside in (1.5, -0.1, float("nan")):  # scores are probabilities
        with pytest.raises(InputError, match=r"must lie in \[0, 1\]"):
            class_thresholds(outside, labels)
    assert class_thresholds([0.0, 1.0, 0.5], labels) == [0.0, 1.0, 0.5]


def test_event_lines_are_tab_separated():
    line = format_event(Event(1.28, 1.76, "Dog\tbark", 0.71234))
    assert line == "1.280\t1.760\tDog bark\t0.7123"


def test_event_tables_are_read_with_their_line_numbers(tmp_path):
    path = tmp_path / "events.tsv"
    path.write_text("filename\tonset\toffset\tevent_label\n"
                    "a.wav\t0.5\t2.25\tcar\n"
                    "quiet.wav\t\t\t\n"
                    "a.wav\t1.1\t1.6\tdog\n")
    assert read_event_table(path) == {
        "a.wav": [Event(0.5, 2.25, "car", 1.0), Event(1.1, 1.6, "dog", 1.0)],
        "quiet.wav": [],
    }
    path.write_text("filename\tonset\toffset\tevent_label\tscore\n"
                    "a.wav\t0.5\t2.25\tcar\t0.8\n"
                    "a.wav\t3.0\t2.0\tdog\t0.9\n")
    with pytest.raises(InputError, match=":3:"):
        read_event_table(path)
