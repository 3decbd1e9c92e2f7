"""`umbrella prepare`: phenotype table + image folders -> records (LLaVA JSONL), one file per task
and modality, with subject-level splits shared by every task and modality.

    out_dir/
        {task}_{modality}.jsonl   e.g. sex_T1.jsonl, age_T1.jsonl, compare_age_T1.jsonl
        splits.json               {subject: "train" | "val" | "test"} (reuse it with splits_file=)
        prepare_summary.json      files, record counts per split, skipped rows per reason

Images come from a path pattern per modality (``{"T1": "images/{subject}_T1w.nii.gz"}``, relative
to ``image_root``; ``{label}`` is the id without ``sub-``; glob characters allowed: every match
is one scan) or from a BIDS tree (``sub-*/[ses-*/]anat/*_T1w.nii.gz``, ``func/*_bold.nii.gz``,
``dwi/*_dwi.nii.gz``). Image paths in the records are relative to ``PrepareSummary.data_roots``:
set ``dataset.<modality>.data_root`` to it.

Splits: each subject is assigned once (sorted ids, seeded permutation, stratified by the
classification labels), so a subject sits in one split in every task and modality file; pairs of
the comparison tasks are drawn within one split.
"""

from __future__ import annotations

import math
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from umbrella.errors import ConfigError
from umbrella.io import atomic_write_json, atomic_write_jsonl
from umbrella.tasks.conversations import draw_questions, subject_splits, task_record
from umbrella.tasks.registry import (
    AGE,
    COMPARE_AGE,
    COMPARE_SEX,
    SEX,
    TASKS,
    TaskSpec,
    classification_task,
    regression_task,
)

SUMMARY_FILE = "prepare_summary.json"
SPLITS_FILE = "splits.json"
MODALITIES = ("T1", "rsfMRI", "dMRI")
BIDS_IMAGES = {"T1": ("anat", "_T1w.nii.gz"), "rsfMRI": ("func", "_bold.nii.gz"),
               "dMRI": ("dwi", "_dwi.nii.gz")}
SUBJECT_COLUMNS = ("subject_id", "participant_id", "subject", "src_subject_id", "eid", "SUB_ID",
                   "Subject", "EID")
DIAGNOSIS_COLUMNS = ("diagnosis", "dx", "DX_GROUP", "dx_group", "group")
MAX_OPTIONS = 20  # a "categorical" column with more distinct values is probably an id or free text
_BASE = {"sex": "sex", "compare_sex": "sex", "age": "age", "compare_age": "age"}
_PAIRS = {"compare_sex": COMPARE_SEX, "compare_age": COMPARE_AGE}


@dataclass
class PrepareSummary:
    out_dir: Path
    files: dict[str, Path]  # "{task}_{modality}" -> records file
    records: dict[str, dict[str, int]]  # "{task}_{modality}" -> {split: records}
    subjects: dict[str, int]  # split -> subjects with at least one record
    skipped: dict[str, int]  # reason -> rows (or subjects, for a missing image)
    data_roots: dict[str, str]  # modality -> folder the relative image paths resolve against
    splits_file: Path
    tasks: dict[str, dict] = field(default_factory=dict)  # name -> TaskSpec.to_dict()
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> a few raw values

    def to_dict(self) -> dict:
        return {"out_dir": str(self.out_dir), "files": {k: str(v) for k, v in self.files.items()},
                "records": self.records, "subjects": self.subjects, "skipped": self.skipped,
                "examples": self.examples, "data_roots": self.data_roots,
                "splits_file": str(self.splits_file), "tasks": self.tasks}


# ----------------------------------------------------------------------------- phenotype + study

