import atexit
import json
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from umbrella.data.records import load_records
from umbrella.errors import ConfigError
from umbrella.task_registry import AGE, SEX
from umbrella.tasks.prepare import SUMMARY_FILE, prepare


def _touch_images(root: Path, ids) -> None:
    (root / "img").mkdir(parents=True, exist_ok=True)
    for sid in ids:
        (root / "img" / f"{sid}_T1w.nii.gz").write_bytes(b"")  # prepare never opens images


def _records(summary) -> list[dict]:
    return [json.loads(line) for f in summary.files.values()
            for line in Path(f).read_text().splitlines()]


def _subject_splits(rows) -> dict[str, set]:
    seen: dict[str, set] = {}
    for r in rows:
        for s in r.get("metadata", {}).get("subjects", [r["subject_id"]]):
            seen.setdefault(s, set()).add(r["split"])
    return seen


def test_csv_with_pattern_abcd_months_and_skip_reasons(tmp_path):
    table = pd.DataFrame({
        "src_subject_id": ["NDAR01", "NDAR02", "NDAR03", "NDAR04", "NDAR05", "NDAR06", "NDAR07"],
        "sex": ["F", "M", "NR", None, "F", "M", "M"],
        "interview_age": [149, 120, 130, 140, None, 2000, 125],  # months
    })
    table.to_csv(tmp_path / "pheno.csv", index=False)
    _touch_images(tmp_path, ["NDAR01", "NDAR02", "NDAR03", "NDAR04", "NDAR05", "NDAR06"])
    summary = prepare(tmp_path / "pheno.csv", tmp_path / "out", tasks=["sex", "age"],
                      images={"T1": "img/{subject}_T1w.nii.gz"}, study="ABCD")
    assert summary.skipped == {
        "age: missing value": 1, "age: out of range [0.0, 120.0]": 1,  # 2000 months = 166.7 y
        "no T1 image": 1, "sex: missing value": 1, "sex: no male/female label": 1}
    by_id = {r["id"]: r for r in _records(summary)}
    assert by_id["NDAR01_age_T1"]["conversations"][1]["value"] == "12.4 years"  # 149 months
    assert by_id["NDAR02_age_T1"]["conversations"][1]["value"] == "10.0 years"
    assert by_id["NDAR01_sex_T1"]["conversations"][1]["value"] == "female"
    assert set(by_id) == {"NDAR01_sex_T1", "NDAR02_sex_T1", "NDAR05_sex_T1", "NDAR06_sex_T1",
                          "NDAR01_age_T1", "NDAR02_age_T1", "NDAR03_age_T1", "NDAR04_age_T1"}
    rec = by_id["NDAR03_age_T1"]
    assert rec["conversations"][0]["value"].startswith("<image>\n")
    assert rec["conversations"][0]["value"][len("<image>\n"):] in AGE.questions
    assert rec["study"] == "ABCD" and rec["metadata"]["value"] == pytest.approx(130 / 12)
    on_disk = json.loads((tmp_path / "out" / SUMMARY_FILE).read_text())
    assert on_disk["skipped"] == summary.skipped
    loaded = load_records(summary.files["sex_T1"], {"T1": Path(summary.data_roots["T1"])})
    assert all(im.path.is_file() for r in loaded for im in r.images)


def test_explicit_age_unit_and_sex_coding_for_an_unregistered_study(tmp_path):
    pd.DataFrame({"subject_id": ["a", "b", "c"], "sex": [1, 2, 3], "age": [24, 36, 48]}) \
        .to_csv(tmp_path / "p.csv", index=False)
    _touch_images(tmp_path, "abc")
    summary = prepare(tmp_path / "p.csv", tmp_path / "out", tasks=["sex", "age"],
                      images={"T1": "img/{subject}_T1w.nii.gz"}, study="MYSTUDY",
                      age_unit="months", sex_coding={1: "male", 2: "female"})
    answers = {r["id"]: r["conversations"][1]["value"] for r in _records(summary)}
    assert answers["a_age_T1"] == "2.0 years" and answers["c_age_T1"] == "4.0 years"
    assert answers["a_sex_T1"] == "male" and answers["b_sex_T1"] == "female"
    assert summary.skipped == {"sex: unknown code": 1}
    assert summary.examples["sex: unknown code"] == ["c: 3"]


