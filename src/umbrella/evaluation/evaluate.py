"""`umbrella evaluate`: a trained model on one split -> predictions.jsonl, metrics.json, report.md
and PNG plots.

Scoring: classification tasks by ``likelihood`` (the allowed options ranked by log-likelihood,
giving probabilities and ROC-AUC) or by ``generate`` (greedy decoding, strict parsing); regression
tasks by ``regression``: the expected value or median of the model's distribution over candidate
numbers (:mod:`umbrella.evaluation.regression`), or greedy generation, optionally
digit-constrained; free-text tasks by greedy generation. Metrics are per task,
per study and per modality, over subjects, with bootstrap CIs and baselines
(:mod:`umbrella.evaluation.summary`). Under torch.distributed every rank predicts a disjoint shard;
the rows are gathered once, de-duplicated by record id, and rank 0 writes the files.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from umbrella.data.cache import PreprocessCache
from umbrella.data.catalog import load_preprocessing
from umbrella.data.dataset import InstructionDataset
from umbrella.data.prompts import PromptEncoder
from umbrella.data.records import Record
from umbrella.errors import ConfigError, RecordError
from umbrella.evaluation import plots as figures
from umbrella.evaluation.distributed import gather_rows, rank_and_world, shard_indices
from umbrella.evaluation.reference import (
    add_reference,
    attach_achievable,
    load_truth,
    reference_cache_dir,
)
from umbrella.evaluation.regression import (
    METHODS,
    CandidateGrid,
    candidate_grid,
    method_label,
    regression_answers,
)
from umbrella.evaluation.report import write_report
from umbrella.evaluation.summary import (
    aggregate_classification,
    aggregate_regression,
    baseline_value,
    group_units,
    unit_key,
)
from umbrella.evaluation.summary import summarise as summarise_rows
from umbrella.io import atomic_write_json, atomic_write_jsonl
from umbrella.model.answering import generate_answers, numeric_answer_processor, score_options
from umbrella.model.build import load_brain_llava
from umbrella.runtime import retain_freed_memory
from umbrella.task_registry import TaskSpec, task_for_record

SCORINGS = ("likelihood", "generate")


@dataclass
class EvalResult:
    metrics: dict
    predictions: list[dict]
    out_dir: Path
    plots: dict[str, str] = field(default_factory=dict)  # name -> file name inside out_dir


def record_task(rec: Record) -> TaskSpec | None:
    return task_for_record(rec.task, rec.metadata)


def reference(rec: Record, task: TaskSpec | None):
    """The reference label (classification) or value (regression) of a record's answer."""
    if task is None or task.kind == "free":
        return rec.answer
    ref = task.parse(rec.answer)
    if ref is None:
        if task.kind == "classification":
            allowed = f"exactly one of {', '.join(task.options)}"
        else:
            allowed = f"one number in [{task.low}, {task.high}] {task.unit}".rstrip()
        raise RecordError(f"reference answer {rec.answer!r} does not name {allowed}",
                          record_id=rec.id, source=rec.source,
                          fix=f"write the answer as {allowed} (as `umbrella prepare` does)")
    return ref


def item_key(rec: Record, window_start: int | None) -> str:
    """A record id, with ``@w<start>`` when the item is one rsfMRI window of the record."""
    return rec.id if window_start is None else f"{rec.id}@w{window_start}"


def _row(rec: Record, task: TaskSpec | None, answer: str, probs, method: str,
         window_start: int | None = None) -> dict:
    row = {"id": rec.id, "item": item_key(rec, window_start), "subject_id": rec.subject_id,
           "study": rec.study, "task": rec.task, "modalities": list(rec.modalities),
           "scoring": method, "answer": answer, "reference": rec.answer}
    if window_start is not None:
        row["window_start"] = int(window_start)
    subjects = rec.metadata.get("subjects") if isinstance(rec.metadata, dict) else None
    if subjects:
        row["subjects"] = [str(s) for s in subjects]
    if task is not None and task.kind == "classification":
        row["reference_label"] = reference(rec, task)
        row["prediction"] = task.parse(answer)
        row["correct"] = row["prediction"] == row["reference_label"]
        if probs is not None:
            row["probs"] = {o: float(p) for o, p in zip(task.options, probs, strict=True)}
    elif task is not None and task.kind == "regression":
        row["reference_value"] = reference(rec, task)
        row["prediction"] = task.parse(answer)
        row["abs_error"] = None if row["prediction"] is None else \
            abs(row["prediction"] - row["reference_value"])
    else:
        row["prediction"] = answer
        row["correct"] = answer.strip().lower() == rec.answer.strip().lower()
    return row


