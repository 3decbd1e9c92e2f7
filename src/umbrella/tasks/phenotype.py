"""The phenotype table as prepare reads it: subject and session columns, and one value per row
and task, decoded with the study's conventions (sex coding, age unit) and range-checked.

Every error names the ``umbrella prepare`` flag that fixes it and shows what it saw.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from umbrella.errors import ConfigError
from umbrella.task_registry import AGE, SEX, TASKS, TaskSpec, classification_task, regression_task
from umbrella.tasks.subjects import clean_id, session_key, subject_key

# tried in this order when neither --subject-column nor the study's column is in the table
SUBJECT_COLUMNS = ("subject_id", "participant_id", "subject", "src_subject_id", "subjectkey",
                   "eid", "SUB_ID", "Subject", "EID")
SESSION_COLUMNS = ("session_id", "session", "eventname", "visit")  # tried when not given
DIAGNOSIS_COLUMNS = ("diagnosis", "dx", "DX_GROUP", "dx_group", "group")
SUBJECT_LEVEL = ("sex", "diagnosis")  # may come from another session's row of the subject
MAX_OPTIONS = 20  # a "categorical" column with more distinct values is probably an id or free text
BASE = {"sex": "sex", "compare_sex": "sex", "age": "age", "compare_age": "age",
        "session_order": "age", "session_gap": "age"}
ENCODINGS = ("utf-8-sig", "cp1252")  # spreadsheet exports: a BOM, or Windows' code page


def _err(message: str) -> ConfigError:
    return ConfigError(message, source="prepare")


@dataclass
class Table:
    """The phenotype rows prepare uses: ids, sessions and the frame itself."""

    frame: pd.DataFrame
    path: Path
    subject_column: str
    session_column: str | None
    ids: dict[str, str]  # subject key -> id as the table writes it
    units: list[tuple[str, str]] = field(default_factory=list)  # per row: (subject, session) key
    rows: dict[str, list[int]] = field(default_factory=dict)  # subject key -> row positions


def _read_csv(path: Path, **kw) -> pd.DataFrame:
    sep = "\t" if path.suffix.lower() in (".tsv", ".txt") else ","
    last = None
    for encoding in ENCODINGS:
        try:
            return pd.read_csv(path, sep=sep, encoding=encoding, **kw)
        except UnicodeDecodeError as exc:
            last = exc
    raise _err(f"{path}: not UTF-8 or Windows-1252 text ({last}); save the table as UTF-8 CSV")


def table_columns(path) -> list[str]:
    if isinstance(path, list | tuple):
        return list(dict.fromkeys(c for p in path for c in table_columns(p)))
    path = Path(path)
    if not path.is_file():
        raise _err(f"phenotype table {path} does not exist (--phenotype)")
    return [str(c) for c in _read_csv(path, nrows=0).columns]


def _read_one(path: Path, subject_column: str | None, session_column: str | None,
              strict: bool = True) -> tuple[pd.DataFrame, str]:
    """One table with its subject (and session) column read as text; the subject column found.
    ``strict``: a named subject column must be in this table (else any known name will do)."""
    columns = table_columns(path)
    subject = subject_column if subject_column in columns or (subject_column and strict) else \
        next((c for c in SUBJECT_COLUMNS if c in columns), None)
    if subject is not None and subject not in columns:
        subject = None
    if subject is None:
        wanted = f"no subject column {subject_column!r}" if subject_column else \
            f"no subject column (looked for {', '.join(SUBJECT_COLUMNS)})"
        raise _err(f"{path}: {wanted} among the columns {columns[:30]}; pass --subject-column "
                   "COLUMN (subject_column= in Python)")
    text = {c: str for c in (subject, session_column) if c and c in columns}
    return _read_csv(path, dtype=text, na_values=["n/a", "N/A"], keep_default_na=True), subject


def _merge(paths: list[Path], subject_column: str | None,
           session_column: str | None) -> tuple[pd.DataFrame, str]:
    """Several tables as one: rows joined on the subject key (and the session key where both
    tables have the session column); a column in several tables is taken from the first."""
    merged, name = None, None
    for path in paths:
        frame, subject = _read_one(path, subject_column, session_column, strict=False)
        frame = frame[frame[subject].notna()].copy()
        frame["__key"] = frame[subject].map(subject_key)
        has_session = bool(session_column) and session_column in frame.columns
        if has_session:
            frame["__ses"] = frame[session_column].map(
                lambda v: session_key(v) if not is_missing(v) else "")
        if merged is None:
            merged, name = frame.rename(columns={subject: "__id"}), subject
            continue
        both = has_session and "__ses" in merged.columns
        on = ["__key", "__ses"] if both else ["__key"]
        if frame.duplicated(on).any():
            raise _err(f"{path}: several rows per subject"
                       + (" and session" if both else f" and no session column {session_column!r}")
                       + "; pass --session-column naming the visit in every table, or one row "
                         "per subject")
        keep = [c for c in frame.columns if c in on or c == subject or c == session_column
                or c not in merged.columns]
        frame = frame[keep].rename(columns={subject: "__id2", session_column: "__ses_text"}
                                   if has_session else {subject: "__id2"})
        merged = merged.merge(frame, on=on, how="outer")
        merged["__id"] = merged["__id"].fillna(merged.pop("__id2"))
        if "__ses_text" in merged.columns:
            if session_column in merged.columns:
                merged[session_column] = merged[session_column].fillna(merged.pop("__ses_text"))
            else:
                merged = merged.rename(columns={"__ses_text": session_column})
    merged = merged.drop(columns=[c for c in ("__key", "__ses") if c in merged.columns])
    return merged.rename(columns={"__id": name}), name


def read_table(path, subject_column: str | None, session_column: str | None,
               skipped: Counter) -> Table:
    """Read the table (or several, joined: :func:`_merge`) with ids as text; pick the subject and
    session columns (explicit, else the first known name present); drop rows without an id and
    exact duplicate rows (counted)."""
    paths = [Path(p) for p in (path if isinstance(path, list | tuple) else [path])]
    names = {c for p in paths for c in table_columns(p)}
    if session_column is not None and session_column not in names:
        raise _err(f"{paths[0]}: no session column {session_column!r} among the columns "
                   f"{sorted(names)[:30]}; fix --session-column")
    if subject_column is not None and subject_column not in names:
        raise _err(f"{paths[0]}: no subject column {subject_column!r} among the columns "
                   f"{sorted(names)[:30]}; pass --subject-column COLUMN (subject_column= in "
                   "Python)")
    if len(paths) == 1:
        frame, subject = _read_one(paths[0], subject_column, session_column)
    else:
        frame, subject = _merge(paths, subject_column, session_column)
    path = paths[0]
    missing = frame[subject].isna() | (frame[subject].astype(str).str.strip() == "")
    if missing.any():
        skipped["subject id missing"] += int(missing.sum())
    frame = frame[~missing]
    same = frame.duplicated(keep="first")
    if same.any():
        skipped["identical duplicate row"] += int(same.sum())
    frame = frame[~same].reset_index(drop=True)
    table = Table(frame, path, subject, session_column, {})
    _index(table, skipped)
    return table


def _index(table: Table, skipped: Counter) -> None:
    """Fill ``ids`` / ``units`` / ``rows``; two spellings of one id, or several rows of one
    subject with no session column, are errors naming the flag that fixes them."""
    frame, keep, seen = table.frame, [], set()
    sessions = frame[table.session_column] if table.session_column else [""] * len(frame)
    for i, (raw, ses) in enumerate(zip(frame[table.subject_column], sessions, strict=True)):
        key, text = subject_key(raw), clean_id(raw)
        other = table.ids.setdefault(key, text)
        if other != text:
            raise _err(f"{table.path}: ids {other!r} and {text!r} name the same subject after "
                       f"normalisation ({key!r}: 'sub-' prefix, non-alphanumerics and case "
                       "dropped); fix the table")
        unit = (key, session_key(ses) if table.session_column and not is_missing(ses) else "")
        if unit in seen:
            if table.session_column is None:
                raise _err(_several_rows(table))
            skipped["duplicate subject-session row (first kept)"] += 1
            continue
        seen.add(unit)
        keep.append(i)
        table.units.append(unit)
    table.frame = frame.iloc[keep].reset_index(drop=True)
    for i, (key, _) in enumerate(table.units):
        table.rows.setdefault(key, []).append(i)


def _several_rows(table: Table) -> str:
    counts = Counter(subject_key(s) for s in table.frame[table.subject_column])
    many = [(table.ids[k], n) for k, n in counts.most_common(3) if n > 1]
    varying = [c for c in table.frame.columns[:200] if c != table.subject_column and
               table.frame.groupby(table.frame[table.subject_column].map(subject_key))[c]
               .nunique().max() > 1][:5]
    return (f"{table.path}: {sum(n > 1 for n in counts.values())} subjects have several rows "
            f"(e.g. {', '.join(f'{s} x{n}' for s, n in many)}) and no session column is known; "
            f"pass --session-column COLUMN naming the visit of each row (columns that vary "
            f"within a subject: {', '.join(map(str, varying)) or 'none'}), or keep one row per "
            "subject")


def session_column_for(columns: list[str], given: str | None, study) -> str | None:
    """--session-column, else the study's, else a known name present in the table."""
    if given:
        return given
    own = getattr(study, "session_column", None)
    if own and own in columns:
        return own
    return next((c for c in SESSION_COLUMNS if c in columns), None)


