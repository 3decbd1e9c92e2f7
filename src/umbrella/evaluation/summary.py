"""Prediction rows -> metrics per task, per study and per modality, with bootstrap CIs and a
baseline beside each metric.

The unit of every metric is the *subject* (a pair of subjects for comparison tasks): several
items of one unit (records of several scans or phrasings, rsfMRI windows) are aggregated first: classification by the mean of
the option probabilities (likelihood) or a majority vote of the parsed answers (generation, ties to
the earlier option), regression by the mean of the parsed values. A unit none of whose answers
parsed counts as wrong (classification) or is scored as the baseline's mean (regression); the
parse-failure rate is reported beside. Bootstrap CIs resample units.

Baselines: a constant predictor, the majority class / the mean taken from the training split when
its records are given (``source: "train"``), else from the evaluated split itself.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from umbrella.evaluation.metrics import (
    class_scores,
    classification_ci,
    classification_metrics,
    constant_classifier_scores,
    constant_regressor_scores,
    encode_labels,
    regression_ci,
    regression_metrics,
)
from umbrella.task_registry import TaskSpec


def unit_key(row: dict) -> str:
    """A subject id, or "a|b" for a record about a pair of subjects."""
    subjects = row.get("subjects") or [row["subject_id"]]
    return "|".join(subjects)


def group_units(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in rows:
        out.setdefault(unit_key(row), []).append(row)
    return dict(sorted(out.items()))


def aggregate_classification(rows: list[dict], options: tuple[str, ...]) -> dict:
    """One unit's records -> {"reference", "prediction", "probs" (or None), "n_records"}."""
    refs = Counter(r["reference_label"] for r in rows)
    reference = max(options, key=lambda o: (refs[o], -options.index(o)))
    if all(r.get("probs") for r in rows):
        probs = np.mean([[r["probs"][o] for o in options] for r in rows], axis=0)
        return {"reference": reference, "prediction": options[int(np.argmax(probs))],
                "probs": probs, "n_records": len(rows)}
    votes = Counter(r["prediction"] for r in rows if r["prediction"] is not None)
    prediction = max(options, key=lambda o: (votes[o], -options.index(o))) if votes else None
    return {"reference": reference, "prediction": prediction, "probs": None,
            "n_records": len(rows)}


def aggregate_regression(rows: list[dict]) -> dict:
    parsed = [r["prediction"] for r in rows if r["prediction"] is not None]
    return {"reference": float(np.mean([r["reference_value"] for r in rows])),
            "prediction": float(np.mean(parsed)) if parsed else None, "n_records": len(rows)}


def baseline_value(task: TaskSpec, references: list) -> str | float | None:
    """Majority class (ties: the earlier option) or mean of a list of reference values."""
    if not references:
        return None
    if task.kind == "classification":
        counts = Counter(references)
        return max(task.options, key=lambda o: (counts[o], -task.options.index(o)))
    return float(np.mean(references))


def _classification(task: TaskSpec, rows, baseline, source, boot) -> dict:
    units = [aggregate_classification(r, task.options) for r in group_units(rows).values()]
    options = list(task.options)
    y = [u["reference"] for u in units]
    pred = [u["prediction"] for u in units]
    probs = np.array([u["probs"] for u in units]) if all(u["probs"] is not None for u in units) \
        else None
    majority = baseline if baseline is not None else baseline_value(task, y)
    out = classification_metrics(y, pred, options, probs, majority=majority)
    t, p = encode_labels(y, pred, options)
    out["n_records"] = len({r["id"] for r in rows})
    out["n_items"] = len(rows)
    out["record_parse_failures"] = sum(r["prediction"] is None for r in rows)
    out["ci"] = classification_ci(t, p, len(options), probs, **boot)
    out["baseline"] = {"predictor": f"majority class {majority!r}", "source": source,
                       **constant_classifier_scores(t, len(options), options.index(majority)),
                       "chance_accuracy": 1 / len(options)}
    return out


def _regression(task: TaskSpec, rows, baseline, source, boot) -> dict:
    units = [aggregate_regression(r) for r in group_units(rows).values()]
    y = np.array([u["reference"] for u in units])
    mean = baseline if baseline is not None else float(y.mean())
    failed = [u["prediction"] is None for u in units]
    f = np.array([mean if u["prediction"] is None else u["prediction"] for u in units])
    out = {"n": len(units), "n_records": len({r["id"] for r in rows}), "n_items": len(rows),
           **regression_metrics(y, f),
           "parse_failures": int(sum(failed)), "parse_failure_rate": float(np.mean(failed)),
           "record_parse_failures": sum(r["prediction"] is None for r in rows),
           "unit": task.unit, "ci": regression_ci(y, f, **boot)}
    shown = f"{mean:.{task.decimals}f}" + (f" {task.unit}" if task.unit else "")
    out["baseline"] = {"predictor": f"mean {shown}", "source": source,
                       **constant_regressor_scores(y, mean)}
    return out


def task_metrics(task: TaskSpec | None, rows: list[dict], *, baseline=None,
                 source: str = "evaluated split", resamples: int = 1000, seed: int = 0) -> dict:
    """Metrics of one task's rows (see the module docstring)."""
    boot = {"resamples": resamples, "seed": seed}
    if task is not None and task.kind == "classification":
        return _classification(task, rows, baseline, source, boot)
    if task is not None and task.kind == "regression":
        return _regression(task, rows, baseline, source, boot)
    hits = sum(bool(r["correct"]) for r in rows)
    return {"n": len(rows), "n_records": len({r["id"] for r in rows}), "n_items": len(rows),
            "n_correct": hits,
            "exact_match": hits / len(rows)}


def summarise(rows: list[dict], specs: dict[str, TaskSpec | None], *,
              baselines: dict | None = None, resamples: int = 1000, seed: int = 0) -> dict:
    """{"tasks": {task: metrics}, "by_study": {task: {study: metrics}}, "by_modality": ...}.

    ``baselines``: {task: majority class / mean} from the training split; tasks missing from it
    take their baseline from the evaluated rows. Groups appear only where a task spans several
    studies (modalities).
    """
    baselines = baselines or {}
    out: dict = {"tasks": {}, "by_study": {}, "by_modality": {}}
    for name in sorted({r["task"] for r in rows}):
        mine = [r for r in rows if r["task"] == name]
        spec = specs.get(name)
        base = baselines.get(name)
        source = "train" if base is not None else "evaluated split"
        kw = {"baseline": base, "source": source, "resamples": resamples, "seed": seed}
        out["tasks"][name] = task_metrics(spec, mine, **kw)
        for group, key in (("by_study", lambda r: r["study"]),
                           ("by_modality", lambda r: "+".join(r["modalities"]))):
            values = sorted({key(r) for r in mine})
            if len(values) > 1:
                out[group][name] = {v: task_metrics(spec, [r for r in mine if key(r) == v], **kw)
                                    for v in values}
    return out


__all__ = ["summarise", "task_metrics", "baseline_value", "unit_key", "group_units", "class_scores"]
