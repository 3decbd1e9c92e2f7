"""Best-checkpoint selection (training.select_best) and early stopping.

The validation loss is made worst after a known step by construction: :class:`Spoil` adds large
seeded noise to every trainable weight at the end of each step after ``after``, so every later
evaluation is far worse than the one at ``after``, and the best evaluation is known in advance.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from umbrella.errors import ConfigError
from umbrella.training.best import RECORD, WEIGHTS, evaluations_without_improvement, whole_weights
from umbrella.training.callbacks import MARKER
from umbrella.training.run import best_summary, train


class Spoil(TrainerCallback):
    """Copies the trainable weights at every step end; from step ``after`` + 1 on, adds noise."""

    def __init__(self, after: int):
        self.after, self.seen = after, {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step > self.after:
            gen = torch.Generator().manual_seed(step)
            with whole_weights(model, modifier_rank=0), torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.5)
        with whole_weights(model):
            self.seen[step] = {n: p.detach().clone() for n, p in model.named_parameters()
                               if p.requires_grad}


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _saved(result) -> dict[str, torch.Tensor]:
    return load_file(str(result.model_dir / "model.safetensors"))


def _assert_same_weights(saved: dict, expected: dict) -> None:
    assert expected
    for name, tensor in expected.items():
        assert torch.equal(saved[name], tensor), name


def _evaluated(run_dir) -> dict[int, float]:
    hist = json.loads((run_dir / "log_history.json").read_text())
    return {h["step"]: h["eval_loss"] for h in hist if "eval_loss" in h}


REPO = Path(__file__).resolve().parents[2]
COMMON = ("training.eval_steps=2", "training.logging_steps=2", "training.warmup_steps=2")


def test_the_model_is_the_best_evaluation_not_the_last(tiny_config):
    spoil = Spoil(after=4)
    result = train(tiny_config(*COMMON, "training.max_steps=9"), progress=False,
                   extra_callbacks=[spoil])
    best = json.loads((result.run_dir / "best.json").read_text())
    losses = _evaluated(result.run_dir)
    assert list(losses) == [2, 4, 6, 8, 9]  # the last step is evaluated too
    assert best["criterion"] == "val_loss" and best["metric"] == "eval_loss"
    assert best["step"] == 4 == min(losses, key=losses.get)
    assert best["value"] == pytest.approx(losses[4])
    assert [(e["step"], e["value"]) for e in best["evaluations"]] == \
        [(s, pytest.approx(v)) for s, v in losses.items()]
    assert best["last_step"] == 9 and best["kept_as_model"] is True
    assert best["early_stopping"]["stopped"] is None
    assert result.best == best
    _assert_same_weights(_saved(result), spoil.seen[4])
    assert not torch.equal(spoil.seen[4][next(iter(spoil.seen[4]))],
                           spoil.seen[9][next(iter(spoil.seen[9]))])
    assert best_summary(best).startswith("best: val_loss ") and "at step 4 of 9" in \
        best_summary(best)


def test_select_best_none_keeps_the_last_weights(tiny_config):
    spoil = Spoil(after=4)
    result = train(tiny_config(*COMMON, "training.max_steps=6", "training.select_best=none"),
                   progress=False, extra_callbacks=[spoil])
    assert not (result.run_dir / "best.json").exists() and result.best is None
    _assert_same_weights(_saved(result), spoil.seen[6])


def test_early_stopping_stops_after_patience_evaluations(tiny_config):
    spoil = Spoil(after=4)
    result = train(tiny_config(*COMMON, "training.max_steps=30",
                               "training.early_stopping_patience=2"),
                   progress=False, extra_callbacks=[spoil])
    best = result.best
    assert list(_evaluated(result.run_dir)) == [2, 4, 6, 8]  # 6 and 8 do not improve on 4
    assert best["last_step"] == 8 and best["step"] == 4
    assert best["early_stopping"]["stopped"]["step"] == 8
    assert "2 evaluations without improving eval_loss" in best["early_stopping"]["stopped"]["reason"]
    assert "early stopping at step 8" in best_summary(best)
    _assert_same_weights(_saved(result), spoil.seen[4])


@pytest.mark.parametrize("after", [2, 4])  # best before the checkpoint / at the checkpoint step
def test_resume_keeps_the_best_so_far(tiny_config, tmp_path, after):
    common = [*COMMON, "training.max_steps=8", "training.save_steps=4"]
    straight = train(tiny_config(*common, f"training.output_dir={tmp_path / 'a'}"),
                     progress=False, extra_callbacks=[Spoil(after)])
    cut = tmp_path / "b"
    first_spoil = Spoil(after)
    first = train(tiny_config(*common, f"training.output_dir={cut}"), progress=False,
                  extra_callbacks=[first_spoil, StopAt(4)])
    ckpt = first.run_dir / "checkpoints" / "checkpoint-4"
    marker = json.loads((ckpt / MARKER).read_text())["files"]
    assert RECORD in marker and (WEIGHTS in marker) == (after != 4)
    resumed = train(tiny_config(*common, f"training.output_dir={cut}", "training.resume=auto"),
                    progress=False, extra_callbacks=[Spoil(after)])
    assert resumed.best["step"] == straight.best["step"] == after
    assert [e["step"] for e in resumed.best["evaluations"]] == [2, 4, 6, 8]
    assert [e["value"] for e in resumed.best["evaluations"]] == \
        pytest.approx([e["value"] for e in straight.best["evaluations"]])
    _assert_same_weights(_saved(resumed), first_spoil.seen[after])


def test_patience_counts_only_improvements_beyond_min_delta():
    assert evaluations_without_improvement([3.0, 2.0, 2.5, 2.4], False, 0.0) == 2
    assert evaluations_without_improvement([3.0, 2.0, 1.95, 1.9], False, 0.1) == 2
    assert evaluations_without_improvement([3.0, 2.0, 1.95, 1.8], False, 0.1) == 0
    assert evaluations_without_improvement([0.5, 0.7, 0.6], True, 0.0) == 1


def test_selection_needs_evaluations(tiny_config):
    with pytest.raises(ConfigError, match=r"select_best=val_loss needs evaluations.*eval_steps=0"):
        train(tiny_config("training.select_best=val_loss"), progress=False)
    with pytest.raises(ConfigError, match=r"early_stopping_patience=3 watches"):
        train(tiny_config("training.early_stopping_patience=3"), progress=False)
    with pytest.raises(ConfigError, match=r"select_best.*choose one of auto, none"):
        tiny_config("training.select_best=best")


# ----------------------------------------------------------------------------- the task metric


def _age_records(tiny_records, path):
    """The tiny sex records asked as age (same subjects, same splits), one JSONL."""
    from umbrella.task_registry import AGE

    rows = [json.loads(x) for x in tiny_records.read_text().splitlines()]
    age = []
    for r in rows:
        a = json.loads(json.dumps(r))
        a["id"], a["task"] = r["id"].replace("_sex_", "_age_"), "age"
        a["conversations"] = [{"from": "human", "value": "<image>\n" + AGE.questions[0]},
                              {"from": "gpt", "value": AGE.format_answer(r["metadata"]["age"])}]
        age.append(a)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + age))
    return path


def _val_dataset(cfg, model_dir, tok):
    from umbrella.data.catalog import load_config_records, load_preprocessing
    from umbrella.data.dataset import InstructionDataset
    from umbrella.data.prompts import PromptEncoder

    records = load_config_records(cfg)
    val = [r for r in records if r.split == "val"]
    train_recs = [r for r in records if r.split == "train"]
    # memoized as in training (float16 images), so the scores compare the same inputs
    return InstructionDataset(val, PromptEncoder(tok), load_preprocessing(model_dir),
                              memoize=cfg.dataset.memoize), train_recs


def test_metric_selection_on_sex_and_age_together(tiny_config, tiny_records, tmp_path):
    from umbrella.data.prompts import PromptEncoder
    from umbrella.model.build import load_brain_llava
    from umbrella.training.validation import ValidationMetric

    both = _age_records(tiny_records, tmp_path / "both.jsonl")
    cfg = tiny_config(f"dataset.T1.records=[{both}]", "training.select_best=metric",
                      "training.eval_steps=3", "training.max_steps=8", "training.warmup_steps=2")
    result = train(cfg, progress=False)
    hist = [h for h in json.loads((result.run_dir / "log_history.json").read_text())
            if "eval_score" in h]
    assert [h["step"] for h in hist] == [3, 6, 8]
    for h in hist:
        assert 0.0 <= h["eval_accuracy/sex"] <= 1.0 and h["eval_mae/age"] > 0
    best = result.best
    assert best["criterion"] == "metric" and best["greater_is_better"] is True
    top = max(h["eval_score"] for h in hist)
    tied = [h for h in hist if h["eval_score"] == top]
    chosen = min(tied, key=lambda h: h["eval_loss"])  # ties go to the lower validation loss
    assert best["step"] == chosen["step"] and best["value"] == pytest.approx(top)
    # the saved model scores exactly what was recorded for the selected step
    model, tok = load_brain_llava(result.model_dir)
    val, train_recs = _val_dataset(cfg, result.model_dir, tok)
    again = ValidationMetric(val, PromptEncoder(tok), train_recs)(model)
    assert again["score"] == pytest.approx(best["value"], abs=1e-6)
    assert again["mae/age"] == pytest.approx(chosen["eval_mae/age"], abs=1e-4)


def test_regression_grid_spans_the_training_range_on_values_the_answers_hold():
    """17 answers over the training range, each a value some training answer holds: whole years
    written "57.0 years" give whole-year candidates, never "42.8 years"."""
    import numpy as np

    from umbrella.task_registry import AGE
    from umbrella.training.validation import GRID, regression_grid

    whole = [float(a) for a in range(40, 86)] * 3
    texts, values = regression_grid(AGE, whole)
    assert texts[0] == "40.0 years" and texts[-1] == "85.0 years" and len(texts) == GRID
    assert all(v == int(v) for v in values) and values == sorted(set(values))
    fine = list(np.round(np.random.default_rng(0).uniform(20, 68, 500), 1))
    texts, values = regression_grid(AGE, fine)
    assert values[0] == min(fine) and values[-1] == max(fine) and len(texts) == GRID
    assert set(values) <= set(fine)
    steps = np.diff(values)  # still spread evenly over the range
    assert steps.min() > 2.5 and steps.max() < 3.5
    assert regression_grid(AGE, [20.0, 68.0])[0] == ["20.0 years", "68.0 years"]
    texts, _ = regression_grid(AGE, [])  # no training answer: the plausible range, evenly
    assert texts[0] == "0.0 years" and texts[-1] == "120.0 years" and len(texts) == GRID


def test_score_is_the_mean_of_accuracy_and_relative_mae():
    from types import SimpleNamespace

    from umbrella.data.records import parse_record
    from umbrella.task_registry import AGE, SEX
    from umbrella.tasks.conversations import task_record
    from umbrella.training.validation import ValidationMetric

    def rec(task, sid, answer, split):
        return parse_record(task_record(task, subject_id=sid, answer=answer, study="DEMO",
                                        split=split, question=task.questions[0],
                                        images=[{"modality": "T1", "path": "x.nii.gz"}]))

    train_recs = [rec(AGE, "a", "10.0 years", "train"), rec(AGE, "b", "30.0 years", "train")]
    val = [rec(SEX, "c", "male", "val"), rec(SEX, "d", "female", "val"),
           rec(AGE, "c", "12.0 years", "val"), rec(AGE, "d", "24.0 years", "val")]
    metric = ValidationMetric(SimpleNamespace(records=val), None, train_recs)
    assert metric.tasks["age"].baseline_mae == pytest.approx((8 + 4) / 2)  # training mean 20
    out = metric.summarise({0: "male", 1: "male", 2: 14.0, 3: 23.0})
    assert out["accuracy/sex"] == 0.5 and out["mae/age"] == pytest.approx(1.5)
    assert out["score"] == pytest.approx((0.5 + (1 - 1.5 / 6)) / 2)


# ----------------------------------------------------------------------------- several processes


@pytest.mark.parametrize("engine", [
    "ddp", pytest.param("zero3", marks=[pytest.mark.slow, pytest.mark.skipif(
        importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")])])
def test_two_ranks_save_the_best_weights(tiny_cohort, tiny_records, tmp_path, engine):
    """torchrun, 2 CPU ranks (gloo): rank 0 keeps the copy; under ZeRO-3 the partitions are
    gathered for the copy, scattered back for the restore and gathered again for the save."""
    worker = Path(__file__).with_name("best_worker.py")
    path = os.pathsep.join(p for p in (str(worker.parent), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path, CUDA_VISIBLE_DEVICES="")
    extra = [f"training.deepspeed={REPO / 'configs/deepspeed/zero3.json'}"] if engine == "zero3" else []
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port), str(worker), str(tmp_path),
           str(tiny_records), str(tiny_cohort.root), *extra]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    out = torch.load(tmp_path / "seen4.pt", weights_only=True)
    assert out["best"]["step"] == 4 and [e["step"] for e in out["best"]["evaluations"]] == [2, 4, 6, 8]
    saved = load_file(str(next((tmp_path / "runs").glob("*/seed_0/model/model.safetensors"))))
    _assert_same_weights(saved, out["seen4"])
