"""Tests for umbrella.data.volumes: NIfTI reading, RAS+ orientation, preprocessing, augmentation."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path

from umbrella.data.volumes import (
    VolumeAugment,
    VolumeSpec,
    brain_mask,
    fit_to_shape,
    normalize_intensity,
    preprocess_volume,
    read_nifti,
    resample_to_spacing,
)
from umbrella.errors import VolumeError

NIB_DATA = Path(data_path)


def _save(tmp_path: Path, data: np.ndarray, affine=None, name: str = "vol.nii.gz") -> Path:
    path = tmp_path / name
    nib.Nifti1Image(data, np.eye(4) if affine is None else affine).to_filename(path)
    return path


def _head(shape=(40, 44, 36), seed=0) -> np.ndarray:
    """Synthetic T1-like volume: bright noisy ellipsoid on a dim noisy background."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    inside = sum(g**2 for g in grid) < 0.6
    data = np.abs(rng.normal(0, 2, shape))
    data[inside] = rng.normal(100, 20, int(inside.sum()))
    return data.astype(np.float32)


# ---------------------------------------------------------------- read_nifti: orientation, scaling

@pytest.mark.parametrize("name", ["anatomical.nii", "reoriented_anat_moved.nii",
                                  "standard.nii.gz"])
def test_read_matches_nibabel_canonical(name):
    img = nib.load(NIB_DATA / name)
    data, affine = read_nifti(NIB_DATA / name)
    canon = nib.as_closest_canonical(img)
    assert data.dtype == np.float32 and data.shape == canon.shape
    np.testing.assert_array_equal(data, canon.get_fdata())
    np.testing.assert_array_equal(affine, canon.affine)
    assert nib.aff2axcodes(affine) == ("R", "A", "S")


def test_anatomical_las_is_flipped_along_x():
    img = nib.load(NIB_DATA / "anatomical.nii")
    assert nib.aff2axcodes(img.affine) == ("L", "A", "S")
    data, _ = read_nifti(NIB_DATA / "anatomical.nii")
    np.testing.assert_array_equal(data, np.asarray(img.dataobj, dtype=np.float32)[::-1])


def test_singleton_4d_is_squeezed_with_nibabel_scaling(tmp_path):
    # functional.nii: int16 with scl_slope 0.0754 / scl_inter 3100.76, LAS, 4D (17, 21, 3, 20).
    img = nib.load(NIB_DATA / "functional.nii")
    one = img.slicer[..., 2:3]
    path = tmp_path / "one.nii"
    one.to_filename(path)
    saved = nib.load(path)
    assert saved.shape == (17, 21, 3, 1) and saved.dataobj.slope != 1.0
    data, affine = read_nifti(path)
    assert data.shape == (17, 21, 3)
    expected = nib.as_closest_canonical(saved).get_fdata(dtype=np.float32)[..., 0]
    np.testing.assert_array_equal(data, expected)
    # Saving re-quantises to int16 with new scaling: within one quantum of the original volume.
    original = nib.as_closest_canonical(img).get_fdata()[..., 2]
    np.testing.assert_allclose(data, original, atol=float(saved.dataobj.slope))
    assert nib.aff2axcodes(affine) == ("R", "A", "S")


def test_nibabel_image_with_nan_voxels_is_rejected():
    # nibabel's resampled_anat_moved.nii has NaN outside the resampled field of view.
    path = NIB_DATA / "resampled_anat_moved.nii"
    assert np.isnan(nib.load(path).get_fdata()).sum() == 153
    _expect_error(path, "153 of 1071 voxels are NaN or Inf")


@pytest.mark.parametrize("codes,diag", [("LAS", (-2.0, 2.0, 2.0)), ("LPS", (-1.0, -1.0, 3.0))])
def test_flipped_affine_reads_back_in_ras(tmp_path, codes, diag):
    shape, marker = (6, 7, 8), (1, 2, 3)
    vol = np.zeros(shape, np.float32)
    vol[marker] = 5.0
    affine = np.diag([*diag, 1.0])
    affine[:3, 3] = (10.0, -20.0, 30.0)
    assert "".join(nib.aff2axcodes(affine)) == codes
    data, ras_affine = read_nifti(_save(tmp_path, vol, affine))
    expected = tuple(n - 1 - m if d < 0 else m for n, m, d in zip(shape, marker, diag, strict=True))
    assert np.argwhere(data == 5.0).tolist() == [list(expected)]
    # The marker keeps its world position.
    np.testing.assert_allclose(ras_affine @ [*expected, 1], affine @ [*marker, 1])
    assert np.all(np.diag(ras_affine)[:3] > 0)


