"""Tests for the realistic demo cohort: its truth, its field of view, its rsfMRI, its records.

Cohorts here are small: 8 mm voxels over the realistic 224 x 256 x 224 mm field of view.
"""

from __future__ import annotations

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest

from umbrella.demo import realistic as R
from umbrella.demo.anatomy import _Job, _rotation, _source_coords, _template, output_affine
from umbrella.demo.cohort import build_demo_cohort
from umbrella.demo.modalities import (
    DmriSettings,
    FmriSettings,
    SessionJob,
    session_maps,
    synthesize_rsfmri,
)
from umbrella.errors import ConfigError

GRID = (28, 32, 28)  # 8 mm over 224 x 256 x 224 mm
SMALL = {"image_size": GRID, "voxel_mm": 8.0, "progress": False,
         "rsfmri": FmriSettings(GRID, 8.0, n_frames=12, frame_folders=1)}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return build_demo_cohort(tmp_path_factory.mktemp("real"), 10, variant="realistic", seed=3,
                             workers=2, modalities=("T1", "rsfMRI"), **SMALL)


def _nifti(path) -> tuple[np.ndarray, nib.Nifti1Image]:
    img = nib.load(path)
    return np.asanyarray(img.dataobj), img


# ----------------------------------------------------------------------------- truth

