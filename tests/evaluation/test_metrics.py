import numpy as np
import pytest

from umbrella.evaluation.metrics import classification_metrics


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
