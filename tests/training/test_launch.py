"""`umbrella train` under torchrun (gloo, 2 CPU processes): plain DDP across modalities, DeepSpeed."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from umbrella.config import save_config

REPO = Path(__file__).resolve().parents[2]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_modality_records(tiny_records: Path, out: Path) -> Path:
    """The tiny T1 records plus the same images presented as dMRI scalar maps."""
    rows = [json.loads(x) for x in tiny_records.read_text().splitlines()]
    extra = []
    for r in rows:
        d = json.loads(json.dumps(r))
        d["id"] = r["id"] + "_dmri"
        d["images"][0]["modality"] = "dMRI"
        extra.append(d)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows + extra))
    return out


def _torchrun(cfg_path: Path, tmp_path: Path, *overrides: str):
    # CPU (gloo) on purpose, also where a GPU is visible: two ranks cannot share one GPU
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_port()), "-m", "umbrella.cli",
           "train", "-c", str(cfg_path), "--quiet", *overrides]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)


def test_torchrun_ddp_ranks_on_different_modalities(tiny_config, tiny_cohort, tiny_records,
                                                    tmp_path):
    records = _two_modality_records(tiny_records, tmp_path / "two.jsonl")
    cfg = tiny_config(f"dataset.T1.records=[{records}]", f"dataset.dMRI.records=[{records}]",
                      f"dataset.dMRI.data_root={tiny_cohort.root}",
                      "dataset.dMRI.image_size=[32,32,32]", "dataset.dMRI.patch_size=[8,8,8]",
                      "dataset.mixing=round_robin", "training.max_steps=4",
                      "training.logging_steps=1", "training.batch_size=4")
    save_config(cfg, tmp_path / "c.yaml")
    run = _torchrun(tmp_path / "c.yaml", tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    run_dir = next((tmp_path / "runs").glob("*/seed_0"))
    hist = json.loads((run_dir / "log_history.json").read_text())
    logged = [h for h in hist if "loss" in h]
    assert len(logged) == 4
    # round-robin over two groups: in every step one rank had T1 and the other dMRI
    assert all("loss/T1" in h and "loss/dMRI" in h for h in logged)
    assert (run_dir / "model" / "model.safetensors").is_file()


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                    reason="DeepSpeed is not installed (pip install '.[deepspeed]')")
def test_deepspeed_zero2_smoke(tiny_config, tmp_path):
    cfg = tiny_config("training.max_steps=3", "training.logging_steps=1",
                      f"training.deepspeed={REPO / 'configs/deepspeed/zero2.json'}")
    save_config(cfg, tmp_path / "c.yaml")
    run = _torchrun(tmp_path / "c.yaml", tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    run_dir = next((tmp_path / "runs").glob("*/seed_0"))
    hist = json.loads((run_dir / "log_history.json").read_text())
    assert [h["step"] for h in hist if "loss" in h] == [1, 2, 3]
    assert (run_dir / "model" / "model.safetensors").is_file()
