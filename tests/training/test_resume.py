import json
import shutil

from transformers import TrainerCallback

from umbrella.training.callbacks import MARKER, latest_complete_checkpoint
from umbrella.training.run import train


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _losses(run_dir):
    hist = json.loads((run_dir / "log_history.json").read_text())
    return {h["step"]: h["loss"] for h in hist if "loss" in h}


def test_resume_reproduces_the_uninterrupted_losses(tiny_config, tmp_path):
    common = ["training.max_steps=8", "training.logging_steps=1", "training.save_steps=4",
              "training.warmup_steps=2"]
    straight = train(tiny_config(*common, f"training.output_dir={tmp_path / 'a'}"), progress=False)
    cut_cfg = tiny_config(*common, f"training.output_dir={tmp_path / 'b'}")
    first = train(cut_cfg, progress=False, extra_callbacks=[StopAt(4)])
    assert max(_losses(first.run_dir)) == 4
    ckpt = latest_complete_checkpoint(first.run_dir / "checkpoints")
    assert ckpt is not None and ckpt.name == "checkpoint-4"
    resumed = train(tiny_config(*common, f"training.output_dir={tmp_path / 'b'}",
                                "training.resume=auto"), progress=False)
    assert resumed.run_dir == first.run_dir
    expected, got = _losses(straight.run_dir), _losses(resumed.run_dir)
    assert [got[s] for s in range(5, 9)] == [expected[s] for s in range(5, 9)]


def test_incomplete_checkpoint_is_never_picked(tmp_path):
    ckpts = tmp_path / "checkpoints"
    good, torn = ckpts / "checkpoint-4", ckpts / "checkpoint-8"
    for folder in (good, torn):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"x" * 100)
    (good / MARKER).write_text(json.dumps({"step": 4, "files": {"model.safetensors": 100}}))
    assert latest_complete_checkpoint(ckpts) == good  # checkpoint-8 has no marker
    shutil.copy(good / MARKER, torn / MARKER)
    (torn / "model.safetensors").write_bytes(b"x" * 10)  # truncated after the marker was copied
    assert latest_complete_checkpoint(ckpts) == good
