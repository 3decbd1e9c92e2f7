"""`umbrella prepare`: phenotype table + image folders -> records (LLaVA JSONL), one file per task
and modality, with subject-level splits shared by every task and modality.

    out_dir/
        {task}_{modality}.jsonl   e.g. sex_T1.jsonl, age_T1.jsonl, session_order_T1.jsonl
        splits.json               {subject: "train" | "val" | "test"} (reuse it with splits_file=)
        prepare_summary.json      files, record counts per split, skipped rows per reason, how
                                  table ids met image ids (matched / unmatched, with examples)
        train.yaml                a config for `umbrella train -c`: the records, data roots and
                                  study; with T1 records alone also the measured recipe
                                  (:data:`umbrella.recipes.T1_TWO_STAGE`)

Images come from a path pattern per modality or a BIDS tree (:mod:`umbrella.tasks.images`).
Table ids meet path ids through :func:`umbrella.tasks.subjects.subject_key` (``sub-`` prefix,
non-alphanumerics and case dropped: ABCD's ``NDAR_INV0A4P0LWM`` is BIDS's
``sub-NDARINV0A4P0LWM``). Image paths in the records are relative to
``PrepareSummary.data_roots``: set ``dataset.<modality>.data_root`` to it.

Sessions: a record is one scan of one subject at one session, labelled from that session's row
(a long table: ABCD ``eventname``, BIDS ``session_id``, or ``--session-column``) or, in a wide UK
Biobank table, from the same field at the scan's instance (``21003-2.0`` for instance 2,
``21003-3.0`` for 3; the instance comes from ``ses-2`` or the bulk name ``<eid>_20252_2_0``).
Sex and diagnosis may come from any session of the subject; other values must come from the
scan's own session, else the scan is skipped and counted. Every record carries ``subject_id``
and ``session`` ('' when the cohort has none).

Splits: each subject is assigned once (sorted ids, seeded permutation, stratified by the
classification labels), so a subject, with all its sessions, sits in one split in every task and
modality file; pairs of the comparison tasks are drawn within one split.
"""

from __future__ import annotations

import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from umbrella.errors import ConfigError
from umbrella.io import atomic_write_json, atomic_write_jsonl, atomic_write_text
from umbrella.task_registry import (
    COMPARE_AGE,
    COMPARE_SEX,
    SESSION_GAP,
    SESSION_ORDER,
    TASKS,
    TaskSpec,
)
from umbrella.tasks.conversations import draw_questions, subject_splits, task_record
from umbrella.tasks.images import (
    MODALITIES,
    ImageFile,
    collect_images,
    discover_bids,
    example_path,
)
from umbrella.tasks.phenotype import (
    Table,
    Targets,
    extra_column,
    no_usable_rows,
    read_table,
    session_column_for,
    table_columns,
    task_targets,
)
from umbrella.tasks.subjects import match_ids, subject_key, ukb_instance_column

SUMMARY_FILE = "prepare_summary.json"
SPLITS_FILE = "splits.json"
CONFIG_FILE = "train.yaml"
_PAIRS = {"compare_sex": COMPARE_SEX, "compare_age": COMPARE_AGE}
_WITHIN = {"session_order": SESSION_ORDER, "session_gap": SESSION_GAP}
MIN_SESSION_GAP = 0.25  # years: two sessions closer than this are not asked about


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
    matching: dict[str, dict] = field(default_factory=dict)  # modality -> id matching counts
    sessions: dict[str, int] = field(default_factory=dict)  # modality -> distinct sessions
    config_file: Path | None = None  # train.yaml (:func:`write_train_config`)
    recipe: str | None = None  # the measured recipe it holds (umbrella.recipes), if any

    def to_dict(self) -> dict:
        return {"out_dir": str(self.out_dir), "files": {k: str(v) for k, v in self.files.items()},
                "records": self.records, "subjects": self.subjects, "skipped": self.skipped,
                "examples": self.examples, "data_roots": self.data_roots,
                "splits_file": str(self.splits_file), "tasks": self.tasks,
                "matching": self.matching, "sessions": self.sessions,
                "config_file": str(self.config_file) if self.config_file else None,
                "recipe": self.recipe}


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


