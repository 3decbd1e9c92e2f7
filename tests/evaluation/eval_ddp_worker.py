"""Run by torch.multiprocessing.spawn from test_ddp_evaluate.py: one rank of a 2-process gloo group
evaluating the tiny model; writes what it saw to OUT/rank<k>.json."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from umbrella.training.launch import finish_worker


def worker(rank: int, world: int, init_file: str, model_dir: str, records_file: str,
           data_root: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    import umbrella.evaluation.evaluate as evaluate
    from umbrella.data.records import load_records
    from umbrella.evaluation.distributed import gather_rows

    local: list[str] = []

    def spy(rows, order=None):  # what this rank predicted before the gather
        local.extend(r["id"] for r in rows)
        return gather_rows(rows, order)

    evaluate.gather_rows = spy
    records = load_records(records_file, {"T1": Path(data_root)})
    result = evaluate.evaluate_records(Path(model_dir), records, Path(out) / "eval", split="all",
                                       progress=False, bootstrap=50, plots=False, batch_size=4)
    overlapping = [{"id": f"r{i}", "rank": rank} for i in range(rank, rank + 3)]
    merged = gather_rows(overlapping)
    sex = result.metrics["tasks"]["sex"]
    info = {"local": local, "ids": [r["id"] for r in result.predictions],
            "predictions": [r["prediction"] for r in result.predictions],
            "n": sex["n"], "n_records": sex["n_records"], "n_correct": sex["n_correct"],
            "world_size": result.metrics["world_size"],
            "merged": [(r["id"], r["rank"]) for r in merged]}
    Path(out, f"rank{rank}.json").write_text(json.dumps(info))
    # barrier, destroy the group, exit work, os._exit: the ordinary interpreter exit can abort
    # a rank after a finished gloo run (umbrella.training.launch explains the race)
    finish_worker()
