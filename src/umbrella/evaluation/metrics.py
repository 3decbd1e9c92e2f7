"""Classification metrics with scikit-learn; unparseable predictions count as wrong, never dropped.

Counts are kept beside rates (``n_correct`` / ``n``) so thresholds compare exact numbers.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score


def classification_metrics(y_true: list[str], y_pred: list[str | None], options: list[str],
                           probs: np.ndarray | None = None) -> dict:
    """y_pred entries are None where the answer could not be parsed.

    probs: (n, K) probabilities over ``options`` (likelihood scoring), or None (generation).
    """
    n = len(y_true)
    if n == 0:
        return {"n": 0}
    unparsed = "<unparsed>"
    pred = [p if p is not None else unparsed for p in y_pred]
    labels = list(options)
    correct = sum(t == p for t, p in zip(y_true, pred, strict=True))
    counts = {o: y_true.count(o) for o in options}
    majority = max(counts.values())
    out = {
        "n": n, "n_correct": correct, "accuracy": correct / n,
        "balanced_accuracy": float(balanced_accuracy_score(y_true, pred))
        if len(set(y_true)) > 1 else float(correct / n),
        "macro_f1": float(f1_score(y_true, pred, labels=labels, average="macro", zero_division=0)),
        "parse_failures": pred.count(unparsed), "parse_failure_rate": pred.count(unparsed) / n,
        "majority_baseline_accuracy": majority / n, "class_counts": counts,
        "roc_auc": None,
    }
    present = [o for o in options if counts[o] > 0]
    if probs is not None and len(present) > 1:
        y_idx = np.array([options.index(t) for t in y_true])
        if len(options) == 2:
            out["roc_auc"] = float(roc_auc_score(y_idx, probs[:, 1]))
        else:
            out["roc_auc"] = float(roc_auc_score(y_idx, probs, multi_class="ovr",
                                                 labels=list(range(len(options)))))
    return out
