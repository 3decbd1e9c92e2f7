"""The study registry: per-cohort imaging geometry and phenotype conventions.

Each :class:`StudyInfo` says where a cohort's phenotype table keeps the subject id, sex and age,
how sex is coded, which unit age is in, and the native rsfMRI grid and TR. Config overrides
(``studies.<NAME>.<field>`` in the YAML, e.g. ``studies: {UKB: {age_column: "21003-3.0"}}``)
replace registry values; :func:`get_study` applies them and checks them all at once.

A value that varies by site or release, or that the open table does not hold, is ``None`` here;
code that needs it asks for it through ``get_study(..., require=[...])``, which raises a
:class:`~umbrella.errors.ConfigError` naming the ``studies.<NAME>.<field>`` key to set, instead of
guessing. Each entry's ``notes`` record the source of every convention.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from umbrella.errors import ConfigError

SEX_LABELS = ("male", "female")
AGE_UNITS = ("years", "months")
_MONTHS_PER_YEAR = 12.0
_BAND = re.compile(r"^\s*\d+(\.\d+)?\s*(-|\+|to)\s*(\d+(\.\d+)?)?\s*$")


@dataclass(frozen=True)
class StudyInfo:
    """One cohort's conventions. ``None`` means "not fixed for this study: the user must say"."""

    name: str
    fmri_shape: tuple[int, int, int] | None  # native rsfMRI grid (X, Y, Z); None: varies
    tr: float | None  # rsfMRI repetition time, seconds; None: varies by site/release
    subject_column: str
    sex_column: str | None
    sex_coding: dict[str, str]  # raw value (as string) -> "male" / "female"
    age_column: str | None
    age_unit: str  # "years" | "months"
    notes: str = ""
    sex_other: tuple[str, ...] = ()  # raw values that are valid but carry no male/female label
    session_column: str | None = None  # long tables: the column naming each row's visit
    columns: dict[str, str] = dataclasses.field(default_factory=dict)  # task -> usual column


# ----------------------------------------------------------------------------- the registry

_ABCD = StudyInfo(
    name="ABCD", fmri_shape=(96, 96, 95), tr=0.8,
    subject_column="src_subject_id", sex_column="sex",
    sex_coding={"M": "male", "F": "female", "1": "male", "2": "female"},
    age_column="interview_age", age_unit="months",
    sex_other=("O", "NR", "3", "4", "777", "999"), session_column="eventname",
    columns={"cognition": "nihtbx_totalcomp_uncorrected",
             "fluid_cognition": "nihtbx_fluidcomp_uncorrected"},
    notes="Verified: NDA data structures for ABCD (e.g. abcd_lt01) define src_subject_id, "
          "interview_age = 'Age in months at the time of the interview/test/sampling/imaging' "
          "and sex = 'Sex of subject at birth', M = Male, F = Female, O = Other, NR = Not "
          "reported (nda.nih.gov/data-structure/abcd_lt01). TR 0.8 s is the ABCD rs-fMRI "
          "protocol (Casey et al. 2018), not re-verified here. ABCD 6.0 releases use BIDS-style "
          "tables: override the columns for those. fmri_shape from the UMBRELLA documentation. "
          "Release 5.x (abcd_p_demo) codes sex at birth as demo_sex_v2: 1 = Male, 2 = Female, "
          "3 = Intersex-Male, 4 = Intersex-Female, 999 = Don't know, 777 = Refuse to answer "
          "(ABCD 5.0 data dictionary; 3/4/777/999 carry no male/female label here): pass "
          "--sex-column demo_sex_v2. Rows are visits named by eventname "
          "(baseline_year_1_arm_1, 2_year_follow_up_y_arm_1, ...; BIDS sessions "
          "ses-baselineYear1Arm1, ses-2YearFollowUpYArm1). Tables key subjects by "
          "src_subject_id and subjectkey (both the NDA GUID, NDAR_INV...). cognition: NIH "
          "Toolbox total composite, uncorrected (nihtbx_totalcomp_uncorrected, table "
          "abcd_tbss01 / nc_y_nihtb in 5.x).")
