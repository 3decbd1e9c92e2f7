import json
import shutil

import pytest

from umbrella.errors import UmbrellaError, VolumeError
from umbrella.training.run import train


def _broken_copy(tiny_cohort, tiny_records, tmp_path, n_bad):
    """A copy of the tiny cohort with the images of the first n_bad training records corrupted."""
    root = tmp_path / "cohort"
    shutil.copytree(tiny_cohort.root, root)
    rows = [json.loads(x) for x in tiny_records.read_text().splitlines()]
    bad = [r for r in rows if r["split"] == "train"][:n_bad]
    for r in bad:
        (root / r["images"][0]["path"]).write_bytes(b"not a nifti")
    return root, [r["id"] for r in bad]


def test_error_policy_names_record_and_file(tiny_config, tiny_cohort, tiny_records, tmp_path):
    root, bad = _broken_copy(tiny_cohort, tiny_records, tmp_path, 1)
    with pytest.raises(VolumeError) as err:
        train(tiny_config(f"dataset.T1.data_root={root}", "training.max_steps=4"), progress=False)
    assert bad[0] in str(err.value) and "sub-" in str(err.value) and ".nii.gz" in str(err.value)


def test_skip_policy_replaces_counts_and_lists(tiny_config, tiny_cohort, tiny_records, tmp_path):
    root, bad = _broken_copy(tiny_cohort, tiny_records, tmp_path, 1)
    result = train(tiny_config(f"dataset.T1.data_root={root}", "training.max_steps=4",
                               "dataset.on_bad_sample=skip", "dataset.max_bad_fraction=0.2"),
                   progress=False)
    rows = [json.loads(x) for x in (result.run_dir / "bad_samples.jsonl").read_text().splitlines()]
    assert {r["id"] for r in rows} == set(bad)
    assert all("_T1w.nii.gz" in r["reason"] and r["id"] in r["reason"] for r in rows)
    assert (result.model_dir / "model.safetensors").is_file()


def test_skip_policy_stops_past_the_bad_fraction(tiny_config, tiny_cohort, tiny_records, tmp_path):
    root, _ = _broken_copy(tiny_cohort, tiny_records, tmp_path, 4)
    with pytest.raises(UmbrellaError, match="max_bad_fraction"):
        train(tiny_config(f"dataset.T1.data_root={root}", "training.max_steps=4",
                          "dataset.on_bad_sample=skip", "dataset.max_bad_fraction=0.1"),
              progress=False)
