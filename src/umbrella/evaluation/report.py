"""metrics.json -> a plain-text table for the terminal and a Markdown report with the plots.

Every metric is shown with its bootstrap 95% CI and the baseline's value beside it; where the
classical reference was fitted, its value and CI too, then one line per task (and modality) with
the reference's fit, the verdict of the paired comparison and, from a truth file, what is
achievable (see :mod:`umbrella.evaluation.reference`).
"""

from __future__ import annotations

import json
from pathlib import Path

from umbrella.io import atomic_write_text

_CLASSIFICATION = (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"),
                   ("macro_f1", "macro-F1"), ("roc_auc", "ROC-AUC"))
_REGRESSION = (("mae", "MAE"), ("rmse", "RMSE"), ("pearson_r", "Pearson r"), ("r2", "R²"))


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def _ci(m: dict, key: str) -> str:
    ci = (m.get("ci") or {}).get(key)
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "n/a"


def _kind(m: dict) -> str:
    return "classification" if "accuracy" in m else "regression" if "mae" in m else "free"


def _baseline_head(m: dict) -> str:
    b = m.get("baseline") or {}
    kind = "majority baseline" if _kind(m) == "classification" else "mean baseline"
    return f"{kind} ({b.get('predictor', 'n/a')}, from {b.get('source', 'n/a')})"


def _reference(m: dict) -> dict | None:
    """The fitted reference block of a task's (group's) metrics, or None."""
    ref = m.get("reference")
    return ref if ref and "skipped" not in ref else None


def _head(m: dict) -> list[str]:
    return ["metric", "value", "95% CI", _baseline_head(m)] + \
        (["reference (95% CI)"] if _reference(m) else [])


def task_rows(m: dict) -> list[list[str]]:
    """[metric, value, 95% CI, baseline(, reference with its CI)] rows of one task's metrics."""
    if _kind(m) == "free":
        return [["exact match", _fmt(m.get("exact_match")), "n/a", "n/a"]]
    names = _CLASSIFICATION if _kind(m) == "classification" else _REGRESSION
    base, ref = m.get("baseline") or {}, _reference(m)
    tail = [""] if ref else []
    rows = [[label, _fmt(m.get(key)), _ci(m, key), _fmt(base.get(key))]
            + ([f"{_fmt(ref.get(key))} {_ci(ref, key)}"] if ref else []) for key, label in names]
    if _kind(m) == "classification":
        rows.append(["chance accuracy", _fmt(base.get("chance_accuracy")), "", ""] + tail)
    rows.append(["parse failures", f"{m.get('parse_failures', 0)}/{m['n']} "
                 f"({100 * m.get('parse_failure_rate', 0.0):.1f}%)", "", ""] + tail)
    return rows


_LABELS = dict(_CLASSIFICATION + _REGRESSION)


def _fit_lines(ref: dict) -> list[str]:
    """Per fitted modality group: the predictor with its chosen regularisation, then features."""
    fits, lines = ref.get("fits", {}), []
    for group, f in fits.items():
        where = f" {group}" if len(fits) > 1 else ""
        reg = ", ".join(f"{k}={v:.3g}" for k, v in f["regularisation"].items())
        lines += [f"reference{where}: {ref['predictor'].split(' on ')[0]}, {reg} ({f['cv']}, "
                  f"{f['n_train']} training subjects)",
                  f"reference{where} features: {f['features']}"]
    return lines


def _verdict_text(ref: dict) -> str:
    c = ref["comparison"]
    label = _LABELS.get(c["metric"], c["metric"])
    adv = "n/a" if c["advantage"] is None else f"{c['advantage']:+.3f}"
    ci = f", 95% CI [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]" if c.get("ci") else ""
    return f"{c['verdict']} ({label} advantage {adv}{ci}; {c['sign']})"


def _achievable_text(a: dict) -> str:
    note = f" ({a['note']})" if a.get("note") else ""
    return f"{_LABELS.get(a['metric'], a['metric'])} {a['value']:.3f}{note}"


