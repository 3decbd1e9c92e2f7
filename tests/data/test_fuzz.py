"""Fuzz the two readers that face user files: ``records.load_records`` and ``volumes.read_nifti``.

Contract: on any input each either succeeds or raises an :class:`UmbrellaError` (which names the
file and the fix), and returns within a few seconds. Byte mutations (flip, set, insert, delete,
truncate) are applied to a valid JSONL line and to valid small .nii / .nii.gz files.

The validator runs on the same mutations and must never raise: every fault becomes a Problem.

Crashes this fuzzing found (listed in ``*_BUGS``, all fixed) are kept as ``known_*`` regression
tests; the random fuzz tests tolerate no exception type but the project's own.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from nibabel.orientations import OrientationError
from numpy.exceptions import DTypePromotionError

from umbrella.data.records import load_records
from umbrella.data.validate import KINDS, validate_records_files
from umbrella.data.volumes import read_nifti
from umbrella.errors import RecordError, UmbrellaError, VolumeError
from umbrella.task_registry import get_task

TIME_LIMIT_S = 5.0
# UMBRELLA_FUZZ_EXAMPLES=20000 for a deep run; the default keeps this file at a few seconds
FUZZ = settings(max_examples=int(os.environ.get("UMBRELLA_FUZZ_EXAMPLES", "150")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

RECORD = {
    "id": "sub-0001_sex", "subject_id": "sub-0001", "study": "ABCD", "task": "sex",
    "split": "train", "images": [{"modality": "T1", "path": "sub-0001/T1w.nii.gz"}],
    "conversations": [{"from": "human", "value": "<image>\nWhat is the sex of this subject?"},
                      {"from": "gpt", "value": "female"}],
    "metadata": {"task_spec": get_task("sex").to_dict()},  # as `umbrella prepare` writes it
}
LINE = json.dumps(RECORD).encode()


def _nifti_bytes() -> bytes:
    data = np.random.default_rng(0).normal(100, 10, (8, 8, 8)).astype(np.float32)
    return nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])).to_bytes()


NII = _nifti_bytes()
NII_GZ = gzip.compress(NII, mtime=0)
HEADER_BYTES = 352  # 348-byte NIfTI-1 header + 4-byte extension flag


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _read(fn, path: Path, tolerated: dict[type, str] | None = None) -> None:
    """Call ``fn(path)``: success and UmbrellaError pass, so do exceptions whose exact type is in
    ``tolerated`` (known bugs); anything else propagates. Each call must finish in time."""
    start = time.monotonic()
    try:
        fn(path)
    except UmbrellaError:
        pass
    except Exception as exc:  # what the fuzz looks for: any other type escaping
        if type(exc) not in (tolerated or {}):
            exc.add_note(f"{fn.__name__} input ({path.name}): {path.read_bytes()[:400]!r}")
            raise
    elapsed = time.monotonic() - start
    assert elapsed < TIME_LIMIT_S, f"{fn.__name__}({path.name}) took {elapsed:.1f} s"


# ----------------------------------------------------------------------------- mutations

@st.composite
def mutated(draw, base: bytes, span: int | None = None) -> bytes:
    """1-4 byte edits of ``base``; positions within the first ``span`` bytes when given."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        limit = len(data) if span is None else min(len(data), span)
        if limit == 0:
            op = "insert"
        pos = draw(st.integers(0, max(limit - 1, 0)))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 8))]
        else:
            del data[pos:]
    return bytes(data)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=8)
PLACES = [("id",), ("subject_id",), ("images",), ("images", 0), ("images", 0, "modality"),
          ("images", 0, "path"), ("conversations",), ("conversations", 0),
          ("conversations", 1, "from"), ("conversations", 1, "value"), ("task",), ("metadata",),
          ("metadata", "task_spec"), ("metadata", "task_spec", "kind"),
          ("metadata", "task_spec", "options"), ("metadata", "task_spec", "synonyms")]


@st.composite
def restructured(draw) -> bytes:
    """A record with one value (anywhere) replaced by arbitrary JSON, or the chat form's."""
    record = json.loads(LINE)
    if draw(st.booleans()):
        record["messages"] = [{"role": "user", "content": [
            {"type": "image", "modality": "T1", "path": "a.nii"}, {"type": "text", "text": "q"}]},
            {"role": "assistant", "content": "male"}]
        del record["conversations"], record["images"]
        places = [("messages",), ("messages", 0), ("messages", 0, "content"),
                  ("messages", 0, "content", 0), ("messages", 0, "content", 0, "type"),
                  ("messages", 1, "role"), ("messages", 1, "content")]
    else:
        places = PLACES
    *parents, last = draw(st.sampled_from(places))
    target = record
    for key in parents:
        target = target[key]
    if draw(st.booleans()):
        target[last] = draw(JSON_VALUES)
    elif isinstance(target, dict):
        target.pop(last, None)
    return json.dumps(record).encode()


