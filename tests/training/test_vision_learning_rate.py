"""training.vision_learning_rate: the vision tower's own peak learning rate (LLaVA's
mm_vision_tower_lr), scaled by the same schedule as every other group."""

import pytest
from transformers import TrainingArguments

from umbrella.config import ModelConfig, load_config
from umbrella.data.tokenizer import train_tokenizer
from umbrella.errors import ConfigError
from umbrella.model.build import build_brain_llava
from umbrella.training.trainer import UmbrellaTrainer

GEOM = {"T1": {"image_size": [16, 16, 16], "patch_size": [8, 8, 8]}}


def _optimizer(tmp_path, vision_lr):
    tok = train_tokenizer(["What is the sex? male female"] * 4, 280)
    model = build_brain_llava(ModelConfig(vision_hidden_size=32, text_hidden_size=32,
                                          patch_embed="conv", stem_channels=[4, 8, 8],
                                          stem_style="pooled"), GEOM, tok, seed=0)
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, weight_decay=0.1,
                             lr_scheduler_type="linear", warmup_steps=0, max_steps=10,
                             use_cpu=True, report_to=[])
    trainer = UmbrellaTrainer(model=model, args=args, vision_learning_rate=vision_lr)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    return model, trainer


def _lr_of(optimizer) -> dict[int, tuple[float, float]]:
    return {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}


def test_tower_gets_its_own_rate_and_the_schedule_scales_it(tmp_path):
    model, trainer = _optimizer(tmp_path, 5e-3)
    lr = _lr_of(trainer.optimizer)
    named = dict(model.named_parameters())
    assert len(lr) == sum(p.requires_grad for p in named.values())  # every parameter once
    assert sum(len(g["params"]) for g in trainer.optimizer.param_groups) == len(lr)
    tower = {n for n in named if "vision_tower." in n}
    assert tower and len(tower) < len(named)
    for n, p in named.items():
        assert lr[id(p)][0] == (5e-3 if n in tower else 1e-3), n
    # the decay split is the Trainer's: stem convolutions decay, their BatchNorms do not
    assert lr[id(named["model.vision_tower.embeddings.T1.stem.0.conv.weight"])] == (5e-3, 0.1)
    assert lr[id(named["model.vision_tower.embeddings.T1.stem.0.norm.weight"])] == (5e-3, 0.0)
    for _ in range(5):  # linear decay to 0 over 10 steps: half way, every group halves
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    halves = {round(g["lr"], 12) for g in trainer.optimizer.param_groups}
    assert halves == {5e-4, 2.5e-3}


def test_without_it_every_group_keeps_the_learning_rate(tmp_path):
    _, trainer = _optimizer(tmp_path, None)
    assert {g["lr"] for g in trainer.optimizer.param_groups} == {1e-3}
    assert len(trainer.optimizer.param_groups) == 2


def test_config_key_and_its_bound():
    assert load_config().training.vision_learning_rate is None
    assert load_config(None, ["training.vision_learning_rate=2e-3"]).training.vision_learning_rate \
        == pytest.approx(2e-3)
    for bad in ("0", "-1e-3"):
        with pytest.raises(ConfigError, match="training.vision_learning_rate.*must be > 0"):
            load_config(None, [f"training.vision_learning_rate={bad}"])


def test_a_second_call_changes_nothing(tmp_path):
    _, trainer = _optimizer(tmp_path, 5e-3)
    before = [(g["lr"], [id(p) for p in g["params"]]) for g in trainer.optimizer.param_groups]
    trainer.create_optimizer()
    assert [(g["lr"], [id(p) for p in g["params"]])
            for g in trainer.optimizer.param_groups] == before