def test_permuted_axes_are_reordered(tmp_path):
    # voxel axis 0 -> world y, axis 1 -> world x: canonical order swaps them.
    affine = np.array([[0, 3.0, 0, 0], [2.0, 0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1]])
    vol = np.zeros((4, 5, 6), np.float32)
    vol[1, 3, 2] = 1.0
    data, ras_affine = read_nifti(_save(tmp_path, vol, affine))
    assert data.shape == (5, 4, 6)
    assert np.argwhere(data == 1.0).tolist() == [[3, 1, 2]]
    np.testing.assert_allclose(ras_affine[:3, :3], np.diag([3.0, 2.0, 1.0]))


def test_scl_slope_inter_applied(tmp_path):
    raw = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_slope_inter(2, 10)
    path = tmp_path / "scaled.nii.gz"
    img.to_filename(path)
    assert nib.load(path).get_data_dtype() == np.int16
    data, _ = read_nifti(path)
    assert data.dtype == np.float32
    np.testing.assert_array_equal(data, 2.0 * raw + 10.0)
    assert data[0, 0, 0] == 10.0 and data[-1, -1, -1] == 2 * 59 + 10


# ---------------------------------------------------------------- read_nifti: errors

def _expect_error(path, match: str, record_id: str | None = None) -> VolumeError:
    with pytest.raises(VolumeError, match=match) as info:
        read_nifti(path, record_id=record_id)
    assert str(path) in str(info.value) and "fix:" in str(info.value)
    assert info.value.path == Path(path)
    return info.value


def test_missing_file_names_path_and_record(tmp_path):
    err = _expect_error(tmp_path / "nope.nii.gz", "not found", record_id="sub-01_age")
    assert "record 'sub-01_age'" in str(err) and err.record_id == "sub-01_age"


def test_directory_is_not_a_file(tmp_path):
    _expect_error(tmp_path, "not a regular file")


def test_truncated_gzip(tmp_path):
    path = _save(tmp_path, _head((20, 20, 20)))
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    _expect_error(path, "cannot read")


def test_truncated_uncompressed(tmp_path):
    path = _save(tmp_path, _head((20, 20, 20)), name="vol.nii")
    path.write_bytes(path.read_bytes()[:2000])
    _expect_error(path, "truncated file")


@pytest.mark.parametrize("name,blob", [
    ("garbage.nii", bytes(range(256)) * 4),
    ("garbage.nii.gz", b"\x00not gzip at all" * 50),
    ("gzipped_garbage.nii.gz", gzip.compress(b"hello, this is not a NIfTI header" * 20)),
])
def test_garbage_bytes(tmp_path, name, blob):
    path = tmp_path / name
    path.write_bytes(blob)
    _expect_error(path, "cannot read")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_voxels(tmp_path, bad):
    vol = _head((10, 10, 10))
    vol[3, 4, 5] = bad
    vol[0, 0, 0] = bad
    _expect_error(_save(tmp_path, vol), "2 of 1000 voxels are NaN or Inf")


def test_constant_volume(tmp_path):
    _expect_error(_save(tmp_path, np.full((8, 8, 8), 7.0, np.float32)), "constant.*7")


def test_zero_size_dim(tmp_path):
    _expect_error(_save(tmp_path, np.zeros((0, 4, 4), np.float32)), "zero-size")


def test_true_4d_is_rejected_with_hint():
    err = _expect_error(NIB_DATA / "functional.nii", r"expected a 3D volume.*\(17, 21, 3, 20\)")
    assert "slicer" in str(err)


def test_2d_is_rejected(tmp_path):
    _expect_error(_save(tmp_path, _head((10, 10, 1))[..., 0]), "expected a 3D volume")


# ---------------------------------------------------------------- fit_to_shape

@pytest.mark.parametrize("target", [(8, 8, 8), (12, 5, 9), (3, 20, 1)])
def test_fit_to_shape_exact_shapes(target):
    vol = _head((9, 10, 7))
    for mode in ("crop_pad", "resize"):
        out = fit_to_shape(vol, target, mode)
        assert out.shape == target and out.dtype == np.float32


