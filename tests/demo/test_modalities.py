"""rsfMRI and dMRI in the demo cohort: files, planted effects, the real DWI, records, reuse."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from umbrella.demo.anatomy import output_affine
from umbrella.demo.cohort import DemoCohort, build_demo_cohort
from umbrella.demo.modalities import (
    COUPLED,
    COUPLING,
    NETWORKS,
    DmriSettings,
    FmriSettings,
    SessionJob,
    network_signals,
    session_maps,
    synthesize_rsfmri,
)
from umbrella.errors import ConfigError

ALL = ("T1", "rsfMRI", "dMRI")
GRID, VOXEL, FRAMES = (32, 32, 32), 6.3, 24
SMALL = {"n_subjects": 8, "image_size": (16, 16, 16), "voxel_mm": 12.6, "progress": False,
         "modalities": ALL, "rsfmri": FmriSettings(GRID, VOXEL, FRAMES, 2.0, frame_folders=2),
         "dmri": DmriSettings(GRID, VOXEL)}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> DemoCohort:
    return build_demo_cohort(tmp_path_factory.mktemp("mm"), seed=0, workers=2, **SMALL)


def _job(cohort: DemoCohort, i: int, modality: str) -> SessionJob:
    s = cohort.subjects[i]
    extra = {"n_frames": FRAMES, "tr": 2.0} if modality == "rsfMRI" else {}
    return SessionJob(modality, i, 0, s.sex, s.age, 0.05, GRID, VOXEL, "", **extra)


def _run(cohort: DemoCohort, i: int) -> np.ndarray:
    from umbrella.data.fmri import read_fmri_run

    return read_fmri_run(cohort.root / cohort.subjects[i].rsfmri_path)[0]


def test_layout_and_manifest(cohort):
    subjects = cohort.subjects
    assert cohort.modalities == ALL
    assert [s.rsfmri_path for s in subjects[-2:]] == ["rsfmri/sub-0007_bold", "rsfmri/sub-0008_bold"]
    assert all(s.rsfmri_path == f"rsfmri/{s.subject_id}_bold.nii.gz" for s in subjects[:-2])
    assert all(s.dmri_path == f"dwi/{s.subject_id}_FA.nii.gz" for s in subjects)
    assert cohort.real_dwi == {"path": "dwi/real_dwi.nii.gz", "bval": "dwi/real_dwi.bval",
                               "bvec": "dwi/real_dwi.bvec"}
    manifest = json.loads((cohort.root / "cohort.json").read_text())
    params = manifest["parameters"]
    assert params["modalities"] == list(ALL)
    assert params["rsfMRI"] == {"image_size": [32, 32, 32], "voxel_mm": 6.3, "n_frames": 24,
                                "tr": 2.0, "frame_folders": 2}
    assert params["dMRI"] == {"image_size": [32, 32, 32], "voxel_mm": 6.3, "real_dwi": True}
    effects = manifest["planted_effects"]["rsfMRI"]["sex_connectivity"]
    assert effects["networks"] == ["DMN", "FPN"]
    assert (effects["correlation_female"], effects["correlation_male"]) == (0.7, 0.0)
    assert manifest["real_dwi"]["path"] == "dwi/real_dwi.nii.gz"
    assert not list(cohort.root.rglob("*.tmp*"))  # atomic writes leave nothing behind


def test_rsfmri_nifti_is_4d_ras_with_tr(cohort):
    for s in cohort.subjects[:-2]:
        img = nib.load(cohort.root / s.rsfmri_path)
        assert img.shape == (*GRID, FRAMES)
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        np.testing.assert_allclose(img.affine, output_affine(GRID, VOXEL), atol=1e-4)
        np.testing.assert_allclose(img.header.get_zooms(), (VOXEL, VOXEL, VOXEL, 2.0), rtol=1e-6)
        assert img.header.get_xyzt_units() == ("mm", "sec")
        assert img.get_data_dtype() == np.int16 and 0 < float(img.dataobj.slope) < 1
        data = np.asanyarray(img.dataobj)
        brain = data.mean(axis=3) > 0
        assert 0.1 < brain.mean() < 0.6 and data[~brain].max() == 0  # brain-extracted
        assert 800 < np.median(data[brain]) < 1400  # EPI level ~1000 x gain


def test_rsfmri_frame_folders_match_the_synthesis(cohort):
    from umbrella.data.fmri import read_fmri_run, read_frame_stats

    for i in (6, 7):
        folder = cohort.root / cohort.subjects[i].rsfmri_path
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            [f"frame_{t}.pt" for t in range(FRAMES)] + ["global_stats.pt"])
        run, affine = read_fmri_run(folder)
        assert affine is None and run.shape == (*GRID, FRAMES)
        expected = synthesize_rsfmri(_job(cohort, i, "rsfMRI"))
        np.testing.assert_allclose(run, expected, rtol=1e-3, atol=0.5)  # float16 frames
        stats = read_frame_stats(folder)
        assert set(stats) == {"global_mean", "global_std"} and 800 < stats["global_mean"] < 1400


def test_network_signals_have_exactly_the_planted_correlations():
    rng = np.random.default_rng(3)
    names = list(NETWORKS)
    i, j = (names.index(n) for n in COUPLED)
    for sex in ("female", "male"):
        signals = network_signals(rng, sex, FRAMES, 2.0)
        assert signals.shape == (len(names), FRAMES)
        np.testing.assert_allclose(signals.mean(axis=1), 0, atol=1e-9)
        np.testing.assert_allclose(signals.std(axis=1), 1, atol=1e-9)
        expected = np.eye(len(names))
        expected[i, j] = expected[j, i] = COUPLING[sex]
        np.testing.assert_allclose(np.corrcoef(signals), expected, atol=1e-9)


def test_planted_connectivity_is_measurable_in_the_files(cohort):
    """Mean signal over each network's voxels: DMN-FPN correlate in females (0.7), not in males."""
    names = list(NETWORKS)
    i, j = (names.index(n) for n in COUPLED)
    r = {"female": [], "male": []}
    for k, s in enumerate(cohort.subjects):
        run = _run(cohort, k)
        nets = session_maps(_job(cohort, k, "rsfMRI"))["networks"]
        mean = [run[net > 0.5 * net.max()].mean(axis=0) for net in nets]
        r[s.sex].append(np.corrcoef(mean[i], mean[j])[0, 1])
        others = [np.corrcoef(mean[a], mean[b])[0, 1] for a in range(len(names))
                  for b in range(a + 1, len(names)) if {a, b} != {i, j}]
        assert max(abs(x) for x in others) < 0.4
    assert min(r["female"]) > 0.5 and max(abs(x) for x in r["male"]) < 0.3
    assert np.mean(r["female"]) - np.mean(r["male"]) > 0.5