# ----------------------------------------------------------------------------- units

@dataclass
class _Units:
    """Scans grouped by (subject key, session key), per modality, matched to table rows."""

    files: dict[str, dict[tuple[str, str], list[Path]]]  # modality -> unit -> files
    sessions: dict[tuple[str, str], str]  # unit -> session as written ('' when none)
    subject_sessions: dict[str, set[str]]  # subject key -> session keys with a scan


def _group(found: dict[str, list[ImageFile]], table: Table) -> _Units:
    files: dict[str, dict[tuple[str, str], list[Path]]] = {}
    sessions, per_subject = {}, {}
    for modality, images in found.items():
        by_unit: dict[tuple[str, str], list[Path]] = {}
        for image in images:
            if image.key[0] not in table.rows:
                continue
            by_unit.setdefault(image.key, []).append(image.path)
            sessions.setdefault(image.key, image.session)
            per_subject.setdefault(image.key[0], set()).add(image.key[1])
        files[modality] = {u: sorted(set(p)) for u, p in sorted(by_unit.items())}
    return _Units(files, sessions, per_subject)


def _label(got: Targets, table: Table, unit: tuple[str, str], units: _Units, study,
           labels: dict) -> tuple[object | None, str | None]:
    """(value, reason) of one task for one scan's (subject, session); a reason counts a skip,
    (None, None) is a row already counted as skipped (missing or bad value)."""
    key, session = unit
    rows = table.rows[key]
    if table.session_column:
        row = next((i for i in rows if table.units[i][1] == session), None)
        if row is None and not session and len(rows) == 1:
            row = rows[0]
        if row is not None and row in got.values:
            return got.values[row], None
        if got.subject_level:
            hit = next((got.values[i] for i in rows if i in got.values), None)
            if hit is not None:
                return hit, None
        if row is None:
            return None, (f"{got.task}: no table row for the scan's session" if session else
                          f"{got.task}: scan has no session, the subject has several rows")
        return None, None
    row = rows[0]
    other = ukb_instance_column(got.column, session) if session else None
    if other == got.column:  # the scan's instance is the column's own
        return got.values.get(row), None
    if other is not None:
        if other in table.frame.columns:
            value = extra_column(got, table, other, study, labels).get(row)
            if value is not None or not got.subject_level:
                return value, None if value is not None else f"{got.task}: no value in {other}"
        elif not got.subject_level:
            return None, f"{got.task}: no column {other} for the scan's instance"
    elif session and not got.subject_level and len(units.subject_sessions[key] - {""}) > 1:
        return None, (f"{got.task}: scans in several sessions but one table row "
                      "(--session-column)")
    return got.values.get(row), None


def _labels(targets: dict[str, Targets], table: Table, units: _Units, study, labels: dict,
            skipped: Counter) -> dict[str, dict[tuple[str, str], object]]:
    """{task: {unit: value}} over every unit with a scan in any modality."""
    every = sorted({u for by_unit in units.files.values() for u in by_unit})
    out = {}
    for name, got in targets.items():
        values = {}
        for unit in every:
            value, reason = _label(got, table, unit, units, study, labels)
            if reason is not None:
                skipped[reason] += 1
            elif value is not None:
                values[unit] = value
        out[name] = values
    return out


# ----------------------------------------------------------------------------- splits

def _strata(subjects: list[str], values: dict[str, dict], specs: dict[str, TaskSpec],
            stratify) -> list[str]:
    """One stratum per subject (key): its joint classification labels ("?" where missing),
    from the subject's first labelled session."""
    unknown = [n for n in (stratify or ()) if n not in specs]
    if unknown:
        raise ConfigError(f"stratify names {unknown}, which are not among the tasks "
                          f"{list(specs)}", source="prepare")
    first = {n: _first_per_subject(v) for n, v in values.items()}
    plain = [t for t in specs if t not in _PAIRS and t not in _WITHIN]
    names = list(stratify) if stratify is not None else \
        [t for t in plain if specs[t].kind == "classification"] or \
        [t for t in specs if specs[t].kind == "classification" and t not in _WITHIN]
    if stratify is None and not names:  # regression only: quartiles of the first target
        target = next((first[t] for t in plain if first[t]), None)
        if target is None:
            return ["all"] * len(subjects)
        cuts = np.quantile(np.array(list(target.values()), float), [0.25, 0.5, 0.75])
        return [str(int(np.searchsorted(cuts, target[s]))) if s in target else "?"
                for s in subjects]
    return ["|".join(str(first[n].get(s, "?")) for n in names) for s in subjects]


