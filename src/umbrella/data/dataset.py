"""Records + images -> training samples.

One sample::

    {"images": [(modality, tensor (C, D, H, W)), ...]   # in order of appearance in the text
     "input_ids": (L,) long, "attention_mask": (L,) long, "labels": (L,) long,
     "id", "subject_id", "study", "task", "metadata"}

Each ``<image>`` is expanded to its modality's token count before the sample leaves the dataset.
Augmentation draws are a pure function of (seed, epoch, sample index, image index), so results do
not depend on the number of DataLoader workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from umbrella.data.prompts import PromptEncoder
from umbrella.data.records import Record
from umbrella.data.volumes import VolumeAugment, VolumeSpec, preprocess_volume
from umbrella.errors import RecordError


@dataclass(frozen=True)
class ModalityInput:
    """How one modality's images are read and how many visual tokens each becomes."""

    spec: VolumeSpec
    tokens: int


class InstructionDataset(Dataset):
    def __init__(self, records: list[Record], encoder: PromptEncoder,
                 inputs: dict[str, ModalityInput], *, augment: dict[str, VolumeAugment] | None = None,
                 seed: int = 0, max_length: int | None = None, memoize: bool = False):
        self.records, self.encoder, self.inputs = list(records), encoder, inputs
        self.augment, self.seed, self.epoch = augment or {}, seed, 0
        self.memo: dict[str, np.ndarray] | None = {} if memoize else None
        self.encoded = [self._encode(r, max_length) for r in self.records]

    def _encode(self, rec: Record, max_length: int | None):
        missing = [im.modality for im in rec.images if im.modality not in self.inputs]
        if missing:
            raise RecordError(f"uses modality {missing[0]} which is not configured",
                              record_id=rec.id, source=rec.source,
                              fix=f"add dataset.{missing[0]} to the config or drop the record")
        enc = self.encoder.encode(rec.turns, [self.inputs[im.modality].tokens for im in rec.images])
        if max_length is not None and len(enc.input_ids) > max_length:
            raise RecordError(f"is {len(enc.input_ids)} tokens long (image tokens included), over "
                              f"model.max_length={max_length}", record_id=rec.id, source=rec.source,
                              fix="shorten the conversation or raise model.max_length")
        return enc

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def load_volume(self, rec: Record, image_index: int) -> np.ndarray:
        """(D, H, W) float32, preprocessed; memoized as float16 when ``memoize`` is on."""
        image = rec.images[image_index]
        key = str(image.path)
        if self.memo is not None and key in self.memo:
            return self.memo[key].astype(np.float32)
        vol = preprocess_volume(image.path, self.inputs[image.modality].spec, record_id=rec.id)
        if self.memo is not None:  # the first use sees the same float16-rounded values as later ones
            self.memo[key] = vol.astype(np.float16)
            return self.memo[key].astype(np.float32)
        return vol

    def _image(self, index: int, rec: Record, j: int) -> torch.Tensor:
        vol = self.load_volume(rec, j)
        aug = self.augment.get(rec.images[j].modality)
        if aug is not None:
            seed = np.random.SeedSequence([self.seed, self.epoch, index, j]).generate_state(1)[0]
            vol = aug(vol, int(seed))
        return torch.from_numpy(np.ascontiguousarray(vol, dtype=np.float32))[None]

    def scoring_sample(self, index: int) -> dict:
        """What scoring and generation need: images, the turns, and each image's token count."""
        rec = self.records[index]
        return {"images": [(im.modality, self._image(index, rec, j)) for j, im in enumerate(rec.images)],
                "turns": rec.turns, "image_tokens": [self.inputs[im.modality].tokens for im in rec.images]}

    def __getitem__(self, index: int) -> dict:
        rec, enc = self.records[index], self.encoded[index]
        images = [(im.modality, self._image(index, rec, j)) for j, im in enumerate(rec.images)]
        ids = torch.tensor(enc.input_ids, dtype=torch.long)
        return {"images": images, "input_ids": ids, "attention_mask": torch.ones_like(ids),
                "labels": torch.tensor(enc.labels, dtype=torch.long), "id": rec.id,
                "subject_id": rec.subject_id, "study": rec.study, "task": rec.task,
                "metadata": rec.metadata}
