"""The Trainer subclass: only the loss hook and the save hook differ from transformers.Trainer."""

from __future__ import annotations

import torch
from transformers import Trainer, TrainerCallback

MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "pixel_values", "image_order")


class UmbrellaTrainer(Trainer):
    """Unified NLL over the answer tokens of every sample in the batch, whatever its modalities."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = {k: inputs[k] for k in MODEL_INPUTS if k in inputs}
        if num_items_in_batch is not None:
            batch["num_items_in_batch"] = num_items_in_batch
        outputs = model(**batch)
        loss = outputs.loss
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Validation loss only: predictions are made by `umbrella evaluate`."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


class EpochSetter(TrainerCallback):
    """Tells the dataset the epoch, so augmentation draws differ between epochs."""

    def __init__(self, dataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int(state.epoch or 0))