# ----------------------------------------------------------------------------- records

RECORDS_BUGS = {  # exception type escaping load_records -> the bug (umbrella/data/records.py)
    UnicodeDecodeError: "_iter_raw reads the file with path.read_text(encoding='utf-8'): a "
                        "non-UTF-8 byte escapes as UnicodeDecodeError instead of RecordError",
    ValueError: "json.loads raises a plain ValueError (not JSONDecodeError) for an integer of "
                "more than 4300 digits; _iter_raw only catches JSONDecodeError",
    RecursionError: "json.loads raises RecursionError on deeply nested arrays/objects; "
                    "_iter_raw only catches JSONDecodeError",
}


def _load(workdir: Path, line: bytes) -> Path:
    path = workdir / "records.jsonl"
    path.write_bytes(line + b"\n")
    return path


@FUZZ
@given(line=mutated(LINE))
def test_load_records_byte_mutations(workdir, line):
    _read(load_records, _load(workdir, line))


@FUZZ
@given(line=restructured())
def test_load_records_structure_mutations(workdir, line):
    _read(load_records, _load(workdir, line))


def _known(data, error: type, bugs: dict[type, str], id: str, *rest):
    """A crash this fuzzing once found (``bugs[error]``), kept as a regression test: the reader
    must now raise the project's own error instead."""
    return pytest.param(data, *rest, id=id)


@pytest.mark.parametrize("line", [
    _known(LINE.replace(b"female", b"f\x81male"), UnicodeDecodeError, RECORDS_BUGS, "non-utf8"),
    _known(LINE.replace(b'"sub-0001_sex"', b"1" * 5000), ValueError, RECORDS_BUGS,
           "int-5000-digits"),
    _known(b"[" * 100_000, RecursionError, RECORDS_BUGS, "deep-nesting"),
])
def test_known_load_records_crashes(workdir, line):
    with pytest.raises(RecordError, match="line 1"):
        load_records(_load(workdir, line))


def test_known_line_separator_bug(workdir):
    """U+2028 / U+2029 / U+0085 are legal inside JSON strings: a line holding one stays one record
    (it was once split by str.splitlines() and reported as malformed JSON)."""
    line = json.dumps(RECORD | {"study": "AB\u2028CD"}, ensure_ascii=False).encode()
    assert load_records(_load(workdir, line))[0].study == "AB\u2028CD"


# ----------------------------------------------------------------------------- volumes

VOLUMES_BUGS = {  # exception type escaping read_nifti -> the bug (umbrella/data/volumes.py)
    OverflowError: "a negative dim or a huge vox_offset in an uncompressed .nii makes np.memmap "
                   "raise OverflowError, which _READ_ERRORS does not list",
    OrientationError: "a degenerate (rank-deficient) sform/qform makes nib.as_closest_canonical "
                      "raise nibabel's OrientationError, which _READ_ERRORS does not list",
    MemoryError: "huge header dims make nibabel allocate the declared size before reading; "
                 "MemoryError escapes (and sizes that fit in RAM are allocated and zeroed)",
    DTypePromotionError: "an RGB24 (structured) datatype makes get_fdata raise numpy's "
                         "DTypePromotionError (a TypeError), which _READ_ERRORS does not list",
}
MAX_DECLARED_BYTES = 256 * 2**20


def _declared_bytes(path: Path) -> int:
    """Voxel bytes the header declares (0 when nibabel cannot even read the header)."""
    try:
        img = nib.load(path)
        return math.prod(int(n) for n in img.shape) * img.get_data_dtype().itemsize
    except Exception:
        return 0


def _nifti(workdir: Path, data: bytes, suffix: str) -> Path:
    path = workdir / f"volume{suffix}"
    path.write_bytes(data)
    # read_nifti allocates what the header declares (see MemoryError above): keep the fuzz from
    # allocating gigabytes; known_read_nifti_crashes covers a huge declared size
    assume(_declared_bytes(path) <= MAX_DECLARED_BYTES)
    return path


@FUZZ
@given(data=st.one_of(mutated(NII, span=HEADER_BYTES), mutated(NII)))
def test_read_nifti_nii_mutations(workdir, data):
    _read(read_nifti, _nifti(workdir, data, ".nii"))


