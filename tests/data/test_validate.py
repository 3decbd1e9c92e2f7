"""Tests for umbrella.data.validate: one planted fault per problem kind, a clean cohort, all faults
at once, the report's text forms and the config entry point."""

from __future__ import annotations

import gzip
import io
import itertools
import json
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from umbrella.config import MODALITIES, load_config
from umbrella.data.validate import (
    KINDS,
    Problem,
    ValidationReport,
    fmri_window_frames,
    validate_config,
    validate_records_files,
)
from umbrella.errors import ConfigError

MIN_FRAMES = 6  # rsfMRI frames one window needs in these tests
SHAPE = (8, 8, 8)
QUESTION = "What is the sex of this subject?"


_SEEDS = itertools.count(1000)


def _vol(shape=SHAPE, seed=None) -> np.ndarray:
    """Random voxels, distinct per call unless ``seed`` is given (one scan under two subjects
    is a fault of its own)."""
    seed = next(_SEEDS) if seed is None else seed
    return np.random.default_rng(seed).normal(100, 10, shape).astype(np.float32)


def _save(path: Path, data: np.ndarray, affine=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.Nifti1Image(data, np.eye(4) if affine is None else affine).to_filename(path)
    return path


def _patch_header(path: Path, edit) -> None:
    """Rewrite the NIfTI-1 header of a written file with ``edit(header)`` (no sanity checks)."""
    packed = path.name.endswith(".gz")
    raw = bytearray(gzip.decompress(path.read_bytes()) if packed else path.read_bytes())
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(raw)), check=False)
    edit(header)
    raw[:348] = header.binaryblock
    path.write_bytes(gzip.compress(bytes(raw)) if packed else bytes(raw))


class Cohort:
    """Tiny records files + NIfTI files under one folder, with one data root per modality."""

    def __init__(self, root: Path):
        self.root = root
        self.roots = {m: root / "data" / m for m in MODALITIES}
        for folder in self.roots.values():
            folder.mkdir(parents=True, exist_ok=True)
        self.files: dict[str, list[str]] = {"records.jsonl": []}

    def image(self, modality: str, name: str, data: np.ndarray | None = None, affine=None) -> str:
        if data is None:  # distinct voxels per file: one scan under two subjects is a fault
            data = _vol(seed=zlib.crc32(name.encode()))
        _save(self.roots[modality] / name, data, affine)
        return name

    def path(self, file: str = "records.jsonl") -> str:
        return str(self.root / file)

    def image_path(self, modality: str, name: str) -> str:
        return str(self.roots[modality] / name)

    def raw(self, line: str, file: str = "records.jsonl") -> int:
        """Add a raw line; returns its line number."""
        self.files.setdefault(file, []).append(line)
        return len(self.files[file])

    def add(self, rid: str, images: list[dict], *, subject: str | None = None, split="train",
            task="sex", answer="female", file="records.jsonl", chat=False, drop=()) -> int:
        text = "<image>\n" * len(images) + QUESTION
        rec = {"id": rid, "subject_id": subject or rid, "study": "ABCD", "task": task,
               "split": split}
        if chat:
            parts = [{"type": "image", **im} for im in images]
            parts.append({"type": "text", "text": QUESTION})
            rec["messages"] = [{"role": "user", "content": parts},
                               {"role": "assistant", "content": answer}]
        else:
            rec["images"] = images
            rec["conversations"] = [{"from": "human", "value": text},
                                    {"from": "gpt", "value": answer}]
        for key in drop:
            rec.pop(key)
        return self.raw(json.dumps(rec), file)

    def write(self) -> list[Path]:
        paths = []
        for name, lines in self.files.items():
            path = self.root / name
            path.write_text("".join(line + "\n" for line in lines))
            paths.append(path)
        return paths

    @property
    def n_lines(self) -> int:
        return sum(len(lines) for lines in self.files.values())

    def validate(self, **kw) -> ValidationReport:
        kw.setdefault("modality_rules", {"rsfMRI": {"min_frames": MIN_FRAMES}})
        return validate_records_files(self.write(), self.roots, progress=False, **kw)


def T1(path: str, **extra) -> dict:
    return {"modality": "T1", "path": path, **extra}


def FMRI(path: str) -> dict:
    return {"modality": "rsfMRI", "path": path}


def DMRI(path: str, **extra) -> dict:
    return {"modality": "dMRI", "path": path, **extra}