def read_phenotype(path: Path, subject_column: str | None) -> tuple[pd.DataFrame, str]:
    """CSV (or TSV for .tsv/.txt) with the subject ids as text; returns (table, subject column)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"phenotype table {path} does not exist", source="prepare")
    sep = "\t" if path.suffix.lower() in (".tsv", ".txt") else ","
    head = pd.read_csv(path, sep=sep, nrows=0)
    column = subject_column or next((c for c in SUBJECT_COLUMNS if c in head.columns), None)
    if column is None or column not in head.columns:
        raise ConfigError(f"{path}: no subject column {column or ''!r} among {list(head.columns)}; "
                          "pass subject_column= (or --subject-column) naming it", source="prepare")
    table = pd.read_csv(path, sep=sep, dtype={column: str}, na_values=["n/a", "N/A"])
    return table, column


def resolve_study(name: str, overrides: dict | None = None, **explicit):
    """The study's phenotype conventions (``umbrella.data.studies``), explicit arguments winning.

    An unregistered study gets the defaults subject_id / sex (male, female, m, f) / age (years).
    """
    from umbrella.data.studies import REGISTRY, get_study

    values = dict(overrides or {})
    values.update({k: v for k, v in explicit.items() if v is not None})
    if name.upper() not in {k.upper() for k in REGISTRY}:
        defaults = {"subject_column": "subject_id", "sex_column": "sex", "age_column": "age",
                    "age_unit": "years", "sex_coding": {"male": "male", "female": "female",
                                                        "m": "male", "f": "female"}}
        values = {**defaults, **values}
    return get_study(name, values)


def _find_column(table: pd.DataFrame, wanted: str | None, task: str, candidates=()) -> str:
    names = [wanted] if wanted else list(candidates)
    lower = {c.lower(): c for c in table.columns}
    for name in names:
        if name in table.columns:
            return name
        if name.lower() in lower:
            return lower[name.lower()]
    raise ConfigError(f"task {task!r}: no column {wanted or ' / '.join(candidates)!r} in the "
                      f"phenotype table (columns: {', '.join(map(str, table.columns))}); pass "
                      f"columns={{'{task}': 'COLUMN'}}", source="prepare")


# ----------------------------------------------------------------------------- targets

def _raw_key(raw) -> str:
    if isinstance(raw, float) and raw.is_integer():
        return str(int(raw))
    return str(raw).strip()


def _missing(raw) -> bool:
    return raw is None or (isinstance(raw, float) and math.isnan(raw)) or \
        (isinstance(raw, str) and raw.strip() == "") or raw is pd.NA


@dataclass
class _Targets:
    spec: TaskSpec
    values: dict[str, object]  # subject -> label or value in the spec's unit
    skipped: Counter
    examples: dict[str, list[str]]


def _decode(base: str, raw, study, labels: dict | None):
    """(value, reason) for one raw cell: value None means skipped for ``reason``."""
    from umbrella.data.studies import age_in_years, decode_sex

    if _missing(raw):
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
        mapped = {_raw_key(k).lower(): str(v) for k, v in labels.items()}.get(_raw_key(raw).lower())
        return (mapped, None) if mapped is not None else (None, "unknown code")
    return raw, None


def task_targets(task: str, table: pd.DataFrame, subject_column: str, study, *,
                 columns: dict, labels: dict, categorical, ranges: dict) -> _Targets:
    """Decode, validate and range-check one task's column; count every skipped row by reason."""
    base = _BASE.get(task, task)
    column = table[_task_column(task, base, table, study, columns)]
    classify = _is_categorical(base, column, labels, categorical)
    values, skipped, examples = {}, Counter(), {}
    for sid, raw in zip(table[subject_column], column, strict=True):
        value, reason = _decode(base, raw, study, labels.get(task))
        if reason is None and not classify:
            value, reason = _as_number(value)
        if reason is not None:
            key = f"{task}: {reason}"
            skipped[key] += 1
            if reason != "missing value" and len(examples.setdefault(key, [])) < 5:
                examples[key].append(f"{sid}: {raw!r}")
            continue
        values[sid] = _raw_key(value) if classify else value
    spec = _spec_for(task, base, values, ranges, classify)
    if spec.kind == "regression":
        bad = {s for s, v in values.items() if not spec.in_range(v)}
        if bad:
            skipped[f"{task}: out of range [{spec.low}, {spec.high}]"] += len(bad)
            values = {s: v for s, v in values.items() if s not in bad}
    return _Targets(spec, values, skipped, {k: v for k, v in examples.items() if v})


def _task_column(task: str, base: str, table: pd.DataFrame, study, columns: dict) -> str:
    if base == "sex":
        return _find_column(table, columns.get(task, columns.get("sex", study.sex_column)), task)
    if base == "age":
        wanted = columns.get(task, columns.get("age", study.age_column))
        if wanted is None:
            raise ConfigError(f"task {task!r}: study {study.name} has no age column "
                              f"({study.notes}); pass columns={{'age': 'COLUMN'}}",
                              source="prepare")
        return _find_column(table, wanted, task)
    if base == "diagnosis":
        return _find_column(table, columns.get(task), task, DIAGNOSIS_COLUMNS)
    return _find_column(table, columns.get(task, base), task)