@FUZZ
@given(data=st.one_of(mutated(NII_GZ), mutated(NII, span=HEADER_BYTES).map(gzip.compress)))
def test_read_nifti_nii_gz_mutations(workdir, data):
    """Raw bytes of the .gz (mostly gzip errors) and a mutated payload re-compressed (header)."""
    _read(read_nifti, _nifti(workdir, data, ".nii.gz"))


def _patched(edit, compress: bool = False) -> bytes:
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(NII), check=False)
    edit(header)
    data = header.binaryblock + NII[348:]
    return gzip.compress(data, mtime=0) if compress else data


def _set(key, value, index=None):
    def edit(header):
        if index is None:
            header[key] = value
        else:
            header[key][index] = value
    return edit


def _flat_sform(header):
    header["sform_code"], header["qform_code"] = 2, 0
    header["srow_x"], header["srow_y"], header["srow_z"] = [2, 2, 0, 0], [0, 0, 0, 0], [0, 0, 2, 0]


def _rgb() -> bytes:
    rgb = np.zeros((8, 8, 8), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"] = np.arange(512).reshape(8, 8, 8) % 256
    return nib.Nifti1Image(rgb, np.eye(4)).to_bytes()


@pytest.mark.parametrize("data, suffix", [
    _known(_patched(_set("dim", -8, 1)), OverflowError, VOLUMES_BUGS, "negative-dim", ".nii"),
    _known(_patched(_set("vox_offset", 1e30)), OverflowError, VOLUMES_BUGS, "huge-vox-offset",
           ".nii"),
    _known(_patched(_flat_sform), OrientationError, VOLUMES_BUGS, "degenerate-sform", ".nii"),
    _known(_patched(_set("dim", 32767, slice(1, 4)), compress=True), MemoryError, VOLUMES_BUGS,
           "huge-dims", ".nii.gz"),
    _known(_rgb(), DTypePromotionError, VOLUMES_BUGS, "rgb24", ".nii"),
])
def test_known_read_nifti_crashes(workdir, data, suffix):
    path = workdir / f"known{suffix}"
    path.write_bytes(data)
    start = time.monotonic()
    with pytest.raises(VolumeError, match="fix:"):
        read_nifti(path)
    assert time.monotonic() - start < TIME_LIMIT_S


# ----------------------------------------------------------------------------- the validator

def _nifti_4d_bytes() -> bytes:
    data = np.random.default_rng(1).normal(100, 10, (6, 6, 6, 4)).astype(np.float32)
    return nib.Nifti1Image(data, np.eye(4)).to_bytes()


BASES = {"T1": NII, "dMRI": NII, "rsfMRI": _nifti_4d_bytes()}


@FUZZ
@given(line=st.one_of(mutated(LINE), restructured()))
@example(line=LINE.replace(b'"id": ', b'"id":""'))  # found by this test: an empty id, bad JSON
def test_validator_reports_any_records_line(workdir, line):
    """validate_records_files never raises on record input: every fault is a Problem."""
    path = _load(workdir, line)
    start = time.monotonic()
    report = validate_records_files([path], {"T1": workdir}, workers=1, progress=False)
    assert time.monotonic() - start < TIME_LIMIT_S
    assert report.n_records == sum(1 for chunk in (line + b"\n").split(b"\n") if chunk.strip())
    assert {p.kind for p in report.problems} <= set(KINDS)


@FUZZ
@given(case=st.sampled_from(sorted(BASES)).flatmap(lambda m: st.tuples(
    st.just(m), st.booleans(),
    st.one_of(mutated(BASES[m], span=HEADER_BYTES), mutated(BASES[m])))))
def test_validator_reports_any_image(workdir, case):
    """Mutated images give problems of known kinds, never an exception and never the catch-all
    'unexpected ...' problem: the validator's header checks shield read_nifti's known bugs."""
    modality, packed, data = case
    image = _nifti(workdir, gzip.compress(data, mtime=0) if packed else data,
                   ".nii.gz" if packed else ".nii")
    record = RECORD | {"images": [{"modality": modality, "path": image.name}]}
    records = workdir / "image.jsonl"
    records.write_text(json.dumps(record) + "\n")
    start = time.monotonic()
    report = validate_records_files([records], {modality: workdir}, workers=1, progress=False,
                                    modality_rules={"rsfMRI": {"min_frames": 2}})
    assert time.monotonic() - start < TIME_LIMIT_S
    assert {p.kind for p in report.problems} <= set(KINDS)
    assert not [p for p in report.problems if p.message.startswith("unexpected")], report.lines()
