"""Whole brains at any resolution: the default geometry (config ``field_of_view`` 201.6 mm ->
2.1 mm voxels for a 96^3 input) keeps the brain of nilearn's 1 mm MNI152 template at 1 mm,
1.5 mm, anisotropic and oblique sampling, and fills the input with it."""

import nibabel as nib
import numpy as np
import pytest

from umbrella.config import ModalityConfig
from umbrella.data.catalog import volume_spec
from umbrella.data.volumes import (
    VolumeSpec,
    brain_mask,
    kept_fraction,
    preprocess_volume,
    read_nifti,
)

nilearn = pytest.importorskip("nilearn")


@pytest.fixture(scope="module")
def mni():
    from nilearn import datasets

    return (datasets.load_mni152_template(resolution=1),
            datasets.load_mni152_brain_mask(resolution=1))


def _rotation(deg_x: float, deg_z: float) -> np.ndarray:
    a, b = np.deg2rad(deg_x), np.deg2rad(deg_z)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    return rx @ rz


def _resampled(img, zooms, rotation=None, shape=None, interpolation="continuous"):
    from nilearn.image import resample_img

    linear = (np.eye(3) if rotation is None else rotation) @ np.diag(zooms)
    shape = shape or tuple(int(np.ceil(n / z)) for n, z in zip((200, 236, 200), zooms, strict=True))
    centre = np.array([0.0, -18.0, 8.0])  # the template's centre, mm
    offset = centre - linear @ ((np.array(shape) - 1) / 2)
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = linear, offset
    return resample_img(img, target_affine=affine, target_shape=shape,
                        interpolation=interpolation, force_resample=True, copy_header=True)


CASES = {
    "1 mm": dict(zooms=(1.0, 1.0, 1.0)),
    "1.5 mm": dict(zooms=(1.5, 1.5, 1.5)),
    "0.7 mm HCP": dict(zooms=(0.7, 0.7, 0.7)),
    "anisotropic 0.9x0.9x3 mm": dict(zooms=(0.9, 0.9, 3.0)),
    "oblique 1 mm, 20 deg": dict(zooms=(1.0, 1.0, 1.0), rotation=_rotation(20, 10)),
    "4 mm (rsfMRI-like)": dict(zooms=(4.0, 4.0, 4.0)),
}


_SLOW = ("0.7 mm HCP", "oblique 1 mm, 20 deg")  # 20-40 s each, most of it nilearn resampling


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in _SLOW else c
                                  for c in CASES])
def test_default_geometry_keeps_the_whole_brain(mni, case, tmp_path):
    t1, mask = mni
    if case == "1 mm":
        img, m = t1, mask
    else:
        img = _resampled(t1, **CASES[case])
        m = _resampled(mask, **CASES[case], interpolation="nearest")
    nib.save(img, tmp_path / "t1.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(m.dataobj, np.float32), m.affine), tmp_path / "m.nii.gz")
    data, affine = read_nifti(tmp_path / "t1.nii.gz")
    brain, _ = read_nifti(tmp_path / "m.nii.gz")
    spec = volume_spec(ModalityConfig())  # the defaults every config starts from
    assert spec.target_spacing() == pytest.approx((2.1, 2.1, 2.1))
    assert kept_fraction(data, affine, spec, brain) >= 0.99
    # independently of the crop windows: the template's background is 0, so the intensity mass
    # of the input (mm^3 x value) survives when nothing of the head is cut off
    out = preprocess_volume(tmp_path / "t1.nii.gz", VolumeSpec(field_of_view=201.6,
                                                               normalize="none"))
    voxel_in = abs(np.linalg.det(affine[:3, :3]))
    assert out.shape == (96, 96, 96)
    assert out.sum() * 2.1**3 == pytest.approx(data.sum() * voxel_in, rel=0.02)
    # and the brain fills the input: its extent spans most of the 96 voxels front to back
    extent = np.flatnonzero(brain_mask(out).any(axis=(0, 2)))
    assert extent[-1] - extent[0] + 1 >= 80


def test_native_spacing_crops_a_1mm_brain_and_the_measure_says_so(mni):
    t1, mask = mni
    data, affine = np.asarray(t1.dataobj, np.float32), t1.affine
    brain = np.asarray(mask.dataobj, np.float32)
    native = VolumeSpec()  # field_of_view None: the file's 1 mm spacing, a 96 mm cube
    assert kept_fraction(data, affine, native, brain) < 0.5
    assert kept_fraction(data, affine, VolumeSpec(field_of_view=172.8), brain) < 0.999


def test_a_head_with_neck_keeps_the_top_of_the_head():
    vol = np.zeros((120, 120, 140), np.float32)
    vol[20:100, 20:100, 10:135] = 1.0  # head + neck taller than the 96-voxel window
    vol[30:90, 30:90, 70:135] = 3.0  # the brain in the upper part
    spec = VolumeSpec(image_size=(96, 96, 96), normalize="none")
    top = (vol == 3.0).astype(np.float32)
    assert kept_fraction(vol, np.eye(4), spec, top) == 1.0  # the neck is dropped, not the vertex


def test_a_4mm_rsfmri_run_fills_the_input_with_the_brain(mni, tmp_path):
    from umbrella.data.catalog import fmri_spec
    from umbrella.data.fmri import preprocess_fmri

    t1, _ = mni
    frame = np.asarray(_resampled(t1, zooms=(4.0, 4.0, 4.0), shape=(45, 54, 45)).dataobj,
                       np.float32)
    frame_affine = _resampled(t1, zooms=(4.0, 4.0, 4.0), shape=(45, 54, 45)).affine
    run = np.stack([frame * (1 + 0.01 * i) for i in range(4)], axis=-1)
    nib.save(nib.Nifti1Image(run, frame_affine), tmp_path / "bold.nii.gz")
    spec = fmri_spec(ModalityConfig(sequence_length=2, normalize="none"))  # default geometry
    out = preprocess_fmri(tmp_path / "bold.nii.gz", spec)
    assert out.shape == (4, 96, 96, 96)
    brain = brain_mask(out[0])
    extent = [np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != ax)))
              for ax in range(3)]
    spans = [int(e[-1] - e[0] + 1) for e in extent]
    # the 145 x 181 x 155 mm brain at 2.1 mm: about 69 x 86 x 74 voxels (was 36 x 45 x 39 at
    # 4 mm, a tenth of the 96^3 input)
    assert spans[1] >= 80 and min(spans) >= 60, spans
    assert out[0].sum() * 2.1**3 == pytest.approx(run[..., 0].sum() * 4.0**3, rel=0.02)