def _gradients(folder: Path, stem: str, n: int, n_bvals: int | None = None) -> None:
    bvals = [0] + [1000] * ((n_bvals or n) - 1)
    (folder / f"{stem}.bval").write_text(" ".join(map(str, bvals)) + "\n")
    vecs = np.random.default_rng(1).normal(size=(3, n))
    vecs /= np.linalg.norm(vecs, axis=0)
    np.savetxt(folder / f"{stem}.bvec", vecs)


def _frame_folder(folder: Path, n: int, bad_frame: int | None = None) -> None:
    folder.mkdir(parents=True)
    for i in range(n):
        frame = torch.from_numpy(_vol(seed=i))
        if i == bad_frame:
            frame[0, 0, 0] = float("nan")
        torch.save(frame, folder / f"frame_{i}.pt")


def clean(c: Cohort) -> None:
    """Every supported form, all valid: T1 (LLaVA and chat), a 4D rsfMRI run, a frame folder,
    a 3D dMRI map, a 4D DWI with sibling gradients and one with gradients named on the entry,
    a two-image record naming one file twice, and a free-text task."""
    c.add("s1-sex", [T1(c.image("T1", "s1.nii.gz"))], subject="s1")
    c.add("s2-sex", [T1(c.image("T1", "s2.nii"))], answer="male", chat=True)
    c.add("s3-sex", [FMRI(c.image("rsfMRI", "s3_bold.nii.gz", _vol(SHAPE + (MIN_FRAMES,))))],
          split="test")
    _frame_folder(c.roots["rsfMRI"] / "s4_frames", MIN_FRAMES)
    c.add("s4-sex", [FMRI("s4_frames")], split="test", answer="male")
    c.add("s5-sex", [DMRI(c.image("dMRI", "s5_FA.nii.gz"))])
    c.add("s6-sex", [DMRI(c.image("dMRI", "s6_dwi.nii.gz", _vol(SHAPE + (7,))))])
    _gradients(c.roots["dMRI"], "s6_dwi", 7)
    sub = c.roots["dMRI"] / "s7"
    _save(sub / "data.nii.gz", _vol(SHAPE + (7,), seed=7))
    _gradients(sub, "grad", 7)
    c.add("s7-sex", [DMRI("s7/data.nii.gz", bval="s7/grad.bval", bvec="s7/grad.bvec")])
    c.add("s1+s2-compare", [T1("s1.nii.gz"), T1("s2.nii")], subject="s1+s2",
          task="compare_age", answer="the first one is older")
    c.add("s1-age", [T1("s1.nii.gz")], subject="s1", task="age", answer="about 10 years")


N_CLEAN_RECORDS, N_CLEAN_FILES = 9, 7


# ----------------------------------------------------------------------------- planted faults
# Each plant adds one faulty record (id `rid`, own subject) or file to a cohort and returns
# (the record id the problem must name, the file it must name).

def p_malformed_json(c, rid):
    c.raw(f'{{"id": "{rid}", "subject_id": "{rid}", "images": [{{"modality": "T1"')
    return rid, c.path()


def p_malformed_record(c, rid):
    c.raw(json.dumps({"id": rid, "subject_id": rid, "images": [],  # no assistant answer
                      "conversations": [{"from": "human", "value": "hi"}]}))
    return rid, c.path()


def p_missing_key(c, rid):
    c.add(rid, [T1("s1.nii.gz")], drop=("subject_id",))
    return rid, c.path()


def p_unknown_modality(c, rid):
    c.add(rid, [{"modality": "PET", "path": "x.nii.gz"}])
    return rid, c.path()


def p_image_count(c, rid):
    line = json.loads(c.files["records.jsonl"][0]) | {"id": rid, "subject_id": rid}
    line["images"] = line["images"] * 2  # one <image> in the text, two images
    c.raw(json.dumps(line))
    return rid, c.path()


def p_no_records(c, rid):
    c.files[f"{rid}.jsonl"] = []
    return None, c.path(f"{rid}.jsonl")


def p_duplicate_id(c, rid):
    c.add("s1-sex", [T1("s1.nii.gz")], subject="s1", file=f"{rid}.jsonl")  # same id, other file
    return "s1-sex", c.path(f"{rid}.jsonl")


def p_subject_in_two_splits(c, rid):
    c.add(rid, [T1("s1.nii.gz")], subject="s1", split="test")  # s1 is in train
    return rid, c.path()


def p_unparseable_answer(c, rid):
    c.add(rid, [T1("s1.nii.gz")], subject="s1", answer="could be male or female")
    return rid, c.path()


