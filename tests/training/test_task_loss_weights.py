"""training.task_loss_weights: each answer's tokens weigh as its task says while training; the
validation loss stays the plain mean; a weight for a task no training record has is refused."""

import pytest
import torch
import torch.nn.functional as F

from umbrella.config import ModelConfig, load_config
from umbrella.data.collate import BrainCollator
from umbrella.data.prompts import IGNORE_INDEX, PromptEncoder
from umbrella.data.records import Record, Turn
from umbrella.data.tokenizer import train_tokenizer
from umbrella.errors import ConfigError
from umbrella.model.build import build_brain_llava
from umbrella.training.run import task_loss_weights
from umbrella.training.trainer import soft_target_loss, task_row_weights, unified_loss

GEOM = {"T1": {"image_size": [16, 16, 16], "patch_size": [8, 8, 8]}}


def _labels():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 20)
    labels = torch.full((2, 6), IGNORE_INDEX)
    labels[0, 3:6] = torch.tensor([4, 5, 7])
    labels[1, 2:4] = torch.tensor([6, 9])
    return logits, labels


def _per_row_sums(logits, labels):
    per_token = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:],
                                ignore_index=IGNORE_INDEX, reduction="none")
    return per_token.sum(1)


def test_row_weights_scale_each_answer_and_keep_the_token_count():
    logits, labels = _labels()
    rows = _per_row_sums(logits, labels)
    plain = soft_target_loss(logits, labels, None, None, None)
    assert plain.item() == pytest.approx((rows.sum() / 5).item(), rel=1e-6)  # 5 answer tokens
    ones = soft_target_loss(logits, labels, None, None, None, row_weights=torch.ones(2))
    assert ones.item() == pytest.approx(plain.item(), rel=1e-6)
    got = soft_target_loss(logits, labels, None, None, None, row_weights=torch.tensor([1.0, 3.0]))
    assert got.item() == pytest.approx(((rows[0] + 3 * rows[1]) / 5).item(), rel=1e-6)


def test_row_weights_from_tasks():
    assert task_row_weights(["sex", "age", "sex"], {"sex": 2.0}).tolist() == [2.0, 1.0, 2.0]
    assert task_row_weights(["age", "age"], {"sex": 2.0}) is None  # nothing to weigh: plain loss
    assert task_row_weights(["sex"], {}) is None


def _batch(tok, answers: dict[str, str]):
    encoder = PromptEncoder(tok)
    samples = []
    for task, answer in answers.items():
        rec = _rec(task, answer)
        enc = encoder.encode(rec.turns, [])
        ids = torch.tensor(enc.input_ids)
        samples.append({"images": [], "input_ids": ids, "attention_mask": torch.ones_like(ids),
                        "labels": torch.tensor(enc.labels), "id": rec.id, "task": task})
    return BrainCollator(tok.pad_token_id)(samples)


def test_unified_loss_weighs_tasks_while_training_only():
    tok = train_tokenizer(["What is it? male female 57 years"] * 4, 280)
    model = build_brain_llava(ModelConfig(vision_hidden_size=32, text_hidden_size=32), GEOM, tok,
                              seed=0)
    batch = _batch(tok, {"sex": "female", "age": "57 years"})
    assert batch["tasks"] == ["sex", "age"]
    model.eval()
    with torch.no_grad():
        plain, out = unified_loss(model, batch)
        rows = _per_row_sums(out.logits.float(), batch["labels"])
        count = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        assert plain.item() == pytest.approx((rows.sum() / count).item(), rel=1e-5)
        unweighted, _ = unified_loss(model, batch, task_weights={"sex": 4.0})
        assert unweighted.item() == pytest.approx(plain.item(), rel=1e-6)  # validation: plain
        model.train()  # no dropout in this model: the logits are the same
        weighted, _ = unified_loss(model, batch, task_weights={"sex": 4.0})
    assert weighted.item() == pytest.approx(((4 * rows[0] + rows[1]) / count).item(), rel=1e-5)


def _rec(task, answer="a"):
    return Record(id=f"x_{task}", subject_id="s", study="DEMO", task=task, split="train",
                  images=(), turns=(Turn("user", "What is it?"), Turn("assistant", answer)))


def test_weights_are_checked_against_the_training_tasks():
    train = [_rec("sex"), _rec("age")]
    cfg = load_config(None, ["training.task_loss_weights.sex=2.5"])
    assert task_loss_weights(cfg, train) == {"sex": 2.5}
    cfg = load_config(None, ["training.task_loss_weights.sx=2"])
    with pytest.raises(ConfigError, match="'sx'.*training tasks: age, sex"):
        task_loss_weights(cfg, train)
    cfg = load_config(None, ["training.task_loss_weights.sex=0"])
    with pytest.raises(ConfigError, match="must be > 0"):
        task_loss_weights(cfg, train)
