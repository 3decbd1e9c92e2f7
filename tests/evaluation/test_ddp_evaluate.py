"""evaluate_records under a 2-process gloo group (torch.multiprocessing.spawn, CPU)."""

import json

import torch.multiprocessing as mp
from eval_ddp_worker import worker

from umbrella.evaluation.evaluate import evaluate_records


def test_ddp_gather_counts_each_sample_once(trained_run, tiny_records, tiny_cohort,
                                           tiny_split_records, tmp_path):
    result, _ = trained_run
    mp.spawn(worker, nprocs=2, join=True,
             args=(2, str(tmp_path / "init"), str(result.model_dir), str(tiny_records),
                   str(tiny_cohort.root), str(tmp_path)))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    records = [r for split in sorted(tiny_split_records) for r in tiny_split_records[split]]
    ids = sorted(r.id for r in records)
    assert len(ids) == 24
    assert not set(ranks[0]["local"]) & set(ranks[1]["local"])  # disjoint shards
    assert sorted(ranks[0]["local"] + ranks[1]["local"]) == ids
    single = evaluate_records(result.model_dir, records, tmp_path / "single", split="all",
                              progress=False, bootstrap=0, plots=False)
    by_id = {r["id"]: r["prediction"] for r in single.predictions}
    for info in ranks:  # every rank holds all 24 rows once, and the same metrics
        assert (info["n"], info["n_records"], info["world_size"]) == (24, 24, 2)
        assert sorted(info["ids"]) == ids and len(set(info["ids"])) == 24
        assert {i: p for i, p in zip(info["ids"], info["predictions"], strict=True)} == by_id
        assert info["n_correct"] == single.metrics["tasks"]["sex"]["n_correct"]
        # rows predicted on both ranks (r1, r2) are kept once, from the first rank
        assert info["merged"] == [["r0", 0], ["r1", 0], ["r2", 0], ["r3", 1]]
    assert len((tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()) == 24
