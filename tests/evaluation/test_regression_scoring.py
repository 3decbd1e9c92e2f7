"""Regression-aware inference: candidate grids, the expected value / median of a known
distribution, cached-prompt scores against full-sequence scores, and `evaluate` with it."""

import json
import math

import numpy as np
import pytest
import torch

from umbrella.config import ModelConfig, load_config
from umbrella.data.prompts import PromptEncoder
from umbrella.data.records import Turn, parse_record
from umbrella.data.tokenizer import train_tokenizer
from umbrella.errors import ConfigError
from umbrella.evaluation import regression as reg
from umbrella.evaluation.evaluate import evaluate_records
from umbrella.evaluation.report import metrics_table
from umbrella.model.answering import score_options, score_options_cached
from umbrella.model.build import build_brain_llava
from umbrella.task_registry import AGE, regression_task, task_for_question
from umbrella.tasks.conversations import task_record

# ----------------------------------------------------------------------------- candidate grids


def test_grid_follows_the_answers_resolution_and_format():
    grid = reg.candidate_grid(AGE)
    assert len(grid.values) == 1201 and grid.step == 0.1 and not grid.coarsened
    assert grid.texts[:2] == ("0.0 years", "0.1 years") and grid.texts[-1] == "120.0 years"
    assert grid.texts[634] == "63.4 years"
    assert all(AGE.parse(t) == pytest.approx(v) for t, v in zip(grid.texts, grid.values,
                                                                strict=True))
    whole = reg.candidate_grid(regression_task("age", low=30, high=80), step=1)
    assert whole.values == tuple(float(v) for v in range(30, 81)) and whole.texts[0] == "30.0 years"
    score = regression_task("nihtbx", low=40, high=160, decimals=0)
    assert reg.candidate_grid(score).texts[:2] == ("40", "41")


def test_grid_steps_are_checked_and_large_grids_coarsened():
    wide = regression_task("x", low=0, high=1000, decimals=1)  # 10001 candidates at 0.1
    grid = reg.candidate_grid(wide)
    assert grid.coarsened and grid.step == 0.5 and len(grid.values) == 2001
    with pytest.raises(ConfigError, match=r"regression_step=0\.1 gives 10001 candidates"):
        reg.candidate_grid(wide, step=0.1)
    with pytest.raises(ConfigError, match=r"multiple of 0\.1"):
        reg.candidate_grid(AGE, step=0.05)
    with pytest.raises(ConfigError, match=r"multiple of 0\.1"):
        reg.candidate_grid(AGE, step=0.25)
    bare = regression_task("score")  # no range
    with pytest.raises(ConfigError, match="'score' has no value range"):
        reg.candidate_grid(bare)
    given = reg.candidate_grid(bare, value_range=(3, 7))
    assert (given.values[0], given.values[-1], len(given.values)) == (3.0, 7.0, 41)
    assert given.texts[:2] == ("3.0", "3.1")


# ----------------------------------------------------------------------------- a known distribution


def test_expected_median_mode_sd_of_a_known_distribution():
    values, p = [1.0, 2.0, 3.0, 4.0], np.array([0.1, 0.2, 0.3, 0.4])
    d = reg.distribution_answer(values, np.log(p) - 7.0, "expected")  # a shift changes nothing
    assert d["value"] == d["mean"] == pytest.approx(3.0, abs=1e-12)
    assert d["median"] == 3.0 and d["mode"] == 4.0 and d["sd"] == pytest.approx(1.0, abs=1e-12)
    assert [v for v, _ in d["probs"]] == values and [q for _, q in d["probs"]] == \
        pytest.approx(p.tolist())
    assert reg.distribution_answer(values, np.log(p), "median")["value"] == 3.0
    # the median is the smallest value whose cumulative probability reaches one half
    assert reg.distribution_answer([10, 20, 30], np.log([0.25, 0.25, 0.5]), "median")["value"] == 20
    skewed = reg.distribution_answer([0, 1, 100], np.log([0.5, 0.3, 0.2]), "median")
    assert skewed["median"] == 0 and skewed["mean"] == pytest.approx(20.3)
    tiny = reg.distribution_answer([1, 2, 3], np.log([0.9995, 0.0004, 0.0001]), "expected")
    assert [v for v, _ in tiny["probs"]] == [1.0]  # only p >= 1e-3 is listed
    many = reg.distribution_answer(list(range(400)), -np.abs(np.arange(400) - 200.0) / 100, "median")
    assert len(many["probs"]) == reg.MAX_LISTED and many["median"] == 200  # the 100 most probable
    assert [v for v, _ in many["probs"]] == list(range(150, 250))
    with pytest.raises(ConfigError, match="'generate'"):
        reg.distribution_answer(values, np.log(p), "generate")


