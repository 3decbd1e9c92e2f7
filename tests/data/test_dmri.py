"""Tests for umbrella.data.dmri on dipy's packaged small_64D series (10x10x10, 65 volumes)."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from umbrella.data.dmri import compute_scalar_map, find_gradients, preprocess_dmri
from umbrella.data.volumes import VolumeSpec, preprocess_volume
from umbrella.errors import VolumeError


@pytest.fixture(scope="module")
def small_64d():
    """(dwi, bval, bvec) paths shipped inside the dipy package (DIPY_HOME is a temp folder)."""
    from dipy.data import get_fnames

    return tuple(Path(p) for p in get_fnames(name="small_64D"))


@pytest.fixture(scope="module")
def fa_map(small_64d):
    return compute_scalar_map(*small_64d, kind="FA")


def _copy_series(tmp_path: Path, small_64d, stem="dwi", gradients=True) -> Path:
    dwi, bval, bvec = small_64d
    target = tmp_path / f"{stem}.nii"
    shutil.copy(dwi, target)
    if gradients:
        shutil.copy(bval, tmp_path / f"{stem}.bval")
        shutil.copy(bvec, tmp_path / f"{stem}.bvec")
    return target


def test_fa_in_unit_range_with_ras_geometry(small_64d, fa_map):
    fa, affine = fa_map
    img = nib.load(small_64d[0])
    assert fa.shape == (10, 10, 10) and fa.dtype == np.float32
    assert float(fa.min()) >= 0.0 and float(fa.max()) <= 1.0
    assert float(fa.max()) > 0.3  # real anisotropic tissue, not a degenerate fit
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    assert nib.aff2axcodes(img.affine) != ("R", "A", "S")  # the series itself is not RAS+
    assert np.isfinite(fa).all()


def test_md_positive_in_brain(small_64d, fa_map):
    md, _ = compute_scalar_map(*small_64d, kind="MD")
    brain = fa_map[0] > 0
    assert brain.sum() > 50
    assert np.all(md[brain] > 0)
    assert 1e-4 < float(np.median(md[brain])) < 5e-3  # mm^2/s, tissue range
    ad, _ = compute_scalar_map(*small_64d, kind="AD")
    rd, _ = compute_scalar_map(*small_64d, kind="RD")
    np.testing.assert_allclose(md[brain], (ad[brain] + 2 * rd[brain]) / 3, rtol=1e-4)


def test_map_is_in_ras_voxel_order(small_64d, fa_map):
    """Voxel reordering keeps each voxel's signal, so fitting the RAS+ reoriented series gives
    the FA in RAS+ voxel order: it must match our map voxel for voxel inside the fit mask."""
    from dipy.core.gradients import gradient_table
    from dipy.io import read_bvals_bvecs
    from dipy.reconst.dti import TensorModel

    dwi, bval, bvec = small_64d
    bvals, bvecs = read_bvals_bvecs(str(bval), str(bvec))
    canonical = nib.as_closest_canonical(nib.load(dwi)).get_fdata(dtype=np.float32)
    fit = TensorModel(gradient_table(bvals, bvecs=bvecs)).fit(canonical)
    expected = np.clip(np.nan_to_num(fit.fa), 0, 1)
    brain = fa_map[0] > 0
    np.testing.assert_allclose(fa_map[0][brain], expected[brain], atol=1e-5)
    stored = TensorModel(gradient_table(bvals, bvecs=bvecs)).fit(
        nib.load(dwi).get_fdata(dtype=np.float32)).fa
    assert not np.allclose(np.nan_to_num(stored), expected, atol=1e-3)  # the order did change


def test_sibling_gradients_are_found(tmp_path, small_64d):
    dwi = _copy_series(tmp_path, small_64d, stem="sub-1_dwi")
    assert find_gradients(dwi) == (tmp_path / "sub-1_dwi.bval", tmp_path / "sub-1_dwi.bvec")
    gz = tmp_path / "sub-2_dwi.nii.gz"
    nib.save(nib.load(dwi), gz)
    (tmp_path / "sub-2_dwi.bval").write_text("0")
    (tmp_path / "sub-2_dwi.bvec").write_text("0\n0\n0")
    assert find_gradients(gz)[0].name == "sub-2_dwi.bval"
    explicit = find_gradients(gz, small_64d[1], small_64d[2])
    assert explicit == (small_64d[1], small_64d[2])


def test_hcp_style_bvals_bvecs_in_folder(tmp_path, small_64d):
    dwi = _copy_series(tmp_path, small_64d, stem="data", gradients=False)
    shutil.copy(small_64d[1], tmp_path / "bvals")
    shutil.copy(small_64d[2], tmp_path / "bvecs")
    assert find_gradients(dwi) == (tmp_path / "bvals", tmp_path / "bvecs")


def test_missing_bvec_names_the_files(tmp_path, small_64d):
    dwi = _copy_series(tmp_path, small_64d, stem="sub-3_dwi")
    (tmp_path / "sub-3_dwi.bvec").unlink()
    with pytest.raises(VolumeError, match="no bvec file") as err:
        find_gradients(dwi)
    text = str(err.value)
    assert str(dwi) in text and "sub-3_dwi.bvec" in text and "fix:" in text
    with pytest.raises(VolumeError, match="no bval file"):
        find_gradients(dwi, bval=tmp_path / "elsewhere.bval")


def test_gradient_count_mismatch(tmp_path, small_64d):
    dwi, bval, bvec = small_64d
    img = nib.load(dwi)
    short = tmp_path / "short.nii.gz"
    nib.Nifti1Image(img.get_fdata(dtype=np.float32)[..., :60], img.affine).to_filename(short)
    with pytest.raises(VolumeError, match="60 volumes but") as err:
        compute_scalar_map(short, bval, bvec, record_id="s1")
    assert "65 b-values" in str(err.value) and str(short) in str(err.value)


def test_3d_input_and_bad_kind(tmp_path, small_64d, fa_map):
    fa_path = tmp_path / "fa.nii.gz"
    nib.Nifti1Image(fa_map[0], fa_map[1]).to_filename(fa_path)
    with pytest.raises(VolumeError, match="expected a 4D diffusion series"):
        compute_scalar_map(fa_path, small_64d[1], small_64d[2])
    with pytest.raises(ValueError, match="FA"):
        compute_scalar_map(*small_64d, kind="GFA")


def test_unreadable_gradients(tmp_path, small_64d):
    bad = tmp_path / "bad.bval"
    bad.write_text("zero one two")
    with pytest.raises(VolumeError, match="cannot read gradients"):
        compute_scalar_map(small_64d[0], bad, small_64d[2])


def test_3d_map_path_gives_image_size(tmp_path, fa_map):
    fa_path = tmp_path / "fa.nii.gz"
    nib.Nifti1Image(fa_map[0], fa_map[1]).to_filename(fa_path)
    spec = VolumeSpec(image_size=(16, 16, 16))
    out = preprocess_dmri(fa_path, spec)
    assert out.shape == (16, 16, 16) and out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, preprocess_volume(fa_path, spec))


def test_4d_series_processed_like_its_3d_map(tmp_path, small_64d, fa_map):
    dwi = _copy_series(tmp_path, small_64d)
    fa_path = tmp_path / "fa.nii.gz"
    nib.Nifti1Image(fa_map[0], fa_map[1]).to_filename(fa_path)
    for spec in (VolumeSpec(image_size=(16, 16, 16)),
                 VolumeSpec(image_size=(12, 12, 12), voxel_size=(2.5, 2.5, 2.5),
                            normalize="percentile")):
        np.testing.assert_allclose(preprocess_dmri(dwi, spec), preprocess_dmri(fa_path, spec),
                                   atol=1e-6)


def test_missing_dwi_names_the_file(tmp_path):
    with pytest.raises(VolumeError, match="file not found") as err:
        preprocess_dmri(tmp_path / "none.nii.gz", VolumeSpec(image_size=(8, 8, 8)))
    assert "none.nii.gz" in str(err.value)
