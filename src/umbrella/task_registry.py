"""Task definitions: question phrasings, allowed answers and the strict answer parsers.

Below data/ on the data path: the validator checks answers with these parsers, and tasks/ writes
records with them, so the facts live in one module both can import.

Three kinds of task:

- ``classification``: the answer must name exactly one allowed option (or a synonym of one);
  empty text, two options ("male or female") or an unknown word parse to ``None``.
- ``regression``: the answer must hold exactly one number; a unit word right after it converts
  it to the task's unit ("149 months" -> 12.42 years for age); a unit of another quantity
  ("23 kg/m2" for age) or a value outside the plausible range parses to ``None``.
- ``free``: any non-empty text (scored by exact match).

Comparison tasks (``compare_sex``, ``compare_age``) are classification tasks over two images
(``n_images=2``) of two subjects; the within-subject tasks (``session_order``: which scan is
later?, ``session_gap``: how many years apart?) take two sessions of one subject. Answers are written in one fixed form (:meth:`TaskSpec.format_answer`):
``"female"``, ``"12.4 years"``, ``"first"``, ``"same"``. A parse of ``None`` counts as wrong.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, replace

KINDS = ("classification", "regression", "free")
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
_UNIT_BASE = 0xE000  # unit markers are private-use characters: no digit, no letter


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # "classification" | "regression" | "free"
    questions: tuple[str, ...]
    options: tuple[str, ...] = ()
    synonyms: tuple[tuple[str, str], ...] = ()  # (word, option) pairs also accepted by the parser
    unit: str = ""  # regression: the unit answers are written in, e.g. "years"
    units: tuple[tuple[str, float], ...] = ()  # (alias, factor to `unit`), e.g. ("months", 1/12)
    low: float | None = None  # plausible range (inclusive), in `unit`
    high: float | None = None
    decimals: int = 1  # regression answers are written with this many decimals
    n_images: int = 1  # images per question (2 for comparison tasks)
    label: str = ""  # the quantity in words, e.g. "body mass index"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name!r}: kind {self.kind!r} is not one of {KINDS}")
        if self.kind == "classification" and len(self.options) < 2:
            raise ValueError(f"task {self.name!r}: a classification task needs two or more "
                             f"options, got {self.options}")

    def parse(self, answer: str) -> str | float | None:
        """Classification: the one option named. Regression: the value in ``unit``. Else None."""
        if self.kind == "classification":
            return _parse_option(answer, self.options, self.synonyms)
        if self.kind == "regression":
            return _parse_number(answer, self)
        text = answer.strip()
        return text or None

    def format_answer(self, value) -> str:
        """The fixed answer form: an option as written, or ``f"{value:.{decimals}f} {unit}"``."""
        if self.kind == "regression":
            text = f"{float(value):.{self.decimals}f}"
            return f"{text} {self.unit}" if self.unit else text
        if self.kind == "classification" and value not in self.options:
            raise ValueError(f"task {self.name!r}: {value!r} is not one of {self.options}")
        return str(value)

    def in_range(self, value: float) -> bool:
        return (math.isfinite(value) and (self.low is None or value >= self.low)
                and (self.high is None or value <= self.high))

    def to_dict(self) -> dict:
        """Everything but the questions: what a record carries so its answers can be parsed."""
        d = asdict(self)
        d.pop("questions")
        d["options"] = list(self.options)
        d["synonyms"] = [list(p) for p in self.synonyms]
        d["units"] = [list(p) for p in self.units]
        return d

    @classmethod
    def from_dict(cls, d: dict, questions: tuple[str, ...] = ()) -> TaskSpec:
        return cls(name=d["name"], kind=d["kind"], questions=tuple(d.get("questions", questions)),
                   options=tuple(d.get("options", ())),
                   synonyms=tuple(tuple(p) for p in d.get("synonyms", ())),
                   unit=d.get("unit", ""), units=tuple(tuple(p) for p in d.get("units", ())),
                   low=d.get("low"), high=d.get("high"), decimals=int(d.get("decimals", 1)),
                   n_images=int(d.get("n_images", 1)), label=d.get("label", ""))


def _parse_option(answer: str, options, synonyms) -> str | None:
    """The single option (or synonym) named as a whole word; longer names are matched first,
    so "healthy control" is not also read as "control"."""
    text = answer.lower()
    vocab = {o.lower(): o for o in options} | {w.lower(): o for w, o in synonyms}
    named = set()
    for word in sorted(vocab, key=len, reverse=True):
        pattern = rf"(?<![a-z0-9]){re.escape(word)}(?![a-z0-9])"
        if re.search(pattern, text):
            named.add(vocab[word])
            text = re.sub(pattern, " ", text)
    return named.pop() if len(named) == 1 else None


def _mark_units(text: str, aliases: list[str]) -> str:
    """Replace every unit alias (longest first, whole words) with a numbered marker."""
    for i, alias in sorted(enumerate(aliases), key=lambda p: len(p[1]), reverse=True):
        text = re.sub(rf"(?<![a-z]){re.escape(alias)}(?![a-z0-9])", f" {chr(_UNIT_BASE + i)} ",
                      text)
    return text


def _parse_number(answer: str, task: TaskSpec) -> float | None:
    own = {alias.lower(): factor for alias, factor in task.units}
    if task.unit:
        own.setdefault(task.unit.lower(), 1.0)
    aliases = list(own) + [a for a in known_units() if a not in own]
    text = _mark_units(answer.lower(), aliases)
    numbers = list(_NUMBER.finditer(text))
    if len(numbers) != 1:
        return None
    value = float(numbers[0].group())
    after = text[numbers[0].end():].lstrip()
    if after and ord(after[0]) >= _UNIT_BASE and ord(after[0]) < _UNIT_BASE + len(aliases):
        alias = aliases[ord(after[0]) - _UNIT_BASE]
        if alias not in own:
            return None  # a unit of another quantity
        value *= own[alias]
    return value if task.in_range(value) else None


# ----------------------------------------------------------------------------- built-in tasks

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

AGE_UNITS = (("years", 1.0), ("year", 1.0), ("yrs", 1.0), ("yr", 1.0), ("y", 1.0),
             ("months", 1 / 12), ("month", 1 / 12), ("mos", 1 / 12), ("mo", 1 / 12),
             ("weeks", 7 / 365.25), ("week", 7 / 365.25), ("days", 1 / 365.25),
             ("day", 1 / 365.25))

AGE = TaskSpec(
    name="age",
    kind="regression",
    questions=(
        "How old is this subject? Answer in years.",
        "Estimate the age of the subject in this scan.",
        "What is the age of this participant in years?",
        "Based on this brain MRI, how old is the subject?",
        "Predict this subject's age.",
    ),
    unit="years", units=AGE_UNITS, low=0.0, high=120.0, decimals=1, label="age",
)

BMI = TaskSpec(
    name="bmi",
    kind="regression",
    questions=(
        "What is the body mass index (BMI) of this subject?",
        "Estimate this subject's BMI in kg/m2.",
        "Predict the body mass index of the participant from this scan.",
        "Based on this MRI, what is the subject's BMI?",
    ),
    unit="kg/m2", units=(("kg/m2", 1.0), ("kg/m^2", 1.0), ("kg/m²", 1.0), ("kg m-2", 1.0)),
    low=10.0, high=80.0, decimals=1, label="body mass index",
)

COMPARE_SEX = TaskSpec(
    name="compare_sex",
    kind="classification",
    questions=(
        "Are these two scans from subjects of the same sex? Answer same or different.",
        "Do the first and the second scan come from people of the same sex?",
        "Compare the two subjects: same sex or different sex?",
        "Is the sex of the first subject the same as that of the second?",
    ),
    options=("same", "different"), n_images=2,
)

COMPARE_AGE = TaskSpec(
    name="compare_age",
    kind="classification",
    questions=(
        "Which subject is older, the first or the second?",
        "Of these two scans, which belongs to the older subject? Answer first or second.",
        "Is the first or the second subject older?",
        "Compare the two brains: which subject is older?",
    ),
    options=("first", "second"), synonyms=(("1st", "first"), ("2nd", "second")), n_images=2,
)

# Within-subject tasks: two scans of ONE subject from two sessions (longitudinal cohorts: ABCD
# visits, UK Biobank imaging instances 2 and 3). The answer comes from the ages at the sessions.
SESSION_ORDER = TaskSpec(
    name="session_order",
    kind="classification",
    questions=(
        "These two scans are of the same subject. Which scan is later, the first or the second?",
        "Both scans show one person at two visits. Which was acquired later? Answer first or "
        "second.",
        "Same subject, two sessions: is the first or the second scan the later one?",
    ),
    options=("first", "second"), synonyms=(("1st", "first"), ("2nd", "second")), n_images=2,
)

SESSION_GAP = TaskSpec(
    name="session_gap",
    kind="regression",
    questions=(
        "These two scans are of the same subject. How many years apart were they taken?",
        "Both scans show one person at two visits. How much time passed between them, in years?",
        "Same subject, two sessions: how many years separate the scans?",
    ),
    unit="years", units=AGE_UNITS, low=0.0, high=50.0, decimals=1, n_images=2,
    label="years between the scans",
)

TASKS = {t.name: t for t in (SEX, AGE, BMI, COMPARE_SEX, COMPARE_AGE)}
# Kept apart from TASKS, whose phrasings train every run's tokenizer: adding these would change
# the tokenizer (and the pinned losses) of runs that never ask them. Looked up like TASKS.
WITHIN_SUBJECT_TASKS = {t.name: t for t in (SESSION_ORDER, SESSION_GAP)}


def known_units() -> list[str]:
    """Every unit alias of the built-in regression tasks (lower case)."""
    return list(dict.fromkeys(a.lower() for t in TASKS.values() for a, _ in t.units))


def get_task(name: str) -> TaskSpec | None:
    """The built-in task spec for a record's ``task`` field; None for tasks not defined here."""
    return TASKS.get(name) or WITHIN_SUBJECT_TASKS.get(name)


