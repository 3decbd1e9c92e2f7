"""PNG figures for the evaluation report: confusion matrix, ROC curve, predicted-vs-true scatter
and the run's training / validation loss curves.

Figures are drawn on matplotlib ``Figure`` objects with the Agg canvas (no pyplot, no global
backend state) and written atomically.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from umbrella.io import atomic_write_bytes


def _figure(width: float = 4.5, height: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(path, buf.getvalue())


def confusion_matrix_png(y_true: list[str], y_pred: list[str | None], options: list[str],
                         path: Path, title: str = "") -> Path:
    """Rows: reference; columns: the options plus "unparsed" when any answer failed to parse."""
    cols = list(options) + (["unparsed"] if any(p is None for p in y_pred) else [])
    matrix = np.zeros((len(options), len(cols)), dtype=int)
    for t, p in zip(y_true, y_pred, strict=True):
        matrix[options.index(t), cols.index(p if p is not None else "unparsed")] += 1
    fig = _figure(1.6 + 1.0 * len(cols), 1.4 + 0.9 * len(options))
    ax = fig.add_subplot()
    ax.imshow(matrix, cmap="Blues", vmin=0)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center",
                    color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(options)), options)
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference")
    ax.set_title(title or "confusion matrix")
    return _save(fig, path)


def _roc_points(positive: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-score, kind="stable")
    pos, s = positive[order], score[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # one point per distinct threshold
    tps, fps = np.cumsum(pos)[last], np.cumsum(~pos)[last]
    return np.r_[0, fps / max(fps[-1], 1)], np.r_[0, tps / max(tps[-1], 1)]


def roc_png(y_true: list[str], probs: np.ndarray, options: list[str], path: Path,
            title: str = "") -> Path:
    """Binary: the curve of P(second option); more classes: one-vs-rest curve per class."""
    t = np.array([options.index(y) for y in y_true])
    fig = _figure()
    ax = fig.add_subplot()
    classes = [1] if len(options) == 2 else range(len(options))
    for c in classes:
        positive = t == c
        if positive.all() or not positive.any():
            continue
        fpr, tpr = _roc_points(positive, probs[:, c])
        ax.plot(fpr, tpr, label=f"{options[c]} vs rest" if len(options) > 2 else f"P({options[c]})")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="chance")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title or "ROC curve")
    return _save(fig, path)


def scatter_png(y_true, y_pred, path: Path, unit: str = "", title: str = "",
                baseline: float | None = None) -> Path:
    """Predicted vs true with the identity line (and the baseline's constant as a dotted line)."""
    y, f = np.asarray(y_true, float), np.asarray(y_pred, float)
    fig = _figure()
    ax = fig.add_subplot()
    ax.scatter(y, f, s=14, alpha=0.7)
    both = np.r_[y, f]
    lo, hi = (float(both.min()), float(both.max())) if len(both) else (0.0, 1.0)
    ax.plot([lo, hi], [lo, hi], "--", color="grey", label="identity")
    if baseline is not None:
        ax.axhline(baseline, linestyle=":", color="tab:red", label="baseline (mean)")
    suffix = f" ({unit})" if unit else ""
    ax.set_xlabel("true" + suffix)
    ax.set_ylabel("predicted" + suffix)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title or "predicted vs true")
    return _save(fig, path)


def loss_curves_png(log_history: list[dict], path: Path) -> Path | None:
    """Training loss and validation loss against the step; None when the history has neither."""
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    val = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h and "step" in h]
    if not train and not val:
        return None
    fig = _figure(5.5, 3.5)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train, strict=True), label="training loss")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    ax.set_title("loss curves")
    return _save(fig, path)
