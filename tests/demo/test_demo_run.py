import json

import pytest

from umbrella.demo.run import run_demo


def test_demo_end_to_end_small(tmp_path, monkeypatch):
    lines = []
    result = run_demo(tmp_path / "demo", n_subjects=24, image_size=32, patch=8,
                      overrides=["training.max_steps=30", "training.batch_size=8",
                                 "training.eval_steps=10", "model.vocab_size=300"],
                      progress=False, log=lines.append)
    text = "\n".join(lines)
    assert "accuracy" in text and "majority baseline" in text
    assert (f"umbrella serve --model {result.run_dir} --eval {result.eval_dir} "
            f"--data-root T1={tmp_path / 'demo' / 'cohort'}") in text
    assert "reference (95% CI)" in text and "verdict: " in text  # the classical reference
    sex = result.metrics["tasks"]["sex"]
    assert sex["reference"]["comparison"]["verdict"] in text
    assert sex["n"] == 6 and 0 <= sex["n_correct"] <= 6
    assert set(sex) >= {"accuracy", "balanced_accuracy", "macro_f1", "roc_auc"}
    for name in ("metrics.json", "report.md", "predictions.jsonl"):
        assert (result.eval_dir / name).is_file()
    rows = [json.loads(x) for x in (result.eval_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(abs(sum(r["probs"].values()) - 1) < 1e-5 for r in rows)
    assert isinstance(result.answer, str)
    assert (tmp_path / "demo" / "demo.yaml").is_file()
    assert "Training loss: first" in (result.eval_dir / "report.md").read_text()


def test_demo_three_modalities_small(tmp_path):
    lines = []
    result = run_demo(tmp_path / "demo", n_subjects=20, image_size=16, patch=4, aux_size=16,
                      aux_patch=4, n_frames=12, sequence_length=4,
                      modalities=("T1", "rsfMRI", "dMRI"),
                      overrides=["training.max_steps=20", "training.batch_size=8",
                                 "training.eval_steps=0", "model.vocab_size=300"],
                      progress=False, log=lines.append)
    text = "\n".join(lines)
    assert "held-out sex accuracy by modality: T1 " in text and "| rsfMRI " in text
    assert "verdict rsfMRI: " in text and "reference rsfMRI features: connectivity" in text
    assert "| rsfMRI reference | 4 |" in (result.eval_dir / "report.md").read_text()
    assert set(result.per_modality) == {"T1", "rsfMRI", "dMRI"}
    rows = [json.loads(x) for x in (result.eval_dir / "predictions.jsonl").read_text().splitlines()]
    test_subjects = {r["subject_id"] for r in rows}
    assert len(test_subjects) == 4 and len(rows) == 12  # 20 % of 20 subjects, 3 records each
    for m, v in result.per_modality.items():
        mine = [r for r in rows if r["modalities"] == [m]]
        assert v["n"] == len(mine) == 4 and 0 <= v["n_correct"] <= 4
        assert v["n_correct"] == sum(r["correct"] for r in mine)
        assert v["accuracy"] == pytest.approx(v["n_correct"] / 4)
    assert result.metrics["tasks"]["sex"]["n"] == 4
    assert "T1" in result.answers and result.answers["T1"] == result.answer
    cfg = (tmp_path / "demo" / "demo.yaml").read_text()
    assert "mixing: proportional" in cfg
    from umbrella.data.catalog import load_preprocessing

    inputs = load_preprocessing(result.model_dir)  # what the trained model reads
    assert {m: i.tokens for m, i in inputs.items()} == {"T1": 64, "rsfMRI": 64, "dMRI": 64}
    assert inputs["rsfMRI"].spec.sequence_length == 4 and inputs["dMRI"].dmri_map == "FA"


def test_demo_config_default_geometry(tmp_path):
    """Default full-size demo: 216 tokens per image in every modality (T1 96³/16, rsfMRI 48³x8
    windows with 8x8x8x8 patches, dMRI 48³/8)."""
    from umbrella.data.catalog import modality_inputs
    from umbrella.demo.run import demo_config

    cfg = demo_config(tmp_path, tmp_path / "r.jsonl", tmp_path, 96, 16, 0, [],
                      modalities=("T1", "rsfMRI", "dMRI"))
    inputs = modality_inputs(cfg)
    assert {m: i.tokens for m, i in inputs.items()} == {"T1": 216, "rsfMRI": 216, "dMRI": 216}
    assert cfg.dataset.rsfMRI.patch_size == [8, 8, 8, 8]
    assert (cfg.dataset.rsfMRI.sequence_length, cfg.dataset.rsfMRI.stride_between_seq) == (8, 4)
    assert cfg.dataset.mixing == "proportional" and cfg.training.max_steps == 300


def test_per_modality_accuracy_from_rows_when_metrics_lack_groups():
    from umbrella.demo.run import per_modality_accuracy

    rows = [{"task": "sex", "modalities": [m], "correct": c}
            for m, c in (("T1", True), ("T1", False), ("dMRI", True))]
    got = per_modality_accuracy({"tasks": {}}, rows, ("T1", "dMRI", "rsfMRI"))
    assert got == {"T1": {"n": 2, "n_correct": 1, "accuracy": 0.5},
                   "dMRI": {"n": 1, "n_correct": 1, "accuracy": 1.0},
                   "rsfMRI": {"n": 0, "n_correct": 0, "accuracy": None}}
    grouped = {"by_modality": {"sex": {"T1": {"n": 5, "n_correct": 4}}}}
    assert per_modality_accuracy(grouped, rows, ("T1",))["T1"] == \
        {"n": 5, "n_correct": 4, "accuracy": 0.8}
