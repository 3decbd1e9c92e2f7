"""What a trained model was trained to answer: its tasks and their question forms.

`umbrella train` writes ``tasks.json`` into the model folder from the training records: per task
its spec (kind, options, unit, range, as the records were parsed with) and every question form
its records asked (``<image>`` placeholders removed). `ask` and `serve` match a new question
against those forms, so a question the model never saw ("Is there a tumor?" to a sex model) is
answered with a notice instead of silently::

    {"version": 1, "tasks": {"sex": {"kind": "classification", "options": ["male", "female"],
                                      ..., "questions": ["What is the sex of this subject?"]}}}

A model folder written before this file existed has none: :func:`load_tasks` returns None and
callers say "tasks unknown".
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from umbrella.errors import ConfigError
from umbrella.io import atomic_write_json
from umbrella.task_registry import TaskSpec, task_for_record

TASKS_FILE = "tasks.json"
MAX_QUESTIONS = 200  # question forms kept per task (records draw from a handful of phrasings)
MATCH_RATIO = 0.75  # word-level similarity to a trained form that still counts as that question
FILLER_WORDS = frozenset("please a an the this that of in on is are can you tell me scan image "
                         "mri brain subject subjects participant person".split())


def normalise_question(text: str) -> str:
    """Lower case, ``<image>`` and punctuation removed, whitespace collapsed."""
    text = text.replace("<image>", " ").lower()
    text = re.sub(r"[^a-z0-9/²^ ]+", " ", text)
    return " ".join(text.split())


def _question_text(record) -> str:
    first = next((t.text for t in record.turns if t.role == "user"), "")
    return " ".join(first.replace("<image>", " ").split())


def trained_tasks(records) -> dict:
    """{"version": 1, "tasks": {name: spec dict + "questions"}} from training records."""
    tasks: dict[str, dict] = {}
    for rec in records:
        name = rec.task or "chat"
        entry = tasks.get(name)
        if entry is None:
            spec = task_for_record(rec.task, rec.metadata)
            entry = spec.to_dict() if spec is not None else {"name": name, "kind": "free"}
            entry["questions"] = []
            entry["n_images"] = len(rec.images)
            tasks[name] = entry
        question = _question_text(rec)
        if question and question not in entry["questions"] and \
                len(entry["questions"]) < MAX_QUESTIONS:
            entry["questions"].append(question)
    return {"version": 1, "tasks": tasks}


def save_tasks(records, folder: str | Path) -> Path:
    """Write ``tasks.json`` of ``records`` into ``folder`` (atomically)."""
    return atomic_write_json(Path(folder) / TASKS_FILE, trained_tasks(records))


def load_tasks(folder: str | Path) -> dict | None:
    """The ``tasks`` mapping of a model folder's ``tasks.json``; None when the folder has none
    (a model trained before tasks were saved)."""
    path = Path(folder) / TASKS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        tasks = data["tasks"]
        if not isinstance(tasks, dict):
            raise TypeError("'tasks' is not an object")
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is not a valid tasks file ({exc}); delete it to treat the "
                          "model's tasks as unknown, or retrain") from exc
    return tasks


def task_spec(entry: dict) -> TaskSpec | None:
    """The TaskSpec of a ``tasks.json`` entry (None for a free-text task)."""
    if entry.get("kind") not in ("classification", "regression"):
        return None
    return TaskSpec.from_dict(entry)


@dataclass(frozen=True)
class TaskMatch:
    task: str | None  # the trained task the question belongs to, None if none
    question: str | None  # the trained form (or sentence of one) closest to it
    score: float  # word-level similarity to that form (1.0: the same words in the same order)
    new_words: tuple[str, ...] = ()  # words of the question that no form of the task uses


def _sentences(form: str) -> list[str]:
    """A form and each of its sentences ("How old is X? Answer in years." gives 3 texts)."""
    parts = [p for p in re.split(r"(?<=[.?!])\s+", form.strip()) if p]
    return [form] + (parts if len(parts) > 1 else [])


def match_task(question: str, tasks: dict) -> TaskMatch:
    """The trained task whose question forms are closest to ``question`` (word-level difflib
    ratio against every form and every sentence of one). It counts as that task when the ratio
    is at least :data:`MATCH_RATIO` and the question uses no word that none of the task's forms
    use (besides a few fillers): "What is the diagnosis of this subject?" is close to "What is
    the sex of this subject?" in wording, but "diagnosis" is a question sex was never asked."""
    wanted = normalise_question(question).split()
    best, best_ok = TaskMatch(None, None, 0.0), None
    for name, entry in tasks.items():
        forms = entry.get("questions", [])
        vocab = {w for f in forms for w in normalise_question(f).split()} | FILLER_WORDS
        new = tuple(dict.fromkeys(w for w in wanted if w not in vocab))
        for form in forms:
            for text in _sentences(form):
                score = difflib.SequenceMatcher(None, wanted,
                                                normalise_question(text).split()).ratio()
                hit = TaskMatch(name, text, score, new)
                if score > best.score:
                    best = hit
                if score >= MATCH_RATIO and not new and (best_ok is None
                                                          or score > best_ok.score):
                    best_ok = hit
    return best_ok or TaskMatch(None, best.question, best.score, best.new_words)


def untrained_notice(question: str, tasks: dict) -> str:
    """The notice given with an answer to a question that matches no trained task."""
    names = ", ".join(sorted(tasks)) or "none"
    return (f"this model was not trained to answer this question (trained tasks: {names}); "
            "its answer is not a prediction of anything it learned")
