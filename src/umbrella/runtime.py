"""Process-wide settings for long CPU work (training, pretraining, evaluation).

glibc's malloc serves every block above its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and returns it to the kernel on ``free``; the next step's block of the same size is
mapped again and every one of its pages is faulted in and zeroed by the kernel. A convolutional
stem on 48 x 64 x 48 volumes allocates activations of tens of MiB per layer and step: on the 2-core
machine of benchmarks/README.md ("Allocator") that was ~195,000 page faults and half a second of
kernel time per stem step. :func:`retain_freed_memory` tells malloc to serve large blocks from its
heap and to keep what is freed for the next allocation, as PyTorch's CUDA caching allocator does on
the GPU. It changes no result, only where memory comes from; resident memory stays near the peak
of the largest step instead of falling between steps. ``UMBRELLA_RETAIN_MEMORY=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import os

ENV = "UMBRELLA_RETAIN_MEMORY"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters of glibc's <malloc.h>
_TRIM_BYTES = 1 << 30  # the heap's free top is returned to the kernel only above 1 GiB
_applied: bool | None = None


def retain_freed_memory() -> bool:
    """Keep memory freed by the process for its next allocations (glibc: no mmap for large
    blocks, heap trimmed above 1 GiB only). Returns whether it is in effect: False where turned
    off by ``UMBRELLA_RETAIN_MEMORY=0`` or where the C library has no ``mallopt`` (not glibc).
    Idempotent; applies to the calling process and to the workers it forks afterwards."""
    global _applied
    off = os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off")
    if _applied is None and not off:
        try:
            mallopt = ctypes.CDLL(None).mallopt
        except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to set
            _applied = False
        else:
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD,
                                                                      _TRIM_BYTES))
    return bool(_applied)


def retaining() -> bool:
    """Whether :func:`retain_freed_memory` is in effect in this process (reports, sets nothing)."""
    return bool(_applied)
