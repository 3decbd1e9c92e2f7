from umbrella.evaluation.distributed import gather_rows, rank_and_world, shard_indices


def test_shards_are_disjoint_and_cover_everything():
    shards = [shard_indices(10, r, 3) for r in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert sorted(i for s in shards for i in s) == list(range(10))


def test_single_process_gather_deduplicates_items_not_windows():
    assert rank_and_world() == (0, 1)
    rows = [{"id": "b", "item": "b", "v": 1}, {"id": "a", "item": "a@w0", "v": 2},
            {"id": "a", "item": "a@w4", "v": 3}, {"id": "b", "item": "b", "v": 4}]
    out = gather_rows(rows, {"a@w0": 0, "a@w4": 1, "b": 2})
    assert [(r["item"], r["v"]) for r in out] == [("a@w0", 2), ("a@w4", 3), ("b", 1)]
    assert [r["id"] for r in gather_rows([{"id": "z"}, {"id": "y"}, {"id": "z"}])] == ["y", "z"]