def p_path_escapes_root(c, rid):
    _save(c.root / "outside" / f"{rid}.nii.gz", _vol())
    c.add(rid, [T1(f"../../outside/{rid}.nii.gz")])
    return rid, str(c.roots["T1"] / f"../../outside/{rid}.nii.gz")


def p_missing_file(c, rid):
    c.add(rid, [T1(f"{rid}_absent.nii.gz")])
    return rid, c.image_path("T1", f"{rid}_absent.nii.gz")


def p_corrupt_file(c, rid):
    name = c.image("T1", f"{rid}.nii.gz")
    path = c.roots["T1"] / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated gzip
    c.add(rid, [T1(name)])
    return rid, str(path)


def p_wrong_dims(c, rid):
    c.add(rid, [T1(c.image("T1", f"{rid}.nii.gz", _vol(SHAPE + (3,))))])
    return rid, c.image_path("T1", f"{rid}.nii.gz")


def p_zero_size(c, rid):
    c.add(rid, [T1(c.image("T1", f"{rid}.nii.gz", np.zeros((8, 8, 0), np.float32)))])
    return rid, c.image_path("T1", f"{rid}.nii.gz")


def p_nan_inf(c, rid):
    data = _vol()
    data[1, 2, 3] = np.nan
    c.add(rid, [T1(c.image("T1", f"{rid}.nii.gz", data))])
    return rid, c.image_path("T1", f"{rid}.nii.gz")


def p_constant(c, rid):
    c.add(rid, [T1(c.image("T1", f"{rid}.nii.gz", np.full(SHAPE, 7, np.float32)))])
    return rid, c.image_path("T1", f"{rid}.nii.gz")


def p_fmri_too_short(c, rid):
    c.add(rid, [FMRI(c.image("rsfMRI", f"{rid}.nii.gz", _vol(SHAPE + (MIN_FRAMES - 1,))))])
    return rid, c.image_path("rsfMRI", f"{rid}.nii.gz")


def p_dmri_no_gradients(c, rid):
    c.add(rid, [DMRI(c.image("dMRI", f"{rid}_dwi.nii.gz", _vol(SHAPE + (7,))))])
    return rid, c.image_path("dMRI", f"{rid}_dwi.nii.gz")


def p_dmri_bad_gradients(c, rid):
    name = c.image("dMRI", f"{rid}_dwi.nii.gz", _vol(SHAPE + (7,)))
    _gradients(c.roots["dMRI"], f"{rid}_dwi", 7, n_bvals=6)
    c.add(rid, [DMRI(name)])
    return rid, c.image_path("dMRI", f"{rid}_dwi.bval")


def p_implausible_answer(c, rid):
    c.add(rid, [T1("s1.nii.gz")], subject="s1", task="age", answer="300 years")
    return rid, c.path()


def p_duplicate_scan(c, rid):
    copy = c.image("T1", f"{rid}.nii.gz", np.asarray(nib.load(c.roots["T1"] / "s1.nii.gz")
                                                     .dataobj))  # s1's voxels, another file
    c.add(rid, [T1(copy)], split="test")
    return rid, c.image_path("T1", copy)


def p_no_orientation(c, rid):
    name = c.image("T1", f"{rid}.nii.gz")

    def no_codes(header):
        header["sform_code"], header["qform_code"] = 0, 0

    _patch_header(c.roots["T1"] / name, no_codes)
    c.add(rid, [T1(name)])
    return rid, c.image_path("T1", name)


PLANTS = {name.removeprefix("p_"): fn for name, fn in dict(globals()).items()
          if name.startswith("p_")}


def test_every_kind_has_a_plant():
    assert set(PLANTS) == set(KINDS)


def test_clean_cohort_is_ok(tmp_path):
    c = Cohort(tmp_path)
    clean(c)
    report = c.validate()
    assert report.problems == [] and report.ok
    assert (report.n_records, report.n_files) == (N_CLEAN_RECORDS, N_CLEAN_FILES)
    assert report.summary_table().startswith("validated 9 records and 7 image files: no problems")


@pytest.mark.parametrize("kind", sorted(PLANTS))
def test_one_planted_fault_gives_one_problem_of_its_kind(tmp_path, kind):
    c = Cohort(tmp_path)
    clean(c)
    record_id, file = PLANTS[kind](c, "bad")
    report = c.validate()
    assert [p.kind for p in report.problems] == [kind], report.lines()
    problem = report.problems[0]
    assert problem.record_id == record_id
    if kind != "no_records":  # an empty records file has no record to name
        assert problem.record_id
    assert problem.file == file
    assert problem.message.strip() and problem.fix.strip()
    assert not report.ok


