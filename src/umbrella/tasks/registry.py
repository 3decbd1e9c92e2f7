"""Task definitions: question phrasings, allowed answers and the strict answer parser.

A classification answer is correct only if it names exactly one allowed option; anything else
(empty, two options, an unknown word) parses to ``None`` and counts as wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # "classification" | "free"
    questions: tuple[str, ...]
    options: tuple[str, ...] = ()
    synonyms: tuple[tuple[str, str], ...] = ()  # (word, option) pairs also accepted by the parser

    def parse(self, answer: str) -> str | None:
        """The one option an answer names, or None when it names none or several."""
        if self.kind != "classification":
            text = answer.strip()
            return text or None
        words = re.findall(r"[a-z]+", answer.lower())
        vocab = {o.lower(): o for o in self.options} | {w: o for w, o in self.synonyms}
        named = {vocab[w] for w in words if w in vocab}
        return named.pop() if len(named) == 1 else None


SEX = TaskSpec(
    name="sex",
    kind="classification",
    questions=(
        "What is the sex of this subject?",
        "Is this brain from a male or a female subject?",
        "Based on this scan, state the subject's sex.",
        "Which sex does this MRI belong to? Answer male or female.",
        "Estimate the biological sex of the subject in this image.",
    ),
    options=("male", "female"),
    synonyms=(("man", "male"), ("woman", "female"), ("m", "male"), ("f", "female")),
)

TASKS = {t.name: t for t in (SEX,)}


def get_task(name: str) -> TaskSpec | None:
    """The task spec for a record's ``task`` field; None for free-text tasks not defined here."""
    return TASKS.get(name)
