import json

import torch

from umbrella.model.build import load_brain_llava
from umbrella.training.run import train


def test_tiny_training_lowers_the_loss_and_saves_a_complete_run(tiny_config):
    cfg = tiny_config("training.max_steps=30")
    result = train(cfg, progress=False)
    hist = json.loads((result.run_dir / "log_history.json").read_text())
    losses = [h["loss"] for h in hist if "loss" in h]
    assert len(losses) == 6
    assert losses[-1] < 0.5 * losses[0], losses
    for name in ("config.yaml", "env.json", "splits.json", "model/model.safetensors",
                 "model/tokenizer.json", "model/preprocessing.json"):
        assert (result.run_dir / name).is_file(), name
    assert result.run_dir.name == "seed_0" and result.run_dir.parent.name.startswith("sex__tiny__")
    splits = json.loads((result.run_dir / "splits.json").read_text())
    assert set(splits.values()) == {"train", "val", "test"}
    model, _ = load_brain_llava(result.model_dir)
    assert not model.training
    assert model.config.vision_config.modalities["T1"]["image_size"] == [32, 32, 32]


def test_same_seed_same_losses(tiny_config):
    runs = []
    for out in ("a", "b"):
        cfg = tiny_config("training.max_steps=6", "training.logging_steps=1",
                          f"training.run_name={out}")
        res = train(cfg, progress=False)
        hist = json.loads((res.run_dir / "log_history.json").read_text())
        runs.append([h["loss"] for h in hist if "loss" in h])
    assert runs[0] == runs[1]
    assert torch.get_num_threads() >= 1