def test_crop_pad_keeps_centred_marker_and_pads_with_min():
    vol = np.full((10, 11, 6), 3.0, np.float32)
    vol[0, 0, 0] = -4.0  # the minimum, lost by the crop along axis 0 and 1
    vol[5, 5, 3] = 100.0  # centre voxel (n // 2)
    out = fit_to_shape(vol, (6, 15, 10), "crop_pad")
    # axis 0: crop 4 -> start 2; axis 1: pad 4 -> 2 before; axis 2: pad 4 -> 2 before.
    assert np.argwhere(out == 100.0).tolist() == [[3, 7, 5]]
    assert np.all(out[:, :2, :] == -4.0) and np.all(out[:, -2:, :] == -4.0)
    assert np.all(out[:, :, :2] == -4.0) and np.all(out[:, :, -2:] == -4.0)
    np.testing.assert_array_equal(out[:, 2:13, 2:8], vol[2:8])


def test_crop_pad_identity_and_odd_difference():
    vol = _head((9, 8, 7))
    np.testing.assert_array_equal(fit_to_shape(vol, vol.shape), vol)
    out = fit_to_shape(vol, (8, 8, 8))  # crop 1 (from the end), pad 1 (at the end)
    np.testing.assert_array_equal(out[:, :, :7], vol[:8])
    assert np.all(out[:, :, 7] == vol.min())


def test_resize_is_trilinear_on_a_ramp():
    ramp = np.broadcast_to(np.arange(4, dtype=np.float32)[:, None, None], (4, 3, 3))
    out = fit_to_shape(ramp, (8, 3, 3), "resize")
    np.testing.assert_allclose(out[:, 1, 1], [0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3], atol=1e-6)


def test_fit_to_shape_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        fit_to_shape(np.ones((4, 4, 4)), (4, 4, 4), "stretch")
    with pytest.raises(ValueError, match="3 positive sizes"):
        fit_to_shape(np.ones((4, 4, 4)), (4, 4))


# ---------------------------------------------------------------- normalize_intensity

def test_zscore_brain_statistics_and_background():
    vol = _head()
    out = normalize_intensity(vol, "zscore_brain")
    mask = brain_mask(vol)
    assert out.dtype == np.float32 and out.shape == vol.shape
    assert 0.2 < mask.mean() < 0.5  # the ellipsoid, not the background
    assert abs(out[mask].mean()) < 1e-4 and abs(out[mask].std() - 1) < 1e-4
    np.testing.assert_array_equal(out[~mask], out[mask].min())
    assert out.min() == out[mask].min()


def test_zscore_is_invariant_to_affine_intensity_changes():
    vol = _head(seed=3)
    np.testing.assert_allclose(normalize_intensity(3.5 * vol + 250, "zscore_brain"),
                               normalize_intensity(vol, "zscore_brain"), atol=1e-4)


def test_percentile_scales_to_unit_range():
    vol = _head()
    vol[0, 0, 0] = 1e6  # outlier gets clipped
    out = normalize_intensity(vol, "percentile", (1.0, 99.0))
    lo, hi = np.percentile(vol, [1.0, 99.0])
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    assert out[0, 0, 0] == 1.0
    mid = (vol > lo) & (vol < hi)
    np.testing.assert_allclose(out[mid], (vol[mid] - lo) / (hi - lo), rtol=1e-5)


def test_none_and_unknown_method():
    vol = _head((5, 5, 5)).astype(np.float64)
    out = normalize_intensity(vol, "none")
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, vol.astype(np.float32))
    with pytest.raises(ValueError, match="zscore_brain"):
        normalize_intensity(vol, "minmax")


# ---------------------------------------------------------------- VolumeSpec

def test_volume_spec_round_trip_through_json():
    spec = VolumeSpec(image_size=[64, 72, 64], voxel_size=(2, 2, 2), spatial="resize",
                      normalize="percentile", percentiles=(1, 99))
    d = spec.to_dict()
    assert d == {"image_size": [64, 72, 64], "voxel_size": [2.0, 2.0, 2.0], "spatial": "resize",
                 "normalize": "percentile", "percentiles": [1.0, 99.0]}
    assert VolumeSpec.from_dict(json.loads(json.dumps(d))) == spec
    assert spec.image_size == (64, 72, 64)
    assert VolumeSpec.from_dict({}) == VolumeSpec()
    assert VolumeSpec().to_dict()["voxel_size"] is None


