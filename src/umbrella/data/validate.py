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
  with a gradient table that does not match its volumes [dmri_bad_gradients].
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.spatialimages import SpatialImage
from tqdm.auto import tqdm

from umbrella.config import MODALITIES, ModalityConfig, UmbrellaConfig
from umbrella.data.records import Record, decode_text, parse_record
from umbrella.data.volumes import MAX_VOXELS, VolumeSpec, is_compressed, kept_fraction, read_nifti
from umbrella.errors import ConfigError, RecordError, VolumeError
from umbrella.tasks.registry import task_for_record

KINDS = {  # kind -> what it means; the order of the summary table
    "malformed_json": "a line (or a .json file) is not valid JSON",
    "malformed_record": "a record's structure is wrong (turns, roles, images)",
    "missing_key": "a record lacks a required key",
    "unknown_modality": "an image names a modality other than T1, rsfMRI, dMRI",
    "image_count": "<image> placeholders and images differ in number",
    "no_records": "a records file holds no record",
    "duplicate_id": "a record id is used more than once",
    "subject_in_two_splits": "one subject appears in two splits",
    "unparseable_answer": "the answer names none or several of the task's options",
    "path_escapes_root": "an image path resolves outside its data root",
    "missing_file": "a file or folder does not exist",
    "corrupt_file": "a file cannot be read (corrupt, truncated, broken header)",
    "wrong_dims": "an image has the wrong number of dimensions for its modality",
    "zero_size": "an image has a zero-size dimension",
    "nan_inf": "an image holds NaN or Inf voxels",
    "constant": "an image is constant (blank)",
    "fmri_too_short": "an rsfMRI run has fewer frames than one window",
    "dmri_no_gradients": "a 4D diffusion series has no bval / bvec",
    "dmri_bad_gradients": "bval / bvec cannot be read or do not match the series",
    "implausible_answer": "a numeric answer lies outside the task's plausible range",
    "duplicate_scan": "one scan (same file or same voxels) is named under two subject ids",
    "no_orientation": "a NIfTI has sform and qform codes 0: no usable orientation",
}
WARNING_KINDS = {  # reported, but do not fail validation
    "fmri_no_tr": "an rsfMRI run has no TR in its header and its study's TR is unknown",
    "head_cropped": "the configured geometry cuts off part of the head",
    "extreme_anisotropy": "the voxels are much longer along one axis than another",
}
MIN_KEPT = 0.99  # warn when the spatial fitting keeps less of the head than this
MAX_FOV_MM = 500.0  # a wider image is not a head: its header's voxel sizes are wrong
MAX_ANISOTROPY = 3.0  # warn when the longest voxel side exceeds this many times the shortest

_RECORD_KINDS = ((r"missing key ", "missing_key"), (r"unknown modality ", "unknown_modality"),
                 (r"\d+ <image> placeholders but \d+ images", "image_count"))  # parse_record's
_RECORD_FIX = {
    "missing_key": "add the key to the record",
    "malformed_record": "write the record in the LLaVA ('conversations') or chat ('messages') "
                        "form; user and assistant alternate and the assistant answers last",
}
_VOLUME_KINDS = ((r"file not found", "missing_file"), (r"not a regular file", "missing_file"),
                 (r"image has a zero-size dimension", "zero_size"),
                 (r"expected a 3D volume", "wrong_dims"),
                 (r"\d+ of \d+ voxels are NaN or Inf", "nan_inf"),
                 (r"volume is constant", "constant"))  # read_nifti's messages, by how they start
_JSON_ERRORS = (ValueError, RecursionError)  # JSONDecodeError, UnicodeDecodeError, int digits
_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error)
_CHUNK_VOXELS = 2**25  # 4D series are read this many voxels at a time (128 MiB of float32)
_FRAME_PATTERN = re.compile(r"^frame_(\d+)\.pt$")
_CORRUPT_FIX = ("re-download or re-convert the file (e.g. with dcm2niix); "
                "`gzip -t FILE` checks a .nii.gz")
_NAN_FIX = ("re-run the step that produced the image, or replace non-finite voxels "
            "(e.g. numpy.nan_to_num)")