# ----------------------------------------------------------------------------- columns

def find_column(table: Table, wanted: str | None, task: str, candidates=()) -> str:
    names = [wanted] if wanted else list(candidates)
    lower = {str(c).lower(): c for c in table.frame.columns}
    for name in names:
        if name in table.frame.columns:
            return name
        if str(name).lower() in lower:
            return lower[str(name).lower()]
    flag = {"sex": "--sex-column", "age": "--age-column"}.get(BASE.get(task, task))
    fix = f"pass {flag} COLUMN or --column {task}=COLUMN" if flag else \
        f"pass --column {task}=COLUMN"
    word = str(wanted or BASE.get(task, task)).lower()
    alike = [str(c) for c in table.frame.columns if word in str(c).lower()
             or BASE.get(task, task) in str(c).lower()][:5]
    hint = f"; columns that look like it: {', '.join(alike)}" if alike else ""
    raise _err(f"task {task!r}: no column {wanted or ' / '.join(candidates)!r} in the phenotype "
               f"table (columns: {', '.join(map(str, table.frame.columns[:40]))}){hint}; {fix} "
               f"(columns={{'{task}': 'COLUMN'}} in Python)")


def task_column(task: str, table: Table, study, columns: dict) -> str:
    base = BASE.get(task, task)
    if base == "sex":
        return find_column(table, columns.get(task, columns.get("sex", study.sex_column)), task)
    if base == "age":
        wanted = columns.get(task, columns.get("age", study.age_column))
        if wanted is None:
            raise _err(f"task {task!r}: study {study.name} has no age column ({study.notes}); "
                       "pass --age-column COLUMN")
        return find_column(table, wanted, task)
    known = dict(getattr(study, "columns", {}) or {})
    if base == "diagnosis":
        return find_column(table, columns.get(task, known.get("diagnosis")), task,
                           DIAGNOSIS_COLUMNS)
    return find_column(table, columns.get(task, known.get(base, base)), task)