def _first_per_subject(values: dict[tuple[str, str], object]) -> dict[str, object]:
    out: dict[str, object] = {}
    for (key, _), value in sorted(values.items()):
        out.setdefault(key, value)
    return out


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


@dataclass
class _Writer:
    """What every record builder needs: ids as written, sessions, splits, roots."""

    ids: dict[str, str]  # subject key -> id as the table writes it
    sessions: dict[tuple[str, str], str]  # unit -> session as written
    split: dict[str, str]  # subject id -> split
    roots: dict[str, Path]
    study: str
    seed: int
    k: int  # questions per record

    def sid(self, unit: tuple[str, str]) -> str:
        return self.ids[unit[0]]

    def stem(self, unit: tuple[str, str]) -> str:
        session = self.sessions.get(unit, "")
        return self.sid(unit) + (f"_ses-{session}" if session else "")

    def image(self, modality: str, path: Path) -> dict:
        root = self.roots[modality]
        path = Path(path).resolve()
        rel = path.relative_to(root) if path.is_relative_to(root) else path
        return {"modality": modality, "path": str(rel)}

    def record(self, spec: TaskSpec, unit, answer: str, images: list[dict], question: str,
               rid: str, metadata: dict) -> dict:
        session = self.sessions.get(unit, "")
        rec = task_record(spec, subject_id=self.sid(unit), answer=answer, images=images,
                          study=self.study, split=self.split[self.sid(unit)], question=question,
                          record_id=rid, metadata={"session": session, **metadata})
        return {**rec, "session": session}


def _single_records(spec: TaskSpec, values: dict, modality: str, files, w: _Writer) -> list[dict]:
    rng, rows = _rng(w.seed, spec.name, modality), []
    builtin = TASKS.get(spec.name)
    own = {} if builtin is not None and builtin.to_dict() == spec.to_dict() else \
        {"task_spec": spec.to_dict()}
    for unit in sorted(values):
        if unit not in files or w.sid(unit) not in w.split:
            continue
        value, paths = values[unit], files[unit]
        answer = spec.format_answer(value)
        for j, path in enumerate(paths):
            for q, question in enumerate(draw_questions(spec, w.k, rng)):
                rid = f"{w.stem(unit)}_{spec.name}_{modality}" + \
                    (f"_{j + 1}" if len(paths) > 1 else "") + (f"_q{q + 1}" if w.k > 1 else "")
                rows.append(w.record(spec, unit, answer, [w.image(modality, path)], question,
                                     rid, {"value": value, **own}))
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


def _pair_records(task: str, values: dict, modality: str, files, w: _Writer, per_subject: int,
                  min_gap: float, skipped: Counter) -> list[dict]:
    """Two subjects per record (their first labelled session each), drawn within one split."""
    spec, rows = _PAIRS[task], []
    rng = _rng(w.seed, task, modality)
    first: dict[str, tuple[str, str]] = {}
    for unit in sorted(values):
        if unit in files:
            first.setdefault(unit[0], unit)
    for part in ("train", "val", "test"):
        pool = [u for _, u in sorted(first.items()) if w.split.get(w.sid(u)) == part]
        array = np.array([values[u] for u in pool], dtype=object)
        for i, a in enumerate(pool):
            partners = _partners(task, i, array, rng, per_subject, min_gap)
            if not partners:
                skipped[f"{task}: no partner in split"] += 1
            for p in partners:
                b = pool[p]
                answer = _pair_answer(task, values[a], values[b])
                images = [w.image(modality, files[a][0]), w.image(modality, files[b][0])]
                for q, question in enumerate(draw_questions(spec, w.k, rng)):
                    rid = f"{w.stem(a)}_{w.stem(b)}_{task}_{modality}" + \
                        (f"_q{q + 1}" if w.k > 1 else "")
                    meta = {"subjects": [w.sid(a), w.sid(b)], "values": [values[a], values[b]]}
                    rows.append(w.record(spec, a, answer, images, question, rid, meta))
    return rows