def _by_task(dataset: InstructionDataset, indices: list[int]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i in indices:
        groups.setdefault(dataset.records[i].task, []).append(i)
    return groups


def _start(dataset, index: int) -> int | None:
    starts = getattr(dataset, "starts", None)
    return starts[index] if starts else None


def predict(model, encoder, dataset, scoring: str, batch_size: int, max_new_tokens: int,
            progress: bool = True, *, indices: list[int] | None = None,
            constrained: bool = False, regression: str = "generate",
            grids: dict[str, CandidateGrid] | None = None) -> list[dict]:
    """One row per dataset item of ``indices`` (default: all; an item is a record, or one window
    of it with ``windows="all"``), in index order. Batches hold one task. Regression tasks are
    answered by ``regression`` ("expected" / "median" over the candidates ``grids[task]``, or
    "generate")."""
    indices = list(range(len(dataset))) if indices is None else list(indices)
    rows: dict[int, dict] = {}
    bar = tqdm(total=len(indices), desc=f"evaluate ({scoring})", disable=not progress)
    for idx_task in _by_task(dataset, indices).values():
        task = record_task(dataset.records[idx_task[0]])
        likelihood = scoring == "likelihood" and task is not None and task.kind == "classification"
        grid = (grids or {}).get(dataset.records[idx_task[0]].task) \
            if task is not None and task.kind == "regression" and regression != "generate" else None
        digits = constrained and task is not None and task.kind == "regression" and grid is None
        processor = numeric_answer_processor(encoder, task.unit) if digits else None
        method = "likelihood" if likelihood else method_label(regression, grid) if grid else \
            "generate (digits)" if digits else "generate"
        for start in range(0, len(idx_task), batch_size):
            idx = idx_task[start:start + batch_size]
            recs = [dataset.records[i] for i in idx]
            specs = [record_task(r) for r in recs]
            samples = [dataset.scoring_sample(i) for i in idx]
            if likelihood:
                scores = score_options(model, encoder, samples, [list(t.options) for t in specs])
                for i, rec, spec, s in zip(idx, recs, specs, scores, strict=True):
                    p = torch.softmax(s, 0).numpy()
                    rows[i] = _row(rec, spec, spec.options[int(p.argmax())], p, method,
                                   _start(dataset, i))
            elif grid is not None:
                answers = regression_answers(model, encoder, samples, task, grid, regression)
                for i, rec, spec, (text, dist) in zip(idx, recs, specs, answers, strict=True):
                    rows[i] = _row(rec, spec, text, None, method, _start(dataset, i))
                    rows[i]["distribution"] = dist
            else:
                texts = generate_answers(model, encoder, samples, max_new_tokens, processor)
                for i, rec, spec, text in zip(idx, recs, specs, texts, strict=True):
                    rows[i] = _row(rec, spec, text, None, method, _start(dataset, i))
            bar.update(len(idx))
    bar.close()
    return [rows[i] for i in indices]


def training_baselines(records: list[Record]) -> dict:
    """{task: majority class or mean} of the (training split) records, aggregated per subject."""
    per_task: dict[str, dict[str, list]] = {}
    specs: dict[str, TaskSpec | None] = {}
    for rec in records:
        spec = specs.setdefault(rec.task, record_task(rec))
        if spec is None or spec.kind == "free":
            continue
        subjects = rec.metadata.get("subjects") if isinstance(rec.metadata, dict) else None
        key = unit_key({"subject_id": rec.subject_id, "subjects": subjects})
        per_task.setdefault(rec.task, {}).setdefault(key, []).append(reference(rec, spec))
    out = {}
    for name, units in per_task.items():
        spec = specs[name]
        if spec.kind == "classification":
            values = [max(v, key=v.count) for v in units.values()]
        else:
            values = [float(np.mean(v)) for v in units.values()]
        out[name] = baseline_value(spec, values)
    return out


def write_plots(rows: list[dict], specs: dict, out_dir: Path, run_dir: Path | None) -> dict:
    """Confusion matrix (+ ROC with probabilities) per classification task, predicted-vs-true
    per regression task, loss curves of the run. Returns {name: file name}."""
    made = {}
    for name in sorted({r["task"] for r in rows}):
        spec = specs.get(name)
        units = list(group_units([r for r in rows if r["task"] == name]).values())
        if spec is not None and spec.kind == "classification":
            agg = [aggregate_classification(u, spec.options) for u in units]
            y, pred = [a["reference"] for a in agg], [a["prediction"] for a in agg]
            path = figures.confusion_matrix_png(y, pred, list(spec.options),
                                                out_dir / f"confusion_{name}.png",
                                                title=f"{name}: confusion matrix")
            made[f"confusion_{name}"] = path.name
            if all(a["probs"] is not None for a in agg) and len(set(y)) > 1:
                path = figures.roc_png(y, np.array([a["probs"] for a in agg]), list(spec.options),
                                       out_dir / f"roc_{name}.png", title=f"{name}: ROC curve")
                made[f"roc_{name}"] = path.name
        elif spec is not None and spec.kind == "regression":
            agg = [a for a in (aggregate_regression(u) for u in units) if a["prediction"] is not None]
            path = figures.scatter_png([a["reference"] for a in agg], [a["prediction"] for a in agg],
                                       out_dir / f"scatter_{name}.png", unit=spec.unit,
                                       title=f"{name}: predicted vs true ({len(agg)} parsed)")
            made[f"scatter_{name}"] = path.name
    history = Path(run_dir) / "log_history.json" if run_dir is not None else None
    if history is not None and history.is_file():
        path = figures.loss_curves_png(json.loads(history.read_text()), out_dir / "loss_curves.png")
        if path is not None:
            made["loss_curves"] = path.name
    return made


def regression_grids(specs: dict, regression: str, step: float | None,
                     baseline_records: list[Record] | None) -> dict[str, CandidateGrid]:
    """{task: candidate grid} of the regression tasks (none for ``generate``). A task without a
    range takes the training split's range of reference values."""
    if regression == "generate":
        return {}
    seen: dict[str, list[float]] = {}
    for rec in baseline_records or []:
        spec = specs.get(rec.task)
        if spec is not None and spec.kind == "regression":
            seen.setdefault(rec.task, []).append(reference(rec, spec))
    return {name: candidate_grid(spec, step, (min(seen[name]), max(seen[name]))
                                 if seen.get(name) else None)
            for name, spec in specs.items() if spec is not None and spec.kind == "regression"}


def default_device() -> str:
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def evaluate_records(model_dir: Path, records: list[Record], out_dir: Path, *, split: str,
                     scoring: str = "likelihood", batch_size: int = 8, max_new_tokens: int = 16,
                     run_dir: Path | None = None, progress: bool = True,
                     baseline_records: list[Record] | None = None, constrained: bool = False,
                     bootstrap: int = 1000, seed: int = 0, plots: bool = True,
                     device: str | None = None, windows: str = "first",
                     regression: str = "expected", regression_step: float | None = None,
                     with_reference: bool = True, truth: str | Path | None = None,
                     reference_cache: Path | None = None, memoize: bool = False,
                     cache_dir: str | Path | None = None) -> EvalResult:
    """Evaluate ``records`` (one split) with the model in ``model_dir``; write the outputs to
    ``out_dir`` (rank 0). ``baseline_records`` (the training split) set the majority / mean
    baselines; ``constrained`` restricts regression decoding to numbers and the unit;
    ``bootstrap`` resamples of subjects give the 95% CIs (0: none); ``device`` defaults to this
    rank's GPU (``LOCAL_RANK``) when CUDA is available, else the CPU; ``windows="all"`` scores
    every rsfMRI window of a record (``dataset.rsfMRI.eval_windows``), averaged per subject;
    ``regression`` answers regression tasks by the expected value or median of the model's
    distribution over candidate numbers ``regression_step`` apart (None: the answers' resolution),
    or by generation. ``with_reference`` fits the classical reference on ``baseline_records`` (rank 0; features cached
    in ``reference_cache``, default :func:`~umbrella.evaluation.reference.reference_cache_dir`);
    ``truth`` is a cohort's truth file whose achievable figures are shown
    (:mod:`umbrella.evaluation.reference`). Images are read as in training: from the
    preprocessing cache ``cache_dir`` (``dataset.cache_dir``) when given, and with ``memoize``
    (``dataset.memoize``) each decoded image is kept in RAM (float16) for the records that share
    it (sex and age of one scan), as the training run's validation read them."""
    if scoring not in SCORINGS:
        raise ConfigError(f"evaluation.scoring={scoring!r}; choose one of {', '.join(SCORINGS)}")
    if regression not in METHODS:
        raise ConfigError(f"evaluation.regression={regression!r}; choose one of "
                          f"{', '.join(METHODS)}")
    if not records:
        raise ConfigError(f"no records to evaluate in split {split!r}; pick another split")
    retain_freed_memory()
    specs = {r.task: record_task(r) for r in records}
    for rec in records:  # every reference must parse before any compute is spent
        reference(rec, record_task(rec))
    baselines = training_baselines(baseline_records) if baseline_records else {}
    grids = regression_grids(specs, regression, regression_step, baseline_records)
    truth_data = load_truth(truth) if truth else None
    rank, world = rank_and_world()
    model, tokenizer = load_brain_llava(model_dir, device or default_device())
    encoder = PromptEncoder(tokenizer)
    dataset = InstructionDataset(records, encoder, load_preprocessing(model_dir), windows=windows,
                                 memoize=memoize,
                                 cache=PreprocessCache(cache_dir) if cache_dir else None)
    rows = predict(model, encoder, dataset, scoring, batch_size, max_new_tokens, progress,
                   indices=shard_indices(len(dataset), rank, world), constrained=constrained,
                   regression=regression, grids=grids)
    rows = gather_rows(rows, {item_key(r, _start(dataset, i)): i
                              for i, r in enumerate(dataset.records)})
    summary = summarise_rows(rows, specs, baselines=baselines, resamples=bootstrap, seed=seed)
    extra = {}
    if with_reference and rank == 0:
        extra["reference"] = add_reference(
            summary, rows, baseline_records, list(zip(dataset.records, dataset.starts, strict=True)),
            dataset.inputs, specs, cache_dir=reference_cache or reference_cache_dir(run_dir, out_dir),
            baselines=baselines, resamples=bootstrap, seed=seed, progress=progress)
    if truth_data is not None:
        attach_achievable(summary, rows, truth_data, str(truth))
        extra["truth"] = str(truth)
    metrics = {"split": split, "scoring": scoring, "model": str(model_dir),
               "n_records": len({r["id"] for r in rows}), "n_items": len(rows),
               "world_size": world, "windows": windows, "constrained": constrained,
               "regression": {"method": regression, "step": regression_step,
                              "tasks": {n: g.describe() for n, g in grids.items()}},
               "bootstrap": {"resamples": bootstrap, "seed": seed, "level": 0.95,
                             "unit": "subject (a pair for comparison tasks)"},
               **summary, **extra, "plots": {}}
    made = {}
    if rank == 0:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if plots:
            made = write_plots(rows, specs, out_dir, run_dir)
            metrics["plots"] = made
        atomic_write_jsonl(out_dir / "predictions.jsonl", rows)
        atomic_write_json(out_dir / "metrics.json", metrics)
        write_report(metrics, out_dir / "report.md", run_dir=run_dir)
    if world > 1:
        dist.barrier()
    return EvalResult(metrics, rows, Path(out_dir), made)
