"""Trainer callbacks: each one job.

- ``EpochSetter``: tells the dataset the epoch (augmentation draws differ per epoch).
- ``ReleaseIdleGrads``: zero gradients of unused modality embeddings -> None before the step.
- ``CheckpointMarker``: writes ``umbrella_complete.json`` into a checkpoint once it is fully
  saved; resume only picks checkpoints that have it, so a write cut short is never resumed from.
- ``GracefulStop``: SIGTERM/SIGINT -> save a checkpoint at the end of the current step and stop.
- ``PartMetrics``: per-modality loss and per-part gradient norms, merged into the logged metrics.
- ``GenerationLogger``: every N evaluations, fixed validation prompts are answered and logged.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import torch
from transformers import TrainerCallback

from umbrella.io import atomic_write_json
from umbrella.training.trainer import release_idle_grads

MARKER = "umbrella_complete.json"


class EpochSetter(TrainerCallback):
    def __init__(self, dataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int(state.epoch or 0))


class ReleaseIdleGrads(TrainerCallback):
    def __init__(self, model):
        self.model = model

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        release_idle_grads(self.model)


def _listing(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MARKER}


class CheckpointMarker(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            atomic_write_json(folder / MARKER, {"step": state.global_step, "files": _listing(folder)})


def checkpoint_complete(folder: Path) -> bool:
    """True when the marker exists and every file it lists is present with its size."""
    marker = Path(folder) / MARKER
    if not marker.is_file():
        return False
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError):
        return False
    return all((Path(folder) / name).is_file() and (Path(folder) / name).stat().st_size == size
               for name, size in files.items())


def latest_complete_checkpoint(checkpoints: Path) -> Path | None:
    found = [p for p in Path(checkpoints).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    for folder in sorted(found, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        if checkpoint_complete(folder):
            return folder
    return None


class GracefulStop(TrainerCallback):
    """Clusters send SIGTERM before preemption: finish the step, checkpoint, exit cleanly."""

    def __init__(self):
        self.requested: str | None = None
        self._previous = {}

    def on_train_begin(self, args, state, control, **kwargs):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass

    def _handle(self, signum, frame):
        self.requested = signal.Signals(signum).name

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _part(name: str) -> str:
    if "vision_tower.embeddings." in name:
        return "embed_" + name.split("vision_tower.embeddings.")[1].split(".")[0]
    if "vision_tower" in name:
        return "vision_encoder"
    if "multi_modal_projector" in name:
        return "projector"
    return "llm"


def gradient_norms(model) -> dict[str, float]:
    """L2 norm of the gradients of each part (modality embeddings, vision encoder, projector, LLM)."""
    sums: dict[str, float] = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            key = _part(name)
            sums[key] = sums.get(key, 0.0) + float(p.grad.detach().float().pow(2).sum())
    return {f"grad_norm/{k}": v ** 0.5 for k, v in sums.items()}


class PartMetrics(TrainerCallback):
    """Collects per-part gradient norms before each optimizer step (after clipping)."""

    def __init__(self, model):
        self.model = model
        self.latest: dict[str, float] = {}

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.latest = gradient_norms(self.model)


class GenerationLogger(TrainerCallback):
    """Answers a fixed set of validation prompts every ``every`` evaluations."""

    def __init__(self, model, encoder, dataset, out: Path, every: int = 1, samples: int = 4,
                 max_new_tokens: int = 16):
        self.model, self.encoder, self.dataset = model, encoder, dataset
        self.out, self.every, self.max_new_tokens = Path(out), every, max_new_tokens
        self.indices = list(range(min(samples, len(dataset))))
        self.evaluations = 0

    def on_evaluate(self, args, state, control, **kwargs):
        self.evaluations += 1
        if self.every <= 0 or self.evaluations % self.every or not state.is_world_process_zero:
            return
        from umbrella.model.answering import generate_answers

        samples = [self.dataset.scoring_sample(i) for i in self.indices]
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            answers = generate_answers(self.model, self.encoder, samples, self.max_new_tokens)
        self.model.train(was_training)
        rows = [{"step": state.global_step, "id": self.dataset.records[i].id,
                 "question": self.dataset.records[i].turns[-2].text,
                 "reference": self.dataset.records[i].answer, "answer": a}
                for i, a in zip(self.indices, answers, strict=True)]
        with open(self.out, "a", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
