"""Keep the best weights seen at any evaluation, and stop when they no longer improve.

At every evaluation :class:`KeepBest` reads one number from the evaluation metrics: the
validation loss (``eval_loss``, lower is better) or the task metric on the validation split
(``eval_score``, higher is better; :mod:`umbrella.training.validation`; ties are broken by the
validation loss). When it beats every earlier evaluation, the trainable weights are copied to CPU memory: no checkpoint (no optimizer)
is written for it. After training, :meth:`KeepBest.restore` puts the kept weights back into the
model, which ``train()`` then saves as the run's ``model/``.

- The last step is evaluated too (once, when ``max_steps`` is not a multiple of ``eval_steps``),
  so the final weights are always a candidate.
- Early stopping (``patience`` > 0): training stops after ``patience`` evaluations in a row that
  did not beat the best value so far by more than ``min_delta`` (the rule of transformers'
  ``EarlyStoppingCallback``). Selection itself ignores ``min_delta``: the kept weights are those of
  the best value.
- Resume: every checkpoint gets ``umbrella_best.json`` (the record) and, when the best step is not
  the checkpoint's own step, ``umbrella_best.safetensors`` (the kept weights), written before the
  completeness marker, so they are part of it. Resuming from that checkpoint restores both.
- ``best.json`` in the run folder is rewritten after every evaluation and at the end.
- Several processes: every rank sees the same (all-reduced) metrics, so all take the same stop
  decision; only rank 0 keeps a copy. Under DeepSpeed ZeRO-3 the partitioned weights are gathered
  (all ranks take part) for the copy and scattered back on restore.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from umbrella.errors import ConfigError
from umbrella.io import atomic_write, atomic_write_json

CRITERIA = {"val_loss": ("eval_loss", False), "metric": ("eval_score", True)}  # key, higher is better
RECORD, WEIGHTS = "umbrella_best.json", "umbrella_best.safetensors"


def resolve_criterion(choice: str, has_val: bool, eval_steps: int) -> str:
    """training.select_best -> none | val_loss | metric (``auto``: val_loss when evaluations run)."""
    evaluates = has_val and eval_steps > 0
    if choice == "auto":
        return "val_loss" if evaluates else "none"
    if choice != "none" and not evaluates:
        why = "there is no validation split" if not has_val else "training.eval_steps=0"
        raise ConfigError(f"training.select_best={choice} needs evaluations on the validation "
                          f"split, but {why}; give records with split 'val' and eval_steps > 0, "
                          "or set training.select_best=none")
    return choice


def improves(value: float, reference: float | None, greater: bool, min_delta: float = 0.0) -> bool:
    if reference is None:
        return True
    return value > reference + min_delta if greater else value < reference - min_delta


def evaluations_without_improvement(values: list[float], greater: bool, min_delta: float) -> int:
    """How many of the latest evaluations in a row did not beat the best before them by more than
    ``min_delta`` (the best so far follows every improvement, however small)."""
    best, count = None, 0
    for value in values:
        count = 0 if improves(value, best, greater, min_delta) else count + 1
        if improves(value, best, greater):
            best = value
    return count


def _zero3_params(model) -> list:
    return [p for p in model.parameters() if hasattr(p, "ds_id")]


def _gathered(params: list, modifier_rank: int | None = None):
    """DeepSpeed ZeRO-3: the full tensors inside the block (a collective: every rank enters)."""
    if not params:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def whole_weights(model, modifier_rank: int | None = None):
    """Inside the block every parameter holds its whole tensor: a no-op except under DeepSpeed
    ZeRO-3, where the partitions are gathered (every rank must enter) and, with
    ``modifier_rank``, that rank's changes are scattered back on exit."""
    return _gathered(_zero3_params(model), modifier_rank)


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def persistent_buffers(model):
    """(name, buffer) of every buffer saved with the model's weights (not the non-persistent ones,
    e.g. rotary frequencies, which the model rebuilds)."""
    for prefix, module in model.named_modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and name not in module._non_persistent_buffers_set:
                yield (f"{prefix}.{name}" if prefix else name), buf