def _within_records(task: str, ages: dict, modality: str, files, w: _Writer,
                    skipped: Counter) -> list[dict]:
    """Two sessions of one subject per record, every pair of sessions at least
    MIN_SESSION_GAP years apart; the image order is drawn, the answer follows from the ages."""
    spec, rows = _WITHIN[task], []
    rng = _rng(w.seed, task, modality)
    by_subject: dict[str, list[tuple[str, str]]] = {}
    for unit in sorted(ages):
        if unit in files and w.sid(unit) in w.split:
            by_subject.setdefault(unit[0], []).append(unit)
    for _, units in sorted(by_subject.items()):
        pairs = [(a, b) for i, a in enumerate(units) for b in units[i + 1:]
                 if abs(ages[a] - ages[b]) >= MIN_SESSION_GAP]
        if len(units) > 1 and not pairs:
            skipped[f"{task}: sessions less than {MIN_SESSION_GAP} years apart"] += 1
        for a, b in pairs:
            if rng.random() < 0.5:
                a, b = b, a
            gap = abs(ages[a] - ages[b])
            answer = ("first" if ages[a] > ages[b] else "second") if task == "session_order" \
                else spec.format_answer(gap)
            images = [w.image(modality, files[a][0]), w.image(modality, files[b][0])]
            for q, question in enumerate(draw_questions(spec, w.k, rng)):
                rid = f"{w.stem(a)}_{w.sessions.get(b, '')}_{task}_{modality}" + \
                    (f"_q{q + 1}" if w.k > 1 else "")
                meta = {"sessions": [w.sessions.get(a, ""), w.sessions.get(b, "")],
                        "ages": [ages[a], ages[b]], "task_spec": spec.to_dict()}
                rows.append(w.record(spec, a, answer, images, question, rid, meta))
    return rows


# ----------------------------------------------------------------------------- prepare

def _check_arguments(tasks, ratios, questions_per_record, pairs_per_subject) -> None:
    problems = []
    if not tasks:
        problems.append("no tasks: pass e.g. --tasks sex,age")
    if len(set(tasks)) != len(tasks):
        problems.append(f"a task is named twice in --tasks {','.join(tasks)}")
    if len(ratios) != 3 or min(ratios) < 0 or abs(sum(ratios) - 1) > 1e-6:
        problems.append(f"--ratios {','.join(map(str, ratios))} must be three non-negative "
                        "numbers summing to 1")
    if questions_per_record < 1 or pairs_per_subject < 1:
        problems.append("questions_per_record and pairs_per_subject must be 1 or more")
    if problems:
        raise ConfigError(problems, source="prepare")