@pytest.mark.parametrize("kwargs,field", [
    ({"image_size": (96, 96)}, "image_size"), ({"image_size": (96, 0, 96)}, "image_size"),
    ({"voxel_size": (1, -1, 1)}, "voxel_size"), ({"spatial": "zoom"}, "crop_pad"),
    ({"normalize": "minmax"}, "zscore_brain"), ({"percentiles": (99, 1)}, "percentiles"),
])
def test_volume_spec_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        VolumeSpec(**kwargs)


def test_volume_spec_unknown_key():
    with pytest.raises(ValueError, match="unknown keys.*'size'"):
        VolumeSpec.from_dict({"size": [1, 2, 3]})


# ---------------------------------------------------------------- preprocess_volume

@pytest.mark.parametrize("spatial", ["crop_pad", "resize"])
@pytest.mark.parametrize("normalize", ["zscore_brain", "percentile", "none"])
def test_preprocess_volume_shape_dtype(tmp_path, spatial, normalize):
    path = _save(tmp_path, _head((30, 34, 26)), np.diag([-1.5, 1.5, 2.0, 1.0]))
    spec = VolumeSpec(image_size=(32, 32, 32), spatial=spatial, normalize=normalize)
    out = preprocess_volume(path, spec)
    assert out.shape == (32, 32, 32) and out.dtype == np.float32 and out.flags.c_contiguous
    if normalize == "percentile":
        assert out.min() >= 0 and out.max() <= 1


def test_preprocess_resamples_to_voxel_size(tmp_path):
    vol = np.zeros((20, 20, 10), np.float32)
    vol[5:10, 5:10, 2:7] = 1.0  # 10 mm cube at 2 mm isotropic
    path = _save(tmp_path, vol, np.diag([2.0, 2.0, 2.0, 1.0]))
    data, affine = read_nifti(path)
    assert resample_to_spacing(data, affine, (1.0, 1.0, 1.0)).shape == (40, 40, 20)
    spec = VolumeSpec(image_size=(40, 40, 20), voxel_size=(1, 1, 1), normalize="none")
    out = preprocess_volume(path, spec)
    assert out.shape == (40, 40, 20)
    assert (out[:, 15, 9] > 0.5).sum() == 10 and (out[15, 15, :] > 0.5).sum() == 10