_UKB = StudyInfo(
    name="UKB", fmri_shape=(88, 88, 64), tr=0.735,
    subject_column="eid", sex_column="31-0.0", sex_coding={"0": "female", "1": "male"},
    age_column="21003-2.0", age_unit="years",
    columns={"bmi": "21001-2.0", "fluid_intelligence": "20016-2.0"},
    notes="Verified: field 31 Sex, 0 = Female, 1 = Male (UKB data coding 9); participant id "
          "eid; rs-fMRI TR 735 ms on an 88x88x64 matrix, 2.4 mm, 490 volumes (UK Biobank brain "
          "imaging protocol). Age: field 21003 'Age when attended assessment centre' (years); "
          "instance 2 (21003-2.0) is the first imaging visit, use 21003-3.0 for the repeat "
          "imaging visit. Column headers follow ukbconv CSV ('31-0.0'); RAP exports name them "
          "'p31' / 'p21003_i2', R/tab exports 'f.31.0.0' / 'f.21003.2.0': override if yours "
          "differ. A scan of instance 3 (ses-3, bulk name <eid>_20252_3_0) takes its values "
          "from the -3.0 columns. bmi: field 21001 'Body mass index (BMI)' (kg/m2); "
          "fluid_intelligence: field 20016 'Fluid intelligence score' (UKB showcase).")
_HCP = StudyInfo(
    name="HCP", fmri_shape=(91, 109, 91), tr=0.72,
    subject_column="Subject", sex_column="Gender", sex_coding={"M": "male", "F": "female"},
    age_column=None, age_unit="years", columns={"fluid_intelligence": "PMAT24_A_CR"},
    notes="HCP Young Adult. Subject ids are 6-digit numbers (100307). fluid_intelligence: "
          "PMAT24_A_CR, Penn Progressive Matrices correct responses (open access). Verified: the open-access table holds Gender and only an age band "
          "within 5 years (column Age, e.g. '22-25', '26-30', '31-35', '36+'); age by year "
          "(Age_in_Yrs) is Tier 1 restricted (humanconnectome.org 'Quick Reference: Open Access "
          "vs Restricted Data'); rs-fMRI TR 0.72 s, 2 mm (HCP 1200 release). age_column is unset "
          "so age tasks ask for it: with restricted access set studies.HCP.age_column: "
          "Age_in_Yrs. fmri_shape 91x109x91 is the 2 mm MNI grid of the volume-space data.")
_HBN = StudyInfo(
    name="HBN", fmri_shape=None, tr=None,
    subject_column="EID", sex_column="Sex", sex_coding={"0": "male", "1": "female"},
    age_column="Age", age_unit="years",
    notes="Verified: HBN MRI/EEG Basic_Info files give Sex (1 = Female, 0 = Male), Age (years) "
          "and EHQ_Total (fcon_1000.projects.nitrc.org/indi/cmi_healthy_brain_network/"
          "MRI_EEG.html). Full phenotype exports from LORIS name the columns 'Identifiers', "
          "'Basic_Demos,Sex', 'Basic_Demos,Age': override for those. The rs-fMRI grid and TR "
          "differ between HBN scan sites, so both are unset (studies.HBN.tr).")
_ABIDE = StudyInfo(
    name="ABIDE", fmri_shape=(97, 115, 97), tr=None,
    subject_column="SUB_ID", sex_column="SEX", sex_coding={"1": "male", "2": "female"},
    age_column="AGE_AT_SCAN", age_unit="years", columns={"diagnosis": "DX_GROUP", "iq": "FIQ"},
    notes="Verified: ABIDE I phenotypic data legend V1.02: SUB_ID; DX_GROUP 1 = Autism, "
          "2 = Control; AGE_AT_SCAN in years; SEX 1 = Male, 2 = Female; FIQ full-scale IQ. The TR differs between "
          "the contributing sites, so it is unset (studies.ABIDE.tr). fmri_shape from the "
          "UMBRELLA documentation (preprocessed data on a 97x115x97 grid).")