def test_stratified_ratios_and_reproducible(tmp_path):
    ids = [f"s{i:03d}" for i in range(100)]
    pd.DataFrame({"subject_id": ids, "sex": ["male", "female"] * 50}).to_csv(tmp_path / "p.csv",
                                                                              index=False)
    _touch_images(tmp_path, ids)
    kw = dict(tasks=["sex"], images={"T1": "img/{subject}_T1w.nii.gz"}, study="X")
    a = prepare(tmp_path / "p.csv", tmp_path / "a", **kw)
    splits = json.loads(a.splits_file.read_text())
    sex = {s: "male" if i % 2 == 0 else "female" for i, s in enumerate(ids)}
    counts = Counter((splits[s], sex[s]) for s in ids)
    for x in ("male", "female"):  # 50 per class: 35 / round(7.5) = 8 / 7
        assert (counts[("train", x)], counts[("val", x)], counts[("test", x)]) == (35, 8, 7)
    prepare(tmp_path / "p.csv", tmp_path / "b", **kw)
    assert (tmp_path / "a" / "sex_T1.jsonl").read_text() == (tmp_path / "b" / "sex_T1.jsonl").read_text()
    c = prepare(tmp_path / "p.csv", tmp_path / "c", seed=7, **kw)
    assert json.loads(c.splits_file.read_text()) != splits
    d = prepare(tmp_path / "p.csv", tmp_path / "d", seed=7, splits_file=a.splits_file, **kw)
    assert json.loads(d.splits_file.read_text()) == splits  # an existing split is reused


def test_comparison_pairs_questions_and_generic_columns(tmp_path):
    rng = np.random.default_rng(0)
    ids = [f"s{i:02d}" for i in range(40)]
    pd.DataFrame({"subject_id": ids, "sex": rng.choice(["male", "female"], 40),
                  "age": rng.uniform(8, 80, 40).round(1), "DX_GROUP": rng.choice([1, 2], 40),
                  "score": rng.integers(80, 120, 40), "site": rng.choice(["NYU", "UCLA"], 40)}
                 ).to_csv(tmp_path / "p.csv", index=False)
    _touch_images(tmp_path, ids)
    summary = prepare(tmp_path / "p.csv", tmp_path / "out",
                      tasks=["compare_age", "compare_sex", "diagnosis", "score", "site", "sex"],
                      images={"T1": "img/{subject}_T1w.nii.gz"}, study="X",
                      labels={"diagnosis": {1: "autism", 2: "control"}}, questions_per_record=2,
                      min_age_gap=2.0)
    rows = _records(summary)
    assert len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        q = r["conversations"][0]["value"]
        if r["task"] == "compare_age":
            a, b = r["metadata"]["values"]
            assert abs(a - b) >= 2.0
            assert r["conversations"][1]["value"] == ("first" if a > b else "second")
            assert q.startswith("<image>\n<image>\n")
            assert [im["path"] for im in r["images"]] == \
                [f"img/{s}_T1w.nii.gz" for s in r["metadata"]["subjects"]]
        if r["task"] == "compare_sex":
            a, b = r["metadata"]["values"]
            assert r["conversations"][1]["value"] == ("same" if a == b else "different")
    answers = Counter(r["conversations"][1]["value"] for r in rows if r["task"] == "compare_sex")
    assert min(answers.values()) >= 0.35 * sum(answers.values())  # about balanced
    assert summary.tasks["diagnosis"]["options"] == ["autism", "control"]
    assert summary.tasks["score"]["kind"] == "regression" and summary.tasks["score"]["decimals"] == 0
    assert summary.tasks["site"]["options"] == ["NYU", "UCLA"]
    sex_rows = [r for r in rows if r["task"] == "sex"]
    per_subject = Counter(r["subject_id"] for r in sex_rows)
    assert set(per_subject.values()) == {2}  # questions_per_record=2: two distinct phrasings
    for sid in per_subject:
        qs = {r["conversations"][0]["value"] for r in sex_rows if r["subject_id"] == sid}
        assert len(qs) == 2 and all(q[len("<image>\n"):] in SEX.questions for q in qs)
    assert all(len(v) == 1 for v in _subject_splits(rows).values())


def _nifti(path: Path, shape) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(0).random(shape).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), path)


