import subprocess
import sys
from pathlib import Path

import pytest

from umbrella.cli import main


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "umbrella.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for cmd in ("demo", "prepare", "validate", "cache", "train", "evaluate", "ask"):
        assert cmd in out


def test_prepare_command_from_a_phenotype_table(tiny_cohort, tmp_path, capsys):
    code = main(["prepare", "--phenotype", str(tiny_cohort.phenotype_csv), "--out",
                 str(tmp_path / "recs"), "--tasks", "sex,age", "--study", "DEMO",
                 "--image", f"T1={tiny_cohort.root}/images/{{subject}}_T1w.nii.gz"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "sex_T1" in out and "age_T1" in out and "dataset.T1.data_root=" in out
    assert (tmp_path / "recs" / "prepare_summary.json").is_file()


def test_prepare_writes_a_config_that_trains_with_the_measured_recipe(tiny_cohort, tmp_path,
                                                                      capsys):
    """`umbrella prepare` writes train.yaml: the records (absolute), data root and study, the
    measured T1 recipe on top; `umbrella train -c` on it runs the first stage, then the VLM."""
    import json

    from umbrella.config import config_to_dict, load_config
    from umbrella.data.catalog import load_config_records
    from umbrella.recipes import T1_TWO_STAGE, dotlist

    recs = tmp_path / "recs"
    assert main(["prepare", "--phenotype", str(tiny_cohort.phenotype_csv), "--out", str(recs),
                 "--tasks", "sex,age", "--study", "MYSITE",
                 "--image", f"T1={tiny_cohort.root}/images/{{subject}}_T1w.nii.gz"]) == 0
    out = capsys.readouterr().out
    config = recs / "train.yaml"
    assert f"train with: umbrella train -c {config}" in out and "t1_two_stage" in out
    cfg = load_config(config)
    t1 = cfg.dataset.T1
    assert t1.records == [str((recs / f"{t}_T1.jsonl").resolve()) for t in ("age", "sex")]
    summary = json.loads((recs / "prepare_summary.json").read_text())
    assert t1.studies == ["MYSITE"] and t1.data_root == summary["data_roots"]["T1"]
    assert Path(t1.data_root).is_absolute()
    assert cfg.training.output_dir == str((recs / "runs").resolve())
    recipe = load_config(None, dotlist(T1_TWO_STAGE))
    mine, want = config_to_dict(cfg), config_to_dict(recipe)
    for key in dotlist(T1_TWO_STAGE):  # every key of the recipe holds its value
        section, *path = key.split("=")[0].split(".")
        a, b = mine[section], want[section]
        for part in path:
            a, b = a[part], b[part]
        assert a == b, key
    assert summary["recipe"] == "t1_two_stage" and summary["config_file"] == str(config)
    assert cfg.recipe == "t1_two_stage"

    assert main(["train", "-c", str(config), "--quiet", "pretrain.epochs=1",
                 "pretrain.batch_size=8",
                 "training.max_steps=2", "training.eval_steps=2", "training.batch_size=8",
                 "model.vocab_size=300", "dataset.T1.image_size=[16,16,16]",
                 "dataset.T1.voxel_size=[12,12,12]", "model.stem_channels=[4,8,16,32]"]) == 0
    out = capsys.readouterr().out
    towers = list((recs / "runs").glob("pretrain__*/seed_0/pretrain.json"))
    assert len(towers) == 1 and "training the vision tower first" in out
    assert "vision tower initialised from" in out
    n_images = len({r.subject_id for r in load_config_records(cfg) if r.split != "test"})
    cached = list((recs / "cache").glob("??/*.npy"))  # both stages read one decode per image
    assert len(cached) == n_images and cfg.dataset.cache_dir == str((recs / "cache").resolve())


def test_train_reports_config_errors(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("trainng:\n  max_steps: 1\n")
    assert main(["train", "-c", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "trainng" in err and "training" in err


def test_overrides_may_follow_options_in_order(monkeypatch, tmp_path):
    import umbrella.training.run as run_mod

    cfg = tmp_path / "c.yaml"
    cfg.write_text("training:\n  max_steps: 1\n")
    seen = {}

    def fake_train(cfg, progress):
        seen.update(steps=cfg.training.max_steps, lr=cfg.training.learning_rate, progress=progress)
        raise run_mod.ConfigError("stop here")

    monkeypatch.setattr(run_mod, "train", fake_train)
    assert main(["train", "-c", str(cfg), "training.max_steps=5", "--quiet",
                 "training.max_steps=7", "training.learning_rate=0.01"]) == 1
    assert seen == {"steps": 7, "lr": 0.01, "progress": False}  # the later override wins
    with pytest.raises(SystemExit):
        main(["train", "-c", str(cfg), "--quiet", "--bogus"])


def test_ask_needs_a_question(tmp_path, capsys):
    assert main(["ask", "--model", str(tmp_path), "--image", "T1=x.nii.gz"]) == 1
    assert "--interactive" in capsys.readouterr().err


def test_ask_rejects_bad_image_argument(tmp_path, capsys):
    assert main(["ask", "--model", str(tmp_path), "--image", "T1", "q?"]) == 1
    assert "MODALITY=PATH" in capsys.readouterr().err


def _saved(cfg, tmp_path) -> str:
    from umbrella.config import save_config

    save_config(cfg, tmp_path / "c.yaml")
    return str(tmp_path / "c.yaml")


def test_cache_command_builds_then_reuses(tiny_config, tmp_path, capsys):
    from umbrella.config import save_config

    cfg = tiny_config(f"dataset.cache_dir={tmp_path / 'cache'}")
    save_config(cfg, tmp_path / "c.yaml")
    assert main(["cache", "-c", str(tmp_path / "c.yaml"), "--quiet", "--workers", "1"]) == 0
    assert "24 built, 0 reused, 0 failed" in capsys.readouterr().out
    assert main(["cache", "-c", str(tmp_path / "c.yaml"), "--quiet"]) == 0
    assert "0 built, 24 reused, 0 failed" in capsys.readouterr().out


def test_training_says_where_images_come_from(tiny_config, tmp_path):
    from umbrella.data.catalog import load_config_records
    from umbrella.training.run import data_source

    plain = tiny_config()
    assert "decoded from the source files, kept in RAM" in data_source(
        plain, load_config_records(plain))
    cfg = tiny_config(f"dataset.cache_dir={tmp_path / 'cache'}")
    records = load_config_records(cfg)
    assert data_source(cfg, records).endswith(
        "(T1 0/24 ready); 24 will be built on first use (`umbrella cache` builds them in parallel)")
    assert main(["cache", "-c", _saved(cfg, tmp_path), "--quiet", "--workers", "1"]) == 0
    assert data_source(cfg, records) == f"images: from the preprocessing cache {tmp_path / 'cache'} (T1 24/24 ready)"


def test_cached_training_matches_uncached(tiny_config, tmp_path):
    import json

    from umbrella.training.run import train

    losses = []
    for name, extra in (("plain", []), ("cached", [f"dataset.cache_dir={tmp_path / 'c'}"])):
        cfg = tiny_config("training.max_steps=3", "training.logging_steps=1",
                          f"training.run_name={name}", *extra)
        res = train(cfg, progress=False)
        hist = json.loads((res.run_dir / "log_history.json").read_text())
        losses.append([h["loss"] for h in hist if "loss" in h])
    assert losses[0] == losses[1]  # memo (float16) and cache (float16) feed identical values


def test_validate_command_clean_then_broken(tiny_config, tiny_records, tmp_path, capsys):
    from umbrella.config import save_config

    save_config(tiny_config(), tmp_path / "c.yaml")
    assert main(["validate", "-c", str(tmp_path / "c.yaml"), "--quiet"]) == 0
    assert "no problems found" in capsys.readouterr().out
    broken = tmp_path / "broken.jsonl"
    lines = tiny_records.read_text().splitlines()
    broken.write_text("\n".join(lines[:3] + ["{oops"] + [lines[0]]) + "\n")
    code = main(["validate", "--records", str(broken), "--data-root", f"T1={tmp_path}",
                 "--quiet", "--json", str(tmp_path / "report.json")])
    out = capsys.readouterr().out
    assert code == 1
    assert "malformed_json" in out and "duplicate_id" in out and "missing_file" in out
    assert (tmp_path / "report.json").is_file()


def test_train_evaluate_ask_from_the_command_line(tiny_config, tiny_cohort, tmp_path, capsys):
    from umbrella.config import save_config

    save_config(tiny_config("training.max_steps=4"), tmp_path / "c.yaml")
    assert main(["train", "-c", str(tmp_path / "c.yaml"), "--quiet"]) == 0
    run_dir = next((tmp_path / "runs").glob("*/seed_0"))
    capsys.readouterr()
    assert main(["evaluate", "--model", str(run_dir), "--quiet", "--bootstrap", "50"]) == 0
    out = capsys.readouterr().out
    assert "sex" in out and (run_dir / "evaluation_test" / "metrics.json").is_file()
    assert "verdict: " in out and "reference features: 32x32x32 volume" in out  # the classical reference
    truth = tmp_path / "truth.json"
    truth.write_text('{"tasks": {"sex": {"T1": {"metric": "accuracy", "achievable": 0.9}}}}')
    assert main(["evaluate", "--model", str(run_dir), "--quiet", "--bootstrap", "50",
                 "--no-reference", "--truth", str(truth), "--out", str(tmp_path / "e2")]) == 0
    out = capsys.readouterr().out
    assert "verdict" not in out and "achievable: accuracy 0.900" in out
    truth.write_text('{"tasks": {"sex": {"T1": {"metric": "accuracy"}}}}')
    assert main(["evaluate", "--model", str(run_dir), "--quiet", "--no-reference",
                 "evaluation.truth=" + str(truth), "--out", str(tmp_path / "e3")]) == 1
    assert f"truth file {truth}: tasks.sex.T1.achievable is None" in capsys.readouterr().err
    png = tmp_path / "slices.png"
    scan = tiny_cohort.root / tiny_cohort.subjects[0].t1_path
    assert main(["ask", "--model", str(run_dir), "--image", f"T1={scan}",
                 "What is the sex of this subject?", "--show", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