def _brain_voxels(data: np.ndarray) -> int:
    return int((data > 0.1 * np.percentile(data, 99.5)).sum())


def test_sex_brain_scale_is_present_in_rsfmri_and_dmri(cohort):
    for modality in ("rsfMRI", "dMRI"):
        counts = {"male": [], "female": []}
        for k, s in enumerate(cohort.subjects):
            data = _run(cohort, k).mean(axis=3) if modality == "rsfMRI" else \
                np.asanyarray(nib.load(cohort.root / s.dmri_path).dataobj)
            counts[s.sex].append(_brain_voxels(data))
        assert min(counts["male"]) > max(counts["female"]), modality
        ratio = np.mean(counts["male"]) / np.mean(counts["female"])
        assert ratio == pytest.approx((1.05 / 0.95) ** 3, rel=0.1), modality


def test_dmri_fa_maps_in_unit_range_with_wm_above_gm(cohort):
    for k, s in enumerate(cohort.subjects):
        img = nib.load(cohort.root / s.dmri_path)
        assert img.shape == GRID and nib.aff2axcodes(img.affine) == ("R", "A", "S")
        assert img.get_data_dtype() == np.int16
        fa = np.asanyarray(img.dataobj)
        assert fa.min() >= 0 and fa.max() <= 1.0 + 1e-4
        maps = session_maps(_job(cohort, k, "dMRI"))
        wm, gm = fa[maps["wm"] > 0.8].mean(), fa[maps["gm"] > 0.6].mean()
        assert 0.55 < wm < 0.8 and 0.1 < gm < 0.3 and wm > gm + 0.3
        assert fa[maps["mask"] < 0.05].max() == 0  # 0 outside the brain


def test_real_dwi_goes_through_the_tensor_fit(cohort):
    from dipy.data import get_fnames

    from umbrella.data.dmri import find_gradients, preprocess_dmri
    from umbrella.data.volumes import VolumeSpec

    path = cohort.root / cohort.real_dwi["path"]
    original = nib.load(get_fnames(name="small_64D")[0])
    copied = nib.load(path)
    assert copied.shape == (10, 10, 10, 65)
    assert np.array_equal(np.asanyarray(copied.dataobj), np.asanyarray(original.dataobj))
    assert find_gradients(path) == (cohort.root / cohort.real_dwi["bval"],
                                    cohort.root / cohort.real_dwi["bvec"])
    fa = preprocess_dmri(path, VolumeSpec(image_size=(16, 16, 16), normalize="none"))
    assert fa.shape == (16, 16, 16) and fa.dtype == np.float32
    assert fa.min() >= 0 and fa.max() <= 1
    assert (fa > 0).sum() > 50 and np.percentile(fa[fa > 0], 90) > 0.3  # real anisotropy