def test_bids_tree_all_modalities_one_split_per_subject(tmp_path):
    bids = tmp_path / "bids"
    subjects = [f"{i:02d}" for i in range(1, 9)]
    for s in subjects:
        _nifti(bids / f"sub-{s}/anat/sub-{s}_T1w.nii.gz", (6, 6, 6))
        if s != "08":
            _nifti(bids / f"sub-{s}/ses-1/func/sub-{s}_ses-1_task-rest_bold.nii.gz", (6, 6, 6, 3))
            _nifti(bids / f"sub-{s}/ses-1/func/sub-{s}_ses-1_task-nback_bold.nii.gz", (6, 6, 6, 3))
        _nifti(bids / f"sub-{s}/dwi/sub-{s}_dwi.nii.gz", (6, 6, 6, 4))
    pd.DataFrame({"participant_id": [f"sub-{s}" for s in subjects],
                  "sex": ["M", "F"] * 4, "age": [20, 30, 40, 50, 60, 70, 80, 90]}) \
        .to_csv(bids / "participants.tsv", sep="\t", index=False)
    summary = prepare(bids / "participants.tsv", tmp_path / "out", tasks=["sex", "age"],
                      bids_root=bids, study="MYSTUDY", ratios=(0.5, 0.25, 0.25))
    assert set(summary.files) == {f"{t}_{m}" for t in ("sex", "age")
                                  for m in ("T1", "rsfMRI", "dMRI")}
    assert summary.skipped == {"no rsfMRI image": 1}
    rows = _records(summary)
    assert all(len(v) == 1 for v in _subject_splits(rows).values())
    assert Counter(json.loads(summary.splits_file.read_text()).values()) == \
        {"train": 4, "val": 2, "test": 2}
    func = [r["images"][0]["path"] for r in rows if r["images"][0]["modality"] == "rsfMRI"]
    assert len(func) == 14 and all("task-rest" in p for p in func)  # rest runs only
    for r in rows:
        assert (bids / r["images"][0]["path"]).is_file()
        assert Path(summary.data_roots[r["images"][0]["modality"]]) == bids.resolve()


def test_errors_name_the_column_and_the_fix(tmp_path):
    pd.DataFrame({"subject_id": ["a", "b"], "sex": ["male", "female"]}).to_csv(
        tmp_path / "p.csv", index=False)
    _touch_images(tmp_path, "ab")
    kw = dict(images={"T1": "img/{subject}_T1w.nii.gz"}, study="X")
    with pytest.raises(ConfigError, match=r"no column 'bmi'.*columns=\{'bmi'"):
        prepare(tmp_path / "p.csv", tmp_path / "out", tasks=["bmi"], **kw)
    with pytest.raises(ConfigError, match="unknown modality 'T2'"):
        prepare(tmp_path / "p.csv", tmp_path / "out", tasks=["sex"], images={"T2": "x"},
                study="X")
    with pytest.raises(ConfigError, match="subject_column"):
        prepare(tmp_path / "p.csv", tmp_path / "out", tasks=["sex"], subject_column="eid", **kw)
    with pytest.raises(ConfigError, match="ratios"):
        prepare(tmp_path / "p.csv", tmp_path / "out", tasks=["sex"], ratios=(0.5, 0.5, 0.5), **kw)


_POOL = [f"sub-{i:03d}" for i in range(60)]
_IMAGES = Path(tempfile.mkdtemp(prefix="umbrella-prepare-"))
atexit.register(shutil.rmtree, _IMAGES, ignore_errors=True)
_touch_images(_IMAGES, _POOL)


@st.composite
def phenotype_tables(draw):
    ids = draw(st.lists(st.sampled_from(_POOL), min_size=6, max_size=40, unique=True))
    n = len(ids)
    sex = draw(st.lists(st.sampled_from(["male", "female", "female", None, "x"]), min_size=n,
                        max_size=n))
    age = draw(st.lists(st.one_of(st.none(), st.floats(-10, 130)), min_size=n, max_size=n))
    dx = draw(st.lists(st.sampled_from(["asd", "control", None]), min_size=n, max_size=n))
    return pd.DataFrame({"subject_id": ids, "sex": sex, "age": age, "dx": dx})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table=phenotype_tables(), seed=st.integers(0, 2**16))
