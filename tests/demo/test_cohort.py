"""Tests for the embedded demo cohort (small cohorts: 48^3 at 4.2 mm, same field of view)."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from umbrella.demo.anatomy import FOV_CENTRE_MM, _Job, output_affine
from umbrella.demo.cohort import (
    DemoCohort,
    DemoSubject,
    _draw_phenotypes,
    build_demo_cohort,
    planted_effects,
    synthesize_subject,
)
from umbrella.errors import ConfigError

SMALL = {"n_subjects": 6, "image_size": (48, 48, 48), "voxel_mm": 4.2, "progress": False}


def _arrays(cohort: DemoCohort) -> list[np.ndarray]:
    return [np.asanyarray(nib.load(cohort.root / s.t1_path).dataobj) for s in cohort.subjects]


def _raw(cohort: DemoCohort) -> list[tuple[np.ndarray, float, float]]:
    out = []
    for s in cohort.subjects:
        img = nib.load(cohort.root / s.t1_path)
        out.append((img.dataobj.get_unscaled(), float(img.dataobj.slope), float(img.dataobj.inter)))
    return out


def _brain_volume_ml(img: nib.Nifti1Image) -> float:
    """Voxels above 12 % of the 99.5th percentile (white matter), in mL."""
    data = np.asanyarray(img.dataobj)
    threshold = 0.12 * np.percentile(data, 99.5)
    return float((data > threshold).sum() * np.prod(img.header.get_zooms()) / 1000)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> DemoCohort:
    return build_demo_cohort(tmp_path_factory.mktemp("demo_w2"), seed=0, workers=2, **SMALL)


@pytest.fixture(scope="module")
def cohort_w1(tmp_path_factory) -> DemoCohort:
    return build_demo_cohort(tmp_path_factory.mktemp("demo_w1"), seed=0, workers=1, **SMALL)


def test_files_and_phenotype(cohort: DemoCohort):
    assert [s.subject_id for s in cohort.subjects] == [f"sub-{i:04d}" for i in range(1, 7)]
    assert all(not Path(s.t1_path).is_absolute() for s in cohort.subjects)
    assert all((cohort.root / s.t1_path).is_file() for s in cohort.subjects)
    assert (cohort.root / "cohort.json").is_file()
    with cohort.phenotype_csv.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["subject_id", "sex", "age", "study"]
    assert [r["subject_id"] for r in rows] == [s.subject_id for s in cohort.subjects]
    assert sorted(r["sex"] for r in rows) == ["female"] * 3 + ["male"] * 3
    assert {r["study"] for r in rows} == {"DEMO"}
    ages = [float(r["age"]) for r in rows]
    assert all(20 <= a <= 80 for a in ages)
    assert ages == [s.age for s in cohort.subjects] == [round(a, 1) for a in ages]


def test_nifti_grid_dtype_and_scaling(cohort: DemoCohort):
    for s in cohort.subjects:
        img = nib.load(cohort.root / s.t1_path)
        assert img.shape == (48, 48, 48)
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        np.testing.assert_allclose(img.affine, output_affine((48, 48, 48), 4.2), atol=1e-4)
        np.testing.assert_allclose(img.header.get_zooms(), (4.2, 4.2, 4.2), rtol=1e-6)
        centre = img.affine @ np.array([23.5, 23.5, 23.5, 1.0])
        np.testing.assert_allclose(centre[:3], FOV_CENTRE_MM, atol=1e-4)
        assert img.get_data_dtype() == np.int16
        assert img.dataobj.get_unscaled().dtype == np.int16
        with gzip.open(cohort.root / s.t1_path, "rb") as fh:  # the header as stored on disk
            on_disk = nib.Nifti1Header.from_fileobj(fh)
        slope, inter = float(on_disk["scl_slope"]), float(on_disk["scl_inter"])
        assert np.isfinite(slope) and 0 < slope < 1 and np.isfinite(inter)
        assert (float(img.dataobj.slope), float(img.dataobj.inter)) == (slope, inter)
        assert on_disk["sform_code"] > 0 and on_disk["qform_code"] > 0
        data = np.asanyarray(img.dataobj)
        assert data.dtype.kind == "f" and data.min() >= 0
        assert 800 < np.percentile(data, 99.5) < 1500  # white matter ~1000 x gain x bias


def test_same_seed_identical_and_worker_count_irrelevant(cohort, cohort_w1, tmp_path):
    again = build_demo_cohort(tmp_path, seed=0, workers=2, **SMALL)
    for (a, sa, ia), (b, sb, ib), (c, sc, ic) in zip(_raw(cohort), _raw(again), _raw(cohort_w1),
                                                     strict=True):
        assert np.array_equal(a, b) and (sa, ia) == (sb, ib)
        assert np.array_equal(a, c) and (sa, ia) == (sc, ic)
    assert cohort.subjects == again.subjects == cohort_w1.subjects
    for s in cohort.subjects:  # gzip stream is deterministic too: files are byte-identical
        assert (cohort.root / s.t1_path).read_bytes() == (cohort_w1.root / s.t1_path).read_bytes()
    assert cohort.phenotype_csv.read_bytes() == again.phenotype_csv.read_bytes()


def test_different_seed_differs(cohort, tmp_path):
    other = build_demo_cohort(tmp_path, seed=1, workers=1, **SMALL)
    assert [s.sex for s in other.subjects] != [s.sex for s in cohort.subjects] or \
        [s.age for s in other.subjects] != [s.age for s in cohort.subjects]
    for a, b in zip(_arrays(cohort), _arrays(other), strict=True):
        assert not np.array_equal(a, b)
        assert np.abs(a - b).mean() > 10  # not just a rounding difference


def test_planted_sex_effect_on_brain_volume(cohort):
    volumes = {"male": [], "female": []}
    for s in cohort.subjects:
        volumes[s.sex].append(_brain_volume_ml(nib.load(cohort.root / s.t1_path)))
    male, female = np.mean(volumes["male"]), np.mean(volumes["female"])
    expected = (1.05 / 0.95) ** 3  # 1.350
    assert 1300 < female < 2200 and 1300 < male < 2600  # template brain mask is ~1880 mL
    assert min(volumes["male"]) > max(volumes["female"])
    assert male / female == pytest.approx(expected, rel=0.06)


def test_planted_age_effects():
    """Same subject draw at 20 vs 80 years: more central CSF, darker grey matter."""
    size = (96, 96, 96)
    young, old = (synthesize_subject(_Job(0, 0, "female", age, size, 2.1, 0.05, ""))
                  for age in (20.0, 80.0))
    world = np.moveaxis(np.indices(size) * 2.1, 0, -1) + output_affine(size, 2.1)[:3, 3]
    x, y, z = np.moveaxis(world, -1, 0)
    box = (abs(x) < 25) & (y > -45) & (y < 30) & (z > -5) & (z < 40)

    def central_csf(v):
        return int((box & (v > 120) & (v < 0.45 * np.percentile(v, 99.5))).sum())

    assert 1.15 < central_csf(old) / central_csf(young) < 1.5  # measured 1.26
    gm = (young > 650) & (young < 800) & ~box  # cortical grey-matter intensities at age 20
    drop = 1 - old[gm].mean() / young[gm].mean()
    assert 0.03 < drop < 0.12  # 15 % of the GM-CSF contrast ~ 8 % of GM intensity


def test_no_sex_effect_when_scale_zero(tmp_path):
    flat = build_demo_cohort(tmp_path, seed=0, workers=1, sex_scale=0.0, **SMALL)
    volumes = {"male": [], "female": []}
    for s in flat.subjects:
        volumes[s.sex].append(_brain_volume_ml(nib.load(flat.root / s.t1_path)))
    assert np.mean(volumes["male"]) / np.mean(volumes["female"]) == pytest.approx(1.0, abs=0.05)


def _tiny(tmp: Path, **over) -> DemoCohort:
    args = {"n_subjects": 2, "image_size": (24, 24, 24), "voxel_mm": 8.4, "workers": 1,
            "progress": False} | over
    return build_demo_cohort(tmp, **args)


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_rerun_reuses_and_changed_parameter_regenerates(tmp_path):
    first = _tiny(tmp_path)
    before = _mtimes(tmp_path)
    assert set(before) == {"cohort.json", "phenotype.csv", "images/sub-0001_T1w.nii.gz",
                           "images/sub-0002_T1w.nii.gz"}  # no temp files left behind
    second = _tiny(tmp_path, workers=2, progress=True)  # workers/progress are not parameters
    assert second == first and _mtimes(tmp_path) == before
    third = _tiny(tmp_path, sex_scale=0.08)
    after = _mtimes(tmp_path)
    assert set(after) == set(before)
    assert all(after[k] != before[k] for k in before)
    assert json.loads((tmp_path / "cohort.json").read_text())["parameters"]["sex_scale"] == 0.08
    assert third.subjects == first.subjects  # phenotypes depend on n_subjects and seed only


def test_missing_image_regenerates(tmp_path):
    cohort = _tiny(tmp_path)
    (tmp_path / cohort.subjects[1].t1_path).unlink()
    _tiny(tmp_path)
    assert (tmp_path / cohort.subjects[1].t1_path).is_file()


def test_foreign_cohort_json_is_refused_and_untouched(tmp_path):
    (tmp_path / "cohort.json").write_text('{"something": "else"}')
    with pytest.raises(ConfigError, match="not written by build_demo_cohort"):
        _tiny(tmp_path)
    assert (tmp_path / "cohort.json").read_text() == '{"something": "else"}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohort.json"]


def test_manifest_contents(cohort):
    manifest = json.loads((cohort.root / "cohort.json").read_text())
    import umbrella

    assert manifest["parameters"] == {
        "n_subjects": 6, "seed": 0, "image_size": [48, 48, 48], "voxel_mm": 4.2,
        "sex_scale": 0.05, "generator_version": 1, "umbrella_version": umbrella.__version__}
    assert [DemoSubject(**s) for s in manifest["subjects"]] == list(cohort.subjects)


@pytest.mark.parametrize("bad, key", [
    ({"n_subjects": 1}, "n_subjects"), ({"seed": -1}, "seed"), ({"image_size": (4, 4)}, "image_size"),
    ({"voxel_mm": 0.0}, "voxel_mm"), ({"sex_scale": 0.7}, "sex_scale"), ({"workers": -2}, "workers"),
])
def test_bad_parameters_raise_config_error(tmp_path, bad, key):
    with pytest.raises(ConfigError, match=key):
        build_demo_cohort(tmp_path / "x", **({"progress": False} | bad))
    assert not (tmp_path / "x").exists()


def test_phenotype_draw_balance_and_range():
    for n in (2, 7, 200):
        subjects = _draw_phenotypes(n, seed=3)
        males = sum(s.sex == "male" for s in subjects)
        assert abs(2 * males - n) == n % 2
    subjects = _draw_phenotypes(200, seed=3)
    ages = np.array([s.age for s in subjects])
    assert ages.min() >= 20 and ages.max() <= 80 and 45 < ages.mean() < 55
    assert subjects == _draw_phenotypes(200, seed=3) != _draw_phenotypes(200, seed=4)


def test_planted_effects_description():
    effects = planted_effects()
    assert set(effects) >= {"sex", "age", "nuisance"}
    assert effects["age"]["ventricle_enlargement"]["radial_pull_at_80"] == 0.25
    assert effects["nuisance"]["rotation_deg"] == 5.0
    json.dumps(effects)  # serialisable for reports