def test_records_share_one_split_per_subject(cohort, tmp_path):
    from umbrella.data.catalog import by_split
    from umbrella.data.records import load_records
    from umbrella.demo.run import write_sex_records

    path = write_sex_records(cohort, tmp_path / "sex.jsonl", seed=0, modalities=ALL)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(rows) == 3 * len(cohort.subjects)
    assert {r["id"] for r in rows} == {f"{s.subject_id}_sex_{m}" for s in cohort.subjects
                                       for m in ALL}
    splits: dict[str, set] = {}
    for r in rows:
        modality = r["id"].rsplit("_", 1)[1]
        assert [im["modality"] for im in r["images"]] == [modality]
        subject = next(s for s in cohort.subjects if s.subject_id == r["subject_id"])
        assert r["images"][0]["path"] == subject.path(modality) and r["conversations"][1][
            "value"] == subject.sex
        splits.setdefault(r["subject_id"], set()).add(r["split"])
    assert all(len(v) == 1 for v in splits.values())
    assert {next(iter(v)) for v in splits.values()} == {"train", "val", "test"}
    assert not any("real_dwi" in json.dumps(r) for r in rows)  # unknown subject: no label
    records = load_records(path, {m: cohort.root for m in ALL})
    assert sum(len(v) for v in by_split(records).values()) == len(rows)
    t1_only = [json.loads(x) for x in write_sex_records(
        cohort, tmp_path / "t1.jsonl", seed=0).read_text().splitlines()]
    assert [r for r in rows if r["id"].endswith("_T1")] == t1_only  # adding modalities keeps T1


def test_records_refuse_modalities_the_cohort_lacks(tiny_cohort, tmp_path):
    from umbrella.demo.run import write_sex_records

    with pytest.raises(ConfigError, match="no rsfMRI images"):
        write_sex_records(tiny_cohort, tmp_path / "x.jsonl", seed=0, modalities=("rsfMRI",))
    with pytest.raises(ConfigError, match="unknown modality 'PET'"):
        write_sex_records(tiny_cohort, tmp_path / "x.jsonl", seed=0, modalities=("T1", "PET"))


TINY = {"n_subjects": 2, "image_size": (16, 16, 16), "voxel_mm": 12.6, "progress": False,
        "rsfmri": FmriSettings((16, 16, 16), 12.6, 12, 2.0, frame_folders=1),
        "dmri": DmriSettings((16, 16, 16), 12.6)}


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_adding_a_modality_keeps_the_complete_parts(tmp_path):
    build_demo_cohort(tmp_path, workers=1, **TINY)
    t1 = _mtimes(tmp_path)
    build_demo_cohort(tmp_path, workers=1, modalities=("T1", "rsfMRI"), **TINY)
    both = _mtimes(tmp_path)
    assert all(both[k] == t1[k] for k in t1 if k.startswith("images/"))
    assert {k.split("/")[0] for k in both} == {"images", "rsfmri", "cohort.json", "phenotype.csv"}
    build_demo_cohort(tmp_path, workers=2, modalities=("rsfMRI", "T1"), **TINY)  # same set
    assert _mtimes(tmp_path) == both  # nothing rewritten
    changed = TINY | {"rsfmri": FmriSettings((16, 16, 16), 12.6, 14, 2.0, frame_folders=1)}
    build_demo_cohort(tmp_path, workers=1, modalities=("T1", "rsfMRI"), **changed)
    after = _mtimes(tmp_path)
    assert all(after[k] == both[k] for k in both if k.startswith("images/"))
    assert (tmp_path / "rsfmri/sub-0002_bold/frame_13.pt").is_file()
    assert nib.load(tmp_path / "rsfmri/sub-0001_bold.nii.gz").shape[3] == 14


def test_sessions_do_not_depend_on_worker_count(tmp_path):
    one = build_demo_cohort(tmp_path / "w1", workers=1, modalities=ALL, **TINY)
    two = build_demo_cohort(tmp_path / "w2", workers=2, modalities=ALL, **TINY)
    assert one.subjects == two.subjects
    for a in one.subjects:
        for rel in (a.rsfmri_path, a.dmri_path):
            left, right = one.root / rel, two.root / rel
            if left.is_dir():
                assert all((left / f.name).read_bytes() == f.read_bytes()
                           for f in right.iterdir())
            else:
                assert left.read_bytes() == right.read_bytes()
    assert (one.root / "dwi/real_dwi.nii.gz").read_bytes() == \
        (two.root / "dwi/real_dwi.nii.gz").read_bytes()


@pytest.mark.parametrize("over, key", [
    ({"modalities": ("T1", "PET")}, "unknown modality 'PET'"),
    ({"modalities": ALL, "rsfmri": FmriSettings(n_frames=4)}, "rsfmri.n_frames"),
    ({"modalities": ALL, "dmri": DmriSettings(image_size=(4, 4, 4))}, "dmri.image_size"),
])
def test_bad_modality_settings_raise_config_error(tmp_path, over, key):
    with pytest.raises(ConfigError, match=key):
        build_demo_cohort(tmp_path / "x", **({"progress": False} | over))
    assert not (tmp_path / "x").exists()
