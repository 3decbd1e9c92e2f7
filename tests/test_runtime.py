"""umbrella.runtime: memory freed by a training step is kept for the next one (glibc)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# a child process: steps of the pooled convolutional stem on 48 x 64 x 48 volumes, then the page
# faults of 3 more steps. Batch 8: the first layer's activation is 8 x 8 x 48 x 64 x 48 floats =
# 37.7 MiB, above glibc's largest dynamic mmap threshold (32 MiB), so without the setting it is
# mapped afresh at every step whatever the threshold has grown to (at batch 4, 18.9 MiB, glibc
# raises its threshold after the first free and the count varied 27,000 - 83,000 between runs)
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
x = torch.randn(8, 1, 48, 64, 48)
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
    assert faults_off > 100_000  # measured ~300,000: every large activation mapped and faulted in
    # measured 0 - 18,432 (glibc's aligned allocation now and then maps one block afresh)
    assert faults_on < faults_off / 4