def task_for_record(name: str, metadata: dict | None = None) -> TaskSpec | None:
    """The spec a record was written with (``metadata["task_spec"]``, set by ``prepare``), else
    the built-in one, else None (a free-text task)."""
    spec = (metadata or {}).get("task_spec")
    if isinstance(spec, dict):
        builtin = get_task(name)
        return TaskSpec.from_dict(spec, builtin.questions if builtin else ())
    return get_task(name)


def task_for_question(question: str) -> TaskSpec | None:
    """The built-in task one of whose phrasings ``question`` is (case, spacing and ``<image>``
    placeholders aside); None for any other question."""
    def norm(text: str) -> str:
        return " ".join(text.replace("<image>", " ").lower().split())

    wanted = norm(question)
    return next((t for t in TASKS.values() if any(norm(q) == wanted for q in t.questions)), None)


def _humanise(column: str) -> str:
    return re.sub(r"[_\s]+", " ", column).strip().lower()


def regression_task(name: str, *, label: str | None = None, unit: str = "",
                    low: float | None = None, high: float | None = None,
                    decimals: int = 1) -> TaskSpec:
    """A regression task over any numeric phenotype column (cognition scores, BMI, ...)."""
    if name in TASKS and TASKS[name].kind == "regression":
        base = TASKS[name]
        return replace(base, low=base.low if low is None else low,
                       high=base.high if high is None else high)
    what = label or _humanise(name)
    tail = f" Answer in {unit}." if unit else " Answer with a number."
    questions = (f"What is the {what} of this subject?{tail}",
                 f"Estimate the {what} of the subject in this scan.",
                 f"Predict this subject's {what} from the MRI.{tail}",
                 f"Based on this brain scan, what is the subject's {what}?")
    return TaskSpec(name=name, kind="regression", questions=questions, unit=unit,
                    units=((unit, 1.0),) if unit else (), low=low, high=high,
                    decimals=decimals, label=what)


def classification_task(name: str, options: tuple[str, ...] | list[str], *,
                        label: str | None = None) -> TaskSpec:
    """A classification task over any categorical column (e.g. diagnosis: autism / control)."""
    what = label or _humanise(name)
    listed = ", ".join(options)
    questions = (f"What is the {what} of this subject? Answer one of: {listed}.",
                 f"Which {what} does this scan belong to? Choose from {listed}.",
                 f"Based on this brain MRI, state the subject's {what} ({listed}).")
    return TaskSpec(name=name, kind="classification", questions=questions,
                    options=tuple(options), label=what)