_DEMO = StudyInfo(
    name="DEMO", fmri_shape=None, tr=None,
    subject_column="subject_id", sex_column="sex",
    sex_coding={"male": "male", "female": "female"}, age_column="age", age_unit="years",
    notes="The embedded demo cohort (umbrella.demo.cohort): phenotype.csv with subject_id, "
          "sex ('male' / 'female'), age (years); T1 only.")

REGISTRY: MappingProxyType = MappingProxyType(
    {s.name: s for s in (_ABCD, _UKB, _HCP, _HBN, _ABIDE, _DEMO)})

_FIELDS = tuple(f.name for f in dataclasses.fields(StudyInfo) if f.name != "name")
# An unregistered study must state these; fmri_shape / tr / notes / sex_other may stay unset.
_NEEDED_FOR_NEW = ("subject_column", "sex_column", "sex_coding", "age_column", "age_unit")
_WHY = {
    "tr": "the rsfMRI repetition time in seconds (it varies by site or release for this study)",
    "fmri_shape": "the native rsfMRI grid as [X, Y, Z] (it varies for this study)",
    "age_column": "the phenotype column holding age (not available in this study's open table)",
    "sex_column": "the phenotype column holding sex",
}


# ----------------------------------------------------------------------------- field checks

def _check_field(field: str, value: Any) -> tuple[Any, str | None]:
    """(normalised value, problem or None) for one StudyInfo field."""
    if field == "fmri_shape":
        if value is None:
            return None, None
        ok = (isinstance(value, list | tuple) and len(value) == 3
              and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value))
        problem = f"must be 3 positive integers or null, got {value!r}"
        return (tuple(value), None) if ok else (None, problem)
    if field == "tr":
        if value is None:
            return None, None
        ok = isinstance(value, int | float) and not isinstance(value, bool) and \
            math.isfinite(value) and value > 0
        problem = f"must be a positive number of seconds or null, got {value!r}"
        return (float(value), None) if ok else (None, problem)
    if field == "columns":
        ok = isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) and v
                                             for k, v in value.items())
        return (dict(value), None) if ok else (None, f"must map task -> column, got {value!r}")
    if field in ("subject_column", "sex_column", "age_column", "session_column"):
        if value is None and field != "subject_column":
            return None, None
        ok = isinstance(value, str) and value.strip() != ""
        return (value, None) if ok else (None, f"must be a column name, got {value!r}")
    if field == "sex_coding":
        return _check_coding(value)
    if field == "age_unit":
        return (value, None) if value in AGE_UNITS else \
            (None, f"must be one of {', '.join(AGE_UNITS)}, got {value!r}")
    if field == "sex_other":
        if not isinstance(value, list | tuple):
            return None, f"must be a list of raw values, got {value!r}"
        return tuple(_raw_key(v) for v in value), None
    return (value, None) if isinstance(value, str) else (None, f"must be text, got {value!r}")


def _check_coding(value: Any) -> tuple[Any, str | None]:
    if not isinstance(value, dict):
        return None, f"must map raw values to 'male' / 'female', got {value!r}"
    bad = {k: v for k, v in value.items() if v not in SEX_LABELS}
    if bad:
        return None, f"values must be 'male' or 'female', got {bad!r}"
    return {_raw_key(k): v for k, v in value.items()}, None


def _raw_key(raw: Any) -> str:
    """Canonical string of a raw phenotype value: 1, 1.0, '1', ' 1 ' -> '1'; 'M' -> 'M'."""
    if isinstance(raw, bool):
        return str(int(raw))
    if isinstance(raw, float) and raw.is_integer():
        return str(int(raw))
    if hasattr(raw, "item") and not isinstance(raw, str):  # numpy scalar
        return _raw_key(raw.item())
    text = str(raw).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() else text