# ----------------------------------------------------------------------------- values

def raw_key(raw) -> str:
    if isinstance(raw, float) and raw.is_integer():
        return str(int(raw))
    return str(raw).strip()


def is_missing(raw) -> bool:
    return raw is None or (isinstance(raw, float) and math.isnan(raw)) or \
        (isinstance(raw, str) and raw.strip() == "") or raw is pd.NA


def _decode(base: str, raw, study, labels: dict | None):
    """(value, reason) for one raw cell: value None means skipped for ``reason``."""
    from umbrella.data.studies import age_in_years, decode_sex

    if is_missing(raw):
        return None, "missing value"
    try:
        if base == "sex":
            value = decode_sex(study, raw)
            return (value, None) if value is not None else (None, "no male/female label")
        if base == "age":
            return age_in_years(study, raw), None
    except ValueError:
        return None, "unknown code" if base == "sex" else "not a valid age"
    if labels is not None:
        mapped = {raw_key(k).lower(): str(v) for k, v in labels.items()}.get(raw_key(raw).lower())
        return (mapped, None) if mapped is not None else (None, "unknown code")
    return raw, None


def _as_number(value):
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None, "not a number"
    return (number, None) if math.isfinite(number) else (None, "not a number")


@dataclass
class Targets:
    """One task's decoded values: per row of the table, and for other instance columns."""

    task: str
    spec: TaskSpec
    column: str
    values: dict[int, object]  # row position -> label or value in the spec's unit
    skipped: Counter
    examples: dict[str, list[str]]
    seen: Counter  # raw codes of the column (for error messages)
    extra: dict[str, dict[int, object]] = field(default_factory=dict)  # other column -> values

    @property
    def subject_level(self) -> bool:
        return BASE.get(self.task, self.task) in SUBJECT_LEVEL


def decode_column(task: str, series: pd.Series, subjects: pd.Series, study, labels: dict,
                  classify: bool) -> tuple[dict[int, object], Counter, dict, Counter]:
    base = BASE.get(task, task)
    values, skipped, examples, seen = {}, Counter(), {}, Counter()
    for i, (sid, raw) in enumerate(zip(subjects, series, strict=True)):
        if not is_missing(raw):
            seen[raw_key(raw)] += 1
        value, reason = _decode(base, raw, study, labels.get(task))
        if reason is None and not classify:
            value, reason = _as_number(value)
        if reason is not None:
            key = f"{task}: {reason}"
            skipped[key] += 1
            if reason != "missing value" and len(examples.setdefault(key, [])) < 5:
                examples[key].append(f"{sid}: {raw!r}")
            continue
        values[i] = raw_key(value) if classify else value
    return values, skipped, {k: v for k, v in examples.items() if v}, seen


