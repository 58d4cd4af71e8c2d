"""Classification metrics as the field reports them (shared by ``beats probe`` and training).

- `average_precision`: area under the precision-recall step curve of one class; tied
  scores form one threshold (as scikit-learn's ``average_precision_score``).
- `mean_average_precision`: the mean over classes of each class's AP. Classes with no
  positive example in the evaluated set have no AP: they are skipped and counted.
- `accuracy`, `macro_f1`, `confusion_matrix`: single-label predictions (argmax).
- `classification_report`: all of the above for one split, as plain JSON-ready values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def average_precision(scores: torch.Tensor, positives: torch.Tensor) -> float | None:
    """AP of one class: scores (N,), positives (N,) bool. None when nothing is positive.

    AP = sum over distinct score thresholds t (high to low) of (R_t - R_prev) * P_t, with
    precision P_t and recall R_t of "score >= t".
    """
    positives = positives.bool().flatten()
    total = int(positives.sum())
    if total == 0:
        return None
    scores = scores.double().flatten()
    order = torch.argsort(scores, descending=True, stable=True)
    s, hits = scores[order], positives[order].double()
    tp = hits.cumsum(0)
    seen = torch.arange(1, len(s) + 1, dtype=torch.float64)
    # the last index of each run of equal scores closes a threshold
    last = torch.ones(len(s), dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]
    tp, seen = tp[last], seen[last]
    precision = tp / seen
    recall = tp / total
    gain = torch.diff(recall, prepend=torch.zeros(1, dtype=torch.float64))
    return float((gain * precision).sum())


def per_class_ap(scores: torch.Tensor, targets: torch.Tensor) -> list[float | None]:
    """AP of each class: scores (N, K), targets (N, K) 0/1; None for classes with no positive."""
    return [average_precision(scores[:, k], targets[:, k] > 0.5) for k in range(scores.shape[1])]


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
    """(mAP over classes that have a positive, number of classes skipped for having none)."""
    aps = per_class_ap(scores, targets)
    used = [a for a in aps if a is not None]
    return (sum(used) / len(used) if used else 0.0), len(aps) - len(used)


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Share of clips whose argmax is the target class: logits (N, K), targets (N,)."""
    return float((logits.argmax(dim=1) == targets).double().mean())


def macro_f1(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean F1 over the classes that occur as target or prediction (single-label)."""
    pred = logits.argmax(dim=1)
    f1s = []
    for k in sorted(set(targets.tolist()) | set(pred.tolist())):
        tp = int(((pred == k) & (targets == k)).sum())
        fp = int(((pred == k) & (targets != k)).sum())
        fn = int(((pred != k) & (targets == k)).sum())
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(f1s) / len(f1s) if f1s else 0.0


def confusion_matrix(logits: torch.Tensor, targets: torch.Tensor) -> list[list[int]]:
    """(K, K) counts: row = true class, column = predicted class."""
    k = logits.shape[1]
    pred = logits.argmax(dim=1)
    out = torch.zeros(k, k, dtype=torch.long)
    out.index_put_((targets.long(), pred), torch.ones_like(pred), accumulate=True)
    return out.tolist()


def one_hot(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N,) class indices -> (N, K) 0/1 float; (N, K) targets are returned as float."""
    if targets.dim() == 2:
        return targets.float()
    return torch.nn.functional.one_hot(targets.long(), num_classes).float()


def classification_report(
    logits: torch.Tensor,
    targets: torch.Tensor,
    multilabel: bool,
    classes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Every metric of one split.

    Args:
        logits: (N, K) scores (any monotonic transform gives the same AP).
        targets: (N,) class indices, or (N, K) 0/1 for multi-label (mixup-soft targets
            count as positive above 0.5).
        multilabel: report mAP (and per-class AP); else accuracy, macro F1 and the
            confusion matrix (and per-class AP of the one-vs-rest scores).
        classes: names for the per-class entries (default: the class indices).

    Returns:
        ``clips``; ``mAP``, ``mAP_skipped_classes`` (multi-label) or ``accuracy``,
        ``macro_f1``, ``confusion_matrix`` (single-label); ``per_class_ap`` {name: AP or
        None when the class has no positive clip here}.
    """
    logits = logits.detach().float().cpu()
    targets = targets.detach().cpu()
    names = list(classes) if classes is not None else [str(k) for k in range(logits.shape[1])]
    out: dict[str, Any] = {"clips": int(logits.shape[0])}
    hot = one_hot(targets, logits.shape[1])
    if multilabel:
        out["mAP"], out["mAP_skipped_classes"] = mean_average_precision(logits, hot)
    else:
        out["accuracy"] = accuracy(logits, targets)
        out["macro_f1"] = macro_f1(logits, targets)
        out["confusion_matrix"] = confusion_matrix(logits, targets)
    out["per_class_ap"] = dict(zip(names, per_class_ap(logits, hot), strict=True))
    return out


def score(report: dict[str, Any]) -> float:
    """The headline number of a report: mAP for multi-label, else accuracy."""
    return float(report.get("mAP", report.get("accuracy", 0.0)))