def _as_number(value):
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None, "not a number"
    return (number, None) if math.isfinite(number) else (None, "not a number")


def _is_categorical(base: str, column: pd.Series, labels: dict, categorical) -> bool:
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


def _spec_for(task: str, base: str, values: dict, ranges: dict, classify: bool) -> TaskSpec:
    if base == "sex":
        return SEX
    lo, hi = ranges.get(task, ranges.get(base, (None, None)))
    if base == "age":
        return regression_task("age", low=AGE.low if lo is None else lo,
                               high=AGE.high if hi is None else hi)
    if classify:
        options = sorted(set(values.values()))
        if len(options) > MAX_OPTIONS:
            raise ConfigError(f"task {task!r}: column has {len(options)} distinct values; a "
                              f"classification task takes at most {MAX_OPTIONS} (is it an id or a "
                              "number? numeric columns become regression tasks)", source="prepare")
        if len(options) < 2:
            raise ConfigError(f"task {task!r}: needs two or more classes, found {options}",
                              source="prepare")
        return classification_task(task, options)
    integral = all(float(v).is_integer() for v in values.values())
    return regression_task(task, low=lo, high=hi, decimals=0 if integral else 1)


# ----------------------------------------------------------------------------- images

def _label_of(subject: str) -> str:
    return subject[4:] if subject.startswith("sub-") else subject


def discover_bids(root: Path, modalities=MODALITIES) -> dict[str, dict[str, list[Path]]]:
    """{modality: {subject label (no "sub-"): [files]}} from ``sub-*/[ses-*/]<folder>/*<suffix>``.
    For rsfMRI, runs named ``task-rest`` are kept when a subject has any."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"BIDS root {root} is not a folder", source="prepare")
    found: dict[str, dict[str, list[Path]]] = {m: {} for m in modalities}
    for sub in sorted(p for p in root.glob("sub-*") if p.is_dir()):
        for modality in modalities:
            folder, suffix = BIDS_IMAGES[modality]
            files = sorted(sub.glob(f"{folder}/*{suffix}")) + sorted(sub.glob(f"ses-*/{folder}/*{suffix}"))
            if modality == "rsfMRI" and any("task-rest" in f.name for f in files):
                files = [f for f in files if "task-rest" in f.name]
            if files:
                found[modality][_label_of(sub.name)] = files
    return found


def _pattern_files(pattern: str, subject: str, root: Path) -> list[Path]:
    text = pattern.format(subject=subject, label=_label_of(subject))
    path = Path(text)
    if not path.is_absolute():
        path = root / path
    if any(c in text for c in "*?["):
        anchor = Path(path.anchor)
        return sorted(anchor.glob(str(path.relative_to(anchor))))
    return [path] if path.exists() else []  # a folder is an rsfMRI frame folder


def find_images(subjects: list[str], *, images: dict[str, str] | None, bids_root: Path | None,
                image_root: Path) -> tuple[dict[str, dict[str, list[Path]]], dict[str, Path]]:
    """({modality: {subject: [files]}}, {modality: data root}); subjects with no file are absent."""
    images = dict(images or {})
    bad = [m for m in images if m not in MODALITIES]
    if bad:
        raise ConfigError(f"unknown modality {bad[0]!r} in images; use {', '.join(MODALITIES)}",
                          source="prepare")
    if not images and bids_root is None:
        raise ConfigError("no images: pass images={'T1': 'path/{subject}_T1w.nii.gz'} or "
                          "bids_root=", source="prepare")
    out: dict[str, dict[str, list[Path]]] = {}
    roots: dict[str, Path] = {}
    if bids_root is not None:
        bids = discover_bids(bids_root, [m for m in MODALITIES if m not in images])
        for modality, by_label in bids.items():
            if by_label:
                numeric = {int(k): v for k, v in by_label.items() if k.isdigit()}
                out[modality] = {}
                for s in subjects:
                    lab = _label_of(s)
                    files = by_label.get(lab) or (numeric.get(int(lab)) if lab.isdigit() else None)
                    if files:
                        out[modality][s] = files
                roots[modality] = Path(bids_root).resolve()
    for modality, pattern in images.items():
        out[modality] = {s: f for s in subjects if (f := _pattern_files(pattern, s, image_root))}
        roots[modality] = image_root
    return out, roots


def _where_images_were_sought(subjects: list[str], images: dict[str, str] | None,
                              bids_root: Path | None, root: Path, sid_col: str) -> str:
    """What to check when no image matched: the first subject's looked-up paths."""
    first = subjects[0] if subjects else "<none>"
    parts = [f"subject column {sid_col!r} (first id {first!r})"]
    for modality, pattern in (images or {}).items():
        looked = Path(pattern.format(subject=first, label=_label_of(first)))
        looked = looked if looked.is_absolute() else root / looked
        parts.append(f"{modality} pattern {pattern!r} looked for {looked} (relative patterns "
                     "start from the image root: the phenotype table's folder unless "
                     "--image-root / image_root= is given)")
    if bids_root is not None:
        parts.append(f"BIDS root {bids_root} (sub-<label>/[ses-*/]anat|func|dwi)")
    return "check " + "; ".join(parts)


