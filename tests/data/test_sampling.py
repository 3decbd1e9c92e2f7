from collections import Counter

import pytest
from torch.utils.data import DataLoader, Dataset

from umbrella.data.sampling import ModalityBatchSampler, group_key

GROUPS = ["T1"] * 37 + ["rsfMRI"] * 21 + ["dMRI"] * 9 + ["T1+rsfMRI"] * 5


class _Index(Dataset):
    def __len__(self):
        return len(GROUPS)

    def __getitem__(self, i):
        return i


def test_group_key_is_order_free():
    assert group_key(["rsfMRI", "T1", "T1"]) == "T1+rsfMRI"


@pytest.mark.parametrize("mixing", ["proportional", "round_robin"])
def test_single_group_batches_cover_epoch_exactly_once(mixing):
    s = ModalityBatchSampler(GROUPS, 4, mixing=mixing, seed=1)
    batches = list(s)
    assert len(batches) == len(s) == 10 + 6 + 3 + 2
    for b in batches:
        assert len({GROUPS[i] for i in b}) == 1
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(GROUPS)))


def test_round_robin_takes_turns():
    s = ModalityBatchSampler(GROUPS, 4, mixing="round_robin")
    first = [GROUPS[b[0]] for b in list(s)[:4]]
    assert first == ["T1", "T1+rsfMRI", "dMRI", "rsfMRI"]


def test_deterministic_per_seed_and_epoch():
    a = ModalityBatchSampler(GROUPS, 4, seed=3)
    b = ModalityBatchSampler(GROUPS, 4, seed=3)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)
    a.set_epoch(1)
    assert list(a) == list(b)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_get_disjoint_shares_and_equal_steps(world):
    samplers = [ModalityBatchSampler(GROUPS, 4, seed=5, rank=r, world_size=world)
                for r in range(world)]
    per_rank = [list(s) for s in samplers]
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == len(samplers[0])
    flat = [i for batches in per_rank for b in batches for i in b]
    assert set(flat) == set(range(len(GROUPS)))  # everything seen
    n_batches = 21
    if n_batches % world == 0:
        assert sorted(flat) == list(range(len(GROUPS)))  # and exactly once when it divides
    else:
        repeated = len(per_rank[0]) * world - n_batches
        assert sum(c - 1 for c in Counter(map(tuple, [b for r in per_rank for b in r])).values()) \
            == repeated


def test_same_batches_with_and_without_workers():
    def run(workers):
        s = ModalityBatchSampler(GROUPS, 4, seed=7)
        loader = DataLoader(_Index(), batch_sampler=s, num_workers=workers,
                            collate_fn=lambda b: list(b))
        return list(loader)

    assert run(0) == run(2)


def test_temperature_upweights_small_groups():
    counts = {}
    for mixing, temp in (("proportional", 1.0), ("temperature", 50.0)):
        c = Counter()
        for epoch in range(20):
            s = ModalityBatchSampler(GROUPS, 4, mixing=mixing, temperature=temp, seed=0)
            s.set_epoch(epoch)
            c.update(GROUPS[b[0]] for b in s)
        counts[mixing] = c
    assert counts["temperature"]["T1+rsfMRI"] > 1.5 * counts["proportional"]["T1+rsfMRI"]
    assert sum(counts["temperature"].values()) == sum(counts["proportional"].values())


def test_bad_settings():
    with pytest.raises(ValueError, match="mixing"):
        ModalityBatchSampler(GROUPS, 4, mixing="random")
    with pytest.raises(ValueError, match="rank"):
        ModalityBatchSampler(GROUPS, 4, rank=2, world_size=2)
