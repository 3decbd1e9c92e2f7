"""The task metric on the validation split, for ``training.select_best=metric``.

Cheap enough to run at every evaluation: each validation item costs one forward over its prompt
(its images encoded once) and one over its candidate answers, which reuse the prompt's key/value
cache. A candidate's score is the log-likelihood of its answer tokens and the closing end token
(as ``umbrella evaluate`` scores options; :func:`umbrella.model.answering.score_options_cached`).

- classification: accuracy of the option with the highest log-likelihood.
- regression: the expected value over ``GRID`` candidate answers spaced evenly over the training
  split's range of the task (written as answers are, e.g. "12.4 years"), weighted by the softmax of
  their log-likelihoods; its mean absolute error.
- ``score`` (the selection criterion, higher is better): the mean over tasks of the accuracy
  (classification) and of ``1 - MAE / MAE of the training mean`` (regression: 1 is perfect, 0 no
  better than predicting the training split's mean). Free-text tasks are not scored.

Under several processes each rank scores every ``world``-th item (padded to equal counts, so the
ranks run the same number of forwards, as DeepSpeed ZeRO-3 needs) and the results are gathered.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from umbrella.data.prompts import PromptEncoder
from umbrella.data.records import Record
from umbrella.errors import ConfigError, RecordError
from umbrella.model.answering import score_options_cached
from umbrella.task_registry import TaskSpec, task_for_record
from umbrella.training.launch import rank_and_world

GRID = 17  # regression candidates per task


def _reference(rec: Record, spec: TaskSpec):
    value = spec.parse(rec.answer)
    if value is None:
        raise RecordError(f"reference answer {rec.answer!r} does not parse as a {spec.kind} "
                          f"answer of task {spec.name!r}", record_id=rec.id, source=rec.source,
                          fix="write the answer as `umbrella prepare` does")
    return value


@dataclass
class TaskScoring:
    """What one task's validation items are scored against."""

    spec: TaskSpec
    candidates: list[str]  # answer texts scored per item
    values: list | None  # the option or number each candidate stands for
    baseline_mae: float | None = None  # regression: MAE of the training mean on validation


def regression_grid(spec: TaskSpec, train_values: list[float]) -> tuple[list[str], list[float]]:
    """GRID answers evenly over the training range, each moved to the nearest value a training
    answer holds (the task's plausible range, unmoved, when no training record has the task), as
    written in answers; duplicates removed. Moved, because a model that only ever read whole
    years written "57.0 years" gives "42.8 years" no likelihood, and a grid of such values scored
    its validation age at 10 years where its evaluation read 4.3 (benchmarks/README.md section
    14)."""
    if train_values:
        seen = np.unique(np.asarray(train_values, dtype=np.float64))
        points = np.linspace(seen[0], seen[-1], GRID)
        values = seen[np.abs(seen[None, :] - points[:, None]).argmin(axis=1)]
    elif spec.low is not None and spec.high is not None:
        values = np.linspace(spec.low, spec.high, GRID)
    else:
        raise ConfigError(f"task {spec.name!r} has no training records and no plausible range: "
                          "no candidate grid for training.select_best=metric")
    texts = list(dict.fromkeys(spec.format_answer(v) for v in values))
    return texts, [float(spec.parse(t)) for t in texts]


class ValidationMetric:
    """``metric(model) -> {"score": ..., "accuracy/<task>": ..., "mae/<task>": ...}``."""

    def __init__(self, dataset, encoder: PromptEncoder, train_records: list[Record]):
        self.dataset, self.encoder = dataset, encoder
        self.tasks: dict[str, TaskScoring] = {}
        self.items: list[int] = []  # dataset indices with a scorable task
        self.targets: dict[int, object] = {}
        train: dict[str, list] = {}
        for rec in train_records:
            spec = task_for_record(rec.task, rec.metadata)
            if spec is not None and spec.kind == "regression":
                train.setdefault(rec.task, []).append(_reference(rec, spec))
        for i, rec in enumerate(dataset.records):
            spec = task_for_record(rec.task, rec.metadata)
            if spec is None or spec.kind == "free":
                continue
            if rec.task not in self.tasks:
                if spec.kind == "classification":
                    self.tasks[rec.task] = TaskScoring(spec, list(spec.options), list(spec.options))
                else:
                    self.tasks[rec.task] = TaskScoring(spec, *regression_grid(spec, train.get(rec.task, [])))
            self.items.append(i)
            self.targets[i] = _reference(rec, spec)
        if not self.items:
            raise ConfigError("training.select_best=metric: no validation record has a "
                              "classification or regression task; use select_best=val_loss")
        for name, task in self.tasks.items():
            if task.spec.kind == "regression":
                mean = float(np.mean(train[name])) if train.get(name) else \
                    float(np.mean([self.targets[i] for i in self._of(name)]))
                task.baseline_mae = float(np.mean([abs(self.targets[i] - mean)
                                                   for i in self._of(name)]))

    def _of(self, task: str) -> list[int]:
        return [i for i in self.items if self.dataset.records[i].task == task]

    @torch.no_grad()
    def predict(self, model, index: int):
        """The option (classification) or expected value (regression) for one dataset item."""
        task = self.tasks[self.dataset.records[index].task]
        scores = score_options_cached(model, self.encoder, [self.dataset.scoring_sample(index)],
                                      [list(task.candidates)])[0]
        if task.spec.kind == "classification":
            return task.values[int(scores.argmax())]
        weights = torch.softmax(scores, 0)
        return float((weights * torch.tensor(task.values)).sum())

    def __call__(self, model) -> dict[str, float]:
        rank, world = rank_and_world()
        mine = self.items[rank::world]
        per_rank = -(-len(self.items) // world)
        padded = mine + [self.items[0]] * (per_rank - len(mine))  # same forward count per rank
        was_training = model.training
        model.eval()
        preds = [(i, self.predict(model, i)) for i in padded][:len(mine)]
        model.train(was_training)
        if world > 1:
            parts = [None] * world
            torch.distributed.all_gather_object(parts, preds)
            preds = [p for part in parts for p in part]
        return self.summarise(dict(preds))

    def summarise(self, preds: dict[int, object]) -> dict[str, float]:
        out, scores = {}, []
        for name, task in self.tasks.items():
            idx = self._of(name)
            if task.spec.kind == "classification":
                acc = float(np.mean([preds[i] == self.targets[i] for i in idx]))
                out[f"accuracy/{name}"] = acc
                scores.append(acc)
            else:
                mae = float(np.mean([abs(preds[i] - self.targets[i]) for i in idx]))
                out[f"mae/{name}"] = mae
                scores.append(1.0 - mae / max(task.baseline_mae, 1e-12))
        out["score"] = float(np.mean(scores))
        return out
