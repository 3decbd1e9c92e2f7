"""Test-wide settings: offline, caches in a temp folder, two threads."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_CACHE = Path(tempfile.gettempdir()) / "umbrella-test-cache"
for _var, _sub in (("NILEARN_DATA", "nilearn"), ("DIPY_HOME", "dipy"), ("HF_HOME", "hf"),
                   ("MPLCONFIGDIR", "mpl")):
    os.environ.setdefault(_var, str(_CACHE / _sub))
    Path(os.environ[_var]).mkdir(parents=True, exist_ok=True)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")
# OpenMP's default busy-waiting makes 2-thread steps many times slower on a busy 2-core machine
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

torch.set_num_threads(2)

import pytest  # noqa: E402

TINY = {"n": 24, "size": 32, "voxel_mm": 6.3, "patch": 8}


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory):
    """24 demo subjects at 32³ (6.3 mm voxels): real template, planted sex effect, seconds to build."""
    from umbrella.demo.cohort import build_demo_cohort

    root = tmp_path_factory.mktemp("cohort")
    return build_demo_cohort(root, TINY["n"], seed=0, image_size=(TINY["size"],) * 3,
                             voxel_mm=TINY["voxel_mm"], workers=1, progress=False)


@pytest.fixture(scope="session")
def tiny_records(tiny_cohort, tmp_path_factory):
    from umbrella.demo.run import write_sex_records

    return write_sex_records(tiny_cohort, tmp_path_factory.mktemp("records") / "sex.jsonl", seed=0)


def _tiny_config_factory(tiny_cohort, tiny_records, out):
    from umbrella.config import load_config

    def make(*overrides):
        s, p = TINY["size"], TINY["patch"]
        base = [f"dataset.T1.records=[{tiny_records}]", f"dataset.T1.data_root={tiny_cohort.root}",
                f"dataset.T1.image_size=[{s},{s},{s}]", f"dataset.T1.patch_size=[{p},{p},{p}]",
                f"training.output_dir={out}", "training.max_steps=30",
                "training.batch_size=8", "training.warmup_steps=5", "training.eval_steps=0",
                "training.logging_steps=5", "dataset.memoize=true", "model.vocab_size=300"]
        return load_config(None, base + list(overrides))

    return make


@pytest.fixture
def tiny_config(tiny_cohort, tiny_records, tmp_path):
    """A factory: the tiny training config with extra dotlist overrides."""
    return _tiny_config_factory(tiny_cohort, tiny_records, tmp_path / "runs")


@pytest.fixture(scope="module")
def tiny_config_module(tiny_cohort, tiny_records, tmp_path_factory):
    return _tiny_config_factory(tiny_cohort, tiny_records, tmp_path_factory.mktemp("runs"))
