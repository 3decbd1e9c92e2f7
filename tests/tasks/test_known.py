import json

import pytest

from umbrella.data.records import ImageRef, Record, Turn
from umbrella.errors import ConfigError
from umbrella.tasks.known import (
    load_tasks,
    match_task,
    normalise_question,
    save_tasks,
    task_spec,
    trained_tasks,
)


def _rec(i, task, question, answer):
    return Record(id=f"r{i}", images=(ImageRef("T1", "x.nii.gz"),), subject_id=f"s{i}",
                  task=task, split="train",
                  turns=(Turn("user", f"<image>\n{question}"), Turn("assistant", answer)))


RECORDS = [_rec(0, "sex", "What is the sex of this subject?", "male"),
           _rec(1, "sex", "Is this brain from a male or a female subject?", "female"),
           _rec(2, "sex", "What is the sex of this subject?", "female"),
           _rec(3, "age", "How old is this subject? Answer in years.", "45.0 years")]


def test_trained_tasks_keeps_specs_and_distinct_question_forms(tmp_path):
    tasks = trained_tasks(RECORDS)["tasks"]
    assert sorted(tasks) == ["age", "sex"]
    assert tasks["sex"]["questions"] == ["What is the sex of this subject?",
                                         "Is this brain from a male or a female subject?"]
    assert tasks["sex"]["options"] == ["male", "female"] and tasks["age"]["unit"] == "years"
    assert task_spec(tasks["age"]).parse("149 months") == pytest.approx(149 / 12)
    save_tasks(RECORDS, tmp_path)
    assert load_tasks(tmp_path) == json.loads(json.dumps(tasks))
    assert load_tasks(tmp_path / "nothing") is None  # a model from before tasks.json
    (tmp_path / "tasks.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not a valid tasks file"):
        load_tasks(tmp_path)


def test_questions_match_their_task_and_off_task_ones_match_none():
    tasks = trained_tasks(RECORDS)["tasks"]
    assert normalise_question("<image>\nWhat is  the SEX of this subject?") == \
        "what is the sex of this subject"
    assert match_task("what is the sex of this subject", tasks).task == "sex"
    assert match_task("Is this brain from a male or female subject?", tasks).task == "sex"
    assert match_task("How old is this subject?", tasks).task == "age"
    miss = match_task("Is there a tumor in this scan?", tasks)
    assert miss.task is None and miss.score < 0.8
    assert match_task("Please, what is the sex of this subject?", tasks).task == "sex"
    close = match_task("What is the diagnosis of this subject?", tasks)
    assert close.task is None and close.score >= 0.75 and close.new_words == ("diagnosis",)
    assert match_task("What is the BMI of this subject?", tasks).task is None
    assert match_task("", tasks).task is None
