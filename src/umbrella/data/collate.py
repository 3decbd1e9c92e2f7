"""Samples -> model inputs: text padded per batch, images stacked per modality.

Output::

    input_ids, attention_mask, labels: (B, L_max)   (L_max optionally rounded up to a multiple)
    pixel_values: {modality: (n_images_of_modality, C, D, H, W)}
    image_order: [(modality, index in its stack), ...] in order of appearance over the batch
    ids: [record id, ...]
"""

from __future__ import annotations

import torch

from umbrella.data.prompts import IGNORE_INDEX


class BrainCollator:
    def __init__(self, pad_token_id: int, padding_side: str = "right",
                 pad_to_multiple_of: int | None = None):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.pad_token_id, self.padding_side = pad_token_id, padding_side
        self.multiple = pad_to_multiple_of

    def _pad(self, seqs: list[torch.Tensor], value: int, length: int) -> torch.Tensor:
        out = torch.full((len(seqs), length), value, dtype=torch.long)
        for row, seq in enumerate(seqs):
            if self.padding_side == "right":
                out[row, :len(seq)] = seq
            else:
                out[row, length - len(seq):] = seq
        return out

    def __call__(self, samples: list[dict]) -> dict:
        length = max(len(s["input_ids"]) for s in samples)
        if self.multiple:
            length = -(-length // self.multiple) * self.multiple
        stacks: dict[str, list[torch.Tensor]] = {}
        order = []
        for s in samples:
            for modality, tensor in s["images"]:
                stacks.setdefault(modality, []).append(tensor)
                order.append((modality, len(stacks[modality]) - 1))
        batch = {
            "input_ids": self._pad([s["input_ids"] for s in samples], self.pad_token_id, length),
            "attention_mask": self._pad([s["attention_mask"] for s in samples], 0, length),
            "pixel_values": {m: torch.stack(v) for m, v in stacks.items()},
            "image_order": order,
            "ids": [s["id"] for s in samples],
        }
        if "labels" in samples[0]:
            batch["labels"] = self._pad([s["labels"] for s in samples], IGNORE_INDEX, length)
        return batch
