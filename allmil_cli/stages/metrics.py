"""Patient-level metrics as the paper reports them (positive class = ALL)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties count half); NaN with a single class."""
    y = np.asarray(labels, dtype=int)
    s = np.asarray(scores, dtype=np.float64)
    pos, neg = s[y == 1], s[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def binary_metrics(labels: Sequence[int], predictions: Sequence[int], scores: Sequence[float] | None = None) -> dict[str, float]:
    """accuracy, f1, sensitivity (recall), specificity, precision, roc_auc and the confusion matrix."""
    y = np.asarray(labels, dtype=int)
    p = np.asarray(predictions, dtype=int)
    tp = int(((y == 1) & (p == 1)).sum())
    tn = int(((y == 0) & (p == 0)).sum())
    fp = int(((y == 0) & (p == 1)).sum())
    fn = int(((y == 1) & (p == 0)).sum())

    def ratio(a: int, b: int) -> float:
        return a / b if b else float("nan")

    precision = ratio(tp, tp + fp)
    recall = ratio(tp, tp + fn)
    f1 = ratio(2 * tp, 2 * tp + fp + fn)
    return {
        "n": int(len(y)),
        "accuracy": ratio(tp + tn, len(y)),
        "f1": f1,
        "sensitivity": recall,
        "specificity": ratio(tn, tn + fp),
        "precision": precision,
        "roc_auc": roc_auc(y, scores) if scores is not None else float("nan"),
        "tp": tp,
        "fn": fn,
        "fp": fp,
        "tn": tn,
    }
