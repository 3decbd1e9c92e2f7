"""Train from a saved config, SIGKILLing this process in the middle of the N-th file write.

    python kill_worker.py CONFIG.yaml N [KEY=VALUE ...]

Every write of torch.save / safetensors' save_file / the project's atomic writes is counted; the
N-th one writes half of its bytes to the target path and then the process kills itself, like a
node dying mid-checkpoint. N=0 trains without killing.
"""

from __future__ import annotations

import io
import os
import signal
import sys

import safetensors.torch
import torch

import umbrella.io as uio

calls = {"n": 0}


def _maybe_die(path, data: bytes) -> None:
    calls["n"] += 1
    if calls["n"] == KILL_AT:
        with open(path, "wb") as fh:
            fh.write(data[: len(data) // 2])
            fh.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def _torch_save(obj, f, *args, **kwargs):
    if isinstance(f, (str, os.PathLike)):
        buf = io.BytesIO()
        _ORIG_TORCH_SAVE(obj, buf, *args, **kwargs)
        _maybe_die(f, buf.getvalue())
    return _ORIG_TORCH_SAVE(obj, f, *args, **kwargs)


def _save_file(tensors, filename, metadata=None):
    _maybe_die(filename, safetensors.torch.save(tensors, metadata=metadata))
    return _ORIG_SAVE_FILE(tensors, filename, metadata=metadata)


def _atomic_write(path, write):
    def counted(tmp):
        write(tmp)
        _maybe_die(path, open(tmp, "rb").read())
    return _ORIG_ATOMIC(path, counted)


if __name__ == "__main__":
    KILL_AT = int(sys.argv[2])
    _ORIG_TORCH_SAVE, _ORIG_SAVE_FILE, _ORIG_ATOMIC = torch.save, safetensors.torch.save_file, uio.atomic_write
    torch.save = _torch_save
    safetensors.torch.save_file = _save_file
    uio.atomic_write = _atomic_write
    from umbrella.config import load_config
    from umbrella.training.run import train

    train(load_config(sys.argv[1], sys.argv[3:]), progress=False)
