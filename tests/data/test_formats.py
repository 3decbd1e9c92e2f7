"""Every volume format nibabel reads (NIfTI-1/2, FreeSurfer .mgh/.mgz) goes through one reader
and the same checks."""

import json

import nibabel as nib
import numpy as np
import pytest

from umbrella.data.validate import validate_records_files
from umbrella.data.volumes import VolumeSpec, is_compressed, preprocess_volume, read_nifti
from umbrella.errors import VolumeError


def _volume():
    rng = np.random.default_rng(0)
    data = (rng.random((20, 22, 18)) * 100).astype(np.float32)
    affine = np.array([[-1.0, 0, 0, 10], [0, 0, 1.0, -12], [0, -1.0, 0, 14], [0, 0, 0, 1]])
    return data, affine  # LIA, as FreeSurfer's conformed space


@pytest.fixture()
def files(tmp_path):
    data, affine = _volume()
    out = {}
    for name, cls in (("T1.nii.gz", nib.Nifti1Image), ("T1_n2.nii", nib.Nifti2Image),
                      ("T1.mgh", nib.MGHImage), ("T1.mgz", nib.MGHImage)):
        nib.save(cls(data, affine), tmp_path / name)
        out[name] = tmp_path / name
    return out


def test_mgz_mgh_and_nifti2_read_like_nifti1(files):
    ref, ref_affine = read_nifti(files["T1.nii.gz"])
    for name in ("T1_n2.nii", "T1.mgh", "T1.mgz"):
        data, affine = read_nifti(files[name])
        np.testing.assert_allclose(data, ref)
        np.testing.assert_allclose(affine, ref_affine)
    assert is_compressed(files["T1.mgz"]) and not is_compressed(files["T1.mgh"])
    spec = VolumeSpec(image_size=(16, 16, 16))
    np.testing.assert_allclose(preprocess_volume(files["T1.mgz"], spec),
                               preprocess_volume(files["T1.nii.gz"], spec))


def test_validate_accepts_every_format_and_still_catches_a_truncated_mgh(files, tmp_path):
    cut = tmp_path / "cut.mgh"
    cut.write_bytes(files["T1.mgh"].read_bytes()[:5000])
    rows = [{"id": f"r{i}", "subject_id": "s", "split": "train", "task": "sex",  # one scan
             "images": [{"modality": "T1", "path": path.name}],
             "conversations": [{"from": "human", "value": "<image>\nWhat is the sex?"},
                               {"from": "gpt", "value": "male"}]}
            for i, path in enumerate([*files.values(), cut])]
    recs = tmp_path / "r.jsonl"
    recs.write_text("\n".join(json.dumps(r) for r in rows))
    report = validate_records_files([recs], {"T1": tmp_path}, progress=False)
    assert [(p.record_id, p.kind) for p in report.problems] == [("r4", "corrupt_file")]
    assert "truncated" in report.problems[0].message
    with pytest.raises(VolumeError, match="truncated"):
        read_nifti(cut)
