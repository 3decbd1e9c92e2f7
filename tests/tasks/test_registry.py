import pytest

from umbrella.task_registry import (
    AGE,
    BMI,
    COMPARE_AGE,
    COMPARE_SEX,
    TaskSpec,
    classification_task,
    get_task,
    regression_task,
    task_for_record,
)


@pytest.mark.parametrize("answer, years", [
    ("12.4 years", 12.4), ("12.4", 12.4), ("The subject is 45.2 years old.", 45.2),
    ("149 months", 149 / 12), ("6 mo", 0.5), ("1 year", 1.0), ("  80 yrs ", 80.0),
])
def test_age_parser_valid_and_units(answer, years):
    assert AGE.parse(answer) == pytest.approx(years)


def test_months_convert_to_years_like_the_issue_says():
    assert round(AGE.parse("149 months"), 1) == 12.4


@pytest.mark.parametrize("answer", [
    "", "   ", "unknown", "12 or 13 years", "12-13 years", "between 12 and 13",  # empty/ambiguous
    "150 years", "-3 years", "1500 months",  # out of range [0, 120] years
    "23 kg/m2",  # a unit of another quantity
])
def test_age_parser_rejects(answer):
    assert AGE.parse(answer) is None


@pytest.mark.parametrize("answer, value", [("23.4 kg/m2", 23.4), ("23.4", 23.4),
                                           ("BMI 31 kg/m^2", 31.0)])
def test_bmi_parser_valid(answer, value):
    assert BMI.parse(answer) == pytest.approx(value)


@pytest.mark.parametrize("answer", ["", "5 kg/m2", "95", "23 years", "22 or 23 kg/m2"])
def test_bmi_parser_rejects(answer):
    assert BMI.parse(answer) is None


@pytest.mark.parametrize("task, answer, parsed", [
    (COMPARE_AGE, "first", "first"), (COMPARE_AGE, "The second one.", "second"),
    (COMPARE_AGE, "2nd", "second"), (COMPARE_AGE, "first or second", None), (COMPARE_AGE, "", None),
    (COMPARE_SEX, "same", "same"), (COMPARE_SEX, "Different.", "different"),
    (COMPARE_SEX, "same or different", None), (COMPARE_SEX, "samedifferent", None),
])
def test_comparison_parsers(task, answer, parsed):
    assert task.parse(answer) == parsed


def test_multiword_options_do_not_double_count():
    dx = classification_task("diagnosis", ["control", "healthy control", "autism"])
    assert dx.parse("healthy control") == "healthy control"
    assert dx.parse("Control.") == "control"
    assert dx.parse("autism, not control") is None
    assert dx.parse("") is None


@pytest.mark.parametrize("value", [0.0, 12.35, 12.44, 79.95, 119.0])
def test_format_then_parse_round_trips(value):
    text = AGE.format_answer(value)
    assert text.endswith(" years")
    assert AGE.parse(text) == pytest.approx(float(f"{value:.1f}"))


def test_generic_regression_range_and_record_spec():
    score = regression_task("nihtbx_totalcomp", low=40, high=160, decimals=0)
    assert score.format_answer(101.2) == "101"
    assert score.parse("101") == 101 and score.parse("200") is None
    assert "nihtbx totalcomp" in score.questions[0]
    meta = {"task_spec": score.to_dict()}
    assert task_for_record("nihtbx_totalcomp", meta).parse("39") is None
    assert task_for_record("nihtbx_totalcomp", {}) is None  # not built in: a free-text task
    narrowed = regression_task("age", low=5, high=25)
    assert narrowed.parse("30 years") is None and AGE.parse("30 years") == 30
    assert task_for_record("age", {"task_spec": narrowed.to_dict()}).high == 25
    assert task_for_record("age", {}) is get_task("age")


def test_spec_checks_itself():
    with pytest.raises(ValueError, match="kind"):
        TaskSpec("x", "ranking", ("?",))
    with pytest.raises(ValueError, match="two or more"):
        TaskSpec("x", "classification", ("?",), options=("only",))
    with pytest.raises(ValueError, match="not one of"):
        COMPARE_SEX.format_answer("maybe")
