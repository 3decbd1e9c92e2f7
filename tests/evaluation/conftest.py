"""A tiny model trained once per session on the demo sex records (shared by the evaluation tests)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def trained_run(tiny_cohort, tiny_records, tmp_path_factory):
    """The tiny_config settings (32³, patch 8, vocab 300) trained for 60 steps."""
    from umbrella.config import load_config
    from umbrella.training.run import train

    out = tmp_path_factory.mktemp("eval_runs")
    cfg = load_config(None, [
        f"dataset.T1.records=[{tiny_records}]", f"dataset.T1.data_root={tiny_cohort.root}",
        "dataset.T1.image_size=[32,32,32]", "dataset.T1.patch_size=[8,8,8]",
        f"training.output_dir={out}", "training.max_steps=60", "training.batch_size=8",
        "training.warmup_steps=5", "training.eval_steps=20", "training.logging_steps=5",
        "dataset.memoize=true", "model.vocab_size=300"])
    return train(cfg, progress=False), cfg


@pytest.fixture(scope="session")
def tiny_split_records(trained_run):
    """{split: [Record]} of the tiny sex records, as the run read them."""
    from umbrella.data.catalog import by_split, load_config_records

    return by_split(load_config_records(trained_run[1]))
