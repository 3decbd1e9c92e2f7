"""Check records files and every image they name; report every problem, not only the first.

    report = validate_config(cfg)        # or validate_records_files(files, data_roots)
    print(report.summary_table())
    print("\\n".join(report.lines()))    # "record X | file Y | message | fix: ..."
    # exit codes belong to the CLI: report.ok

What is checked (``Problem.kind`` in brackets):

* each records file, line by line; a bad line is reported and reading goes on: JSON that does not
  parse [malformed_json], a record :func:`~umbrella.data.records.parse_record` refuses
  [missing_key, unknown_modality, image_count, malformed_record], a file with no record
  [no_records], a records file that is not there [missing_file];
* across records: an id used twice, also across files [duplicate_id]; a subject in two splits
  [subject_in_two_splits]; an image path that resolves (``../``, absolute path, symlinks
  followed) outside its modality's data root, checked only where a root is configured; such a file
  is not read [path_escapes_root]; an answer the task's strict parser cannot read, for known
  classification tasks [unparseable_answer];
* each distinct image file once, in a thread pool, reading every voxel: [missing_file],
  unreadable, truncated or with a broken header [corrupt_file], the wrong number of dimensions
  for its modality (T1: 3D; rsfMRI: 4D or a ``frame_<i>.pt`` folder; dMRI: a 3D map or a 4D DWI)
  [wrong_dims], [zero_size], NaN / Inf voxels [nan_inf], a constant image [constant], an rsfMRI
  run shorter than one window [fmri_too_short], a DWI without bval / bvec [dmri_no_gradients] or
  with a gradient table that does not match its volumes [dmri_bad_gradients], a NIfTI whose
  sform and qform codes are both 0 [no_orientation] (:mod:`umbrella.data.image_checks`);
* across files: one scan (the same file, or the same voxels / bytes) named under two subject ids,
  a leak when they sit in different splits [duplicate_scan]; a regression answer outside the
  task's plausible range, e.g. an age of 300 years [implausible_answer].

Warnings (``report.warnings``; they do not fail validation): the configured geometry keeps less
than 99% of an image's head [head_cropped], voxels longer than 3:1 [extreme_anisotropy], an rsfMRI
run without TR whose study's TR is unknown [fmri_no_tr]. ``report.geometry`` holds the spread of
voxel sizes and fields of view per study and modality. Records files may be UTF-8 (with BOM) or
Windows-1252, with LF or CRLF line endings.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from umbrella.config import MODALITIES, ModalityConfig, UmbrellaConfig
from umbrella.data.image_checks import (
    ImageJob,
    Rules,
    StudyTr,
    check_images,
    default_specs,
    duplicate_scans,
    geometry_spread,
)
from umbrella.data.problems import KINDS, WARNING_KINDS, Problem, split_fix
from umbrella.data.records import Record, decode_text, parse_record
from umbrella.errors import ConfigError, RecordError
from umbrella.task_registry import task_for_record

_RECORD_KINDS = ((r"missing key ", "missing_key"), (r"unknown modality ", "unknown_modality"),
                 (r"\d+ <image> placeholders but \d+ images", "image_count"))  # parse_record's
_RECORD_FIX = {
    "missing_key": "add the key to the record",
    "malformed_record": "write the record in the LLaVA ('conversations') or chat ('messages') "
                        "form; user and assistant alternate and the assistant answers last",
}
_JSON_ERRORS = (ValueError, RecursionError)  # JSONDecodeError, UnicodeDecodeError, int digits


# ----------------------------------------------------------------------------- report types

@dataclass
class ValidationReport:
    n_records: int  # record entries read, including those that failed to parse
    n_files: int  # distinct image files referenced by the records that parsed
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)  # kinds of WARNING_KINDS
    geometry: dict[str, dict] = field(default_factory=dict)  # "study modality" -> spread

    @property
    def ok(self) -> bool:
        return not self.problems

    def counts(self) -> dict[str, int]:
        """{kind: number of problems}, in the order of :data:`KINDS`."""
        found = Counter(p.kind for p in self.problems)
        order = list(KINDS) + sorted(set(found) - set(KINDS))
        return {k: found[k] for k in order if found[k]}

    def summary_table(self) -> str:
        """Fixed-width text: a headline, then one row per problem kind with its count."""
        head = (f"validated {self.n_records} records and {self.n_files} image files: "
                f"{len(self.problems) or 'no'} problem{'' if len(self.problems) == 1 else 's'}")
        counts = self.counts()
        if self.warnings:
            found = Counter(p.kind for p in self.warnings)
            head += "; warnings: " + ", ".join(f"{k} x{n}" for k, n in found.items())
        if not counts:
            return head
        width = max(len("kind"), *map(len, counts))
        rows = [f"{'kind':<{width}}  {'count':>5}  meaning", f"{'-' * width}  {'-' * 5}  -------"]
        rows += [f"{k:<{width}}  {n:>5}  {KINDS.get(k, '')}" for k, n in counts.items()]
        rows.append(f"{'total':<{width}}  {len(self.problems):>5}")
        return "\n".join([head, *rows])

    def lines(self) -> list[str]:
        return [p.describe() for p in self.problems]

    def warning_lines(self) -> list[str]:
        return [f"warning: {p.describe()}" for p in self.warnings]

    def geometry_table(self) -> str:
        """Per study and modality: images, voxel sizes and fields of view (min .. max per axis)."""
        rows = []
        for name, g in self.geometry.items():
            def span(key, g=g):
                lo, hi = g[key]
                return "x".join(f"{a:g}" for a in lo) + " .. " + "x".join(f"{b:g}" for b in hi)
            rows.append(f"{name}: {g['images']} images; voxel mm {span('voxel_mm')}; "
                        f"field of view mm {span('fov_mm')}")
        return "\n".join(rows)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "n_records": self.n_records, "n_files": self.n_files,
                "n_problems": len(self.problems), "counts": self.counts(),
                "problems": [asdict(p) for p in self.problems],
                "warnings": [asdict(p) for p in self.warnings], "geometry": self.geometry}


# ----------------------------------------------------------------------------- rules

def fmri_window_frames(section: ModalityConfig) -> int:
    """Frames one rsfMRI window spans: ``(sequence_length - 1) * stride_within_seq + 1``."""
    bad = [f"dataset.rsfMRI.{k} must be an integer >= 1, got {getattr(section, k)!r}"
           for k in ("sequence_length", "stride_within_seq")
           if not (isinstance(getattr(section, k), int) and getattr(section, k) >= 1)]
    if bad:
        raise ConfigError(bad)
    return (section.sequence_length - 1) * section.stride_within_seq + 1


def _parse_rules(modality_rules: dict | None) -> Rules:
    """``{"rsfMRI": {"min_frames": n}}`` (the only rule so far); defaults from ModalityConfig."""
    rules = modality_rules or {}
    problems = [f"modality_rules: no rules exist for {m!r}; known: rsfMRI.min_frames"
                for m in rules if m != "rsfMRI"]
    fmri = rules.get("rsfMRI", {})
    if not isinstance(fmri, dict):
        problems.append(f"modality_rules.rsfMRI must be a mapping, got {fmri!r}")
        fmri = {}
    problems += [f"modality_rules.rsfMRI.{k} is unknown; known: min_frames"
                 for k in fmri if k != "min_frames"]
    frames = fmri.get("min_frames", fmri_window_frames(ModalityConfig()))
    if not (isinstance(frames, int) and not isinstance(frames, bool) and frames >= 1):
        problems.append(f"modality_rules.rsfMRI.min_frames must be an integer >= 1, got {frames!r}")
    if problems:
        raise ConfigError(problems, source="modality_rules")
    return Rules(min_fmri_frames=frames)


# ----------------------------------------------------------------------------- records files

@dataclass
class _Entry:
    """One record entry of a records file: its JSON value, or the problem that stopped parsing."""

    source: Path
    line: int | None  # JSONL line; None for an item of a .json list
    obj: Any = None
    problem: Problem | None = None
    item: int | None = None  # index in a .json list

    @property
    def where(self) -> str:
        if self.line is not None:
            return f"{self.source} line {self.line}"
        return f"{self.source} item {self.item}" if self.item is not None else str(self.source)

    def located(self, message: str) -> str:
        """A .json list item has no line: its index goes into the message instead."""
        return f"item {self.item}: {message}" if self.item is not None else message


def _loads(data: bytes) -> Any:
    return json.loads(data.decode("utf-8"))


def _json_reason(exc: Exception) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at column {exc.colno}"
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 or Windows-1252 (byte {exc.object[exc.start]:#04x} at byte {exc.start + 1})"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc)


def _guess_id(data: bytes) -> str | None:
    """The record id of a line that is not valid JSON, when ``"id": ...`` can still be read."""
    found = re.search(rb'"id"\s*:\s*(?:"((?:[^"\\]|\\.)*)"|(-?\d{1,40})\b)', data)
    if found is None:
        return None
    text = found.group(1) if found.group(1) is not None else found.group(2)
    return text.decode("utf-8", errors="replace")


def _jsonl_entries(path: Path, raw: bytes) -> list[_Entry]:
    entries = []
    for n, chunk in enumerate(raw.split(b"\n"), start=1):
        if not chunk.strip():
            continue
        try:
            entries.append(_Entry(path, n, obj=_loads(chunk)))
        except _JSON_ERRORS as exc:
            problem = Problem("malformed_json", _guess_id(chunk), str(path),
                              f"malformed JSON: {_json_reason(exc)}",
                              "repair or remove this line (one JSON object per line)", line=n)
            entries.append(_Entry(path, n, problem=problem))
    return entries


def _json_entries(path: Path, raw: bytes) -> tuple[list[_Entry], list[Problem]]:
    try:
        data = _loads(raw)
    except _JSON_ERRORS as exc:
        return [], [Problem("malformed_json", None, str(path), f"malformed JSON: "
                            f"{_json_reason(exc)}; none of its records can be read",
                            "repair the file: a .json records file holds one list [...] of records",
                            line=getattr(exc, "lineno", None))]
    if not isinstance(data, list):
        return [], [Problem("malformed_json", None, str(path), "a .json records file must hold "
                            f"a list of records, got {type(data).__name__}",
                            "wrap the records in [...] or use .jsonl, one record per line")]
    return [_Entry(path, None, obj=obj, item=i) for i, obj in enumerate(data)], []


def _read_entries(path: Path) -> tuple[list[_Entry], list[Problem]]:
    """Every record entry of a .jsonl (line by line) or .json (one list) file + file problems."""
    if not path.is_file():
        what = "does not exist" if not path.exists() else "is not a regular file"
        return [], [Problem("missing_file", None, str(path), f"records file {what}",
                            "check the path (dataset.<modality>.records in the config)")]
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return [], [Problem("corrupt_file", None, str(path), f"cannot read records file ({exc})",
                            "check the file's permissions")]
    try:  # UTF-8 with or without BOM, or Windows-1252: re-encoded, the checks read UTF-8
        raw = decode_text(raw).encode("utf-8")
    except UnicodeDecodeError:
        pass  # reported line by line below
    entries, problems = (_jsonl_entries(path, raw), []) if path.suffix == ".jsonl" \
        else _json_entries(path, raw)
    if not entries and not problems:
        problems.append(Problem("no_records", None, str(path), "records file holds no records",
                                "write records into it (umbrella prepare) or drop it from "
                                "dataset.<modality>.records"))
    return entries, problems


def _record_error_problem(exc: RecordError, entry: _Entry) -> Problem:
    where = [f"record {exc.record_id!r}"] if exc.record_id is not None else []
    if exc.source is not None:
        where.append(f"in {exc.source}" + (f" line {exc.line}" if exc.line is not None else ""))
    text = str(exc).removeprefix(" ".join(where) + ": " if where else "")
    message, fix = split_fix(text)
    kind = next((k for pattern, k in _RECORD_KINDS if re.match(pattern, message)),
                "malformed_record")
    return Problem(kind, exc.record_id, str(entry.source), entry.located(message),
                   fix or _RECORD_FIX.get(kind, _RECORD_FIX["malformed_record"]), line=entry.line)


def _raw_images(obj: dict) -> list[dict]:
    """The image entries of a record that parsed, in the order parse_record reads them."""
    if "conversations" in obj:
        raw = obj.get("images", [])
        return [raw] if isinstance(raw, dict) else list(raw)
    return [part for msg in obj["messages"] if isinstance(msg["content"], list)
            for part in msg["content"] if isinstance(part, dict) and part.get("type") == "image"]


def _escape_problem(rec: Record, image, roots: dict[str, Path]) -> Problem | None:
    root = roots.get(image.modality)
    if root is None:
        return None
    try:
        target, base = image.path.resolve(), root.resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte: the file check says
        return None
    if target.is_relative_to(base):
        return None
    return Problem("path_escapes_root", rec.id, str(image.path),
                   f"the {image.modality} image resolves to {target}, outside the data root "
                   f"{base}; it was not read",
                   f"keep images inside dataset.{image.modality}.data_root: drop '../' from the "
                   "path, make it relative to the root, or move the file (a symlink must point "
                   "inside the root too)")


# ----------------------------------------------------------------------------- across records


class _Collector:
    """Walks record entries in order: parses, checks across records and gathers image jobs."""

    def __init__(self, roots: dict[str, Path]):
        self.roots = roots
        self.problems: list[tuple[int, Problem]] = []  # (entry order, problem)
        self.order = 0
        self.ids: dict[str, str] = {}  # id -> where first seen (file and line / item)
        self.subjects: dict[str, tuple[str, str]] = {}  # subject -> (split, record id)
        self.jobs: dict[tuple[str, Path], ImageJob] = {}
        self.referenced: set[tuple[str, Path]] = set()

    def report(self, problem: Problem) -> None:
        self.problems.append((self.order, problem))

    def report_file(self, problem: Problem) -> None:
        """A problem of a whole records file: placed after the records read before it."""
        self.order += 1
        self.report(problem)

    def add(self, entry: _Entry) -> None:
        self.order += 1
        if entry.problem is not None:
            self.report(entry.problem)
            return
        try:
            rec = parse_record(entry.obj, source=str(entry.source), line=entry.line,
                               data_roots=self.roots)
        except RecordError as exc:
            self.report(_record_error_problem(exc, entry))
            return
        for problem in self._across(rec, entry):
            self.report(problem)
        subjects = _image_subjects(rec)
        for i, (image, raw) in enumerate(zip(rec.images, _raw_images(entry.obj), strict=True)):
            self.referenced.add((image.modality, image.path))
            escape = _escape_problem(rec, image, self.roots)
            if escape is not None:
                self.report(escape)
            else:
                self._add_job(rec, image, raw)
                if subjects[i] is not None:
                    self.jobs[(image.modality, image.path)].refs.append(
                        (subjects[i], rec.split, rec.id))

    def _across(self, rec: Record, entry: _Entry) -> list[Problem]:
        def problem(kind: str, message: str, fix: str) -> Problem:
            return Problem(kind, rec.id, str(entry.source), entry.located(message), fix,
                           line=entry.line)

        out = []
        if rec.id in self.ids:
            out.append(problem("duplicate_id", f"id already used in {self.ids[rec.id]}",
                               "make record ids unique across all records files"))
        else:
            self.ids[rec.id] = entry.where
        split, first_id = self.subjects.setdefault(rec.subject_id, (rec.split, rec.id))
        if split != rec.split:
            out.append(problem("subject_in_two_splits",
                               f"subject {rec.subject_id!r} is in split {rec.split!r} here and in "
                               f"{split!r} in record {first_id!r}",
                               "assign each subject to exactly one split (splits are by subject)"))
        task = None
        try:  # the spec the record was written with (metadata.task_spec), else the built-in
            task = task_for_record(rec.task, rec.metadata if isinstance(rec.metadata, dict) else {})
            unparseable = (task is not None and task.kind == "classification"
                           and task.parse(rec.answer) is None)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:  # a bad task_spec
            out.append(problem("malformed_record", f"metadata.task_spec cannot be used "
                               f"({type(exc).__name__}: {exc})", "rewrite the record with "
                               "`umbrella prepare`, or remove metadata.task_spec"))
            unparseable = False
        if task is not None and task.kind == "regression" and task.parse(rec.answer) is None:
            out.append(_number_problem(problem, rec, task))
        if unparseable:
            out.append(problem("unparseable_answer",
                               f"answer {rec.answer!r} names none or several of the {rec.task} "
                               f"options {', '.join(task.options)}",
                               f"make the last assistant turn name exactly one of: "
                               f"{', '.join(task.options)}"))
        return out

    def _add_job(self, rec: Record, image, raw: dict) -> None:
        key = (image.modality, image.path)
        if key in self.jobs:
            self.jobs[key].n_refs += 1
            return
        root = self.roots.get(image.modality)

        def side(name: str) -> Path | None:  # bval / bvec named on the image entry
            if raw.get(name) is None:
                return None
            path = Path(str(raw[name]))
            return root / path if root is not None and not path.is_absolute() else path

        self.jobs[key] = ImageJob(self.order, image.modality, image.path, rec.id,
                                   side("bval"), side("bvec"), study=rec.study)


def _image_subjects(rec: Record) -> list[str | None]:
    """The subject of each image: the record's for one image, ``metadata.subjects`` for a
    record comparing subjects; None (not known) for other records of several images."""
    meta = rec.metadata if isinstance(rec.metadata, dict) else {}
    named = meta.get("subjects")
    if isinstance(named, list) and len(named) == len(rec.images):
        return [str(s) for s in named]
    return [rec.subject_id] if len(rec.images) == 1 else [None] * len(rec.images)


def _number_problem(problem, rec: Record, task) -> Problem:
    """A regression answer that did not parse: a number outside the range, or no number."""
    unbounded = replace(task, low=None, high=None)
    value = unbounded.parse(rec.answer)
    if value is not None:
        return problem("implausible_answer", f"answer {rec.answer!r} ({value:g} {task.unit}) is "
                       f"outside the plausible range [{task.low:g}, {task.high:g}] of "
                       f"{rec.task}", "check the phenotype value and its unit (e.g. months "
                       "vs years: umbrella prepare --age-unit), or drop the record")
    return problem("unparseable_answer", f"answer {rec.answer!r} holds no single number for "
                   f"{rec.task}", f"make the last assistant turn one number, e.g. "
                   f"{task.format_answer((task.low or 0) + 1)!r}")


# ----------------------------------------------------------------------------- entry points

def validate_records_files(records_files: list[Path], data_roots: dict[str, Path], *,
                           modality_rules: dict | None = None, workers: int = 2,
                           progress: bool = True, specs: dict | None = None,
                           studies: dict | None = None) -> ValidationReport:
    """Check every record of every file and every image they name; see the module docstring.

    ``data_roots``: {modality: folder} that relative image paths resolve against (and that image
    paths must stay inside). ``modality_rules``: ``{"rsfMRI": {"min_frames": n}}``; the default
    is one window of the default ModalityConfig. Images are checked by ``workers`` threads.
    Problems come in the order of the records that raise them. ``specs``: {modality: VolumeSpec}
    whose cropping is measured per image (default: the default config's geometry);
    ``studies``: the config's ``studies`` overrides (for the rsfMRI TR).
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be an integer >= 1, got {workers!r}")
    unknown = sorted(set(data_roots or {}) - set(MODALITIES))
    if unknown:
        raise ConfigError(f"data_roots has unknown modalities {unknown}; "
                          f"use {', '.join(MODALITIES)}")
    rules = replace(_parse_rules(modality_rules), specs=default_specs(specs),
                    study_tr=StudyTr(studies or {}))
    collector = _Collector({m: Path(p) for m, p in (data_roots or {}).items()})
    n_records, seen = 0, set()
    for path in map(Path, records_files):
        if path.resolve() in seen:
            continue
        seen.add(path.resolve())
        entries, file_problems = _read_entries(path)
        for problem in file_problems:
            collector.report_file(problem)
        for entry in entries:
            collector.add(entry)
        n_records += len(entries)
    jobs = list(collector.jobs.values())
    found = collector.problems
    for job, problems in zip(jobs, check_images(jobs, rules, workers, progress), strict=True):
        found += [(job.order, p) for p in problems]
    found += duplicate_scans(jobs)
    found.sort(key=lambda item: item[0])  # stable: record problems before file problems
    problems = [p for _, p in found if p.kind not in WARNING_KINDS]
    warnings = [p for _, p in found if p.kind in WARNING_KINDS]
    return ValidationReport(n_records, len(collector.referenced), problems, warnings,
                            geometry_spread(jobs))


def validate_config(cfg: UmbrellaConfig, **kw) -> ValidationReport:
    """Validate the records files and data roots of every enabled ``dataset.<modality>`` section.

    rsfMRI runs must hold one window: ``(sequence_length - 1) * stride_within_seq + 1`` frames
    of ``dataset.rsfMRI``. ``kw`` goes to :func:`validate_records_files` (workers, progress,
    modality_rules to override the config's). ``dataset.tasks`` does not filter: every record of
    every file is checked.
    """
    enabled = cfg.dataset.enabled()
    if not enabled:
        raise ConfigError("no modality has records: set dataset.T1.records (or rsfMRI/dMRI) to "
                          "one or more JSON/JSONL files")
    files = [Path(f) for section in enabled.values() for f in section.records]
    roots = {m: Path(s.data_root) for m, s in enabled.items() if s.data_root}
    rules = {"rsfMRI": {"min_frames": fmri_window_frames(cfg.dataset.rsfMRI)}}
    for modality, given in (kw.pop("modality_rules", None) or {}).items():
        rules[modality] = {**rules.get(modality, {}), **given}
    from umbrella.data.catalog import volume_spec

    specs = {m: volume_spec(s) for m, s in enabled.items() if m != "rsfMRI"}
    return validate_records_files(files, roots, modality_rules=rules, specs=specs,
                                  studies=dict(cfg.studies), **kw)