_BLANK_FIX = "the image is blank; check its conversion or drop the record"
_DIMS = {"T1": ("a 3D volume", "select one 3D volume (nibabel `img.slicer[..., 0]`, `fslroi`), or "
                "list a 4D series under rsfMRI / dMRI"),
         "rsfMRI": ("a 4D series (x, y, z, time) or a frame_<i>.pt folder",
                    "point the record at the whole 4D BOLD run, not one volume or a derived map"),
         "dMRI": ("a 3D scalar map (FA, MD, ...) or a 4D DWI series",
                  "point the record at the DWI series (with bval / bvec) or at a 3D map")}


# ----------------------------------------------------------------------------- report types

@dataclass(frozen=True)
class Problem:
    kind: str  # one of KINDS
    record_id: str | None  # None where no record can be named (a whole file, an id-less line)
    file: str | None  # the file to fix: the records file for record problems, else the image
    message: str  # what is wrong
    fix: str  # how to fix it
    line: int | None = None  # line of a JSONL records file

    def describe(self) -> str:
        """One line: ``record X | file Y [line N] | message | fix: ...``."""
        rid = "-" if self.record_id is None else self.record_id
        where = self.file or "-"
        if self.line is not None:
            where += f" line {self.line}"
        return f"record {rid} | file {where} | {self.message} | fix: {self.fix}"


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

@dataclass(frozen=True)
class _Rules:
    min_fmri_frames: int
    specs: dict = field(default_factory=dict)  # modality -> VolumeSpec / FmriSpec of the config
    study_tr: dict = field(default_factory=dict)  # study -> TR in s (None: unknown)


def fmri_window_frames(section: ModalityConfig) -> int:
    """Frames one rsfMRI window spans: ``(sequence_length - 1) * stride_within_seq + 1``."""
    bad = [f"dataset.rsfMRI.{k} must be an integer >= 1, got {getattr(section, k)!r}"
           for k in ("sequence_length", "stride_within_seq")
           if not (isinstance(getattr(section, k), int) and getattr(section, k) >= 1)]
    if bad:
        raise ConfigError(bad)
    return (section.sequence_length - 1) * section.stride_within_seq + 1


def _parse_rules(modality_rules: dict | None) -> _Rules:
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
    return _Rules(min_fmri_frames=frames)


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


def _split_fix(text: str) -> tuple[str, str]:
    """'message (fix: how)' -> ('message', 'how'); no fix -> (text, '')."""
    if text.endswith(")") and " (fix: " in text:
        head, _, tail = text.rpartition(" (fix: ")
        return head, tail[:-1]
    return text, ""


def _record_error_problem(exc: RecordError, entry: _Entry) -> Problem:
    where = [f"record {exc.record_id!r}"] if exc.record_id is not None else []
    if exc.source is not None:
        where.append(f"in {exc.source}" + (f" line {exc.line}" if exc.line is not None else ""))
    text = str(exc).removeprefix(" ".join(where) + ": " if where else "")
    message, fix = _split_fix(text)
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

@dataclass
class _ImageJob:
    order: int  # position of the first record naming the file
    modality: str
    path: Path
    record_id: str
    bval: Path | None = None
    bvec: Path | None = None
    n_refs: int = 1
    study: str = ""
    refs: list = field(default_factory=list)  # (subject, split, record id) naming this file
    info: dict = field(default_factory=dict)  # filled by the checks: shape, voxel_mm, digest


