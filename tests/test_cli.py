import subprocess
import sys

import pytest

from umbrella.cli import main


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "umbrella.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for cmd in ("demo", "prepare", "validate", "cache", "train", "evaluate", "ask"):
        assert cmd in out


@pytest.mark.parametrize("cmd", ["prepare"])
def test_unbuilt_commands_say_so(cmd, capsys):
    assert main([cmd]) == 2
    assert "not implemented yet" in capsys.readouterr().err


def test_train_reports_config_errors(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("trainng:\n  max_steps: 1\n")
    assert main(["train", "-c", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "trainng" in err and "training" in err


def test_ask_rejects_bad_image_argument(tmp_path, capsys):
    assert main(["ask", "--model", str(tmp_path), "--image", "T1", "q?"]) == 1
    assert "MODALITY=PATH" in capsys.readouterr().err


def test_cache_command_builds_then_reuses(tiny_config, tmp_path, capsys):
    from umbrella.config import save_config

    cfg = tiny_config(f"dataset.cache_dir={tmp_path / 'cache'}")
    save_config(cfg, tmp_path / "c.yaml")
    assert main(["cache", "-c", str(tmp_path / "c.yaml"), "--quiet", "--workers", "1"]) == 0
    assert "24 built, 0 reused, 0 failed" in capsys.readouterr().out
    assert main(["cache", "-c", str(tmp_path / "c.yaml"), "--quiet"]) == 0
    assert "0 built, 24 reused, 0 failed" in capsys.readouterr().out


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
