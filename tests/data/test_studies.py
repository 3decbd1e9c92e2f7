"""Tests for umbrella.data.studies: registry, overrides, crop/pad plans, phenotype decoding."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from umbrella.config import load_config
from umbrella.data.studies import (
    REGISTRY,
    StudyInfo,
    age_in_years,
    crop_pad_plan,
    decode_sex,
    get_study,
)
from umbrella.data.volumes import fit_to_shape
from umbrella.errors import ConfigError

NATIVE = {"ABCD": (96, 96, 95), "UKB": (88, 88, 64), "HCP": (91, 109, 91),
          "ABIDE": (97, 115, 97)}


def test_registry_holds_the_documented_geometry_and_trs():
    assert {name: REGISTRY[name].fmri_shape for name in NATIVE} == NATIVE
    assert REGISTRY["HBN"].fmri_shape is None
    assert {n: REGISTRY[n].tr for n in ("ABCD", "UKB", "HCP", "HBN", "ABIDE")} == \
        {"ABCD": 0.8, "UKB": 0.735, "HCP": 0.72, "HBN": None, "ABIDE": None}
    assert all(s.notes for s in REGISTRY.values())
    assert REGISTRY["ABCD"].subject_column == "src_subject_id"
    assert REGISTRY["UKB"].subject_column == "eid"
    assert REGISTRY["HCP"].age_column is None  # exact age is restricted data


def _apply_plan(array: np.ndarray, plan) -> np.ndarray:
    """Crop (negative) / pad (positive, with the minimum) each axis as the plan says."""
    crops = tuple(slice(max(-b, 0), n - max(-a, 0))
                  for n, (b, a) in zip(array.shape, plan, strict=True))
    pads = [(max(b, 0), max(a, 0)) for b, a in plan]
    return np.pad(array[crops], pads, constant_values=float(array.min()))


@pytest.mark.parametrize("study", list(NATIVE))
def test_crop_pad_plan_reaches_96_cubed(study):
    native = NATIVE[study]
    plan = crop_pad_plan(native, (96, 96, 96))
    assert [n + before + after for n, (before, after) in zip(native, plan, strict=True)] == [96] * 3
    index = np.arange(np.prod(native), dtype=np.float32).reshape(native)
    planned = _apply_plan(index, plan)
    assert planned.shape == (96, 96, 96)
    np.testing.assert_array_equal(planned, fit_to_shape(index, (96, 96, 96)))  # same convention


def test_crop_pad_plan_values():
    assert crop_pad_plan((96, 96, 95), (96, 96, 96)) == [(0, 0), (0, 0), (0, 1)]
    assert crop_pad_plan((88, 88, 64), (96, 96, 96)) == [(4, 4), (4, 4), (16, 16)]
    assert crop_pad_plan((91, 109, 91), (96, 96, 96)) == [(2, 3), (-6, -7), (2, 3)]
    assert crop_pad_plan((97, 115, 97), (96, 96, 96)) == [(0, -1), (-9, -10), (0, -1)]
    with pytest.raises(ValueError, match="native"):
        crop_pad_plan((96, 96), (96, 96, 96))


@pytest.mark.parametrize(("study", "raw", "expected"), [
    ("ABCD", "M", "male"), ("ABCD", "F", "female"), ("ABCD", "NR", None), ("ABCD", "O", None),
    ("UKB", 0, "female"), ("UKB", 1.0, "male"), ("UKB", "1", "male"),
    ("HCP", "M", "male"), ("HCP", "F", "female"),
    ("HBN", 0, "male"), ("HBN", "1", "female"),
    ("ABIDE", 1, "male"), ("ABIDE", 2.0, "female"), ("ABIDE", np.int64(2), "female"),
    ("ABIDE", None, None), ("ABIDE", float("nan"), None), ("ABCD", " ", None),
    ("DEMO", "female", "female"), ("DEMO", "Male", "male"),
])
def test_decode_sex_per_study(study, raw, expected):
    assert decode_sex(get_study(study), raw) == expected


def test_unknown_sex_code_names_study_value_and_key():
    with pytest.raises(ValueError, match="ABIDE") as err:
        decode_sex(get_study("ABIDE"), 3)
    assert "3" in str(err.value) and "studies.ABIDE.sex_coding" in str(err.value)


@pytest.mark.parametrize(("study", "raw", "years"), [
    ("ABCD", 120, 10.0), ("ABCD", "114", 9.5), ("UKB", 63, 63.0), ("HBN", "10.25", 10.25),
    ("ABIDE", 16.77, 16.77), ("ABIDE", "", None), ("UKB", None, None),
])
def test_age_in_years_per_study(study, raw, years):
    got = age_in_years(get_study(study), raw)
    assert got == years if years is None else math.isclose(got, years)


def test_age_problems_are_named():
    with pytest.raises(ConfigError, match="studies.HCP.age_column"):
        get_study("HCP", require=["age_column"])
    assert age_in_years(get_study("HCP"), 27) == 27.0  # the caller names the column
    with pytest.raises(ConfigError, match="studies.X.sex_coding"):
        decode_sex(dataclasses.replace(get_study("ABCD"), name="X", sex_coding={}), "M")
    hcp = get_study("HCP", {"age_column": "Age"})
    with pytest.raises(ValueError, match="age band"):
        age_in_years(hcp, "22-25")
    with pytest.raises(ValueError, match="not a valid age"):
        age_in_years(get_study("UKB"), -3)
    assert age_in_years(get_study("HCP", {"age_column": "Age_in_Yrs"}), 29) == 29.0


def test_overrides_change_fields():
    study = get_study("UKB", {"age_column": "21003-3.0", "sex_column": "p31", "tr": 0.7})
    assert (study.age_column, study.sex_column, study.tr) == ("21003-3.0", "p31", 0.7)
    assert study.sex_coding == REGISTRY["UKB"].sex_coding  # untouched fields keep registry values
    assert REGISTRY["UKB"].age_column == "21003-2.0"  # the registry itself is unchanged
    recoded = get_study("abide", {"sex_coding": {1: "female", 2: "male"},
                                  "fmri_shape": [61, 73, 61]})
    assert recoded.name == "ABIDE" and recoded.fmri_shape == (61, 73, 61)
    assert decode_sex(recoded, 1) == "female"


def test_bad_overrides_are_reported_together():
    with pytest.raises(ConfigError) as err:
        get_study("ABCD", {"age_units": "months", "tr": -1, "sex_coding": {"M": "man"}})
    problems = err.value.problems
    assert len(problems) == 3
    assert any("studies.ABCD.age_units" in p and "age_unit" in p for p in problems)
    assert any("studies.ABCD.tr" in p for p in problems)
    assert any("studies.ABCD.sex_coding" in p for p in problems)


def test_unknown_study_needs_every_field():
    with pytest.raises(ConfigError) as err:
        get_study("PPMI", {"subject_column": "PATNO", "age_unit": "years"})
    text = str(err.value)
    for key in ("studies.PPMI.sex_column", "studies.PPMI.sex_coding", "studies.PPMI.age_column"):
        assert key in text
    assert "studies.PPMI.subject_column" not in text and "ABCD" in text
    with pytest.raises(ConfigError, match="did you mean 'ABCD'"):
        get_study("ABDC")
    study = get_study("PPMI", {"subject_column": "PATNO", "sex_column": "SEX",
                               "sex_coding": {"0": "female", "1": "male"}, "age_column": "AGE",
                               "age_unit": "years"})
    assert isinstance(study, StudyInfo) and study.tr is None and study.fmri_shape is None
    assert decode_sex(study, 1) == "male"


@pytest.mark.parametrize("study", ["HBN", "ABIDE"])
def test_asking_for_an_unset_tr_errors_clearly(study):
    assert get_study(study).tr is None  # other uses of the study still work
    with pytest.raises(ConfigError, match=f"studies.{study}.tr is not set") as err:
        get_study(study, require=["tr"])
    assert "seconds" in str(err.value)
    assert get_study(study, {"tr": 2.0}, require=["tr"]).tr == 2.0


def test_hbn_needs_fmri_shape_when_asked():
    with pytest.raises(ConfigError, match="studies.HBN.fmri_shape"):
        get_study("HBN", require=["tr", "fmri_shape"])


def test_overrides_from_a_loaded_config():
    cfg = load_config(None, ["studies.HBN.tr=0.8", "studies.ABCD.age_unit=years"])
    assert get_study("HBN", cfg.studies.get("HBN"), require=["tr"]).tr == 0.8
    assert age_in_years(get_study("ABCD", cfg.studies["ABCD"]), 10) == 10.0
