"""DDP on CPU (gloo, 2 processes) with ranks on different modalities in the same step."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

WORKER = Path(__file__).with_name("ddp_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ranks_on_different_modalities_match_single_process(tmp_path):
    # CPU (gloo) on purpose, also where a GPU is visible: two ranks cannot share one GPU
    path = os.pathsep.join(p for p in (str(WORKER.parent), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path, CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(WORKER), str(tmp_path)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    subprocess.run([sys.executable, str(WORKER), str(tmp_path), "--reference"], env=env, check=True,
                   timeout=300)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    ref = torch.load(tmp_path / "reference.pt", weights_only=True)
    for modality in ("T1", "rsfMRI"):  # each used by one rank: after the all-reduce, all agree
        for g0, g1, gr in zip(ranks[0]["grads"][modality], ranks[1]["grads"][modality],
                              ref["grads"][modality], strict=True):
            assert torch.equal(g0, g1)
            assert g0.abs().max() > 0
            assert torch.allclose(g0, gr, atol=1e-5, rtol=0), (g0 - gr).abs().max()
    for r in (*ranks, ref):  # dMRI idle everywhere: zero grads, weights bit-identical after AdamW
        assert all(g is not None and not g.any() for g in r["grads"]["dMRI"])
        for name, before in r["dmri_before"].items():
            assert torch.equal(before, r["dmri_after"][name]), name
