"""The Trainer subclass: only the loss hook and the save hook differ from transformers.Trainer."""

from __future__ import annotations

from functools import partial

import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import seed_worker

from umbrella.data.sampling import ModalityBatchSampler, group_key

MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "pixel_values", "image_order")


class UmbrellaTrainer(Trainer):
    """Unified NLL over the answer tokens of every sample in the batch, whatever its modalities.

    Training batches come from :class:`ModalityBatchSampler` (one modality group per batch,
    interleaved by ``mixing``), already split across ranks.
    """

    def __init__(self, *args, mixing: str = "proportional", temperature: float = 2.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.mixing, self.temperature = mixing, temperature

    def batch_sampler(self) -> ModalityBatchSampler:
        data = self.train_dataset
        return ModalityBatchSampler(
            [group_key(r.modalities) for r in data.records], self.args.per_device_train_batch_size,
            mixing=self.mixing, temperature=self.temperature, seed=self.args.seed,
            rank=self.args.process_index, world_size=self.args.world_size,
            drop_last=self.args.dataloader_drop_last)

    def get_train_dataloader(self) -> DataLoader:
        sampler = self.batch_sampler()
        workers = self.args.dataloader_num_workers
        loader = DataLoader(
            self.train_dataset, batch_sampler=sampler, collate_fn=self.data_collator,
            num_workers=workers, pin_memory=self.args.dataloader_pin_memory and torch.cuda.is_available(),
            worker_init_fn=partial(seed_worker, num_workers=workers, rank=self.args.process_index))
        loader = self.accelerator.prepare(loader)
        # the sampler is rank-aware already: make accelerate's batch-sampler shard a passthrough
        shard = getattr(loader, "batch_sampler", None)
        if shard is not None and getattr(shard, "batch_sampler", None) is sampler:
            shard.num_processes, shard.process_index = 1, 0
        return loader

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