def test_all_faults_at_once_are_all_reported(tmp_path):
    c = Cohort(tmp_path)
    clean(c)
    expected = {kind: plant(c, f"bad-{kind}") for kind, plant in PLANTS.items()}
    report = c.validate(workers=3)
    assert {p.kind for p in report.problems} == set(PLANTS)
    assert len(report.problems) == len(PLANTS), report.lines()
    # in record order: records.jsonl, then the empty file, then the duplicate's file
    later = ["no_records", "duplicate_id"]
    assert [p.kind for p in report.problems] == [k for k in PLANTS if k not in later] + later
    for p in report.problems:
        assert (p.record_id, p.file) == expected[p.kind]
    # every line counts, parsed or not; the empty file adds none
    assert report.n_records == c.n_lines == N_CLEAN_RECORDS + len(PLANTS) - 1


# ----------------------------------------------------------------------------- variants per kind

def test_malformed_line_names_its_line_and_reading_goes_on(tmp_path):
    c = Cohort(tmp_path)
    clean(c)
    bad_line = c.raw('{"id": "cut", "subject_id": "s9", "images": [')
    c.raw("not json at all")
    c.add("after", [T1("missing.nii.gz")])  # a record after the bad lines is still checked
    report = c.validate()
    assert [(p.kind, p.line, p.record_id) for p in report.problems] == [
        ("malformed_json", bad_line, "cut"), ("malformed_json", bad_line + 1, None),
        ("missing_file", None, "after")]
    assert report.n_records == N_CLEAN_RECORDS + 3


def test_non_utf8_and_deeply_nested_lines_are_malformed_json(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"id": "x\x81", "subject_id": 1}\n' + b"[" * 100_000 + b"\n"
                     + b'{"id": ' + b"1" * 5000 + b"}\n")
    report = validate_records_files([path], {}, progress=False)
    assert [(p.kind, p.line) for p in report.problems] == [("malformed_json", n) for n in (1, 2, 3)]
    assert "not UTF-8" in report.problems[0].message
    assert "nested too deeply" in report.problems[1].message


def test_json_list_file(tmp_path):
    c = Cohort(tmp_path)
    clean(c)
    records = [json.loads(line) for line in c.files.pop("records.jsonl")]
    records[1]["messages"][1]["content"] = "no idea"  # the chat-form record
    (tmp_path / "records.json").write_text(json.dumps(records))
    report = validate_records_files([tmp_path / "records.json"], c.roots, progress=False,
                                    modality_rules={"rsfMRI": {"min_frames": MIN_FRAMES}})
    assert [(p.kind, p.record_id, p.line) for p in report.problems] == [
        ("unparseable_answer", "s2-sex", None)]
    assert report.problems[0].message.startswith("item 1: ")
    (tmp_path / "broken.json").write_text("[{\n")
    (tmp_path / "dict.json").write_text("{}")
    report = validate_records_files([tmp_path / "broken.json", tmp_path / "dict.json"], {},
                                    progress=False)
    assert [(p.kind, p.line) for p in report.problems] == [("malformed_json", 2),
                                                           ("malformed_json", None)]


def test_missing_records_file(tmp_path):
    report = validate_records_files([tmp_path / "nope.jsonl"], {}, progress=False)
    (problem,) = report.problems
    assert (problem.kind, problem.record_id, problem.file) == ("missing_file", None,
                                                               str(tmp_path / "nope.jsonl"))


@pytest.mark.parametrize("how", ["absolute", "symlink", "dotdot_in_middle"])
def test_path_escapes_root_variants(tmp_path, how):
    c = Cohort(tmp_path)
    outside = _save(tmp_path / "elsewhere" / "x.nii.gz", _vol())
    if how == "absolute":
        path = str(outside)
    elif how == "symlink":
        (c.roots["T1"] / "link.nii.gz").symlink_to(outside)
        path = "link.nii.gz"
    else:
        path = "sub/../../../elsewhere/x.nii.gz"
    c.add("esc", [T1(path)])
    c.add("inside-abs", [T1(str(c.roots["T1"] / c.image("T1", "ok.nii.gz")))])  # absolute, inside
    report = c.validate()
    assert [(p.kind, p.record_id) for p in report.problems] == [("path_escapes_root", "esc")]
    assert str(outside.resolve()) in report.problems[0].message