class KeepBest(TrainerCallback):
    """Selection by ``criterion`` ("val_loss" | "metric") and optional early stopping."""

    def __init__(self, model, criterion: str, run_dir: Path, *, patience: int = 0,
                 min_delta: float = 0.0, resume_from: str | Path | None = None):
        if criterion not in CRITERIA:
            raise ConfigError(f"select_best criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
        if patience < 0 or min_delta < 0:
            raise ConfigError(f"training.early_stopping_patience={patience} and "
                              f"early_stopping_min_delta={min_delta} must be >= 0")
        self.model, self.criterion, self.run_dir = model, criterion, Path(run_dir)
        self.key, self.greater = CRITERIA[criterion]
        self.patience, self.min_delta = patience, min_delta
        self.resume_from = Path(resume_from) if resume_from else None
        self.evaluations: list[dict] = []  # {"step", "value"} per evaluation, in order
        self.best: dict | None = None  # {"step", "value"}
        self.stopped: dict | None = None  # {"step", "reason"} when early stopping ended the run
        self.weights: dict[str, torch.Tensor] | None = None  # rank 0: the best trainable weights
        self.max_steps = 0
        self.last_step: int | None = None  # set when training ends

    # ------------------------------------------------------------------ the record
    def record(self, last_step: int | None = None, kept: bool = False) -> dict:
        return {"criterion": self.criterion, "metric": self.key,
                "greater_is_better": self.greater,
                "step": self.best["step"] if self.best else None,
                "value": self.best["value"] if self.best else None,
                "evaluations": list(self.evaluations), "max_steps": self.max_steps,
                "last_step": last_step, "kept_as_model": kept,
                "early_stopping": {"patience": self.patience, "min_delta": self.min_delta,
                                   "stopped": self.stopped}}

    def _write(self, last_step: int, kept: bool = False) -> None:
        if _rank() == 0:
            atomic_write_json(self.run_dir / "best.json", self.record(last_step, kept))

    # ------------------------------------------------------------------ weights
    def _snapshot(self) -> None:
        """The trainable weights and the saved buffers (e.g. the input-centering statistics that
        training updates) as they are now, on rank 0."""
        trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        with whole_weights(self.model):
            if _rank() == 0:
                self.weights = {n: p.detach().to("cpu", copy=True) for n, p in trainable}
                self.weights.update({n: b.detach().to("cpu", copy=True)
                                     for n, b in persistent_buffers(self.model)})

    def restore(self) -> bool:
        """Load the kept weights into the model (every rank calls it). True when weights changed."""
        if self.best is None or self.best["step"] == self.last_step:
            return False
        params = dict(self.model.named_parameters()) | dict(persistent_buffers(self.model))
        with whole_weights(self.model, modifier_rank=0), torch.no_grad():
            if _rank() == 0:
                if self.weights is None:
                    raise RuntimeError("the best weights were not kept on rank 0")
                for name, tensor in self.weights.items():
                    params[name].copy_(tensor.to(params[name].device, params[name].dtype))
        return True

    def _beats_best(self, entry: dict) -> bool:
        if self.best is None or improves(entry["value"], self.best["value"], self.greater):
            return True
        return entry["value"] == self.best["value"] and \
            entry.get("eval_loss", float("inf")) < self.best.get("eval_loss", float("inf"))

    # ------------------------------------------------------------------ callback hooks
    def on_train_begin(self, args, state, control, **kwargs):
        self.max_steps = state.max_steps
        if self.resume_from is None:
            return
        path = self.resume_from / RECORD
        if not path.is_file():
            return  # a checkpoint written without selection: start a fresh record
        saved = json.loads(path.read_text())
        if saved.get("criterion") != self.criterion:
            print(f"best: {path} selected by {saved.get('criterion')}, this run by "
                  f"{self.criterion}; starting a new record", flush=True)
            return
        self.evaluations, self.best = saved["evaluations"], saved["best"]
        if self.best is None:
            return
        if self.best["step"] == state.global_step:  # the checkpoint's own weights are the best
            self._snapshot()
        elif _rank() == 0:
            self.weights = load_file(str(self.resume_from / WEIGHTS))

    def on_step_end(self, args, state, control, **kwargs):
        last_eval = self.evaluations[-1]["step"] if self.evaluations else None
        if state.global_step >= state.max_steps and last_eval != state.global_step:
            control.should_evaluate = True  # the final weights are a candidate too
        return control

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = (metrics or {}).get(self.key)
        if value is None:
            raise ConfigError(f"training.select_best={self.criterion} reads {self.key!r}, which the "
                              f"evaluation did not produce (got {', '.join(metrics or {})})")
        value, step = float(value), state.global_step
        if self.evaluations and self.evaluations[-1]["step"] == step:
            return control  # the same step evaluated twice (e.g. forced at the end)
        entry = {"step": step, "value": value}
        if self.criterion == "metric":  # ties in the metric are broken by the validation loss
            entry["eval_loss"] = float(metrics.get("eval_loss", float("inf")))
        self.evaluations.append(entry)
        if self._beats_best(entry):
            self.best = dict(entry)
            self._snapshot()
        waited = evaluations_without_improvement([e["value"] for e in self.evaluations],
                                                 self.greater, self.min_delta)
        if self.patience and waited >= self.patience and step < state.max_steps:
            self.stopped = {"step": step, "reason": (
                f"{waited} evaluations without improving {self.key} by more than {self.min_delta} "
                f"on the best {self.best['value']:.6g} (step {self.best['step']}); "
                f"patience {self.patience}")}
            control.should_training_stop = True
            if _rank() == 0:
                print(f"early stopping at step {step}: {self.stopped['reason']}", flush=True)
        self._write(step)
        return control

    def on_save(self, args, state, control, **kwargs):
        if _rank() != 0:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not folder.is_dir():
            return
        own = self.best is not None and self.best["step"] == state.global_step
        if self.best is not None and not own:
            atomic_write(folder / WEIGHTS, lambda tmp: save_file(self.weights, str(tmp)))
        atomic_write_json(folder / RECORD, {"criterion": self.criterion, "best": self.best,
                                            "evaluations": self.evaluations})

    def on_train_end(self, args, state, control, **kwargs):
        self.last_step = state.global_step

    def finish(self) -> dict:
        """Restore the best weights into the model and write ``best.json``; returns the record."""
        kept = self.best is not None
        self.restore()
        record = self.record(self.last_step, kept)
        if _rank() == 0:
            atomic_write_json(self.run_dir / "best.json", record)
        return record