# ----------------------------------------------------------------------------- lookup

def _canonical_name(name: str) -> str:
    for known in REGISTRY:
        if known.lower() == str(name).lower():
            return known
    return str(name)


def get_study(name: str, overrides: dict | None = None, *, require=()) -> StudyInfo:
    """Registry entry with config overrides applied (``cfg.studies[name]``).

    ``overrides`` maps StudyInfo field names to values; every problem (unknown key, bad value)
    is reported in one :class:`ConfigError`. An unknown study works only when ``overrides`` give
    every needed field (subject_column, sex_column, sex_coding, age_column, age_unit), else
    ConfigError listing the missing ``studies.<NAME>.<field>`` keys. ``require`` names fields
    the caller needs set (e.g. ``["tr"]``): a ``None`` among them is a ConfigError naming the key.
    """
    canonical = _canonical_name(name)
    base = REGISTRY.get(canonical)
    values, problems = _apply_overrides(canonical, overrides or {})
    if base is None:
        missing = [f for f in _NEEDED_FOR_NEW if f not in values]
        if missing:
            problems += _unknown_study_problems(canonical, missing)
    if problems:
        raise ConfigError(problems, source=f"studies.{canonical}")
    if base is None:
        defaults = {"fmri_shape": None, "tr": None, "notes": "user-defined study"}
        study = StudyInfo(name=canonical, **{**defaults, **values})
    else:
        study = dataclasses.replace(base, **values)
    _require(study, require)
    return study


def _unknown_study_problems(name: str, missing: list[str]) -> list[str]:
    near = difflib.get_close_matches(name.upper(), list(REGISTRY), n=1, cutoff=0.6)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    head = (f"unknown study {name!r}{hint}; registered: {', '.join(REGISTRY)}. An unregistered "
            "study must give every needed field in the config:")
    return [head] + [f"missing studies.{name}.{f}" for f in missing]


def _apply_overrides(name: str, overrides: dict) -> tuple[dict, list[str]]:
    """Checked field values from an override mapping, plus every problem found."""
    if not isinstance(overrides, dict):
        return {}, [f"studies.{name} must be a mapping of fields, got {overrides!r}"]
    values, problems = {}, []
    for key, value in overrides.items():
        if key not in _FIELDS:
            near = difflib.get_close_matches(str(key), _FIELDS, n=1, cutoff=0.5)
            hint = f"did you mean '{near[0]}'?" if near else f"valid fields: {', '.join(_FIELDS)}"
            problems.append(f"unknown key 'studies.{name}.{key}'; {hint}")
            continue
        checked, problem = _check_field(key, value)
        if problem:
            problems.append(f"bad value for 'studies.{name}.{key}': {problem}")
        else:
            values[key] = checked
    return values, problems


def _require(study: StudyInfo, fields) -> None:
    """ConfigError naming ``studies.<NAME>.<field>`` for every required field that is None."""
    unknown = [f for f in fields if f not in _FIELDS]
    if unknown:
        raise ValueError(f"get_study(require=...) got unknown fields {unknown}; valid: {_FIELDS}")
    unset = [f for f in fields if getattr(study, f) is None]
    if unset:
        raise ConfigError([f"studies.{study.name}.{f} is not set: give {_WHY.get(f, 'its value')}"
                           f" in the config, e.g. `studies: {{{study.name}: {{{f}: ...}}}}`"
                           for f in unset], source=f"studies.{study.name}")


# ----------------------------------------------------------------------------- geometry