def test_escape_is_not_checked_without_a_root(tmp_path):
    _save(tmp_path / "x.nii.gz", _vol())
    c = Cohort(tmp_path / "c")
    c.add("r", [T1("../x.nii.gz")])
    report = validate_records_files(c.write(), {}, progress=False)  # no roots: relative to cwd
    assert [p.kind for p in report.problems] == ["missing_file"]


def _rgb(path: Path) -> None:
    rgb = np.zeros(SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.Nifti1Image(rgb, np.eye(4)).to_filename(path)


def _degenerate_affine(h) -> None:
    h["sform_code"], h["qform_code"] = 2, 0
    h["srow_x"], h["srow_y"], h["srow_z"] = [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]


@pytest.mark.parametrize("name, damage, says", [
    ("trunc.nii.gz", lambda p: p.write_bytes(p.read_bytes()[:-40]), "cannot read"),
    ("trunc.nii", lambda p: p.write_bytes(p.read_bytes()[:-40]), "truncated"),
    ("garbage.nii.gz", lambda p: p.write_bytes(b"not a nifti at all" * 30), "cannot read"),
    ("negdim.nii", lambda p: _patch_header(p, lambda h: h["dim"].__setitem__(1, -8)), "negative"),
    ("huge.nii.gz", lambda p: _patch_header(p, lambda h: h["dim"].__setitem__(
        slice(1, 4), 32767)), "surely corrupt"),
    ("offset.nii", lambda p: _patch_header(p, lambda h: h.__setitem__("vox_offset", 1e30)),
     "truncated"),
    ("affine.nii", lambda p: _patch_header(p, _degenerate_affine), "degenerate"),
    ("rgb.nii", _rgb, "RGB"),
])
def test_corrupt_file_variants(tmp_path, name, damage, says):
    """Includes headers that make read_nifti itself crash: the validator reports them instead."""
    c = Cohort(tmp_path)
    damage(Path(c.image_path("T1", c.image("T1", name))))
    c.add("r", [T1(name)])
    report = c.validate()
    assert [p.kind for p in report.problems] == ["corrupt_file"], report.lines()
    assert says in report.problems[0].message


@pytest.mark.parametrize("modality, shape", [
    ("T1", (8, 8)), ("T1", SHAPE + (2,)), ("rsfMRI", SHAPE), ("dMRI", SHAPE + (7, 2)),
])
def test_wrong_dims_per_modality(tmp_path, modality, shape):
    c = Cohort(tmp_path)
    c.add("r", [{"modality": modality, "path": c.image(modality, "x.nii.gz", _vol(shape))}])
    report = c.validate()
    assert [p.kind for p in report.problems] == ["wrong_dims"]
    assert modality in report.problems[0].message and str(shape) in report.problems[0].message


def test_singleton_trailing_dims_are_fine(tmp_path):
    c = Cohort(tmp_path)
    c.add("t1", [T1(c.image("T1", "a.nii.gz", _vol(SHAPE + (1,))))])
    c.add("dmri", [DMRI(c.image("dMRI", "b.nii.gz", _vol(SHAPE + (1,))))])
    assert c.validate().ok


def test_4d_value_faults(tmp_path):
    c = Cohort(tmp_path)
    data = _vol(SHAPE + (MIN_FRAMES,))
    data[..., -1] = np.inf
    c.add("inf", [FMRI(c.image("rsfMRI", "inf.nii.gz", data))])
    c.add("flat", [FMRI(c.image("rsfMRI", "flat.nii", np.ones(SHAPE + (MIN_FRAMES,), np.int16)))])
    c.add("short-flat", [FMRI(c.image("rsfMRI", "sf.nii.gz", np.zeros(SHAPE + (2,), np.int16)))])
    report = c.validate()
    assert [(p.kind, p.record_id) for p in report.problems] == [
        ("nan_inf", "inf"), ("constant", "flat"), ("fmri_too_short", "short-flat"),
        ("constant", "short-flat")]
    assert report.problems[0].message.startswith(f"{8 * 8 * 8} of {8 * 8 * 8 * MIN_FRAMES} voxels")


def test_4d_series_is_read_in_chunks(tmp_path, monkeypatch):
    import umbrella.data.image_checks as image_checks

    monkeypatch.setattr(image_checks, "_CHUNK_VOXELS", 8 * 8 * 8 * 2)  # two frames per read
    c = Cohort(tmp_path)
    data = _vol(SHAPE + (7,))
    data[0, 0, 0, 6] = np.nan  # in the last (partial) chunk
    c.add("r", [FMRI(c.image("rsfMRI", "r.nii.gz", data))])
    assert [p.kind for p in c.validate().problems] == ["nan_inf"]


def test_frame_folder_faults(tmp_path):
    c = Cohort(tmp_path)
    _frame_folder(c.roots["rsfMRI"] / "short", 3, bad_frame=1)
    _frame_folder(c.roots["rsfMRI"] / "gap", MIN_FRAMES)
    (c.roots["rsfMRI"] / "gap" / "frame_2.pt").unlink()
    c.add("short", [FMRI("short")])
    c.add("gap", [FMRI("gap")])
    report = c.validate()
    assert [(p.kind, p.record_id) for p in report.problems] == [
        ("fmri_too_short", "short"), ("nan_inf", "short"), ("missing_file", "gap")]
    assert "frame_2.pt" in report.problems[2].message


def test_dmri_gradient_variants(tmp_path):
    c = Cohort(tmp_path)
    c.add("hcp", [DMRI("hcp/data.nii.gz")])  # HCP style: bvals / bvecs in the folder
    _save(c.roots["dMRI"] / "hcp" / "data.nii.gz", _vol(SHAPE + (7,)))
    _gradients(c.roots["dMRI"] / "hcp", "x", 7)
    for ext in ("bval", "bvec"):
        (c.roots["dMRI"] / "hcp" / f"x.{ext}").rename(c.roots["dMRI"] / "hcp" / f"{ext}s")
    c.add("named", [DMRI(c.image("dMRI", "n.nii.gz", _vol(SHAPE + (7,))), bval="none.bval",
                         bvec="none.bvec")])
    c.add("empty", [DMRI(c.image("dMRI", "e_dwi.nii.gz", _vol(SHAPE + (7,))))])
    (c.roots["dMRI"] / "e_dwi.bval").write_text("")
    (c.roots["dMRI"] / "e_dwi.bvec").write_text("")
    report = c.validate()
    assert [(p.kind, p.record_id) for p in report.problems] == [
        ("dmri_no_gradients", "named"), ("dmri_bad_gradients", "empty")]
    assert str(c.roots["dMRI"] / "none.bval") in report.problems[0].message


def test_shared_file_is_checked_once(tmp_path):
    c = Cohort(tmp_path)
    c.add("a", [T1("gone.nii.gz")])
    c.add("b", [T1("gone.nii.gz")], subject="a")
    report = c.validate()
    assert [(p.kind, p.record_id) for p in report.problems] == [("missing_file", "a")]
    assert "named by 2 records" in report.problems[0].message
    assert report.n_files == 1


def test_answers_are_read_by_their_task_kind(tmp_path):
    c = Cohort(tmp_path)
    c.add("a", [T1(c.image("T1", "a.nii.gz"))], task="age", answer="female-ish")  # regression
    c.add("b", [T1("a.nii.gz")], subject="a", task="sex", answer="female, not male")
    c.add("c", [T1("a.nii.gz")], subject="a", task="my_free_task", answer="anything")
    c.add("d", [T1("a.nii.gz")], subject="a", task="age", answer="149 months")  # 12.4 years
    c.add("e", [T1("a.nii.gz")], subject="a", task="age", answer="300.0 years")
    problems = c.validate().problems
    assert [(p.kind, p.record_id) for p in problems] == [
        ("unparseable_answer", "a"), ("unparseable_answer", "b"), ("implausible_answer", "e")]
    assert "[0, 120]" in problems[2].message and "--age-unit" in problems[2].fix


def test_answers_follow_the_task_spec_a_record_carries(tmp_path):
    """`prepare` writes metadata.task_spec for tasks built from a phenotype table."""
    c = Cohort(tmp_path)
    spec = {"name": "dx", "kind": "classification", "options": ["autism", "control"]}
    odd = spec | {"options": [1, 2]}
    for rid, answer, task_spec in [("ok", "control", spec), ("bad", "healthy", spec),
                                   ("broken", "control", {"kind": "classification"}),
                                   ("odd", "1", odd)]:
        c.raw(json.dumps({
            "id": rid, "subject_id": "a", "task": "dx", "metadata": {"task_spec": task_spec},
            "images": [T1(c.image("T1", "a.nii.gz"))],
            "conversations": [{"from": "human", "value": "<image>\nDiagnosis?"},
                              {"from": "gpt", "value": answer}]}))
    report = c.validate()
    assert [(p.kind, p.record_id) for p in report.problems] == [
        ("unparseable_answer", "bad"), ("malformed_record", "broken"),
        ("malformed_record", "odd")]
    assert "autism, control" in report.problems[0].message
    assert "task_spec" in report.problems[1].message


# ----------------------------------------------------------------------------- report text

def test_summary_table_counts_lines_and_dict(tmp_path):
    c = Cohort(tmp_path)
    clean(c)
    p_missing_file(c, "m1")
    p_missing_file(c, "m2")
    p_constant(c, "k")
    report = c.validate()
    table = report.summary_table()
    assert table.splitlines()[0] == ("validated 12 records and 10 image files: 3 problems")
    rows = {line.split()[0]: line.split()[1] for line in table.splitlines()[3:]}
    assert rows == {"missing_file": "2", "constant": "1", "total": "3"}
    assert report.counts() == {"missing_file": 2, "constant": 1}
    assert report.lines()[0] == (
        f"record m1 | file {c.image_path('T1', 'm1_absent.nii.gz')} | T1 image: file not found"
        f" | fix: check the image path in the record and dataset.T1.data_root")
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] is False and data["n_problems"] == 3 and data["counts"]["missing_file"] == 2
    assert data["problems"][2]["kind"] == "constant"


