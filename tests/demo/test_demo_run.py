import json

from umbrella.demo.run import run_demo


def test_demo_end_to_end_small(tmp_path, monkeypatch):
    lines = []
    result = run_demo(tmp_path / "demo", n_subjects=24, image_size=32, patch=8,
                      overrides=["training.max_steps=30", "training.batch_size=8",
                                 "training.eval_steps=10", "model.vocab_size=300"],
                      progress=False, log=lines.append)
    text = "\n".join(lines)
    assert "accuracy" in text and "majority baseline" in text
    sex = result.metrics["tasks"]["sex"]
    assert sex["n"] == 6 and 0 <= sex["n_correct"] <= 6
    assert set(sex) >= {"accuracy", "balanced_accuracy", "macro_f1", "roc_auc"}
    for name in ("metrics.json", "report.md", "predictions.jsonl"):
        assert (result.eval_dir / name).is_file()
    rows = [json.loads(x) for x in (result.eval_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(abs(sum(r["probs"].values()) - 1) < 1e-5 for r in rows)
    assert isinstance(result.answer, str)
    assert (tmp_path / "demo" / "demo.yaml").is_file()
    assert "Training loss: first" in (result.eval_dir / "report.md").read_text()
