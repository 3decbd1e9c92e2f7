import numpy as np
import pytest

from umbrella.evaluation.metrics import classification_metrics


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_hand_computed_binary():
    y = ["male", "male", "male", "female"]
    pred = ["male", "female", None, "female"]
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.7, 0.3], [0.2, 0.8]])
    m = classification_metrics(y, pred, ["male", "female"], probs)
    assert (m["n"], m["n_correct"]) == (4, 2)
    assert m["accuracy"] == 0.5
    assert m["balanced_accuracy"] == pytest.approx((1 / 3 + 1) / 2)
    # F1 male: P=1/1, R=1/3 -> 0.5; F1 female: P=1/2, R=1 -> 2/3
    assert m["macro_f1"] == pytest.approx((0.5 + 2 / 3) / 2)
    # AUC of P(female): female 0.8 vs male scores 0.1, 0.6, 0.3 -> all ranked below
    assert m["roc_auc"] == pytest.approx(1.0)
    assert m["parse_failures"] == 1 and m["majority_baseline_accuracy"] == 0.75


def test_auc_undefined_with_one_class_and_without_probs():
    m = classification_metrics(["male", "male"], ["male", "female"], ["male", "female"],
                               np.array([[0.6, 0.4], [0.4, 0.6]]))
    assert m["roc_auc"] is None
    assert classification_metrics(["male", "female"], ["male", "male"],
                                  ["male", "female"])["roc_auc"] is None


# ----------------------------------------------------------------------------- added with issue 5
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score  # noqa: E402

from umbrella.evaluation.metrics import (  # noqa: E402
    bootstrap_ci,
    class_scores,
    regression_ci,
    regression_metrics,
)
from umbrella.evaluation.summary import summarise  # noqa: E402
from umbrella.task_registry import AGE, SEX  # noqa: E402


def test_regression_hand_computed():
    y, f = [1, 2, 3, 4], [2, 2, 4, 3]  # errors 1, 0, 1, -1
    m = regression_metrics(y, f)
    assert m["mae"] == pytest.approx(0.75)
    assert m["rmse"] == pytest.approx(np.sqrt(3 / 4))
    # dy = (-1.5, -.5, .5, 1.5), df = (-.75, -.75, 1.25, .25): cov 2.5, Sdy² 5, Sdf² 2.75
    assert m["pearson_r"] == pytest.approx(2.5 / np.sqrt(5 * 2.75))
    assert m["r2"] == pytest.approx(1 - 3 / 5)
    flat = regression_metrics([1, 1, 1], [1, 2, 3])
    assert flat["r2"] is None and flat["pearson_r"] is None and flat["mae"] == 1.0


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_numpy_scores_match_sklearn_with_unparsed_and_three_classes():
    rng = np.random.default_rng(0)
    t = rng.integers(0, 3, 200)
    p = np.where(rng.random(200) < 0.1, -1, np.where(rng.random(200) < 0.6, t, rng.integers(0, 3, 200)))
    probs = rng.dirichlet(np.ones(3), 200)
    probs[np.arange(200), t] += 0.3
    probs /= probs.sum(1, keepdims=True)
    m = class_scores(t, p, 3, probs)
    assert m["accuracy"] == pytest.approx(np.mean(t == p))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(t, p))
    assert m["macro_f1"] == pytest.approx(f1_score(t, p, labels=[0, 1, 2], average="macro",
                                                   zero_division=0))
    assert m["roc_auc"] == pytest.approx(roc_auc_score(t, probs, multi_class="ovr"))
    b = t[:50] % 2
    pb = np.c_[1 - probs[:50, 0], probs[:50, 0]]
    assert class_scores(b, b, 2, pb)["roc_auc"] == pytest.approx(roc_auc_score(b, pb[:, 1]))


def test_bootstrap_contains_estimate_and_is_seeded():
    y = np.arange(30, dtype=float)
    f = y + np.random.default_rng(1).normal(0, 3, 30)
    point = regression_metrics(y, f)
    a = regression_ci(y, f, resamples=1000, seed=5)
    assert a == regression_ci(y, f, resamples=1000, seed=5)
    assert a != regression_ci(y, f, resamples=1000, seed=6)
    for key in ("mae", "rmse", "pearson_r", "r2"):
        lo, hi = a[key]
        assert lo < point[key] < hi, key
    mean_ci = bootstrap_ci(lambda i: {"mean": float(y[i].mean())}, 30, resamples=2000, seed=0)
    assert mean_ci["mean"][0] == pytest.approx(14.5 - 1.96 * y.std() / np.sqrt(30), abs=0.6)


def _row(sid, task, pred, ref, probs=None, study="S1"):
    row = {"id": f"{sid}_{task}_{len(str(probs))}_{pred}", "subject_id": sid, "study": study,
           "task": task, "modalities": ["T1"]}
    if task == "sex":
        row.update(reference_label=ref, prediction=pred, correct=pred == ref)
        if probs is not None:
            row["probs"] = {"male": probs, "female": 1 - probs}
    else:
        row.update(reference_value=ref, prediction=pred)
    return row


def test_subject_aggregation_baselines_and_unparsed_regression():
    rows = [_row("a", "sex", "male", "male", 0.9), _row("a", "sex", "female", "male", 0.4),
            _row("b", "sex", "female", "female", 0.3), _row("c", "sex", "male", "female", 0.6),
            _row("a", "age", 20.0, 22.0), _row("a", "age", 30.0, 22.0),
            _row("b", "age", None, 40.0), _row("c", "age", 60.0, 58.0, study="S2")]
    out = summarise(rows, {"sex": SEX, "age": AGE}, resamples=200, seed=0)
    sex = out["tasks"]["sex"]
    # a: mean P(male) 0.65 -> male (right); b: 0.3 -> female (right); c: 0.6 -> male (wrong)
    assert (sex["n"], sex["n_records"], sex["n_correct"]) == (3, 4, 2)
    assert sex["baseline"]["source"] == "evaluated split"
    assert sex["baseline"]["predictor"] == "majority class 'female'"
    assert sex["baseline"]["accuracy"] == pytest.approx(2 / 3)
    age = out["tasks"]["age"]
    # units: a (22 vs mean 25), b (40, unparsed -> baseline mean of y = 40), c (58 vs 60)
    assert age["parse_failures"] == 1 and age["parse_failure_rate"] == pytest.approx(1 / 3)
    assert age["mae"] == pytest.approx((3 + 0 + 2) / 3)
    assert age["baseline"]["mae"] == pytest.approx((18 + 0 + 18) / 3)
    trained = summarise(rows, {"sex": SEX, "age": AGE}, baselines={"sex": "male", "age": 30.0},
                        resamples=0)
    base = trained["tasks"]["sex"]["baseline"]
    assert (base["source"], base["accuracy"]) == ("train", pytest.approx(1 / 3))
    assert trained["tasks"]["age"]["baseline"]["mae"] == pytest.approx((8 + 10 + 28) / 3)
    assert trained["tasks"]["age"]["mae"] == pytest.approx((3 + 10 + 2) / 3)  # b scored as 30
    assert set(out["by_study"]["age"]) == {"S1", "S2"} and "sex" not in out["by_study"]  # one study
    assert out["by_study"]["age"]["S2"]["mae"] == pytest.approx(2.0)
    assert out["by_modality"] == {}