def test_problem_line_form():
    p = Problem("malformed_json", None, "r.jsonl", "malformed JSON: x", "repair it", line=4)
    assert p.describe() == "record - | file r.jsonl line 4 | malformed JSON: x | fix: repair it"


def test_worker_count_does_not_change_the_report(tmp_path):
    c = Cohort(tmp_path)
    clean(c)
    for kind in ("missing_file", "nan_inf", "constant", "wrong_dims", "fmri_too_short"):
        PLANTS[kind](c, f"bad-{kind}")
    assert c.validate(workers=1).lines() == c.validate(workers=4).lines()


# ----------------------------------------------------------------------------- arguments, config

@pytest.mark.parametrize("kw", [{"workers": 0}, {"modality_rules": {"T1": {"min_frames": 2}}},
                                {"modality_rules": {"rsfMRI": {"frames": 2}}},
                                {"modality_rules": {"rsfMRI": {"min_frames": 0}}}])
def test_bad_arguments_raise_config_error(tmp_path, kw):
    with pytest.raises(ConfigError):
        validate_records_files([], {}, progress=False, **kw)


def test_unknown_data_root_modality(tmp_path):
    with pytest.raises(ConfigError, match="T2"):
        validate_records_files([], {"T2": tmp_path}, progress=False)


def test_validate_config_uses_roots_and_fmri_window(tmp_path):
    c = Cohort(tmp_path)
    c.add("t1", [T1(c.image("T1", "a.nii.gz"))])
    c.add("long", [FMRI(c.image("rsfMRI", "long.nii.gz", _vol(SHAPE + (10,))))])
    c.add("short", [FMRI(c.image("rsfMRI", "short.nii.gz", _vol(SHAPE + (9,))))])
    (records,) = c.write()
    cfg = load_config(None, [
        f"dataset.T1.records=[{records}]", f"dataset.T1.data_root={c.roots['T1']}",
        f"dataset.rsfMRI.records=[{records}]", f"dataset.rsfMRI.data_root={c.roots['rsfMRI']}",
        "dataset.rsfMRI.sequence_length=4", "dataset.rsfMRI.stride_within_seq=3"])
    assert fmri_window_frames(cfg.dataset.rsfMRI) == 10
    report = validate_config(cfg, progress=False)
    assert report.n_records == 3  # the file named by two sections is read once
    assert [(p.kind, p.record_id) for p in report.problems] == [("fmri_too_short", "short")]
    assert "9 frames; one window needs 10" in report.problems[0].message
    override = validate_config(cfg, progress=False, modality_rules={"rsfMRI": {"min_frames": 9}})
    assert override.ok


