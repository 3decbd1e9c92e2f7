"""How a worker started by a launcher (torchrun, deepspeed) ends: every rank exits 0 once the run is
finished, never with a crash at interpreter exit.

Why the ordinary exit is not enough (measured, torch 2.13, gloo, 2 ranks). A gloo process group
runs its collectives on C++ threads (``pt_gloo_runloop`` per group, ``gloo_tcp_loop`` per device).
After a finished ``umbrella train`` those threads are still alive when the interpreter starts to
shut down, and they stay alive after ``destroy_process_group()`` too: DistributedDataParallel's
reducer keeps the backend referenced after the DDP object itself is gone (a bare
``init_process_group`` + ``destroy_process_group`` does end them). DeepSpeed adds a second group.
The likely mechanism of the abort (the one PyTorch's own discussion of exits without
``destroy_process_group`` describes; the abort itself was not caught in a debugger here): if such a
thread still holds the last reference to a collective's tensors while the interpreter
finalises, releasing them needs the GIL, Python ends that thread with ``pthread_exit``, the forced
unwind meets a ``noexcept`` C++ frame and the process aborts: "terminate called without an active
exception", SIGABRT, exit code -6, although the model was already written. It depends on thread
scheduling, so it shows on a loaded machine (rank 1, which exits first, in 1 of 4 ``make test``
runs) and rarely on an idle one.

So a finished worker: waits for every rank (``barrier``: no rank leaves while a peer still talks
to it, and rank 0 has written the model), destroys the process group, runs the interpreter's own
exit work itself (``atexit`` handlers: loggers, trackers; then flushes stdout and stderr), and
leaves with ``os._exit``, skipping the finalisation these threads race with. A failed worker is
left alone: its non-zero exit already fails the job, and a barrier could wait on peers that are
stuck in a collective.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading


def distributed_worker() -> bool:
    """True in a process that joined an initialised torch.distributed process group."""
    dist = sys.modules.get("torch.distributed")  # never imports torch for a plain command
    return bool(dist is not None and dist.is_available() and dist.is_initialized())


def finish_worker(code: int = 0) -> None:
    """End a finished distributed worker with ``code`` (see the module docstring); returns only
    when this process is not a distributed worker."""
    if not distributed_worker():
        return
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    for thread in threading.enumerate():  # what a normal exit waits for: non-daemon threads
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def rank_and_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when no process group is initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
