"""Evaluation of a tiny model trained for 60 steps on the demo sex records (see conftest.py)."""

import json
import re
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from umbrella.data.records import parse_record
from umbrella.errors import ConfigError, RecordError
from umbrella.evaluation.evaluate import evaluate_records
from umbrella.evaluation.report import metrics_table
from umbrella.task_registry import AGE
from umbrella.tasks.conversations import task_record

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _valid_png(path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50
    assert image[..., :3].std() > 0.01  # not blank
    return image.shape[:2]


def test_likelihood_agrees_with_generation(trained_run, tiny_split_records, tmp_path):
    result, _ = trained_run
    records = [r for split in ("train", "val", "test") for r in tiny_split_records[split]]
    kw = dict(split="all", batch_size=8, progress=False, bootstrap=0, plots=False)
    lik = evaluate_records(result.model_dir, records, tmp_path / "lik", scoring="likelihood", **kw)
    gen = evaluate_records(result.model_dir, records, tmp_path / "gen", scoring="generate", **kw)
    assert [r["id"] for r in lik.predictions] == [r.id for r in records]
    assert all(r["scoring"] == "likelihood" for r in lik.predictions)
    assert all(abs(sum(r["probs"].values()) - 1) < 1e-5 for r in lik.predictions)
    same = sum(a["prediction"] == b["prediction"]
               for a, b in zip(lik.predictions, gen.predictions, strict=True))
    assert same >= 0.8 * len(records), (same, len(records))
    assert gen.metrics["tasks"]["sex"]["n"] == 24 and "probs" not in gen.predictions[0]
    assert lik.metrics["tasks"]["sex"]["n_correct"] >= 18  # 18 of 24 were trained on


def test_report_plots_baselines_and_table(trained_run, tiny_split_records, tmp_path):
    result, _ = trained_run
    out = tmp_path / "eval"
    ev = evaluate_records(result.model_dir, tiny_split_records["test"], out, split="test",
                          progress=False, run_dir=result.run_dir,
                          baseline_records=tiny_split_records["train"], bootstrap=300, seed=3)
    sex = ev.metrics["tasks"]["sex"]
    assert sex["n"] == 6 and sex["baseline"]["source"] == "train"
    assert sex["baseline"]["accuracy"] == pytest.approx(0.5)  # 3 male / 3 female held out
    assert sex["ci"]["accuracy"][0] <= sex["accuracy"] <= sex["ci"]["accuracy"][1]
    assert set(ev.plots) == {"confusion_sex", "roc_sex", "loss_curves"}
    for name in ev.plots.values():
        _valid_png(out / name)
    report = (out / "report.md").read_text()
    assert "![sex confusion](confusion_sex.png)" in report and "![loss curves](loss_curves.png)" in report
    assert "from train" in report and "Training loss: first" in report
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["tasks"]["sex"]["n_correct"] == sex["n_correct"]
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 6
    table = metrics_table(ev.metrics)
    lo, hi = sex["ci"]["accuracy"]
    assert re.search(rf"accuracy\s+{sex['accuracy']:.3f}\s+\[{lo:.3f}, {hi:.3f}\]\s+0\.500", table)
    assert "majority baseline" in table and "from train" in table


def _age_records(cohort, n=8) -> list:
    rows = []
    for s in cohort.subjects[:n]:
        rows.append(task_record(AGE, subject_id=s.subject_id, answer=AGE.format_answer(s.age),
                                images=[{"modality": "T1", "path": str(cohort.root / s.t1_path)}],
                                study="DEMO", split="test", question=AGE.questions[0]))
    return [parse_record(r) for r in rows]


def test_regression_by_generation_with_digit_constraint(trained_run, tiny_cohort, tmp_path):
    result, _ = trained_run
    records = _age_records(tiny_cohort)
    ev = evaluate_records(result.model_dir, records, tmp_path / "age", split="test",
                          scoring="likelihood", progress=False, constrained=True,
                          max_new_tokens=8, bootstrap=100, regression="generate")
    assert all(r["scoring"] == "generate (digits)" for r in ev.predictions)
    for row in ev.predictions:  # only digits, '.', spaces and the letters of "years"
        assert set(row["answer"]) <= set("0123456789. years"), row["answer"]
        assert row["reference_value"] == pytest.approx(AGE.parse(row["reference"]))
    age = ev.metrics["tasks"]["age"]
    assert age["n"] == 8 and {"mae", "rmse", "pearson_r", "r2", "parse_failure_rate"} <= set(age)
    assert age["unit"] == "years" and age["baseline"]["predictor"].startswith("mean ")
    assert 0 <= age["parse_failure_rate"] <= 1
    assert "scatter_age" in ev.plots or age["parse_failures"] == 8
    free = evaluate_records(result.model_dir, records[:2], tmp_path / "age_free", split="test",
                            scoring="generate", progress=False, max_new_tokens=8, bootstrap=0,
                            regression="generate")
    assert all(r["scoring"] == "generate" for r in free.predictions)


def test_bad_inputs_are_reported_before_any_compute(trained_run, tiny_split_records, tmp_path):
    result, _ = trained_run
    rec = tiny_split_records["test"][0]
    bad = parse_record({"id": "x1", "subject_id": "s", "task": "sex",
                        "images": [{"modality": "T1", "path": str(rec.images[0].path)}],
                        "conversations": [{"from": "human", "value": "<image>\nSex?"},
                                          {"from": "gpt", "value": "male or female"}]})
    with pytest.raises(RecordError, match="x1.*exactly one of male, female"):
        evaluate_records(result.model_dir, [bad], tmp_path / "x", split="test", progress=False)
    with pytest.raises(ConfigError, match="scoring"):
        evaluate_records(result.model_dir, [rec], tmp_path / "x", split="test", scoring="vote")
    with pytest.raises(ConfigError, match="no records"):
        evaluate_records(result.model_dir, [], tmp_path / "x", split="test")


def test_assistant_ask_show_and_interactive(trained_run, tiny_split_records, tmp_path):
    from umbrella.inference import BrainAssistant, interactive

    result, _ = trained_run
    rec = tiny_split_records["test"][0]
    images = [("T1", rec.images[0].path)]
    assistant = BrainAssistant(result.run_dir)
    answer = assistant.ask("What is the sex of this subject?", images)
    assert answer in ("male", "female")
    png = assistant.show("What is the sex of this subject?", images, None, tmp_path / "a.png")
    h, w = _valid_png(png)
    assert w > h  # three slices and the text side by side
    asked = iter(["What is the sex of this subject?", "<image>\n<image>\ntoo many images?",
                  "Is this brain from a male or a female subject?", ""])
    printed = []
    transcript = interactive(assistant, images, input_fn=lambda _: next(asked),
                             print_fn=printed.append, show_dir=tmp_path / "figs")
    assert [q for q, _ in transcript] == ["What is the sex of this subject?",
                                          "Is this brain from a male or a female subject?"]
    assert transcript[0][1] == answer  # same model, same preprocessed scan, greedy
    assert any(p.startswith("error:") and "2 <image>" in p for p in printed)
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["answer_01.png",
                                                                      "answer_02.png"]
    assert len(assistant._loaded) == 1  # the scan was preprocessed once
    assert np.isfinite(assistant._loaded[next(iter(assistant._loaded))].numpy()).all()


def test_comparison_pairs_are_scored_per_pair(trained_run, tiny_cohort, tmp_path):
    from umbrella.task_registry import COMPARE_SEX

    result, _ = trained_run
    subs = tiny_cohort.subjects[:6]
    rows = []
    for a, b in zip(subs, subs[1:] + subs[:1], strict=True):
        rows.append(task_record(
            COMPARE_SEX, subject_id=a.subject_id, answer="same" if a.sex == b.sex else "different",
            images=[{"modality": "T1", "path": str(tiny_cohort.root / s.t1_path)} for s in (a, b)],
            study="DEMO", split="test", question=COMPARE_SEX.questions[0],
            record_id=f"{a.subject_id}_{b.subject_id}", metadata={"subjects": [a.subject_id,
                                                                               b.subject_id]}))
    records = [parse_record(r) for r in rows]
    ev = evaluate_records(result.model_dir, records, tmp_path / "pairs", split="test",
                          progress=False, bootstrap=50)
    m = ev.metrics["tasks"]["compare_sex"]
    assert (m["n"], m["n_records"]) == (6, 6)  # six distinct pairs, each its own unit
    assert all(len(r["subjects"]) == 2 and set(r["probs"]) == {"same", "different"}
               for r in ev.predictions)
    truth = [r.answer for r in records]
    assert m["class_counts"] == {"same": truth.count("same"), "different": truth.count("different")}


def test_memoize_decodes_each_image_once_for_the_records_that_share_it(
        trained_run, tiny_split_records, tmp_path, monkeypatch):
    """dataset.memoize in evaluation: a scan asked about twice (two records) is decoded once,
    and the answers are those of float16-rounded inputs, as in the run's validation."""
    import dataclasses

    from umbrella.data.inputs import ModalityInput

    result, _ = trained_run
    test = tiny_split_records["test"]
    twice = test + [dataclasses.replace(r, id=f"{r.id}_again") for r in test]
    calls = []
    real = ModalityInput.preprocess
    monkeypatch.setattr(ModalityInput, "preprocess",
                        lambda self, image, rid=None: calls.append(rid) or real(self, image, rid))
    kw = dict(split="test", batch_size=4, progress=False, bootstrap=0, plots=False,
              with_reference=False)
    plain = evaluate_records(result.model_dir, twice, tmp_path / "plain", **kw)
    assert len(calls) == len(twice)
    calls.clear()
    memo = evaluate_records(result.model_dir, twice, tmp_path / "memo", memoize=True, **kw)
    assert len(calls) == len(test)  # the second record of each scan reads the memo
    assert [r["id"] for r in memo.predictions] == [r["id"] for r in plain.predictions]
    for a, b in zip(memo.predictions, plain.predictions, strict=True):
        assert a["probs"]["female"] == pytest.approx(b["probs"]["female"], abs=0.02)


def test_default_reference_cache_is_shared_by_the_runs_of_one_output_folder(trained_run,
                                                                           tmp_path):
    from umbrella.evaluation.reference import reference_cache_dir

    result, cfg = trained_run
    run_dir = result.run_dir  # <output_dir>/<name>/seed_<n>, written by `umbrella train`
    assert reference_cache_dir(run_dir, tmp_path) == \
        run_dir.parent.parent / "reference_features"
    assert run_dir.parent.parent.resolve() == Path(cfg.training.output_dir).resolve()
    loose = tmp_path / "copied_run"  # a folder not laid out by `umbrella train`
    loose.mkdir()
    assert reference_cache_dir(loose, tmp_path / "out") == loose / "reference_features"
    assert reference_cache_dir(None, tmp_path / "out") == tmp_path / "out" / "reference_features"