def test_validate_config_without_records():
    with pytest.raises(ConfigError, match="no modality has records"):
        validate_config(load_config(None, []))


def test_demo_cohort_is_valid(tiny_config):
    """The records and volumes the project itself writes pass validation."""
    report = validate_config(tiny_config(), progress=False)
    assert report.ok, report.lines()
    assert report.n_records == report.n_files == 24


# ----------------------------------------------------------------------------- real-cohort faults

def _head(shape, box) -> np.ndarray:
    """A zero background with a bright block (the head) at ``box`` (slices)."""
    data = np.zeros(shape, np.float32)
    data[box] = _vol(shape)[box]
    return data


def test_head_cropped_warns_with_the_key_to_change(tmp_path):
    from umbrella.data.volumes import VolumeSpec

    c = Cohort(tmp_path)
    c.add("big", [T1(c.image("T1", "big.nii.gz", _head((40, 40, 40), np.s_[2:38, 2:38, 2:38])))])
    c.add("small", [T1(c.image("T1", "small.nii.gz", _head((40, 40, 40),
                                                           np.s_[12:28, 12:28, 12:28])))])
    native = {"T1": VolumeSpec(image_size=(24, 24, 24))}  # 24 mm of a 36 mm head at 1 mm
    report = c.validate(specs=native)
    assert report.ok and [(w.kind, w.record_id) for w in report.warnings] == [
        ("head_cropped", "big")]
    assert "keeps 29.6% of the head" in report.warnings[0].message  # (24/36)^3
    assert "dataset.T1.field_of_view" in report.warnings[0].fix
    physical = {"T1": VolumeSpec(image_size=(24, 24, 24), field_of_view=48.0)}  # 2 mm voxels
    assert c.validate(specs=physical).warnings == []
    assert "warning: record big" in "\n".join(report.warning_lines())


