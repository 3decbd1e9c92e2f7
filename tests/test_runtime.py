"""umbrella.runtime: memory freed by a training step is kept for the next one (glibc)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# a child process: steps of the pooled convolutional stem on 48 x 64 x 48 volumes (activations
# of tens of MiB, beyond glibc's largest mmap threshold), then the page faults of 3 more steps
CHILD = """
import resource
import torch
from umbrella.runtime import retain_freed_memory
from umbrella.model.modeling_brain_vit import BrainPatchEmbedding
print(retain_freed_memory())
torch.manual_seed(0)
torch.set_num_threads(1)
spec = {"in_channels": 1, "image_size": [48, 64, 48], "patch_size": [16, 16, 16],
        "embed": "conv", "stem_channels": [8, 16, 32, 32], "stem_style": "pooled"}
net = BrainPatchEmbedding(32, spec, "T1")
x = torch.randn(4, 1, 48, 64, 48)
def step():
    net(x).mean().backward()
for _ in range(2):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _child(env_value: str) -> tuple[str, int]:
    env = {**os.environ, "UMBRELLA_RETAIN_MEMORY": env_value}
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env,
                         check=True).stdout.split()
    return out[0], int(out[1])


def test_a_training_step_reuses_the_memory_the_last_step_freed():
    from umbrella.runtime import retain_freed_memory

    if not retain_freed_memory():
        pytest.skip("the C library has no mallopt (not glibc)")
    on, faults_on = _child("1")
    off, faults_off = _child("0")
    assert (on, off) == ("True", "False")
    assert faults_off > 10_000  # every large activation mapped afresh and faulted in
    assert faults_on < faults_off / 3  # benchmarks.allocator: ~100x fewer at batch 16