def reference_lines(name: str, m: dict, by_modality: dict | None = None) -> list[str]:
    """"reference:", "verdict:" and "achievable:" lines of a task, and per modality group."""
    lines = []
    groups = [("", m)] + [(f" {g}", gm) for g, gm in (by_modality or {}).items()]
    for suffix, gm in groups:
        ref = gm.get("reference")
        if ref and "skipped" in ref:
            lines.append(f"reference{suffix}: none ({ref['skipped']})")
        elif ref:
            if not suffix:
                lines += _fit_lines(ref)
            lines.append(f"verdict{suffix}: {_verdict_text(ref)}")
        if gm.get("achievable"):
            lines.append(f"achievable{suffix}: {_achievable_text(gm['achievable'])}")
    return lines


def _aligned(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in rows]


def _task_title(name: str, m: dict, scoring: str | None = None) -> str:
    unit = f", {m['unit']}" if m.get("unit") else ""
    tail = f", scoring: {scoring}" if scoring else ""
    return (f"{name} ({_kind(m)}{unit}; {m['n']} subjects, {m.get('n_records', m['n'])} "
            f"records{tail})")


_REGRESSION_METHODS = {"expected": "the expected value of the model's distribution over candidate "
                                   "answers (optimal for squared error)",
                       "median": "the median of the model's distribution over candidate answers "
                                 "(optimal for absolute error)",
                       "generate": "greedy generation"}


def regression_method(metrics: dict, name: str) -> str | None:
    """How a regression task's numbers were produced, e.g. "expected, 1201 candidates, step 0.1";
    None for other tasks."""
    if _kind(metrics["tasks"].get(name, {})) != "regression":
        return None
    reg = metrics.get("regression") or {"method": "generate"}
    grid = (reg.get("tasks") or {}).get(name)
    if reg["method"] == "generate" or grid is None:
        return "generate (digits)" if metrics.get("constrained") else "generate"
    return f"{reg['method']}, {grid['candidates']} candidates, step {grid['step']:g}"


def _regression_line(metrics: dict) -> list[str]:
    reg = metrics.get("regression") or {}
    if not any(_kind(m) == "regression" for m in metrics["tasks"].values()):
        return []
    method = reg.get("method", "generate")
    digits = " restricted to digits and the unit" if method == "generate" and \
        metrics.get("constrained") else ""
    return [f"Regression answers: {_REGRESSION_METHODS.get(method, method)}{digits}  "]


def metrics_table(metrics: dict) -> str:
    """One block per task: metric, value, 95% CI and the baseline's value."""
    lines = []
    for name, m in metrics["tasks"].items():
        if not m.get("n"):
            lines.append(f"{name}: no records")
            continue
        lines.append(_task_title(name, m, regression_method(metrics, name)))
        lines += _aligned([_head(m)] + task_rows(m))
        lines += ["  " + t for t in reference_lines(name, m, metrics.get("by_modality", {})
                                                     .get(name))]
    return "\n".join(lines)


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + \
        ["| " + " | ".join(r) + " |" for r in rows]


def _group_section(title: str, groups: dict) -> list[str]:
    lines = []
    for name, by in groups.items():
        first = next(iter(by.values()))
        keys = _CLASSIFICATION if _kind(first) == "classification" else _REGRESSION
        head = [title, "n"] + [label for _, label in keys] + ["parse fail"]
        rows = []
        for g, m in by.items():
            rows.append([g, str(m["n"])] + [f"{_fmt(m.get(k))} {_ci(m, k)}" for k, _ in keys]
                        + [_fmt(m.get("parse_failure_rate"))])
            ref = _reference(m)
            if ref:  # the classical reference of this group, on the same subjects
                rows.append([f"{g} reference", str(ref["n"])]
                            + [f"{_fmt(ref.get(k))} {_ci(ref, k)}" for k, _ in keys] + [""])
        lines += ["", f"### {name} by {title}", ""] + _md_table(head, rows)
    return lines


