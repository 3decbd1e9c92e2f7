"""The Trainer subclass: only the data, loss and save hooks differ from transformers.Trainer.

Idle-modality parameters. A batch uses the patch embeddings of its own modalities only. So that
every DDP rank reduces the same parameter set whatever its batch held, the loss gets
``0 * p.sum()`` for every parameter of the embeddings the batch did not use: their gradient is
then a real zero tensor on every rank (no ``find_unused_parameters`` traversal, and it works with
gradient checkpointing). After the all-reduce, :class:`ReleaseIdleGrads` turns gradients that are
exactly zero on a modality embedding back into ``None``, so AdamW skips those parameters entirely:
no weight decay and no momentum step. An embedding that no rank used in a step therefore stays
bit-identical; one used by any rank is updated normally.
"""

from __future__ import annotations

import re
from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import Trainer
from transformers.trainer_utils import seed_worker

from umbrella.data.prompts import IGNORE_INDEX
from umbrella.data.sampling import ModalityBatchSampler, group_key

MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "pixel_values", "image_order")
_EMBEDDING = re.compile(r"vision_tower\.embeddings\.([A-Za-z0-9]+)\.")


def modality_parameters(model) -> dict[str, list[torch.nn.Parameter]]:
    """Trainable parameters of each modality's patch embedding, found by the modality in the name."""
    groups: dict[str, list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        match = _EMBEDDING.search(name)
        if match and param.requires_grad:
            groups.setdefault(match.group(1), []).append(param)
    return groups


def idle_term(model, used: set[str]) -> torch.Tensor | None:
    """0 * sum of every parameter of the embeddings not in ``used`` (None when all are used)."""
    idle = [p for m, ps in modality_parameters(model).items() if m not in used for p in ps]
    if not idle:
        return None
    return torch.stack([p.sum() for p in idle]).sum() * 0.0


def soft_target_loss(logits: torch.Tensor, labels: torch.Tensor, soft_index: torch.Tensor | None,
                     soft_weights: torch.Tensor | None, token_ids: torch.Tensor | None,
                     num_items_in_batch=None, row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy over the answer tokens, with soft targets at ``soft_index``
    ([row, label position]: a distribution ``soft_weights`` over ``token_ids``; None: none) and
    one-hot targets elsewhere; each row's tokens times ``row_weights`` (B,) when given
    (``training.task_loss_weights``); summed, then divided by ``num_items_in_batch`` (gradient
    accumulation) or by the number of answer tokens, as transformers' own loss."""
    logits = logits[:, :-1].float()
    targets = labels[:, 1:].to(logits.device)
    per_token = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX,
                                reduction="none")
    if soft_index is not None and len(soft_index):
        rows, cols = soft_index[:, 0], soft_index[:, 1] - 1  # label position t is predicted at t - 1
        log_p = torch.log_softmax(logits[rows, cols], dim=-1)[:, token_ids]
        soft = -(soft_weights.to(log_p.dtype) * log_p).sum(-1)
        per_token = per_token.index_put((rows, cols), soft)
    if row_weights is not None:
        per_token = per_token * row_weights.to(per_token)[:, None]
    count = num_items_in_batch if num_items_in_batch is not None else (targets != IGNORE_INDEX).sum()
    if torch.is_tensor(count):
        count = count.to(per_token.device)
    return per_token.sum() / count


def task_row_weights(tasks: list[str] | None, weights: dict[str, float] | None) -> torch.Tensor | None:
    """(B,) loss weight of each row from its task (``training.task_loss_weights``; 1 for tasks it
    does not name); None when no weight applies to the batch (then the plain loss is used)."""
    if not weights or not tasks:
        return None
    row = [float(weights.get(task, 1.0)) for task in tasks]
    return None if all(w == 1.0 for w in row) else torch.tensor(row)


def expected_value_loss(logits: torch.Tensor, soft_index: torch.Tensor, token_ids: torch.Tensor,
                        place: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Mean over the numeric answers of (sum_k place_k E[d_k] - value)^2, E[d_k] the expected
    digit under the model's distribution at digit k renormalised over the ten digits (teacher
    forcing: given the true digits before it); ``place`` and ``value`` come scaled by
    sqrt(weight) / sd (:meth:`umbrella.data.numeric_labels.NumericLabels.expected_value_terms`)."""
    rows, cols = soft_index[:, 0], soft_index[:, 1] - 1  # label position t is predicted at t - 1
    probs = torch.softmax(logits[rows, cols][:, token_ids].float(), dim=-1)
    digits = torch.arange(10, dtype=probs.dtype, device=probs.device)
    expected = (probs * digits).sum(-1) * place.to(probs)
    answers, which = rows.unique(return_inverse=True)
    number = torch.zeros(len(answers), dtype=probs.dtype, device=probs.device)
    number = number.index_add(0, which, expected)
    target = torch.zeros_like(number).index_put((which,), value.to(probs))
    return (number - target).square().mean()


def unified_loss(model, inputs: dict, num_items_in_batch=None,
                 task_weights: dict[str, float] | None = None):
    """Mean NLL over the batch's answer tokens (+ the zero idle-modality term while training).
    Numeric answers with soft digit targets (``soft_index`` in the batch) are scored against
    them (:func:`soft_target_loss`), plus the expected-value term where the batch carries it
    (:func:`expected_value_loss`). While training, ``task_weights`` (task -> weight) scales each
    answer's tokens by its task's weight (the batch's ``tasks``); validation loss stays unweighted."""
    batch = {k: inputs[k] for k in MODEL_INPUTS if k in inputs}
    soft = inputs.get("soft_index")
    soft = soft if soft is not None and len(soft) else None
    rows = task_row_weights(inputs.get("tasks"), task_weights) if model.training else None
    if soft is not None or rows is not None:
        labels = batch.pop("labels")
        outputs = model(**batch)
        outputs.loss = soft_target_loss(
            outputs.logits, labels, soft, inputs.get("soft_weights"),
            inputs.get("soft_token_ids"), num_items_in_batch, rows)
        if soft is not None and "soft_place" in inputs:  # training.numeric_ev_loss
            outputs.loss = outputs.loss + expected_value_loss(
                outputs.logits, soft, inputs["soft_token_ids"], inputs["soft_place"],
                inputs["soft_value"])
    else:
        if num_items_in_batch is not None:
            batch["num_items_in_batch"] = num_items_in_batch
        outputs = model(**batch)
    loss = outputs.loss
    if model.training:
        zero = idle_term(model, set(batch.get("pixel_values", {})))
        if zero is not None:
            loss = loss + zero
    return loss, outputs


def release_idle_grads(model) -> int:
    """Exactly-zero gradients of modality embeddings -> None (AdamW then skips them). Returns count."""
    released = 0
    for params in modality_parameters(model).values():
        for p in params:
            if p.grad is not None and not p.grad.any():
                p.grad = None
                released += 1
    return released


def _gather_sums(sums: dict[str, list]) -> dict[str, list]:
    """Per-group [loss sum, count] summed over ranks (log() runs on every rank at the same step)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return sums
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, sums)
    total: dict[str, list] = {}
    for part in gathered:
        for key, (value, count) in part.items():
            total.setdefault(key, [0.0, 0])
            total[key][0] += value
            total[key][1] += count
    return total


class UmbrellaTrainer(Trainer):
    """Unified NLL over the answer tokens of every sample in the batch, whatever its modalities.

    Training batches come from :class:`ModalityBatchSampler` (one modality group per batch,
    interleaved by ``mixing``), already split across ranks.
    """

    def __init__(self, *args, mixing: str = "proportional", temperature: float = 2.0,
                 part_metrics=None, val_metrics=None, vision_learning_rate: float | None = None,
                 task_loss_weights: dict[str, float] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.mixing, self.temperature = mixing, temperature
        self.vision_learning_rate = vision_learning_rate
        self.task_loss_weights = dict(task_loss_weights or {})
        self.part_metrics = part_metrics  # a callbacks.PartMetrics, or None
        self.val_metrics = val_metrics  # model -> {name: value}, added to each evaluation, or None
        self._group_loss: dict[str, list[float]] = {}

    def batch_sampler(self) -> ModalityBatchSampler:
        data = self.train_dataset
        return ModalityBatchSampler(
            data.item_groups(), self.args.per_device_train_batch_size,
            mixing=self.mixing, temperature=self.temperature, seed=self.args.seed,
            rank=self.args.process_index, world_size=self.args.world_size,
            drop_last=self.args.dataloader_drop_last)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """The Trainer's optimizer; with ``vision_learning_rate`` the vision tower's parameters
        get that peak rate in groups of their own (weight decay as the Trainer decides it)."""
        optimizer = super().create_optimizer(model)
        rate = self.vision_learning_rate
        if rate is None:
            return optimizer
        opt_model = self.model if model is None else model
        tower = {id(p) for n, p in opt_model.named_parameters() if "vision_tower." in n}
        for group in list(optimizer.param_groups):  # idempotent: a second call changes nothing
            own = [p for p in group["params"] if id(p) in tower]
            rest = [p for p in group["params"] if id(p) not in tower]
            if own and rest:
                group["params"] = rest
                optimizer.add_param_group({**group, "params": own, "lr": rate})
            elif own:
                group["lr"] = rate
        return optimizer

    def get_train_dataloader(self) -> DataLoader:
        sampler = self.batch_sampler()
        workers = self.args.dataloader_num_workers
        loader = DataLoader(
            self.train_dataset, batch_sampler=sampler, collate_fn=self.data_collator,
            num_workers=workers, pin_memory=self.args.dataloader_pin_memory and torch.cuda.is_available(),
            worker_init_fn=partial(seed_worker, num_workers=workers, rank=self.args.process_index))
        # Not passed through accelerator.prepare: the sampler already gives each rank its share,
        # and the Trainer moves each batch to the device itself (_prepare_inputs).
        return loader

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = unified_loss(model, inputs, num_items_in_batch, self.task_loss_weights)
        if model.training:
            key = group_key(inputs.get("pixel_values", {})) or "text"
            self._group_loss.setdefault(key, [0.0, 0])
            self._group_loss[key][0] += float(outputs.loss.detach())
            self._group_loss[key][1] += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        """Adds per-modality training loss and per-part gradient norms to the training logs."""
        if "loss" in logs:
            for key, (total, count) in _gather_sums(self._group_loss).items():
                logs[f"loss/{key}"] = round(total / count, 6)
            self._group_loss = {}
            if self.part_metrics is not None:
                logs.update({k: round(v, 6) for k, v in self.part_metrics.latest.items()})
        super().log(logs, *args, **kwargs)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None,
                        ignore_keys=None, metric_key_prefix: str = "eval"):
        """The validation loss, plus ``val_metrics(model)`` (e.g. the task metric) when given."""
        output = super().evaluation_loop(dataloader, description, prediction_loss_only,
                                         ignore_keys, metric_key_prefix)
        if self.val_metrics is not None:
            output.metrics.update({f"{metric_key_prefix}_{k}": v
                                   for k, v in self.val_metrics(self.model).items()})
        return output

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Validation loss only: predictions are made by `umbrella evaluate`."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
