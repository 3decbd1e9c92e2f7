"""Modality-homogeneous batches, interleaved across modalities, rank-aware.

Each sample belongs to a group named by its sorted set of modalities ("T1", "rsfMRI",
"T1+rsfMRI", ...): samples that mix modalities form their own group. Every batch holds one group.

One epoch, computed identically on every rank from (seed, epoch) alone:

1. each group's indices are shuffled and cut into batches of ``batch_size`` (the last, shorter
   batch is kept unless ``drop_last``);
2. the batches are ordered by the mixing policy:
   - ``proportional``: a uniformly random order of all batches (each group appears in proportion
     to its size);
   - ``round_robin``: groups take turns in sorted name order, skipping exhausted ones;
   - ``temperature``: each slot draws a group with probability ∝ n_g ** (1 / temperature)
     (T=1 is proportional, large T is uniform over groups); a group drawn after it ran out starts
     a fresh shuffle of its samples. The epoch keeps the same number of batches.
3. batch ``i`` goes to rank ``i % world_size``. When the batch count is not a multiple of
   ``world_size``, the first batches are repeated to fill the last step, so every rank runs the
   same number of steps and every sample is seen at least once.

The sampler runs in the main process (DataLoader ``batch_sampler``), so batches do not depend on
the number of workers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

MIXING = ("proportional", "round_robin", "temperature")


def group_key(modalities: Sequence[str]) -> str:
    return "+".join(sorted(set(modalities)))


class ModalityBatchSampler(Sampler[list[int]]):
    def __init__(self, groups: Sequence[str], batch_size: int, *, mixing: str = "proportional",
                 temperature: float = 2.0, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False):
        if mixing not in MIXING:
            raise ValueError(f"mixing must be one of {', '.join(MIXING)}, got {mixing!r}")
        if batch_size < 1 or not 0 <= rank < world_size or temperature <= 0:
            raise ValueError(f"bad sampler settings: batch_size={batch_size}, rank={rank}, "
                             f"world_size={world_size}, temperature={temperature}")
        self.batch_size, self.mixing, self.temperature = batch_size, mixing, temperature
        self.seed, self.rank, self.world_size, self.drop_last = seed, rank, world_size, drop_last
        self.epoch = 0
        self.members: dict[str, np.ndarray] = {}
        for name in sorted(set(groups)):
            self.members[name] = np.flatnonzero(np.asarray(groups, dtype=object) == name)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _cut(self, idx: np.ndarray) -> list[list[int]]:
        stop = len(idx) - len(idx) % self.batch_size if self.drop_last else len(idx)
        return [idx[i:i + self.batch_size].tolist() for i in range(0, stop, self.batch_size)]

    def _group_batches(self, rng: np.random.Generator) -> dict[str, list[list[int]]]:
        return {g: self._cut(rng.permutation(m)) for g, m in self.members.items()}

    def _round_robin(self, per_group: dict[str, list[list[int]]]) -> list[list[int]]:
        order, queues = [], {g: list(b) for g, b in per_group.items()}
        while any(queues.values()):
            for g in sorted(queues):
                if queues[g]:
                    order.append(queues[g].pop(0))
        return order

    def _temperature(self, per_group, rng: np.random.Generator) -> list[list[int]]:
        names = [g for g in sorted(per_group) if per_group[g]]
        weights = np.array([len(self.members[g]) for g in names], dtype=float) ** (1 / self.temperature)
        queues = {g: list(per_group[g]) for g in names}
        order = []
        for _ in range(sum(len(b) for b in per_group.values())):
            g = names[rng.choice(len(names), p=weights / weights.sum())]
            if not queues[g]:
                queues[g] = self._cut(rng.permutation(self.members[g]))
            order.append(queues[g].pop(0))
        return order

    def global_batches(self) -> list[list[int]]:
        """Every batch of this epoch, in order, before the split across ranks."""
        rng = np.random.default_rng([self.seed, self.epoch])
        per_group = self._group_batches(rng)
        if self.mixing == "round_robin":
            return self._round_robin(per_group)
        if self.mixing == "temperature":
            return self._temperature(per_group, rng)
        flat = [b for g in sorted(per_group) for b in per_group[g]]
        return [flat[i] for i in rng.permutation(len(flat))]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.global_batches()
        if not batches:
            return iter(())
        total = len(self) * self.world_size
        batches = (batches * (total // len(batches) + 1))[:total]
        return iter(batches[self.rank::self.world_size])

    def __len__(self) -> int:
        n = sum(len(self._cut(m)) for m in self.members.values())
        return -(-n // self.world_size)