def _loss_lines(run_dir: Path | None) -> list[str]:
    if run_dir is None or not (Path(run_dir) / "log_history.json").is_file():
        return []
    hist = json.loads((Path(run_dir) / "log_history.json").read_text())
    losses = [h["loss"] for h in hist if "loss" in h]
    evals = [h["eval_loss"] for h in hist if "eval_loss" in h]
    lines = []
    if losses:
        lines += ["", f"Training loss: first {losses[0]:.3f}, last {losses[-1]:.3f} "
                  f"({len(losses)} logged points)."]
    if evals:
        lines += [f"Validation loss: first {evals[0]:.3f}, last {evals[-1]:.3f}."]
    return lines


def write_report(metrics: dict, path: Path, run_dir: Path | None = None) -> Path:
    boot = metrics.get("bootstrap", {})
    plots = metrics.get("plots", {})
    lines = [f"# Evaluation on split `{metrics['split']}`", "",
             f"Model: `{metrics['model']}`  ", f"Scoring: {metrics['scoring']}  ",
             *_regression_line(metrics), f"Records: {metrics.get('n_records', 'n/a')}", ""]
    for name, m in metrics["tasks"].items():
        if not m.get("n"):
            continue
        lines += [f"## {_task_title(name, m, regression_method(metrics, name))}", ""]
        lines += _md_table(_head(m), task_rows(m))
        extra = reference_lines(name, m, metrics.get("by_modality", {}).get(name))
        if extra:
            lines += [""] + [f"- {t}" for t in extra]
        for kind in ("confusion", "roc", "scatter"):
            if f"{kind}_{name}" in plots:
                lines += ["", f"![{name} {kind}]({plots[f'{kind}_{name}']})"]
        lines.append("")
    lines += _group_section("study", metrics.get("by_study", {}))
    lines += _group_section("modality", metrics.get("by_modality", {}))
    lines += ["", "## How to read this", "",
              "- Metrics are computed over subjects (pairs for comparison tasks): several records "
              "of one subject are averaged first (probabilities, or a majority vote / the mean of "
              "the parsed answers).",
              "- An answer that does not parse strictly (no option, two options, no number, a "
              "number out of range) counts as wrong; for regression such a subject is scored as "
              "the mean baseline. The parse-failure rate is listed per task.",
              f"- 95% CIs: percentile bootstrap, {boot.get('resamples', 'n/a')} resamples of "
              f"subjects, seed {boot.get('seed', 'n/a')}.",
              "- Baselines are a constant predictor: the majority class (classification) or the "
              "mean (regression), taken from the training split where marked `from train`, "
              "otherwise from the evaluated split itself (which flatters the baseline slightly)."]
    if "cache_dir" in metrics.get("reference", {}):  # fitted (not skipped as a whole)
        lines += ["- The reference is a linear model (ridge regression / L2 logistic regression) "
                  "on coarse features of the same preprocessed inputs the model saw (pooled "
                  "voxels; connectivity of coarse regions for rsfMRI), fitted on the training "
                  "split with its regularisation chosen by cross-validation grouped by subject, "
                  "and scored here with the same bootstrap. The verdict compares the model with "
                  "it on the same subjects: a paired bootstrap of the model's advantage (model "
                  "minus reference; reference minus model for MAE and RMSE). `model better than "
                  "the reference` means the 95% CI of that advantage lies above 0; anything else "
                  "is `not better`."]
    if metrics.get("truth"):
        lines += [f"- `achievable` is the best value the cohort's planted effects allow, from its "
                  f"truth file `{metrics['truth']}`, where it names the task and modality."]
    lines += _loss_lines(run_dir)
    if "loss_curves" in plots:
        lines += ["", f"![loss curves]({plots['loss_curves']})"]
    return atomic_write_text(path, "\n".join(lines) + "\n")
