"""Regression-aware inference: a number from the model's whole distribution over answers.

Greedy decoding of "63.4 years" takes the most likely token at each step, which is neither the
most likely number nor the one with the smallest expected error. Here every candidate value on the
task's range, at the resolution its answers are written with, is written exactly as in training
(:meth:`TaskSpec.format_answer`) and scored by the log-likelihood of its tokens and the end token,
the prompt (images + question) computed once per sample (:func:`score_options_cached`). A softmax
over the candidates gives the model's distribution p(v | scan, question), turned into one answer:

- ``expected``: the mean, sum_v p(v) v: the Bayes-optimal answer under squared error;
- ``median``: the smallest v whose cumulative probability reaches 0.5: Bayes-optimal under
  absolute error;
- ``generate``: no distribution; greedy decoding as before (:func:`generate_answers`).

The idea follows Lukasik et al., "Regression Aware Inference with LLMs", Findings of EMNLP 2024,
who turn an LLM's sampled or enumerated numeric answers into the minimiser of the task's loss.

Candidates: ``low + k * step`` inside ``[low, high]``; ``step`` defaults to the answers'
resolution (``10 ** -decimals``: 0.1 for "63.4 years"). A grid over ``MAX_CANDIDATES`` is coarsened
(step x2, x5, x10, ...) when the step was not given, and refused when it was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from umbrella.errors import ConfigError
from umbrella.model.answering import score_options_cached
from umbrella.task_registry import TaskSpec

METHODS = ("expected", "median", "generate")
MAX_CANDIDATES = 2001  # 0..200 at 0.1 steps; beyond this the default step is coarsened
MIN_LISTED_PROB = 1e-3  # predictions.jsonl lists candidates with at least this probability,
MAX_LISTED = 100  # at most this many (the most probable)
CANDIDATES_PER_FORWARD = 64


@dataclass(frozen=True)
class CandidateGrid:
    task: str
    values: tuple[float, ...]
    texts: tuple[str, ...]  # each value written as the task writes its answers
    step: float
    low: float
    high: float
    coarsened: bool = False  # the step was widened to stay under MAX_CANDIDATES

    def describe(self) -> dict:
        return {"candidates": len(self.values), "step": self.step, "range": [self.low, self.high],
                "coarsened": self.coarsened}


def _resolution(task: TaskSpec) -> float:
    return 10.0 ** -task.decimals


def _grid_values(low: float, high: float, step: float, decimals: int) -> list[float]:
    first, last = math.ceil(low / step - 1e-9), math.floor(high / step + 1e-9)
    return [round(k * step, decimals) for k in range(first, last + 1)]


def _count(low: float, high: float, step: float) -> int:
    return math.floor(high / step + 1e-9) - math.ceil(low / step - 1e-9) + 1


def candidate_grid(task: TaskSpec, step: float | None = None,
                   value_range: tuple[float, float] | None = None,
                   max_candidates: int = MAX_CANDIDATES) -> CandidateGrid:
    """The candidate answers of a regression task. ``value_range`` stands in where the task has
    no ``low`` / ``high`` (e.g. the training split's range of reference values)."""
    low = task.low if task.low is not None else (value_range[0] if value_range else None)
    high = task.high if task.high is not None else (value_range[1] if value_range else None)
    if low is None or high is None or not high >= low:
        raise ConfigError(f"task {task.name!r} has no value range to enumerate candidate answers "
                          f"over (low={low}, high={high}); give the range when preparing the "
                          "records (prepare ranges=...), evaluate with the training split beside "
                          "it, or use evaluation.regression=generate")
    resolution = _resolution(task)
    if step is not None:
        ratio = step / resolution
        if not step > 0 or ratio < 1 - 1e-9 or abs(ratio - round(ratio)) > 1e-6:
            raise ConfigError(f"evaluation.regression_step={step} for task {task.name!r}: the "
                              f"answers are written with {task.decimals} decimals, so the step "
                              f"must be a positive multiple of {resolution:g}")
        if _count(low, high, step) > max_candidates:
            raise ConfigError(f"evaluation.regression_step={step} gives "
                              f"{_count(low, high, step)} candidates over [{low}, {high}] for task "
                              f"{task.name!r}, more than {max_candidates}; choose a step of at "
                              f"least {(high - low) / (max_candidates - 1):.3g}")
        chosen, coarsened = float(step), False
    else:
        chosen, coarsened, factors = resolution, False, _coarser_factors()
        while _count(low, high, chosen) > max_candidates:
            chosen, coarsened = resolution * next(factors), True
    values = _grid_values(low, high, chosen, task.decimals)
    return CandidateGrid(task.name, tuple(values), tuple(task.format_answer(v) for v in values),
                         round(chosen, task.decimals), float(low), float(high), coarsened)


def _coarser_factors():
    """2, 5, 10, 20, 50, 100, ..."""
    scale = 1
    while True:
        for f in (2, 5, 10):
            yield f * scale
        scale *= 10


def distribution_answer(values, log_likelihoods, method: str) -> dict:
    """The answer and summary of the distribution softmax(log_likelihoods) over ``values``.

    Returns {"value": the answer of ``method``, "mean", "median", "mode", "sd",
    "probs": [[value, p], ...] of the (at most MAX_LISTED most probable) candidates with
    p >= MIN_LISTED_PROB, by value}."""
    if method not in ("expected", "median"):
        raise ConfigError(f"regression method {method!r}: a distribution gives 'expected' or "
                          "'median'")
    v = np.asarray(values, dtype=np.float64)
    p = torch.softmax(torch.as_tensor(log_likelihoods, dtype=torch.float64), dim=0).numpy()
    mean = float(p @ v)
    median = float(v[int(np.searchsorted(np.cumsum(p), 0.5 - 1e-12))])
    top = [i for i in np.argsort(-p, kind="stable")[:MAX_LISTED] if p[i] >= MIN_LISTED_PROB]
    listed = [[float(v[i]), float(f"{p[i]:.4g}")] for i in sorted(top)]
    return {"value": mean if method == "expected" else median, "mean": mean, "median": median,
            "mode": float(v[int(p.argmax())]), "sd": float(np.sqrt(p @ (v - mean) ** 2)),
            "probs": listed}


def regression_answers(model, encoder, samples: list[dict], task: TaskSpec, grid: CandidateGrid,
                       method: str, batch_size: int = CANDIDATES_PER_FORWARD
                       ) -> list[tuple[str, dict]]:
    """Per sample: the answer text (written as the task writes answers, e.g. "63.4 years") and
    the distribution's summary (:func:`distribution_answer`, plus the candidate count and step)."""
    scores = score_options_cached(model, encoder, samples, [list(grid.texts)] * len(samples),
                                  batch_size)
    out = []
    for s in scores:
        summary = distribution_answer(grid.values, s, method)
        summary.update(n_candidates=len(grid.values), step=grid.step)
        out.append((task.format_answer(summary["value"]), summary))
    return out


def method_label(method: str, grid: CandidateGrid | None) -> str:
    """What a row's ``scoring`` says: e.g. "expected (51 candidates, step 1)"."""
    if grid is None:
        return method
    return f"{method} ({len(grid.values)} candidates, step {grid.step:g})"
