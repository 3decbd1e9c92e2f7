"""Samples -> model inputs: text padded per batch, images stacked per modality.

Output::

    input_ids, attention_mask, labels: (B, L_max)   (L_max optionally rounded up to a multiple)
    pixel_values: {modality: (n_images_of_modality, C, D, H, W)}   ((..., T) for rsfMRI windows)
    image_order: [(modality, index in its stack), ...] in order of appearance over the batch
    ids: [record id, ...]
    tasks: [record task, ...] (training.task_loss_weights)
    soft_index (N, 2) [row, position], soft_weights (N, 10), soft_token_ids (10,): soft digit
        targets of numeric answers, when the samples carry them (umbrella.data.numeric_labels)
    soft_place, soft_value (N,): each digit's place value and its answer, scaled (the expected-
        value term of training.numeric_ev_loss), when every soft sample carries them

Each modality's images are copied once, each into its slot of a buffer allocated for the batch
(contiguous, in the shape above):

* inside a DataLoader worker the buffer is shared memory, so handing the batch to the main
  process moves no bytes (a plain ``torch.stack`` allocates private memory that the worker queue
  then copies into shared memory: a second copy of every image, as torch's default_collate avoids);
* ``image_dtype`` casts in that same copy: a float16 window (e.g. a (1, D, H, W, T) view of the
  cache's (T, D, H, W) memory) becomes a contiguous float32 batch without a float32 temporary;
  without it, mixed dtypes (float16 from the cache, float32 after augmentation) stack in their
  promoted dtype and the model casts to its own;
* ``pin_memory=True`` (main process, CUDA only) allocates it page-locked, for asynchronous
  host-to-device copies without the DataLoader's extra pinning copy;
* otherwise it is allocated by numpy, which asks for transparent huge pages above 4 MiB: the first
  touch of a 70 MB window batch then takes far fewer page faults than torch's allocator gives.

The contiguous (n, 1, D, H, W, T) layout is also the fast one for the rsfMRI patch embedding on
CPU (time folds into the innermost, channels-last position of its Conv3d; benchmarks/README.md).
"""

from __future__ import annotations

import math
from functools import reduce

import numpy as np
import torch
from torch.utils.data import get_worker_info

from umbrella.data.prompts import IGNORE_INDEX


class BrainCollator:
    def __init__(self, pad_token_id: int, padding_side: str = "right",
                 pad_to_multiple_of: int | None = None, pin_memory: bool = False,
                 image_dtype: torch.dtype | None = None):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if pin_memory and not torch.cuda.is_available():
            raise ValueError("BrainCollator(pin_memory=True) needs a CUDA device (page-locked "
                             "memory only helps host-to-GPU copies); leave it False on CPU")
        self.pad_token_id, self.padding_side = pad_token_id, padding_side
        self.multiple = pad_to_multiple_of
        self.pin_memory, self.image_dtype = pin_memory, image_dtype

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
            "pixel_values": {m: stack_images(v, pin_memory=self.pin_memory, dtype=self.image_dtype,
                                             modality=m) for m, v in stacks.items()},
            "image_order": order,
            "ids": [s["id"] for s in samples],
            "tasks": [s.get("task") for s in samples],
        }
        if "labels" in samples[0]:
            batch["labels"] = self._pad([s["labels"] for s in samples], IGNORE_INDEX, length)
        soft = [(row, s) for row, s in enumerate(samples) if "soft_positions" in s]
        if soft:
            shift = [length - len(s["input_ids"]) if self.padding_side == "left" else 0
                     for s in samples]
            batch["soft_index"] = torch.cat([torch.stack(
                [torch.full_like(s["soft_positions"], row), s["soft_positions"] + shift[row]], 1)
                for row, s in soft])
            batch["soft_weights"] = torch.cat([s["soft_weights"] for _, s in soft])
            batch["soft_token_ids"] = soft[0][1]["soft_token_ids"]
            if all("soft_place" in s for _, s in soft):
                batch["soft_place"] = torch.cat([s["soft_place"] for _, s in soft])
                batch["soft_value"] = torch.cat([s["soft_value"] for _, s in soft])
        return batch


def stack_images(tensors: list[torch.Tensor], *, pin_memory: bool = False,
                 dtype: torch.dtype | None = None, modality: str = "images") -> torch.Tensor:
    """Stack same-shaped image tensors along a new dim 0 into a contiguous batch, copying (and
    casting to ``dtype``, default the samples' promoted dtype) each once; shared memory inside a
    DataLoader worker, page-locked with ``pin_memory``. Raises ValueError naming the modality
    and both shapes when the shapes differ."""
    first = tensors[0]
    for t in tensors[1:]:
        if t.shape != first.shape:
            raise ValueError(f"cannot batch {modality} images of shapes {tuple(first.shape)} and "
                             f"{tuple(t.shape)}; every image of a modality must have its "
                             "configured image_size")
    dtype = dtype or reduce(torch.promote_types, (t.dtype for t in tensors))
    out = _batch_buffer((len(tensors), *first.shape), dtype, pin_memory)
    for i, t in enumerate(tensors):  # a transposing cast (float16 (T, D, H, W) memory -> float32
        out[i].copy_(t)              # (D, H, W, T)) runs ~1.7x faster per sample than in stack
    return out


def _batch_buffer(shape: tuple[int, ...], dtype: torch.dtype, pin_memory: bool) -> torch.Tensor:
    """An uninitialised contiguous tensor: shared memory in a DataLoader worker (the queue then
    passes a handle, not the bytes), page-locked with ``pin_memory``, else numpy-allocated (numpy
    asks for transparent huge pages above 4 MiB, which makes first-touch page faults several
    times cheaper than torch's allocator on a 70 MB window batch)."""
    if get_worker_info() is not None:
        nbytes = math.prod(shape) * dtype.itemsize
        storage = torch.UntypedStorage._new_shared(nbytes)
        return torch.empty(0, dtype=dtype).set_(storage, 0, shape, _contiguous_strides(shape))
    if pin_memory:
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    try:
        np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    except TypeError:  # bfloat16 and other dtypes numpy lacks
        return torch.empty(shape, dtype=dtype)
    return torch.from_numpy(np.empty(shape, dtype=np_dtype))


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))
