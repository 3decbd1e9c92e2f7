"""Metric values in numpy (so a 1000-resample bootstrap stays fast), checked against scikit-learn
in the tests.

Classification: accuracy, balanced accuracy (mean recall over the classes present), macro-F1 over
all options (``2tp / (2tp + fp + fn)``, 0 where undefined), ROC-AUC (binary: P(second option);
more classes: one-vs-rest macro average over the classes present). Unparseable predictions count as
wrong, never dropped. Regression: MAE, RMSE, Pearson r, R² (``1 - SS_res / SS_tot``).
Counts are kept beside rates (``n_correct`` / ``n``) so thresholds compare exact numbers.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.stats import rankdata

CLASSIFICATION_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc")
REGRESSION_KEYS = ("mae", "rmse", "pearson_r", "r2")


def encode_labels(y_true: list[str], y_pred: list[str | None], options: list[str]):
    """(t, p) int arrays of option indices; ``p`` is -1 where the answer did not parse."""
    index = {o: i for i, o in enumerate(options)}
    unknown = sorted({y for y in y_true if y not in index})
    if unknown:
        raise ValueError(f"reference labels {unknown} are not among the options {options}")
    t = np.array([index[y] for y in y_true], dtype=np.int64)
    p = np.array([index.get(y, -1) if y is not None else -1 for y in y_pred], dtype=np.int64)
    return t, p


def _binary_auc(positive: np.ndarray, score: np.ndarray) -> float | None:
    """Mann-Whitney AUC with tied scores counted half; None without both classes."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_auc(t: np.ndarray, probs: np.ndarray) -> float | None:
    """t: (n,) class indices; probs: (n, K). None when fewer than two classes are present."""
    k = probs.shape[1]
    if len(np.unique(t)) < 2:
        return None
    if k == 2:
        return _binary_auc(t == 1, probs[:, 1])
    aucs = [a for c in range(k) if (a := _binary_auc(t == c, probs[:, c])) is not None]
    return float(np.mean(aucs)) if aucs else None


def class_scores(t: np.ndarray, p: np.ndarray, k: int, probs: np.ndarray | None = None) -> dict:
    """accuracy, balanced_accuracy, macro_f1, roc_auc of index arrays (p = -1: unparsed)."""
    hit = t == p
    present = np.unique(t)
    recalls = [hit[t == c].mean() for c in present]
    f1 = []
    for c in range(k):
        tp = int(np.sum(hit & (t == c)))
        fp = int(np.sum((p == c) & (t != c)))
        fn = int(np.sum((t == c) & (p != c)))
        f1.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {"accuracy": float(hit.mean()), "balanced_accuracy": float(np.mean(recalls)),
            "macro_f1": float(np.mean(f1)),
            "roc_auc": roc_auc(t, probs) if probs is not None else None}


def classification_metrics(y_true: list[str], y_pred: list[str | None], options: list[str],
                           probs: np.ndarray | None = None, majority: str | None = None) -> dict:
    """y_pred entries are None where the answer could not be parsed.

    probs: (n, K) probabilities over ``options`` (likelihood scoring), or None (generation).
    majority: the baseline's constant answer (from the training split when known); default: the
    most frequent class of ``y_true`` (ties: the first option).
    """
    n = len(y_true)
    if n == 0:
        return {"n": 0}
    t, p = encode_labels(y_true, y_pred, list(options))
    counts = {o: int(np.sum(t == i)) for i, o in enumerate(options)}
    majority = majority if majority is not None else max(options, key=lambda o: counts[o])
    out = {"n": n, "n_correct": int(np.sum(t == p)),
           **class_scores(t, p, len(options), probs),
           "parse_failures": int(np.sum(p < 0)), "parse_failure_rate": float(np.mean(p < 0)),
           "majority_class": majority,
           "majority_baseline_accuracy": counts.get(majority, 0) / n, "class_counts": counts}
    return out


def regression_metrics(y_true, y_pred) -> dict:
    """MAE, RMSE, Pearson r and R² of two equal-length vectors (r / R² None when undefined)."""
    y, f = np.asarray(y_true, dtype=float), np.asarray(y_pred, dtype=float)
    if len(y) == 0:
        return {"mae": None, "rmse": None, "pearson_r": None, "r2": None}
    err = f - y
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r = None
    if len(y) > 1 and np.std(y) > 0 and np.std(f) > 0:
        r = float(np.corrcoef(y, f)[0, 1])
    return {"mae": float(np.mean(np.abs(err))), "rmse": float(np.sqrt(np.mean(err ** 2))),
            "pearson_r": r, "r2": 1.0 - float(np.sum(err ** 2)) / ss_tot if ss_tot > 0 else None}


def bootstrap_ci(statistic: Callable[[np.ndarray], dict], n: int, *, resamples: int = 1000,
                 seed: int = 0, level: float = 0.95) -> dict[str, list[float] | None]:
    """Percentile bootstrap: ``statistic(indices)`` on ``resamples`` draws of n units with
    replacement; per key ``[low, high]``, or None where the statistic was never defined."""
    if n == 0 or resamples <= 0:
        return {}
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(resamples):
        for key, value in statistic(rng.integers(0, n, n)).items():
            draws.setdefault(key, []).append(np.nan if value is None else value)
    tail = 100 * (1 - level) / 2
    out = {}
    for key, values in draws.items():
        arr = np.asarray(values, dtype=float)
        arr = arr[np.isfinite(arr)]
        out[key] = [float(np.percentile(arr, tail)), float(np.percentile(arr, 100 - tail))] \
            if len(arr) else None
    return out


def classification_ci(t: np.ndarray, p: np.ndarray, k: int, probs: np.ndarray | None, **kw):
    return bootstrap_ci(lambda i: class_scores(t[i], p[i], k, None if probs is None else probs[i]),
                        len(t), **kw)


def regression_ci(y: np.ndarray, f: np.ndarray, **kw):
    return bootstrap_ci(lambda i: regression_metrics(y[i], f[i]), len(y), **kw)


def constant_classifier_scores(t: np.ndarray, k: int, answer: int) -> dict:
    """Scores of always answering option ``answer`` (AUC of a constant score is 0.5)."""
    scores = class_scores(t, np.full_like(t, answer), k, None)
    scores["roc_auc"] = 0.5 if len(np.unique(t)) > 1 else None
    return scores


def constant_regressor_scores(y: np.ndarray, value: float) -> dict:
    """Scores of always predicting ``value`` (Pearson r undefined)."""
    return regression_metrics(y, np.full(len(y), float(value)))
