"""The evaluation browser's data: an `umbrella evaluate` folder read once at start-up.

``metrics.json`` and ``predictions.jsonl`` give the table (one row per prediction: truth, answer,
confidence, correct); the run's ``config.yaml`` (beside ``model/``) gives the records, so a row
can open its subject's scans. Paths come from the server's own records, never from the client.
"""

from __future__ import annotations

import json
from pathlib import Path

from umbrella.errors import ConfigError, UmbrellaError


def _confidence(row: dict) -> float | None:
    probs = row.get("probs")
    return float(max(probs.values())) if isinstance(probs, dict) and probs else None


def _table_row(row: dict, has_images: bool) -> dict:
    return {"id": row["id"], "item": row.get("item", row["id"]),
            "subject_id": row.get("subject_id"), "task": row.get("task"),
            "modalities": row.get("modalities", []), "reference": row.get("reference"),
            "answer": row.get("answer"), "prediction": row.get("prediction"),
            "correct": row.get("correct"), "abs_error": row.get("abs_error"),
            "confidence": _confidence(row), "probs": row.get("probs"),
            "can_open": has_images}


def wrong_first(rows: list[dict]) -> list[dict]:
    """Wrong answers first (the most confident first), then unscored, then right ones;
    regression rows by absolute error, largest first."""
    def key(r):
        rank = {False: 0, None: 1, True: 2}[r["correct"]] if r["abs_error"] is None else 0
        err = -(r["abs_error"] or 0.0)
        return (rank, -(r["confidence"] or 0.0) if rank == 0 else 0.0, err, r["id"])
    return sorted(rows, key=key)


class EvaluationData:
    """One evaluation folder: metrics, the prediction table, plots and the records' images."""

    def __init__(self, eval_dir: str | Path):
        self.dir = Path(eval_dir).resolve()
        metrics_path, preds_path = self.dir / "metrics.json", self.dir / "predictions.jsonl"
        if not metrics_path.is_file() or not preds_path.is_file():
            raise ConfigError(f"--eval {eval_dir}: no metrics.json / predictions.jsonl there; "
                              "pass the folder `umbrella evaluate` wrote (e.g. <run>/evaluation)")
        self.metrics = json.loads(metrics_path.read_text())
        rows = [json.loads(line) for line in preds_path.read_text().splitlines() if line.strip()]
        self.images, self.records_note = self._record_images()
        self.rows = wrong_first([_table_row(r, r["id"] in self.images) for r in rows])
        self.plots = {name: file for name, file in self.metrics.get("plots", {}).items()
                      if (self.dir / file).is_file() and Path(file).name == file}

    def _record_images(self) -> tuple[dict[str, list[tuple[str, Path]]], str | None]:
        """{record id: [(modality, path)]} from the run's config, or ({}, why not)."""
        model_dir = Path(self.metrics.get("model", ""))
        candidates = [model_dir.parent / "config.yaml", self.dir.parent / "config.yaml"]
        config = next((c for c in candidates if c.is_file()), None)
        if config is None:
            return {}, "the run's config.yaml was not found, so scans cannot be opened"
        from umbrella.config import load_config
        from umbrella.data.catalog import load_config_records

        try:
            records = load_config_records(load_config(config))
        except UmbrellaError as exc:
            return {}, f"the run's records cannot be read ({exc}), so scans cannot be opened"
        return {r.id: [(im.modality, Path(im.path)) for im in r.images] for r in records}, None

    def summary(self) -> dict:
        return {"split": self.metrics.get("split"), "scoring": self.metrics.get("scoring"),
                "tasks": self.metrics.get("tasks", {}), "rows": self.rows,
                "plots": sorted(self.plots), "note": self.records_note}

    def plot_path(self, name: str) -> Path:
        if name not in self.plots:
            raise KeyError(name)
        return self.dir / self.plots[name]
