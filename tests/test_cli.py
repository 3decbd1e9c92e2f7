import subprocess
import sys

import pytest

from umbrella.cli import main


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "umbrella.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for cmd in ("demo", "prepare", "validate", "cache", "train", "evaluate", "ask"):
        assert cmd in out


@pytest.mark.parametrize("cmd", ["prepare", "validate", "cache"])
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