def _image_entry(modality: str, path: Path, root: Path) -> dict:
    path = Path(path).resolve()
    rel = path.relative_to(root) if path.is_relative_to(root) else path
    return {"modality": modality, "path": str(rel)}


# ----------------------------------------------------------------------------- splits

def _strata(subjects: list[str], targets: dict[str, _Targets], stratify) -> list[str]:
    """One stratum per subject: its joint classification labels ("?" where missing)."""
    unknown = [n for n in (stratify or ()) if n not in targets]
    if unknown:
        raise ConfigError(f"stratify names {unknown}, which are not among the tasks "
                          f"{list(targets)}", source="prepare")
    names = list(stratify) if stratify is not None else \
        [t for t, g in targets.items() if g.spec.kind == "classification"
         and t not in _PAIRS] or [t for t, g in targets.items() if g.spec.kind == "classification"]
    if stratify is None and not names:  # regression only: quartiles of the first target
        first = next((g for g in targets.values() if g.values), None)
        if first is None:
            return ["all"] * len(subjects)
        cuts = np.quantile(np.array(list(first.values.values()), float), [0.25, 0.5, 0.75])
        return [str(int(np.searchsorted(cuts, first.values[s]))) if s in first.values else "?"
                for s in subjects]
    return ["|".join(str(targets[n].values.get(s, "?")) for n in names) for s in subjects]


def make_splits(subjects: list[str], strata: list[str], ratios, seed: int,
                reuse: dict[str, str] | None = None) -> dict[str, str]:
    """Subjects in ``reuse`` keep their split; the others get a stratified seeded draw."""
    reuse = reuse or {}
    bad = {s: v for s, v in reuse.items() if v not in ("train", "val", "test")}
    if bad:
        raise ConfigError(f"splits file assigns unknown splits {dict(list(bad.items())[:3])}",
                          source="prepare")
    new = [(s, k) for s, k in zip(subjects, strata, strict=True) if s not in reuse]
    drawn = subject_splits([s for s, _ in new], [k for _, k in new], ratios, seed) if new else {}
    return {s: reuse.get(s) or drawn[s] for s in subjects}


# ----------------------------------------------------------------------------- records

def _rng(seed: int, *parts: str) -> np.random.Generator:
    key = zlib.crc32("/".join(parts).encode())
    return np.random.default_rng(np.random.SeedSequence([seed, key]))


def _single_records(spec: TaskSpec, targets: _Targets, modality: str, files, root: Path,
                    split: dict[str, str], study: str, seed: int, k: int) -> list[dict]:
    rng, rows = _rng(seed, spec.name, modality), []
    builtin = TASKS.get(spec.name)
    own = {} if builtin is not None and builtin.to_dict() == spec.to_dict() else \
        {"task_spec": spec.to_dict()}
    for sid in sorted(targets.values):
        if sid not in files or sid not in split:
            continue
        value = targets.values[sid]
        answer = spec.format_answer(value)
        paths = files[sid]
        for j, path in enumerate(paths):
            for q, question in enumerate(draw_questions(spec, k, rng)):
                rid = f"{sid}_{spec.name}_{modality}" + (f"_{j + 1}" if len(paths) > 1 else "") \
                    + (f"_q{q + 1}" if k > 1 else "")
                rows.append(task_record(spec, subject_id=sid, answer=answer,
                                        images=[_image_entry(modality, path, root)], study=study,
                                        split=split[sid], question=question, record_id=rid,
                                        metadata={"value": value, **own}))
    return rows


def _pair_answer(task: str, a, b) -> str:
    if task == "compare_sex":
        return "same" if a == b else "different"
    return "first" if a > b else "second"


