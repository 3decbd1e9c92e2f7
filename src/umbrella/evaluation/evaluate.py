"""`umbrella evaluate`: a trained model on one split -> predictions.jsonl, metrics.json, report.md.

Classification tasks are scored by likelihood over their allowed options (or by generation with
strict parsing); other tasks by greedy generation, reported as exact-match rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from umbrella.data.catalog import load_preprocessing
from umbrella.data.dataset import InstructionDataset
from umbrella.data.prompts import PromptEncoder
from umbrella.data.records import Record
from umbrella.errors import RecordError
from umbrella.evaluation.metrics import classification_metrics
from umbrella.evaluation.report import write_report
from umbrella.evaluation.scoring import generate_answers, score_options
from umbrella.io import atomic_write_json, atomic_write_jsonl
from umbrella.model.build import load_brain_llava
from umbrella.tasks.registry import get_task


@dataclass
class EvalResult:
    metrics: dict
    predictions: list[dict]
    out_dir: Path


def _samples(dataset: InstructionDataset, idx: list[int]) -> list[dict]:
    out = []
    for i in idx:
        rec = dataset.records[i]
        images = [(im.modality, dataset._image(i, rec, j)) for j, im in enumerate(rec.images)]
        out.append({"images": images, "turns": rec.turns,
                    "image_tokens": [dataset.inputs[im.modality].tokens for im in rec.images]})
    return out


def _reference(rec: Record, task) -> str:
    ref = task.parse(rec.answer)
    if ref is None:
        raise RecordError(f"reference answer {rec.answer!r} names none (or several) of "
                          f"{', '.join(task.options)}", record_id=rec.id, source=rec.source,
                          fix="write exactly one allowed option as the answer")
    return ref


def predict(model, encoder, dataset, scoring: str, batch_size: int, max_new_tokens: int,
            progress: bool = True) -> list[dict]:
    rows = []
    idx_all = list(range(len(dataset)))
    bar = tqdm(total=len(idx_all), desc=f"evaluate ({scoring})", disable=not progress)
    for start in range(0, len(idx_all), batch_size):
        idx = idx_all[start:start + batch_size]
        recs = [dataset.records[i] for i in idx]
        samples = _samples(dataset, idx)
        tasks = [get_task(r.task) for r in recs]
        likelihood = scoring == "likelihood" and all(t and t.kind == "classification" for t in tasks)
        if likelihood:
            scores = score_options(model, encoder, samples, [list(t.options) for t in tasks])
            for rec, task, s in zip(recs, tasks, scores, strict=True):
                p = torch.softmax(s, 0).numpy()
                rows.append(_row(rec, task, task.options[int(p.argmax())], p))
        else:
            texts = generate_answers(model, encoder, samples, max_new_tokens)
            for rec, task, text in zip(recs, tasks, texts, strict=True):
                rows.append(_row(rec, task, text, None))
        bar.update(len(idx))
    bar.close()
    return rows


def _row(rec: Record, task, answer: str, probs) -> dict:
    row = {"id": rec.id, "subject_id": rec.subject_id, "study": rec.study, "task": rec.task,
           "modalities": list(rec.modalities), "answer": answer, "reference": rec.answer}
    if task is not None and task.kind == "classification":
        row["reference_label"] = _reference(rec, task)
        row["prediction"] = task.parse(answer)
        row["correct"] = row["prediction"] == row["reference_label"]
        if probs is not None:
            row["probs"] = {o: float(p) for o, p in zip(task.options, probs, strict=True)}
    else:
        row["prediction"] = answer
        row["correct"] = answer.strip().lower() == rec.answer.strip().lower()
    return row


def summarise(rows: list[dict]) -> dict:
    """Metrics per task (classification metrics, or exact match for free-text tasks)."""
    out = {}
    for name in sorted({r["task"] for r in rows}):
        mine = [r for r in rows if r["task"] == name]
        task = get_task(name)
        if task is not None and task.kind == "classification":
            probs = None
            if all("probs" in r for r in mine):
                probs = np.array([[r["probs"][o] for o in task.options] for r in mine])
            out[name] = classification_metrics([r["reference_label"] for r in mine],
                                               [r["prediction"] for r in mine],
                                               list(task.options), probs)
        else:
            hits = sum(r["correct"] for r in mine)
            out[name] = {"n": len(mine), "n_correct": hits, "exact_match": hits / len(mine)}
    return out


def evaluate_records(model_dir: Path, records: list[Record], out_dir: Path, *, split: str,
                     scoring: str = "likelihood", batch_size: int = 8, max_new_tokens: int = 16,
                     run_dir: Path | None = None, progress: bool = True) -> EvalResult:
    model, tokenizer = load_brain_llava(model_dir)
    encoder = PromptEncoder(tokenizer)
    dataset = InstructionDataset(records, encoder, load_preprocessing(model_dir))
    rows = predict(model, encoder, dataset, scoring, batch_size, max_new_tokens, progress)
    metrics = {"split": split, "scoring": scoring, "model": str(model_dir), "tasks": summarise(rows)}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(out_dir / "predictions.jsonl", rows)
    atomic_write_json(out_dir / "metrics.json", metrics)
    write_report(metrics, out_dir / "report.md", run_dir=run_dir)
    return EvalResult(metrics, rows, out_dir)
