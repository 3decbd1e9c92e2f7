"""Shared by the embedding tests: one DDP step of tests/training/ddp_worker.py on 2 ranks (rank 0
a T1 batch, rank 1 an rsfMRI batch, dMRI idle) and the same step in one process."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

WORKER = Path(__file__).parents[1] / "training" / "ddp_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_rank_step(out: Path, *flags: str) -> tuple[list[dict], dict]:
    """(what each rank wrote, what the single process wrote) for the worker run with ``flags``."""
    path = os.pathsep.join(p for p in (str(WORKER.parent), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path, CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(WORKER),
           str(out), *flags]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    subprocess.run([sys.executable, str(WORKER), str(out), "--reference", *flags], env=env,
                   check=True, timeout=300)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    return ranks, torch.load(out / "reference.pt", weights_only=True)


def assert_step_agrees(ranks: list[dict], ref: dict) -> None:
    """T1 and rsfMRI embedding gradients equal on both ranks, non-zero, equal to the single
    process's; the idle dMRI embedding has zero gradients and is untouched by the AdamW step."""
    for modality in ("T1", "rsfMRI"):
        for g0, g1, gr in zip(ranks[0]["grads"][modality], ranks[1]["grads"][modality],
                              ref["grads"][modality], strict=True):
            assert torch.equal(g0, g1)
            assert g0.abs().max() > 0
            assert torch.allclose(g0, gr, atol=1e-5, rtol=1e-4), (g0 - gr).abs().max()
    for r in (*ranks, ref):
        assert all(g is not None and not g.any() for g in r["grads"]["dMRI"])
        for name, before in r["dmri_before"].items():
            assert torch.equal(before, r["dmri_after"][name]), name
