"""Viewer images: the model input is placed where it came from in the original."""

import nibabel as nib
import numpy as np
import pytest

from umbrella.data.fmri import FmriSpec
from umbrella.data.inputs import ModalityInput
from umbrella.data.volumes import VolumeSpec
from umbrella.errors import VolumeError
from umbrella.serve.scans import (
    Scan,
    ScanStore,
    model_input_view,
    original_view,
    time_course,
)

AFFINE = np.array([[2.0, 0, 0, -30], [0, 2.0, 0, -40], [0, 0, 2.5, -20], [0, 0, 0, 1]])


def _world_to_voxel(affine_from, affine_to, ijk):
    """Voxel indices in ``affine_to``'s grid of voxel ``ijk`` of ``affine_from``'s grid."""
    world = affine_from @ np.r_[ijk, 1.0]
    return (np.linalg.inv(affine_to) @ world)[:3]


def _scan(tmp_path, data, modality="T1", name="scan.nii.gz"):
    path = tmp_path / name
    nib.save(nib.Nifti1Image(data.astype(np.float32), AFFINE), path)
    return Scan("id", modality, path, name, False, data.shape)


@pytest.mark.parametrize("shape,size", [((20, 24, 14), (16, 16, 16)),  # crop x, y; pad z
                                        ((13, 16, 17), (16, 16, 16))])
def test_crop_pad_input_sits_over_its_source_voxels(tmp_path, shape, size):
    data = np.random.default_rng(0).random(shape).astype(np.float32) + 1
    spec = ModalityInput("T1", VolumeSpec(image_size=size, normalize="none"), 8)
    scan = _scan(tmp_path, data)
    shown, affine = original_view(scan, spec)
    model, placed = model_input_view(scan, spec, shown, affine)
    checked = 0
    for ijk in np.ndindex(*size):
        src = np.rint(_world_to_voxel(placed, affine, np.array(ijk, float))).astype(int)
        if all(0 <= s < n for s, n in zip(src, shape, strict=True)):
            assert model[ijk] == shown[tuple(src)]
            checked += 1
        else:
            assert model[ijk] == data.min()  # padding
    assert checked == np.prod(np.minimum(shape, size))


def test_resampled_input_sits_over_its_source(tmp_path):
    spec = ModalityInput("T1", VolumeSpec(image_size=(20, 20, 20), voxel_size=(4.0, 4.0, 5.0),
                                          normalize="none"), 8)
    data = np.zeros((20, 20, 20), np.float32)
    data[4:16, 6:16, 4:12] = 1
    scan = _scan(tmp_path, data)
    shown, affine = original_view(scan, spec)
    model, placed = model_input_view(scan, spec, shown, affine)
    np.testing.assert_allclose(np.abs(np.diag(placed)[:3]), [4.0, 4.0, 5.0])
    # 20 voxels of 2 mm -> 10 of 4 mm, padded by 5 on each side: model voxel 0 is old -9.5
    np.testing.assert_allclose(_world_to_voxel(placed, affine, np.zeros(3))[:2], [-9.5, -9.5])
    inside = outside = 0
    for ijk in np.ndindex(*model.shape):
        src = _world_to_voxel(placed, affine, np.array(ijk, float))
        margin = np.minimum(src - [3.5, 5.5, 3.5], [15.5, 15.5, 11.5] - src)
        if margin.min() > 1.5:
            assert model[ijk] == pytest.approx(1.0)
            inside += 1
        elif margin.min() < -1.5 and np.all((src > 0) & (src < 19)):
            assert model[ijk] == pytest.approx(0.0)
            outside += 1
    assert inside > 0 and outside > 0


def test_fmri_input_crops_around_the_brain_and_time_course(tmp_path):
    run = np.zeros((30, 20, 20, 10), np.float32)
    run[18:28, 5:15, 5:15] = 100 + np.arange(10, dtype=np.float32)  # an off-centre "brain"
    spec = ModalityInput("rsfMRI", FmriSpec(image_size=(16, 16, 16), sequence_length=4,
                                            normalize="none"), 8)
    scan = _scan(tmp_path, run, "rsfMRI", "bold.nii.gz")
    shown, affine = original_view(scan, spec)
    assert shown.shape == (30, 20, 20)
    model, placed = model_input_view(scan, spec, shown, affine)
    np.testing.assert_allclose(model.max(), np.mean(100 + np.arange(4)))  # first window's mean
    brain = np.argwhere(model > 0)
    for ijk in (brain.min(axis=0), brain.max(axis=0)):
        src = np.rint(_world_to_voxel(placed, affine, ijk.astype(float))).astype(int)
        assert shown[tuple(src)] > 0
    corner = np.rint(_world_to_voxel(placed, affine, brain.min(axis=0).astype(float)))
    assert tuple(corner.astype(int)) == (18, 5, 5)
    assert time_course(scan, (20, 6, 6)) == [100.0 + i for i in range(10)]
    with pytest.raises(VolumeError, match="outside the run's grid"):
        time_course(scan, (30, 0, 0))


def test_store_drops_oldest_and_deletes_its_upload(tmp_path):
    store = ScanStore(max_scans=2)
    dropped = []
    store.on_drop = dropped.append
    data = np.random.default_rng(1).random((6, 6, 6)).astype(np.float32)
    paths = []
    for i in range(3):
        p = store.new_upload_path("x.nii.gz")
        nib.save(nib.Nifti1Image(data, AFFINE), p)
        paths.append(p)
        store.add("T1", p, f"x{i}", temporary=True)
    assert [s.name for s in dropped] == ["x0"] and not paths[0].exists() and paths[2].exists()
    store.close()
    assert not store.upload_dir.exists()
