"""Run under `torchrun --nproc_per_node 2`: train() with the weights spoiled after step 4 (see
test_best.Spoil); rank 0 writes the weights it saw at step 4 to OUT/seen4.pt.

Usage: best_worker.py OUT RECORDS DATA_ROOT [KEY=VALUE ...]
"""

from __future__ import annotations

import sys

import torch
from test_best import Spoil

from umbrella.config import load_config
from umbrella.training.run import train


def main(out: str, records: str, root: str, overrides: list[str]) -> None:
    cfg = load_config(None, [f"dataset.T1.records=[{records}]", f"dataset.T1.data_root={root}",
                             "dataset.T1.image_size=[32,32,32]", "dataset.T1.patch_size=[8,8,8]",
                             f"training.output_dir={out}/runs", "training.batch_size=4",
                             "training.warmup_steps=2", "training.eval_steps=2",
                             "training.logging_steps=2", "training.max_steps=8",
                             "training.generation_log_every=0", "dataset.memoize=true",
                             "model.vocab_size=300", *overrides])
    spoil = Spoil(after=4)
    result = train(cfg, progress=False, extra_callbacks=[spoil])
    if torch.distributed.get_rank() == 0:
        torch.save({"seen4": spoil.seen[4], "best": result.best}, f"{out}/seen4.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
