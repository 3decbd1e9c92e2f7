"""Records + images -> training samples.

One sample::

    {"images": [(modality, tensor), ...]   # in order of appearance; float16 when read from the
                                           # cache or memo (the collator casts), else float32
                                           # T1/dMRI (1, D, H, W); rsfMRI window (1, D, H, W, L)
     "input_ids": (L_text,) long, "attention_mask": (L_text,) long, "labels": (L_text,) long,
     "id", "subject_id", "study", "task", "metadata",
     # with numeric label smoothing, for a regression answer (umbrella.data.numeric_labels):
     "soft_positions": (n,) long, "soft_weights": (n, 10) float, "soft_token_ids": (10,) long}

Each ``<image>`` is expanded to its modality's token count before the sample leaves the dataset.

Images come from the preprocessing cache when one is given (memory-mapped float16; an rsfMRI
window is a slice of the mapped run), else from an in-memory float16 memo (``memoize``), else
they are decoded each time. rsfMRI windows: ``windows="random"`` (training: a window drawn per
access), ``"first"``, or ``"all"`` (evaluation: one item per window, records repeated).
Random draws (windows, augmentation) are a pure function of (seed, epoch, item, image), so they do
not depend on the number of DataLoader workers.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from umbrella.data.cache import PreprocessCache
from umbrella.data.fmri import take_window
from umbrella.data.heap import long_lived
from umbrella.data.inputs import ModalityInput, count_frames
from umbrella.data.numeric_labels import NumericLabels
from umbrella.data.prompts import PromptEncoder
from umbrella.data.records import Record
from umbrella.data.sampling import group_key
from umbrella.data.volumes import VolumeAugment
from umbrella.errors import RecordError, UmbrellaError

WINDOW_MODES = ("random", "first", "all")


class BadSamplePolicy:
    """``on_bad_sample=skip``: a sample that fails to load is replaced by the next item of the
    same modality group (deterministic), and the failure (item, record id, reason) is appended to
    ``log_path`` (one JSON line each, per process). Loading stops with an error once more than
    ``max_fraction`` of the items have failed in this process, and never loops: each replacement
    search visits every item of the group at most once.
    """

    def __init__(self, mode: str = "error", max_fraction: float = 0.01, log_path=None):
        if mode not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {mode!r}")
        self.mode, self.max_fraction, self.log_path = mode, max_fraction, log_path
        self.failed: dict[int, str] = {}

    def record(self, index: int, record_id: str, reason: str, total: int) -> None:
        import json
        import os

        if index not in self.failed:
            self.failed[index] = reason
            if self.log_path is not None:
                with open(self.log_path, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps({"item": index, "id": record_id, "reason": reason,
                                         "pid": os.getpid()}) + "\n")
        if len(self.failed) > self.max_fraction * total:
            raise UmbrellaError(
                f"{len(self.failed)} of {total} samples failed to load (over "
                f"dataset.max_bad_fraction={self.max_fraction}); last: record {record_id!r}: {reason}"
                + (f"; all failures are listed in {self.log_path}" if self.log_path else ""))


def window_tensor(run: np.ndarray, start: int, spec) -> torch.Tensor:
    """(T, D, H, W) run (a memmap from the cache, or an array) -> (1, D, H, W, L) window.

    The frames are copied once, in the stored dtype and layout (contiguous in time-major order, a
    single read from the mapped cache), and handed over as a permuted view; the collator's copy
    into the batch makes it contiguous. Same values as :func:`fmri.take_window`.
    """
    if start < 0 or start + spec.window_span > run.shape[0]:
        take_window(run, start, spec)  # raises with the frame numbers
    frames = np.array(run[start:start + spec.window_span:spec.stride_within_seq])
    return torch.from_numpy(frames).permute(1, 2, 3, 0)[None]


class InstructionDataset(Dataset):
    def __init__(self, records: list[Record], encoder: PromptEncoder | None,
                 inputs: dict[str, ModalityInput], *, augment: dict[str, VolumeAugment] | None = None,
                 seed: int = 0, max_length: int | None = None, memoize: bool = False,
                 cache: PreprocessCache | None = None, windows: str = "random",
                 bad_samples: BadSamplePolicy | None = None, numeric: NumericLabels | None = None):
        if windows not in WINDOW_MODES:
            raise ValueError(f"windows must be one of {WINDOW_MODES}, got {windows!r}")
        self.encoder, self.inputs, self.cache, self.windows = encoder, inputs, cache, windows
        self.cache_params = {m: inp.cache_params() for m, inp in inputs.items()}  # once, not per read
        self.augment, self.seed, self.epoch = augment or {}, seed, 0
        self.memo: dict[str, np.ndarray] | None = {} if memoize else None
        self.numeric = numeric
        with long_lived():  # one encoding per record, kept for the dataset's life
            # encoder None: images only (scoring_sample; `umbrella pretrain`), no text
            encoded = {r.id: self._encode(r, max_length) for r in records}
            soft = ({r.id: numeric.targets(r, encoded[r.id].labels) for r in records}
                    if numeric else {})
            ev = ({r.id: numeric.expected_value_terms(r) for r in records if soft[r.id]}
                  if numeric else {})
            self.records, self.starts = self._items(list(records))
            self.encoded = [encoded[r.id] for r in self.records]
            self.soft = [soft.get(r.id) for r in self.records]  # (positions, (n, 10)) or None
            self.ev = [ev.get(r.id) for r in self.records]  # (places, answer) or None
        self.bad = bad_samples or BadSamplePolicy("error")
        self.groups = [group_key(r.modalities) for r in self.records]

    def _encode(self, rec: Record, max_length: int | None):
        missing = [im.modality for im in rec.images if im.modality not in self.inputs]
        if missing:
            raise RecordError(f"uses modality {missing[0]} which is not configured",
                              record_id=rec.id, source=rec.source,
                              fix=f"add dataset.{missing[0]} to the config or drop the record")
        if self.encoder is None:  # images only (scoring_sample; `umbrella pretrain`), no text
            return None
        enc = self.encoder.encode(rec.turns, [self.inputs[im.modality].tokens for im in rec.images])
        if max_length is not None and len(enc.input_ids) > max_length:
            raise RecordError(f"is {len(enc.input_ids)} tokens long (image tokens included), over "
                              f"model.max_length={max_length}", record_id=rec.id, source=rec.source,
                              fix="shorten the conversation or raise model.max_length")
        return enc

    def _items(self, records: list[Record]):
        """(records per item, fixed window start per item or None); "all" repeats per window."""
        if self.windows != "all":
            return records, [None] * len(records)
        items, starts = [], []
        for rec in records:
            fmri = [im for im in rec.images if self.inputs[im.modality].is_fmri]
            if not fmri:
                items.append(rec)
                starts.append(None)
                continue
            spec_input = self.inputs[fmri[0].modality]
            n = min(len(spec_input.window_starts(count_frames(im.path, rec.id))) for im in fmri)
            for start in spec_input.window_starts(count_frames(fmri[0].path, rec.id))[:n]:
                items.append(rec)
                starts.append(start)
        return items, starts

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def item_groups(self) -> list[str]:
        """The modality group of every item, for the batch sampler."""
        return list(self.groups)

    def load_array(self, rec: Record, image_index: int) -> np.ndarray:
        """The whole preprocessed image (float32, or a float16 memmap from the cache)."""
        image = rec.images[image_index]
        modality = self.inputs[image.modality]
        if self.cache is not None:
            from functools import partial

            return self.cache.get_or_build(image.path, image.modality, self.cache_params[image.modality],
                                           partial(modality.preprocess, image, rec.id),
                                           modality.extra_sources(image))
        key = str(image.path)
        if self.memo is not None and key in self.memo:
            return self.memo[key]
        array = modality.preprocess(image, rec.id)
        if self.memo is not None:  # first and later uses see the same float16-rounded values
            self.memo[key] = array.astype(np.float16)
            return self.memo[key]
        return array

    def _draw(self, index: int, j: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, index, j]))

    def _window_start(self, index: int, j: int, run: np.ndarray, modality: ModalityInput) -> int:
        if self.starts[index] is not None:
            return self.starts[index]
        starts = modality.window_starts(run.shape[0])
        if self.windows == "first" or len(starts) == 1:
            return starts[0]
        return starts[int(self._draw(index, j).integers(len(starts)))]

    def _image(self, index: int, rec: Record, j: int) -> torch.Tensor:
        modality = self.inputs[rec.images[j].modality]
        array = self.load_array(rec, j)
        if modality.is_fmri:
            return window_tensor(array, self._window_start(index, j, array, modality), modality.spec)
        aug = self.augment.get(modality.modality)
        if aug is not None:
            seed = self._draw(index, j).integers(2**31)
            return torch.from_numpy(aug(np.asarray(array, dtype=np.float32), int(seed)))[None]
        # one copy in the stored dtype (float16 from the cache or memo); the collator casts
        return torch.from_numpy(np.array(array))[None]

    def scoring_sample(self, index: int) -> dict:
        """What scoring and generation need: images, the turns, and each image's token count."""
        rec = self.records[index]
        return {"images": [(im.modality, self._image(index, rec, j)) for j, im in enumerate(rec.images)],
                "turns": rec.turns, "image_tokens": [self.inputs[im.modality].tokens for im in rec.images]}

    def __getitem__(self, index: int) -> dict:
        if self.bad.mode == "error":
            return self._sample(index)
        groups = self.groups
        order = [i for i in range(index, len(self)) if groups[i] == groups[index]] + \
            [i for i in range(index) if groups[i] == groups[index]]
        for candidate in order:
            if candidate in self.bad.failed:
                continue
            try:
                return self._sample(candidate)
            except UmbrellaError as exc:
                self.bad.record(candidate, self.records[candidate].id, str(exc), len(self))
        raise UmbrellaError(f"every sample of modality group {groups[index]!r} failed to load")

    def _sample(self, index: int) -> dict:
        rec, enc = self.records[index], self.encoded[index]
        images = [(im.modality, self._image(index, rec, j)) for j, im in enumerate(rec.images)]
        ids = torch.tensor(enc.input_ids, dtype=torch.long)
        meta = dict(rec.metadata)
        if self.starts[index] is not None:
            meta["window_start"] = self.starts[index]
        sample = {"images": images, "input_ids": ids, "attention_mask": torch.ones_like(ids),
                  "labels": torch.tensor(enc.labels, dtype=torch.long), "id": rec.id,
                  "subject_id": rec.subject_id, "study": rec.study, "task": rec.task,
                  "metadata": meta}
        if self.soft[index] is not None:
            positions, weights = self.soft[index]
            sample["soft_positions"] = torch.tensor(positions, dtype=torch.long)
            sample["soft_weights"] = torch.from_numpy(weights)
            sample["soft_token_ids"] = torch.tensor(self.numeric.digit_ids, dtype=torch.long)
            if self.ev[index] is not None:
                places, answer = self.ev[index]
                sample["soft_place"] = torch.from_numpy(places)
                sample["soft_value"] = torch.full((len(places),), answer, dtype=torch.float32)
        return sample