def test_answers_from_a_monkeypatched_scorer(monkeypatch):
    task = regression_task("age", low=40, high=44)
    grid = reg.candidate_grid(task, step=1)  # 40..44
    assert grid.texts == ("40.0 years", "41.0 years", "42.0 years", "43.0 years", "44.0 years")
    dists = [[0.0, 0.0, 0.5, 0.0, 0.5], [0.6, 0.0, 0.0, 0.0, 0.4]]
    seen = {}

    def scorer(model, encoder, samples, options, batch_size):
        seen["options"], seen["batch"] = options, batch_size
        return [torch.log(torch.tensor(d, dtype=torch.float64) + 1e-300) for d in dists]

    monkeypatch.setattr(reg, "score_options_cached", scorer)
    out = reg.regression_answers(None, None, [{}, {}], task, grid, "expected")
    assert seen["options"] == [list(grid.texts)] * 2 and seen["batch"] == 64
    assert [text for text, _ in out] == ["43.0 years", "41.6 years"]
    assert out[1][1]["mean"] == pytest.approx(41.6) and out[1][1]["n_candidates"] == 5
    med = reg.regression_answers(None, None, [{}, {}], task, grid, "median")
    assert [text for text, _ in med] == ["42.0 years", "40.0 years"]
    assert reg.method_label("expected", grid) == "expected (5 candidates, step 1)"


# ----------------------------------------------------------------------------- cached scoring

GEOM = {"T1": {"image_size": [32, 32, 32], "patch_size": [8, 8, 8]}}


def test_cached_prompt_scores_equal_full_sequence_scores():
    torch.manual_seed(0)
    tok = train_tokenizer(["How old is this subject? Answer in years. 12.5 years 63 years "
                           "0123456789 first second"] * 4, 300)
    model = build_brain_llava(ModelConfig(), GEOM, tok, seed=0).eval()
    enc = PromptEncoder(tok)
    one = (Turn("user", "<image>\n" + AGE.questions[0]), Turn("assistant", ""))
    two = (Turn("user", "<image>\n<image>\nHow many years apart are they?"),
           Turn("assistant", ""))
    samples = [{"images": [("T1", torch.randn(1, 32, 32, 32))], "turns": one,
                "image_tokens": [64]},
               {"images": [("T1", torch.randn(1, 32, 32, 32)) for _ in range(2)], "turns": two,
                "image_tokens": [64, 64]}]
    texts = list(reg.candidate_grid(regression_task("age", low=0, high=120), step=10).texts)
    lengths = {len(enc.answer_ids(t)) for t in texts}
    assert len(lengths) > 1  # answers of different token counts share a padded batch
    full = score_options(model, enc, samples, [texts, texts])
    cached = score_options_cached(model, enc, samples, [texts, texts], batch_size=5)
    for a, b in zip(full, cached, strict=True):
        assert a.shape == b.shape == (len(texts),)
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4)
    assert not torch.allclose(cached[0], cached[1])  # the images matter


# ----------------------------------------------------------------------------- evaluate + ask


def _age_records(cohort, task, n=6, split="test"):
    rows = []
    for s in cohort.subjects[:n]:
        rows.append(task_record(task, subject_id=s.subject_id, answer=task.format_answer(s.age),
                                images=[{"modality": "T1", "path": str(cohort.root / s.t1_path)}],
                                study="DEMO", split=split, question=task.questions[0],
                                metadata={"task_spec": task.to_dict()}))
    return [parse_record(r) for r in rows]


def test_evaluate_expected_and_median(trained_run, tiny_cohort, tmp_path):
    result, _ = trained_run
    task = regression_task("age", low=0, high=100)
    records = _age_records(tiny_cohort, task)
    kw = dict(split="test", progress=False, bootstrap=50, regression_step=2.0)
    ev = evaluate_records(result.model_dir, records, tmp_path / "exp", regression="expected", **kw)
    for row in ev.predictions:
        assert row["scoring"] == "expected (51 candidates, step 2)"
        d = row["distribution"]
        assert 0 <= row["prediction"] <= 100 and row["prediction"] == pytest.approx(d["mean"],
                                                                                    abs=0.05)
        assert row["answer"] == task.format_answer(d["mean"]) and row["answer"].endswith(" years")
        assert row["abs_error"] == pytest.approx(abs(row["prediction"] - row["reference_value"]))
        assert d["n_candidates"] == 51 and d["sd"] >= 0 and sum(p for _, p in d["probs"]) <= 1.001
        assert all(v in np.arange(0, 101, 2) for v, _ in d["probs"])
    metrics = json.loads((tmp_path / "exp" / "metrics.json").read_text())
    assert metrics["regression"] == {"method": "expected", "step": 2.0, "tasks": {"age": {
        "candidates": 51, "step": 2.0, "range": [0.0, 100.0], "coarsened": False}}}
    assert metrics["tasks"]["age"]["parse_failures"] == 0
    report = (tmp_path / "exp" / "report.md").read_text()
    assert "Regression answers: the expected value of the model's distribution" in report
    assert "scoring: expected, 51 candidates, step 2" in report
    assert "scoring: expected, 51 candidates, step 2" in metrics_table(ev.metrics)
    med = evaluate_records(result.model_dir, records, tmp_path / "med", regression="median", **kw)
    for a, b in zip(ev.predictions, med.predictions, strict=True):
        assert b["scoring"].startswith("median (51")
        assert b["prediction"] == b["distribution"]["median"]
        assert b["distribution"]["probs"] == a["distribution"]["probs"]  # the same distribution


