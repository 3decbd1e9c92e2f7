"""metrics.json -> a short Markdown report and a plain-text table for the terminal."""

from __future__ import annotations

import json
from pathlib import Path

from umbrella.io import atomic_write_text

_COLUMNS = (("accuracy", "accuracy"), ("balanced_accuracy", "bal. acc."), ("macro_f1", "macro-F1"),
            ("roc_auc", "ROC-AUC"), ("majority_baseline_accuracy", "majority baseline"),
            ("parse_failure_rate", "parse fail"))


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def metrics_rows(metrics: dict) -> list[list[str]]:
    rows = []
    for task, m in metrics["tasks"].items():
        if "accuracy" in m:
            rows.append([task, str(m["n"])] + [_fmt(m.get(k)) for k, _ in _COLUMNS])
        else:
            rows.append([task, str(m["n"]), _fmt(m.get("exact_match"))] + ["n/a"] * 5)
    return rows


def metrics_table(metrics: dict) -> str:
    """Fixed-width table: one row per task."""
    head = ["task", "n"] + [name for _, name in _COLUMNS]
    rows = [head] + metrics_rows(metrics)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_report(metrics: dict, path: Path, run_dir: Path | None = None) -> Path:
    head = ["task", "n"] + [name for _, name in _COLUMNS]
    lines = [f"# Evaluation on split `{metrics['split']}`", "",
             f"Model: `{metrics['model']}`  ", f"Scoring: {metrics['scoring']}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in metrics_rows(metrics)]
    lines += ["", "Accuracy counts unparseable answers as wrong; the majority baseline is the share "
              "of the most frequent class in this split."]
    if run_dir is not None and (Path(run_dir) / "log_history.json").is_file():
        hist = json.loads((Path(run_dir) / "log_history.json").read_text())
        losses = [h["loss"] for h in hist if "loss" in h]
        evals = [h["eval_loss"] for h in hist if "eval_loss" in h]
        if losses:
            lines += ["", f"Training loss: first {losses[0]:.3f}, last {losses[-1]:.3f} "
                      f"({len(losses)} logged points)."]
        if evals:
            lines += [f"Validation loss: first {evals[0]:.3f}, last {evals[-1]:.3f}."]
    return atomic_write_text(path, "\n".join(lines) + "\n")
