"""Tests for umbrella.data.fmri: windows, 4D NIfTI and frame-folder reading, brain-safe fitting."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.testing import data_path

from umbrella.data.fmri import (
    FmriSpec,
    fit_run_to_shape,
    n_windows,
    normalize_run,
    preprocess_fmri,
    read_fmri_run,
    read_frame_stats,
    take_window,
    window_frames,
    window_starts,
)
from umbrella.data.volumes import brain_mask, fit_to_shape
from umbrella.errors import VolumeError

NIB_DATA = Path(data_path)


def _run(shape=(20, 24, 18), n_frames=12, centre=None, radii=None, seed=0) -> np.ndarray:
    """Synthetic (X, Y, Z, T) run: a bright ellipsoid "brain" (~100) with a slow signal on a
    dim noisy background (~2)."""
    rng = np.random.default_rng(seed)
    centre = [n / 2 for n in shape] if centre is None else centre
    radii = [0.35 * n for n in shape] if radii is None else radii
    grid = np.meshgrid(*[np.arange(n) + 0.5 for n in shape], indexing="ij")
    inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)) <= 1
    run = np.abs(rng.normal(0, 2, (*shape, n_frames))).astype(np.float32)
    signal = 100 + 5 * np.sin(np.arange(n_frames) / 2)
    run[inside] = (signal + rng.normal(0, 3, (int(inside.sum()), n_frames))).astype(np.float32)
    return run


def _save_nifti(tmp_path: Path, run: np.ndarray, affine=None, name="bold.nii.gz") -> Path:
    path = tmp_path / name
    nib.Nifti1Image(run, np.eye(4) if affine is None else affine).to_filename(path)
    return path


def _save_frames(folder: Path, run: np.ndarray, stats: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    for t in range(run.shape[3]):
        torch.save(torch.from_numpy(np.ascontiguousarray(run[..., t])), folder / f"frame_{t}.pt")
    if stats is not None:
        torch.save(stats, folder / "global_stats.pt")
    return folder


# ---------------------------------------------------------------------------------- windows

def test_window_indices_for_strides():
    assert window_starts(10, 3, 2, 3) == [0, 3]
    assert window_frames(0, 3, 2) == [0, 2, 4]
    assert window_frames(3, 3, 2) == [3, 5, 7]
    assert window_starts(25, 20, 1, 1) == [0, 1, 2, 3, 4, 5]
    assert window_starts(20, 20, 1, 1) == [0]
    assert window_starts(10, 1, 1, 4) == [0, 4, 8]
    spec = FmriSpec(sequence_length=3, stride_within_seq=2, stride_between_seq=3)
    assert n_windows(10, spec) == 2 and spec.window_span == 5


def test_run_shorter_than_one_window_has_no_windows():
    assert window_starts(19, 20, 1, 1) == []
    assert window_starts(9, 4, 3, 1) == []  # needs frames 0, 3, 6, 9
    assert window_starts(0, 1, 1, 1) == []
    assert n_windows(4, FmriSpec(sequence_length=5)) == 0


def test_window_arguments_are_checked():
    with pytest.raises(ValueError, match="stride_within"):
        window_starts(10, 3, 0, 1)
    with pytest.raises(ValueError, match="n_frames"):
        window_starts(-1, 3, 1, 1)


def test_spec_validates_and_round_trips():
    spec = FmriSpec(image_size=[32, 32, 32], sequence_length=4, normalize="zscore_run_bgmin")
    assert spec.image_size == (32, 32, 32)
    assert FmriSpec.from_dict(spec.to_dict()) == spec
    assert spec.to_dict()["image_size"] == [32, 32, 32]
    with pytest.raises(ValueError, match="sequence_length"):
        FmriSpec(sequence_length=0)
    with pytest.raises(ValueError, match="normalize"):
        FmriSpec(normalize="zscore_brain")
    with pytest.raises(ValueError, match="image_size"):
        FmriSpec(image_size=(96, 96))
    with pytest.raises(ValueError, match="unknown keys"):
        FmriSpec.from_dict({"seq_len": 3})


# ---------------------------------------------------------------------------------- reading

def test_frame_folder_and_nifti_give_identical_windows(tmp_path):
    run = _run()
    nifti = _save_nifti(tmp_path, run)
    folder = _save_frames(tmp_path / "frames", run, {"global_mean": torch.tensor(3.5),
                                                      "global_std": 2.0})
    from_nifti, affine = read_fmri_run(nifti)
    from_frames, no_affine = read_fmri_run(folder)
    assert from_frames.shape == (20, 24, 18, 12) and no_affine is None
    np.testing.assert_array_equal(from_nifti, from_frames)
    np.testing.assert_array_equal(affine, np.eye(4))
    assert read_frame_stats(folder) == {"global_mean": 3.5, "global_std": 2.0}
    spec = FmriSpec(image_size=(24, 24, 24), sequence_length=3, stride_within_seq=2,
                    stride_between_seq=3)
    a, b = preprocess_fmri(nifti, spec), preprocess_fmri(folder, spec)
    assert a.shape == (12, 24, 24, 24) and a.flags.c_contiguous and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    for start in window_starts(12, 3, 2, 3):
        np.testing.assert_array_equal(take_window(a, start, spec), take_window(b, start, spec))


def test_las_nifti_comes_back_ras(tmp_path):
    run = _run(n_frames=4)
    las = np.diag([-2.0, 2.0, 2.0, 1.0])
    las[:3, 3] = [40, -60, -30]
    data, affine = read_fmri_run(_save_nifti(tmp_path, run, las))
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    np.testing.assert_array_equal(data, run[::-1])
    # The same world point under both affines: voxel i along x maps to voxel n-1-i.
    np.testing.assert_allclose(las @ [0, 0, 0, 1], affine @ [run.shape[0] - 1, 0, 0, 1])


def test_nibabel_functional_image_reads_with_scaling():
    img = nib.load(NIB_DATA / "functional.nii")  # int16, scl_slope != 1, LAS, (17, 21, 3, 20)
    data, affine = read_fmri_run(NIB_DATA / "functional.nii")
    assert data.shape == (17, 21, 3, 20) and data.dtype == np.float32
    np.testing.assert_array_equal(data, nib.as_closest_canonical(img).get_fdata(dtype=np.float32))
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    assert abs(float(data.mean()) - 3100) < 1000  # scl_inter 3100.76 was applied


def test_nan_run_names_the_file(tmp_path):
    run = _run(n_frames=3)
    run[1, 2, 3, 1] = np.nan
    path = _save_nifti(tmp_path, run)
    with pytest.raises(VolumeError, match="NaN or Inf") as err:
        read_fmri_run(path, record_id="sub-7")
    assert str(path) in str(err.value) and "sub-7" in str(err.value)


def test_truncated_nifti_names_the_file(tmp_path):
    full = _save_nifti(tmp_path, _run(n_frames=3))
    cut = tmp_path / "cut.nii.gz"
    raw = gzip.decompress(full.read_bytes())
    cut.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    with pytest.raises(VolumeError, match="cannot read") as err:
        read_fmri_run(cut)
    assert str(cut) in str(err.value)


def test_truncated_frame_names_the_folder_and_frame(tmp_path):
    folder = _save_frames(tmp_path / "frames", _run(n_frames=3))
    frame = folder / "frame_1.pt"
    frame.write_bytes(frame.read_bytes()[:100])
    with pytest.raises(VolumeError, match="frame_1.pt") as err:
        read_fmri_run(folder)
    assert str(folder) in str(err.value)


def test_frame_folder_problems(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(VolumeError, match="no frame_"):
        read_fmri_run(tmp_path / "empty")
    gap = _save_frames(tmp_path / "gap", _run(n_frames=3))
    (gap / "frame_1.pt").unlink()
    with pytest.raises(VolumeError, match="frame_1.pt"):
        read_fmri_run(gap)
    pickled = _save_frames(tmp_path / "obj", _run(n_frames=2))
    torch.save({"not": object()}, pickled / "frame_1.pt")  # refused by weights_only
    with pytest.raises(VolumeError, match="weights_only"):
        read_fmri_run(pickled)
    torch.save({"a": torch.zeros(2)}, pickled / "frame_1.pt")  # loads, but is not a frame
    with pytest.raises(VolumeError, match="frame_1.pt is not a non-empty 3D tensor"):
        read_fmri_run(pickled)
    torch.save(torch.zeros(5, 5, 5), pickled / "frame_1.pt")
    with pytest.raises(VolumeError, match=r"frame_1.pt has shape \(5, 5, 5\)"):
        read_fmri_run(pickled)


def test_not_4d_missing_and_zero_size(tmp_path):
    flat = tmp_path / "t1.nii.gz"
    nib.Nifti1Image(_run(n_frames=1)[..., 0], np.eye(4)).to_filename(flat)
    with pytest.raises(VolumeError, match="expected a 4D run"):
        read_fmri_run(flat)
    with pytest.raises(VolumeError, match="file not found"):
        read_fmri_run(tmp_path / "nope.nii.gz")
    empty = tmp_path / "empty.nii"
    nib.Nifti1Image(np.zeros((4, 4, 4, 0), np.float32), np.eye(4)).to_filename(empty)
    with pytest.raises(VolumeError, match="zero-size"):
        read_fmri_run(empty)


# ---------------------------------------------------------------------------------- fitting

STUDY_GRIDS = {
    # native grid, brain centre, brain radii: off-centre brains where a naive centred crop cuts
    "ABCD": ((96, 96, 95), (48, 50, 47), (40, 44, 38)),
    "UKB": ((88, 88, 64), (44, 44, 32), (36, 40, 28)),
    "HCP": ((91, 109, 91), (45, 62, 44), (36, 44, 36)),
    "ABIDE": ((97, 115, 97), (48, 65, 50), (38, 42, 40)),
}


@pytest.mark.parametrize("study", list(STUDY_GRIDS))
def test_fit_keeps_every_brain_voxel_for_each_study(study):
    shape, centre, radii = STUDY_GRIDS[study]
    run = _run(shape, n_frames=2, centre=centre, radii=radii)
    fitted = fit_run_to_shape(run, (96, 96, 96))
    assert fitted.shape == (96, 96, 96, 2) and fitted.dtype == np.float32
    before = brain_mask(run.mean(axis=3)).sum()
    assert brain_mask(fitted.mean(axis=3)).sum() == before
    assert (fitted > 50).sum() == (run > 50).sum()
    assert fitted.min() == run.min()  # padding uses the run minimum


def test_fit_shifts_the_crop_where_a_centred_crop_would_cut_brain():
    shape, centre, radii = STUDY_GRIDS["ABIDE"]
    run = _run(shape, n_frames=1, centre=centre, radii=radii)
    naive = fit_to_shape(run[..., 0], (96, 96, 96))
    assert (naive > 50).sum() < (run > 50).sum()  # the centred crop loses brain here
    assert (fit_run_to_shape(run, (96, 96, 96)) > 50).sum() == (run > 50).sum()


def test_brain_larger_than_target_names_the_axis(tmp_path):
    run = _run((40, 40, 40), n_frames=2, centre=(20, 20, 20), radii=(10, 16, 10))
    with pytest.raises(VolumeError, match=r"axis 1 \(y") as err:
        fit_run_to_shape(run, (32, 24, 32), path=tmp_path / "x.nii.gz", record_id="r1")
    text = str(err.value)
    assert "32 voxels" in text and "allows 24" in text and "image_size" in text
    assert "voxel_size" in text and "r1" in text


# ---------------------------------------------------------------------------------- intensity

@pytest.mark.parametrize("method", ["zscore_run", "zscore_run_bgmin"])
def test_normalize_zscores_brain_voxels(method):
    run = _run(n_frames=6) * 3 + 50
    mask = brain_mask(run.mean(axis=3))
    out = normalize_run(run, method)
    assert out.shape == run.shape and out.dtype == np.float32
    assert abs(float(out[mask].mean())) < 1e-4
    assert abs(float(out[mask].std()) - 1) < 1e-4
    if method == "zscore_run_bgmin":
        assert np.all(out[~mask] == out[mask].min())
    else:
        assert np.all(out[~mask] < out[mask].min())  # background keeps its (low) values


def test_normalize_zscore_voxel_keeps_only_standardised_fluctuations():
    rng = np.random.default_rng(4)
    run = _run(n_frames=8) * 3 + 50
    mask = brain_mask(run.mean(axis=3))
    run[mask] += rng.normal(0, 1, (int(mask.sum()), 8)).astype(np.float32)
    first = tuple(int(a[0]) for a in mask.nonzero())
    run[first] = 350.0  # a flat brain voxel
    mask = brain_mask(run.mean(axis=3))
    assert mask[first]
    out = normalize_run(run, "zscore_voxel")
    assert out.shape == run.shape and out.dtype == np.float32
    assert np.all(out[~mask] == 0)
    series = out[mask]
    flat = series.std(axis=1) < 1e-6
    assert flat.sum() >= 1 and np.all(series[flat] == 0)  # a constant series becomes 0
    np.testing.assert_allclose(series[~flat].mean(axis=1), 0, atol=1e-5)
    np.testing.assert_allclose(series[~flat].std(axis=1), 1, atol=1e-4)
    # each voxel's own affine intensity change (gain, offset) leaves it unchanged
    scaled = run.copy()
    scaled[mask] = scaled[mask] * 2.5 + 10
    np.testing.assert_allclose(normalize_run(scaled, "zscore_voxel"), out, atol=1e-4)


def test_normalize_none_and_bad_method():
    run = _run(n_frames=2)
    out = normalize_run(run, "none")
    np.testing.assert_array_equal(out, run)
    assert out is not run
    with pytest.raises(ValueError, match="zscore_run"):
        normalize_run(run, "percentile")


# ---------------------------------------------------------------------------------- pipeline

def test_take_window_layout_and_memmap(tmp_path):
    spec = FmriSpec(image_size=(24, 24, 24), sequence_length=3, stride_within_seq=2)
    run = preprocess_fmri(_save_nifti(tmp_path, _run()), spec)
    np.save(tmp_path / "run.npy", run)
    mapped = np.load(tmp_path / "run.npy", mmap_mode="r")
    window = take_window(mapped, 4, spec)
    assert window.shape == (24, 24, 24, 3) and window.flags.c_contiguous
    for k, frame in enumerate(window_frames(4, 3, 2)):
        np.testing.assert_array_equal(window[..., k], run[frame])
    with pytest.raises(ValueError, match="has 12 frames"):
        take_window(run, 8, spec)  # needs frames 8..12
    with pytest.raises(ValueError, match="expects"):
        take_window(run[:, :20], 0, spec)


def test_preprocess_rejects_run_shorter_than_a_window(tmp_path):
    path = _save_nifti(tmp_path, _run(n_frames=4))
    with pytest.raises(VolumeError, match="4 frames; one window needs 5"):
        preprocess_fmri(path, FmriSpec(image_size=(24, 24, 24), sequence_length=3,
                                       stride_within_seq=2))


def test_voxel_size_resamples_nifti_and_refuses_frames(tmp_path):
    run = _run((20, 24, 18), n_frames=3)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    spec = FmriSpec(image_size=(12, 12, 12), sequence_length=2, voxel_size=(4, 4, 4))
    out = preprocess_fmri(_save_nifti(tmp_path, run, affine), spec)
    assert out.shape == (3, 12, 12, 12)
    folder = _save_frames(tmp_path / "frames", run)
    with pytest.raises(VolumeError, match="no affine"):
        preprocess_fmri(folder, spec)


def test_count_frames_of_a_folder_counts_frame_files_only(tmp_path):
    from umbrella.data.inputs import count_frames

    run = tmp_path / "run"
    run.mkdir()
    for name in ("frame_0.pt", "frame_1.pt", "frame_2.pt", "global_stats.pt", "notes.txt",
                 ".frame_3.pt", "frame_x.pt"):
        (run / name).write_bytes(b"")
    (run / "frame_4.pt.d").mkdir()
    assert count_frames(run) == 3