def test_geometry_spread_per_study_and_anisotropy(tmp_path):
    c = Cohort(tmp_path)
    c.add("iso", [T1(c.image("T1", "iso.nii.gz", affine=np.diag([1.0, 1.0, 1.0, 1.0])))])
    c.add("thick", [T1(c.image("T1", "thick.nii.gz", affine=np.diag([0.9, 0.9, 4.0, 1.0])))])
    report = c.validate()
    assert [(w.kind, w.record_id) for w in report.warnings] == [
        ("extreme_anisotropy", "thick")]
    assert report.geometry == {"ABCD T1": {"images": 2,
                                           "voxel_mm": ([0.9, 0.9, 1.0], [1.0, 1.0, 4.0]),
                                           "fov_mm": ([7.2, 7.2, 8.0], [8.0, 8.0, 32.0])}}
    assert "ABCD T1: 2 images; voxel mm 0.9x0.9x1 .. 1x1x4" in report.geometry_table()


def test_fmri_without_tr_warns_unless_the_study_knows_it(tmp_path):
    c = Cohort(tmp_path)
    name = c.image("rsfMRI", "run.nii.gz", _vol(SHAPE + (MIN_FRAMES,)))

    def no_tr(header):
        header["pixdim"][4] = 0.0

    _patch_header(c.roots["rsfMRI"] / name, no_tr)
    c.raw(json.dumps({"id": "r", "subject_id": "r", "study": "HBN", "task": "sex",
                      "images": [FMRI(name)], "conversations": [
                          {"from": "human", "value": "<image>\nSex?"},
                          {"from": "gpt", "value": "male"}]}))
    report = c.validate()
    assert [(w.kind, w.record_id) for w in report.warnings] == [("fmri_no_tr", "r")]
    assert "studies.HBN.tr" in report.warnings[0].fix
    assert c.validate(studies={"HBN": {"tr": 0.8}}).warnings == []


def test_duplicate_scan_across_splits_is_a_leak(tmp_path):
    c = Cohort(tmp_path)
    data = _vol()
    c.add("x", [T1(c.image("T1", "x.nii.gz", data))], split="train")
    c.add("y", [T1(c.image("T1", "copy_of_x.nii", data))], split="test")
    report = c.validate()
    assert [(p.kind, p.record_id) for p in report.problems] == [("duplicate_scan", "y")]
    assert "a leak: split 'train' vs 'test'" in report.problems[0].message


@pytest.mark.parametrize("encode", [
    lambda text: b"\xef\xbb\xbf" + text.encode("utf-8"),  # a BOM
    lambda text: text.replace("\n", "\r\n").encode("utf-8"),  # Windows line endings
    lambda text: text.encode("cp1252"),  # a spreadsheet export on Windows
], ids=["bom", "crlf", "cp1252"])
def test_records_files_from_common_tools_are_accepted(tmp_path, encode):
    from umbrella.data.records import load_records

    c = Cohort(tmp_path)
    c.add("s-é", [T1(c.image("T1", "s.nii.gz"))])
    path = c.write()[0]
    text = path.read_text(encoding="utf-8").replace("\\u00e9", "é")
    path.write_bytes(encode(text))
    report = validate_records_files([path], c.roots, progress=False)
    assert report.ok, report.lines()
    assert [r.id for r in load_records(path, c.roots)] == ["s-é"]