class _Collector:
    """Walks record entries in order: parses, checks across records and gathers image jobs."""

    def __init__(self, roots: dict[str, Path]):
        self.roots = roots
        self.problems: list[tuple[int, Problem]] = []  # (entry order, problem)
        self.order = 0
        self.ids: dict[str, str] = {}  # id -> where first seen (file and line / item)
        self.subjects: dict[str, tuple[str, str]] = {}  # subject -> (split, record id)
        self.jobs: dict[tuple[str, Path], _ImageJob] = {}
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

        self.jobs[key] = _ImageJob(self.order, image.modality, image.path, rec.id,
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


# ----------------------------------------------------------------------------- image files

def _problem(job: _ImageJob, kind: str, message: str, fix: str,
             file: Path | None = None) -> Problem:
    return Problem(kind, job.record_id, str(file or job.path), message, fix)


def _header_problem(job: _ImageJob, img: SpatialImage) -> Problem | None:
    """Header facts that would make reading fail badly: checked before any voxel is read."""
    shape, dtype = tuple(int(n) for n in img.shape), img.get_data_dtype()
    if any(n < 0 for n in shape):
        return _problem(job, "corrupt_file", f"header has a negative dimension, shape {shape}",
                        _CORRUPT_FIX)
    if 0 in shape:
        return _problem(job, "zero_size", f"image has a zero-size dimension, shape {shape}",
                        "the file holds no voxels; re-convert it or drop the record")
    if dtype.kind not in "biuf":
        return _problem(job, "corrupt_file", f"voxel type {dtype} is not one real number per voxel "
                        "(RGB or complex)", "convert it to a scalar integer or float image")
    if math.prod(shape[:3]) > MAX_VOXELS:
        return _problem(job, "corrupt_file", f"header declares {shape[:3]} voxels per volume, more "
                        f"than {MAX_VOXELS}: the header is surely corrupt", _CORRUPT_FIX)
    holder = img.file_map.get("image")
    offset = getattr(img.dataobj, "offset", None)
    if holder is not None and holder.filename and offset is not None \
            and not is_compressed(holder.filename):
        need = int(offset) + math.prod(shape) * dtype.itemsize
        have = Path(holder.filename).stat().st_size
        if need > have:
            return _problem(job, "corrupt_file", f"truncated: the header declares {need} bytes "
                            f"(voxels from offset {int(offset)}) but the file has {have}",
                            _CORRUPT_FIX)
    if img.affine is not None and np.isnan(nib.orientations.io_orientation(img.affine)).any():
        return _problem(job, "corrupt_file", "the voxel-to-world affine is degenerate (two axes "
                        "collapse), so the image cannot be reoriented to RAS+",
                        "repair the header's qform / sform (e.g. `fslorient`) or re-convert")
    return None


def _open_image(job: _ImageJob) -> tuple[SpatialImage | None, Problem | None]:
    if not job.path.is_file():
        what = "file not found" if not job.path.exists() else "not a regular file"
        return None, _problem(job, "missing_file", f"{job.modality} image: {what}",
                              f"check the image path in the record and "
                              f"dataset.{job.modality}.data_root")
    try:
        img = nib.load(job.path, keep_file_open=True)  # one handle: 4D chunks read in one pass
    except Exception as exc:  # nibabel raises many types for garbage; all mean "not readable"
        return None, _problem(job, "corrupt_file", f"cannot read as NIfTI / MGH volume "
                              f"({type(exc).__name__}: {exc})", _CORRUPT_FIX)
    if not isinstance(img, SpatialImage):
        return None, _problem(job, "corrupt_file", f"{type(img).__name__} is not a volumetric "
                              "image", "point the record at a NIfTI image")
    try:
        return img, _header_problem(job, img)
    except (np.linalg.LinAlgError, ValueError) as exc:
        return None, _problem(job, "corrupt_file", f"unusable header ({type(exc).__name__}: "
                              f"{exc})", _CORRUPT_FIX)


def _dims_problem(job: _ImageJob, shape: tuple) -> Problem:
    want, fix = _DIMS[job.modality]
    return _problem(job, "wrong_dims", f"{job.modality} image must be {want}, got shape "
                    f"{tuple(shape)}", fix)


def _core_shape(shape: tuple) -> tuple:
    """The shape without trailing singleton dims beyond the third: (8, 8, 8, 1) -> (8, 8, 8)."""
    shape = tuple(shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _read_3d(job: _ImageJob, rules: _Rules) -> list[Problem]:
    """Read every voxel with read_nifti; its VolumeError becomes a problem of the matching kind.
    A volume that reads is hashed (duplicate scans) and its cropping measured."""
    try:
        data, affine = read_nifti(job.path)
    except VolumeError as exc:
        message, fix = _split_fix(str(exc).removeprefix(f"file {job.path}: "))
        kind = next((k for pattern, k in _VOLUME_KINDS if re.match(pattern, message)),
                    "corrupt_file")
        return [_problem(job, kind, message, fix or _CORRUPT_FIX)]
    job.info["digest"] = hashlib.blake2b(np.ascontiguousarray(data).tobytes(),
                                         digest_size=16).hexdigest()
    return _crop_warning(job, data, affine, rules)


def _crop_warning(job: _ImageJob, data, affine, rules: _Rules) -> list[Problem]:
    """head_cropped when the configured spatial fitting keeps less than MIN_KEPT of the head."""
    spec = rules.specs.get(job.modality)
    if spec is None or not isinstance(spec, VolumeSpec):
        return []
    fov = job.info.get("fov_mm", [0.0])
    if max(fov) > MAX_FOV_MM:
        return [_problem(job, "corrupt_file", f"the header's voxel sizes give a field of view of "
                         f"{'x'.join(f'{v:g}' for v in fov)} mm, more than {MAX_FOV_MM:g} mm: "
                         "not a head", "repair the voxel sizes (pixdim) in the header, or "
                         "re-convert the file")]
    try:
        kept = kept_fraction(data, affine, spec)
    except ValueError as exc:
        return [_problem(job, "corrupt_file", f"cannot be resampled for the model input ({exc})",
                         "check the header's voxel sizes and dataset.<modality>.voxel_size / "
                         "field_of_view")]
    job.info["kept"] = round(kept, 4)
    if kept >= MIN_KEPT:
        return []
    spacing = spec.target_spacing()
    where = (f"{'x'.join(f'{v:g}' for v in spacing)} mm voxels" if spacing else
             "the file's own spacing")
    cover = [n * (spacing[i] if spacing else job.info["voxel_mm"][i])
             for i, n in enumerate(spec.image_size)]
    return [_problem(job, "head_cropped", f"the {job.modality} input ({spec.image_size[0]}x"
                     f"{spec.image_size[1]}x{spec.image_size[2]} at {where}, "
                     f"{'x'.join(f'{c:.0f}' for c in cover)} mm) keeps {100 * kept:.1f}% of "
                     f"the head (image {'x'.join(f'{c:.0f}' for c in job.info['fov_mm'])} mm)",
                     f"set dataset.{job.modality}.field_of_view (default 201.6 mm) and leave "
                     f"dataset.{job.modality}.voxel_size unset, or raise "
                     f"dataset.{job.modality}.image_size")]


def _header_facts(job: _ImageJob, img: SpatialImage, rules: _Rules) -> list[Problem]:
    """Geometry of the file (for the per-study spread) and the header faults that do not stop
    reading: no orientation, extreme anisotropy, an rsfMRI run without TR."""
    shape, affine = tuple(int(n) for n in img.shape), np.asarray(img.affine, dtype=np.float64)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    order = [int(a) for a in nib.orientations.io_orientation(affine)[:, 0]]
    voxel, size = [0.0] * 3, [0] * 3
    for i, axis in enumerate(order):  # in RAS+ axis order, as the reader returns the data
        voxel[axis], size[axis] = float(spacing[i]), shape[i]
    job.info.update(voxel_mm=[round(v, 3) for v in voxel],
                    fov_mm=[round(v * n, 1) for v, n in zip(voxel, size, strict=True)])
    out = []
    header = img.header
    if "sform_code" in header and int(header["sform_code"]) == 0 \
            and int(header["qform_code"]) == 0:
        out.append(_problem(job, "no_orientation", "sform_code and qform_code are both 0: the "
                            "header holds no orientation, so left/right and the axes are "
                            "guessed", "re-convert from DICOM (dcm2niix writes both), or set "
                            "the codes once the affine is known good (`fslorient "
                            "-setsformcode 1`, nibabel `img.set_sform(affine, code=1)`)"))
    if min(voxel) > 0 and max(voxel) / min(voxel) > MAX_ANISOTROPY:
        out.append(_problem(job, "extreme_anisotropy", f"voxels are {'x'.join(f'{v:g}' for v in voxel)} "
                            f"mm ({max(voxel) / min(voxel):.1f}:1): thick slices blur the "
                            "input along one axis", "use an isotropic (e.g. 3D) acquisition for "
                            "this record, or drop it; resampling cannot restore the detail"))
    if job.modality == "rsfMRI" and len(shape) >= 4:
        tr = float(header.get_zooms()[3]) if len(header.get_zooms()) > 3 else 0.0
        out += _tr_problem(job, tr, rules)
    return out


def _tr_problem(job: _ImageJob, tr: float, rules: _Rules) -> list[Problem]:
    if math.isfinite(tr) and tr > 0:
        return []
    if rules.study_tr.get(job.study) is not None:
        return []
    name = job.study or "<STUDY>"
    source = "a frame folder has no header" if math.isnan(tr) else f"header pixdim[4] is {tr:g}"
    study = job.study or "(none named in the record)"
    return [_problem(job, "fmri_no_tr", f"the run has no TR ({source}) and study {study}'s TR "
                     "is unknown, so its windows have no known duration",
                     f"set studies.{name}.tr (seconds) in the config, or write the TR into "
                     "the header (dcm2niix does)")]


def _value_problems(job: _ImageJob, n_bad: int, total: int, lo: float, hi: float,
                    what: str = "series", file: Path | None = None) -> list[Problem]:
    if n_bad:
        return [_problem(job, "nan_inf", f"{n_bad} of {total} voxels are NaN or Inf", _NAN_FIX,
                         file)]
    if lo == hi:
        return [_problem(job, "constant", f"{what} is constant (every voxel is {lo:g})",
                         _BLANK_FIX, file)]
    return []


def _scan_4d(job: _ImageJob, img: SpatialImage) -> list[Problem]:
    """Read a 4D series a chunk of frames at a time; count non-finite voxels, track min / max."""
    shape = tuple(img.shape)
    step = max(1, _CHUNK_VOXELS // math.prod(shape[:3]))
    n_bad, lo, hi = 0, math.inf, -math.inf
    try:
        for start in range(0, shape[3], step):
            block = np.asarray(img.dataobj[:, :, :, start:start + step], dtype=np.float32)
            n_bad += block.size - int(np.count_nonzero(np.isfinite(block)))
            if not n_bad:
                lo, hi = min(lo, float(block.min())), max(hi, float(block.max()))
    except _READ_ERRORS as exc:
        return [_problem(job, "corrupt_file", f"cannot read voxel data ({type(exc).__name__}: "
                         f"{exc})", _CORRUPT_FIX)]
    return _value_problems(job, n_bad, math.prod(shape), lo, hi)


def _nifti_stem(path: Path) -> str:
    for suffix in (".nii.gz", ".nii"):
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def _read_table(path: Path) -> np.ndarray:
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError("the file is empty")
    return np.loadtxt(io.StringIO(text), ndmin=2, dtype=np.float64)


def _gradient_problems(job: _ImageJob, n_volumes: int) -> list[Problem]:
    """bval / bvec: keys on the image entry, else ``<stem>.bval`` / ``bvals`` beside the image."""
    stem, found, missing = _nifti_stem(job.path), {}, []
    for name, given in (("bval", job.bval), ("bvec", job.bvec)):
        candidates = [given] if given is not None else [
            job.path.with_name(f"{stem}.{name}"), job.path.with_name(f"{name}s")]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            missing.append(" or ".join(str(c) for c in candidates))
        found[name] = hit
    if missing:
        return [_problem(job, "dmri_no_gradients", f"4D diffusion series without gradients: "
                         f"{'; '.join(missing)} not found",
                         f"put {stem}.bval and {stem}.bvec next to the image (as dcm2niix writes "
                         "them), or name them with 'bval' / 'bvec' keys on the image entry")]
    try:
        bvals, bvecs = _read_table(found["bval"]).ravel(), _read_table(found["bvec"])
    except (OSError, ValueError) as exc:
        return [_problem(job, "dmri_bad_gradients", f"cannot read the gradient table ({exc})",
                         "bval: one row of N b-values; bvec: 3 rows of N vectors (FSL format)",
                         found["bval"])]
    if bvals.size != n_volumes or bvecs.shape not in ((3, n_volumes), (n_volumes, 3)):
        return [_problem(job, "dmri_bad_gradients", f"the series has {n_volumes} volumes but "
                         f"{found['bval'].name} holds {bvals.size} b-values and "
                         f"{found['bvec'].name} a {bvecs.shape[0]}x{bvecs.shape[1]} table",
                         "use the bval / bvec written with this image (e.g. by dcm2niix)",
                         found["bval"])]
    if not (np.isfinite(bvals).all() and np.isfinite(bvecs).all()):
        return [_problem(job, "dmri_bad_gradients", "the gradient table holds NaN or Inf",
                         "use the bval / bvec written with this image", found["bval"])]
    return []


def _frame_files(job: _ImageJob) -> tuple[list[Path], Problem | None]:
    frames = {int(m.group(1)): p for p in job.path.iterdir()
              if (m := _FRAME_PATTERN.match(p.name))}
    fix = "a frame folder holds frame_0.pt, frame_1.pt, ... (one 3D tensor each)"
    if not frames:
        return [], _problem(job, "missing_file", "rsfMRI folder holds no frame_<i>.pt files", fix)
    gaps = sorted(set(range(max(frames) + 1)) - set(frames))
    if gaps:
        return [], _problem(job, "missing_file", f"frames are not contiguous: {len(gaps)} "
                            f"missing, first frame_{gaps[0]}.pt", fix)
    return [frames[i] for i in range(len(frames))], None


def _check_frame_folder(job: _ImageJob, rules: _Rules) -> list[Problem]:
    """A SwiFT-style rsfMRI folder: contiguous frame_<i>.pt 3D tensors of one shape."""
    import torch

    files, problem = _frame_files(job)
    if problem is not None:
        return [problem]
    out = [_too_short(job, len(files), rules)] if len(files) < rules.min_fmri_frames else []
    shape, n_bad, lo, hi = None, 0, math.inf, -math.inf
    for file in files:
        try:
            frame = torch.load(file, weights_only=True, map_location="cpu")
        except Exception as exc:  # torch.load raises many types for a bad file
            return out + [_problem(job, "corrupt_file", f"cannot read with torch.load("
                                   f"weights_only=True) ({type(exc).__name__})",
                                   "re-save it as a plain tensor with torch.save", file)]
        if not isinstance(frame, torch.Tensor) or frame.ndim != 3 or 0 in frame.shape:
            got = tuple(frame.shape) if isinstance(frame, torch.Tensor) else type(frame).__name__
            return out + [_problem(job, "wrong_dims", f"a frame must be a non-empty 3D tensor, "
                                   f"got {got}", "each frame file holds one (X, Y, Z) tensor",
                                   file)]
        if shape is not None and tuple(frame.shape) != shape:
            return out + [_problem(job, "wrong_dims", f"frame has shape {tuple(frame.shape)}, "
                                   f"frame_0.pt has {shape}", "re-export the run on one grid",
                                   file)]
        shape, data = tuple(frame.shape), frame.detach().to(torch.float32).numpy()
        n_bad += data.size - int(np.count_nonzero(np.isfinite(data)))
        if not n_bad:
            lo, hi = min(lo, float(data.min())), max(hi, float(data.max()))
    return out + _value_problems(job, n_bad, math.prod(shape) * len(files), lo, hi, "run")


def _too_short(job: _ImageJob, n_frames: int, rules: _Rules) -> Problem:
    return _problem(job, "fmri_too_short", f"run has {n_frames} frames; one window needs "
                    f"{rules.min_fmri_frames}", "drop the record, or lower "
                    "dataset.rsfMRI.sequence_length / stride_within_seq (a window spans "
                    "(sequence_length - 1) * stride_within_seq + 1 frames)")


def _check_t1(job: _ImageJob, rules: _Rules) -> list[Problem]:
    img, problem = _open_image(job)
    if problem is not None:
        return [problem]
    if len(_core_shape(img.shape)) != 3:
        return [_dims_problem(job, img.shape)]
    return _header_facts(job, img, rules) + _read_3d(job, rules)


def _check_fmri(job: _ImageJob, rules: _Rules) -> list[Problem]:
    if job.path.is_dir():
        return _check_frame_folder(job, rules) + _tr_problem(job, math.nan, rules)
    img, problem = _open_image(job)
    if problem is not None:
        return [problem]
    shape = tuple(img.shape)
    if len(shape) < 4 or any(n != 1 for n in shape[4:]):
        return [_dims_problem(job, shape)]
    out = [_too_short(job, shape[3], rules)] if shape[3] < rules.min_fmri_frames else []
    job.info["digest"] = _file_digest(job.path)
    return _header_facts(job, img, rules) + out + _scan_4d(job, img)


def _file_digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_dmri(job: _ImageJob, rules: _Rules) -> list[Problem]:
    img, problem = _open_image(job)
    if problem is not None:
        return [problem]
    core = _core_shape(img.shape)
    if len(core) == 3:
        return _header_facts(job, img, rules) + _read_3d(job, rules)
    if len(core) != 4:
        return [_dims_problem(job, img.shape)]
    job.info["digest"] = _file_digest(job.path)
    return _header_facts(job, img, rules) + _gradient_problems(job, core[3]) + \
        _scan_4d(job, img)


_CHECKS = {"T1": _check_t1, "rsfMRI": _check_fmri, "dMRI": _check_dmri}


def _check_image(job: _ImageJob, rules: _Rules) -> list[Problem]:
    """Every problem of one image file; never raises."""
    try:
        problems = _CHECKS[job.modality](job, rules)
    except Exception as exc:  # one odd file must not stop the report on all the others
        problems = [_problem(job, "corrupt_file", f"unexpected {type(exc).__name__} while reading: "
                             f"{exc}", _CORRUPT_FIX + "; if other tools read it, report an "
                             "umbrella bug")]
    if job.n_refs > 1:
        problems = [replace(p, message=f"{p.message} (file named by {job.n_refs} records)")
                    for p in problems]
    return problems


def _check_images(jobs: list[_ImageJob], rules: _Rules, workers: int,
                  progress: bool) -> list[list[Problem]]:
    results: list[list[Problem]] = [[] for _ in jobs]
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        bar = tqdm(total=len(jobs), desc="validate images", unit="file", disable=not progress)
        with bar:
            futures = {pool.submit(_check_image, job, rules): i for i, job in enumerate(jobs)}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update()
    finally:  # on Ctrl-C, files not yet started are dropped instead of read to the end
        pool.shutdown(wait=True, cancel_futures=True)
    return results


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
    rules = replace(_parse_rules(modality_rules), specs=_default_specs(specs),
                    study_tr=_StudyTr(studies or {}))
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
    for job, problems in zip(jobs, _check_images(jobs, rules, workers, progress), strict=True):
        found += [(job.order, p) for p in problems]
    found += _duplicate_scans(jobs)
    found.sort(key=lambda item: item[0])  # stable: record problems before file problems
    problems = [p for _, p in found if p.kind not in WARNING_KINDS]
    warnings = [p for _, p in found if p.kind in WARNING_KINDS]
    return ValidationReport(n_records, len(collector.referenced), problems, warnings,
                            _geometry_spread(jobs))


class _StudyTr(dict):
    """study -> TR from the registry with the config's overrides; None when unknown."""

    def __init__(self, overrides: dict):
        super().__init__()
        self.overrides = overrides

    def get(self, study, default=None):
        from umbrella.data.studies import get_study

        if study not in self:
            given = self.overrides.get(study) or {}
            try:
                self[study] = get_study(study, given).tr if study else None
            except ConfigError:
                tr = given.get("tr") if isinstance(given, dict) else None
                self[study] = tr
        return dict.get(self, study, default)


def _default_specs(specs: dict | None) -> dict:
    if specs is not None:
        return dict(specs)
    from umbrella.data.catalog import volume_spec

    section = ModalityConfig()
    return {"T1": volume_spec(section), "dMRI": volume_spec(section)}


def _duplicate_scans(jobs: list[_ImageJob]) -> list[tuple[int, Problem]]:
    """One scan named under two subject ids: the same file, or files with the same voxels
    (3D) / bytes (4D). A leak when the two subjects sit in different splits."""
    groups: dict[str, list[_ImageJob]] = {}
    for job in jobs:
        groups.setdefault(job.info.get("digest") or f"path:{job.path}", []).append(job)
    out = []
    for group in groups.values():
        refs = [(s, split, rid, job) for job in group for s, split, rid in job.refs]
        if not refs:
            continue
        first = refs[0]
        for subject, split, rid, job in refs[1:]:
            if subject == first[0]:
                continue
            leak = f"; a leak: split {first[1]!r} vs {split!r}" if split != first[1] else ""
            same = "the same file" if job.path == first[3].path else \
                f"the same voxels as {first[3].path}"
            out.append((job.order, Problem(
                "duplicate_scan", rid, str(job.path), f"subject {subject!r} names {same}, also "
                f"named for subject {first[0]!r} in record {first[2]!r}{leak}",
                "keep each scan under its one subject (check the id mapping and copied "
                "files); splits are by subject")))
            break
    return out


def _geometry_spread(jobs: list[_ImageJob]) -> dict[str, dict]:
    """{"<study> <modality>": {images, voxel_mm: (min, max), fov_mm: (min, max)}} per axis."""
    grouped: dict[str, list[dict]] = {}
    for job in jobs:
        if "voxel_mm" in job.info:
            grouped.setdefault(f"{job.study or '-'} {job.modality}", []).append(job.info)
    out = {}
    for name, infos in sorted(grouped.items()):
        voxel = np.array([i["voxel_mm"] for i in infos])
        fov = np.array([i["fov_mm"] for i in infos])
        out[name] = {"images": len(infos),
                     "voxel_mm": (voxel.min(0).round(3).tolist(), voxel.max(0).round(3).tolist()),
                     "fov_mm": (fov.min(0).round(1).tolist(), fov.max(0).round(1).tolist())}
    return out


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