def _latents(n: int, seed: int = 7) -> tuple[list[str], list[R.Latents]]:
    sexes = ["male", "female"] * (n // 2)
    return sexes, [R.subject_latents(seed, i, s, 60) for i, s in enumerate(sexes)]


def test_sex_accuracy_written_matches_monte_carlo_of_planted_scale(cohort):
    truth = json.loads((cohort.root / "truth.json").read_text())
    written = truth["tasks"]["sex"]["T1"]["achievable"]
    assert written == pytest.approx(0.8896, abs=5e-4)  # Phi(d/s) with d/s = 1.224
    # the cohort's own sampler, classified by the Bayes rule "scale > 1"
    sexes, lat = _latents(20000)
    hits = np.mean([(x.scale > 1) == (s == "male") for s, x in zip(sexes, lat, strict=True)])
    assert hits == pytest.approx(written, abs=0.01)  # 4.5 standard errors
    # and the parameters written in truth.json, simulated independently
    p = truth["planted"]["sex"]["T1_dMRI_brain_scale"]
    z = np.random.default_rng(0).standard_normal(400000)
    z = z[np.abs(z) < 4]
    assert np.mean(p["shift"] + p["sd"] * z > 0) == pytest.approx(written, abs=0.003)


def test_rsfmri_accuracy_written_matches_monte_carlo_of_planted_coupling(cohort):
    truth = json.loads((cohort.root / "truth.json").read_text())
    written = truth["tasks"]["sex"]["rsfMRI"]["achievable"]
    assert 0.85 <= written <= 0.9
    sexes, lat = _latents(20000)
    hits = np.mean([(x.coupling > 0) == (s == "male") for s, x in zip(sexes, lat, strict=True)])
    assert hits == pytest.approx(written, abs=0.01)


def test_achievable_age_mae_is_the_bayes_error():
    # far from the range ends it is the Gaussian's mean absolute deviation, 0.798 sd. The ends
    # lower the average by c / (range width): extrapolate two widths to an endless range
    short, long = (R.achievable_age_mae((0, w), sd=4.0, step=0.05) for w in (200, 400))
    assert short < long < 2 * long - short == pytest.approx(math.sqrt(2 / math.pi) * 4.0, rel=0.01)
    # inside a 45-year range the ends help: the written value is lower, and Monte Carlo of the
    # posterior-median estimator agrees with the integral
    mae = R.achievable_age_mae()
    assert 2.5 < mae < math.sqrt(2 / math.pi) * R.BRAIN_AGE_SD
    rng = np.random.default_rng(0)
    ages = rng.integers(R.AGE_RANGE[0], R.AGE_RANGE[1] + 1, 200000)
    b = ages + R.BRAIN_AGE_SD * rng.standard_normal(ages.size)
    bayes = np.abs(R.bayes_age(b) - ages).mean()
    assert bayes == pytest.approx(mae, abs=0.03)
    naive = np.abs(np.clip(np.round(b), *R.AGE_RANGE) - ages).mean()  # read b, clip to range
    assert bayes < naive


def test_truth_json_shape(cohort):
    truth = json.loads((cohort.root / "truth.json").read_text())
    assert set(truth) == {"variant", "tasks", "planted"} and truth["variant"] == "realistic"
    assert set(truth["tasks"]) == {"sex", "age"}
    assert set(truth["tasks"]["sex"]) == {"T1", "rsfMRI"}  # as built: no dMRI here
    for task, metric in (("sex", "accuracy"), ("age", "mae")):
        entry = truth["tasks"][task]["T1"]
        assert set(entry) == {"metric", "achievable", "note"} and entry["metric"] == metric
    assert truth["tasks"]["sex"]["T1"]["note"] == "Bayes-optimal from the planted brain scale"
    assert truth["tasks"]["age"]["T1"]["achievable"] == pytest.approx(R.achievable_age_mae(),
                                                                      abs=1e-4)
    assert truth["planted"] == R.planted_parameters()
    assert truth["planted"]["age"]["brain_age_sd"] == R.BRAIN_AGE_SD
    assert truth["planted"]["individual_anatomy"]["velocity_rms_mm"] == R.ANATOMY_RMS_MM
    manifest = json.loads((cohort.root / "cohort.json").read_text())
    assert manifest["parameters"]["variant"] == "realistic"
    assert manifest["parameters"]["planted"] == truth["planted"]


def test_planted_csv_matches_the_sampler(cohort):
    with (cohort.root / "planted.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["subject_id"] for r in rows] == [s.subject_id for s in cohort.subjects]
    for i, (row, s) in enumerate(zip(rows, cohort.subjects, strict=True)):
        lat = R.subject_latents(3, i, s.sex, s.age)
        assert row["sex"] == s.sex and float(row["age"]) == s.age
        assert float(row["scale"]) == pytest.approx(lat.scale, abs=1e-6)
        assert float(row["brain_age"]) == pytest.approx(lat.brain_age, abs=1e-6)
        assert float(row["coupling"]) == pytest.approx(lat.coupling, abs=1e-6)
    ages = [s.age for s in cohort.subjects]
    assert all(a == int(a) and R.AGE_RANGE[0] <= a <= R.AGE_RANGE[1] for a in ages)
    assert sorted(s.sex for s in cohort.subjects) == ["female"] * 5 + ["male"] * 5


# ----------------------------------------------------------------------------- field of view

def test_default_grids_hold_the_largest_brain():
    """Positive slack with the individual anatomy's largest move counted (it takes most of it:
    about 14 mm before, 3.5 mm T1 / 1 mm rsfMRI after)."""
    assert R.fov_slack_mm(R.IMAGE_SIZE, R.VOXEL_MM, R.max_scale("T1")) > 2
    assert R.fov_slack_mm(R.SESSION_IMAGE_SIZE, R.SESSION_VOXEL_MM, R.max_scale("rsfMRI")) > 0.5
    assert R.fov_slack_mm((96, 96, 96), 2.1, R.max_scale("T1")) < 0  # the basic grid would clip


def test_forward_map_inverts_the_sampler():
    """brain_in_fov_mm (used by the check) is the exact inverse of _source_coords."""
    tpl = _template()
    draw = R.draw_position(np.random.default_rng(5)) | {"scale": 1.07}
    job = _Job(0, 0, "male", 60.0, (12, 14, 12), 8.0, 0.0, "", variant="realistic")
    pull = 0.5
    coords = _source_coords(job, draw, tpl, pull=pull).reshape(3, -1)  # template voxels
    template_mm = (np.linalg.inv(tpl.inv_affine)[:3] @ np.vstack([coords, np.ones(coords.shape[1])])).T
    out = output_affine(job.image_size, 8.0)
    grid = np.indices(job.image_size).reshape(3, -1).T
    world = grid @ out[:3, :3].T + out[:3, 3]
    back = R.brain_in_fov_mm(template_mm, draw["scale"], draw["rotation"], draw["translation"], pull)
    np.testing.assert_allclose(back, world, atol=1e-6)


def _corner_draws(modality: str):
    """The largest scale of ``modality``, each corner rotation and the largest translation
    towards it: the draws most likely to push the brain out of the field of view."""
    for sign in np.array([[a, b, c] for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)]):
        yield {"scale": R.max_scale(modality), "translation": sign * R.TRANSLATION_MM,
               "rotation": _rotation(np.deg2rad(sign * R.ROTATION_DEG))}


def _outside_session_grid(displace=None, modality: str = "T1"):
    """For every corner draw: (brain voxels sampled, largest brain value sampled outside the
    rsfMRI grid) on that grid padded by 24 mm (4 mm voxels)."""
    from scipy.ndimage import map_coordinates

    tpl = _template()
    mask = tpl.mask.astype(np.float32)
    pad = 6
    size = tuple(n + 2 * pad for n in R.SESSION_IMAGE_SIZE)
    inner = tuple(slice(pad, pad + n) for n in R.SESSION_IMAGE_SIZE)
    job = _Job(0, 0, "male", 60.0, size, 4.0, 0.0, "", variant="realistic")
    for draw in _corner_draws(modality):
        warped = map_coordinates(mask, _source_coords(job, draw, tpl, pull=0.0, displace=displace),
                                 order=1)
        total = float(warped.sum())
        warped[inner] = 0
        yield total, float(warped.max())


def test_whole_brain_inside_for_extreme_draws():
    """The production sampler on a grid 24 mm wider than the field of view: for the largest
    scale, every corner rotation and the largest translation towards it, no brain falls outside."""
    for total, outside in _outside_session_grid():
        assert total > 1000
        assert outside == 0  # not one brain voxel beyond the field of view


def test_forward_map_inverts_the_sampler_with_individual_anatomy():
    """With the individual anatomy the forward map inverts the sampler up to the flow's
    discretisation (its inverse is the flow of the negated velocity)."""
    tpl = _template()
    draw = R.draw_position(np.random.default_rng(6)) | {"scale": 0.97}
    job = _Job(0, 0, "male", 60.0, (14, 16, 14), 8.0, 0.0, "", variant="realistic")
    anatomy, pull = R.individual_anatomy(2, 9), 0.2
    coords = _source_coords(job, draw, tpl, pull=pull, displace=anatomy.displace).reshape(3, -1)
    affine = np.linalg.inv(tpl.inv_affine)
    template_mm = (affine[:3, :3] @ coords + affine[:3, 3:]).T
    out = output_affine(job.image_size, 8.0)
    world = np.indices(job.image_size).reshape(3, -1).T @ out[:3, :3].T + out[:3, 3]
    back = R.brain_in_fov_mm(template_mm, draw["scale"], draw["rotation"], draw["translation"],
                             pull, anatomy)
    assert np.abs(back - world).max() < 1.0  # mm, against moves of up to 10 mm


def test_brain_inside_for_extreme_draws_with_individual_anatomy():
    """The sampler with the individual anatomies of several subjects (the two largest-moving
    of 8), at the largest scale, rotation and translation towards every corner: the brain
    stays within the rsfMRI grid (the tightest default)."""
    surface = R._mask_surface_mm()
    anatomies = [R.individual_anatomy(0, i) for i in range(8)]
    moves = [np.abs(a.undisplace(surface) - surface).max() for a in anatomies]
    for i in np.argsort(moves)[-2:]:
        for total, outside in _outside_session_grid(anatomies[i].displace, "rsfMRI"):
            assert total > 1000
            assert outside == 0


def test_individual_anatomy_deterministic_and_latents_unchanged():
    a, b = R.individual_anatomy(0, 1), R.individual_anatomy(0, 1)
    assert np.array_equal(a.forward, b.forward) and np.array_equal(a.velocity, b.velocity)
    assert not np.allclose(a.forward, R.individual_anatomy(0, 2).forward)
    assert not np.allclose(a.forward, R.individual_anatomy(1, 1).forward)
    # its own stream: the hidden variables are those drawn before individual anatomy existed
    lat = R.subject_latents(0, 1, "male", 60)
    assert lat == R.Latents(scale=1.0360629491475286, brain_age=57.040751841209044,
                            rsfmri_scale=0.9787383097518734, coupling=0.471302909012737)


def test_grid_sampling_matches_pointwise_sampling():
    """displace_grid (T1 grids: every second point, then linear) stays close to displace, and
    is displace itself on coarser grids."""
    anatomy = R.individual_anatomy(0, 3)
    for shape, voxel, rms in (((23, 26, 21), 2.0, 0.15), ((9, 10, 9), 4.0, 0.0)):
        lin = _rotation(np.deg2rad([5.0, -3.0, 7.0])) * voxel
        off = np.array([0.0, -17.0, 5.0]) - lin @ ((np.asarray(shape) - 1) / 2)
        points = np.tensordot(lin, np.indices(shape, dtype=np.float64), axes=1) \
            + off[:, None, None, None]
        diff = anatomy.displace_grid(points) - anatomy.displace(points)
        assert np.sqrt((diff ** 2).sum(0).mean()) <= rms + 1e-9


def _template_grid_mm():
    tpl = _template()
    affine = np.linalg.inv(tpl.inv_affine)
    idx = np.indices(tpl.mask.shape).reshape(3, -1)
    return tpl, affine[:3, :3] @ idx + affine[:3, 3:]


def test_individual_anatomy_is_volume_preserving_with_documented_amplitude():
    """On the template's 2 mm grid: Jacobian determinant near 1 on the brain, grey matter and
    CSF amounts kept, rms displacement near the documented velocity rms, no point of the
    brain's surface moved beyond the cap."""
    from scipy.ndimage import binary_erosion, map_coordinates

    tpl, points = _template_grid_mm()
    shape = tpl.mask.shape
    csf = (np.clip(1 - tpl.gm - tpl.wm, 0, 1) * tpl.mask).astype(np.float32)
    surface = tpl.mask & ~binary_erosion(tpl.mask)
    rms = []
    for index in range(3):
        anatomy = R.individual_anatomy(4, index)
        source = anatomy.displace(points)
        u = (source - points).reshape(3, *shape)
        grad = [np.gradient(c, 2.0) for c in u]
        jac = np.stack([np.stack([grad[i][j] + (i == j) for j in range(3)], -1)
                        for i in range(3)], -2)
        det = np.linalg.det(jac[tpl.mask])
        assert np.abs(det - 1).mean() < 0.05 and abs(det.mean() - 1) < 0.005
        vox = tpl.inv_affine[:3, :3] @ source + tpl.inv_affine[:3, 3:]
        for tissue in (tpl.gm, csf):
            moved = map_coordinates(tissue, vox, order=1).sum()
            assert moved == pytest.approx(float(tissue.sum()), rel=0.01)
        move = np.linalg.norm(u[:, tpl.mask], axis=0)
        assert np.linalg.norm(u[:, surface], axis=0).max() <= R.ANATOMY_MAX_MM  # the cap
        # the displacement's rms is the (capped) velocity's, a little less (the flow bends)
        rms.append(float(np.sqrt((move ** 2).mean())) / (R.ANATOMY_RMS_MM * anatomy.velocity_scale))
        assert anatomy.velocity_scale > 0.6
    assert 0.8 < np.mean(rms) < 1.02


class _NoAnatomy:
    @staticmethod
    def displace(points):
        return points

    displace_grid = displace


def test_sessions_follow_the_individual_anatomy(monkeypatch):
    """An rsfMRI session's maps follow the subject's own deformation (the one its T1 has):
    they differ from the same session without it, with the same amount of grey matter."""
    job = SessionJob("rsfMRI", 2, 5, "male", 60.0, 0.0, GRID, 8.0, "", variant="realistic",
                     scale=1.0, brain_age=60.0, coupling=0.1)
    with_anatomy = session_maps(job)["gm"]
    monkeypatch.setattr(R, "individual_anatomy", lambda seed, index: _NoAnatomy())
    without = session_maps(job)["gm"]
    assert np.abs(with_anatomy - without).max() > 0.2
    assert with_anatomy.sum() == pytest.approx(float(without.sum()), rel=0.02)


def test_too_small_field_of_view_refused(tmp_path):
    with pytest.raises(ConfigError, match="clips the largest brain"):
        build_demo_cohort(tmp_path / "c", 4, variant="realistic", image_size=(24, 24, 24),
                          voxel_mm=8.0, progress=False)
    assert not (tmp_path / "c").exists()
    with pytest.raises(ConfigError, match="sex_scale applies to the basic cohort only"):
        build_demo_cohort(tmp_path / "c", 4, variant="realistic", sex_scale=0.1, **SMALL)
    with pytest.raises(ConfigError, match="variant must be one of basic, realistic"):
        build_demo_cohort(tmp_path / "c", 4, variant="real", **SMALL)


# ----------------------------------------------------------------------------- images

def test_images_stored_las_and_read_back_as_the_synthesized_volume(cohort):
    from umbrella.demo.cohort import synthesize_subject

    s = cohort.subjects[0]
    data, img = _nifti(cohort.root / s.t1_path)
    assert nib.aff2axcodes(img.affine) == ("L", "A", "S") and img.get_data_dtype() == np.int16
    canonical = nib.as_closest_canonical(img)
    np.testing.assert_allclose(canonical.affine, output_affine(GRID, 8.0), atol=1e-4)
    lat = R.subject_latents(3, 0, s.sex, s.age)
    job = _Job(0, 3, s.sex, s.age, GRID, 8.0, 0.0, "", variant="realistic", scale=lat.scale,
               brain_age=lat.brain_age)
    expected = synthesize_subject(job)
    np.testing.assert_allclose(np.asanyarray(canonical.dataobj), expected,
                               atol=float(img.dataobj.slope) + 1e-3)
    run, run_img = _nifti(cohort.root / s.rsfmri_path)
    assert nib.aff2axcodes(run_img.affine) == ("L", "A", "S") and run.shape == (*GRID, 12)


def test_older_brains_have_larger_ventricles_and_darker_cortex():
    from umbrella.demo.cohort import synthesize_subject

    tpl = _template()
    vc = R._anatomy.VENTRICLE_CENTRE_MM
    young, old = (synthesize_subject(_Job(1, 0, "male", 60.0, (56, 64, 56), 4.0, 0.0, "",
                                          variant="realistic", scale=1.0, brain_age=b))
                  for b in (40.0, 85.0))
    # same nuisance: only the brain age differs. Dark voxels near the ventricle centre grow
    out = output_affine((56, 64, 56), 4.0)
    centre = np.round(np.linalg.solve(out[:3, :3], np.asarray(vc) - out[:3, 3])).astype(int)
    box = tuple(slice(c - 6, c + 7) for c in centre)
    wm = np.percentile(young, 99)
    assert (old[box] < 0.5 * wm).sum() > 1.3 * (young[box] < 0.5 * wm).sum()
    assert R.aged_t1(85.0)[tpl.gm > 0.5].mean() < R.aged_t1(40.0)[tpl.gm > 0.5].mean() - 0.03


def test_csf_contrast_curve_moves_csf_only_and_keeps_mixtures():
    tpl = _template()
    csf, gm = tpl.csf_level, tpl.gm_level
    assert 0 < csf < gm < 1
    mix = csf + 0.3 * (gm - csf)  # 30 % of the way from CSF to GM (an aged cortical voxel)
    levels = np.array([0.0, csf, mix, gm, 0.9, 1.0, 1.2], dtype=np.float32)
    for factor in (0.9, 1.1):
        out = R.with_csf_contrast(levels, factor)
        np.testing.assert_allclose(out[[0, 3, 4, 5, 6]], levels[[0, 3, 4, 5, 6]], atol=1e-6)
        np.testing.assert_allclose(out[1], csf * factor, rtol=1e-6)
        # the mixing fraction between the scan's CSF level and GM is kept
        np.testing.assert_allclose((out[2] - out[1]) / (out[3] - out[1]), 0.3, rtol=1e-5)
        assert np.all(np.diff(out) > 0)  # a contrast curve: monotone


def test_csf_contrast_draw_is_its_own_stream_within_range():
    factors = [R.csf_contrast(0, i, 0.1) for i in range(200)]
    assert factors == [R.csf_contrast(0, i, 0.1) for i in range(200)]
    assert min(factors) >= 0.9 and max(factors) <= 1.1 and max(factors) - min(factors) > 0.15
    assert R.csf_contrast(1, 0, 0.1) != R.csf_contrast(0, 0, 0.1)
    assert R.csf_contrast(0, 0, 0.0) == 1.0
    for bad in (-0.1, 0.5, float("nan")):
        with pytest.raises(ValueError, match="csf_contrast"):
            R.csf_contrast(0, 0, bad)
    assert "T1_csf_contrast" not in R.planted_parameters()["nuisance"]  # off by default
    planted = R.planted_parameters(0.1)
    assert planted["nuisance"]["T1_csf_contrast"]["spread"] == 0.1
    assert planted["seeds"]["T1_csf_contrast"] == "SeedSequence([seed, index, 5])"
    assert R.truth(("T1",), 0.1)["tasks"] == R.truth(("T1",))["tasks"]  # the limits stay


def test_t1_scan_has_its_own_csf_level():
    """The same subject under two CSF contrasts: the ventricles' CSF moves by the factor, the
    white matter does not."""
    from umbrella.demo.cohort import synthesize_subject

    vols = {f: synthesize_subject(_Job(3, 0, "male", 70.0, (56, 64, 56), 4.0, 0.0, "",
                                       variant="realistic", scale=1.0, brain_age=75.0,
                                       csf_factor=f))
            for f in (0.9, 1.1)}
    out = output_affine((56, 64, 56), 4.0)
    vc = np.asarray(R._anatomy.VENTRICLE_CENTRE_MM)
    centre = np.round(np.linalg.solve(out[:3, :3], vc - out[:3, 3])).astype(int)
    box = tuple(slice(c - 3, c + 4) for c in centre)
    dark = vols[0.9][box] < 0.5 * np.percentile(vols[0.9], 99)  # ventricle CSF voxels
    assert dark.sum() > 20
    ratio = vols[1.1][box][dark].mean() / vols[0.9][box][dark].mean()
    assert 1.12 < ratio < 1.3  # 1.1 / 0.9 = 1.22 on pure CSF, less with noise and mixtures
    bright = vols[0.9] > np.percentile(vols[0.9], 98)
    np.testing.assert_allclose(vols[1.1][bright].mean(), vols[0.9][bright].mean(), rtol=0.01)


def test_cohort_with_csf_contrast_records_it_and_differs_only_in_t1(tmp_path):
    small = dict(SMALL, modalities=("T1",))
    with pytest.raises(ConfigError, match="realistic cohort only"):
        build_demo_cohort(tmp_path / "b", 4, csf_contrast=0.1, progress=False)
    with pytest.raises(ConfigError, match=r"csf_contrast must be a number in \[0, 0.5\)"):
        build_demo_cohort(tmp_path / "c", 4, variant="realistic", csf_contrast=0.7, **small)
    plain = build_demo_cohort(tmp_path / "plain", 6, variant="realistic", **small)
    varied = build_demo_cohort(tmp_path / "varied", 6, variant="realistic", csf_contrast=0.2,
                               **small)
    manifest = json.loads((varied.root / "cohort.json").read_text())
    assert manifest["parameters"]["planted"]["nuisance"]["T1_csf_contrast"]["spread"] == 0.2
    truth = json.loads((varied.root / "truth.json").read_text())
    assert truth["planted"] == R.planted_parameters(0.2)
    # planted.csv: the same hidden variables, plus each T1 scan's CSF factor
    with (plain.root / "planted.csv").open(newline="") as fh:
        plain_rows = list(csv.DictReader(fh))
    with (varied.root / "planted.csv").open(newline="") as fh:
        varied_rows = list(csv.DictReader(fh))
    assert "T1_csf_factor" not in plain_rows[0]
    factors = [float(r.pop("T1_csf_factor")) for r in varied_rows]
    assert varied_rows == plain_rows
    assert factors == pytest.approx([R.csf_contrast(manifest["parameters"]["seed"], i, 0.2)
                                     for i in range(6)], abs=1e-6)
    assert all(0.8 <= f <= 1.2 for f in factors) and len(set(factors)) == 6
    moved = [not np.array_equal(nib.load(plain.root / s.t1_path).get_fdata(),
                                nib.load(varied.root / s.t1_path).get_fdata())
             for s in plain.subjects]
    assert all(moved)
    # the spread is part of the cohort's identity: the same folder rebuilt without it regenerates
    again = build_demo_cohort(tmp_path / "varied", 6, variant="realistic", **small)
    assert "T1_csf_contrast" not in json.loads(
        (again.root / "cohort.json").read_text())["parameters"]["planted"]["nuisance"]
    np.testing.assert_array_equal(nib.load(again.root / again.subjects[0].t1_path).get_fdata(),
                                  nib.load(plain.root / plain.subjects[0].t1_path).get_fdata())


def test_csf_contrast_leaves_the_rsfmri_runs_as_they_were(tmp_path):
    """The contrast acts on T1 only, from its own seed stream: a cohort's rsfMRI runs are the
    same with and without it (the learning benchmark's rsfMRI part relies on this)."""
    kw = dict(SMALL, modalities=("T1", "rsfMRI"), variant="realistic")
    plain = build_demo_cohort(tmp_path / "plain", 4, **kw)
    varied = build_demo_cohort(tmp_path / "varied", 4, csf_contrast=0.1, **kw)
    files = sorted(p.relative_to(plain.root) for p in (plain.root / "rsfmri").rglob("*")
                   if p.is_file())
    assert files == sorted(p.relative_to(varied.root) for p in (varied.root / "rsfmri").rglob("*")
                           if p.is_file())
    assert len(files) >= 4  # 3 runs and a frame folder
    for rel in files:
        if rel.name.endswith((".nii", ".nii.gz")):
            np.testing.assert_array_equal(nib.load(plain.root / rel).get_fdata(),
                                          nib.load(varied.root / rel).get_fdata())
        else:
            assert (plain.root / rel).read_bytes() == (varied.root / rel).read_bytes(), rel
    assert any(not np.array_equal(nib.load(plain.root / s.t1_path).get_fdata(),
                                  nib.load(varied.root / s.t1_path).get_fdata())
               for s in plain.subjects)


def test_rsfmri_anatomy_does_not_depend_on_sex():
    male, female = (R.subject_latents(11, 4, s, 62) for s in ("male", "female"))
    assert male.rsfmri_scale == female.rsfmri_scale and male.brain_age == female.brain_age
    assert male.scale - female.scale == pytest.approx(2 * R.SEX_SCALE_SHIFT)
    assert male.coupling - female.coupling == pytest.approx(2 * R.COUPLING_MEAN)

    def job(sex, lat):
        return SessionJob("rsfMRI", 4, 11, sex, 62.0, 0.0, GRID, 8.0, "", n_frames=40, tr=2.0,
                          variant="realistic", scale=lat.rsfmri_scale, brain_age=lat.brain_age,
                          coupling=lat.coupling)

    jm, jf = job("male", male), job("female", female)
    maps_m, maps_f = session_maps(jm), session_maps(jf)
    for key in ("gm", "wm", "mask", "networks"):
        np.testing.assert_array_equal(maps_m[key], maps_f[key])  # identical anatomy and position
    run_m, run_f = synthesize_rsfmri(jm), synthesize_rsfmri(jf)
    np.testing.assert_array_equal(run_m.mean(axis=3) > 0, run_f.mean(axis=3) > 0)
    assert not np.array_equal(run_m, run_f)  # connectivity differs

    def dmn_fpn(run, maps):
        nets = maps["networks"]
        series = [run[n > 0.3].mean(axis=0) for n in nets[:2]]  # DMN, FPN voxels
        return np.corrcoef(*series)[0, 1]

    r_m, r_f = dmn_fpn(run_m, maps_m), dmn_fpn(run_f, maps_f)
    assert np.sign(r_m) == np.sign(male.coupling) and np.sign(r_f) == np.sign(female.coupling)


def test_network_signals_signed_correlation_is_exact():
    from umbrella.demo.modalities import NETWORKS, network_signals

    for rho in (-0.6, 0.0, 0.45):
        z = network_signals(np.random.default_rng(1), "male", 30, 2.0, correlation=rho)
        c = np.corrcoef(z)
        assert c[0, 1] == pytest.approx(rho, abs=1e-9)
        off = c[np.triu_indices(len(NETWORKS), 1)]
        assert np.abs(np.delete(off, 0)).max() < 1e-9
    with pytest.raises(ValueError, match="in \\(-1, 1\\)"):
        network_signals(np.random.default_rng(1), "male", 30, 2.0, correlation=1.0)


def test_deterministic_by_seed_whatever_the_workers(cohort, tmp_path):
    again = build_demo_cohort(tmp_path / "w1", 10, variant="realistic", seed=3, workers=1,
                              modalities=("T1", "rsfMRI"), **SMALL)
    other = build_demo_cohort(tmp_path / "s4", 10, variant="realistic", seed=4, workers=1,
                              modalities=("T1", "dMRI"),
                              dmri=DmriSettings(GRID, 8.0, real_dwi=False), **SMALL)
    for a, b in zip(cohort.subjects, again.subjects, strict=True):
        assert a == b
        for rel in (a.t1_path, a.rsfmri_path):
            if rel.endswith(".nii.gz"):
                np.testing.assert_array_equal(_nifti(cohort.root / rel)[0],
                                              _nifti(again.root / rel)[0])
    assert (cohort.root / "truth.json").read_text() == (again.root / "truth.json").read_text()
    assert (cohort.root / "planted.csv").read_text() == (again.root / "planted.csv").read_text()
    first = cohort.subjects[0].t1_path
    assert not np.array_equal(_nifti(cohort.root / first)[0], _nifti(other.root / first)[0])
    sex = json.loads((other.root / "truth.json").read_text())["tasks"]["sex"]
    assert set(sex) == {"T1", "dMRI"} and sex["dMRI"] == sex["T1"]  # the same planted scale
    fa, fa_img = _nifti(other.root / other.subjects[0].dmri_path)
    assert fa.shape == GRID and nib.aff2axcodes(fa_img.affine) == ("L", "A", "S")


def test_rebuild_reuses_and_basic_has_no_truth(cohort, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in (cohort.root / "images").iterdir()}
    build_demo_cohort(cohort.root, 10, variant="realistic", seed=3,
                      modalities=("T1", "rsfMRI"), **SMALL)
    assert {p: p.stat().st_mtime_ns for p in (cohort.root / "images").iterdir()} == before
    basic = build_demo_cohort(tmp_path / "b", 4, image_size=(16, 16, 16), voxel_mm=12.6,
                              progress=False)
    assert basic.variant == "basic" and not (basic.root / "truth.json").exists()
    params = json.loads((basic.root / "cohort.json").read_text())["parameters"]
    assert "variant" not in params and params["sex_scale"] == 0.05


# ----------------------------------------------------------------------------- records

def test_records_sex_and_age_with_one_split(cohort, tmp_path):
    from umbrella.data.records import load_records
    from umbrella.data.validate import validate_records_files
    from umbrella.demo.run import write_records
    from umbrella.task_registry import task_for_record

    files = write_records(cohort, tmp_path / "records", seed=0)
    assert {m: [f.name for f in fs] for m, fs in files.items()} == \
        {"T1": ["sex_T1.jsonl", "age_T1.jsonl"], "rsfMRI": ["sex_rsfMRI.jsonl"]}
    roots = {"T1": cohort.root, "rsfMRI": cohort.root}
    records = [r for fs in files.values() for f in fs for r in load_records(f, roots)]
    assert len(records) == 30 and len({r.id for r in records}) == 30
    split = {}
    for r in records:
        assert split.setdefault(r.subject_id, r.split) == r.split  # one split per subject
    assert sorted(split.values()).count("train") == 6 and sorted(split.values()).count("test") == 2
    for sex in ("male", "female"):  # stratified by sex: 3 / 1 / 1 of each
        ids = [s.subject_id for s in cohort.subjects if s.sex == sex]
        assert sorted(split[i] for i in ids) == ["test", "train", "train", "train", "val"]
    ages = {s.subject_id: s.age for s in cohort.subjects}
    for r in records:
        if r.task == "age":
            spec = task_for_record(r.task, r.metadata)
            assert spec.kind == "regression" and spec.decimals == 0
            assert r.answer == f"{int(ages[r.subject_id])} years"
            assert spec.parse(r.answer) == ages[r.subject_id]
        else:
            assert r.answer in ("male", "female")
    report = validate_records_files([f for fs in files.values() for f in fs], roots,
                                    modality_rules={"rsfMRI": {"min_frames": 8}},
                                    progress=False)
    assert report.ok, report.summary_table()


def test_prepare_demo_writes_config_without_training(tmp_path):
    from umbrella.config import load_config
    from umbrella.data.catalog import modality_inputs
    from umbrella.demo.run import prepare_demo

    plan = prepare_demo(tmp_path / "demo", cohort="realistic", n_subjects=10, image_size=GRID,
                        patch=4, aux_size=GRID, aux_patch=4, modalities=("T1", "rsfMRI"),
                        n_frames=12, sequence_length=4, progress=False, log=lambda _: None)
    assert plan.truth["variant"] == "realistic" and plan.modalities == ("T1", "rsfMRI")
    cfg = load_config(plan.config_path)
    assert [p.split("/")[-1] for p in cfg.dataset.T1.records] == ["sex_T1.jsonl", "age_T1.jsonl"]
    assert [p.split("/")[-1] for p in cfg.dataset.rsfMRI.records] == ["sex_rsfMRI.jsonl"]
    assert cfg.training.max_steps == 600  # 200 per records file
    inputs = modality_inputs(cfg)
    assert {m: i.tokens for m, i in inputs.items()} == {"T1": 392, "rsfMRI": 392}
    # rsfMRI read as realistic runs carry sex: whole runs, standardised series, by connectivity
    assert cfg.dataset.rsfMRI.sequence_length == 12 and cfg.dataset.rsfMRI.patch_size[3] == 12
    assert cfg.dataset.rsfMRI.normalize == "zscore_voxel"
    assert cfg.model.rsfmri_embed == "connectivity" and cfg.model.patch_embed == "linear"
    # every image the config names reads at its voxel_size (no frame folder, which has no affine)
    from umbrella.data.catalog import load_config_records

    records = load_config_records(cfg)
    assert {r.images[0].modality for r in records} == {"T1", "rsfMRI"}
    for rec in records:
        image = rec.images[0]
        assert inputs[image.modality].preprocess(image, rec.id).ndim in (3, 4)
    assert not (tmp_path / "demo" / "runs").exists()
    with pytest.raises(ConfigError, match="isotropic voxels"):
        prepare_demo(tmp_path / "bad", cohort="realistic", n_subjects=4, image_size=(28, 28, 28),
                     progress=False, log=lambda _: None)


def test_cli_build_only_calls_prepare_demo(monkeypatch, tmp_path, capsys):
    import umbrella.demo.run as run_mod
    from umbrella.cli import main

    seen = {}

    def fake_prepare(out, **kw):
        seen.update(kw, out=out)
        return run_mod.DemoPlan(cohort=type("C", (), {"root": tmp_path / "cohort"})(),
                                records={"T1": [tmp_path / "sex_T1.jsonl"]}, config=None,
                                config_path=tmp_path / "demo.yaml", modalities=("T1",))

    def no_training(*a, **kw):
        raise AssertionError("--build-only must not train")

    monkeypatch.setattr(run_mod, "prepare_demo", fake_prepare)
    monkeypatch.setattr(run_mod, "run_demo", no_training)
    assert main(["demo", "--cohort", "realistic", "--build-only", "--out", str(tmp_path),
                 "--seed", "2", "training.max_steps=5"]) == 0
    assert seen["cohort"] == "realistic" and seen["n_subjects"] is None  # 400 by default
    assert seen["image_size"] is None and seen["seed"] == 2
    assert seen["overrides"] == ["training.max_steps=5"]
    out = capsys.readouterr().out
    assert f"umbrella train -c {tmp_path / 'demo.yaml'}" in out and "sex_T1.jsonl" in out
    assert main(["demo", "--cohort", "realistic", "--build-only", "--quick"]) == 0
    assert seen["image_size"] == (56, 64, 56) and seen["n_subjects"] == 60 and seen["patch"] == 8
    assert seen["csf_contrast"] == 0.0  # off unless asked for
    assert main(["demo", "--cohort", "realistic", "--build-only", "--csf-contrast", "0.1"]) == 0
    assert seen["csf_contrast"] == 0.1


def test_csf_contrast_refused_for_the_basic_demo(tmp_path):
    from umbrella.demo.run import prepare_demo

    with pytest.raises(ConfigError, match="realistic cohort only"):
        prepare_demo(tmp_path, cohort="basic", csf_contrast=0.1, progress=False)
    assert not (tmp_path / "cohort").exists()