def test_evaluate_checks_the_method_and_range_before_compute(trained_run, tiny_cohort, tmp_path):
    result, _ = trained_run
    with pytest.raises(ConfigError, match="evaluation.regression='mean'"):
        evaluate_records(result.model_dir, _age_records(tiny_cohort, AGE, 1), tmp_path,
                         split="test", regression="mean")
    bare = regression_task("age_score", unit="years", decimals=0)  # no range
    test = _age_records(tiny_cohort, bare, 2)
    with pytest.raises(ConfigError, match="no value range"):
        evaluate_records(result.model_dir, test, tmp_path, split="test", progress=False)
    train = _age_records(tiny_cohort, bare, 6, split="train")  # the training split's range
    ev = evaluate_records(result.model_dir, test, tmp_path / "ok", split="test", progress=False,
                          bootstrap=0, plots=False, baseline_records=train)
    ages = [round(s.age) for s in tiny_cohort.subjects[:6]]
    assert ev.metrics["regression"]["tasks"]["age_score"]["range"] == [min(ages), max(ages)]
    assert all(min(ages) <= r["prediction"] <= max(ages) for r in ev.predictions)


def test_ask_answers_a_known_regression_question_by_expectation(trained_run, tiny_cohort):
    from umbrella.inference import BrainAssistant

    result, _ = trained_run
    scan = [("T1", tiny_cohort.root / tiny_cohort.subjects[0].t1_path)]
    assert task_for_question("<image>\nhow old is this subject?  answer in years.") is AGE
    assert task_for_question("How heavy is this subject?") is None
    assistant = BrainAssistant(result.run_dir, regression="expected", regression_step=5.0)
    answer = assistant.ask(AGE.questions[0], scan)
    d = assistant.last_distribution
    assert d is not None and answer == AGE.format_answer(d["mean"]) and 0 <= AGE.parse(answer) <= 120
    assert math.isclose(sum(p for _, p in d["probs"]), 1.0, abs_tol=0.03)
    assistant.ask("What is the sex of this subject?", scan)
    assert assistant.last_distribution is None  # a classification question is generated
    with pytest.raises(ConfigError, match="regression='mode'"):
        BrainAssistant(result.run_dir, regression="mode")


def test_config_accepts_the_methods_and_rejects_others():
    cfg = load_config(None, ["evaluation.regression=median", "evaluation.regression_step=0.5"])
    assert cfg.evaluation.regression == "median" and cfg.evaluation.regression_step == 0.5
    assert load_config(None, []).evaluation.regression == "expected"
    assert load_config(None, []).evaluation.regression_step is None
    with pytest.raises(ConfigError, match="evaluation.regression.*choose one of expected, median, "
                                          "generate"):
        load_config(None, ["evaluation.regression=mode"])


def test_cli_passes_the_method_and_step(monkeypatch, tiny_config, tmp_path, capsys):
    import umbrella.evaluation.evaluate as evaluate_mod
    from umbrella.cli import main
    from umbrella.config import save_config

    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text("{}")
    save_config(tiny_config("evaluation.regression_step=2.0"), run / "config.yaml")
    seen = []

    def fake_evaluate(model_dir, records, out, **kw):
        seen.append((kw["regression"], kw["regression_step"]))
        raise ConfigError("stop here")

    monkeypatch.setattr(evaluate_mod, "evaluate_records", fake_evaluate)
    assert main(["evaluate", "--model", str(run), "--quiet", "--regression", "median"]) == 1
    assert main(["evaluate", "--model", str(run), "--quiet"]) == 1  # the config's default
    assert main(["evaluate", "--model", str(run), "evaluation.regression=generate"]) == 1
    assert seen == [("median", 2.0), ("expected", 2.0), ("generate", 2.0)]
    with pytest.raises(SystemExit):
        main(["evaluate", "--model", str(run), "--regression", "mode"])
