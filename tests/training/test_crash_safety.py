"""A crash loses at most the work since the last complete checkpoint; SIGTERM checkpoints and exits."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from umbrella.config import save_config
from umbrella.training.callbacks import latest_complete_checkpoint

WORKER = Path(__file__).with_name("kill_worker.py")
COMMON = ["training.max_steps=6", "training.save_steps=2", "training.logging_steps=1",
          "training.warmup_steps=1", "training.save_total_limit=10"]


def _run(cfg_path, kill_at, *overrides):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, str(WORKER), str(cfg_path), str(kill_at), *overrides],
                          env=env, capture_output=True, text=True, timeout=600)


def _final_weights(out: Path):
    return load_file(next(out.glob("*/seed_0/model/model.safetensors")))


@pytest.fixture(scope="module")
def reference(tiny_config_module, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    cfg = tiny_config_module(*COMMON, f"training.output_dir={out}")
    save_config(cfg, out / "c.yaml")
    run = _run(out / "c.yaml", 0)
    assert run.returncode == 0, run.stderr[-3000:]
    return _final_weights(out)


# Writes in order: 1-3 run files; per checkpoint (2, 4, 6) model, args, optimizer, scheduler, rng,
# marker (4-9, 10-15, 16-21); 22 the final model. Kill inside checkpoint-2's optimizer, inside
# checkpoint-6's weights, and inside the final model's weights.
@pytest.mark.parametrize("kill_at", [6, 16, 22])
def test_sigkill_during_checkpoint_write_then_resume_matches(kill_at, reference,
                                                             tiny_config_module, tmp_path):
    cfg = tiny_config_module(*COMMON, f"training.output_dir={tmp_path}")
    save_config(cfg, tmp_path / "c.yaml")
    killed = _run(tmp_path / "c.yaml", kill_at)
    assert killed.returncode == -signal.SIGKILL
    run_dir = next(tmp_path.glob("*/seed_0"))
    ckpt = latest_complete_checkpoint(run_dir / "checkpoints")
    expected = {6: None, 16: "checkpoint-4", 22: "checkpoint-6"}[kill_at]
    assert (ckpt.name if ckpt else None) == expected
    assert not (run_dir / "model").exists()  # the final model is renamed into place only whole
    resumed = _run(tmp_path / "c.yaml", 0, "training.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = _final_weights(tmp_path)
    assert final.keys() == reference.keys()
    assert all((final[k] == reference[k]).all() for k in final)


def test_sigterm_checkpoints_and_exits_cleanly(tiny_config_module, tmp_path):
    cfg = tiny_config_module("training.max_steps=500", "training.logging_steps=1",
                             f"training.output_dir={tmp_path}")
    save_config(cfg, tmp_path / "c.yaml")
    proc = subprocess.Popen([sys.executable, "-m", "umbrella.cli", "train", "-c",
                             str(tmp_path / "c.yaml"), "--quiet"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "'loss'" in line:
            proc.send_signal(signal.SIGTERM)
            break
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    run_dir = next(tmp_path.glob("*/seed_0"))
    ckpt = latest_complete_checkpoint(run_dir / "checkpoints")
    assert ckpt is not None and int(ckpt.name.split("-")[1]) < 500
    assert (run_dir / "model" / "model.safetensors").is_file()