def _partners(task: str, i: int, values: np.ndarray, rng, n: int, min_gap: float) -> list[int]:
    """Up to ``n`` partner indices for subject ``i``: for compare_sex half same, half different
    (as available); for compare_age any subject at least ``min_gap`` years apart."""
    others = np.arange(len(values)) != i
    if task == "compare_age":
        pool = np.flatnonzero(others & (np.abs(values.astype(float) - float(values[i])) >= min_gap))
        return [int(p) for p in rng.permutation(pool)[:n]]
    same = np.flatnonzero(others & (values == values[i]))
    diff = np.flatnonzero(others & (values != values[i]))
    same, diff = list(rng.permutation(same)), list(rng.permutation(diff))
    out, want_same = [], bool(rng.random() < 0.5)
    while len(out) < n and (same or diff):
        pick = same if (want_same and same) or not diff else diff
        out.append(int(pick.pop()))
        want_same = not want_same
    return out


def _pair_records(task: str, targets: _Targets, modality: str, files, root: Path,
                  split: dict[str, str], study: str, seed: int, k: int, per_subject: int,
                  min_gap: float, skipped: Counter) -> list[dict]:
    spec, rows = _PAIRS[task], []
    rng = _rng(seed, task, modality)
    for part in ("train", "val", "test"):
        pool = sorted(s for s in targets.values if s in files and split.get(s) == part)
        values = np.array([targets.values[s] for s in pool], dtype=object)
        for i, a in enumerate(pool):
            partners = _partners(task, i, values, rng, per_subject, min_gap)
            if not partners:
                skipped[f"{task}: no partner in split"] += 1
            for p in partners:
                b = pool[p]
                answer = _pair_answer(task, targets.values[a], targets.values[b])
                images = [_image_entry(modality, files[a][0], root),
                          _image_entry(modality, files[b][0], root)]
                for q, question in enumerate(draw_questions(spec, k, rng)):
                    rid = f"{a}_{b}_{task}_{modality}" + (f"_q{q + 1}" if k > 1 else "")
                    meta = {"subjects": [a, b], "values": [targets.values[a], targets.values[b]]}
                    rows.append(task_record(spec, subject_id=a, answer=answer, images=images,
                                            study=study, split=part, question=question,
                                            record_id=rid, metadata=meta))
    return rows


# ----------------------------------------------------------------------------- prepare

def _check_arguments(tasks, ratios, questions_per_record, pairs_per_subject) -> None:
    problems = []
    if not tasks:
        problems.append("no tasks: pass e.g. tasks=['sex', 'age']")
    if len(set(tasks)) != len(tasks):
        problems.append(f"a task is named twice in {tasks}")
    if len(ratios) != 3 or min(ratios) < 0 or abs(sum(ratios) - 1) > 1e-6:
        problems.append(f"ratios {tuple(ratios)} must be three non-negative numbers summing to 1")
    if questions_per_record < 1 or pairs_per_subject < 1:
        problems.append("questions_per_record and pairs_per_subject must be 1 or more")
    if problems:
        raise ConfigError(problems, source="prepare")


def _unique_rows(table: pd.DataFrame, column: str, skipped: Counter) -> pd.DataFrame:
    missing = table[column].isna()
    if missing.any():
        skipped["subject id missing"] += int(missing.sum())
    table = table[~missing]
    dup = table[column].duplicated(keep="first")
    if dup.any():
        skipped["duplicate subject row (first kept)"] += int(dup.sum())
    return table[~dup]


