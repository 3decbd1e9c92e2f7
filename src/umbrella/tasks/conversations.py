"""Phenotype values -> instruction records (LLaVA form), one question phrasing drawn per record."""

from __future__ import annotations

import numpy as np

from umbrella.task_registry import TaskSpec


def draw_questions(task: TaskSpec, k: int, rng: np.random.Generator) -> list[str]:
    """``k`` phrasings of ``task``'s question, distinct while ``k`` <= the number of phrasings."""
    n = len(task.questions)
    if n == 0:
        raise ValueError(f"task {task.name!r} has no question phrasings")
    idx = rng.choice(n, size=k, replace=k > n)
    return [task.questions[int(i)] for i in idx]


def task_record(task: TaskSpec, *, subject_id: str, answer: str, images: list[dict],
                study: str, split: str, question: str, record_id: str | None = None,
                metadata: dict | None = None) -> dict:
    """A one-turn record asking ``question`` about ``images``; ``answer`` must parse strictly."""
    rid = record_id or f"{subject_id}_{task.name}"
    if task.kind != "free" and task.parse(answer) is None:
        raise ValueError(f"record {rid}: answer {answer!r} does not parse for task {task.name!r}"
                         + (f" (options: {', '.join(task.options)})" if task.options else ""))
    if len(images) != task.n_images:
        raise ValueError(f"record {rid}: task {task.name!r} asks about {task.n_images} image(s), "
                         f"got {len(images)}")
    prefix = "".join("<image>\n" for _ in images)
    rec = {"id": rid, "subject_id": subject_id, "study": study, "task": task.name,
           "split": split, "images": images,
           "conversations": [{"from": "human", "value": prefix + question},
                             {"from": "gpt", "value": answer}]}
    if metadata:
        rec["metadata"] = metadata
    return rec


def classification_record(task: TaskSpec, *, subject_id: str, answer: str,
                          images: list[dict], study: str, split: str,
                          rng: np.random.Generator, metadata: dict | None = None) -> dict:
    """A one-turn record asking ``task``'s question about ``images``; ``answer`` must be an option."""
    if answer not in task.options:
        raise ValueError(f"subject {subject_id}: answer {answer!r} is not one of {task.options}")
    question = task.questions[int(rng.integers(len(task.questions)))]
    prefix = "".join("<image>\n" for _ in images)
    rec = {"id": f"{subject_id}_{task.name}", "subject_id": subject_id, "study": study,
           "task": task.name, "split": split, "images": images,
           "conversations": [{"from": "human", "value": prefix + question},
                             {"from": "gpt", "value": answer}]}
    if metadata:
        rec["metadata"] = metadata
    return rec


def subject_splits(subject_ids: list[str], strata: list[str], ratios=(0.6, 0.2, 0.2),
                   seed: int = 12345) -> dict[str, str]:
    """Stratified subject-level split: {subject_id: "train"|"val"|"test"}, reproducible from seed.

    Subjects are sorted first, so the result depends only on the set of ids, strata and the seed.
    """
    if len(ratios) != 3 or abs(sum(ratios) - 1.0) > 1e-6 or min(ratios) < 0:
        raise ValueError(f"split ratios {ratios} must be three non-negative numbers summing to 1")
    if len(set(subject_ids)) != len(subject_ids):
        raise ValueError("subject_splits got a subject id twice: pass each subject once")
    rng = np.random.default_rng(seed)
    pairs = sorted(zip(subject_ids, strata, strict=True))
    out: dict[str, str] = {}
    for stratum in sorted(set(strata)):
        ids = [s for s, k in pairs if k == stratum]
        ids = [ids[i] for i in rng.permutation(len(ids))]
        n_train = round(ratios[0] * len(ids))
        n_val = round(ratios[1] * len(ids))
        for i, sid in enumerate(ids):
            out[sid] = "train" if i < n_train else "val" if i < n_train + n_val else "test"
    return out