def test_downsampling_counts_a_thin_sheet_wherever_it_lies():
    """2 mm -> 8 mm: a one-voxel sheet must reach the coarse grid by how much of it each coarse
    voxel holds, not by whether a trilinear sample falls on it (aliasing). Without the
    anti-aliasing prefilter the sheet's coarse mass is 0 at some offsets and 2 at others."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    masses = []
    for offset in range(8, 16):
        vol = np.zeros((32, 8, 8), np.float32)
        vol[offset] = 1.0
        out = resample_to_spacing(vol, affine, (8.0, 8.0, 8.0))
        assert out.shape == (8, 2, 2)
        masses.append(float(out[:, 0, 0].sum()) * 4)  # 4 fine voxels per coarse voxel
    np.testing.assert_allclose(masses, 1.0, atol=0.1)  # +-6 % left by the sampling
    # a constant stays constant; growing an axis adds no blur (the ramp test above)
    flat = resample_to_spacing(np.full((32, 8, 8), 3.0, np.float32), affine, (8.0, 8.0, 8.0))
    np.testing.assert_allclose(flat, 3.0, atol=1e-5)


def test_preprocess_rejects_absurd_voxel_size(tmp_path):
    path = _save(tmp_path, _head((20, 20, 20)))
    with pytest.raises(VolumeError, match="voxel_size") as info:
        preprocess_volume(path, VolumeSpec(voxel_size=(0.01, 0.01, 0.01)), record_id="r1")
    assert str(path) in str(info.value) and "record 'r1'" in str(info.value)


def test_preprocess_propagates_read_errors(tmp_path):
    with pytest.raises(VolumeError, match="not found"):
        preprocess_volume(tmp_path / "missing.nii.gz", VolumeSpec())


# ---------------------------------------------------------------- VolumeAugment

@pytest.fixture(scope="module")
def augment() -> VolumeAugment:
    return VolumeAugment()


def test_augment_is_pure_function_of_seed(augment):
    import torch

    vol = normalize_intensity(_head((32, 32, 32)), "zscore_brain")
    before = vol.copy()
    a = augment(vol, seed=123)
    np.random.seed(0)
    torch.manual_seed(0)  # global RNG state must not matter
    b = augment(vol, seed=123)
    c = augment(vol, seed=124)
    assert a.shape == vol.shape and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0.1
    assert not np.array_equal(a, vol)
    np.testing.assert_array_equal(vol, before)  # input untouched
    # A fresh instance gives the same output for the same seed.
    np.testing.assert_array_equal(VolumeAugment()(vol, seed=123), a)


def test_augment_zero_ranges_is_identity():
    vol = _head((12, 10, 8))
    aug = VolumeAugment(flip_prob=0, rotate_deg=0, scale=0, translate_vox=0, intensity=0)
    np.testing.assert_array_equal(aug(vol, seed=5), vol)


def test_augment_flip_only():
    vol = _head((12, 10, 8))
    aug = VolumeAugment(flip_prob=1.0, rotate_deg=0, scale=0, translate_vox=0, intensity=0,
                        flip_axes=(0,))
    np.testing.assert_array_equal(aug(vol, seed=1), vol[::-1])


def test_augment_intensity_only_is_affine_in_value():
    vol = _head((12, 10, 8))
    aug = VolumeAugment(flip_prob=0, rotate_deg=0, scale=0, translate_vox=0, intensity=0.1)
    out = aug(vol, seed=9)
    slope, inter = np.polyfit(vol.ravel(), out.ravel(), 1)
    assert 0.9 - 1e-6 <= slope <= 1.1 + 1e-6 and -0.1 - 1e-3 <= inter <= 0.1 + 1e-3
    np.testing.assert_allclose(out, slope * vol + inter, atol=1e-3)


def test_augment_gamma_only_is_a_monotone_curve_keeping_mean_and_sd():
    vol = normalize_intensity(_head((12, 10, 8)), "zscore_brain")
    aug = VolumeAugment(flip_prob=0, rotate_deg=0, scale=0, translate_vox=0, intensity=0,
                        gamma=0.3)
    outs = [aug(vol, seed=s) for s in range(6)]
    order = np.argsort(vol.ravel(), kind="stable")
    for out in outs:
        assert np.all(np.diff(out.ravel()[order]) >= -1e-5)  # the voxels' order is kept
        np.testing.assert_allclose([out.mean(), out.std()], [vol.mean(), vol.std()], atol=1e-4)
    # a curve, not an affine map: the residual of a straight-line fit is far from zero, and
    # the draws differ
    resid = [np.abs(out - np.polyval(np.polyfit(vol.ravel(), out.ravel(), 1), vol)).max()
             for out in outs]
    assert max(resid) > 0.05
    assert np.abs(outs[0] - outs[1]).max() > 0.01
    np.testing.assert_array_equal(aug(vol, seed=3), outs[3])


def test_augment_rejects_bad_input(augment):
    with pytest.raises(ValueError, match=r"\(D, H, W\)"):
        augment(np.zeros((1, 4, 4, 4), np.float32), seed=0)
    with pytest.raises(ValueError, match="rotate_deg"):
        VolumeAugment(rotate_deg=-1)


def test_mask_box_leaves_specks_out():
    """The head's box ignores components under 1 % of the largest (noise above the threshold
    far from the head); two large components both count; a lone voxel is its own box."""
    from umbrella.data.volumes import crop_windows, mask_box

    mask = np.zeros((40, 40, 40), dtype=bool)
    mask[10:30, 12:28, 8:32] = True  # the head
    assert mask_box(mask) == [(10, 30), (12, 28), (8, 32)]
    specks = mask.copy()
    specks[0, 0, 0] = specks[39, 39, 39] = specks[0, 39, 20] = True
    assert mask_box(specks) == [(10, 30), (12, 28), (8, 32)]
    # the crop follows the head, not the specks (which would stretch the box over the volume)
    assert crop_windows((40, 40, 40), (24, 24, 30), mask_box(specks)) == \
        crop_windows((40, 40, 40), (24, 24, 30), mask_box(mask))
    two = mask.copy()
    two[32:36, 30:34, 30:34] = True  # 64 voxels, 0.8 % of the head: a speck
    assert mask_box(two) == [(10, 30), (12, 28), (8, 32)]
    two[32:38, 30:38, 30:38] = True  # 384 voxels, 5 %: a part of the head
    assert mask_box(two) == [(10, 38), (12, 38), (8, 38)]
    lone = np.zeros((5, 5, 5), dtype=bool)
    lone[1, 2, 3] = True
    assert mask_box(lone) == [(1, 2), (2, 3), (3, 4)]
    assert mask_box(np.zeros((5, 6, 7), dtype=bool)) == [(0, 5), (0, 6), (0, 7)]