def prepare(phenotype: Path, out_dir: Path, *, tasks: list[str],
            images: dict[str, str] | None = None, bids_root: Path | None = None, study: str,
            subject_column: str | None = None, ratios=(0.7, 0.15, 0.15), seed: int = 12345,
            questions_per_record: int = 1, image_root: Path | None = None,
            columns: dict[str, str] | None = None, labels: dict[str, dict] | None = None,
            categorical: tuple[str, ...] | list[str] = (),
            ranges: dict[str, tuple[float | None, float | None]] | None = None,
            age_unit: str | None = None, sex_coding: dict | None = None,
            study_overrides: dict | None = None, stratify: list[str] | None = None,
            pairs_per_subject: int = 1, min_age_gap: float = 1.0,
            splits_file: Path | None = None) -> PrepareSummary:
    """Write records for ``tasks`` (sex, age, bmi, diagnosis, compare_sex, compare_age or any
    phenotype column) and return what was written and skipped. See the module docstring."""
    _check_arguments(tasks, ratios, questions_per_record, pairs_per_subject)
    columns, labels, ranges = dict(columns or {}), dict(labels or {}), dict(ranges or {})
    phenotype, out_dir = Path(phenotype), Path(out_dir)
    info = resolve_study(study, study_overrides, subject_column=subject_column,
                         age_unit=age_unit, sex_coding=sex_coding)
    table, sid_col = read_phenotype(phenotype, subject_column or _table_subject(phenotype, info))
    skipped: Counter = Counter()
    table = _unique_rows(table, sid_col, skipped)
    subjects = sorted(table[sid_col])
    root = Path(image_root or phenotype.parent).resolve()
    files, roots = find_images(subjects, images=images, bids_root=bids_root, image_root=root)
    targets = {t: task_targets(t, table, sid_col, info, columns=columns, labels=labels,
                               categorical=categorical, ranges=ranges) for t in tasks}
    for name, got in targets.items():
        skipped.update(got.skipped)
        if not got.values:
            top = got.skipped.most_common(1)
            raise ConfigError(f"task {name!r}: no usable row ({top[0][0]} x{top[0][1]})"
                              if top else f"task {name!r}: the table has no rows",
                              source="prepare")
    for modality, by_subject in files.items():
        if len(by_subject) < len(subjects):
            skipped[f"no {modality} image"] += len(subjects) - len(by_subject)
    usable = sorted({s for g in targets.values() for s in g.values}
                    & {s for f in files.values() for s in f})
    if not usable:
        raise ConfigError("no subject has both a usable phenotype value and an image; "
                          + _where_images_were_sought(subjects, images, bids_root, root, sid_col),
                          source="prepare")
    split = make_splits(usable, _strata(usable, targets, stratify), ratios, seed,
                        _read_splits(splits_file))
    pairs = {"k": questions_per_record, "per_subject": pairs_per_subject, "min_gap": min_age_gap}
    written, counts, used = _write_records(out_dir, targets, files, roots, split, info.name, seed,
                                           pairs, skipped)
    splits_path = atomic_write_json(out_dir / SPLITS_FILE, used)
    summary = PrepareSummary(out_dir, written, counts, dict(Counter(used.values())),
                             dict(sorted(skipped.items())), {m: str(r) for m, r in roots.items()},
                             splits_path, {n: g.spec.to_dict() for n, g in targets.items()},
                             {k: v for g in targets.values() for k, v in g.examples.items()})
    atomic_write_json(out_dir / SUMMARY_FILE, summary.to_dict())
    return summary


def _write_records(out_dir: Path, targets: dict[str, _Targets], files, roots, split, study: str,
                   seed: int, pairs: dict, skipped: Counter):
    """One JSONL per (task, modality) with records; returns (files, counts per split,
    {subject: split} of the subjects that appear in a record)."""
    written, counts, seen = {}, {}, set()
    for name, got in targets.items():
        for modality in sorted(files):
            if name in _PAIRS:
                rows = _pair_records(name, got, modality, files[modality], roots[modality], split,
                                     study, seed, pairs["k"], pairs["per_subject"],
                                     pairs["min_gap"], skipped)
            else:
                rows = _single_records(got.spec, got, modality, files[modality], roots[modality],
                                       split, study, seed, pairs["k"])
            if not rows:
                continue
            key = f"{name}_{modality}"
            written[key] = atomic_write_jsonl(out_dir / f"{key}.jsonl", rows)
            counts[key] = dict(Counter(r["split"] for r in rows))
            seen.update(s for r in rows
                        for s in r.get("metadata", {}).get("subjects", [r["subject_id"]]))
    return written, counts, {s: split[s] for s in sorted(seen)}


def _table_subject(phenotype: Path, info) -> str | None:
    """The study's subject column when the table has it, else None (auto-detect)."""
    sep = "\t" if phenotype.suffix.lower() in (".tsv", ".txt") else ","
    try:
        head = pd.read_csv(phenotype, sep=sep, nrows=0)
    except (OSError, pd.errors.ParserError):
        return None
    return info.subject_column if info.subject_column in head.columns else None


def _read_splits(path: Path | None) -> dict[str, str]:
    if path is None:
        return {}
    import json

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"splits file {path} does not exist", source="prepare")
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ConfigError(f"splits file {path} must map subject -> split", source="prepare")
    return {str(k): str(v) for k, v in data.items()}


__all__ = ["PrepareSummary", "prepare", "discover_bids", "find_images", "make_splits",
           "read_phenotype", "resolve_study", "task_targets", "TASKS"]