def crop_pad_plan(native: tuple[int, int, int],
                  target: tuple[int, int, int]) -> list[tuple[int, int]]:
    """Per axis (before, after): positive = pad, negative = crop, centred.

    An odd difference puts the extra voxel at the end, matching
    :func:`umbrella.data.volumes.fit_to_shape`; ``native + before + after == target`` per axis.
    E.g. (91, 109, 91) -> (96, 96, 96): [(2, 3), (-6, -7), (2, 3)].
    """
    for label, shape in (("native", native), ("target", target)):
        if not (isinstance(shape, list | tuple) and len(shape) == 3
                and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)):
            raise ValueError(f"crop_pad_plan {label} shape must be 3 positive integers, "
                             f"got {shape!r}")
    plan = []
    for n, t in zip(native, target, strict=True):
        diff = t - n
        sign = 1 if diff >= 0 else -1
        first = abs(diff) // 2
        plan.append((sign * first, sign * (abs(diff) - first)))
    return plan


# ----------------------------------------------------------------------------- phenotypes

def _is_missing(raw: Any) -> bool:
    if raw is None:
        return True
    if isinstance(raw, float) and math.isnan(raw):
        return True
    if hasattr(raw, "item") and not isinstance(raw, str):
        try:
            return _is_missing(raw.item())
        except (ValueError, TypeError):
            return False
    if type(raw).__name__ in ("NAType", "NaTType"):  # pandas.NA / NaT
        return True
    return isinstance(raw, str) and raw.strip() in ("", "nan", "NaN", "NA", "N/A")


def decode_sex(study: StudyInfo, raw: Any) -> str | None:
    """Raw phenotype value -> "male" / "female"; None for a missing value or one of
    ``study.sex_other`` (e.g. ABCD "NR"). Codes compare as strings (1, 1.0, "1" are the same)
    and case-insensitively. An unknown code is a ValueError naming the study, the value, the known
    codes and the config key to fix; a study with an empty ``sex_coding`` is a ConfigError.
    Which column holds the value is the caller's business (``study.sex_column`` by default).
    """
    if not study.sex_coding:
        raise ConfigError(f"studies.{study.name}.sex_coding is empty: map the raw sex values to "
                          "'male' / 'female', e.g. {M: male, F: female}",
                          source=f"studies.{study.name}")
    if _is_missing(raw):
        return None
    key = _raw_key(raw)
    folded = {k.casefold(): v for k, v in study.sex_coding.items()}
    if key.casefold() in folded:
        return folded[key.casefold()]
    if key.casefold() in {o.casefold() for o in study.sex_other}:
        return None
    known = sorted(study.sex_coding) + sorted(study.sex_other)
    raise ValueError(f"study {study.name}: sex value {raw!r} in column {study.sex_column!r} is "
                     f"not one of the known codes {known} (fix: correct the value, or set "
                     f"studies.{study.name}.sex_coding / sex_other in the config)")


def age_in_years(study: StudyInfo, raw: Any) -> float | None:
    """Raw age value -> years (float); None for a missing value. Months are divided by 12
    (ABCD 120 -> 10.0). A non-numeric, negative or age-band value ("22-25") is a ValueError.
    Which column holds the value is the caller's business: a study whose ``age_column`` is None
    (HCP's open table) needs the column from the config (``get_study(..., require=["age_column"])``
    says so) but converts values like any other.
    """
    if _is_missing(raw):
        return None
    where = f" in column {study.age_column!r}" if study.age_column else ""
    try:
        value = float(raw.item() if hasattr(raw, "item") and not isinstance(raw, str) else raw)
    except (TypeError, ValueError):
        band = isinstance(raw, str) and _BAND.match(raw) is not None
        what = "an age band, not an age" if band else "not a number"
        raise ValueError(f"study {study.name}: age value {raw!r}{where} "
                         f"is {what} (fix: point studies.{study.name}.age_column at a numeric "
                         f"age column)") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"study {study.name}: age value {raw!r}{where} "
                         f"is not a valid age")
    return value / _MONTHS_PER_YEAR if study.age_unit == "months" else value
