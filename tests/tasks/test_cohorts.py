"""prepare on small synthetic cohorts laid out as ABCD, UK Biobank and HCP users receive them."""

import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from umbrella.cli import main
from umbrella.errors import ConfigError
from umbrella.tasks.prepare import prepare
from umbrella.tasks.subjects import session_in_path, session_key, subject_key


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")  # prepare never opens images
    return path


def _rows(summary) -> list[dict]:
    return [json.loads(line) for f in summary.files.values()
            for line in Path(f).read_text().splitlines()]


ABCD_IDS = ["NDAR_INV0A4P0LWM", "NDAR_INV1B2C3D4E", "NDAR_INV2XYZ0001", "NDAR_INV3QRS0002",
            "NDAR_INV4TUV0003", "NDAR_INV5WXY0004"]
EVENTS = {"baseline_year_1_arm_1": "baselineYear1Arm1",
          "2_year_follow_up_y_arm_1": "2YearFollowUpYArm1"}


def _abcd_bids(root: Path) -> Path:
    bids = root / "rawdata"
    for sid in ABCD_IDS:
        label = sid.replace("_", "")
        for ses in EVENTS.values():
            _touch(bids / f"sub-{label}/ses-{ses}/anat/sub-{label}_ses-{ses}_run-01_T1w.nii.gz")
    return bids


def _abcd_table(root: Path, id_column: str = "subjectkey") -> Path:
    rows = []
    for i, sid in enumerate(ABCD_IDS):
        for j, event in enumerate(EVENTS):
            rows.append({id_column: sid, "eventname": event,
                         "interview_age": 110 + i + 24 * j,  # months; follow-up 2 years later
                         "sex": "F" if i % 2 else "M"})
    path = root / "abcd_y_lt.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_id_and_session_keys_are_documented_normalisations():
    assert subject_key("NDAR_INV0A4P0LWM") == subject_key("sub-NDARINV0A4P0LWM") == \
        "ndarinv0a4p0lwm"
    assert subject_key("100307") == subject_key("100307.0") == subject_key("sub-100307")
    assert subject_key("sub-0042") == subject_key("42") == "42"
    assert session_key("baseline_year_1_arm_1") == session_key("ses-baselineYear1Arm1")
    assert session_key("2_year_follow_up_y_arm_1") == session_key("ses-2YearFollowUpYArm1")
    assert session_in_path("sub-1/ses-2/anat/x_T1w.nii.gz") == "2"
    assert session_in_path("bulk/1234567_20252_3_0/T1/T1.nii.gz") == "3"
    assert session_in_path("sub-1/anat/x.nii.gz") == ""


