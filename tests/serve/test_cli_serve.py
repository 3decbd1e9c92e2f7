import json

from umbrella.cli import main

T1 = "images/sub-0001_T1w.nii.gz"


def test_training_saves_the_tasks_it_learned(served_run):
    tasks = json.loads((served_run.model_dir / "tasks.json").read_text())["tasks"]
    assert list(tasks) == ["sex"] and "What is the sex of this subject?" in tasks["sex"]["questions"]


def test_ask_warns_on_a_question_the_model_was_not_trained_for(served_run, capsys):
    scan = f"T1={served_run.data_root / T1}"
    assert main(["ask", "--model", str(served_run.run_dir), "--image", scan,
                 "Is there a tumor in this scan?"]) == 0
    captured = capsys.readouterr()
    assert "notice: this model was not trained to answer this question" in captured.err
    assert "trained tasks: sex" in captured.err and captured.out.strip()
    assert main(["ask", "--model", str(served_run.run_dir), "--image", scan,
                 "What is the sex of this subject?"]) == 0
    assert "notice" not in capsys.readouterr().err


def test_serve_refuses_a_public_address_without_a_token(served_run, monkeypatch, capsys):
    monkeypatch.delenv("UMBRELLA_TOKEN", raising=False)
    assert main(["serve", "--model", str(served_run.run_dir), "--host", "0.0.0.0"]) == 1
    err = capsys.readouterr().err
    assert "--host 0.0.0.0 is reachable from other machines" in err and "--token" in err