def prepare(phenotype: Path | list[Path], out_dir: Path, *, tasks: list[str],
            images: dict[str, str] | None = None, bids_root: Path | None = None, study: str,
            subject_column: str | None = None, session_column: str | None = None,
            ratios=(0.7, 0.15, 0.15), seed: int = 12345,
            questions_per_record: int = 1, image_root: Path | None = None,
            columns: dict[str, str] | None = None, labels: dict[str, dict] | None = None,
            categorical: tuple[str, ...] | list[str] = (),
            ranges: dict[str, tuple[float | None, float | None]] | None = None,
            age_unit: str | None = None, sex_coding: dict | None = None,
            sex_column: str | None = None, age_column: str | None = None,
            study_overrides: dict | None = None, stratify: list[str] | None = None,
            pairs_per_subject: int = 1, min_age_gap: float = 1.0,
            splits_file: Path | None = None) -> PrepareSummary:
    """Write records for ``tasks`` (sex, age, bmi, diagnosis, compare_sex, compare_age,
    session_order, session_gap or any phenotype column) and return what was written and
    skipped. ``phenotype`` may list several tables (e.g. ABCD 5.x's ``abcd_y_lt`` and
    ``abcd_p_demo``): rows join on the subject and, where both have it, the session column; a
    column found in several tables comes from the first. See the module docstring."""
    _check_arguments(tasks, ratios, questions_per_record, pairs_per_subject)
    columns, labels, ranges = dict(columns or {}), dict(labels or {}), dict(ranges or {})
    tables = [Path(p) for p in phenotype] if isinstance(phenotype, list | tuple) else \
        [Path(phenotype)]
    phenotype, out_dir = (tables if len(tables) > 1 else tables[0]), Path(out_dir)
    info = resolve_study(study, study_overrides, subject_column=subject_column,
                         age_unit=age_unit, sex_coding=sex_coding, sex_column=sex_column,
                         age_column=age_column)
    names = table_columns(phenotype)
    skipped: Counter = Counter()
    table = read_table(phenotype, subject_column or
                       (info.subject_column if info.subject_column in names else None),
                       session_column_for(names, session_column, info), skipped)
    root = Path(image_root or tables[0].parent).resolve()
    found, roots = collect_images(images, bids_root, root)
    targets = {t: task_targets(t, table, info, columns=columns, labels=labels,
                               categorical=categorical, ranges=ranges) for t in tasks}
    for got in targets.values():
        skipped.update(got.skipped)
        if not got.values:
            raise no_usable_rows(got, info)
    matching = {m: match_ids(m, table.ids, {f.key[0]: f.subject for f in reversed(fs)})
                for m, fs in found.items()}
    for modality, match in matching.items():
        if match.matched < match.table_ids:
            skipped[f"no {modality} image"] += match.table_ids - match.matched
    units = _group(found, table)
    values = _labels(targets, table, units, info, labels, skipped)
    usable = sorted({u[0] for v in values.values() for u in v})
    if not usable:
        raise ConfigError("no subject has both a usable phenotype value and an image; " +
                          _where(table, images, bids_root, root, matching), source="prepare")
    ids = [table.ids[k] for k in usable]
    split = make_splits(ids, _strata(usable, values, {n: g.spec for n, g in targets.items()},
                                     stratify), ratios, seed, _read_splits(splits_file))
    writer = _Writer(table.ids, units.sessions, split, {m: Path(r) for m, r in roots.items()},
                     info.name, seed, questions_per_record)
    pairs = {"per_subject": pairs_per_subject, "min_gap": min_age_gap}
    written, counts, used = _write_records(out_dir, targets, values, units, writer, pairs,
                                           skipped)
    splits_path = atomic_write_json(out_dir / SPLITS_FILE, used)
    summary = PrepareSummary(
        out_dir, written, counts, dict(Counter(used.values())), dict(sorted(skipped.items())),
        {m: str(r) for m, r in roots.items()}, splits_path,
        {n: (_WITHIN[n] if n in _WITHIN else g.spec).to_dict() for n, g in targets.items()},
        {k: v for g in targets.values() for k, v in g.examples.items()},
        {m: match.to_dict() for m, match in matching.items()},
        {m: len({u[1] for u in by_unit if u[1]}) for m, by_unit in units.files.items()})
    summary.config_file, summary.recipe = write_train_config(summary, info.name)
    atomic_write_json(out_dir / SUMMARY_FILE, summary.to_dict())
    return summary


def train_config(summary: PrepareSummary, study: str) -> tuple[dict, str | None]:
    """The config `umbrella train -c <out>/train.yaml` reads: every modality's records (absolute
    paths), data root and study, runs under ``<out>/runs``; with T1 records alone, the measured
    recipe by name (``recipe: t1_two_stage``, which :func:`umbrella.config.load_config` lays
    beneath the file's keys; the run folder's config.yaml then lists every value) and the
    preprocessing cache ``<out>/cache`` (``dataset.cache_dir``). Returns the tree and the recipe's
    name (None without one)."""
    out = Path(summary.out_dir).resolve()
    dataset: dict = {}
    for name, path in sorted(summary.files.items()):
        modality = name.rsplit("_", 1)[1]
        section = dataset.setdefault(modality, {"studies": [study], "records": [],
                                                "data_root": summary.data_roots[modality]})
        section["records"].append(str(Path(path).resolve()))
    recipe = "t1_two_stage" if set(dataset) == {"T1"} else None
    tree = {"dataset": dataset, "training": {"output_dir": str(out / "runs")}}
    if recipe:
        tree = {"recipe": recipe, **tree}
        # every image decoded and resampled once, for both stages, every seed and evaluation
        # (float16 at the recipe's 48 x 64 x 48 grid: 0.3 MB per image)
        dataset["cache_dir"] = str(out / "cache")
    return tree, recipe