def task_targets(task: str, table: Table, study, *, columns: dict, labels: dict, categorical,
                 ranges: dict) -> Targets:
    """Decode, validate and range-check one task's column; count every skipped row by reason."""
    base = BASE.get(task, task)
    column = task_column(task, table, study, columns)
    classify = is_categorical(base, table.frame[column], labels, categorical)
    values, skipped, examples, seen = decode_column(
        task, table.frame[column], table.frame[table.subject_column], study, labels, classify)
    spec = spec_for(task, base, values, ranges, classify)
    got = Targets(task, spec, column, values, skipped, examples, seen)
    got.values = range_check(got, values)
    return got


def range_check(got: Targets, values: dict[int, object]) -> dict[int, object]:
    spec = got.spec
    if spec.kind != "regression":
        return values
    bad = {i for i, v in values.items() if not spec.in_range(v)}
    if bad:
        got.skipped[f"{got.task}: out of range [{spec.low}, {spec.high}]"] += len(bad)
    return {i: v for i, v in values.items() if i not in bad}


def extra_column(got: Targets, table: Table, column: str, study, labels: dict) -> dict[int, object]:
    """Decoded values of another column of the same task (a UK Biobank instance), cached."""
    if column not in got.extra:
        values, _, _, _ = decode_column(got.task, table.frame[column],
                                        table.frame[table.subject_column], study, labels,
                                        got.spec.kind == "classification")
        got.extra[column] = range_check(Targets(got.task, got.spec, column, {}, Counter(), {},
                                                Counter()), values)
    return got.extra[column]


def is_categorical(base: str, column: pd.Series, labels: dict, categorical) -> bool:
    """sex, diagnosis, columns with a label map or named in ``categorical``: classification.
    age, bmi: regression. Other columns: regression when at least 90% of the filled cells are
    numbers (the rest are skipped as "not a number"), else classification."""
    if base in ("sex", "diagnosis") or base in labels or base in categorical:
        return True
    if base in TASKS:
        return TASKS[base].kind == "classification"
    filled = column.dropna()
    if pd.api.types.is_numeric_dtype(column) or filled.empty:
        return False
    return pd.to_numeric(filled, errors="coerce").notna().mean() < 0.9


def spec_for(task: str, base: str, values: dict, ranges: dict, classify: bool) -> TaskSpec:
    if base == "sex":
        return SEX
    lo, hi = ranges.get(task, ranges.get(base, (None, None)))
    if base == "age":
        return regression_task("age", low=AGE.low if lo is None else lo,
                               high=AGE.high if hi is None else hi)
    if classify:
        options = sorted(set(values.values()))
        if len(options) > MAX_OPTIONS:
            raise _err(f"task {task!r}: column has {len(options)} distinct values; a "
                       f"classification task takes at most {MAX_OPTIONS} (is it an id or a "
                       "number? numeric columns become regression tasks)")
        if len(options) < 2:
            raise _err(f"task {task!r}: needs two or more classes, found {options}")
        return classification_task(task, options)
    integral = all(float(v).is_integer() for v in values.values())
    return regression_task(task, low=lo, high=hi, decimals=0 if integral else 1)


def no_usable_rows(got: Targets, study) -> ConfigError:
    """The error for a task with no usable row: what was seen and the flag that fixes it."""
    top = got.skipped.most_common(1)
    if not top:
        return _err(f"task {got.task!r}: the table has no rows")
    codes = ", ".join(f"{c!r} x{n}" for c, n in got.seen.most_common(8)) or "none"
    base = BASE.get(got.task, got.task)
    fixes = {"sex": "pass --sex-coding CODE=male,CODE=female (e.g. --sex-coding 1=male,2=female), "
                    f"or --sex-column COLUMN; study {study.name} expects "
                    f"{sorted(study.sex_coding)} in column {got.column!r}",
             "age": f"check --age-column (now {got.column!r}) and --age-unit (now "
                    f"{study.age_unit})"}
    fix = fixes.get(base, f"check --column {got.task}=COLUMN (now {got.column!r})")
    return _err(f"task {got.task!r}: no usable row in column {got.column!r} ({top[0][0]} "
                f"x{top[0][1]}); values seen: {codes}; {fix}")


__all__ = ["Table", "Targets", "read_table", "task_targets", "no_usable_rows", "subject_key"]