def test_property_no_subject_in_two_splits(table, seed):
    labelled = table.dropna(subset=["sex"])
    assume(labelled["sex"].isin(["male", "female"]).any() and table["dx"].nunique() == 2
           and table["age"].between(0, 120).any())  # else a ConfigError (tested elsewhere)
    with tempfile.TemporaryDirectory() as tmp:
        table.to_csv(Path(tmp) / "p.csv", index=False)
        summary = prepare(Path(tmp) / "p.csv", Path(tmp) / "out",
                          tasks=["sex", "age", "diagnosis", "compare_sex", "compare_age"],
                          images={"T1": str(_IMAGES / "img/{subject}_T1w.nii.gz")}, study="X",
                          columns={"diagnosis": "dx"}, seed=seed,
                          sex_coding={"male": "male", "female": "female"})
        rows = _records(summary)
        seen = _subject_splits(rows)
        assert all(len(v) == 1 for v in seen.values())
        assert {s: v.pop() for s, v in seen.items()} == json.loads(summary.splits_file.read_text())
        assert summary.skipped.get("sex: unknown code", 0) == int((table["sex"] == "x").sum())


def test_no_image_found_says_where_it_looked_and_image_root_fixes_it(tmp_path):
    (tmp_path / "tables").mkdir()
    pd.DataFrame({"src_subject_id": ["NDAR01", "NDAR02"], "sex": ["F", "M"]}).to_csv(
        tmp_path / "tables" / "pheno.csv", index=False)
    _touch_images(tmp_path, ["NDAR01", "NDAR02"])
    with pytest.raises(ConfigError) as err:
        prepare(tmp_path / "tables" / "pheno.csv", tmp_path / "out", tasks=["sex"],
                images={"T1": "img/{subject}_T1w.nii.gz"}, study="ABCD")
    msg = str(err.value)
    assert "'src_subject_id' (first id 'NDAR01'" in msg and "--subject-column" in msg
    assert str(tmp_path / "tables" / "img" / "NDAR01_T1w.nii.gz") in msg and "image_root" in msg
    assert not (tmp_path / "out").exists()  # nothing half-written
    summary = prepare(tmp_path / "tables" / "pheno.csv", tmp_path / "out", tasks=["sex"],
                      images={"T1": "img/{subject}_T1w.nii.gz"}, study="ABCD",
                      image_root=tmp_path)
    assert len(_records(summary)) == 2


def test_train_config_carries_the_t1_recipe_only_for_t1_records_alone(tmp_path):
    import yaml

    from umbrella.config import load_config
    from umbrella.recipes import T1_TWO_STAGE
    from umbrella.tasks.prepare import PrepareSummary, train_config

    def summary(files):
        roots = {f.rsplit("_", 1)[1]: str(tmp_path / f.rsplit("_", 1)[1]) for f in files}
        return PrepareSummary(tmp_path, {f: tmp_path / f"{f}.jsonl" for f in files}, {}, {}, {},
                              roots, tmp_path / "splits.json")

    tree, recipe = train_config(summary(["sex_T1", "age_T1"]), "SITE")
    assert recipe == "t1_two_stage" and tree["recipe"] == recipe
    t1 = tree["dataset"]["T1"]
    assert t1["records"] == [str(tmp_path / "age_T1.jsonl"), str(tmp_path / "sex_T1.jsonl")]
    assert tree["training"] == {"output_dir": str(tmp_path / "runs")}  # the rest: the recipe's
    assert tree["dataset"]["cache_dir"] == str(tmp_path / "cache")
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(tree))
    cfg = load_config(tmp_path / "train.yaml")  # as `umbrella train -c train.yaml` reads it
    assert cfg.dataset.T1.image_size == T1_TWO_STAGE["dataset"]["T1"]["image_size"]
    assert cfg.dataset.memoize is True and cfg.model.vision_init == "pretrain"
    assert cfg.training.max_steps == T1_TWO_STAGE["training"]["max_steps"]

    tree, recipe = train_config(summary(["sex_T1", "sex_rsfMRI", "compare_age_T1"]), "SITE")
    assert recipe is None and set(tree) == {"dataset", "training"}
    assert set(tree["dataset"]) == {"T1", "rsfMRI"}
    assert tree["dataset"]["rsfMRI"] == {"studies": ["SITE"], "data_root": str(tmp_path / "rsfMRI"),
                                         "records": [str(tmp_path / "sex_rsfMRI.jsonl")]}
    assert len(tree["dataset"]["T1"]["records"]) == 2
