"""Evaluation under torch.distributed: each rank predicts a disjoint shard, the rows are gathered
once and de-duplicated by item (the record id, or record id + rsfMRI window), so no sample is
counted twice (even if a sampler padded a shard by repeating records)."""

from __future__ import annotations

import torch.distributed as dist

from umbrella.training.launch import rank_and_world


def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """Rank ``rank``'s share of ``range(n)``: every ``world``-th index, disjoint across ranks."""
    return list(range(rank, n, world))


def gather_rows(rows: list[dict], order: dict[str, int] | None = None) -> list[dict]:
    """All ranks' rows on every rank: one ``all_gather_object``, the first row per item kept
    (``row["item"]``, else ``row["id"]``), sorted by ``order`` (item -> position) or by item.
    Single process: de-duplication only."""
    _, world = rank_and_world()
    parts = [rows]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, rows)
    seen: dict[str, dict] = {}
    for part in parts:
        for row in part:
            seen.setdefault(row.get("item", row["id"]), row)
    key = (lambda rid: (order.get(rid, len(order)), rid)) if order is not None else (lambda rid: rid)
    return [seen[rid] for rid in sorted(seen, key=key)]
