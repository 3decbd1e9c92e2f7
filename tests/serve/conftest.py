"""A tiny model trained once per session with its evaluation (shared by the serve tests)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class ServedRun:
    run_dir: Path
    model_dir: Path
    eval_dir: Path
    data_root: Path  # the cohort folder (T1 images under images/)
    test_ids: list[str]  # held-out record ids


@pytest.fixture(scope="session")
def served_run(tiny_cohort, tiny_records, tmp_path_factory) -> ServedRun:
    """The tiny 32³ sex model (30 steps) and its held-out evaluation (likelihood scoring)."""
    from umbrella.config import load_config
    from umbrella.data.catalog import by_split, load_config_records
    from umbrella.evaluation.evaluate import evaluate_records
    from umbrella.training.run import train

    out = tmp_path_factory.mktemp("serve_runs")
    cfg = load_config(None, [
        f"dataset.T1.records=[{tiny_records}]", f"dataset.T1.data_root={tiny_cohort.root}",
        "dataset.T1.image_size=[32,32,32]", "dataset.T1.patch_size=[8,8,8]",
        f"training.output_dir={out}", "training.max_steps=30", "training.batch_size=8",
        "training.warmup_steps=5", "training.eval_steps=0", "training.logging_steps=5",
        "dataset.memoize=true", "model.vocab_size=300"])
    trained = train(cfg, progress=False)
    splits = by_split(load_config_records(cfg))
    result = evaluate_records(trained.model_dir, splits["test"], trained.run_dir / "evaluation",
                              split="test", run_dir=trained.run_dir, progress=False,
                              baseline_records=splits["train"], bootstrap=20)
    return ServedRun(trained.run_dir, trained.model_dir, result.out_dir, Path(tiny_cohort.root),
                     [r.id for r in splits["test"]])
