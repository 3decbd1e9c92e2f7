import numpy as np
import pytest

from umbrella.task_registry import SEX
from umbrella.tasks.conversations import classification_record, subject_splits


@pytest.mark.parametrize("answer, parsed", [
    ("male", "male"), ("Female.", "female"), ("The subject is a woman", "female"),
    ("male or female", None), ("", None), ("unknown", None), ("femalemale", None),
])
def test_sex_parser_is_strict(answer, parsed):
    assert SEX.parse(answer) == parsed


def test_record_shape_and_bad_answer():
    rng = np.random.default_rng(0)
    rec = classification_record(SEX, subject_id="s1", answer="male", study="DEMO", split="train",
                                images=[{"modality": "T1", "path": "a.nii.gz"}], rng=rng)
    assert rec["conversations"][0]["value"].startswith("<image>\n")
    assert rec["conversations"][0]["value"][len("<image>\n"):] in SEX.questions
    with pytest.raises(ValueError, match="s2"):
        classification_record(SEX, subject_id="s2", answer="yes", study="", split="", images=[],
                               rng=rng)


def test_subject_splits_stratified_reproducible_and_order_free():
    ids = [f"s{i:03d}" for i in range(100)]
    sex = ["male" if i % 2 else "female" for i in range(100)]
    a = subject_splits(ids, sex, (0.6, 0.2, 0.2), seed=3)
    b = subject_splits(ids[::-1], sex[::-1], (0.6, 0.2, 0.2), seed=3)
    assert a == b
    for split, n in (("train", 30), ("val", 10), ("test", 10)):
        for s in ("male", "female"):
            assert sum(1 for i, x in zip(ids, sex, strict=True) if a[i] == split and x == s) == n
    assert subject_splits(ids, sex, seed=4) != a