def test_abcd_bids_two_sessions_subjectkey_and_ndar_ids(tmp_path):
    summary = prepare(_abcd_table(tmp_path), tmp_path / "out", tasks=["sex", "age"],
                      bids_root=_abcd_bids(tmp_path), study="ABCD", ratios=(0.5, 0.25, 0.25))
    assert summary.matching["T1"]["matched"] == 6 and summary.sessions == {"T1": 2}
    rows = _rows(summary)
    age = {(r["subject_id"], r["session"]): r["metadata"]["value"] for r in rows
           if r["task"] == "age"}
    assert len(age) == 12  # subject x session
    assert age[("NDAR_INV0A4P0LWM", "baselineYear1Arm1")] == pytest.approx(110 / 12)
    assert age[("NDAR_INV0A4P0LWM", "2YearFollowUpYArm1")] == pytest.approx(134 / 12)
    assert all(r["metadata"]["session"] == r["session"] and "ses-" in r["images"][0]["path"]
               and r["session"] in r["images"][0]["path"] for r in rows)
    splits = {}
    for r in rows:
        splits.setdefault(r["subject_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in splits.values())  # both sessions in one split
    assert set(json.loads(summary.splits_file.read_text())) == set(ABCD_IDS)


def test_within_subject_tasks_order_and_gap(tmp_path):
    summary = prepare(_abcd_table(tmp_path, "src_subject_id"), tmp_path / "out",
                      tasks=["session_order", "session_gap"], bids_root=_abcd_bids(tmp_path),
                      study="ABCD")
    rows = _rows(summary)
    order = [r for r in rows if r["task"] == "session_order"]
    gap = [r for r in rows if r["task"] == "session_gap"]
    assert len(order) == len(gap) == 6  # one pair of sessions per subject
    for r in order:
        assert len(r["images"]) == 2 and r["conversations"][0]["value"].count("<image>") == 2
        first, second = r["metadata"]["ages"]
        assert r["conversations"][1]["value"] == ("first" if first > second else "second")
        assert EVENTS["2_year_follow_up_y_arm_1"] in \
            r["images"][0 if first > second else 1]["path"]
    assert {r["conversations"][1]["value"] for r in order} == {"first", "second"}
    assert all(r["conversations"][1]["value"] == "2.0 years" for r in gap)


def test_abcd5_codings_and_errors_that_name_the_flag(tmp_path, capsys):
    table = pd.DataFrame({"src_subject_id": ABCD_IDS, "eventname": ["baseline_year_1_arm_1"] * 6,
                          "demo_sex_v2": [1, 2, 1, 2, 777, 1]})
    table.to_csv(tmp_path / "abcd_p_demo.csv", index=False)
    bids = _abcd_bids(tmp_path)
    base = ["prepare", "--phenotype", str(tmp_path / "abcd_p_demo.csv"), "--tasks", "sex",
            "--bids", str(bids), "--out", str(tmp_path / "out")]
    assert main(base + ["--study", "ABCD"]) == 1  # the registry's column is 'sex'
    err = capsys.readouterr().err
    assert "--sex-column" in err and "demo_sex_v2" in err  # the flag and the look-alike column
    assert main(base + ["--study", "ABCD", "--sex-column", "demo_sex_v2"]) == 0
    out = capsys.readouterr().out
    assert "sex_T1" in out and "6 of 6 table subjects matched" in out
    rows = [json.loads(x) for x in (tmp_path / "out" / "sex_T1.jsonl").read_text().splitlines()]
    # sex is asked only at baseline in 5.x; it labels the follow-up scan too (subject-level)
    assert Counter(r["conversations"][1]["value"] for r in rows) == {"male": 6, "female": 4}
    # a study whose coding is not 1/2: the error shows the codes seen, with counts, and the flag
    mine = base[:-1] + [str(tmp_path / "out2"), "--study", "MINE", "--subject-column",
                        "src_subject_id", "--sex-column", "demo_sex_v2"]
    assert main(mine) == 1
    err = capsys.readouterr().err
    assert "'1' x3" in err and "'2' x2" in err and "--sex-coding" in err
    assert main(mine + ["--sex-coding", "1=male,2=female"]) == 0


def test_ukb_field_coded_table_with_instances_2_and_3_and_bulk_layout(tmp_path):
    eids = [1000001 + i for i in range(6)]
    pd.DataFrame({"eid": eids, "31-0.0": [0, 1] * 3,
                  "21003-2.0": [60, 62, 64, 66, 68, 70], "21003-3.0": [63, 65, 67, None, 71, 73],
                  "21001-2.0": [22.5, 24.0, 31.2, 27.7, 19.9, 25.0]}) \
        .to_csv(tmp_path / "ukb.csv", index=False)
    for eid in eids:
        for instance in (2, 3):
            _touch(tmp_path / f"bulk/{eid}_20252_{instance}_0/T1/T1_brain.nii.gz")
    summary = prepare(tmp_path / "ukb.csv", tmp_path / "out", tasks=["sex", "age", "bmi"],
                      images={"T1": "bulk/{subject}_20252_*_0/T1/T1_brain.nii.gz"},
                      study="UKB")
    rows = _rows(summary)
    age = {(r["subject_id"], r["session"]): r["metadata"]["value"] for r in rows
           if r["task"] == "age"}
    assert age[("1000001", "2")] == 60 and age[("1000001", "3")] == 63
    assert ("1000004", "3") not in age  # 21003-3.0 empty: no age from instance 2 instead
    bmi = {(r["subject_id"], r["session"]) for r in rows if r["task"] == "bmi"}
    assert bmi == {(str(e), "2") for e in eids}  # 21001 is a registry column; no 21001-3.0
    assert summary.skipped["bmi: no column 21001-3.0 for the scan's instance"] == 6
    sex = [r for r in rows if r["task"] == "sex"]
    assert len(sex) == 12  # sex holds for every instance


def test_hcp_numeric_ids_from_a_spreadsheet(tmp_path):
    ids = [100307, 100408, 101107, 101309]
    pd.DataFrame({"Subject": [float(i) for i in ids], "Gender": ["M", "F", "F", "M"],
                  "PMAT24_A_CR": [20, 15, 18, 22]}).to_csv(tmp_path / "hcp.csv", index=False)
    for i in ids:
        _touch(tmp_path / f"HCP/{i}/T1w/T1w_acpc_dc_restore_brain.nii.gz")
    summary = prepare(tmp_path / "hcp.csv", tmp_path / "out", tasks=["sex", "fluid_intelligence"],
                      images={"T1": "HCP/{subject}/T1w/T1w_acpc_dc_restore_brain.nii.gz"},
                      study="HCP", ratios=(0.5, 0.25, 0.25))
    rows = _rows(summary)
    assert {r["subject_id"] for r in rows} == {str(i) for i in ids}  # not '100307.0'
    assert summary.matching["T1"]["matched"] == 4
    assert len([r for r in rows if r["task"] == "fluid_intelligence"]) == 4


def test_unmatched_ids_listed_with_examples_and_duplicate_rows_name_session_flag(tmp_path):
    pd.DataFrame({"subject_id": ["a1", "a2", "a3"], "sex": ["male", "female", "male"]}) \
        .to_csv(tmp_path / "p.csv", index=False)
    for sid in ("a1", "a2", "zz9"):
        _touch(tmp_path / f"img/sub-{sid}_T1w.nii.gz")
    summary = prepare(tmp_path / "p.csv", tmp_path / "out", tasks=["sex"],
                      images={"T1": "img/{subject}_T1w.nii.gz"}, study="X")
    assert summary.matching["T1"] == {"table_ids": 3, "image_ids": 3, "matched": 2,
                                      "unmatched_table_examples": ["a3"],
                                      "unmatched_image_examples": ["sub-zz9"]}
    pd.DataFrame({"subject_id": ["a1", "a1", "a2"], "visit_no": [1, 2, 1],
                  "sex": ["male", "male", "female"]}).to_csv(tmp_path / "long.csv", index=False)
    with pytest.raises(ConfigError, match=r"several rows.*a1 x2.*--session-column.*visit_no"):
        prepare(tmp_path / "long.csv", tmp_path / "out", tasks=["sex"],
                images={"T1": "img/{subject}_T1w.nii.gz"}, study="X")
    with pytest.raises(ConfigError, match=r"'subjectkey' among the columns.*--subject-column"):
        prepare(tmp_path / "long.csv", tmp_path / "out", tasks=["sex"], study="X",
                images={"T1": "img/{subject}_T1w.nii.gz"}, subject_column="subjectkey")
    pd.DataFrame({"guid": ["a1"], "sex": ["male"]}).to_csv(tmp_path / "noid.csv", index=False)
    with pytest.raises(ConfigError, match=r"looked for .*subjectkey.*--subject-column"):
        prepare(tmp_path / "noid.csv", tmp_path / "out", tasks=["sex"], study="X",
                images={"T1": "img/{subject}_T1w.nii.gz"})


def test_prepare_config_yaml_and_set_overrides(tmp_path, capsys):
    table = pd.DataFrame({"ID": ["s1", "s2", "s3", "s4"], "gender": ["1", "2", "2", "1"],
                          "age_m": [240, 300, 360, 420]})
    table.to_csv(tmp_path / "t.csv", index=False)
    for sid in table["ID"]:
        _touch(tmp_path / f"img/{sid}.nii.gz")
    (tmp_path / "prep.yaml").write_text(
        f"phenotype: {tmp_path / 't.csv'}\nstudy: LAB\ntasks: [sex, age]\n"
        "image: {T1: 'img/{subject}.nii.gz'}\nsubject_column: ID\nsex_column: gender\n"
        "sex_coding: {1: male, 2: female}\nage_column: age_m\n"
        "studies: {LAB: {age_unit: months}}\n")
    assert main(["prepare", "--config", str(tmp_path / "prep.yaml"), "--out",
                 str(tmp_path / "out")]) == 0
    ages = [json.loads(x)["conversations"][1]["value"]
            for x in (tmp_path / "out" / "age_T1.jsonl").read_text().splitlines()]
    assert sorted(ages) == ["20.0 years", "25.0 years", "30.0 years", "35.0 years"]
    assert main(["prepare", "--config", str(tmp_path / "prep.yaml"), "--out",
                 str(tmp_path / "out2"), "--set", "studies.LAB.age_unit=years"]) == 1
    assert "out of range" in capsys.readouterr().err  # 240..420 "years": the flag won
    assert main(["prepare", "--config", str(tmp_path / "prep.yaml"), "--out",
                 str(tmp_path / "out3"), "--set", "studies.LAB.age_units=years"]) == 1
    assert "studies.LAB.age_units" in capsys.readouterr().err


def test_abcd5_two_tables_joined_on_subject_and_event(tmp_path, capsys):
    lt = _abcd_table(tmp_path, "src_subject_id")  # eventname, interview_age, (sex: dropped)
    pd.read_csv(lt).drop(columns=["sex"]).to_csv(lt, index=False)
    pd.DataFrame({"src_subject_id": ABCD_IDS, "eventname": ["baseline_year_1_arm_1"] * 6,
                  "demo_sex_v2": [1, 2, 2, 1, 999, 2], "interview_age": [0] * 6}) \
        .to_csv(tmp_path / "abcd_p_demo.csv", index=False)  # interview_age: the first table's
    code = main(["prepare", "--study", "ABCD", "--phenotype", str(lt), "--phenotype",
                 str(tmp_path / "abcd_p_demo.csv"), "--bids", str(_abcd_bids(tmp_path)),
                 "--sex-column", "demo_sex_v2", "--tasks", "sex,age", "--out",
                 str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    rows = [json.loads(x) for f in ("sex_T1", "age_T1")
            for x in (tmp_path / "out" / f"{f}.jsonl").read_text().splitlines()]
    sex = {(r["subject_id"], r["session"]): r["conversations"][1]["value"] for r in rows
           if r["task"] == "sex"}
    assert len(sex) == 10 and sex[("NDAR_INV0A4P0LWM", "2YearFollowUpYArm1")] == "male"
    ages = sorted(r["metadata"]["value"] for r in rows if r["task"] == "age")
    assert len(ages) == 12 and ages[0] == pytest.approx(110 / 12)  # not the second table's 0
