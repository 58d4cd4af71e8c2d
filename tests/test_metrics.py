"""beats.metrics against values computed by hand."""

from __future__ import annotations

import pytest
import torch

from beats.metrics import (
    average_precision,
    classification_report,
    confusion_matrix,
    mean_average_precision,
)


def test_average_precision_by_hand():
    # ranking +, -, +, - : precision at the hits 1 and 2/3 -> AP = (1 + 2/3) / 2
    scores = torch.tensor([0.9, 0.8, 0.7, 0.1])
    assert average_precision(scores, torch.tensor([1, 0, 1, 0])) == pytest.approx(5 / 6)
    # ranking -, +, +: precision 1/2 and 2/3 -> AP = (1/2 + 2/3) / 2
    assert average_precision(torch.tensor([3.0, 2.0, 1.0]),
                             torch.tensor([0, 1, 1])) == pytest.approx(7 / 12)
    assert average_precision(scores, torch.zeros(4)) is None


def test_tied_scores_form_one_threshold():
    # scores tied between a positive and a negative: one threshold holding both, precision
    # 1/2 at recall 1/2; then the other positive at rank 3: precision 2/3 at recall 1.
    scores = torch.tensor([0.5, 0.5, 0.2])
    positives = torch.tensor([1, 0, 1])
    expected = 0.5 * 0.5 + 0.5 * (2 / 3)
    assert average_precision(scores, positives) == pytest.approx(expected)
    # the order of the tied items does not matter
    assert average_precision(scores, torch.tensor([0, 1, 1])) == pytest.approx(expected)


def test_map_skips_classes_without_positives_and_counts_them():
    scores = torch.tensor([[0.9, 0.1, 0.3], [0.8, 0.7, 0.2], [0.1, 0.9, 0.4]])
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    # class 0: +,-,+ -> (1 + 2/3) / 2; class 1 ranking (0.9 +, 0.7 +, 0.1 -) -> 1; class 2 skipped
    value, skipped = mean_average_precision(scores, targets)
    assert value == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2)
    assert skipped == 1
    report = classification_report(scores, targets, multilabel=True, classes=["a", "b", "c"])
    assert report["mAP"] == pytest.approx(value) and report["mAP_skipped_classes"] == 1
    assert report["per_class_ap"]["c"] is None
    assert report["per_class_ap"]["b"] == pytest.approx(1.0)


def test_single_label_report_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [3.0, 0.0, 0.0], [0.0, 2.0, 0.0],
                           [0.0, 0.0, 1.0]])
    targets = torch.tensor([0, 1, 1, 1, 2])
    r = classification_report(logits, targets, multilabel=False, classes=["x", "y", "z"])
    assert r["accuracy"] == pytest.approx(0.8)
    # x: tp 1 fp 1 fn 0 -> 2/3; y: tp 2 fp 0 fn 1 -> 4/5; z: 1
    assert r["macro_f1"] == pytest.approx((2 / 3 + 4 / 5 + 1) / 3)
    assert r["confusion_matrix"] == [[1, 0, 0], [1, 2, 0], [0, 0, 1]]
    assert confusion_matrix(logits, targets)[1] == [1, 2, 0]
    # one-vs-rest AP of x: scores 2, 0, 3, 0, 0 with positives at the first clip only:
    # ranking 3 (-), 2 (+) -> precision 1/2
    assert r["per_class_ap"]["x"] == pytest.approx(0.5)