def write_train_config(summary: PrepareSummary, study: str) -> tuple[Path, str | None]:
    """``<out>/train.yaml`` (:func:`train_config`), with a header saying what it holds; returns
    the file and the recipe's name."""
    import yaml

    tree, recipe = train_config(summary, study)
    head = ["# written by `umbrella prepare`: train with `umbrella train -c " +
            f"{Path(summary.out_dir) / CONFIG_FILE}` (override any key as KEY=VALUE)"]
    if recipe:
        head += ["# T1 alone: the measured two-stage recipe (recipe: t1_two_stage, the keys of",
                 "# umbrella.recipes.T1_TWO_STAGE beneath this file's; any key set here wins;",
                 "# benchmarks/README.md section 11): `umbrella pretrain` of the tower first",
                 "# (model.vision_init=pretrain), then the VLM on it, frozen."]
    else:
        head += ["# several modalities: the project's defaults (the measured recipe,",
                 "# recipe: t1_two_stage, is for T1 records alone)."]

    class Dumper(yaml.SafeDumper):  # sections as blocks, lists on one line
        pass

    Dumper.add_representer(list, lambda d, v: d.represent_sequence(
        "tag:yaml.org,2002:seq", v, flow_style=True))
    text = "\n".join(head) + "\n" + yaml.dump(tree, Dumper=Dumper, sort_keys=False)
    return atomic_write_text(Path(summary.out_dir) / CONFIG_FILE, text), recipe


def _write_records(out_dir: Path, targets: dict[str, Targets], values: dict, units: _Units,
                   w: _Writer, pairs: dict, skipped: Counter):
    """One JSONL per (task, modality) with records; returns (files, counts per split,
    {subject: split} of the subjects that appear in a record)."""
    written, counts, seen = {}, {}, set()
    for name, got in targets.items():
        for modality in sorted(units.files):
            files = units.files[modality]
            if name in _PAIRS:
                rows = _pair_records(name, values[name], modality, files, w,
                                     pairs["per_subject"], pairs["min_gap"], skipped)
            elif name in _WITHIN:
                rows = _within_records(name, values[name], modality, files, w, skipped)
            else:
                rows = _single_records(got.spec, values[name], modality, files, w)
            if not rows:
                continue
            key = f"{name}_{modality}"
            written[key] = atomic_write_jsonl(out_dir / f"{key}.jsonl", rows)
            counts[key] = dict(Counter(r["split"] for r in rows))
            seen.update(s for r in rows
                        for s in r.get("metadata", {}).get("subjects", [r["subject_id"]]))
    return written, counts, {s: w.split[s] for s in sorted(seen)}


def _where(table: Table, images: dict | None, bids_root: Path | None, root: Path,
           matching: dict) -> str:
    """What to check when nothing matched: the id matching and the first subject's paths."""
    first = next(iter(table.ids.values()), "<none>")
    parts = [f"subject column {table.subject_column!r} (first id {first!r}; fix "
             "--subject-column)"]
    parts += [m.describe() for m in matching.values()]
    for modality, pattern in (images or {}).items():
        parts.append(f"{modality} pattern {pattern!r} looked for "
                     f"{example_path(pattern, first, root)} (relative patterns start from the "
                     "image root: the phenotype table's folder unless --image-root / "
                     "image_root= is given)")
    if bids_root is not None:
        parts.append(f"BIDS root {bids_root} (sub-<label>/[ses-*/]anat|func|dwi)")
    return "check " + "; ".join(parts)


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


__all__ = ["MODALITIES", "PrepareSummary", "prepare", "discover_bids", "make_splits",
           "resolve_study", "subject_key", "TASKS"]
